"""Unit checks of the evaluation's building blocks: BPDA backward, weight variant, Lipschitz, smoothing, audit."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from lipkern.eval import _remap, audit, layers, lipschitz, smoothing, stats, weight_variant
from lipkern.eval.data import Split


def _calibrated(model, data, c_r, **convert_kwargs):
    m, _ = _remap.remapped_copy(model, [data], c_r, convert_kwargs, progress=False)
    return m


@pytest.mark.parametrize("act, module, grad_fn", [
    ("relu", nn.ReLU(), lambda x: (x > 0).float()),
    ("gelu", nn.GELU(), lambda x: torch.ops.aten.gelu_backward(torch.ones_like(x), x)),
])
def test_straight_through_backward_is_activation_gradient(act, module, grad_fn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), module, nn.Linear(8, 3))
    conv = _calibrated(model, torch.randn(64, 8), 2 ** -3, acts=(act,))
    x = torch.randn(32, 8)
    pre = conv[0](x).detach().requires_grad_(True)
    g = torch.randn(32, 8)
    masked = torch.autograd.grad((conv[1](pre) * g).sum(), pre)[0]
    with _remap.straight_through(conv):
        bpda = torch.autograd.grad((conv[1](pre) * g).sum(), pre)[0]
    torch.testing.assert_close(bpda, g * grad_fn(pre.detach()), rtol=1e-6, atol=1e-6)
    # The forward is unchanged and the plain backward really is masked somewhere (else the test is vacuous).
    with _remap.straight_through(conv):
        assert torch.equal(conv(x), conv(x.clone()))
    assert (masked != bpda).any()


def test_weight_variant_equals_runtime_remap_on_matching_inputs():
    torch.manual_seed(0)
    fc1 = nn.Linear(4, 4)
    with torch.no_grad():
        fc1.weight.copy_(torch.eye(4))
        fc1.bias.zero_()
    model = nn.Sequential(fc1, nn.ReLU(), nn.Linear(4, 3))
    # Features 0 and 1 are tiny in every calibration row, 2 and 3 large; max |a| = 1, so t = 2^-6.
    calib = torch.tensor([[0.001, 0.002, 0.5, 1.0]]).repeat(20, 1) * torch.linspace(0.5, 1, 20)[:, None]
    c_r = 2 ** -6
    conv = _calibrated(model, calib, c_r, acts=("relu",))
    names = layers.check_matching(model, conv)
    freq = {"2": weight_variant.remap_frequency(layers.remap_counts(model, conv, [calib], names)["2"])}
    wm, pruned = weight_variant.weight_variant(model, freq, weight_variant.DEFAULT_FRACTION)
    assert pruned == {"2": 2}
    assert torch.equal(wm[2].weight[:, :2], torch.zeros(3, 2))
    assert torch.equal(wm[2].weight[:, 2:], model[2].weight[:, 2:])
    t = c_r * 1.0
    x = torch.cat([torch.rand(50, 2) * t * 0.9, t * 1.1 + torch.rand(50, 2)], 1)  # remapped set == {0, 1}
    with torch.no_grad():
        torch.testing.assert_close(wm(x), conv(x), rtol=0, atol=1e-6)
        assert not torch.allclose(model(x), conv(x), atol=1e-6)  # the remap did change something


def test_relu_zeros_are_not_counted_as_remapped():
    """A feature that ReLU already zeroes in most rows is not pruned: the remap did not remove it."""
    model = nn.Sequential(nn.ReLU(), nn.Linear(2, 1))
    x = torch.tensor([[-1.0, 0.001], [-1.0, 0.002], [-1.0, 0.003], [0.5, 0.004]])
    conv = _calibrated(model, x, 2 ** -6, acts=("relu",))  # t = 0.5 * 2^-6: feature 1 is remapped in every row
    names = layers.check_matching(model, conv)
    counts = layers.remap_counts(model, conv, [x, x[:1]], names)["1"]
    assert counts[:, 0].tolist() == [5, 5, 5]  # rows, summed over both batches
    assert counts[0, 1:].tolist() == [4, 0] and counts[1, 1:].tolist() == [4, 5]
    assert weight_variant.remap_frequency(counts).tolist() == [0.0, 1.0]


def test_sample_layer_stats_per_sample():
    torch.manual_seed(0)
    fc = nn.Linear(6, 4)
    model = nn.Sequential(nn.ReLU(), fc)
    x = torch.randn(5, 3, 6)  # 5 samples of 3 tokens
    st = layers.sample_layer_stats(model, x, ["1"], {"1": fc}, batch_size=2)["1"]
    rows = torch.relu(x)
    for i in range(5):
        sigma = lipschitz.masked_spectral_norms(fc.weight.detach(), rows[i])
        want = [float((rows[i] == 0).sum()), 18.0, sigma.max().item(), sigma.sum().item(), 3.0]
        torch.testing.assert_close(st[i], torch.tensor(want, dtype=torch.float64))


def test_masked_spectral_norm_matches_svd():
    torch.manual_seed(0)
    w = torch.randn(5, 7)
    rows = torch.randn(40, 7) * (torch.rand(40, 7) > 0.4)
    got = lipschitz.masked_spectral_norms(w, rows)
    want = torch.stack([torch.linalg.matrix_norm((w * (r != 0)).double(), ord=2) for r in rows])
    torch.testing.assert_close(got, want)
    fc = nn.Linear(7, 5)
    s = lipschitz.masked_spectral_norms(fc.weight.detach(), rows)
    per_sample = torch.stack([torch.zeros(40), torch.full((40,), 7.0), s, s, torch.ones(40)], 1)
    table = lipschitz.lipschitz_table({"fc": fc}, {"original": {"fc": per_sample}})
    assert table["fc"]["original"]["worst"] == s.max().item()
    assert abs(table["fc"]["original"]["mean"] - s.mean().item()) < 1e-12
    assert table["fc"]["original"]["worst"] <= table["fc"]["sigma_W"] + 1e-9


def test_input_vectors_of_strided_pointwise_conv():
    conv = nn.Conv2d(3, 4, 1, stride=2)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    rows = layers.input_vectors(conv, x)
    assert rows.shape == (2 * 2 * 2, 3)
    assert torch.equal(rows[0], x[0, :, 0, 0]) and torch.equal(rows[1], x[0, :, 0, 2])


def test_clopper_pearson_and_certify():
    from scipy.stats import beta
    assert smoothing.lower_confidence_bound(0, 10, 0.001) == 0.0
    assert abs(smoothing.lower_confidence_bound(990, 1000, 0.001) - beta.ppf(0.001, 990, 11)) < 1e-12
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]]))
        model[1].bias.zero_()
    x = torch.cat([torch.full((3, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), 0.01)])
    preds, radii = smoothing.certify(model, x, torch.zeros(4, dtype=torch.long), sigma=0.5, num_classes=2)
    assert (preds[:3] == 0).all() and (radii[:3] > 0.5).all()
    acc = smoothing.certified_accuracy(preds, radii, np.zeros(4), [0.0, 0.5, 1.0, 100.0])
    assert acc[-1] == 0.0 and all(a >= b for a, b in zip(acc, acc[1:]))


def test_audit_flags_masking():
    base = {"fgsm": {"8": 0.5, "96": 0.1}, "pgd": {"8": 0.4, "96": 0.0}, "autoattack": 0.4, "square_gain": 0.0,
            "transfer": 0.45, "adaptive": 0.39}
    assert audit.audit(base, 1000)["verdict"] == "PASS"
    # An AutoAttack gain over the original (0.42 -> 0.45) that the adaptive attack takes back (0.44, within the
    # 0.02 margin of the original) is flagged, though adaptive is within the margin of the model's own AutoAttack.
    gain = dict(base, autoattack=0.45, adaptive=0.44, transfer=0.46)
    masked = audit.audit(gain, 1000, original_autoattack=0.42)
    assert masked["verdict"] == "WARN" and len(masked["reasons"]) == 1
    assert "survives adaptive and transfer" in masked["reasons"][0]
    assert audit.audit(dict(gain, adaptive=0.45), 1000, original_autoattack=0.42)["verdict"] == "PASS"
    bad = dict(base, pgd={"8": 0.6, "96": 0.3}, adaptive=0.2, square_gain=0.1)
    res = audit.audit(bad, 1000)
    assert res["verdict"] == "WARN"
    text = " ".join(res["reasons"])
    for word in ("FGSM", "largest eps", "adaptive", "Square"):
        assert word in text
    # On 11 samples the margin (3 samples, 27 points) lets nothing fail: no PASS is given, a failure still warns.
    few = audit.audit(base, 11)
    assert few["verdict"] == "INCONCLUSIVE" and "11 samples give a margin of 27 points" in few["reasons"][0]
    assert audit.audit(base, 12)["verdict"] == "PASS"
    assert audit.audit(dict(base, pgd={"8": 0.4, "96": 0.3}), 3)["verdict"] == "WARN"


def test_split_head_and_batches():
    s = Split(torch.rand(10, 1, 2, 2), torch.arange(10))
    assert len(s.head(3)) == 3 and len(s.head(None)) == 10
    assert sum(len(b[1]) for b in s.batches(4)) == 10



def test_robust_accuracy_plot_draws_one_original_line_where_two_would_coincide():
    from lipkern.eval.report import original_lines

    apart = original_lines({"autoattack": 0.5, "worst_case": 0.45})
    assert [(key, title) for key, _, title in apart] == [("autoattack", "AutoAttack"), ("worst_case", "worst case")]
    assert original_lines({"autoattack": 0.5, "worst_case": 0.5}) == [
        ("autoattack", "tab:purple", "AutoAttack = worst case")]


def test_chunk_phrase_gives_the_sizes_a_run_has():
    from lipkern.eval.report import chunk_phrase

    assert chunk_phrase(40, 100) == "1 chunk of 40"
    assert chunk_phrase(200, 100) == "2 chunks of 100"
    assert chunk_phrase(250, 100) == "3 chunks of 100 (the last of 50)"


def test_report_accuracies_carry_the_wilson_interval_of_their_count():
    from lipkern.eval.report import _acc

    low, high = stats.wilson_interval(37, 80)
    assert _acc(37 / 80, 80) == f"46.25 [{100 * low:.2f}, {100 * high:.2f}]"
    assert _acc(None, 80) == "-"
    with pytest.raises(ValueError, match="no count of 7 samples"):
        _acc(0.1, 7)


def test_remapped_layer_plot_keeps_its_legend_off_the_bars(tmp_path, monkeypatch):
    """Bars near 100 % fill every corner of the axes: the legend stands outside them, within the figure."""
    from lipkern.eval import report

    names = [f"blocks.{i}.mlp.fc1" for i in range(3)] + ["blocks.0.shortcut"]
    configs = ["original", "2^-8", "2^-7", "2^-6"]
    m = {"name": "m", "layers": {"names": names, "n_samples": 4,
                                 "zero_fraction": {k: {n: 0.98 for n in names} for k in configs}}}
    drawn = []
    monkeypatch.setattr(report.plt, "close", drawn.append)
    path = tmp_path / "remapped_m.png"
    report._plot_layers(m, path)
    assert path.read_bytes().startswith(b"\x89PNG") and report.is_report_file(path)
    (fig,) = drawn
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent(renderer)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == configs
    assert not legend.overlaps(ax.get_window_extent(renderer))
    assert fig.bbox.x0 <= legend.x0 <= legend.x1 <= fig.bbox.x1 and fig.bbox.y0 <= legend.y0 <= legend.y1 <= fig.bbox.y1
