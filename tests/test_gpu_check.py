"""The GPU validation kit (scripts/gpu_check.sh) checked without a GPU: its arguments, the
set-up of the running environment, the collection of the GPU tests and the benchmark through
the Triton interpreter (``--dry-run``)."""

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")


def _run(args, **env):
    return subprocess.run(
        ["bash", SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize("args, message", [
    ([], "usage: bash scripts/gpu_check.sh OUTDIR"),
    (["--dry-run"], "usage: bash scripts/gpu_check.sh OUTDIR"),
    (["out", "--fast"], "unknown argument '--fast'"),
])
def test_bad_arguments_are_refused_before_any_set_up(args, message):
    result = _run(args)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
def test_benchmark_without_a_gpu_asks_for_the_dry_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lipkern.tools.gpu_check", str(tmp_path)], cwd=REPO,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "no CUDA device" in result.stderr
    assert "--dry-run" in result.stderr and not (tmp_path / "gpu_bench.json").exists()


def test_dry_run_sets_up_collects_and_benchmarks(tmp_path):
    out = tmp_path / "out"
    # The running environment stands in for .venv; nothing may be installed into it.
    result = _run([str(out), "--dry-run"], LIPKERN_VENV=sys.prefix, LIPKERN_NO_INSTALL="1")
    if result.returncode == 3 and "LIPKERN_NO_INSTALL" in result.stderr:
        pytest.skip(f"the running environment is not one scripts/run.sh set up: {result.stderr}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tests collected" in (out / "gpu_tests.log").read_text()
    report = json.loads((out / "gpu_bench.json").read_text())
    assert set(report["dtypes"]) == {"bf16", "fp16", "fp32"}
    for result_of_dtype in report["dtypes"].values():
        assert set(result_of_dtype["ops"]) == {"fwd", "fwd+stats", "bwd", "in-place"}
        for figures in result_of_dtype["ops"].values():
            assert figures["lipkern_GB/s"] > 0 and figures["fraction_of_copy"] > 0
            assert any(name.startswith("hand ") for name in figures["speedup"])
        assert set(result_of_dtype["tuning"]) == {"fwd", "bwd", "fwd+stats"}
