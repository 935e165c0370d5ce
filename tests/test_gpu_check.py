"""The GPU validation kit (scripts/gpu_check.sh) checked without a GPU: its arguments, the
set-up of the running environment, the collection of the GPU tests and the benchmark through
the Triton interpreter (``--dry-run``)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")


def _run(args, script=SCRIPT, **env):
    return subprocess.run(
        ["bash", script, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
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
    _check_report(out)
    assert f"torch {torch.__version__}" in (out / "environment.txt").read_text()


def _check_report(out):
    report = json.loads((out / "gpu_bench.json").read_text())
    assert set(report["dtypes"]) == {"bf16", "fp16", "fp32"}
    for result_of_dtype in report["dtypes"].values():
        assert set(result_of_dtype["ops"]) == {"fwd", "fwd+stats", "bwd", "in-place"}
        for figures in result_of_dtype["ops"].values():
            assert figures["lipkern_GB/s"] > 0 and figures["fraction_of_copy"] > 0
            assert any(name.startswith("hand ") for name in figures["speedup"])
        assert set(result_of_dtype["tuning"]) == {"fwd", "bwd", "fwd+stats"}


def _repository_without_the_extension(root):
    """The files the kit reads, without the compiled C++ extension (as on a GPU machine that
    received the repository alone)."""
    ignore = shutil.ignore_patterns("_C.*.so", "__pycache__")
    for folder in ("lipkern", "scripts"):
        shutil.copytree(os.path.join(REPO, folder), root / folder, ignore=ignore)
    (root / "tests").mkdir()
    for name in ("conftest.py", "test_triton_gpu.py"):
        shutil.copy(os.path.join(REPO, "tests", name), root / "tests")
    shutil.copy(os.path.join(REPO, "pyproject.toml"), root)
    return root / "scripts" / "gpu_check.sh"


def test_a_given_python_runs_the_kit_without_set_up_or_extension(tmp_path):
    """LIPKERN_GPU_PYTHON (or a python3 with triton and a GPU) is used as it is: nothing is
    installed or built, and the Triton path runs without the C++ extension. The Python given
    runs without site (-S), its packages on PYTHONPATH: an editable install of this
    repository would otherwise bring the extension back through its import hook."""
    script = _repository_without_the_extension(tmp_path / "repo")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    packages = os.path.dirname(os.path.dirname(torch.__file__))
    out = tmp_path / "out"
    result = _run([str(out), "--dry-run"], script=str(script), LIPKERN_GPU_PYTHON=str(python),
                  LIPKERN_NO_INSTALL="1", PYTHONPATH=packages)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "repo" / ".venv").exists()
    assert "extension (the CPU kernels): not built" in (out / "environment.txt").read_text()
    assert "tests collected" in (out / "gpu_tests.log").read_text()
    _check_report(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
def test_the_kit_stops_before_the_tests_when_torch_sees_no_gpu(tmp_path):
    out = tmp_path / "out"
    result = _run([str(out)], LIPKERN_GPU_PYTHON=sys.executable)
    assert result.returncode == 4 and "sees no CUDA GPU" in result.stderr
    assert f"torch {torch.__version__}" in (out / "environment.txt").read_text()
    assert not (out / "gpu_tests.log").exists()
