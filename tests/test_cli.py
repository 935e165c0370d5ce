"""The ``lipkern`` command line: verify, bench and the eval hook (smoke tests, kept fast)."""

import contextlib
import json
import re
import os
import subprocess
import sys
import types

import pytest
import torch
import torch._functorch.config

import lipkern
from lipkern import cli, testing
from lipkern.tools import bench, sweep, verify
from lipkern.ops import api
from lipkern.ulp import NAN_MISMATCH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_verify_quick_passes_on_every_backend(capsys):
    status = cli.main(["verify", "--quick"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["op", "act", "dtype", "backend"]
    rows = lines[2 : lines.index("")]
    assert rows and all(row.split()[8] == "PASS" for row in rows), "\n".join(lines)
    summary = lines[lines.index("") + 1]
    assert " 0 FAIL" in summary and "cpu@cpu" in summary, summary
    # bf16 GELU passes many ulps from PyTorch's reference where that reference cancels; the table says why,
    # and its next column shows the C++ kernels' outputs within an ulp of the float64 value.
    assert max(int(row.split()[4]) for row in rows if row.split()[4].isdigit()) > 1
    assert any(line.startswith("ulp vs torch: the largest distance from PyTorch's fp32 reference") for line in lines)
    gelu_forward = [row.split() for row in rows if row.split()[:2] == ["fwd", "gelu"] and row.split()[3] == "cpu"]
    assert gelu_forward and all(row[5].isdigit() and int(row[5]) <= 1 for row in gelu_forward), "\n".join(lines)
    assert status == 0


def test_verify_json_on_stdout(capsys):
    status = cli.main(
        ["verify", "--quick", "--backend", "reference", "--op", "fwd", "--act", "relu", "--json", "-"]
    )
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["passed"]
    assert {r["dtype"] for r in report["rows"]} == {"fp16", "bf16", "fp32"}
    assert all(r["verdict"] == "PASS" and r["cases"] == 2 for r in report["rows"])


class _ShiftedForward(api.ReferenceBackend):
    """The reference, except that every forward output is nudged by a few ulps."""

    def remap_act(self, x, threshold, center, act, channel_dim, straight_through):
        y = super().remap_act(x, threshold, center, act, channel_dim, straight_through)
        return y * (1 + 8 * torch.finfo(y.dtype).eps)


class _WrongMask(api.ReferenceBackend):
    """The reference with the threshold doubled: a genuine remap-decision bug."""

    def remap_act_stats(self, x, threshold, center, act, channel_dim):
        return super().remap_act_stats(x, threshold * 2, center, act, channel_dim)


@contextlib.contextmanager
def _as_reference(backend):
    """``backend`` registered under the name "reference" (its ``name``), the real one after."""
    api.register_backend(backend)
    try:
        yield
    finally:
        api.register_backend(api.ReferenceBackend())


def _verify(capsys, *args):
    status = cli.main(["verify", "--quick", "--backend", "reference", "--dtype", "fp32", *args])
    return status, capsys.readouterr().out


def test_broken_values_fail(capsys):
    with _as_reference(_ShiftedForward()):
        status, out = _verify(capsys, "--op", "fwd", "--act", "relu")
    assert status == 1
    row = [line for line in out.splitlines() if line.startswith("fwd")][0]
    assert "FAIL" in row and "bad elements" in row


def test_wrong_mask_is_a_mask_mismatch(capsys):
    with _as_reference(_WrongMask()):
        status, out = _verify(capsys, "--op", "stats", "--act", "gelu")
        report = verify.run_verify(
            backends=[verify.BackendUnderTest("reference")], acts=["gelu"], dtypes=["fp32"],
            ops=["stats"], devices=["cpu"], quick=True,
        )
    assert status == 1
    (row,) = report.rows
    assert row.verdict == "FAIL" and row.mask_mismatches > 0


def test_exceptions_become_fail_rows(capsys):
    class Raising(verify.BackendUnderTest):
        def forward(self, case, act):
            raise RuntimeError("kernel exploded")

    report = verify.run_verify(
        backends=[Raising("reference")], acts=["relu"], dtypes=["bf16"], ops=["fwd"],
        devices=["cpu"], quick=True,
    )
    (row,) = report.rows
    assert row.verdict == "FAIL" and "kernel exploded" in row.describe()
    assert "kernel exploded" in verify.format_table(report)


def test_nan_vs_num_is_explained_in_the_table_and_the_json(capsys):
    """GELU-tanh's backward: PyTorch's formula gives NaN once x * x overflows float32, where the
    C++ kernels give the derivative's value; the row passes, and the legend says when and why."""
    arguments = ["verify", "--quick", "--backend", "cpu", "--dtype", "fp32", "--act", "gelu_tanh",
                 "--op", "bwd"]
    assert cli.main(arguments) == 0
    lines = capsys.readouterr().out.splitlines()
    (row,) = [line.split() for line in lines if line.startswith("bwd")]
    assert row[4] == "NaN-vs-num" and row[8] == "PASS"
    (meaning,) = [line for line in lines if line.startswith("NaN-vs-num: ")]
    assert "overflows float32" in meaning and "absolute bound of the float64 value" in meaning
    assert cli.main([*arguments, "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"][0]["max_ulp"] == NAN_MISMATCH
    assert report["legend"]["NaN-vs-num"] == meaning.removeprefix("NaN-vs-num: ")
    assert f"max_ulp {NAN_MISMATCH} in the JSON" in meaning


class _NumberWhereTheReferenceIsNaN(verify.BackendUnderTest):
    """The reference's backward, with 0.5 where it is NaN for a finite input (where the
    derivative is 1 or 0): a number, but wrong."""

    def backward(self, case, act, straight_through):
        dx = super().backward(case, act, straight_through)
        return torch.where(dx.isnan() & case.x.isfinite(), 0.5, dx)


def test_a_wrong_number_where_the_reference_is_nan_fails():
    report = verify.run_verify(
        backends=[_NumberWhereTheReferenceIsNaN("reference")], acts=["gelu_tanh"],
        dtypes=["fp32"], ops=["bwd"], devices=["cpu"], quick=True,
    )
    (row,) = report.rows
    assert row.max_ulp == NAN_MISMATCH and row.verdict == "FAIL"


def test_cases_hold_special_values_and_exact_ties():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for case in verify.make_cases(dtype, "gelu", quick=True):
            x = case.x.float()
            assert x.isnan().any() and x.isposinf().any() and x.isneginf().any()
            assert (torch.signbit(x) & (x == 0)).any()  # -0.0
            assert (x.abs() == torch.finfo(dtype).max).any()
            _, _, _, band = testing.reference_mask_and_band(
                case.x, case.threshold, case.center, "gelu", case.channel_dim
            )
            assert band.any()  # elements sitting on the threshold
    cl = verify.make_cases(torch.float32, "relu", quick=True)[1]
    assert cl.x.is_contiguous(memory_format=torch.channels_last) and not cl.x.is_contiguous()


def test_bench_quick_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    # The C++ kernels when built (the suite builds them); the bench plumbing is the same.
    backend = "cpu" if "cpu" in lipkern.available_backends() else "reference"
    status = cli.main(
        ["bench", "--quick", "--shape", "64x32", "--shape", "nchw_cl:2x8x4x4", "--no-compile",
         "--min-time", "0.01", "--backend", backend, "--json", str(path), "--input-std", "6"]
    )
    out = capsys.readouterr().out
    assert status == 0
    report = json.loads(path.read_text())
    assert report["input_std"] == 6 and "inputs N(0, 6^2)" in out
    if backend == "cpu":
        from lipkern import _C

        build = {"capability": _C.cpu_capability(), "16bit_method": _C.cpu_16bit_method()}
        assert report["cpu_kernel_build"] == build
        assert f"C++ build {build['capability']} (16-bit: {build['16bit_method']})" in out
    assert [c["shape"] for c in report["cpu"]] == ["64x32", "nchw_cl:2x8x4x4"]
    for config in report["cpu"]:
        ops = {row["op"] for row in config["comparisons"]}
        assert ops == {"fwd", "stats", "bwd", "fwd+bwd", "inplace"}
        assert all(row["speedup"] > 0 for row in config["comparisons"])
        # One row per kind, against its fastest member: the hand-written remap is a candidate.
        fwd_eager = [r for r in config["comparisons"] if (r["op"], r["kind"]) == ("fwd", "eager")]
        assert len(fwd_eager) == 1 and fwd_eager[0]["baseline"] in ("hand fwd", "ref fwd")
        times = config["times_ms"]
        assert fwd_eager[0]["baseline_ms"] == min(times["hand fwd"], times["ref fwd"])
    targets = [r for c in report["cpu"] for r in c["comparisons"] if r["target"]]
    assert {(r["op"], r["kind"]) for r in targets} >= {("fwd", "act"), ("inplace", "copy_")}
    assert "fastest baseline" in out and "target: the project's goal" in out
    assert ("no CUDA device" in out) != torch.cuda.is_available()


def test_bench_ratios_in_one_unit_and_noise_flagged():
    assert bench.speedup_text(2.5) == "2.50x faster"
    assert bench.speedup_text(0.8) == "1.25x slower"
    steady = bench.summarise([1.0, 1.01, 0.99, 1.0])
    noisy = bench.summarise([1.0, 2.0, 0.5, 1.5])
    assert steady.spread < bench.NOISY_SPREAD < noisy.spread
    times = {"lipkern fwd": steady, "hand fwd": noisy, "ref fwd": bench.Timing(9.0, 0.0)}
    (row,) = bench.compare(times)
    assert row["baseline"] == "hand fwd" and row["noisy"]
    text = bench.format_rows([{"shape": "s", "dtype": "fp32", "comparisons": [row]}])
    assert "warning: NOISY in 1 row(s)" in text


def test_compiled_baselines_leave_the_global_compile_settings_alone():
    """The compiled backward baseline runs its retained graph again, which needs buffer donation
    off; that must hold for those graphs only, not for the user's process afterwards."""
    before = torch._functorch.config.donated_buffer
    fns = bench.candidates(bench.parse_shape("16x8"), torch.float32, "relu", compile_baselines=True)
    assert torch._functorch.config.donated_buffer == before
    for _ in range(2):
        (grad,) = fns["compile(hand) bwd"]()
        assert grad.shape == (16, 8)


def test_bench_refuses_empty_shapes():
    with pytest.raises(ValueError, match="every size must be >= 1"):
        bench.Shape("0x0", (0, 0), -1)


def test_sweep_writes_png_and_json(tmp_path, capsys):
    backend = "cpu" if "cpu" in lipkern.available_backends() else "reference"
    out = tmp_path / "sweep"
    status = cli.main(
        ["bench", "--sweep", "--sweep-max", "2^12", "--no-compile", "--min-time", "0.005",
         "--backend", backend, "--out", str(out), "--input-std", "3"]
    )
    assert status == 0
    report = json.loads((out / "sweep.json").read_text())
    assert report["input_std"] == 3
    assert [p["elements"] for p in report["points"]] == [2**10, 2**12]
    assert set(report["panels"]) == {"fwd", "fwd+stats", "bwd"}
    assert all(p["GB/s"]["lipkern bwd"] > 0 for p in report["points"])
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "2^12" in capsys.readouterr().out


def test_sweep_times_the_compiled_baselines(tmp_path):
    """The sweep compiles its baselines for dynamic shapes, whose backward donates buffers unless
    told not to while timing: the backward-only baselines run one retained graph again."""
    out = tmp_path / "sweep"
    status = cli.main(["bench", "--sweep", "--sweep-max", "2^10", "--min-time", "0.005", "--out", str(out)])
    assert status == 0
    (point,) = json.loads((out / "sweep.json").read_text())["points"]
    assert point["GB/s"]["compile(hand) bwd"] > 0 and point["GB/s"]["compile(ref) bwd"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sweep-min", "2^14", "--sweep-max", "2^12"], "--sweep-min 2\\^14 is above"),
        (["--shape", "64x64"], "cannot take --shape"),
        (["--quick", "--dtype", "fp32", "--dtype", "bf16"], "cannot take --quick, a second"),
    ],
)
def test_sweep_refuses_options_it_would_ignore(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--sweep", "--out", str(tmp_path / "sweep"), *extra])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "sweep").exists()


def test_sweep_options_need_the_sweep(capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("a bench ran with options it ignores"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--sweep-min", "2^12", "--sweep-step", "1"])
    assert exit_info.value.code == 2
    assert "--sweep-min, --sweep-step: only with --sweep" in capsys.readouterr().err


def test_eval_subcommand_is_lazy_and_forwarded(monkeypatch):
    seen = {}

    def add_eval_parser(subparsers):
        p = subparsers.add_parser("eval")
        p.add_argument("--model")

    def run_eval(args):
        seen["model"] = args.model
        return 3

    fake = types.ModuleType("lipkern.eval.cli_eval")
    fake.add_eval_parser, fake.run_eval = add_eval_parser, run_eval
    monkeypatch.setitem(sys.modules, "lipkern.eval.cli_eval", fake)
    assert cli.main(["eval", "--model", "wrn"]) == 3
    assert seen == {"model": "wrn"}


def test_python_m_lipkern_sets_interpreter_and_skips_eval_imports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import sys, json, io, contextlib\n"
        "from lipkern.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    status = main(['verify', '--quick', '--op', 'fwd', '--act', 'relu', '--dtype', 'fp32',"
        " '--json', '-'])\n"
        "report = json.loads(buf.getvalue())\n"
        "print(json.dumps({'status': status, 'backends': report['backends'],"
        " 'heavy': [m for m in ('matplotlib', 'autoattack') if m in sys.modules]}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["heavy"] == []
    if not torch.cuda.is_available():
        assert "triton@cpu" in summary["backends"]
    help_text = subprocess.run(
        [sys.executable, "-m", "lipkern", "--help"], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )
    assert help_text.returncode == 0
    assert all(cmd in help_text.stdout for cmd in ("verify", "bench", "eval"))


@pytest.mark.parametrize("text,sizes,channel_dim,cl", [
    ("4096x1024", (4096, 1024), -1, False),
    ("nlc:2x3x4", (2, 3, 4), -1, False),
    ("nchw_cl:2x3x4x5", (2, 3, 4, 5), 1, True),
])
def test_parse_shape(text, sizes, channel_dim, cl):
    from lipkern.tools.bench import parse_shape

    shape = parse_shape(text)
    assert (shape.sizes, shape.channel_dim, shape.channels_last) == (sizes, channel_dim, cl)
    assert shape.make(torch.bfloat16).is_contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format
    )


def test_bench_inputs_take_the_standard_deviation_asked_for(capsys):
    shape = bench.parse_shape("256x64")
    assert torch.equal(shape.make(torch.float32, std=8.0), shape.make(torch.float32) * 8)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--quick", "--input-std", "0"])
    assert "--input-std" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt is Linux-only")
def test_bench_pins_the_allocator():
    from lipkern.tools import bench

    assert bench.steady_allocator() is True


def _refuse_work(monkeypatch):
    def work(*args, **kwargs):
        raise AssertionError("the command started its work before checking its arguments")

    monkeypatch.setattr(verify, "run_verify", work)
    monkeypatch.setattr(bench, "run", work)
    monkeypatch.setattr(sweep, "run", work)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify", "--json", "/missing/dir/x.json"], "does not exist"),
        (["verify", "--json", "."], "is a directory"),
        (["bench", "--json", "/missing/dir/x.json"], "does not exist"),
        (["bench", "--shape=-1x5"], "every size must be >= 1"),
        (["bench", "--shape", "4096xabc"], "sizes must be integers"),
        (["bench", "--min-time", "-1"], "must be > 0"),
        (["bench", "--min-time", "nan"], "must be > 0"),
        (["bench", "--threads", "0"], "must be > 0"),
        (["bench", "--batch", "0"], "must be > 0"),
        (["bench", "--shape", "0x0"], "every size must be >= 1"),
        (["bench", "--sweep", "--sweep-max", "1000"], "must be a power of two >= 2^10"),
        (["bench", "--sweep", "--sweep-max", "2^x"], "expected a number of elements"),
        (["bench", "--sweep", "--out", "/missing/dir/out"], "does not exist"),
    ],
)
def test_bad_arguments_fail_before_any_work(monkeypatch, capsys, argv, message):
    _refuse_work(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err



@pytest.mark.parametrize("cores, threads, load, seconds, warned", [
    (2, 1, 0.8, 0, False),     # another process on the core torch leaves free
    (2, 1, 1.7, 0, True),      # ... and more, on torch's core too
    (2, 1, 1.8, 600, False),   # read after a long run: its own thread counts in full
    (2, 1, 1.8, 10, True),     # after 10 s the average holds 15 % of it: others compete
    (2, 2, 0.7, 0, True),      # every core is torch's: any other process competes
    (16, 4, 8.0, 0, False),
])
def test_busy_warning_counts_the_cores_torch_leaves_free(monkeypatch, capsys, cores, threads,
                                                        load, seconds, warned):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    bench.warn_if_busy(load, seconds_of_this_run=seconds)
    assert ("timings are unreliable" in capsys.readouterr().out) == warned


def test_bench_does_not_time_the_triton_interpreter(capsys):
    """bench times CPU tensors, which Triton runs only in its interpreter (Python, hundreds of
    times slower than any kernel): refused, pointing at the GPU timings."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--quick", "--backend", "triton"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'triton'" in capsys.readouterr().err


def test_verify_checks_a_name_given_twice_once(capsys):
    status, out = _verify(capsys, "--op", "fwd", "--op", "fwd", "--act", "relu", "--act", "relu",
                          "--dtype", "fp32", "--backend", "reference")
    rows = [line for line in out.splitlines() if line.startswith("fwd ")]
    assert status == 0 and len(rows) == len(set(rows)) and rows, out


def test_verify_counts_one_check_in_the_singular(capsys):
    status, out = _verify(capsys, "--op", "fwd", "--act", "relu")
    assert status == 0 and "\n1 check, 0 FAIL" in out, out


@pytest.mark.parametrize("seed", [verify.SEEDS.start, verify.SEEDS.stop - 1])
def test_verify_runs_at_either_end_of_the_seed_range(capsys, seed):
    status, out = _verify(capsys, "--op", "fwd", "--act", "relu", "--seed", str(seed))
    assert status == 0, out


@pytest.mark.parametrize(
    "seed", ["99999999999999999999", str(verify.SEEDS.stop), str(verify.SEEDS.start - 1)]
)
def test_verify_refuses_a_seed_out_of_range_before_any_work(monkeypatch, capsys, seed):
    _refuse_work(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["verify", "--quick", "--seed", seed])
    assert exit_info.value.code == 2
    assert f"argument --seed: must be between {verify.SEEDS.start} and" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc, where mkdir fails")
def test_sweep_refuses_an_out_directory_it_cannot_create_before_any_work(monkeypatch, capsys):
    # /proc/nope passes every check short of creating it; the sweep must not time first.
    _refuse_work(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--sweep", "--sweep-max", "2^14", "--out", "/proc/nope"])
    assert exit_info.value.code == 2
    assert "--out '/proc/nope': cannot create the directory" in capsys.readouterr().err
