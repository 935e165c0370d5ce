"""lipkern.calibrate on small models: thresholds, statistics, report, persistence, gradients,
torch.compile and every bad input."""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from lipkern.calibrate import (
    NonFiniteActivationError,
    calibrate,
    load_calibration,
    measure_remapped,
    save_calibration,
    set_ratio,
)
from lipkern.convert import convert, straight_through
from lipkern.nn import remap_modules
from lipkern.ops.thresholds import HIST_MANTISSA_BITS
from lipkern.testing import SUM_RTOL
from model_helpers import (
    activation_maxima,
    assert_close_model_outputs,
    assert_matches_hook_reference,
    hooked_reference,
    model_backend,
)
from test_model_convert import ConvNet, Mlp

C_R = 2**-4  # large enough that every layer remaps a visible share on random data


class Blocks(nn.Module):
    """Two transformer-style MLP blocks (GELU) on [B, T, C] tokens."""

    def __init__(self, width=8):
        super().__init__()
        self.blocks = nn.Sequential(Mlp(nn.GELU(), width), Mlp(nn.GELU(approximate="tanh"), width))

    def forward(self, x):
        return self.blocks(x)


def _convnet():
    torch.manual_seed(1)
    model = ConvNet().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    return model


def _converted(original, **kwargs):
    kwargs.setdefault("backend", model_backend())
    return convert(copy.deepcopy(original), **kwargs)


def _conv_data(n=4):
    return [torch.randn(2, 3, 6, 6) for _ in range(n)]


def _token_data(n=4, width=8):
    return [torch.randn(2, 5, width) for _ in range(n)]


def _calibrate(model, data, **kwargs):
    kwargs.setdefault("c_r", C_R)
    kwargs.setdefault("progress", False)
    return calibrate(model, data, **kwargs)


def _expected_threshold(c_r, maximum):
    return (c_r * maximum.double()).float()


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_thresholds_are_ratio_times_max(granularity):
    original = Blocks()
    model = _converted(original, inputs_of=("*.fc1", "*.fc2"))
    data = _token_data()
    report = _calibrate(model, data, granularity=granularity)
    layers = dict(remap_modules(model))
    active = [name for name, m in layers.items() if not m.redundant]
    dims = {name: layers[name].channel_dim for name in active} if granularity == "channel" else None
    maxima = activation_maxima(original, active, data, dims)
    for name in active:
        layer = layers[name]
        expected = _expected_threshold(C_R, maxima[name])
        # GELU's float32 value may differ by ulps between PyTorch and the C++ kernel, and so may
        # every later layer's input.
        rtol = 0 if model_backend() == "reference" else 1e-5
        torch.testing.assert_close(layer.threshold, expected, rtol=rtol, atol=0)
        assert report[name].amax == pytest.approx(float(maxima[name].max()), rel=rtol)
    # FC2's input is the GELU output: no second remap there.
    assert layers["blocks.0.fc2.input_remap"].redundant
    assert layers["blocks.0.fc2.input_remap"].fed_by == "blocks.0.act"
    assert not layers["blocks.0.fc1.input_remap"].redundant


@pytest.mark.parametrize("center", [None, "mean"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_converted_output_equals_hook_reference(granularity, center):
    for original, data, inputs_of in (
        (_convnet(), _conv_data(), ("conv2",)),
        (Blocks().eval(), _token_data(), ("*fc1", "*fc2")),
    ):
        model = _converted(original, inputs_of=inputs_of)
        _calibrate(model, data, granularity=granularity, center=center)
        for x in data:
            assert_matches_hook_reference(model, original, x)


def test_remap_changes_the_output():
    original = _convnet()
    model = _converted(original)
    data = _conv_data()
    _calibrate(model, data)
    with torch.no_grad():
        assert not torch.equal(model(data[0]), original(data[0]))


def test_set_ratio_equals_fresh_calibration():
    original = Blocks().eval()
    data = _token_data()
    swept = _converted(original, inputs_of=("*fc1",))
    _calibrate(swept, data, c_r=2**-7, granularity="channel")
    report = set_ratio(swept, 2**-5)
    fresh = _converted(original, inputs_of=("*fc1",))
    _calibrate(fresh, data, c_r=2**-5, granularity="channel")
    for (name, a), (_, b) in zip(remap_modules(swept), remap_modules(fresh)):
        assert torch.equal(a.threshold, b.threshold), name
        assert a.ratio == b.ratio == 2**-5
    assert report.ratio == 2**-5 and len(report.layers) == 4
    with torch.no_grad():
        assert torch.equal(swept(data[0]), fresh(data[0]))
    with pytest.raises(ValueError, match="c_r"):
        set_ratio(swept, 1.5)
    with pytest.raises(RuntimeError, match="no stored statistics"):
        set_ratio(_converted(original), 2**-6)


def _sums_apart(stats):
    """How far two scans' sums of the same data may lie apart: each is within SUM_RTOL of the
    sum of |a|, which is at most sqrt(count x sumsq)."""
    return 2 * SUM_RTOL * (stats.sumsq * stats.count.double()).sqrt() + 1e-300


def test_two_half_scans_merged_equal_one_scan():
    original = _convnet()
    data = _conv_data(6)
    parts = []
    for chunk in (data[:3], data[3:], data):
        model = _converted(original, inputs_of=("conv", "conv2"))
        _calibrate(model, chunk, granularity="channel")
        parts.append({name: m.stats for name, m in remap_modules(model) if not m.redundant})
    assert set(parts[2]) == {"relu", "conv.input_remap"}  # conv2 reads the ReLU output
    for name, whole in parts[2].items():
        merged = parts[0][name].merge(parts[1][name])
        assert torch.equal(merged.amax, whole.amax)
        assert torch.equal(merged.count, whole.count)
        assert torch.equal(merged.remapped, whole.remapped)
        assert ((merged.sum - whole.sum).abs() <= _sums_apart(whole)).all()


def test_layer_wide_statistics_do_not_depend_on_the_layout():
    """granularity="tensor" scans a contiguous input as one flat channel and any other layout
    per channel, then pools: both give the same maxima and counts, and sums within the rule."""
    original = _convnet()
    data = _conv_data(3)
    stats = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = _converted(original).to(memory_format=layout)
        _calibrate(model, [x.to(memory_format=layout) for x in data])
        stats.append({name: m.stats for name, m in remap_modules(model)})
    flat, per_channel = stats
    assert flat.keys() == per_channel.keys() and flat
    for name, whole in flat.items():
        other = per_channel[name]
        assert whole.channels == other.channels == 1
        assert torch.equal(whole.amax, other.amax) and torch.equal(whole.count, other.count)
        assert torch.equal(whole.remapped, other.remapped)
        assert ((whole.sum - other.sum).abs() <= _sums_apart(whole)).all()
        assert ((whole.sumsq - other.sumsq).abs() <= 2 * SUM_RTOL * whole.sumsq).all()


def test_quantile_statistic():
    model = _converted(nn.Sequential(nn.Linear(4, 4)), inputs_of=("0",))
    data = [torch.randn(64, 4) * 3 for _ in range(4)]
    _calibrate(model, data, statistic="quantile:0.9")
    a = torch.cat(data).abs().flatten()
    true_q = torch.quantile(a.double(), 0.9)
    threshold = model[0].input_remap.threshold.double()
    m = threshold / C_R
    assert true_q <= m * (1 + 2**-20)
    assert m <= true_q * (1 + 2 ** -(HIST_MANTISSA_BITS - 1))
    _calibrate(model, data, statistic="quantile:1")
    assert model[0].input_remap.threshold == _expected_threshold(C_R, a.max())
    with pytest.raises(ValueError, match="granularity='tensor'"):
        _calibrate(model, data, statistic="quantile:0.5", granularity="channel")
    for bad in ("quantile:0", "quantile:1.5", "quantile:x", "median"):
        with pytest.raises(ValueError, match="statistic"):
            _calibrate(model, data, statistic=bad)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_mean_center_and_std_statistic(granularity):
    model = _converted(nn.Sequential(nn.Linear(4, 4)), inputs_of=("0",))
    data = [torch.randn(32, 4) * 2 + torch.arange(4.0) for _ in range(3)]
    _calibrate(model, data, statistic="std", center="mean", granularity=granularity)
    layer = model[0].input_remap
    a = torch.cat(data).double()
    dims = (0,) if granularity == "channel" else (0, 1)
    mean = a.mean(dims)
    std = a.var(dims, unbiased=False).sqrt()
    torch.testing.assert_close(layer.center.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.threshold.double(), C_R * std, rtol=1e-6, atol=0)


def test_report_measure_and_table():
    original = _convnet()
    model = _converted(original, inputs_of=("conv2",))
    data = _conv_data()
    report = _calibrate(model, data, measure=True)
    relu = model.relu
    # The fraction of ReLU outputs below the threshold, over both call sites of the shared ReLU.
    values = []
    hook = original.relu.register_forward_hook(lambda m, i, o: values.append(o.detach().flatten()))
    with torch.no_grad():
        for x in data:
            original(x)
    hook.remove()
    a = torch.cat(values)
    assert report["relu"].count == a.numel()
    expected = float((a.abs() < relu.threshold).double().mean())
    # The monitor pass applies earlier remaps, the hooks above do not; the first site agrees.
    assert report["relu"].remapped_fraction == pytest.approx(expected, abs=0.05)
    assert report["conv2.input_remap"].redundant
    assert report["conv2.input_remap"].remapped_fraction is None
    text = str(report)
    assert "relu" in text and "conv2.input_remap" in text and "%" in text
    assert measure_remapped(model, data)["relu"] == report["relu"].remapped_fraction
    assert all(m.mode == "apply" for _, m in remap_modules(model))


def test_measure_is_exact_on_a_single_layer():
    model = _converted(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    data = [torch.randn(16, 4) for _ in range(3)]
    report = _calibrate(model, data, measure=True)
    with torch.no_grad():
        a = torch.cat([torch.relu(model[0](x)) for x in data])
    expected = float((a < model[1].threshold).double().mean())
    assert report["1"].remapped_fraction == expected


def test_tuple_batches_max_batches_and_progress():
    model = _converted(_convnet())
    data = [(x, torch.zeros(2)) for x in _conv_data(5)]
    report = _calibrate(model, data, max_batches=2, progress=True)
    assert report.batches == 2
    assert report["relu"].count == 2 * (2 * 4 * 6 * 6) * 2  # two sites per batch
    report = _calibrate(model, iter(data))  # a one-shot iterator works too
    assert report.batches == 5
    # max_batches stops before pulling a further batch (a DataLoader would load it for nothing).
    batches = iter(data)
    assert _calibrate(model, batches, max_batches=2).batches == 2
    assert len(list(batches)) == 3
    # A second pass over a one-shot iterator would find it spent, or with max_batches measure
    # the batches after those calibrated on: refused before any work.
    before = model.relu.threshold.clone()
    for batches, limit in ((iter(data), None), (iter(data), 2), (itertools.cycle(data), 2)):
        with pytest.raises(ValueError, match="measure=True scans data twice, the same batches"):
            _calibrate(model, batches, measure=True, c_r=2**-3, max_batches=limit)
        assert torch.equal(model.relu.threshold, before)
    report = _calibrate(model, data, measure=True, max_batches=2)
    assert report.batches == 2 and report["relu"].remapped_fraction is not None


def test_bad_inputs():
    model = _converted(_convnet())
    data = _conv_data(3)
    with pytest.raises(ValueError, match="empty"):
        _calibrate(model, [])
    for bad in (0, 1, 1.5, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="c_r"):
            _calibrate(model, data, c_r=bad)
    for bad in (True, "0.1", None):
        with pytest.raises(TypeError, match="c_r"):
            _calibrate(model, data, c_r=bad)
    with pytest.raises(ValueError, match="granularity"):
        _calibrate(model, data, granularity="layer")
    with pytest.raises(ValueError, match="center"):
        _calibrate(model, data, center="median")
    with pytest.raises(ValueError, match="max_batches"):
        _calibrate(model, data, max_batches=0)
    with pytest.raises(TypeError, match="batch 0"):
        _calibrate(model, ["not a tensor"])
    with pytest.raises(ValueError, match="convert"):
        _calibrate(_convnet(), data)


def test_non_finite_activation_names_layer_and_batch():
    model = _converted(_convnet(), inputs_of=("conv2",))
    data = _conv_data(4)
    data[2] = data[2].clone()
    data[2][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"'relu'.*batch 2"):
        _calibrate(model, data)
    assert all(m.mode == "off" for _, m in remap_modules(model))
    data[2][0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteActivationError, match="batch 2"):
        _calibrate(model, data)


def test_unused_layer_warns_and_stays_uncalibrated():
    model = _converted(nn.ModuleDict({"used": nn.Sequential(nn.Linear(2, 2), nn.ReLU()),
                                      "unused": nn.Sequential(nn.Linear(2, 2), nn.ReLU())}))
    model.forward = lambda x: model["used"](x)
    with pytest.warns(UserWarning, match="never called"):
        _calibrate(model, [torch.randn(3, 2)])
    with pytest.raises(RuntimeError, match="unused.1.*never calibrated"):
        model["unused"](torch.randn(3, 2))
    # The scan's tracker is let go by every layer, the unreached one too.
    assert all(m._scan_tracker is None for _, m in remap_modules(model))
    # The calibrated layers still re-threshold and measure.
    assert [layer.name for layer in set_ratio(model, 2**-3).layers] == ["used.1"]
    assert set(measure_remapped(model, [torch.randn(3, 2)])) == {"used.1"}


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_a_layer_called_with_empty_inputs_only_says_so(granularity):
    """An expert no token was routed to: called, but never with a value. It is no "never called"
    layer, and no error either: it stays uncalibrated as an unreached layer does."""
    model = _converted(nn.ModuleDict({"used": nn.Sequential(nn.Linear(2, 2), nn.ReLU()),
                                      "idle": nn.Sequential(nn.Linear(2, 2), nn.ReLU())}))
    model.forward = lambda x: model["used"](x) + model["idle"](x[:0]).sum()
    with pytest.warns(UserWarning, match=r"called on the data with empty inputs \(numel 0\) only.*\['idle.1'\]") as caught:
        _calibrate(model, [torch.randn(3, 2)], granularity=granularity)
    assert not any("never called" in str(w.message) for w in caught)
    assert model["used"][1].calibrated and not model["idle"][1].calibrated
    assert [layer.name for layer in set_ratio(model, 2**-3).layers] == ["used.1"]
    # The forward that calibrated it still runs; a value reaching it is refused, by name.
    x = torch.randn(3, 2)
    assert torch.equal(model(x), model["used"](x))
    with pytest.raises(RuntimeError, match=r"idle.1: .*empty inputs only"):
        model["idle"](x)
    model.forward = lambda x: model["idle"](x[:0])
    with pytest.raises(RuntimeError, match=r"no converted layer saw a value.*empty inputs \(numel 0\) only: \['idle.1'\]"):
        _calibrate(model, [torch.randn(3, 2)], granularity=granularity)
    assert model["used"][1].calibrated  # the failed scan changed nothing
    # A layer scanned by hand, outside calibrate, says the same when asked for thresholds.
    layer = model["idle"][1]
    layer.begin_calibration(granularity)
    layer(torch.randn(0, 2))
    with pytest.raises(RuntimeError, match=r"^idle.1: no calibration statistics \(called with empty inputs, numel 0, only\)"):
        layer.set_ratio(2**-3)


class PartlyFed(nn.Module):
    """``fc`` reads a converted ReLU's output at one call and a plain tensor at the other."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.act(self.pre(x))) + self.fc(x)


def test_input_remap_fed_at_some_calls_only():
    model = _converted(PartlyFed(), inputs_of=("fc",))
    data = [torch.randn(8, 4) for _ in range(2)]
    with pytest.warns(UserWarning, match="some calls only.*'fc.input_remap'"):
        _calibrate(model, data)
    layer = model.fc.input_remap
    assert not layer.redundant and layer.sites_seen == 4 and layer.sites_fed == 2
    assert layer.threshold == _expected_threshold(C_R, torch.cat(data).abs().max())


def test_shared_module_with_different_channel_counts():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 4), relu, nn.Linear(4, 6), relu)
    convert(model, backend=model_backend())
    data = [torch.randn(2, 3)]
    report = _calibrate(model, data, granularity="tensor")
    assert report["1"].channels == 1 and report["1"].count == 2 * (4 + 6)
    with pytest.raises(ValueError, match="'1'|1: called with 6 channels"):
        _calibrate(model, data, granularity="channel")


def test_state_dict_round_trip(tmp_path):
    original = Blocks().eval()
    data = _token_data()
    model = _converted(original, inputs_of=("*fc1", "*fc2"))
    _calibrate(model, data, granularity="channel", center="mean")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    fresh = _converted(original, inputs_of=("*fc1", "*fc2"))
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for (name, a), (_, b) in zip(remap_modules(model), remap_modules(fresh)):
        assert a.config() == b.config(), name
        for buffer in ("threshold", "center", "amax", "count", "sum"):
            assert torch.equal(getattr(a, buffer), getattr(b, buffer)), (name, buffer)
    with torch.no_grad():
        assert torch.equal(fresh(data[0]), model(data[0]))


# Calibrated and saved through DataParallel, the file names the layers of the model inside.
@pytest.mark.parametrize("wrap", [lambda m: m, nn.DataParallel], ids=["bare", "DataParallel"])
def test_save_load_calibration_round_trip_and_mismatches(tmp_path, wrap):
    original = Blocks().eval()
    data = _token_data()
    model = wrap(_converted(original, inputs_of=("*fc1",)))
    _calibrate(model, data, statistic="quantile:0.99")
    path = tmp_path / "calibration.safetensors"
    save_calibration(model, path)
    fresh = _converted(original, inputs_of=("*fc1",))
    load_calibration(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(data[0]), model(data[0]))
    set_ratio(fresh, 2**-6)  # the statistics (and the histogram) came along
    set_ratio(model, 2**-6)
    for (_, a), (_, b) in zip(remap_modules(model), remap_modules(fresh)):
        assert torch.equal(a.threshold, b.threshold)
    # And back through wrappers: torch.compile's, then two DataParallels.
    compiled = torch.compile(_converted(original, inputs_of=("*fc1",)))
    load_calibration(compiled, path)
    again = tmp_path / "again.safetensors"
    save_calibration(compiled, again)
    rewrapped = nn.DataParallel(nn.DataParallel(_converted(original, inputs_of=("*fc1",))))
    load_calibration(rewrapped, again)
    set_ratio(rewrapped, 2**-6)
    for (name, a), (other, b) in zip(remap_modules(fresh), remap_modules(rewrapped.module.module)):
        assert name == other and torch.equal(a.threshold, b.threshold)

    other_layers = _converted(original, inputs_of=("*fc2",))
    with pytest.raises(ValueError, match="first mismatching layer 'blocks.0.fc2.input_remap'"):
        load_calibration(other_layers, path)
    wider = _converted(Blocks(width=16), inputs_of=("*fc1",))
    with pytest.raises(ValueError, match="'blocks.0.fc1.input_remap': 16 channels"):
        load_calibration(wider, path)
    relu_model = copy.deepcopy(original)
    relu_model.blocks[1].act = nn.ReLU()
    relu_model = _converted(relu_model, inputs_of=("*fc1",))
    with pytest.raises(ValueError, match="'blocks.1.act': act is 'relu'"):
        load_calibration(relu_model, path)
    fewer = _converted(original, acts=("relu",), inputs_of=("*fc1",))
    with pytest.raises(ValueError, match="first mismatching layer 'blocks.0.act'"):
        load_calibration(fewer, path)
    assert not any(m.calibrated for _, m in remap_modules(fewer))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a lipkern calibration file"):
        load_calibration(fresh, tmp_path / "other.safetensors")


@pytest.mark.parametrize("bpda", [False, True])
def test_gradients_flow(bpda):
    for original, data, inputs_of in (
        (_convnet(), _conv_data(2), "conv2"),
        (Blocks().eval(), _token_data(2), "*fc1"),
    ):
        model = _converted(original, inputs_of=inputs_of)
        _calibrate(model, data)
        reference_model = copy.deepcopy(original)
        hooked_reference(reference_model, model, straight_through=bpda)
        x = data[0].clone().requires_grad_(True)
        x_ref = data[0].clone().requires_grad_(True)
        if bpda:
            with straight_through(model):
                model(x).square().sum().backward()
        else:
            model(x).square().sum().backward()
        reference_model(x_ref).square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
        weight = next(model.parameters())
        assert weight.grad is not None


def test_inplace_conversion_matches_out_of_place():
    original = Blocks().eval()
    data = _token_data()
    a = _converted(original, inplace=True)
    b = _converted(original)
    _calibrate(a, data)
    _calibrate(b, data)
    assert a.blocks[0].act.inplace and not b.blocks[0].act.inplace
    with torch.no_grad():
        assert torch.equal(a(data[0]), b(data[0]))


@pytest.mark.parametrize("compile_form", ["decomposed", "opaque"])
@pytest.mark.parametrize(
    "make, data, inputs_of",
    [(_convnet, _conv_data, ("conv2",)), (Blocks, _token_data, ("*fc1", "*fc2"))],
)
def test_compile_fullgraph_without_graph_breaks(make, data, inputs_of, compile_form):
    """Both compile forms trace without a break; the opaque op is the eager kernel bit for bit,
    the decomposition too for ReLU / identity (the convnet), and within float32 rounding for
    GELU (PyTorch's GELU, not lipkern's)."""
    original = make().eval()
    batches = data()
    model = _converted(original, inputs_of=inputs_of, compile_form=compile_form)
    _calibrate(model, batches)
    explanation = torch._dynamo.explain(model)(batches[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    exact = compile_form == "opaque" or make is _convnet
    with torch.no_grad():
        assert_close_model_outputs(compiled(batches[1]), model(batches[1]), exact=exact)
    x = batches[1].clone().requires_grad_(True)
    compiled(x).sum().backward()
    eager_x = batches[1].clone().requires_grad_(True)
    model(eager_x).sum().backward()
    assert_close_model_outputs(x.grad, eager_x.grad, exact=exact)


def test_a_model_compiled_with_fullgraph_calibrates_through_its_original_module():
    """calibrate and measure on torch.compile's wrapper scan the original module (the scan's
    modes are not for compiling: dynamo cannot enter the statistics' lock), compiling nothing
    new; the compiled model then runs the new thresholds."""
    from torch._dynamo.utils import counters

    batches = _token_data()
    model = _converted(Blocks().eval(), inputs_of=("*fc1",))
    _calibrate(model, batches)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(batches[0])
    before = model.blocks[0].act.threshold.clone()
    graphs = counters["stats"]["unique_graphs"]
    report = _calibrate(compiled, batches, c_r=2**-3, measure=True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert report.batches == len(batches)
    assert all(layer.remapped_fraction is not None for layer in report.layers
               if not model.get_submodule(layer.name).redundant)
    assert not torch.equal(model.blocks[0].act.threshold, before)
    with torch.no_grad():
        assert_close_model_outputs(compiled(batches[1]), model(batches[1]), exact=False)


def test_compile_inductor_matches_eager():
    original = Blocks().eval()
    batches = _token_data()
    model = _converted(original, inputs_of=("*fc1",))
    _calibrate(model, batches)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert_close_model_outputs(compiled(batches[1]), model(batches[1]), exact=False)


def test_ratio_validation_message_mentions_interval():
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        _calibrate(_converted(_convnet()), _conv_data(1), c_r=math.pi)


class _LayerScaledMlp(nn.Module):
    """fc1 -> GELU -> a LayerScale applied in place -> fc2: fc2's input is the activation's
    output tensor, but no longer its values."""

    def __init__(self, width=8):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)
        self.gamma = nn.Parameter(torch.full((width,), 3.0))

    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h.mul_(self.gamma))


def test_an_input_changed_in_place_after_the_activation_is_remapped_again():
    """An input remap is redundant only where its input is a converted activation's output
    unchanged since: after an in-place LayerScale it is scanned and remaps with thresholds of
    its own."""
    model = _converted(_LayerScaledMlp().eval(), inputs_of=("fc2",))
    with torch.no_grad():
        _calibrate(model, _token_data())
    remap = model.fc2.input_remap
    assert not remap.redundant and remap.threshold.numel() == 1
    assert float(remap.threshold) > float(model.act.threshold)
