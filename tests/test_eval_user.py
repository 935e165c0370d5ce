"""`lipkern eval` on a user's model and data, the RobustBench path, and bad input."""
import argparse
import copy
import sys
import textwrap

import numpy as np
import pytest
import torch

import lipkern
from lipkern.eval import cli_eval
from lipkern.eval.api import Budget, EvalInputError, evaluate

TINY_MODULE = textwrap.dedent("""
    import torch.nn as nn

    def make():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
                             nn.GELU(), nn.Linear(8, 5))
""")

# Smallest budget that still runs every analysis (for the big RobustBench architecture on CPU).
MICRO = Budget("micro", 2, pgd_steps=2, cw_steps=2, aa_targets=1, aa_square_queries=10, aux_attacks=("apgd-ce",),
               n_cert=1, cert_n0=4, cert_n=8, cert_alpha=0.001, weight_fractions=(0.5,), n_ablation_sizes=1,
               n_lipschitz=2)


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    (tmp_path / "tiny_eval_model.py").write_text(TINY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tiny_eval_model", None)
    return "tiny_eval_model:make"


def _npz(path, n=32, labels=None, **extra):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.random((n, 1, 6, 6), dtype=np.float32),
              "y": rng.integers(0, 5, n) if labels is None else labels}
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def test_user_model_and_npz(tmp_path, tiny_model, capsys):
    import json

    torch.manual_seed(0)
    model = __import__("tiny_eval_model").make()
    ckpt = tmp_path / "w.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "out"
    rc = cli_eval.main(["--model", tiny_model, "--checkpoint", str(ckpt), "--data", str(_npz(tmp_path / "d.npz")),
                        "--quick", "--no-progress", "--jobs", "1", "--eps", "8/255", "--ratios", "2^-7,2^-5",
                        "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    (m,) = res["models"]
    assert m["name"] == "make" and abs(m["eps"] - 8 / 255) < 1e-12
    assert list(m["configs"]) == ["original", "2^-7", "2^-5"]
    assert m["n_test"] == 16 and m["n_calib"] == 16  # half of the file calibrates, the other half tests
    # Each outcome traces to its row of --data (test_indices count within the test half).
    data = np.load(tmp_path / "d.npz")
    rows = m["data_rows"]
    assert len(rows) == 16 and rows != m["test_indices"]
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(data["x"][rows]))
    clean = "".join("1" if c else "0" for c in (logits.argmax(1).numpy() == data["y"][rows]))
    assert m["configs"]["original"]["outcomes"]["clean"] == clean
    assert "| make | 2^-5 |" in capsys.readouterr().out


@pytest.fixture
def one_thread():
    # Small batches of a ResNet-18 on CPU: one intra-op thread avoids OpenMP spinning on a shared 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_robustbench_random_checkpoint(tmp_path, one_thread):
    from lipkern.models import robustbench_architecture, write_robustbench_checkpoint

    torch.manual_seed(0)
    model_id = "Wong2020Fast"  # PreActResNet-18, among the smallest CIFAR-10 L-inf architectures
    write_robustbench_checkpoint(robustbench_architecture(model_id, "cifar10"), model_id, "cifar10", tmp_path)
    x = torch.rand(4, 3, 32, 32)
    data = tmp_path / "cifar.npz"
    np.savez(data, x=x.numpy(), y=np.zeros(4, np.int64))
    args = _parse(["--robustbench", model_id, "--model-dir", str(tmp_path), "--data", str(data),
                   "--inputs-of", "layer*.*.conv2"])
    (job,) = cli_eval._user_jobs(args)
    assert job.name == model_id and job.eps == 8 / 255 and "random 2 of the 4 samples" in job.calib_source
    # Labels the random network gets wrong: every AutoAttack run then stops at once, which keeps this CPU test of
    # the load -> convert -> calibrate -> evaluate path short (the attacks are exercised on the small models).
    with torch.no_grad():
        job.test.y = (job.model(job.test.x).argmax(1) + 1) % 10
    res = evaluate(job.model, job.calib, job.test, eps=job.eps, convert_kwargs=job.convert_kwargs, budget=MICRO,
                   ratios=(2 ** -7,), progress=False).to_dict()["models"][0]
    assert list(res["configs"]) == ["original", "2^-7"]
    assert res["layers"]["names"], "the input remaps on conv2 were not found"


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli_eval.add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def _error(argv, capsys):
    rc = cli_eval.main([*argv, "--no-progress", "--jobs", "1"])
    assert rc == 2
    return capsys.readouterr().err


def test_missing_checkpoint(tmp_path, tiny_model, capsys):
    err = _error(["--model", tiny_model, "--checkpoint", str(tmp_path / "nope.pt")], capsys)
    assert "--checkpoint" in err and "nope.pt" in err


def test_checkpoint_that_is_not_a_state_dict(tmp_path, tiny_model, capsys):
    """Garbage, a bare tensor and a pickled module are refused naming the file, without a traceback."""
    garbage, tensor, module = tmp_path / "garbage.pt", tmp_path / "tensor.pt", tmp_path / "module.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    torch.save(torch.zeros(3), tensor)
    torch.save({"model": torch.nn.Linear(2, 2)}, module)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path, says in ((garbage, "not a state dict that torch.load(weights_only=True) reads"),
                       (tensor, "holds a Tensor, not a state dict"),
                       (module, "holds pickled Python objects (a whole model?), which are not loaded"),
                       (empty, "not a state dict that torch.load(weights_only=True) reads (EOFError)")):
        err = _error(["--model", tiny_model, "--checkpoint", str(path), "--data", str(_npz(tmp_path / "d.npz")),
                      "--out", str(tmp_path / "out")], capsys)
        assert f"--checkpoint {path}: {says}" in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_checkpoint_wrapped_as_training_scripts_save_it(tmp_path, tiny_model):
    """A state dict under one of the usual keys beside other entries, or saved from DistributedDataParallel
    ("module." before every key), loads; two candidates, or none, are a clear error."""
    torch.manual_seed(1)
    make = __import__("tiny_eval_model").make
    trained = make().state_dict()
    ddp = {f"module.{k}": v for k, v in trained.items()}
    for i, saved in enumerate(({"model": trained, "epoch": 3}, {"model_state_dict": trained, "optimizer": {}},
                               {"net": trained}, {"state_dict": trained}, ddp, {"model": ddp, "epoch": 3},
                               {"state_dict": trained, "best_acc": torch.tensor(0.9)})):
        path = tmp_path / f"w{i}.pt"
        torch.save(saved, path)
        model = make()
        cli_eval._load_checkpoint(model, str(path))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items()), saved.keys()

    class Noted(torch.nn.Module):
        """A module whose extra state, in the state dict beside the tensors, is no tensor."""

        def get_extra_state(self):
            return {"note": "kept"}

        def set_extra_state(self, state):
            self.note = state["note"]

    noted = torch.nn.Sequential(make(), Noted())
    torch.save({"state_dict": noted.state_dict(), "epoch": 3}, tmp_path / "noted.pt")
    model = torch.nn.Sequential(make(), Noted())
    cli_eval._load_checkpoint(model, str(tmp_path / "noted.pt"))
    assert model[1].note == "kept" and torch.equal(model[0][0].weight, noted[0][0].weight)
    for saved, says in (({"model": trained, "net": trained, "epoch": 3},
                         "holds a state dict under each of 'model', 'net'; save the one to evaluate on its own"),
                        ({"epoch": 3, "optimizer": {"lr": 0.1}},
                         "holds a dict with keys 'epoch', 'optimizer', not a state dict (a mapping of parameter "
                         "names to tensors, or one under 'state_dict', 'model_state_dict', 'model' or 'net')")):
        torch.save(saved, tmp_path / "bad.pt")
        with pytest.raises(EvalInputError, match="^--checkpoint .*bad.pt: (.*)") as refused:
            cli_eval._load_checkpoint(make(), str(tmp_path / "bad.pt"))
        assert says in str(refused.value)


def test_calibration_images_without_labels(tmp_path, tiny_model, capsys):
    """Calibration does not use labels: an x_calib in --data without y_calib calibrates, as --calib-data's x
    alone does; a y_calib without the images it labels is refused."""
    rng = np.random.default_rng(1)
    path = _npz(tmp_path / "d.npz", x_calib=rng.random((12, 1, 6, 6), dtype=np.float32))
    (job,) = cli_eval._user_jobs(_parse(["--model", tiny_model, "--data", str(path)]))
    assert len(job.calib) == 12 and len(job.test) == 32 and job.calib_source == f"the array x_calib of {path}"
    assert torch.equal(job.calib.x, torch.from_numpy(np.load(path)["x_calib"]))
    labels_only = _npz(tmp_path / "y.npz", y_calib=np.zeros(12, np.int64))
    err = _error(["--model", tiny_model, "--data", str(labels_only)], capsys)
    assert "'y_calib' without 'x_calib'; the calibration images go in 'x_calib'" in err
    from lipkern.eval.data import load_npz

    # Unused, calibration labels do not count the classes either.
    far_label = _npz(tmp_path / "far.npz", labels=np.arange(32) % 5, x_calib=rng.random((12, 1, 6, 6), dtype=np.float32),
                     y_calib=np.full(12, 99))
    assert load_npz(far_label).num_classes == 5


FAILING_MODULE = textwrap.dedent("""
    import torch
    import torch.nn as nn

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(x.flatten(1)[:, :5]), x

    class Flat(Pair):
        def forward(self, x):
            return self.act(x.flatten(1)).sum(1)

    def pair():
        return Pair()

    def flat():
        return Flat()

    def raises():
        raise RuntimeError("no weights here")

    def needs(width):
        return nn.Linear(width, 5)
""")


def test_a_model_that_fails_or_returns_no_logits_is_a_clear_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "failing_eval_model.py").write_text(FAILING_MODULE)
    (tmp_path / "broken_eval_module.py").write_text("raise ValueError('set LIPKERN_DATA first')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = str(_npz(tmp_path / "d.npz"))
    for spec, says in (("failing_eval_model:raises", "calling it raised RuntimeError: no weights here"),
                       ("failing_eval_model:needs", "calling it raised TypeError: needs() missing 1 required"),
                       ("broken_eval_module:f", "importing 'broken_eval_module' raised ValueError: set LIPKERN_DATA"),
                       ("failing_eval_model:pair", "must return logits of shape (N, classes), got tuple"),
                       ("failing_eval_model:flat", "must return logits of shape (N, classes), got shape (2,)")):
        err = _error(["--model", spec, "--data", data, "--out", str(tmp_path / "out")], capsys)
        assert says in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_an_unknown_or_unfitting_robustbench_model_is_a_clear_error(tmp_path, capsys):
    data = str(_npz(tmp_path / "d.npz"))
    err = _error(["--robustbench", "NoSuch2099Model", "--model-dir", str(tmp_path), "--data", data], capsys)
    assert "--robustbench: unknown RobustBench model 'NoSuch2099Model'" in err and "place" not in err
    target = tmp_path / "cifar10" / "Linf" / "Wong2020Fast.pt"
    target.parent.mkdir(parents=True)
    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict()}, target)
    err = _error(["--robustbench", "Wong2020Fast", "--model-dir", str(tmp_path), "--data", data], capsys)
    assert "--robustbench Wong2020Fast: its checkpoint in --model-dir" in err and "does not load" in err
    assert len(err) < 1000 and "Traceback" not in err


def test_arguments_of_another_model_source_are_refused(tmp_path, tiny_model, capsys):
    data = str(_npz(tmp_path / "d.npz"))
    err = _error(["--model", tiny_model, "--model-dir", str(tmp_path), "--data", data], capsys)
    assert "--model-dir needs --robustbench" in err
    err = _error(["--robustbench", "Wu2020Adversarial", "--model-dir", str(tmp_path), "--checkpoint", data], capsys)
    assert "--checkpoint needs --model" in err


def test_duplicate_ratios_and_an_out_that_cannot_be_made(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse(["--ratios", "2^-7,0.0078125"])
    assert "c^r 0.0078125 is given twice (the report labels it 2^-7)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--ratios", "0.01,0.010000001"])
    assert "c^r 0.010000001 is given twice (the report labels it 0.01)" in capsys.readouterr().err
    err = _error(["--out", "/proc/lipkern-never-made"], capsys)
    assert "--out /proc/lipkern-never-made is not writable" in err


def test_missing_robustbench_checkpoint_says_where(tmp_path, capsys):
    err = _error(["--robustbench", "Wu2020Adversarial", "--model-dir", str(tmp_path)], capsys)
    assert str(tmp_path / "cifar10" / "Linf" / "Wu2020Adversarial.pt") in err


def test_npz_without_x_or_y(tmp_path, tiny_model, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((4, 1, 6, 6), np.float32), y=np.zeros(4, np.int64))
    err = _error(["--model", tiny_model, "--data", str(path)], capsys)
    assert "missing array(s) ['x']" in err


def test_labels_out_of_range(tmp_path, tiny_model, capsys):
    path = _npz(tmp_path / "d.npz", labels=np.full(32, 7))
    err = _error(["--model", tiny_model, "--data", str(path)], capsys)
    assert "labels out of range" in err and "5 classes" in err


def test_negative_labels(tmp_path, tiny_model, capsys):
    err = _error(["--model", tiny_model, "--data", str(_npz(tmp_path / "d.npz", labels=np.full(32, -1)))], capsys)
    assert "labels out of range" in err


@pytest.mark.parametrize("eps", ["-0.1", "0", "nan", "abc"])
def test_bad_eps(eps, capsys):
    with pytest.raises(SystemExit) as e:
        _parse([f"--eps={eps}"])
    assert e.value.code == 2
    assert "--eps" in capsys.readouterr().err


def test_too_many_test_samples_says_where_the_rest_went(tmp_path, tiny_model, capsys):
    data = str(_npz(tmp_path / "d.npz"))
    err = _error(["--model", tiny_model, "--data", data, "--n-test", "20"], capsys)
    assert (f"--n-test 20: make's test data holds 16 samples (the 16 of the 32 samples of {data} that calibration "
            "left (seed 0); with calibration data of its own (--calib-data) all of them test)") in err
    calib = str(_npz(tmp_path / "c.npz", n=8))
    err = _error(["--model", tiny_model, "--data", data, "--calib-data", calib, "--n-test", "40"], capsys)
    assert f"--n-test 40: make's test data holds 32 samples (all of x in {data})" in err
    # The embedded models' test split is their own: no calibration took from it.
    err = _error(["--embedded", "preact_wrn", "--n-test", "100000", "--out", str(tmp_path / "out")], capsys)
    assert ("--n-test 100000: preact_wrn's test data holds 359 samples (the digits test split, 359 of the 1797 "
            "images)") in err and "calibration" not in err
    err = _error(["--embedded", "preact_wrn", "--n-calib", "100000", "--out", str(tmp_path / "out")], capsys)
    assert ("--n-calib 100000: preact_wrn's calibration data holds 512 samples (the first 512 images of the digits "
            "training split)") in err


def test_an_infinite_eps_is_not_offered_a_hint(capsys):
    with pytest.raises(SystemExit):
        _parse(["--eps=inf"])
    err = capsys.readouterr().err
    assert "--eps: must be < 1" in err and "/255" not in err


def test_data_with_nan_says_how_many(tmp_path, tiny_model, capsys):
    x = np.random.default_rng(0).random((32, 1, 6, 6), dtype=np.float32)
    x[3, 0, 1, 2], x[5, 0, 0, 0] = np.nan, np.inf
    path = tmp_path / "nan.npz"
    np.savez(path, x=x, y=np.zeros(32, np.int64))
    err = _error(["--model", tiny_model, "--data", str(path)], capsys)
    assert "'x' must be finite and in [0, 1]; it holds 2 NaN or infinite value(s) of 1152" in err
    x[3, 0, 1, 2], x[5, 0, 0, 0] = 1.5, 0.0
    np.savez(path, x=x, y=np.zeros(32, np.int64))
    assert "'x' must be in [0, 1] (min 0, max 1.5)" in _error(["--model", tiny_model, "--data", str(path)], capsys)


@pytest.mark.filterwarnings("ignore:lipkern.convert. nothing was converted")
def test_a_conversion_that_cannot_be_placed_is_refused_before_any_work(tmp_path, tiny_model, monkeypatch, capsys):
    from lipkern.eval import api

    def boom(*a, **k):
        raise AssertionError("the evaluation started")
    monkeypatch.setattr(api, "evaluate", boom)
    out = tmp_path / "out"
    data = str(_npz(tmp_path / "d.npz"))
    err = _error(["--model", tiny_model, "--data", data, "--inputs-of", "3,nomatch.*", "--out", str(out)], capsys)
    assert ("make: inputs_of 'nomatch.*' names no module of the model (fnmatch globs on qualified module names, "
            "such as '5')") in err
    err = _error(["--model", tiny_model, "--data", data, "--inputs-of", "[12]", "--out", str(out)], capsys)
    assert "make: inputs_of '[12]' matched '1': input remaps go on nn.Linear" in err and "Traceback" not in err
    err = _error(["--model", tiny_model, "--data", data, "--acts", "silu", "--out", str(out)], capsys)
    assert "make: lipkern.convert with {'acts': ('silu',)} placed no remap" in err and "Warning" not in err
    # A pattern of one embedded model's layers, given for both, names the model it misses and the way out.
    err = _error(["--inputs-of", "*.mlp.fc1", "--out", str(out)], capsys)
    assert "preact_wrn: inputs_of '*.mlp.fc1' names no module" in err and "name one with --embedded" in err
    assert not out.exists()


def test_api_rejects_bad_arguments():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 5))
    x, y = torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(EvalInputError, match="eps"):
        evaluate(model, (x, y), (x, y), eps=-1.0)
    with pytest.raises(EvalInputError, match="ratios"):
        evaluate(model, (x, y), (x, y), ratios=(1.5,))
    for run_models in ("model", ["other"]):
        with pytest.raises(EvalInputError, match="run_models must be a list of the names of every model of the run"):
            evaluate(model, (x, y), (x, y), run_models=run_models)
    with pytest.raises(EvalInputError, match="at least 4 classes"):
        evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), (x, y), (x, y))
    with pytest.raises(EvalInputError, match="labels out of range"):
        evaluate(model, (x, y), (x, y + 5))
    # Test data needs its labels: a tensor alone, or labels of another length, is refused.
    with pytest.raises(EvalInputError, match=r"test_data must be .* \(x, y\) pair"):
        evaluate(model, x, x)
    with pytest.raises(EvalInputError, match=r"test_data: y must have shape \(N,\)"):
        evaluate(model, x, (x, y[:3]))
    with pytest.raises(EvalInputError, match=r"calib_data: y must have shape \(N,\)"):
        evaluate(model, (x, y[:, None]), (x, y))
    # The image box holds for both splits, and NaN is outside it.
    x_nan = x.clone()
    x_nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(EvalInputError, match=r"test_data: x must lie in \[0, 1\], without NaN"):
        evaluate(model, (x, y), (x_nan, y))
    with pytest.raises(EvalInputError, match=r"calib_data: x must lie in \[0, 1\], without NaN"):
        evaluate(model, x * 5, (x, y))
    for ratios in (0.5, "2^-8", [0.5, "0.25"]):
        with pytest.raises(EvalInputError, match="ratios must be a list of numbers in"):
            evaluate(model, (x, y), (x, y), ratios=ratios)
    with pytest.raises(EvalInputError, match="n_test must be a finite integer"):
        evaluate(model, (x, y), (x, y), n_test=2.0)
    with pytest.raises(EvalInputError, match="out_dir must be an existing directory"):
        evaluate(model, (x, y), (x, y), out_dir="/nonexistent/lipkern-out")
    # numpy scalars pass the checks as the numbers they are: the run goes on to the labels' check.
    with pytest.raises(EvalInputError, match="labels out of range"):
        evaluate(model, (x, y), (x, y + 5), eps=np.float32(16 / 255), n_test=np.int64(2), seed=np.int64(1),
                 ratios=np.array([2**-7]))


def test_api_refuses_a_conversion_before_any_work(tmp_path, recwarn):
    """Bad conversion arguments, and a model the conversion finds nothing in, are refused before
    an outcome store is written (a rerun would otherwise find a run it never made)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 5))
    x, y = torch.rand(8, 1, 2, 2), torch.arange(8) % 5
    for kwargs, message in [({"acts": ("tanh",)}, "acts entries must be among"),
                            ({"act": "relu"}, "unexpected keyword argument 'act'"),
                            ({"preset": "fast"}, "preset must be"),
                            ({"acts": ("gelu",)}, r"placed no remap in the model: none of the selected "
                                                  r"activations \(its activation modules are relu\)"),
                            ({"inputs_of": ("1", "fc*")}, "inputs_of 'fc\\*' names no module"),
                            ({"inputs_of": ("fc*", "x")}, "inputs_of 'fc\\*', 'x' name no module"),
                            ({"inputs_of": "0"}, "inputs_of '0' matched '0': input remaps go on nn.Linear")]:
        with pytest.raises(EvalInputError, match=message):
            evaluate(model, (x, y), (x, y), convert_kwargs=kwargs, out_dir=tmp_path, progress=False)
        assert not any(tmp_path.iterdir())
    with pytest.raises(EvalInputError, match="holds lipkern remap layers already: pass the model before"):
        evaluate(lipkern.convert(copy.deepcopy(model)), (x, y), (x, y), out_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())
    # The refusal says what convert's "nothing was converted" warning would, so that warning is not shown too.
    assert not [w for w in recwarn if "nothing was converted" in str(w.message)]


def test_evaluate_sets_the_thread_count_only_when_asked_and_puts_it_back(tmp_path, monkeypatch):
    """torch's thread count is process-wide: evaluate() changes it for its own run with threads=N, for every
    forward from the first (the data check) to the attacks, puts it back however the run ends, and leaves it
    alone without threads."""
    from lipkern.eval import api

    previous = torch.get_num_threads()
    other = 1 if previous > 1 else 2
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(torch.get_num_threads()))

    class Stopped(Exception):
        pass

    def attacks(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise Stopped

    monkeypatch.setattr(api, "_run_chunks", attacks)
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 5
    try:
        for threads, expected in ((other, other), (None, previous)):
            seen.clear()
            with pytest.raises(Stopped):
                evaluate(model, x, (x, y), budget=MICRO, ratios=(2 ** -6,), progress=False, device="cpu",
                         threads=threads)
            assert len(seen) > 2 and set(seen) == {expected}
            assert torch.get_num_threads() == previous
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(EvalInputError, match="threads must be a finite integer >= 1, got 0"):
        evaluate(model, x, (x, y), threads=0)


def test_the_embedded_models_are_loaded_once(tmp_path, monkeypatch, capsys):
    """Each model is built and its checkpoint read once: the conversion check and the evaluation share it."""
    from lipkern.eval import api, embedded

    loaded, evaluated = [], []
    load = embedded.load_embedded

    def counted(name):
        loaded.append((name, load(name)))
        return loaded[-1][1]

    def interrupted(model, *args, name, **kwargs):
        evaluated.append((name, model))
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "load_embedded", counted)
    monkeypatch.setattr(api, "evaluate", interrupted)
    assert cli_eval.main(["--no-progress", "--jobs", "1", "--out", str(tmp_path / "out")]) == 130
    capsys.readouterr()
    assert [name for name, _ in loaded] == ["preact_wrn", "tiny_vit"]
    assert len(evaluated) == 1 and evaluated[0][1] is loaded[0][1]
