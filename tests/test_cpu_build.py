"""The build of the C++ extension: lipkern._C registers the CPU kernels of every lipkern op, is
compiled once per CPU capability, and honours LIPKERN_CPU_CAPABILITY and LIPKERN_CPU_16BIT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lipkern.ops.library  # noqa: F401  (defines the op schemas)

_C = pytest.importorskip("lipkern._C", reason="lipkern's C++ extension is not built")

ROOT = Path(__file__).resolve().parents[1]
OPS = ("remap_act", "remap_act_backward", "remap_act_stats", "remap_act_")


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_is_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lipkern::{op}", "CPU")


def test_every_capability_has_a_wrapper_source():
    """setup.py compiles csrc/remap_act_kernels.cpp once per capability through these wrappers."""
    for cap in ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16"):
        wrapper = ROOT / "csrc" / "capability" / f"remap_act_kernels.{cap}.cpp"
        assert wrapper.is_file()
        assert '#include "../remap_act_kernels.cpp"' in wrapper.read_text()


def _in_subprocess(variable, value, report):
    env = dict(os.environ, **{variable: value})
    return subprocess.run(
        [sys.executable, "-c", f"import lipkern._C as C; print(C.{report}())"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def _capability_in_subprocess(value):
    return _in_subprocess("LIPKERN_CPU_CAPABILITY", value, "cpu_capability")


@pytest.mark.parametrize("spelling", ["DEFAULT", "default", "Default"])
def test_environment_override_selects_the_build(spelling):
    """In any case: ATen's ATEN_CPU_CAPABILITY spells the builds in lower case."""
    result = _capability_in_subprocess(spelling)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "DEFAULT"


def test_bad_environment_override_is_a_clear_error():
    result = _capability_in_subprocess("AVX9000")
    assert result.returncode != 0
    assert "LIPKERN_CPU_CAPABILITY" in result.stderr


@pytest.mark.parametrize("command", [["verify", "--quick", "--act", "relu"],
                                     ["bench", "--quick", "--act", "relu"]])
@pytest.mark.parametrize("variable, value", [("LIPKERN_CPU_CAPABILITY", "AVX9000"),
                                             ("LIPKERN_CPU_16BIT", "fastest")])
def test_the_command_line_refuses_a_bad_override_once_before_any_work(command, variable, value):
    """Said once, exit 2, rather than as a failure of every check (verify) or a traceback
    (bench)."""
    result = subprocess.run(
        [sys.executable, "-m", "lipkern", *command], env=dict(os.environ, **{variable: value}),
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"lipkern {command[0]}: lipkern: {variable}")
    assert "Traceback" not in result.stderr and result.stdout == ""


def _avx512_in_use():
    return _C.cpu_capability().startswith("AVX512")


@pytest.mark.parametrize("method", ["grid", "table"])
def test_environment_override_selects_the_16bit_method(method):
    if method == "grid" and not _avx512_in_use():
        pytest.skip("only the AVX-512 builds compute the 16-bit smooth activations on the grid")
    result = _in_subprocess("LIPKERN_CPU_16BIT", method, "cpu_16bit_method")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == method


def test_bad_16bit_method_override_is_a_clear_error():
    result = _in_subprocess("LIPKERN_CPU_16BIT", "fastest", "cpu_16bit_method")
    assert result.returncode != 0
    assert "LIPKERN_CPU_16BIT" in result.stderr and "'grid', 'table' or 'auto'" in result.stderr


def test_help_works_whatever_the_override():
    result = subprocess.run(
        [sys.executable, "-m", "lipkern", "bench", "--help"],
        env=dict(os.environ, LIPKERN_CPU_CAPABILITY="AVX9000"), capture_output=True, text=True,
        cwd=ROOT, timeout=120,
    )
    assert result.returncode == 0 and "--backend" in result.stdout, result.stderr
