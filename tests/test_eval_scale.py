"""The evaluation at scale: statistics, the outcome store, devices, processes, resuming and bad input."""
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from lipkern.eval import api, cli_eval, stats
from lipkern.eval.api import Budget, EvalInputError, evaluate
from lipkern.eval.store import OutcomeStore, SettingsMismatchError

MICRO = Budget("micro", 6, pgd_steps=2, cw_steps=2, aa_targets=1, aa_square_queries=10, aux_attacks=("apgd-ce",),
               n_cert=3, cert_n0=4, cert_n=8, cert_alpha=0.001, weight_fractions=(0.5,), n_ablation_sizes=2,
               n_lipschitz=4)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")


# --- statistics -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, n, low, high", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson).
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_published_values(k, n, low, high):
    got = stats.wilson_interval(k, n)
    assert abs(got[0] - low) < 5e-5 and abs(got[1] - high) < 5e-5


@pytest.mark.parametrize("b, c, p", [(1, 6, 16 / 128), (0, 5, 2 / 32), (0, 6, 2 / 64), (3, 3, 1.0), (0, 0, 1.0)])
def test_mcnemar_exact_hand_computed(b, c, p):
    # Two-sided: 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1.
    assert abs(stats.mcnemar_exact(b, c) - p) < 1e-12
    assert stats.mcnemar_exact(c, b) == stats.mcnemar_exact(b, c)


def test_paired_difference_interval_hand_computed():
    # Bonett-Price: discordant shares (b + 1) / (n + 2) = (c + 1) / (n + 2) = 1/22, difference 0,
    # half width 1.95996 * sqrt((2/22) / 22) = 0.125991.
    low, high = stats.paired_difference_interval(18, 0, 0, 2)
    assert abs(low + 0.125991) < 1e-6 and abs(high - 0.125991) < 1e-6
    # b = 2, c = 12, n = 50: shares 3/52 and 13/52, difference 10/52, variance (16/52 - (10/52)^2) / 52.
    low, high = stats.paired_difference_interval(30, 2, 12, 6)
    half = 1.959964 * ((16 / 52 - (10 / 52) ** 2) / 52) ** 0.5
    assert abs(low - (10 / 52 - half)) < 1e-6 and abs(high - (10 / 52 + half)) < 1e-6
    assert 0 < low  # a clear gain excludes 0, as the exact test says
    assert stats.mcnemar_exact(2, 12) < 0.05
    low, high = stats.paired_difference_interval(0, 0, 0, 5)
    assert -1 <= low < 0 < high <= 1


def _flags(pattern: str) -> np.ndarray:
    return np.array([ch == "1" for ch in pattern])


def test_paired_comparison_counts():
    cmp = stats.paired(_flags("1100"), _flags("1010"))
    assert (cmp.only_baseline, cmp.only_candidate, cmp.difference) == (1, 1, 0.0)
    assert cmp.p_value == 1.0 and cmp.direction == 0
    with pytest.raises(ValueError, match="one length"):
        stats.paired(_flags("10"), _flags("101"))


def _outcomes(n_both, n_only_base, n_only_cand, n_none):
    base = np.array([1] * n_both + [1] * n_only_base + [0] * n_only_cand + [0] * n_none, dtype=bool)
    cand = np.array([1] * n_both + [0] * n_only_base + [1] * n_only_cand + [0] * n_none, dtype=bool)
    return base, cand


def test_verdicts_on_constructed_outcomes():
    gain = stats.paired(*_outcomes(50, 1, 15, 34))
    none = stats.paired(*_outcomes(50, 5, 6, 39))
    loss = stats.paired(*_outcomes(50, 15, 1, 34))
    assert gain.direction == 1 and none.direction == 0 and loss.direction == -1
    assert stats.verdict(autoattack=gain, worst_case=gain) == stats.GAIN
    # Masking: AutoAttack improves, the worst case over the adaptive and transfer attacks does not.
    gone = stats.paired(*_outcomes(50, 6, 5, 39))  # worst-case estimate below the original's
    assert gone.difference < 0 and none.difference > 0
    assert stats.verdict(autoattack=gain, worst_case=gone) == stats.MASKING
    assert stats.verdict(autoattack=gain, worst_case=loss) == stats.MASKING
    # A gain that shrinks but stays positive without significance is not called masking.
    assert stats.verdict(autoattack=gain, worst_case=none) == stats.UNCONFIRMED
    assert stats.verdict(autoattack=none, worst_case=none, clean=loss) == stats.LOSS
    # A gain bought with clean accuracy says so.
    assert stats.verdict(autoattack=gain, worst_case=gain, clean=loss) == stats.GAIN + stats.CLEAN_COST
    assert stats.verdict(autoattack=gain, worst_case=gone, clean=loss) == stats.MASKING + stats.CLEAN_COST
    assert stats.verdict(autoattack=gain, worst_case=gain, clean=none) == stats.GAIN
    assert stats.verdict(autoattack=none, worst_case=none) == stats.NO_CHANGE
    assert stats.verdict(autoattack=loss, worst_case=none) == stats.LOSS
    assert stats.verdict(autoattack=none, worst_case=loss) == stats.LOSS


# --- the outcome store ------------------------------------------------------------------------------------------

def test_store_round_trip_settings_and_rollback(tmp_path):
    store = OutcomeStore(tmp_path)
    store.bind_settings("m", {"eps": 0.1, "seed": 0})
    store.put("m", 3, "original/aa", {"aa": np.array([True, False]), "x_adv": np.ones((2, 1, 2, 2), np.float32)},
              seconds=1.5)
    assert store.has("m", 3, "original/aa") and not store.has("m", 2, "original/aa")
    got = store.get("m", 3, "original/aa")
    assert got["aa"].tolist() == [True, False] and got["x_adv"].dtype == np.float32
    assert store.unit_seconds("m") == [("original/aa", 1.5)]
    store.close()
    again = OutcomeStore(tmp_path)
    again.bind_settings("m", {"eps": 0.1, "seed": 0})
    with pytest.raises(SettingsMismatchError, match="seed: recorded 0, now 1"):
        again.bind_settings("m", {"eps": 0.1, "seed": 1})
    with pytest.raises(RuntimeError):
        with again._transaction():
            again._db.execute("INSERT INTO units VALUES ('m', 9, 'u', x'00', 0.0)")
            raise RuntimeError("dies mid-transaction")
    assert not again.has("m", 9, "u") and again.count("m") == 1


def test_store_refusal_names_the_entries_that_differ_in_the_callers_words(tmp_path):
    """A dict-valued setting is compared entry by entry, so a refusal names the entry, not two whole dicts;
    a value with a formatter is shown through it; nothing of the refused settings is recorded."""
    store = OutcomeStore(tmp_path)
    recorded = {"eps": 8 / 255, "budget": {"pgd_steps": 50, "n_test": 100}, "model_sha": "a"}
    store.bind_settings("m", recorded, {"model_sha": "the model's weights"})
    changed = {"eps": 4 / 255, "budget": {"pgd_steps": 100, "n_test": 100}, "model_sha": "b"}
    with pytest.raises(SettingsMismatchError) as refused:
        store.bind_settings("m", changed, {"model_sha": "the model's weights"},
                            shown={"eps": lambda e: f"{round(e * 255)}/255"})
    assert ("other settings (budget.pgd_steps: recorded 50, now 100; eps: recorded 8/255, now 4/255; "
            "the model's weights differ)") in str(refused.value)
    assert "n_test" not in str(refused.value)
    store.bind_settings("m", recorded, {"model_sha": "the model's weights"})
    # Where the formatter writes both values alike, they are shown in full.
    with pytest.raises(SettingsMismatchError, match=r"eps: recorded 0\.031372549019607\d*, now 0\.03137255"):
        store.bind_settings("m", {**recorded, "eps": 8 / 255 + 1e-9}, {"model_sha": "the model's weights"},
                            shown={"eps": lambda e: f"{round(e * 255)}/255"})


def test_time_left_weighs_each_kind_of_unit_by_its_own_timings(tmp_path):
    """The estimate prices each remaining unit at the mean of stored units of its kind (AutoAttack costs far
    more than a sweep), and is not made while a remaining kind has never been timed."""
    import io

    store = OutcomeStore(tmp_path)
    for chunk, (aa, sweep) in enumerate([(100.0, 2.0), (140.0, 4.0)]):
        store.put("m", chunk, "original/aa", {"aa": np.ones(1, bool)}, seconds=aa)
        store.put("m", chunk, "original/sweep", {"s": np.ones(1, bool)}, seconds=sweep)
    log = io.StringIO()
    remaining = ["original/aa", "original/sweep", "original/sweep"]
    assert api._print_time_left("m", remaining, store, log, "from the units stored earlier")
    assert log.getvalue() == ("lipkern eval: m: estimated time left 2.1 min (3 units, from the units stored "
                              "earlier)\n")  # 120 + 3 + 3 s
    assert not api._print_time_left("m", [*remaining, "original/smoothing"], store, log, "after chunk 0")
    assert not api._print_time_left("other", remaining, store, log, "after chunk 0")
    assert log.getvalue().count("\n") == 1


def test_store_ties_a_run_to_its_models_outputs(tmp_path):
    """Outputs within numerical noise of those recorded resume (NaN matching NaN); other outputs, or another
    number of them, are refused, saying by how much they differ."""
    store = OutcomeStore(tmp_path)
    outputs = np.array([[3.0, -1.0, float("nan")], [0.5, 20.0, 2.0]])
    store.bind_outputs("m", outputs)
    store.bind_outputs("m", outputs * (1 + 1e-6))
    store.bind_outputs("other", -outputs)
    with pytest.raises(SettingsMismatchError, match=r"outputs on the first 2 test samples differ .*by up to 0\.5"):
        store.bind_outputs("m", outputs + np.array([[0.5, 0, 0], [0, 0, 0]]))
    with pytest.raises(SettingsMismatchError, match=r"recorded shape \(2, 3\), now \(1, 3\)"):
        store.bind_outputs("m", outputs[:1])
    with pytest.raises(SettingsMismatchError, match="1 of 6 values, NaN or infinite on one side"):
        store.bind_outputs("m", np.nan_to_num(outputs))


def test_a_store_of_another_format_is_not_resumed(tmp_path):
    store = OutcomeStore(tmp_path)
    store.bind_settings("m", {"eps": 0.1})
    with pytest.raises(SettingsMismatchError, match="stored by another version of lipkern .*cannot be resumed"):
        store.bind_settings("m", {"eps": 0.1, "store_format": api.STORE_FORMAT})


def test_a_store_keeps_the_models_its_run_was_started_with(tmp_path):
    store = OutcomeStore(tmp_path)
    assert store.run_models() is None
    store.bind_settings("tiny_vit", {"eps": 0.1}, run_models=["tiny_vit", "preact_wrn"])
    # The same run, named in another order, with a model the run had not started on yet.
    store.bind_settings("preact_wrn", {"eps": 0.1}, run_models=["preact_wrn", "tiny_vit", "tiny_vit"])
    assert store.run_models() == ["preact_wrn", "tiny_vit"]
    with pytest.raises(SettingsMismatchError, match="holds a run of preact_wrn, tiny_vit, and this one is of "
                                                    "preact_wrn, wrn;"):
        store.bind_settings("wrn", {"eps": 0.1}, run_models=["preact_wrn", "wrn"])
    # A refused call records nothing: not the new model's settings, not its run.
    assert store.models() == ["preact_wrn", "tiny_vit"] and store.run_models() == ["preact_wrn", "tiny_vit"]
    (tmp_path / "other").mkdir()
    other_format = OutcomeStore(tmp_path / "other")
    other_format.bind_settings("m", {"eps": 0.1})
    with pytest.raises(SettingsMismatchError, match="stored by another version"):
        other_format.bind_settings("m", {"eps": 0.1, "store_format": api.STORE_FORMAT}, run_models=["m"])
    assert other_format.run_models() is None
    other_format.close()
    store.close()


class _FlippedInput(nn.Sequential):
    """The same modules and weights as the Sequential it is built from; another forward."""

    def forward(self, x):
        return super().forward(x.flip(-1))


def test_a_resumed_run_refuses_a_model_whose_code_changed(tmp_path):
    """Same weights (the settings' model hash agrees), another forward: the resumed run stops before any work,
    naming the outputs that differ; the model it started with resumes, and its report's stage timings are the
    stored units' (the first session's, although this one ran none)."""
    model, calib, test = _tiny_model(), _tiny_data(), _tiny_data(seed=1)
    run = dict(eps=8 / 255, ratios=(2 ** -6,), budget=MICRO, progress=False, device=torch.device("cpu"),
               chunk_size=4, out_dir=tmp_path)
    first = evaluate(model, calib, test, **run)
    changed = _FlippedInput(*model)
    assert changed.state_dict().keys() == model.state_dict().keys()
    with pytest.raises(SettingsMismatchError, match="outputs on the first 16 test samples differ"):
        evaluate(changed, calib, test, **run)
    again = evaluate(model, calib, test, **run)
    assert again.models[0]["configs"] == first.models[0]["configs"]
    timings = first.models[0]["timings_s"]
    assert {"aa", "cw", "sweep", "adaptive", "smoothing", "layers", "weight", "ablation"} <= set(timings)
    assert sum(timings.values()) > 0 and again.models[0]["timings_s"] == timings


def test_labels_must_be_integers_and_become_int64():
    x, y = _tiny_data()
    for dtype in (torch.int32, torch.uint8, torch.int16):
        assert api._as_split((x, y.to(dtype)), "test_data", labelled=True).y.dtype == torch.long
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(EvalInputError, match=f"test_data: y must hold integer class labels, got dtype {dtype}"):
            api._as_split((x, y.to(dtype)), "test_data", labelled=True)


# --- the API: devices, stages, sample selection -----------------------------------------------------------------

def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 8), nn.GELU(), nn.Linear(8, 5))


def _tiny_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_every_stage_runs_on_the_requested_device(tmp_path):
    """A forward pre-hook (deep-copied with the model into every converted and variant copy) records the stage
    and the device of every input the model receives."""
    model = _tiny_model()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((api.current_stage(), args[0].device)))
    calib, test = _tiny_data(), _tiny_data(seed=1)
    res = evaluate(model, calib, test, eps=8 / 255, ratios=(2 ** -4, 2 ** -6), budget=MICRO, progress=False,
                   device=torch.device("cpu"), chunk_size=4, out_dir=tmp_path)
    stages = {s.split("/")[-1] if s and not s.startswith(("weight/", "ablation/")) else (s or "").split("/")[0]
              for s, _ in seen}
    for stage in ("calibrate", "remap counts", "aa", "cw", "sweep", "adaptive", "smoothing", "layers", "weight",
                  "ablation"):
        assert stage in stages, stage
    assert {d for _, d in seen} == {torch.device("cpu")}
    m = res.models[0]
    assert m["device"] == "cpu" and m["n_test"] == 6 and m["chunk_size"] == 4
    assert m["ratios"] == [2 ** -6, 2 ** -4] and list(m["configs"]) == ["original", "2^-6", "2^-4"]
    assert m["smoothing"]["n_points"] == 3 and m["layers"]["n_samples"] == 4


@no_gpu
def test_cuda_without_a_gpu_is_a_clear_error_at_once(capsys):
    x, y = _tiny_data()
    with pytest.raises(EvalInputError, match="^device=cuda: no CUDA GPU"):
        evaluate(_tiny_model(), (x, y), (x, y), device="cuda")
    with pytest.raises(EvalInputError, match="^device: cannot parse 'tpu'"):
        evaluate(_tiny_model(), (x, y), (x, y), device="tpu")
    with pytest.raises(EvalInputError, match="^device: 'cpu:3' is not a device; PyTorch has one CPU device"):
        evaluate(_tiny_model(), (x, y), (x, y), device="cpu:3")
    assert cli_eval.main(["--device", "cuda:1", "--no-progress", "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert "--device=cuda:1: no CUDA GPU" in err and err.rstrip().endswith("use --device=cpu")


@needs_gpu
def test_evaluation_on_cuda(tmp_path):
    x, y = _tiny_data()
    res = evaluate(_tiny_model(), (x, y), (x, y), eps=8 / 255, budget=MICRO, progress=False, device="cuda",
                   chunk_size=4, out_dir=tmp_path)
    assert res.models[0]["device"].startswith("cuda")


def test_sample_selection_is_seeded_and_documented():
    a, b = api.select_samples(100, 10, seed=3), api.select_samples(100, 10, seed=3)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, api.select_samples(100, 10, seed=4))
    assert np.array_equal(api.select_samples(7, None, 0), np.arange(7))
    assert "default_rng(seed)" in api.__doc__


def test_api_input_errors():
    model, (x, y) = _tiny_model(), _tiny_data()
    with pytest.raises(EvalInputError, match="did you mean 8/255"):
        evaluate(model, (x, y), (x, y), eps=8)
    with pytest.raises(EvalInputError, match="sigma"):
        evaluate(model, (x, y), (x, y), sigma=-1)
    with pytest.raises(EvalInputError, match="n_test"):
        evaluate(model, (x, y), (x, y), n_test=1000)
    with pytest.raises(EvalInputError, match="chunk_size"):
        evaluate(model, (x, y), (x, y), chunk_size=0)
    with pytest.raises(EvalInputError, match=r"ratios must not repeat a value .*got \[0.25, 0.125, 0.25\]"):
        evaluate(model, (x, y), (x, y), ratios=(0.25, 0.125, 0.25))
    # Two values the report would label alike ("0.01") are one configuration.
    with pytest.raises(EvalInputError, match=r"as the report labels them, \['0.01', '0.01'\]"):
        evaluate(model, (x, y), (x, y), ratios=(0.01, 0.010000001))
    rgb = x.repeat(1, 3, 1, 1)
    with pytest.raises(EvalInputError, match="3 channels .* takes 1"):
        evaluate(model, (rgb, y), (rgb, y))
    channels_last = x.permute(0, 2, 3, 1)[:, :3].contiguous()  # (N, 3, 6, 1): H and W read as C and W
    with pytest.raises(EvalInputError, match="channels-last"):
        evaluate(model, (channels_last, y), (channels_last, y))
    with pytest.raises(EvalInputError, match="calib_data has samples of shape"):
        evaluate(model, (x[:, :, :4], y), (x, y))


# --- the command line: inputs and the output directory ----------------------------------------------------------

def _fail_if_evaluated(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the evaluation started despite bad arguments")
    monkeypatch.setattr(api, "evaluate", boom)


@pytest.mark.parametrize("argv, message", [
    (["--eps", "8"], "did you mean 8/255"),
    (["--eps", "300/255"], "got 300/255\n"),
    (["--sigma", "-1"], "--sigma"),
    (["--n-test", "0"], "--n-test"),
    (["--batch-size", "x"], "--batch-size"),
    (["--resume", "--overwrite"], "not allowed with"),
    (["--seed", "-1"], "--seed"),
    (["--name", "a/b"], "--name"),
])
def test_bad_arguments_fail_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli_eval.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_out_problems_fail_before_any_work(tmp_path, monkeypatch, capsys):
    _fail_if_evaluated(monkeypatch)
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    assert cli_eval.main(["--no-progress", "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "keep me"
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert cli_eval.main(["--no-progress", "--out", str(used)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli_eval.main(["--no-progress", "--out", str(used), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err and (used / "notes.txt").exists()
    assert cli_eval.main(["--no-progress", "--out", str(used), "--resume"]) == 2
    assert "no outcome store" in capsys.readouterr().err
    # A directory under a file cannot be made, whoever runs the test (root ignores permission bits).
    assert cli_eval.main(["--no-progress", "--out", str(a_file / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err


def _report_file(path, text="earlier"):
    """A file as write_report writes one of its name (its mark, then ``text``)."""
    from lipkern.eval import report

    if path.suffix == ".png":
        fig, ax = report.plt.subplots()
        ax.set_title(text)
        report._finish(fig, ax, path, legend=dict(handles=[]))
    elif path.name == "report.md":
        path.write_text(f"{report.TITLE}\n\n{text}\n")
    else:
        path.write_text(json.dumps({"generator": report.GENERATOR, "models": [], "note": text}, indent=1))
    return path.read_bytes()


def _earlier_run(path):
    """A directory as an earlier run of preact_wrn leaves it: the store, the report, its figures."""
    path.mkdir()
    store = OutcomeStore(path)
    store.bind_settings("preact_wrn", {"eps": 0.1})
    store.close()
    for name in ("report.md", "results.json", "robust_accuracy_preact_wrn.png", "sweep_preact_wrn.png"):
        _report_file(path / name)
    return sorted(p.name for p in path.iterdir())


def test_overwrite_replaces_only_lipkern_files_once_the_arguments_are_checked(tmp_path, monkeypatch, capsys):
    used = tmp_path / "used"
    earlier = _earlier_run(used)
    (used / "notes.txt").write_text("mine")
    (used / "plots").mkdir()
    assert cli_eval.main(["--no-progress", "--out", str(used), "--overwrite"]) == 2
    assert "did not write (notes.txt, plots/)" in capsys.readouterr().err
    assert sorted(p.name for p in used.iterdir()) == sorted([*earlier, "notes.txt", "plots"])
    (used / "notes.txt").unlink()
    (used / "plots").rmdir()
    # Arguments the data refuses leave the earlier run as it was.
    for argv in (["--n-test", "100000"], ["--n-calib", "100000"]):
        assert cli_eval.main(["--no-progress", "--embedded", "preact_wrn", "--out", str(used), "--overwrite",
                              *argv]) == 2
        assert f"{argv[0]} 100000: preact_wrn's" in capsys.readouterr().err
        assert sorted(p.name for p in used.iterdir()) == earlier
    with pytest.raises(SystemExit) as e:
        cli_eval.main(["--acts", "tanh", "--out", str(used), "--overwrite"])
    assert e.value.code == 2 and "--acts: each must be among" in capsys.readouterr().err
    # Valid arguments: the earlier run's files are held aside when the evaluation starts, and come back when
    # it stops before storing any work.
    seen = []

    def record(*args, **kwargs):
        seen.extend(sorted(p.name for p in used.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "evaluate", record)
    assert cli_eval.main(["--no-progress", "--embedded", "preact_wrn", "--out", str(used), "--overwrite"]) == 130
    assert len(seen) == 1 and seen[0].startswith(cli_eval.HELD_PREFIX)
    assert "is as it was before the run" in capsys.readouterr().err
    assert sorted(p.name for p in used.iterdir()) == earlier
    assert all((used / name).read_bytes() == _report_file(tmp_path / name) for name in earlier
               if name.endswith((".md", ".json")))


def _store_one_unit_then(error, chunk=0):
    def evaluate(*args, out_dir, **kwargs):
        store = OutcomeStore(out_dir)
        store.bind_settings("preact_wrn", {"eps": 0.2})
        store.put("preact_wrn", chunk, "clean", {"correct": np.ones(3, dtype=bool)}, seconds=0.1)
        store.close()
        raise error
    return evaluate


def _fail_before_storing(error):
    def evaluate(*args, out_dir, **kwargs):
        store = OutcomeStore(out_dir)
        store.bind_settings("preact_wrn", {"eps": 0.2})
        store.close()
        raise error
    return evaluate


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), 130), (RuntimeError("model broke"), None),
                                           (FileNotFoundError("weights.pt"), 2)])
def test_a_run_that_stores_nothing_leaves_out_as_it_was(tmp_path, monkeypatch, capsys, error, status):
    monkeypatch.setattr(api, "evaluate", _fail_before_storing(error))
    used = tmp_path / "used"
    earlier = _earlier_run(used)
    fresh = tmp_path / "a" / "b" / "out"
    for out, extra in ((used, ["--overwrite"]), (fresh, [])):
        argv = ["--no-progress", "--embedded", "preact_wrn", "--out", str(out), *extra]
        if status is None:
            with pytest.raises(RuntimeError, match="model broke"):
                cli_eval.main(argv)
        else:
            assert cli_eval.main(argv) == status
    assert sorted(p.name for p in used.iterdir()) == earlier
    _assert_the_earlier_store(used)
    assert (used / "report.md").read_bytes() == _report_file(tmp_path / "report.md")
    assert not (tmp_path / "a").exists()
    capsys.readouterr()


def _assert_the_earlier_store(path):
    store = OutcomeStore(path)
    try:
        store.bind_settings("preact_wrn", {"eps": 0.1})  # the earlier run's; the new one bound 0.2
    finally:
        store.close()


def test_a_failure_while_out_is_started_undoes_what_it_did(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(api, "evaluate", _fail_before_storing(AssertionError("the evaluation started")))
    used = tmp_path / "used"
    earlier = _earlier_run(used)
    calls = []
    real_rename = Path.rename

    def third_rename_fails(self, target):
        calls.append(self.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", third_rename_fails)
    assert cli_eval.main(["--no-progress", "--embedded", "preact_wrn", "--out", str(used), "--overwrite"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.setattr(Path, "rename", real_rename)
    assert len(calls) > 3  # two moved aside, then moved back
    assert sorted(p.name for p in used.iterdir()) == earlier
    _assert_the_earlier_store(used)


def test_a_failed_resumed_run_keeps_its_store(tmp_path, monkeypatch, capsys):
    used = tmp_path / "used"
    earlier = _earlier_run(used)

    def broke(*args, **kwargs):
        raise RuntimeError("model broke")

    monkeypatch.setattr(api, "evaluate", broke)
    with pytest.raises(RuntimeError, match="model broke"):
        cli_eval.main(["--no-progress", "--embedded", "preact_wrn", "--out", str(used), "--resume"])
    assert sorted(p.name for p in used.iterdir()) == earlier
    _assert_the_earlier_store(used)


@pytest.mark.parametrize("error, status", [(SettingsMismatchError("eps: recorded 8/255, now 16/255"), 2),
                                           (KeyboardInterrupt(), 130)])
def test_a_resumed_run_that_stores_nothing_keeps_the_held_files(tmp_path, monkeypatch, capsys, error, status):
    used = tmp_path / "used"
    _earlier_run(used)
    held = used / (cli_eval.HELD_PREFIX + "killed")
    held.mkdir()
    older = _report_file(held / "report.md", "older")
    before = sorted(p.name for p in used.iterdir())

    def refused(*args, **kwargs):
        raise error

    monkeypatch.setattr(api, "evaluate", refused)
    assert cli_eval.main(["--no-progress", "--embedded", "preact_wrn", "--out", str(used), "--resume"]) == status
    capsys.readouterr()
    assert sorted(p.name for p in used.iterdir()) == before
    assert (held / "report.md").read_bytes() == older


def test_a_run_that_stored_work_replaces_the_earlier_one(tmp_path, monkeypatch, capsys):
    used = tmp_path / "used"
    _earlier_run(used)
    monkeypatch.setattr(api, "evaluate", _store_one_unit_then(KeyboardInterrupt()))
    assert cli_eval.main(["--no-progress", "--embedded", "preact_wrn", "--out", str(used), "--overwrite"]) == 130
    assert "continue it with --resume" in capsys.readouterr().err
    assert sorted(p.name for p in used.iterdir()) == ["outcomes.sqlite"]
    store = OutcomeStore(used)
    assert store.count("preact_wrn") == 1
    store.close()
    # A run killed while the earlier files were held aside leaves them; the next --overwrite replaces them too.
    held = used / (cli_eval.HELD_PREFIX + "killed")
    held.mkdir()
    _report_file(held / "report.md", "older")
    monkeypatch.setattr(api, "evaluate", _store_one_unit_then(RuntimeError("model broke")))
    with pytest.raises(RuntimeError, match="model broke"):
        cli_eval.main(["--no-progress", "--embedded", "preact_wrn", "--out", str(used), "--overwrite"])
    assert sorted(p.name for p in used.iterdir()) == ["outcomes.sqlite"]
    # A resumed run that stores work deletes what a killed --overwrite left held.
    held.mkdir()
    monkeypatch.setattr(api, "evaluate", _store_one_unit_then(KeyboardInterrupt(), chunk=1))
    assert cli_eval.main(["--no-progress", "--embedded", "preact_wrn", "--out", str(used), "--resume"]) == 130
    assert sorted(p.name for p in used.iterdir()) == ["outcomes.sqlite"]


def test_resume_needs_the_same_run(tmp_path, monkeypatch, capsys):
    _fail_if_evaluated(monkeypatch)
    missing = tmp_path / "typo"
    assert cli_eval.main(["--no-progress", "--out", str(missing), "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err and not missing.exists()
    used = tmp_path / "used"
    earlier = _earlier_run(used)
    assert cli_eval.main(["--no-progress", "--embedded", "tiny_vit", "--out", str(used), "--resume"]) == 2
    assert "holds a run of preact_wrn, and this one leaves out preact_wrn" in capsys.readouterr().err
    assert sorted(p.name for p in used.iterdir()) == earlier
    # A run killed on its first model has started only that one: resuming it without the second model, or
    # adding a model the run was not started with, is refused; the original command resumes.
    first_of_two, one = tmp_path / "first_of_two", tmp_path / "one"
    for path, started_with in ((first_of_two, ["preact_wrn", "tiny_vit"]), (one, ["preact_wrn"])):
        _earlier_run(path)
        store = OutcomeStore(path)
        store.bind_settings("preact_wrn", {"eps": 0.1}, run_models=started_with)
        store.close()
    assert cli_eval.main(["--no-progress", "--embedded", "preact_wrn", "--out", str(first_of_two), "--resume"]) == 2
    assert ("holds a run of preact_wrn, tiny_vit, and this one leaves out tiny_vit;"
            in capsys.readouterr().err)
    assert cli_eval.main(["--no-progress", "--out", str(one), "--resume"]) == 2
    assert "holds a run of preact_wrn, and this one adds tiny_vit;" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="the evaluation started"):
        cli_eval.main(["--no-progress", "--jobs", "1", "--out", str(first_of_two), "--resume"])
    # A store that did not record its models tells only those it had started on: adding one passes.
    with pytest.raises(AssertionError, match="the evaluation started"):
        cli_eval.main(["--no-progress", "--jobs", "1", "--out", str(used), "--resume"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "outcomes.sqlite").write_text("not a database")
    assert cli_eval.main(["--no-progress", "--embedded", "tiny_vit", "--out", str(broken), "--resume"]) == 2
    assert "outcomes.sqlite is not an outcome store lipkern made" in capsys.readouterr().err
    # A store of lipkern's cut short after its header.
    _earlier_run(tmp_path / "cut")
    store = tmp_path / "cut" / "outcomes.sqlite"
    store.write_bytes(store.read_bytes()[:100])
    assert cli_eval.main(["--no-progress", "--embedded", "tiny_vit", "--out", str(store.parent), "--resume"]) == 2
    assert "outcomes.sqlite is not a readable outcome store: database disk image is malformed" in capsys.readouterr().err


def test_the_report_replaces_only_its_own_figures(tmp_path):
    """write_report's files are told by the mark they carry: a figure of an earlier report goes, a file of the
    user's stays, the name of a figure of lipkern's notwithstanding."""
    from lipkern.eval.report import is_report_file, write_report

    _report_file(tmp_path / "sweep_dropped.png")
    (tmp_path / "sweep_mine.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"a figure of the user's")
    (tmp_path / "diagram.png").write_bytes(b"mine")
    write_report({"models": []}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagram.png", "report.md", "results.json",
                                                          "sweep_mine.png"]
    assert is_report_file(tmp_path / "report.md") and is_report_file(tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text())["generator"] == "lipkern eval"
    # A temporary cut short by a killed write is the report's; a file of the user's by any of its names is not.
    (tmp_path / "report.md.tmp").write_bytes((tmp_path / "report.md").read_bytes()[:5])
    (tmp_path / "notes").mkdir()
    for name in ("report.md", "results.json", "robust_accuracy_m.png", "report.md.tmp"):
        (tmp_path / "notes" / name).write_text("# my notes\n")
    assert is_report_file(tmp_path / "report.md.tmp")
    assert not any(is_report_file(p) for p in (tmp_path / "notes").iterdir())
    assert not is_report_file(tmp_path / "diagram.png") and not is_report_file(tmp_path / "notes")


def test_bad_data_files_are_clear_errors(tmp_path, capsys):
    not_zip = tmp_path / "d.npz"
    not_zip.write_text("x,y\n0.1,2\n")
    module = tmp_path / "cwd_model.py"
    module.write_text("import torch.nn as nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), "
                      "nn.Flatten(), nn.Linear(64, 5))\n")
    assert cli_eval.main(["--model", "cwd_model:make", "--data", str(not_zip), "--out", str(tmp_path / "o")]) == 2
    assert "not an .npz file" in capsys.readouterr().err
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x=np.random.default_rng(0).random((8, 3, 6, 6), dtype=np.float32), y=np.arange(8) % 5)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # --model imports from the working directory, as `python -m` would
    try:
        sys.modules.pop("cwd_model", None)
        assert cli_eval.main(["--model", "cwd_model:make", "--data", "rgb.npz", "--out", "o2", "--no-progress"]) == 2
    finally:
        os.chdir(cwd)
        sys.path[:] = [p for p in sys.path if p != str(tmp_path)]
    assert "3 channels" in capsys.readouterr().err


# --- processes and resuming (real subprocesses) -----------------------------------------------------------------

RUN = ["--embedded", "preact_wrn", "--quick", "--n-test", "20", "--chunk-size", "5", "--no-progress",
       "--threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(out, *extra):
    return [sys.executable, "-m", "lipkern", "eval", *RUN, "--out", str(out), *extra]


def _per_sample(out):
    res = json.loads((Path(out) / "results.json").read_text())
    (m,) = res["models"]
    keep = ("clean", "autoattack", "cw", "adaptive", "transfer", "worst_case", "fgsm", "pgd", "autoattack_stages",
            "outcomes", "paired", "verdict", "audit")
    return {k: {f: c[f] for f in keep if f in c} for k, c in m["configs"].items()}, m


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    subprocess.run(_cli(out), check=True, env=ENV, capture_output=True, timeout=900)
    return out


def test_two_processes_give_the_one_process_outcomes(one_process_run, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lipkern", "eval", *RUN, "--out", str(out)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stderr
    one, m1 = _per_sample(one_process_run)
    two, m2 = _per_sample(out)
    assert one == two
    assert m1["lipschitz"] == m2["lipschitz"] and m1["smoothing"] == m2["smoothing"]
    assert m1["weight_variant"] == m2["weight_variant"] and m1["calib_ablation"] == m2["calib_ablation"]
    table = lambda p: (Path(p) / "report.md").read_text().split("## preact_wrn")[0]  # noqa: E731
    assert table(one_process_run) == table(out)


def test_ctrl_c_stops_the_workers_and_leaks_nothing(tmp_path):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "lipkern", "eval", "--quick", "--n-test", "20", "--jobs", "2", "--threads", "1",
           "--no-progress", "--out", str(out)]
    # A terminal's Ctrl-C: SIGINT to the whole process group, with SIGINT's default disposition.
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL), os.setpgrp()))
    started = 0
    for line in proc.stderr:  # each worker announces its work once it has begun
        started += "already done" in line
        if started == 2:
            break
    assert started == 2, "the workers did not start"
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, rest
    assert "lipkern eval: interrupted" in rest and "leaked" not in rest, rest


def test_sigkill_then_resume_equals_an_uninterrupted_run(one_process_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "outcomes.sqlite"
    deadline = time.monotonic() + 600
    units = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=5) as con:
                    units = con.execute("SELECT COUNT(*) FROM units").fetchone()[0]
            except sqlite3.OperationalError:
                units = 0
            if units >= 12:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    refused = subprocess.run(_cli(out), env=ENV, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    changed = subprocess.run(_cli(out, "--resume", "--seed", "1", "--eps", "16/255"), env=ENV, capture_output=True,
                             text=True, timeout=120)
    assert changed.returncode == 2 and ("other settings (--eps (from Python, eps): recorded 32/255, now 16/255; "
                                        "--seed (from Python, seed): recorded 0, now 1; the test samples drawn "
                                        "(--n-test, --seed; from Python, n_test, seed) differ)") in changed.stderr
    resumed = subprocess.run(_cli(out, "--resume"), env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    already = int(re.search(r"(\d+) already done", resumed.stderr).group(1))
    assert already >= units > 0
    assert "estimated time left" in resumed.stderr
    assert _per_sample(out)[0] == _per_sample(one_process_run)[0]
    assert (out / "report.md").read_text() == (one_process_run / "report.md").read_text()


def test_a_refused_resume_names_what_the_caller_set(tmp_path, monkeypatch):
    """Each differing setting is named by the flag (and the Python argument) that set it, not by the key it is
    stored under, with the values; a budget by its name, whose entries differ because it does."""
    model, calib, test = _tiny_model(), _tiny_data(), _tiny_data(seed=1)
    run = dict(eps=8 / 255, ratios=(2 ** -6,), budget=MICRO, progress=False, device=torch.device("cpu"),
               chunk_size=4, out_dir=tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "_run_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, calib, test, **run)  # the settings are recorded before the first chunk
    with pytest.raises(SettingsMismatchError) as refused:
        evaluate(model, calib, test, **{**run, "budget": None, "quick": True, "chunk_size": 2,
                                        "ratios": (2 ** -6, 2 ** -4)}, convert_kwargs={"acts": ("gelu",)})
    said = str(refused.value)
    for part in ("the budget (--quick; from Python, quick or budget): recorded 'micro', now 'quick'",
                 "--chunk-size (from Python, chunk_size): recorded 4, now 2",
                 "--acts (from Python, convert_kwargs['acts']): recorded None, now ['gelu']",
                 "--ratios (from Python, ratios): recorded 2^-6, now 2^-6,2^-4"):
        assert part in said, said
    assert "budget." not in said and "chunk_size:" not in said and "pgd_steps" not in said


def test_an_earlier_lipkerns_output_is_lipkerns_and_a_database_of_the_users_is_left_alone(tmp_path):
    """A store and results.json from before the marks are told by their tables and keys; a database of the
    user's under the store's name is neither resumed into nor marked, and a file of SQLite's name pattern is
    lipkern's only where SQLite makes it."""
    from lipkern.eval.store import FILENAME, NotAStoreError, is_store_file

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    store = OutcomeStore(earlier)
    store.bind_settings("m", {"eps": 0.1})
    store.close()
    db = sqlite3.connect(earlier / FILENAME)
    db.execute("PRAGMA application_id = 0")
    db.commit()
    db.close()
    (earlier / "results.json").write_text(json.dumps(
        {"models": [{"name": "m", "configs": [], "ratio_labels": []}], "meta": {"quick": True}}, indent=1))
    _report_file(earlier / "report.md")
    assert cli_eval.check_out_dir(str(earlier), resume=False, overwrite=True) == sorted(earlier.iterdir())
    # Resumed with other settings, it is refused and left exactly as it was.
    stored = (earlier / FILENAME).read_bytes()
    store = OutcomeStore(earlier)
    with pytest.raises(SettingsMismatchError):
        store.bind_settings("m", {"eps": 0.2})
    store.close()
    assert (earlier / FILENAME).read_bytes() == stored and is_store_file(earlier / FILENAME)
    (earlier / f"{FILENAME}-backup").write_bytes(b"a copy of the user's")
    (earlier / f"{FILENAME}-mj0A1b2C3d").write_bytes(b"")
    assert not is_store_file(earlier / f"{FILENAME}-backup") and is_store_file(earlier / f"{FILENAME}-mj0A1b2C3d")
    with pytest.raises(EvalInputError, match=rf"did not write \({FILENAME}-backup\)"):
        cli_eval.check_out_dir(str(earlier), resume=False, overwrite=True)

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    db = sqlite3.connect(theirs / FILENAME)
    db.execute("CREATE TABLE measurements (x)")
    db.commit()
    db.close()
    before = (theirs / FILENAME).read_bytes()
    with pytest.raises(EvalInputError, match=f"--resume: .*{FILENAME} is not an outcome store lipkern made"):
        cli_eval.check_out_dir(str(theirs), resume=True, overwrite=False)
    with pytest.raises(NotAStoreError, match="not an outcome store lipkern made"):
        OutcomeStore(theirs)
    assert (theirs / FILENAME).read_bytes() == before and not is_store_file(theirs / FILENAME)


def test_overwrite_tells_lipkern_files_by_what_they_hold(tmp_path, monkeypatch, capsys):
    """Files of the user's with the names lipkern gives its outputs are refused, and stay as they were; what a
    killed run leaves (a temporary cut short, the store's journal, the write test, a held directory) is
    lipkern's and goes."""
    from lipkern.eval.store import is_store_file

    _fail_if_evaluated(monkeypatch)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.md").write_text("# my report\n")
    (theirs / "results.json").write_text('{"models": []}')
    (theirs / "sweep_mine.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"a figure of the user's")
    db = sqlite3.connect(theirs / "outcomes.sqlite")
    db.execute("CREATE TABLE units (x)")
    db.commit()
    db.close()
    held = theirs / (cli_eval.HELD_PREFIX + "mine")
    held.mkdir()
    (held / "notes.txt").write_text("mine")
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}  # noqa: E731
    before = files(theirs)
    assert cli_eval.main(["--no-progress", "--out", str(theirs), "--overwrite"]) == 2
    assert (f"did not write ({cli_eval.HELD_PREFIX}mine/, outcomes.sqlite, report.md, results.json, "
            "sweep_mine.png)") in capsys.readouterr().err
    assert files(theirs) == before
    # An earlier run killed while it wrote: everything in it is lipkern's, so the evaluation starts.
    used = tmp_path / "used"
    _earlier_run(used)
    (used / "report.md.tmp").write_bytes((used / "report.md").read_bytes()[:10])
    (used / "outcomes.sqlite-journal").write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7")
    (used / cli_eval.WRITE_PROBE).write_bytes(b"")
    (used / (cli_eval.HELD_PREFIX + "killed")).mkdir()
    _report_file(used / (cli_eval.HELD_PREFIX + "killed") / "results.json")
    before = files(used)
    with pytest.raises(AssertionError, match="the evaluation started"):
        cli_eval.main(["--no-progress", "--embedded", "preact_wrn", "--jobs", "1", "--out", str(used),
                       "--overwrite"])
    assert files(used) == before
    # An empty store is one SQLite was making when its run was killed; a journal is lipkern's only beside its store.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "outcomes.sqlite").write_bytes(b"")
    (theirs / "outcomes.sqlite-journal").write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7")
    assert is_store_file(tmp_path / "empty" / "outcomes.sqlite") and is_store_file(used / "outcomes.sqlite-journal")
    assert not is_store_file(theirs / "outcomes.sqlite") and not is_store_file(theirs / "outcomes.sqlite-journal")
