"""Triton backend specifics on CPU tensors through the interpreter: bfloat16 bit handling,
launch geometry, determinism of the statistics, errors, registration, static figures.

The op-level equivalence with the reference is tests/test_ops.py (parametrised over backends).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lipkern
from lipkern.ulp import same_bits

pytest.importorskip("triton")
triton_kernels = pytest.importorskip("lipkern.ops.triton_kernels")
if not (triton_kernels.INTERPRETED or torch.cuda.is_available()):
    pytest.skip("needs the Triton interpreter or a GPU", allow_module_level=True)

from lipkern.tools import traffic  # noqa: E402

DEVICE = "cpu" if triton_kernels.INTERPRETED else "cuda"


def test_bfloat16_every_bit_pattern_round_trips():
    """The interpreter mis-reads bf16 subnormals; the kernels decode the bits themselves."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.bfloat16).to(DEVICE)
    y = lipkern.remap_act(x, 0.0, "identity", backend="triton")
    assert same_bits(y, x).all()


def test_bfloat16_stores_round_to_nearest_even():
    """The interpreter truncates float32 -> bf16; the kernels round like PyTorch.

    The identity backward with straight-through stores a float32 dy into x's dtype.
    """
    halfway = (torch.arange(0, 2**16, dtype=torch.int32) << 16) | 0x8000  # exact ties
    above = halfway + 1
    below = halfway - 1
    random = torch.randint(-(2**31), 2**31 - 1, (2**16,), dtype=torch.int32)
    dy = torch.cat([halfway, above, below, random]).view(torch.float32).to(DEVICE)
    x = torch.zeros(dy.shape, dtype=torch.bfloat16, device=DEVICE)
    dx = torch.ops.lipkern.remap_act_backward.default if DEVICE == "cuda" else None
    t = torch.tensor(0.0, device=DEVICE)
    if dx is None:
        dx = triton_kernels.remap_backward(dy, x, t, None, "identity", 0, True)
    else:
        dx = dx(dy, x, t, None, "identity", 0, True)
    assert same_bits(dx, dy.to(torch.bfloat16)).all()


def test_tile_shapes_avoid_masked_lanes_and_tiny_programs():
    config = triton_kernels.GPU_CONFIG

    def tile(rows, cols):
        return triton_kernels.tile_shape(rows, cols, config.tile, config.max_block_k)

    assert tile(12288, 3136) == (64, 64)  # NCHW 56x56: 3136 = 49 x 64, no masked lane
    assert tile(100000, 192) == (64, 64)  # 192 = 3 x 64
    assert tile(16384, 1024) == (16, 256)
    assert tile(10000, 3) == (1024, 4)
    assert tile(6, 33667) == (8, 256)  # few long rows: wide tiles, not 16-wide slivers
    interpreted = triton_kernels.INTERPRETER_CONFIG
    assert triton_kernels.tile_shape(6, 33667, interpreted.tile, interpreted.max_block_k) == (
        8, 8192)


def test_stats_partition_depends_on_the_shape_only():
    layout = triton_kernels.LAYOUT_COLS
    first = triton_kernels.stats_partition(layout, 16384, 1024, 1024, triton_kernels.GPU_CONFIG)
    assert first == triton_kernels.stats_partition(layout, 16384, 1024, 1024,
                                                   triton_kernels.GPU_CONFIG)
    block_r, block_k, span, n_parts, grid = first
    # At least 512 rows per program keep the workspace traffic near 0.1 byte per element.
    assert span >= 512 and span % block_r == 0 and n_parts * span >= 16384
    assert grid == (n_parts * (1024 // block_k),)


def test_stats_parts_are_capped_for_the_finaliser():
    """The finaliser walks a channel's parts serially: a tall [rows, C] gets at most
    STATS_MAX_PARTS parts, each a whole number of tiles, covering every row."""
    layout, rows = triton_kernels.LAYOUT_COLS, 1 << 24
    block_r, _, span, n_parts, _ = triton_kernels.stats_partition(
        layout, rows, 64, 64, triton_kernels.GPU_CONFIG)
    assert n_parts <= triton_kernels.STATS_MAX_PARTS and span % block_r == 0
    assert n_parts * span >= rows > (n_parts - 1) * span


@pytest.mark.parametrize("max_parts", [triton_kernels.STATS_MAX_PARTS, 3])
@pytest.mark.parametrize("shape, channel_dim, how", [
    ((5000, 200), -1, "contiguous"), ((9000, 130), -1, "contiguous"),
    ((3000, 4, 50), 1, "contiguous"), ((40, 24, 9, 9), 1, "channels_last"),
])
def test_gpu_launch_shapes_run_exactly_under_the_interpreter(monkeypatch, shape, channel_dim, how,
                                                            max_parts):
    """The GPU's tiles and statistics partition (several column blocks, 512-row parts, a ragged
    last part; with the part cap binding too), run by the interpreter: ReLU's forward, backward
    and statistics are the reference's, the sums within float64 rounding."""
    from lipkern.ops import reference
    from lipkern.ops.api import normalise_arguments
    from lipkern.testing import lay_out

    monkeypatch.setattr(triton_kernels, "CONFIG", triton_kernels.GPU_CONFIG)
    monkeypatch.setattr(triton_kernels, "STATS_MAX_PARTS", max_parts)
    x = lay_out(torch.randn(shape) * 3, how)
    channels = shape[channel_dim]
    t, c, d = normalise_arguments(x, torch.rand(channels), "relu", torch.randn(channels) * 0.3,
                                  channel_dim)
    parts = triton_kernels.stats_partition(*triton_kernels._geometry(x, d)[1:])[3]
    assert parts > 1 and parts <= max_parts
    y_ref, *stats_ref = reference.remap_act_stats_reference(x, t, c, "relu", d)
    y, *stats = triton_kernels.remap_stats(x, t, c, "relu", d)
    assert same_bits(y, y_ref).all()
    assert same_bits(triton_kernels.remap_forward(x, t, c, "relu", d), y_ref).all()
    for got, want in zip(stats[:3], stats_ref[:3]):
        assert torch.equal(got, want)
    for got, want in zip(stats[3:], stats_ref[3:]):
        assert torch.allclose(got, want, rtol=1e-12, atol=0)
    grad_y = torch.randn(shape)
    assert same_bits(triton_kernels.remap_backward(grad_y, x, t, c, "relu", d, False),
                     reference.remap_act_backward_reference(grad_y, x, t, c, "relu", d, False)).all()


@pytest.mark.parametrize("shape, channel_dim, how", [
    ((301, 17), -1, "contiguous"), ((4, 6, 9, 5), 1, "contiguous"),
    ((4, 6, 9, 5), 1, "channels_last"), ((40, 12), 0, "transposed"),
])
def test_stats_are_deterministic_and_exact_for_relu(shape, channel_dim, how):
    x = torch.randn(shape, device=DEVICE) * 3
    if how == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif how == "transposed":
        x = torch.randn(shape[::-1], device=DEVICE).t()
    x[(0,) * x.dim()] = float("nan")  # channel 0's statistics must turn NaN
    _, first = lipkern.remap_act_stats(x, 0.7, "relu", None, channel_dim, backend="triton")
    _, second = lipkern.remap_act_stats(x, 0.7, "relu", None, channel_dim, backend="triton")
    for name in ("amax", "remapped", "count", "sum", "sumsq"):
        assert same_bits(getattr(first, name).double(), getattr(second, name).double()).all()
    a = torch.relu(x.double()).movedim(channel_dim, -1).reshape(-1, shape[channel_dim])
    finite = a.isfinite().all(0)
    expected_sum = a.sum(0)
    assert ((first.sum - expected_sum).abs() <= 1e-12 * a.abs().sum(0))[finite].all()
    assert first.sum[~finite].isnan().all() and first.amax[~finite].isnan().all()


def test_inplace_on_a_strided_view_writes_through():
    base = torch.randn(16, 24, device=DEVICE)
    untouched = base[:, 1::2].clone()
    view = base[:, ::2]
    expected = lipkern.remap_act(view, 0.4, "relu", backend="reference")
    assert lipkern.remap_act_(view, 0.4, "relu", backend="triton") is view
    assert same_bits(base[:, ::2], expected).all()
    assert same_bits(base[:, 1::2], untouched).all()


def test_cuda_kernels_are_registered_on_the_ops():
    for op in ("remap_act", "remap_act_backward", "remap_act_stats", "remap_act_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lipkern::{op}", "CUDA")


def test_triton_is_listed_where_it_runs():
    assert "triton" in lipkern.available_backends(DEVICE)


def _run(code, env):
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def _env(**changes):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(changes)
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error")
def test_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch, lipkern\n"
        "assert 'triton' not in lipkern.available_backends('cpu')\n"
        "try:\n"
        "    lipkern.remap_act(torch.randn(4, 4), 0.5, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    proc = _run(code, _env())
    assert proc.returncode == 0, proc.stderr
    assert "TRITON_INTERPRET=1" in proc.stdout


def test_missing_triton_is_a_clear_error():
    code = (
        "import sys, torch\n"
        "sys.modules['triton'] = None  # as if triton were not installed\n"
        "import lipkern\n"
        "assert 'triton' not in lipkern.available_backends('cpu')\n"
        "try:\n"
        "    lipkern.remap_act(torch.randn(4, 4), 0.5, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    proc = _run(code, _env(TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stderr
    assert "needs the triton package" in proc.stdout


def test_static_traffic_figures():
    rows = {(r["kernel"], r["dtype"]): r
            for r in traffic.static_traffic(shape=(4096, 256), compiled=False)}
    for dtype, size in (("bfloat16", 2), ("float16", 2), ("float32", 4)):
        assert rows[("forward", dtype)]["triton_B_per_elem"] == pytest.approx(2 * size, rel=1e-3)
        assert rows[("backward", dtype)]["triton_B_per_elem"] == pytest.approx(3 * size, rel=1e-3)
        stats = rows[("forward+stats", dtype)]["triton_B_per_elem"]
        assert 2 * size < stats < 2 * size + 0.2
        for kernel in ("forward", "forward+stats", "backward", "in-place"):
            row = rows[(kernel, dtype)]
            assert row["eager_B_per_elem"] > row["triton_B_per_elem"]
    table = traffic.static_traffic_table(shape=(4096, 256), compiled=False)
    assert "3.35 TB/s" in table and "forward+stats" in table


def test_compiled_reference_byte_count():
    """inductor fuses the reference forward into one pass: 2 bytes per element in bf16 each way."""
    x = torch.randn(1024, 64).to(torch.bfloat16)
    t = torch.full((64,), 0.5)
    counted = traffic.compiled_bytes(
        lambda x: lipkern.ops.reference.remap_act_reference(x, t, None, "gelu", 1), x)
    assert counted / x.numel() == pytest.approx(4.0, rel=0.01)
