"""The Triton backend on a real GPU: numerics, the ``lipkern::*`` CUDA kernels, autograd,
``torch.compile``, ``torch.export``, int64 indexing. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

import lipkern
from lipkern.ops import reference
from lipkern.ops.api import normalise_arguments
from lipkern.testing import (
    compare_backward,
    compare_forward,
    compare_stats,
    special_values,
)
from lipkern.ulp import same_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTS = lipkern.ACTIVATIONS
# (shape, channel_dim, channels_last): [rows, C], NCHW, channels_last NCHW, odd sizes.
LAYOUTS = [((257, 192), -1, False), ((3, 24, 56, 56), 1, False), ((3, 24, 56, 56), 1, True),
           ((5, 7, 49), 1, False), ((70_001, 3), -1, False)]


def _x(shape, dtype, channels_last=False, scale=3.0):
    x = (torch.randn(shape, device="cuda") * scale).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _params(channels, per_channel, with_center):
    t = torch.rand(channels, device="cuda") if per_channel else torch.tensor(0.6, device="cuda")
    c = (torch.randn(channels, device="cuda") * 0.3) if with_center else None
    return t, c


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("with_center", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_forward_stats_backward_match_reference(act, dtype, with_center, per_channel, layout):
    shape, channel_dim, channels_last = layout
    x = _x(shape, dtype, channels_last)
    threshold, center = _params(shape[channel_dim], per_channel, with_center)
    t, c, d = normalise_arguments(x, threshold, act, center, channel_dim)

    y = lipkern.remap_act(x, threshold, act, center, channel_dim, backend="triton")
    assert y.stride() == x.stride()
    comparison = compare_forward(y, x, t, c, act, d)
    assert comparison.ok, comparison

    y_stats, stats = lipkern.remap_act_stats(x, threshold, act, center, channel_dim,
                                             backend="triton")
    assert same_bits(y_stats, y).all()
    comparison = compare_stats(stats, x, t, c, act, d)
    assert comparison.ok, comparison

    for straight_through in (False, True):
        grad_y = torch.randn(shape, device="cuda").to(dtype)
        dx = torch.ops.lipkern.remap_act_backward(grad_y, x, t, c, act, d, straight_through)
        comparison = compare_backward(dx, grad_y, x, t, c, act, d, straight_through)
        assert comparison.ok, comparison


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1e30, float("inf")])
@pytest.mark.parametrize("center", [None, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_special_values(act, dtype, center, threshold):
    """NaN stays NaN, +-inf pass, -0, subnormals, the largest values, exact ties, thresholds 0 to
    inf (lipkern.testing.special_values), forward, statistics and backward: where libdevice,
    PTX conversions and FMA contraction can part from the interpreter's float64 formulas."""
    nonfinite, finite = special_values(dtype)
    x = torch.tensor((nonfinite + finite) * 3).to(dtype).reshape(3, -1).cuda()
    t, c, d = normalise_arguments(x, threshold, act, center, -1)
    y = lipkern.remap_act(x, threshold, act, center, -1, backend="triton")
    comparison = compare_forward(y, x, t, c, act, d)
    assert comparison.ok, comparison
    y_stats, stats = lipkern.remap_act_stats(x, threshold, act, center, -1, backend="triton")
    assert same_bits(y_stats, y).all()
    comparison = compare_stats(stats, x, t, c, act, d)
    assert comparison.ok, comparison
    grad_y = torch.randn(x.shape, device="cuda").to(dtype)
    for straight_through in (False, True):
        dx = torch.ops.lipkern.remap_act_backward(grad_y, x, t, c, act, d, straight_through)
        comparison = compare_backward(dx, grad_y, x, t, c, act, d, straight_through)
        assert comparison.ok, comparison


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_and_autograd(dtype):
    x = _x((64, 3, 17, 17), dtype, channels_last=True)
    threshold = torch.rand(3, device="cuda")
    expected = lipkern.remap_act(x, threshold, "silu", None, 1, backend="triton")
    inplace = x.clone()
    assert lipkern.remap_act_(inplace, threshold, "silu", None, 1, backend="triton") is inplace
    assert same_bits(inplace, expected).all()

    leaf = x.clone().requires_grad_(True)
    y = lipkern.remap_act(leaf, threshold, "gelu", None, 1, backend="triton")
    grad_y = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, leaf, grad_y)
    t, c, d = normalise_arguments(x, threshold, "gelu", None, 1)
    assert compare_backward(dx, grad_y, x, t, c, "gelu", d, False).ok


def test_auto_backend_on_cuda_is_triton_and_ops_are_registered():
    x = _x((128, 64), torch.float16)
    y_auto = lipkern.remap_act(x, 0.5, "relu")
    y_triton = lipkern.remap_act(x, 0.5, "relu", backend="triton")
    assert same_bits(y_auto, y_triton).all()
    for op in ("remap_act", "remap_act_backward", "remap_act_stats", "remap_act_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lipkern::{op}", "CUDA")


def test_opcheck():
    x = _x((32, 48), torch.bfloat16)
    t, c = _params(48, True, True)
    for op, args in (
        (torch.ops.lipkern.remap_act.default, (x, t, c, "gelu", 1, False)),
        (torch.ops.lipkern.remap_act_stats.default, (x, t, c, "gelu", 1)),
        (torch.ops.lipkern.remap_act_backward.default, (torch.randn_like(x), x, t, c, "gelu", 1,
                                                        False)),
    ):
        torch.library.opcheck(op, args)


def test_compile_fullgraph_and_export():
    x = _x((64, 256), torch.bfloat16)
    threshold = torch.rand(256, device="cuda")

    def f(x):
        return lipkern.remap_act(x, threshold, "gelu", backend="triton") * 2

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True)(x)
    assert same_bits(compiled, eager).all()

    class M(torch.nn.Module):
        def forward(self, x):
            return f(x)

    exported = torch.export.export(M(), (x,))
    assert "lipkern.remap_act" in str(exported.graph)
    assert same_bits(exported.module()(x), eager).all()


def test_ten_million_bf16_scan_and_determinism():
    rows, channels = 2_500_000, 4
    x = torch.ones(rows, channels, dtype=torch.bfloat16, device="cuda")
    x[::2, 1] = 2.0
    x[::5, 3] = 0.25
    _, stats = lipkern.remap_act_stats(x, 0.5, "identity", backend="triton")
    assert stats.count.tolist() == [rows] * channels
    assert stats.remapped.tolist() == [0, 0, 0, rows // 5]
    expected = [rows * 1.0, rows * 1.5, rows * 1.0, rows * 0.8 + rows // 5 * 0.25]
    assert stats.sum.tolist() == pytest.approx(expected, rel=1e-12)
    noisy = torch.randn(rows, channels, device="cuda").to(torch.bfloat16)
    _, first = lipkern.remap_act_stats(noisy, 0.5, "gelu", backend="triton")
    _, second = lipkern.remap_act_stats(noisy, 0.5, "gelu", backend="triton")
    for name in ("amax", "remapped", "sum", "sumsq"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_int64_offsets_past_two_to_the_31():
    free, _ = torch.cuda.mem_get_info()
    numel = 2**31 + 4096
    if free < 3 * numel * 2:
        pytest.skip("needs about 13 GB of free GPU memory")
    x = torch.full((numel // 4, 4), -1.0, dtype=torch.bfloat16, device="cuda")
    x[-1] = 3.0
    y, stats = lipkern.remap_act_stats(x, 0.5, "relu", backend="triton")
    assert y[-1].tolist() == [3.0] * 4 and y[0].tolist() == [0.0] * 4
    assert stats.count.tolist() == [numel // 4] * 4
    assert stats.amax.tolist() == [3.0] * 4
    # Every relu(-1) = 0 is within t of 0, so all but the last row are remapped.
    assert stats.remapped.tolist() == [numel // 4 - 1] * 4
    del y
    lipkern.remap_act_(x, 0.5, "relu", backend="triton")
    assert x[-1].tolist() == [3.0] * 4 and x[-2].tolist() == [0.0] * 4


def test_tensors_on_a_device_other_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    x = torch.randn(64, 32, device="cuda:1")
    with torch.cuda.device(0):
        y, stats = lipkern.remap_act_stats(x, 0.5, "relu", backend="triton")
    t, c, d = normalise_arguments(x, 0.5, "relu", None, 1)
    assert same_bits(y, reference.remap_act_reference(x, t, c, "relu", d)).all()
    assert stats.count.device == x.device
