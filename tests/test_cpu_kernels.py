"""Checks specific to the C++ CPU kernels (lipkern._C): every compiled capability (DEFAULT, AVX2,
AVX512) against the reference, results independent of the thread count, and the layouts the
kernels walk without copying. The backend-parametrised suite is tests/test_ops.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import lipkern
from lipkern.ops import reference
from lipkern.ops.activations import ACTIVATIONS
from lipkern.testing import (
    activation_grad_float64,
    compare_backward,
    compare_forward,
    compare_stats,
)
from lipkern.ulp import same_bits

_C = pytest.importorskip("lipkern._C", reason="lipkern's C++ extension is not built")

ACTS = ACTIVATIONS
CAPABILITIES = ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _supported(capability):
    try:
        _C.set_cpu_capability(capability)
    except ValueError:
        return False
    return True


@pytest.fixture
def capability(request):
    """Run the test under one kernel build, restoring the initial choice afterwards. The
    build's per-parameter-set caches start empty, so the path each call takes (searched or not)
    depends on the test alone, not on the tests run before it."""
    initial = _C.cpu_capability()
    if not _supported(request.param):
        _C.set_cpu_capability(initial)
        pytest.skip(f"{request.param} is not compiled in or not supported by this CPU")
    _C.forget_parameter_sets()
    yield request.param
    _C.set_cpu_capability(initial)


@pytest.fixture
def sixteen_bit_method(request):
    """Run the test with the 16-bit smooth activations evaluated one way (set_cpu_16bit_method),
    restoring the earlier choice afterwards."""
    earlier = _C.set_cpu_16bit_method(request.param)
    yield request.param
    _C.set_cpu_16bit_method(earlier)


def _case(shape, channel_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    channels = shape[channel_dim]
    threshold = torch.rand(channels, generator=gen) * 0.8
    center = torch.randn(channels, generator=gen) * 0.3
    return x, threshold, center


def _ops(x, threshold, center, act, channel_dim):
    y = torch.ops.lipkern.remap_act(x, threshold, center, act, channel_dim, False)
    stats = torch.ops.lipkern.remap_act_stats(x, threshold, center, act, channel_dim)
    return y, stats


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_every_capability_matches_reference(capability, act, dtype):
    # 37 rows of 67 channels: ragged vector tails in both the row and the lanes walk.
    for shape, channel_dim in (((37, 67), 1), ((3, 67, 5, 7), 1)):
        x, threshold, center = _case(shape, channel_dim, dtype)
        y, stats = _ops(x, threshold, center, act, channel_dim)
        assert compare_forward(y, x, threshold, center, act, channel_dim).ok
        verdict = compare_stats(stats[1:], x, threshold, center, act, channel_dim)
        assert verdict.ok, verdict
        grad_y = torch.randn(shape).to(dtype)
        dx = torch.ops.lipkern.remap_act_backward(
            grad_y, x, threshold, center, act, channel_dim, False
        )
        assert compare_backward(dx, grad_y, x, threshold, center, act, channel_dim, False).ok


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
def test_capabilities_agree_bit_for_bit_on_exact_activations(capability):
    x, threshold, center = _case((64, 96), 1, torch.float32)
    for act in ("identity", "relu"):
        y, stats = _ops(x, threshold, center, act, 1)
        ref_y, *ref_stats = reference.remap_act_stats_reference(x, threshold, center, act, 1)
        assert torch.equal(y, ref_y)
        assert torch.equal(stats[1], ref_stats[0])


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_a_lane_does_not_depend_on_its_neighbours(capability, act):
    """Lanes off the fp32 grid are packed together, across the two vectors of a step, for their
    float64 evaluation (GELU's backward: its fp32 tail of the value, packed only where at most 16
    lanes of a step are off; its derivative there is evaluated in every lane). Vectors with
    every count of such lanes (0 to 16, so steps with 0 to 32), in shuffled places: each element
    must get the same bits wherever it sits, forward and backward, masked and not."""
    gen = torch.Generator().manual_seed(3)
    vectors = 17 * 8
    # |x| < 3 is on every activation's grid; 8 <= |x| < 20 is off all of them.
    on = torch.rand(vectors, 16, generator=gen) * 6 - 3
    sign = torch.randint(0, 2, (vectors, 16), generator=gen) * 2 - 1
    off = sign * (8 + torch.rand(vectors, 16, generator=gen) * 12)
    order = torch.rand(vectors, 16, generator=gen).argsort(dim=1)
    is_off = order < (torch.arange(vectors) % 17)[:, None]
    x = torch.where(is_off, off, on).reshape(1, 1, -1)
    g = torch.randn(x.shape, generator=gen)
    perm = torch.randperm(x.numel(), generator=gen)

    def shuffled(v):
        return v.reshape(-1)[perm].reshape(x.shape)

    for threshold in (torch.tensor([0.3]), torch.tensor([0.0])):
        y = torch.ops.lipkern.remap_act(x, threshold, None, act, 1, False)
        dx = torch.ops.lipkern.remap_act_backward(g, x, threshold, None, act, 1, False)
        y_perm = torch.ops.lipkern.remap_act(shuffled(x), threshold, None, act, 1, False)
        dx_perm = torch.ops.lipkern.remap_act_backward(
            shuffled(g), shuffled(x), threshold, None, act, 1, False
        )
        assert same_bits(y_perm, shuffled(y)).all()
        assert same_bits(dx_perm, shuffled(dx)).all()


def test_unknown_capability_is_a_clear_error():
    with pytest.raises(ValueError, match="capability"):
        _C.set_cpu_capability("SSE9")


def test_default_choice_is_reported():
    assert _C.cpu_capability() in CAPABILITIES


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
def test_16bit_method_is_chosen_reported_and_restored(capability):
    """'grid' and 'table' are taken as asked where the build computes on the grid (AVX-512;
    the others always read the tables); 'auto' settles on one of them, the same each time;
    set_cpu_16bit_method returns the choice it replaced; a wrong name says what is expected."""
    on_grid_build = capability.startswith("AVX512")
    earlier = _C.set_cpu_16bit_method("grid")
    try:
        assert _C.cpu_16bit_method() == ("grid" if on_grid_build else "table")
        assert _C.set_cpu_16bit_method("table") == "grid"
        assert _C.cpu_16bit_method() == "table"
        assert _C.set_cpu_16bit_method("auto") == "table"
        timed = _C.cpu_16bit_method()
        assert timed in (("grid", "table") if on_grid_build else ("table",))
        assert _C.cpu_16bit_method() == timed
        with pytest.raises(ValueError, match=r"set_cpu_16bit_method.*'grid', 'table' or 'auto'"):
            _C.set_cpu_16bit_method("fastest")
        assert _C.cpu_16bit_method() == timed
    finally:
        _C.set_cpu_16bit_method(earlier)


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["gelu", "relu", "identity"])
def test_stats_of_rows_over_many_tiles_and_blocks_equal_the_reference(capability, act, dtype):
    """Lanes-mode statistics walk tiles of rows, a chunk of channels at a time: a prime number of
    rows (blocks and tiles cut short) of 300 channels (a ragged last step), and 67 rows of 4010
    channels, two blocks whose channels are split between tasks in chunks of 512 (the last one
    ragged); with and without centres (the bit-pattern walk and the fp32 one for 16-bit ReLU and
    identity). The y of the statistics pass is checked as well as its statistics."""
    for shape in ((1031, 300), (67, 4010)):
        x, threshold, center = _case(shape, 1, dtype, seed=3)
        for c in (None, center):
            y, stats = _ops(x, threshold, c, act, 1)
            assert torch.equal(stats[0], y)
            assert compare_forward(y, x, threshold, c, act, 1).ok
            verdict = compare_stats(stats[1:], x, threshold, c, act, 1)
            assert verdict.ok, (shape, c is None, verdict)


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["identity", "relu", "gelu"])
def test_sums_outside_the_fp32_partials_range_equal_the_reference(capability, act, dtype):
    """The sums add at most 16 steps in fp32 before widening to float64 (csrc/cpu/stats_blocks.h,
    LaneSums). Large magnitudes overflow fp32 squares, so a chunk (a tile of rows, a run) whose
    max reaches the kernels' bound (2^59) has its sums redone with every step in float64: a
    channel of 2^62 (16 squares: 2^128, beyond fp32), one mixing 2^62 into ordinary values (in
    [rows, 2], 16-bit's tiles of 32 rows whose first 16 were widened before their 2^62: the redo
    must drop them), and one whose only 2^62 is its last value (the same in NCHW's one long run).
    Then a channel whose squares fall below fp32's normal range, and one that starts with 2^24
    and continues with 1.0: fp32 sums that went on past 16 terms would drop every later 1.0
    (2^-17 of the sum or more), 16-term ones drop at most 15 of them, within the rule (the lanes
    walk's partials across tiles: test_lanes_partial_sums_widen_within_64_rows). Each kind apart,
    so that no other kind's 2^62 redoes its chunks, in two channels ([rows, 1] is walked flat):
    [rows, 2] (the lanes walk) and NCHW (the row walk, 32 lanes per channel)."""
    rows = 4099
    base = torch.randn(rows, generator=torch.Generator().manual_seed(7))
    mixed = base.clone()
    mixed[::37] = 2.0**62
    late = base.clone()
    late[-1] = 2.0**62
    stall = torch.ones(rows)
    stall[0] = 2.0**24
    channels = (torch.full((rows,), 2.0**62), mixed, late, 3e-25 * base, stall)
    for values, threshold in zip(channels, (0.5, 0.5, 0.5, 1e-25, 0.5)):
        x = torch.stack([values, values], 1).to(dtype)
        threshold = torch.tensor([threshold, threshold])
        for case in (x, x.t().reshape(1, 2, rows, 1).contiguous()):
            for center in (None, torch.tensor([0.25, 0.25])):
                stats = torch.ops.lipkern.remap_act_stats(case, threshold, center, act, 1)
                verdict = compare_stats(stats[1:], case, threshold, center, act, 1)
                assert verdict.ok, (case.shape, float(values[1]), center is None, verdict)
                assert stats[5].isfinite().all()


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["identity", "relu", "gelu"])
def test_short_runs_of_large_values_equal_the_reference(capability, act, dtype):
    """A run of at most 11 steps that no large value redid adds its fp32 partials up in fp32
    (csrc/cpu/stats_blocks.h, kFp32FoldTerms): its squares must not overflow, whatever the bound
    that sends a run to float64. Planes of 7x7, 14x14, 176 and 352 elements (11 steps of AVX2 and
    DEFAULT, of AVX-512) of the largest values below 2^54 ... 2^66."""
    below_one = 1.0 - (2.0**-24 if dtype == torch.float32 else 2.0**-8)
    for plane in (49, 176, 196, 352):
        for k in range(54, 67):
            x = torch.full((2, 2, plane, 1), 2.0**k * below_one, dtype=torch.float64).to(dtype)
            threshold = torch.tensor([0.5, 0.5])
            for center in (None, torch.tensor([0.25, 0.25])):
                stats = torch.ops.lipkern.remap_act_stats(x, threshold, center, act, 1)
                verdict = compare_stats(stats[1:], x, threshold, center, act, 1)
                assert verdict.ok, (plane, k, center is None, verdict)
                assert stats[5].isfinite().all(), (plane, k)


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", ["identity", "relu", "gelu"])
def test_redone_tiles_keep_their_channels(capability, act, dtype):
    """A tile of the lanes walk whose max reaches the bound redoes its sums (bf16 lanes added even
    channels first and put back in order at the fold): distinct channels, 67 of them (a chunk of
    32, one of 32 and one of 3), one of which holds 2^62 (fp16: inf) in some of its tiles (fp32's
    tiles of 8 rows between them add up in fp32 partials), must each keep their own sums; and the
    same in 67 rows of 4010 channels, which tasks split in chunks of 512 (the large channel in the
    second)."""
    large = 2.0**62 if dtype != torch.float16 else float("inf")
    for rows, channels, large_channel in ((100, 67, 40), (67, 4010, 600)):
        x = torch.randn(rows, channels, generator=torch.Generator().manual_seed(3))
        x = x + torch.arange(channels) / 8
        x[5::23, large_channel] = large
        x = x.to(dtype)
        threshold = torch.rand(channels, generator=torch.Generator().manual_seed(4))
        for center in (None, torch.rand(channels, generator=torch.Generator().manual_seed(5))):
            stats = torch.ops.lipkern.remap_act_stats(x, threshold, center, act, 1)
            verdict = compare_stats(stats[1:], x, threshold, center, act, 1)
            assert verdict.ok, (rows, channels, center is None, verdict)


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_lanes_partial_sums_widen_within_64_rows(capability, act, dtype):
    """The lanes walk's fp32 partials (8-row tiles for fp32, adding up across 8 tiles; 32-row tiles
    for 16-bit, widened at once) reach float64 within 64 rows, so a channel of 2^15 and then
    2^-12s, each of which (and each tile's 8 of them: half an ulp, a tie rounded to even) the
    fp32 partial of 2^15 drops, loses at most the 2^-12s of its first 64 rows; every later one is
    added exactly. Partials widened every 9 tiles would lose 71 of them."""
    rows = 1000
    values = torch.full((rows,), 2.0**-12, dtype=torch.float64)
    values[0] = 2.0**15
    x = torch.stack([values, values], 1).to(dtype)
    stats = torch.ops.lipkern.remap_act_stats(x, torch.tensor([1e-25, 1e-25]), None, act, 1)
    exact = values.sum()
    assert ((exact - stats[4]).abs() <= 64 * 2.0**-12).all(), (exact, stats[4])
    assert (stats[4] <= exact).all()


@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("channel_dim", [1, 3])
def test_stats_do_not_depend_on_thread_count(act, channel_dim):
    """Fixed block partition, blocks combined in order: bitwise equal for 1, 2 and 3 threads.
    941,280 elements span sixteen of the kernel's stats blocks."""
    x, threshold, center = _case((12, 40, 37, 53), channel_dim, torch.float32, seed=1)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_ops(x, threshold, center, act, channel_dim))
    finally:
        torch.set_num_threads(threads)
    (y0, s0), *rest = results
    for y, s in rest:
        assert torch.equal(y, y0)
        for a, b in zip(s, s0):
            assert torch.equal(a, b)


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("channels", [2, 3, 17, 48, 100, 250])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_short_rows_walked_several_at_a_time_equal_the_reference(capability, channels, dtype, act):
    """Rows of fewer than 256 channels (channel stride 1) are walked several at a time, with the
    parameters repeated (csrc/ops.cpp, rows_per_wide_row), from 2^16 elements up, and the
    statistics of the rows left over are taken apart and combined channel by channel. A prime
    number of rows (so rows are always left over), [rows, C] and channels_last; a NaN and an
    infinity in the last row (among the rows left over) must reach their channel's amax and
    sums."""
    rows = next(n for n in range(-(-(1 << 16) // channels), 1 << 20) if _is_prime(n))
    for shape, channel_dim in (((rows, channels), 1), ((1, channels, rows, 1), 1)):
        x, threshold, center = _case(shape, channel_dim, dtype, seed=channels)
        if len(shape) == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x.movedim(channel_dim, -1).view(-1, channels)[-1, :2] = torch.tensor(
            [float("nan"), float("inf")]
        ).to(dtype)
        for c in (None, center):
            y, stats = _ops(x, threshold, c, act, channel_dim)
            assert compare_forward(y, x, threshold, c, act, channel_dim).ok
            verdict = compare_stats(stats[1:], x, threshold, c, act, channel_dim)
            assert verdict.ok, verdict
            assert stats[1][0].isnan()
            grad_y = torch.randn(shape).to(dtype)
            dx = torch.ops.lipkern.remap_act_backward(grad_y, x, threshold, c, act, channel_dim, False)
            assert compare_backward(dx, grad_y, x, threshold, c, act, channel_dim, False).ok


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("shape", [(1401, 3, 7, 7), (64, 96, 7, 7), (300, 5, 3, 15)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_short_planes_walked_as_rows_equal_the_reference(capability, shape, dtype, act):
    """The smooth activations' forward (and fp32 backward) walk short planes as rows of C x plane
    positions (csrc/ops.cpp, kMaxPlanesAsRow), several at a time where that row is short too
    (3 x 7 x 7); GELU's backward masks its tails by side with per-channel thresholds above
    2.1e-4 and uses its estimate with a centre. Per-channel thresholds with and without centres,
    and a per-tensor threshold; inputs of standard deviation 3 put lanes off the grid."""
    x, threshold, center = _case(shape, 1, dtype, seed=5)
    grad_y = torch.randn(shape).to(dtype)
    for t, c in ((threshold, None), (threshold, center), (torch.tensor(0.4), None)):
        y = torch.ops.lipkern.remap_act(x, t, c, act, 1, False)
        assert compare_forward(y, x, t, c, act, 1).ok
        inplace = x.clone()
        torch.ops.lipkern.remap_act_(inplace, t, c, act, 1)
        assert same_bits(inplace, y).all()
        dx = torch.ops.lipkern.remap_act_backward(grad_y, x, t, c, act, 1, False)
        assert compare_backward(dx, grad_y, x, t, c, act, 1, False).ok


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % k for k in range(2, math.isqrt(n) + 1))


@pytest.mark.parametrize(
    "shape", [(1999, 40), (8, 4096), (3, 70000), (64, 96, 7, 7)], ids=str
)
def test_stats_of_short_and_wide_rows_do_not_depend_on_thread_count(shape):
    """Short rows take the wide-row path and its leftover rows; few rows of many channels split
    each block's channels among the tasks (csrc/cpu/stats_blocks.h, stats_channel_chunk); short
    planes keep the row walk, one channel per run. A NaN in the last element must reach its
    channel."""
    x, threshold, center = _case(shape, 1, torch.float32, seed=4)
    x.view(-1)[-1] = float("nan")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_ops(x, threshold, center, "gelu", 1))
    finally:
        torch.set_num_threads(threads)
    (y0, s0), *rest = results
    assert compare_stats(s0[1:], x, threshold, center, "gelu", 1).ok
    assert s0[1][-1 if len(shape) == 2 else shape[1] - 1].isnan()
    for y, s in rest:
        assert same_bits(y, y0).all()
        for a, b in zip(s, s0):
            assert same_bits(a, b).all() if a.is_floating_point() else torch.equal(a, b)


@pytest.mark.parametrize("use_center", [False, True], ids=["no_center", "center"])
@pytest.mark.parametrize("shape,channel_dim", [
    ((12, 40, 37, 53), 1), ((12, 40, 37, 53), 3), ((64, 96, 7, 7), 1)
], ids=["planes", "rows", "short-planes"])
def test_forward_split_inside_rows_and_planes_equals_the_reference(shape, channel_dim, use_center):
    """With 3 threads the elements split mid-row (53 channels) and mid-plane (37 x 53, or 7 x 7
    planes, which SiLU walks as rows of 96 x 49 elements): every run after the first of a task
    must still get its own channel's threshold."""
    x, threshold, center = _case(shape, channel_dim, torch.float32, seed=2)
    center = center if use_center else None
    expected = reference.remap_act_reference(x, threshold, center, "relu", channel_dim)
    grad_y = torch.randn(shape)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y = torch.ops.lipkern.remap_act(x, threshold, center, "relu", channel_dim, False)
            assert same_bits(y, expected).all(), f"{n} threads"
            y = torch.ops.lipkern.remap_act(x, threshold, center, "silu", channel_dim, False)
            assert compare_forward(y, x, threshold, center, "silu", channel_dim).ok, f"{n} threads"
            dx = torch.ops.lipkern.remap_act_backward(
                grad_y, x, threshold, center, "silu", channel_dim, False
            )
            assert compare_backward(
                dx, grad_y, x, threshold, center, "silu", channel_dim, False
            ).ok, f"{n} threads"
    finally:
        torch.set_num_threads(threads)


def test_channels_last_is_walked_without_a_copy():
    """Output keeps channels_last and equals the contiguous computation."""
    x, threshold, center = _case((4, 24, 9, 11), 1, torch.float32)
    xl = x.contiguous(memory_format=torch.channels_last)
    y = torch.ops.lipkern.remap_act(xl, threshold, center, "gelu", 1, False)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, torch.ops.lipkern.remap_act(x, threshold, center, "gelu", 1, False))
    inplace = xl.clone(memory_format=torch.channels_last)
    torch.ops.lipkern.remap_act_(inplace, threshold, center, "gelu", 1)
    assert torch.equal(inplace, y)


def test_non_dense_input_and_gradient_layouts():
    x, threshold, center = _case((16, 80), 1, torch.float32)
    view = x[:, ::2]
    t, c = threshold[:40].contiguous(), center[:40].contiguous()
    y = torch.ops.lipkern.remap_act(view, t, c, "silu", 1, False)
    assert torch.equal(y, torch.ops.lipkern.remap_act(view.contiguous(), t, c, "silu", 1, False))
    # An in-place op on a strided view writes through to the base.
    base = x.clone()
    torch.ops.lipkern.remap_act_(base[:, ::2], t, c, "silu", 1)
    assert torch.equal(base[:, ::2], y)
    assert torch.equal(base[:, 1::2], x[:, 1::2])
    # A gradient in another layout (or in fp32 for a bf16 x) is read correctly.
    grad = torch.randn(40, 16).t()
    dx = torch.ops.lipkern.remap_act_backward(grad, view, t, c, "silu", 1, False)
    dx_ref = torch.ops.lipkern.remap_act_backward(grad.contiguous(), view, t, c, "silu", 1, False)
    assert torch.equal(dx, dx_ref)
    xb = view.to(torch.bfloat16)
    dxb = torch.ops.lipkern.remap_act_backward(grad, xb, t, c, "silu", 1, False)
    assert dxb.dtype == torch.bfloat16
    assert compare_backward(dxb, grad, xb, t, c, "silu", 1, False).failures == 0


def test_kernel_validates_threshold_and_center():
    x = torch.randn(4, 3)
    ok = torch.ones(3)
    with pytest.raises(ValueError, match="threshold"):
        torch.ops.lipkern.remap_act(x, torch.tensor([1.0, -1.0, 1.0]), None, "gelu", 1, False)
    with pytest.raises(ValueError, match="threshold"):
        torch.ops.lipkern.remap_act(x, torch.tensor(float("nan")), None, "gelu", 1, False)
    with pytest.raises(ValueError, match="threshold"):
        torch.ops.lipkern.remap_act(x, torch.ones(4), None, "gelu", 1, False)
    with pytest.raises(ValueError, match="center must not contain NaN"):
        torch.ops.lipkern.remap_act(x, ok, torch.full((3,), float("nan")), "gelu", 1, False)
    # The public API leaves these checks to the kernels: they must catch every bad value.
    with pytest.raises(ValueError, match=r"center must be finite, got -inf \(channel 2\)"):
        lipkern.remap_act(x, ok, center=torch.tensor([0.0, 1.0, -float("inf")]), channel_dim=1)
    with pytest.raises(ValueError, match=r"threshold must be >= 0, got -1 \(channel 1\)"):
        lipkern.remap_act(x, torch.tensor([1.0, -1.0, 1.0]), channel_dim=1)
    with pytest.raises(ValueError, match="act"):
        torch.ops.lipkern.remap_act(x, ok, None, "tanh", 1, False)
    with pytest.raises(TypeError, match="x must be"):
        torch.ops.lipkern.remap_act(x.double(), ok, None, "gelu", 1, False)


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
def test_activations_are_within_1_32_ulp_in_fp32(capability):
    """Within 1.32 ulp of an accurate float64 evaluation over the whole useful range, on the
    fp32 grid and off it; 1.32 is the worst over every fp32 with 0.25 <= |x| < the grid bound.
    The judging rule (lipkern.testing) is met against any reference rounding below 1.5 ulp;
    PyTorch's own fp32 GELU is thousands of ulps off for x < -3."""
    x = torch.linspace(-14, 8, 400_001)
    xd = x.double()
    truths = {
        "gelu": 0.5 * xd * torch.special.erfc(-xd / 2**0.5),
        "gelu_tanh": xd * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (xd + 0.044715 * xd**3)),
        "silu": xd * torch.sigmoid(xd),
    }
    for act, truth in truths.items():
        y = torch.ops.lipkern.remap_act(x, torch.tensor(0.0), None, act, 0, False)
        rounded = truth.float()
        ulp = (torch.nextafter(rounded.abs(), torch.tensor(float("inf"))) - rounded.abs()).double()
        err = ((y.double() - truth).abs() / ulp).max()
        assert err < 1.32, f"{act}: {float(err):.3f} ulp"


# In units of (1 + |x|) 2^-24: GELU's and tanh-GELU's grid polynomials were fitted to 0.58; SiLU's
# derivative is computed from the sigmoid in fp32 (1.84 at worst seen, near x = 0.01).
DERIVATIVE_UNITS = {"gelu": 0.6, "gelu_tanh": 0.6, "silu": 2.0}


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("act", list(DERIVATIVE_UNITS))
def test_derivatives_are_within_their_units_of_1_plus_abs_x(capability, act):
    """act'(x) within its bound of float64 over the whole useful range, on the fp32 grid and off
    it, densest near 0: the backward's rule (lipkern.testing.compare_backward) allows 8 of these
    units, absolute because act' crosses zero. With dy = 1 and no remap, dx is act'(x) itself."""
    x = torch.cat([torch.linspace(-14, 20, 400_001), torch.linspace(-1, 1, 400_001)])
    dx = torch.ops.lipkern.remap_act_backward(
        torch.ones_like(x), x, torch.tensor(0.0), None, act, 0, False
    )
    truth = activation_grad_float64(x, act)
    err = ((dx.double() - truth).abs() / ((1 + x.double().abs()) * 2.0**-24)).max()
    assert err < DERIVATIVE_UNITS[act], f"{act}: {float(err):.3f}"


def _fp32_between(low: float, high: float, stride: int) -> torch.Tensor:
    """Every stride-th fp32 in [low, high) (0 < low < high), both signs."""
    bounds = torch.tensor([low, high]).view(torch.int32)
    magnitudes = torch.arange(int(bounds[0]), int(bounds[1]), stride, dtype=torch.int32)
    x = magnitudes.view(torch.float32)
    return torch.cat([x, -x])


# GELU's grid ends at |x| = 3.875; by |x| = 15.5 its tails have reached x and 1, or underflowed.
GELU_TAIL = (3.875, 15.5)
NATIVE_CAPABILITY = _C.cpu_capability()


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
def test_gelu_derivative_off_the_grid(capability):
    """Off the grid GELU's backward takes act'(x) from a second grid over |x| up to 5.875 and its
    limits beyond (csrc/cpu/act_grid.h, gelu_grad_off_grid): over every fp32 of the tails (every
    7th on the other builds), within 0.21 (1 + |x|) 2^-24 of float64, which the rounding of
    act'(x) to fp32 alone reaches near x = 3.875, and a fortieth of the backward's rule; the sign
    of a zero result is the truth's, and inf gives the limits, as does every |x| from 5.875 on,
    in steps with any number of lanes off the grid."""
    stride = 1 if capability == NATIVE_CAPABILITY else 7
    x = _fp32_between(*GELU_TAIL, stride=stride)
    dx = torch.ops.lipkern.remap_act_backward(
        torch.ones_like(x), x, torch.tensor(0.0), None, "gelu", 0, False
    )
    truth = activation_grad_float64(x, "gelu")
    err = ((dx.double() - truth).abs() / ((1 + x.double().abs()) * 2.0**-24)).max()
    assert err < 0.21, float(err)
    zero = dx == 0
    assert zero.any() and (dx[zero].signbit() == truth[zero].signbit()).all()
    ends = torch.tensor([float("inf"), -float("inf")])
    limits = torch.ops.lipkern.remap_act_backward(
        torch.ones(2), ends, torch.tensor(0.0), None, "gelu", 0, False
    )
    assert same_bits(limits, torch.tensor([1.0, -0.0])).all()
    # From |x| = 5.875 on the derivative is its limit, whatever the step's other lanes.
    mixed = _steps_with_every_count_off_the_grid(x[::97], torch.Generator().manual_seed(3))
    d = torch.ops.lipkern.remap_act_backward(
        torch.ones_like(mixed), mixed, torch.tensor(0.0), None, "gelu", 0, False
    )
    far = mixed.abs() >= 5.875
    assert far.any() and same_bits(d[far], torch.where(mixed[far] > 0, 1.0, -0.0)).all()


def _steps_with_every_count_off_the_grid(off: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Steps of 32 values with 0 to 32 of them taken from `off`, in shuffled places, the others
    on GELU's grid."""
    steps = off.numel() // 16
    count = torch.arange(steps) % 33
    is_off = torch.rand(steps, 32, generator=gen).argsort(dim=1) < count[:, None]
    x = torch.rand(steps, 32, generator=gen) * 7 - 3.5
    x[is_off] = off[torch.randperm(off.numel(), generator=gen)][: int(is_off.sum())]
    return x.reshape(-1)


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("centre", ["none", "half", "near"])
def test_gelu_backward_off_the_grid_masks_as_the_forward(capability, centre):
    """The backward settles GELU's mask off the grid with an fp32 estimate of act(x) and asks the
    forward's own value where the estimate is too close to call. One channel per element, steps
    with 0 to 32 off-grid lanes among on-grid ones, centres none, a/2 and a (1 - 2^-8), and per
    call one kind of threshold: at |a - c| exactly (not remapped), one ulp above it, 2^-22
    relative either side (too close for the estimate), and 2^-9 either side (settled by it).
    The backward zeroes exactly the elements the forward remaps, and passes dy act'(x) through
    elsewhere."""
    gen = torch.Generator().manual_seed(5)
    x = _steps_with_every_count_off_the_grid(_fp32_between(*GELU_TAIL, stride=331), gen)
    a = torch.ops.lipkern.remap_act(x, torch.tensor(0.0), None, "gelu", 0, False)
    c = {"none": torch.zeros_like(a), "half": a * 0.5, "near": a * (1 - 2**-8)}[centre]
    distance = (a - c).abs()
    dy = torch.ones_like(x)
    unmasked = torch.ops.lipkern.remap_act_backward(
        dy, x, torch.tensor(0.0), None, "gelu", 0, False
    )
    thresholds = [distance, torch.nextafter(distance, distance + 1)]
    thresholds += [distance * (1 + f) for f in (-(2**-22), 2**-22, -(2**-9), 2**-9)]
    for t in thresholds:
        remapped = distance < t
        dx = torch.ops.lipkern.remap_act_backward(
            dy, x, t, None if centre == "none" else c, "gelu", 0, False
        )
        # dy is zeroed before the product, as the reference's masked_fill: -0 where act'(x) < 0.
        assert same_bits(dx, torch.where(remapped, 0.0 * unmasked, unmasked)).all()


def _with_neighbours(values: list[float]) -> torch.Tensor:
    """Each fp32 value and its two neighbours."""
    v = torch.tensor(values)
    return torch.cat([torch.nextafter(v, v - 1), v, torch.nextafter(v, v + 1)])


# Threshold and centre pairs whose tails are uniform by construction: t = 0; the left tail within
# the threshold of the centre (0, +-2^-13, -0); the left tail and right tail beyond it (0.2, -0.1,
# 3, -1e30).
UNIFORM_TAIL_PAIRS = [(0.0, 0.0), (0.0, 0.2), (3e-4, 0.0), (0.3, -0.0), (0.05, 2**-13),
                      (0.05, -(2**-13)), (3.0, 0.0), (0.1, 0.2), (0.05, -0.1), (0.5, 3.0),
                      (1.0, -1e30)]


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("shape", [(-1, 64), (-1, 64, 4, 4)], ids=["rows", "planes"])
def test_gelu_backward_masks_the_tails_by_interval(capability, shape):
    """The fp32 backward masks GELU's off-grid lanes by the interval of x their channel's tail
    remaps, without their value (csrc/cpu/act_grid.h, gelu_tail_intervals): closed form where
    the threshold and centre remap all or none of the left tail's values and none of the right
    one's (where every channel's are, by the lane's side), searched on the forward's own values
    otherwise. Every call has 4096 elements per
    channel, enough for every channel to be searched (first calls with fewer and many channels
    that are not uniform take the tail's estimate: test_gelu_backward_off_the_grid_masks_as_the_
    forward).
    Per call, one pair for every channel: thresholds at and beside where the tails' values end
    (|GELU(-3.875)|, GELU(3.875)) and where their bounds do (2.1e-4, 3.875 - 2.1e-4), between
    and beyond (0 to inf); centres 0, -0, +-2^-13, 0.2, -0.1, 3.7, +-1e30 and none; per-tensor
    values. Then mixed over the channels: pairs drawn from all, pairs uniform by construction,
    and those with one channel that is not, first or last. Inputs: steps with 0 to 32 off-grid
    lanes, the grid's ends and their neighbours, the infinities, and -3.875 in every channel.
    The backward zeroes exactly the elements the forward remaps."""
    gen = torch.Generator().manual_seed(7)
    ends = torch.tensor([3.875, -3.875])
    ends = torch.cat([ends, torch.nextafter(ends, 2 * ends), ends * float("inf")])
    stride = 331 if capability == NATIVE_CAPABILITY else 997
    steps = _steps_with_every_count_off_the_grid(_fp32_between(*GELU_TAIL, stride=stride), gen)
    x = torch.cat([ends, steps])
    x = x.repeat(-(-4096 * 64 // x.numel()))
    x = x[: x.numel() // 1024 * 1024].reshape(shape)
    # The left tail's value farthest from 0 in every channel, where a channel masked by side
    # that should not be shows.
    x[(-1, slice(None)) + (0,) * (x.dim() - 2)] = -3.875
    a = torch.ops.lipkern.remap_act(x, torch.tensor(0.0), None, "gelu", 0, False)
    left_end = -float(torch.ops.lipkern.remap_act(
        torch.tensor([-3.875]), torch.tensor(0.0), None, "gelu", 0, False))
    right_end = float(a.flatten()[0])
    thresholds = _with_neighbours([left_end, 2.1e-4, right_end, 3.875 - 2.1e-4])
    thresholds = torch.cat(
        [thresholds, torch.tensor([0.0, 1e-4, 0.05, 0.3, 3.875, 10.0, float("inf")])]
    )
    centres = torch.tensor([0.0, -0.0, 2**-13, -(2**-13), 0.2, -0.1, 3.7, 1e30, -1e30])
    pairs = torch.cartesian_prod(thresholds, centres)
    channels = x.shape[1]
    uniform = torch.tensor(UNIFORM_TAIL_PAIRS)
    uniform = uniform[torch.randint(len(uniform), (channels,), generator=gen)]
    not_uniform = torch.tensor([left_end, 0.0])
    calls = [(pair[0].expand(channels), pair[1].expand(channels)) for pair in pairs]
    calls += [(torch.full((channels,), t), None) for t in (2.1e-4, 0.3, 3.875 - 2.1e-4)]
    calls += [(torch.tensor(0.3), torch.tensor(0.2)), (torch.tensor(0.3), None)]
    mixed = [pairs[torch.randperm(len(pairs), generator=gen)[:channels]], uniform]
    one_apart = [torch.cat([not_uniform[None], uniform[1:]]),
                 torch.cat([uniform[1:], not_uniform[None]])]
    mixed += one_apart
    calls += [tuple(v.contiguous() for v in pair.unbind(1)) for pair in mixed]
    dy = torch.ones_like(x)
    unmasked = torch.ops.lipkern.remap_act_backward(
        dy, x, torch.tensor(0.0), None, "gelu", 0, False
    )
    along_channels = (1, -1) + (1,) * (x.dim() - 2)
    for t, c in calls:
        centre = torch.tensor(0.0) if c is None else c
        remapped = (a - centre.view(along_channels)).abs() < t.view(along_channels)
        dx = torch.ops.lipkern.remap_act_backward(dy, x, t, c, "gelu", 1, False)
        assert same_bits(dx, torch.where(remapped, 0.0 * unmasked, unmasked)).all(), (t, c)


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("centred", [False, True], ids=["uncentred", "centred"])
def test_gelu_backward_masks_alike_before_and_after_a_parameter_set_is_searched(
    capability, centred
):
    """A small call whose channels' tails need a search masks them by the tail's estimate the
    first time its thresholds and centres are met, and by their searched intervals (kept per
    parameter set: csrc/cpu/param_cache.h) from the second call on; both zero exactly the
    elements the forward remaps. Thresholds changed in place are a new set, as are other
    centres with the same thresholds, and each of 199 sets met between (more than the cache
    keeps, so the first set is met anew after them). The cache's counts show which path each
    call took. Per channel a left-tail x0 and a threshold of |fl(a - c)| there or one ulp below
    it (the interval ends just past x0 or at it), x0 with its neighbours among tail and grid
    values, 16 rows of 48 channels; then, in every other channel, one ulp above it (x0 remapped
    there)."""
    gen = torch.Generator().manual_seed(13)
    channels = 48
    x0 = -3.875 - torch.rand(channels, generator=gen) * 8
    a0 = torch.ops.lipkern.remap_act(x0, torch.tensor(0.0), None, "gelu", 0, False)
    c = (torch.rand(channels, generator=gen) - 0.5) * 2e-4 if centred else torch.zeros(channels)
    t = (a0 - c).abs()
    t = torch.where(torch.arange(channels) % 2 == 0, torch.nextafter(t, torch.tensor(0.0)), t)
    x = torch.randn(16, channels, generator=gen) * 6
    x[:3] = torch.stack([x0, torch.nextafter(x0, x0 - 1), torch.nextafter(x0, x0 + 1)])
    a = torch.ops.lipkern.remap_act(x, torch.tensor(0.0), None, "gelu", 0, False)
    dy = torch.ones_like(x)
    unmasked = torch.ops.lipkern.remap_act_backward(
        dy, x, torch.tensor(0.0), None, "gelu", 0, False
    )

    def check(thresholds, centres=c):
        remapped = (a - centres).abs() < thresholds
        dx = torch.ops.lipkern.remap_act_backward(
            dy, x, thresholds, centres if centred else None, "gelu", 1, False
        )
        assert same_bits(dx, torch.where(remapped, 0.0 * unmasked, unmasked)).all()

    def counts_after(call, made, reused):
        call()
        assert _C.parameter_set_counts() == {"made": made, "reused": reused}

    assert ((a[:3] - c).abs() < t).any() and not ((a[:3] - c).abs() < t).all()
    assert _C.parameter_set_counts() == {"made": 0, "reused": 0}
    counts_after(lambda: check(t), 0, 0)
    counts_after(lambda: check(t), 1, 0)
    counts_after(lambda: check(t), 1, 1)
    # x0 remapped now in the odd channels.
    t[1::2] = torch.nextafter(t[1::2], torch.tensor(1.0))
    counts_after(lambda: check(t), 1, 1)
    counts_after(lambda: check(t), 2, 1)
    made = 2
    if centred:
        counts_after(lambda: check(t, -c), 2, 1)
        counts_after(lambda: check(t, -c), 3, 1)
        made = 3
    for k in range(1, 200):
        check(t * (1 + k * 2**-10))
    counts_after(lambda: check(t), made, 1)
    counts_after(lambda: check(t), made + 1, 1)


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
def test_gelu_forward_tails_do_not_fall_as_magnitude_grows(capability):
    """Off its grid GELU's fp32 value does not decrease as |x| grows, on either side, over every
    fp32 of the tails (every 7th on the other builds) and on to the infinities: what the
    backward's search for each channel's tail interval relies on."""
    stride = 1 if capability == NATIVE_CAPABILITY else 7
    bounds = torch.tensor([3.875, float("inf")]).view(torch.int32)
    magnitudes = torch.arange(int(bounds[0]), int(bounds[1]) + 1, stride, dtype=torch.int32)
    magnitudes = torch.cat([magnitudes, bounds[1:]]).view(torch.float32)
    for side in (1.0, -1.0):
        a = torch.ops.lipkern.remap_act(
            side * magnitudes, torch.tensor(0.0), None, "gelu", 0, False
        )
        assert (a[1:] >= a[:-1]).all()


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("layout", ["rows", "planes"])
def test_gelu_backward_tail_intervals_end_where_the_forward_stops_remapping(capability, layout):
    """A channel's searched tail interval ends exactly where the forward's mask changes: per
    channel an off-grid x0 on either side (from 3.875 to 20, near the infinities and at them),
    a centre (0, a/2, a (1 - 2^-8), -a), and a threshold |fl(a - c)| at x0 or one ulp above, so
    that the interval ends at x0 or just past it; each channel's x0 with its four nearest
    neighbours, among off-grid and on-grid values, 4096 rows."""
    gen = torch.Generator().manual_seed(11)
    magnitudes = torch.tensor([3.875, 3.9, 4.5, 5.3, 5.4, 8.0, 11.0, 14.3, 14.4, 20.0, 3.4e38])
    x0 = torch.cat([magnitudes, -magnitudes, torch.tensor([float("inf"), -float("inf")])])
    x0 = x0[torch.randint(len(x0), (32,), generator=gen)]
    a0 = torch.ops.lipkern.remap_act(x0, torch.tensor(0.0), None, "gelu", 0, False)
    kind = torch.arange(32) % 4
    c = torch.where(kind == 0, 0.0, torch.where(kind == 1, a0 * 0.5, a0 * (1 - 2**-8)))
    c = torch.where(kind == 3, -a0, c).nan_to_num(posinf=0.0, neginf=0.0)
    t = (a0 - c).abs()
    t = torch.where(torch.arange(32) % 3 == 0, torch.nextafter(t, t + 1), t)
    rows = 4096
    x = torch.randn(rows, 32, generator=gen) * 6
    near = torch.stack([x0, *(torch.nextafter(x0, x0 + s * 1) for s in (-1, 1))])
    near = torch.cat([near, torch.nextafter(near[1:], near[1:] * 2)])
    x[: near.shape[0]] = near
    if layout == "planes":
        x = x.reshape(rows // 64, 64, 32).transpose(1, 2).contiguous()
    along_channels = (1, -1) + (1,) * (x.dim() - 2)
    a = torch.ops.lipkern.remap_act(x, torch.tensor(0.0), None, "gelu", 0, False)
    remapped = (a - c.view(along_channels)).abs() < t.view(along_channels)
    dy = torch.ones_like(x)
    unmasked = torch.ops.lipkern.remap_act_backward(
        dy, x, torch.tensor(0.0), None, "gelu", 0, False
    )
    dx = torch.ops.lipkern.remap_act_backward(dy, x, t, c, "gelu", 1, False)
    assert remapped.any() and not remapped.all()
    assert same_bits(dx, torch.where(remapped, 0.0 * unmasked, unmasked)).all()


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("layout", ["rows", "planes"])
def test_gelu_backward_settles_its_grid_estimate_as_the_forward(capability, layout):
    """With tails masked by side or by interval, the fp32 backward decides lanes on GELU's grid
    from an estimate of act(x) (three rows of the polynomial, within 2.6e-4 of the grid's value)
    and takes the grid's own value where the estimate is too close to call
    (csrc/cpu/act_tables16.h, settle_grid_estimate). Per channel an x0 on the grid (both sides
    of the valley, near 0 and near the grid's ends), a centre (0, a/2, -a, a (1 - 2^-8)) and a
    threshold at |fl(a - c)|, one ulp above, 1e-4 either side (inside the estimate's band) or
    1e-3 either side (settled by it); each channel's x0 with its neighbours among random values,
    4096 rows, channels of uniform tails and of searched ones."""
    gen = torch.Generator().manual_seed(13)
    x0 = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.5, 3.87, -0.3, -0.75, -1.5, -3.0, -3.87, 1e-3])
    x0 = x0[torch.randint(len(x0), (32,), generator=gen)]
    a0 = torch.ops.lipkern.remap_act(x0, torch.tensor(0.0), None, "gelu", 0, False)
    kind = torch.arange(32) % 4
    c = torch.where(kind == 0, 0.0, torch.where(kind == 1, a0 * 0.5, -a0))
    c = torch.where(kind == 3, a0 * (1 - 2**-8), c)
    distance = (a0 - c).abs()
    offsets = [0.0, 1e-4, -1e-4, 1e-3, -1e-3]
    rows = 4096
    x = torch.randn(rows, 32, generator=gen) * 2
    near = torch.stack([x0, *(torch.nextafter(x0, x0 + s) for s in (-1, 1))])
    x[: near.shape[0]] = near
    if layout == "planes":
        x = x.reshape(rows // 64, 64, 32).transpose(1, 2).contiguous()
    along_channels = (1, -1) + (1,) * (x.dim() - 2)
    a = torch.ops.lipkern.remap_act(x, torch.tensor(0.0), None, "gelu", 0, False)
    dy = torch.ones_like(x)
    unmasked = torch.ops.lipkern.remap_act_backward(
        dy, x, torch.tensor(0.0), None, "gelu", 0, False
    )
    for offset in offsets + ["ulp"]:
        t = torch.nextafter(distance, distance + 1) if offset == "ulp" else distance + offset
        t = t.clamp_min(0.0)
        remapped = (a - c.view(along_channels)).abs() < t.view(along_channels)
        dx = torch.ops.lipkern.remap_act_backward(dy, x, t, c, "gelu", 1, False)
        assert same_bits(dx, torch.where(remapped, 0.0 * unmasked, unmasked)).all(), offset


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
def test_gelu_forward_at_the_ends_of_its_tails(capability):
    """From x = 5.375 up GELU's fp32 value is x, from -14.375 down it is -0 (taken without the
    float64 evaluation): every fp32 from there to 8 and -16 (every 97th beyond, to 2^30) is the
    float64 value correctly rounded, as are those just inside, where the evaluation still runs."""
    x = torch.cat(
        [
            _fp32_between(5.375, 8.0, 1)[:1_000_000],
            _fp32_between(14.375, 16.0, 1),
            _fp32_between(8.0, 2.0**30, 97),
            _fp32_between(5.25, 5.375, 1),
            _fp32_between(14.25, 14.375, 1),
        ]
    )
    x = x[(x >= 5.25) | (x <= -14.25)]
    y = torch.ops.lipkern.remap_act(x, torch.tensor(0.0), None, "gelu", 0, False)
    truth = (0.5 * x.double() * torch.special.erfc(-x.double() / 2**0.5)).float()
    assert same_bits(y, truth).all()
    ends = x[(x >= 5.375) | (x <= -14.375)]
    assert same_bits(
        torch.ops.lipkern.remap_act(ends, torch.tensor(0.0), None, "gelu", 0, False),
        torch.where(ends > 0, ends, torch.tensor(-0.0)),
    ).all()


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
def test_silu_derivative_at_the_ends_of_the_range(capability):
    """The fp32 sigmoid's exp overflows and underflows at the ends; the derivative still tends to
    its limits (1 above, -0 below) and NaN stays NaN."""
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([inf, -inf, nan, 88.0, 104.0, -88.0, -104.0, -200.0, 0.0, -0.0])
    dx = torch.ops.lipkern.remap_act_backward(
        torch.ones_like(x), x, torch.tensor(0.0), None, "silu", 0, False
    )
    truth = activation_grad_float64(x.clamp(-200, 200), "silu")
    assert dx[0] == 1 and same_bits(dx[1], torch.tensor(-0.0)) and dx[2].isnan()
    finite = slice(3, None)
    assert ((dx[finite].double() - truth[finite]).abs() <= 2.0**-24 * (1 + x[finite].abs())).all()


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_16bit_input_in_fp32_math(capability, dtype):
    """16-bit I/O evaluates the smooth activations in fp32: over every bit pattern the output is
    the float64 value correctly rounded (up to a 1e-2 ulp slack at the ties), and passes the
    project's judge with and without a remap (the mask is taken on the fp32 activation)."""
    from lipkern.testing import activation_float64
    from lipkern.ulp import ulp_size

    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    finite = x.isfinite()
    for act in ("gelu", "gelu_tanh", "silu"):
        truth = activation_float64(x, act)
        for t in (0.0, 0.1):
            threshold = torch.full((256,), t)
            y = torch.ops.lipkern.remap_act(x, threshold, None, act, 1, False)
            assert compare_forward(y, x, threshold, None, act, 1).ok, (act, t)
            if t == 0.0:
                err = (y.double() - truth).abs() / ulp_size(truth.to(dtype), dtype)
                assert float(err[finite].max()) <= 0.51, act
                assert y[~finite].isnan().eq(x[~finite].isnan()).all()


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_16bit_activation_tables_equal_the_fp32_kernels(capability, dtype, act):
    """16-bit inputs read their activation from a table of all 65536 values built by the fp32
    code: forward, statistics and the backward's mask equal the fp32 kernels on the upcast input,
    bit for bit, with ragged tails (37 channels) and every bit pattern but nine."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randperm(65536, generator=gen)[: 1771 * 37].to(torch.int16)
    x = bits.view(dtype).reshape(1771, 37)
    wide = x.float()
    threshold = torch.rand(37, generator=gen) * 0.3
    threshold[0] = 0.0
    center = torch.randn(37, generator=gen) * 0.1
    ops = torch.ops.lipkern
    for c in (None, center):
        y = ops.remap_act(x, threshold, c, act, 1, False)
        assert same_bits(y, ops.remap_act(wide, threshold, c, act, 1, False).to(dtype)).all()
        stats = ops.remap_act_stats(x, threshold, c, act, 1)
        wide_stats = ops.remap_act_stats(wide, threshold, c, act, 1)
        assert same_bits(stats[0], wide_stats[0].to(dtype)).all()
        for got, expected in zip(stats[1:], wide_stats[1:]):
            assert torch.equal(got, expected) or torch.allclose(got, expected, 0, 0, equal_nan=True)
        grad_y = torch.randn(x.shape, generator=gen)
        dx = ops.remap_act_backward(grad_y, x, threshold, c, act, 1, False)
        wide_dx = ops.remap_act_backward(grad_y, wide, threshold, c, act, 1, False)
        assert same_bits(dx, wide_dx.to(dtype)).all()


def _finite_16bit_in_order(dtype):
    """Every finite value of a 16-bit dtype in sorted order (long runs on the fp32 grid, then off
    it), and the same with one far value (100) in every 100."""
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[x.isfinite()].sort().values
    far = x.clone()
    far[::100] = 100.0
    return x, far


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("sixteen_bit_method", ["grid", "table"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_16bit_forward_computes_on_the_grid_what_the_table_holds(
    capability, sixteen_bit_method, dtype, act
):
    """On AVX-512 with the "grid" method a 16-bit forward computes the chunks whose inputs all
    lie on the fp32 grid and reads the table elsewhere ("table": everywhere): over every finite
    16-bit value in order (long runs on the grid, then off it), as one 1-D run and as rows of 64
    channels, without thresholds and with per-channel ones and a centre, equal to the fp32
    kernel on the upcast input, bit for bit; the same with one far value in every 100."""
    x, far = _finite_16bit_in_order(dtype)
    ops = torch.ops.lipkern
    for values in (x, far):
        for shape, channel_dim in (((values.numel(),), 0), ((values.numel() // 64, 64), 1)):
            v = values[: math.prod(shape)].reshape(shape)
            channels = shape[channel_dim]
            per_channel = (torch.linspace(0, 0.3, channels), torch.full((channels,), 0.05))
            for threshold, centre in ((torch.tensor(0.0), None), per_channel):
                y = ops.remap_act(v, threshold, centre, act, channel_dim, False)
                wide = ops.remap_act(v.float(), threshold, centre, act, channel_dim, False)
                assert same_bits(y, wide.to(dtype)).all()


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("sixteen_bit_method", ["grid", "table"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_16bit_backward_computes_on_the_grid_what_the_tables_hold(
    capability, sixteen_bit_method, dtype, act
):
    """With the "grid" method (AVX-512) the 16-bit backward computes act(x) and act'(x): GELU's
    and tanh-GELU's on the chunks whose inputs all lie on the fp32 grid, reading the tables
    elsewhere, SiLU's from its sigmoid; with "table" it reads them (SiLU's act'(x) where its mask
    does not need act(x)). Over every finite 16-bit value in order (so that most chunks lie
    wholly on the grid), and with one far value in every 100: as one ragged run, as rows of 64
    channels and of 4 (masked on x's bits), and as planes of 37 per channel (row mode, a partial
    step each), unmasked and masked with per-channel thresholds and a centre, with 16-bit and
    fp32 dy, dx equals the fp32 kernel's on the upcast inputs, rounded, bit for bit."""
    x, far = _finite_16bit_in_order(dtype)
    gen = torch.Generator().manual_seed(0)
    ops = torch.ops.lipkern
    for values in (x, far):
        ragged = values[:-7]
        cases = (
            (ragged, 0),
            (values[: values.numel() // 64 * 64].reshape(-1, 64), 1),
            (values[: values.numel() // 4 * 4].reshape(-1, 4), 1),
            (ragged[: ragged.numel() // 37 * 37].reshape(-1, 37), 0),
        )
        for v, channel_dim in cases:
            grad_y = torch.randn(v.shape, generator=gen).to(dtype)
            channels = v.shape[channel_dim]
            per_channel = (torch.linspace(0, 0.3, channels), torch.full((channels,), 0.05))
            for threshold, centre in ((torch.tensor(0.0), None), per_channel):
                wide = ops.remap_act_backward(
                    grad_y.float(), v.float(), threshold, centre, act, channel_dim, False
                ).to(dtype)
                for g in (grad_y, grad_y.float()):
                    dx = ops.remap_act_backward(g, v, threshold, centre, act, channel_dim, False)
                    assert same_bits(dx, wide).all()


def _every_16bit_value_and_table(dtype, act):
    """Every 16-bit pattern in bit order, and the table's act(x) for it: the tables hold the fp32
    code's act(x), which the fp32 kernel computes on the upcast x."""
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    return x, torch.ops.lipkern.remap_act(x.float(), torch.tensor(0.0), None, act, 0, False)


def _thresholds_at_the_tables_values(a, x, centre):
    """Thresholds where the remap of |fl(act(x) - c)| < t flips for some 16-bit x: |act - c| at
    chosen x (on both sides of the valley's minimum, near it, far out) and its fp32 neighbours;
    the valley's depth below c and its neighbours; one deeper; 1e-30 and 0."""
    finite = x.isfinite()
    picks = [0.5, -0.3, -1.0, -3.0, -8.0, 2.0, 1e-3]
    lowest = a[finite].min()
    points = [a[finite][(x[finite].float() - p).abs().argmin()] for p in picks] + [lowest]
    up, zero = torch.tensor(math.inf), torch.tensor(0.0)
    out = [0.0, 1e-30, float((lowest - centre).abs() * 1.5 + 0.01)]
    for point in points:
        t = (point - centre).abs()
        out += [float(t), float(t.nextafter(up)), float(t.nextafter(zero))]
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_16bit_backward_masks_exactly_where_the_forward_remaps(capability, dtype, act):
    """The 16-bit backward decides its mask on x's bits on AVX-512 (per channel, two intervals of
    x found on the table's act(x), one each side of its minimum) and from act(x) elsewhere. Over
    every 16-bit pattern in every channel, for thresholds that put the interval ends at the
    table's own values (and next to them), around the minimum and deeper than it, without and
    with centres (at the minimum, negative, positive), dx is dy * act'(x) where the forward keeps
    act(x) and zero where it remaps (|fl(act(x) - c)| < t), in lanes (ragged) and row mode; and
    first on every 67th pattern, under the 1024 elements per channel from which a first call
    uses the keys, twice: from act(x), then on the keys made when the parameter set is met
    again (kept per set, csrc/cpu/param_cache.h), as the cache's counts show."""
    by_keys = capability in ("AVX512", "AVX512_BF16")
    ops = torch.ops.lipkern
    x, a = _every_16bit_value_and_table(dtype, act)
    lowest = a[x.isfinite()].min()
    gen = torch.Generator().manual_seed(0)
    for centres in (None, torch.tensor([float(lowest), -0.1, 0.05, 1.0])):
        _C.forget_parameter_sets()
        counts = []
        pairs = [
            (t, float(c))
            for c in (torch.zeros(1) if centres is None else centres)
            for t in _thresholds_at_the_tables_values(a, x, c)
        ]
        threshold = torch.tensor([t for t, _ in pairs])
        centre = None if centres is None else torch.tensor([c for _, c in pairs])
        channels = len(pairs)
        ragged = torch.cat([x, x[:5]])
        sparse = ragged[::67, None].expand(-1, channels).contiguous()
        for v, channel_dim in (
            (sparse, 1),
            (sparse, 1),
            (ragged[:, None].expand(-1, channels).contiguous(), 1),
            (ragged[None, None, :].expand(1, channels, -1).contiguous(), 1),
        ):
            shape = [1] * v.dim()
            shape[channel_dim] = channels
            c = torch.zeros(shape) if centre is None else centre.reshape(shape)
            a_v = ops.remap_act(v.float(), torch.tensor(0.0), None, act, channel_dim, False)
            remapped = (a_v - c).abs() < threshold.reshape(shape)
            grad_y = torch.randn(v.shape, generator=gen).to(dtype)
            kept = ops.remap_act_backward(
                grad_y, v, torch.tensor(0.0), None, act, channel_dim, False
            )
            dx = ops.remap_act_backward(grad_y, v, threshold, centre, act, channel_dim, False)
            expected = torch.where(remapped, torch.zeros_like(kept), kept)
            # A remapped lane is 0 * act'(x): -0 where act'(x) < 0.
            assert (same_bits(dx, expected) | ((dx == 0) & (expected == 0))).all()
            counts.append(tuple(_C.parameter_set_counts().values()))
        # A call of over 2^16 elements may be walked as rows of several rows' channels, whose
        # parameters repeat the set's (csrc/ops.cpp): another set, which a large call makes at
        # once. Either way each large call masks on keys, made or found kept.
        if by_keys:
            assert counts[:2] == [(0, 0), (1, 0)]
            assert [sum(counts[k]) - sum(counts[k - 1]) for k in (2, 3)] == [1, 1]
        else:
            assert counts == [(0, 0)] * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_16bit_tables_are_valleys(dtype, act):
    """The backward masks on x's bits only where a table is a valley in the order of x's values
    (act(x) not increasing up to its minimum, not decreasing after it); otherwise it would
    silently fall back to deciding from act(x). Every table is one, on the fp32 code's act(x)."""
    x, a = _every_16bit_value_and_table(dtype, act)
    in_value_order = x.float()[~x.isnan()].sort(stable=True)
    values = a[~x.isnan()][in_value_order.indices]
    assert not values.isnan().any()
    bottom = int(values.argmin())
    assert (values[1 : bottom + 1] <= values[:bottom]).all()
    assert (values[bottom + 1 :] >= values[bottom:-1]).all()


def _bit_pattern_inputs(dtype, thresholds):
    """Every 16-bit pattern; for fp32 every bf16 value widened (each exponent, both signs, NaNs
    with payloads), 65536 random patterns, and each threshold with its neighbours."""
    if dtype != torch.float32:
        return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    widened = (torch.arange(65536, dtype=torch.int64) << 16).to(torch.int32).view(torch.float32)
    gen = torch.Generator().manual_seed(0)
    random = torch.randint(-(2**31), 2**31, (65536,), generator=gen, dtype=torch.int64)
    t = torch.tensor([v for v in thresholds if math.isfinite(v)], dtype=torch.float32)
    near = torch.cat([t, t.nextafter(torch.tensor(math.inf)), t.nextafter(torch.tensor(0.0))])
    return torch.cat([widened, random.to(torch.int32).view(torch.float32), near, -near])


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_remap_on_bit_patterns_equals_the_reference(capability, dtype, act):
    """Identity and ReLU without a centre compare bit patterns instead of fp32 values: for
    thresholds of +-0, at a value of x, between two 16-bit values, subnormal, above the largest
    finite 16-bit value and infinite, the output equals the reference bit for bit (-0 kept, NaN
    stays NaN), per tensor (row runs), per channel (37 lanes, ragged) and in place; the
    statistics pass stores the same bits, in lanes and in rows of 8, and on AVX-512, where it
    stores x's own bits as the forward does, NaN payloads too (elsewhere the round trip through
    fp32 quiets a signalling NaN). Its statistics, which AVX-512 also takes on the 16-bit bits,
    equal the reference's: the magnitude max and the remap counts exactly (NaN, -0, subnormals
    and values at the bounds included), the sums within the rule (SUM_RTOL)."""
    finfo = torch.finfo(dtype)
    tie = torch.tensor(0.1, dtype=dtype)
    between = (float(tie) + float(tie.nextafter(torch.tensor(1.0, dtype=dtype)))) / 2
    thresholds = [0.0, -0.0, 1e-45, finfo.smallest_normal / 4, finfo.tiny, 0.1, between,
                  float(tie), 1.0, float(torch.finfo(torch.float16).max), 3.4e38, float("inf")]
    x = _bit_pattern_inputs(dtype, thresholds)
    ops = torch.ops.lipkern
    for t in thresholds:
        threshold = torch.tensor(t, dtype=torch.float32)
        y = ops.remap_act(x, threshold, None, act, 0, False)
        expected = reference.remap_act_reference(x, threshold, None, act, 0, False)
        assert same_bits(y, expected).all(), t
        inplace = x.clone()
        ops.remap_act_(inplace, threshold, None, act, 0)
        assert same_bits(inplace, y).all(), t
    lanes = x[: (x.numel() // 37) * 37].reshape(-1, 37)
    per_channel = torch.tensor(thresholds[:-1] * 4)[:37].float()
    y = ops.remap_act(lanes, per_channel, None, act, 1, False)
    expected = reference.remap_act_reference(lanes, per_channel, None, act, 1, False)
    assert same_bits(y, expected).all()
    # Every pattern (NaN in every channel), then the finite ones, whose max and sums say more;
    # in lanes, and in runs of 8 and of 300 elements (row mode: partial and ragged steps).
    for source in (x, x[x.isfinite()]):
        for run in (None, 8, 300):
            unit = 37 * (run or 1)
            shape = (-1, 37, run) if run else (-1, 37)
            v = source[: (source.numel() // unit) * unit].reshape(shape)
            _check_stats_on_bit_patterns(v, per_channel, act, capability)


def _check_stats_on_bit_patterns(v, per_channel, act, capability):
    """remap_act_stats on v (channels on dim 1) against the forward and the reference."""
    ops = torch.ops.lipkern
    forward = ops.remap_act(v, per_channel, None, act, 1, False)
    y_stats, *stats = ops.remap_act_stats(v, per_channel, None, act, 1)
    if capability.startswith("AVX512"):
        bits = torch.int32 if v.dtype == torch.float32 else torch.int16
        assert torch.equal(y_stats.view(bits), forward.view(bits))
    else:
        assert same_bits(y_stats, forward).all()
    _, amax, remapped, *_ = reference.remap_act_stats_reference(v, per_channel, None, act, 1)
    assert same_bits(stats[0], amax).all()
    assert torch.equal(stats[1], remapped)
    verdict = compare_stats(stats, v, per_channel, None, act, 1)
    assert verdict.ok, verdict


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_smooth_activations_keep_the_sign_of_zero(capability, act):
    """act(-0) = -0 and act(+0) = +0, as PyTorch's (the grid's h^2 term alone gives +0)."""
    x = torch.tensor([-0.0, 0.0] * 20)  # more than one vector of lanes
    y = torch.ops.lipkern.remap_act(x, torch.tensor(0.0), None, act, 0, False)
    assert torch.equal(torch.signbit(y), torch.signbit(x))
    assert torch.equal(y, torch.zeros_like(y))


def _ordered_keys(x):
    """fp32 values as integers in the order of the values (-0 just below +0)."""
    bits = x.view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)


def _from_ordered_keys(keys):
    bits = torch.where(keys >= 0, keys, (-(keys + 1)) | (1 << 31))
    return bits.to(torch.int64).remainder(1 << 32).to(torch.int32).view(torch.float32)


def _points_where_the_mask_flips(act, threshold, center, around=512):
    """Per channel: randn values and, around every fp32 x where the kernel's forward decision
    |act(x) - center| < threshold flips (located on a grid over [-90, 90] and near 0, then
    bisected to adjacent floats), the `around` floats on each side."""
    grid = torch.cat([torch.linspace(-90, 90, 400_001), torch.linspace(-1e-3, 1e-3, 20_001)])
    grid = grid.sort().values

    def remapped(x, t, c):
        a = torch.ops.lipkern.remap_act(x, torch.tensor(0.0), None, act, 0, False)
        return (a - c).abs() < t

    columns = []
    for t, c in zip(threshold.tolist(), center.tolist()):
        decision = remapped(grid, t, c)
        flips = (decision[1:] != decision[:-1]).nonzero().flatten()
        low, high = _ordered_keys(grid[flips]), _ordered_keys(grid[flips + 1])
        low_decision = decision[flips]
        for _ in range(40):
            mid = (low + high) // 2
            same = remapped(_from_ordered_keys(mid), t, c) == low_decision
            low, high = torch.where(same, mid, low), torch.where(same, high, mid)
        offsets = torch.arange(-around, around + 1)
        runs = [torch.randn(4 * around)] + [_from_ordered_keys(k + offsets) for k in high.tolist()]
        columns.append(torch.cat(runs))
    rows = max(col.numel() for col in columns)
    return torch.stack([col.repeat(rows // col.numel() + 1)[:rows] for col in columns], 1)


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("with_center", [False, True], ids=["no-center", "center"])
def test_silu_backward_masks_exactly_what_the_forward_remaps(capability, with_center):
    """SiLU's backward settles its mask on the sigmoid's x s and evaluates the forward's act(x)
    only where that is too close to call: over 512 floats on each side of every flip of the
    forward's decision, and specials, dx equals the unmasked dx with the forward's remapped
    elements zeroed, bit for bit, in fp32; in bf16 and fp16 over every bit pattern in every
    channel."""
    gen = torch.Generator().manual_seed(0)
    threshold = torch.tensor([0.05, 0.2784, 0.27846, 0.3, 3.0, 1e-30, 0.0, 0.01])
    center = torch.randn(8, generator=gen) * 0.2 if with_center else torch.zeros(8)
    x = _points_where_the_mask_flips("silu", threshold, center)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -87.5, -88.8, -104.0, 1e-40])
    x = torch.cat([x, specials.view(-1, 1).expand(-1, 8)])
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(-1, 1).repeat(1, 8)
    ops = torch.ops.lipkern
    c = center if with_center else None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x if dtype == torch.float32 else patterns.view(dtype)
        for layout in ("rows", "channels_first"):
            # [rows, C] walks channels in vector lanes; [1, C, rows] one channel per run.
            xl = xd if layout == "rows" else xd.t().contiguous().unsqueeze(0)
            shape = [1, 8] + [1] * (xl.dim() - 2)
            grad_y = torch.randn(xl.shape, generator=gen).to(dtype)
            act = ops.remap_act(xl.float(), torch.tensor(0.0), None, "silu", 0, False)
            remapped = (act - center.view(shape)).abs() < threshold.view(shape)
            dx = ops.remap_act_backward(grad_y, xl, threshold, c, "silu", 1, False)
            # dy zeroed where remapped, then times act'(x), as the kernel does (-0 included).
            expected = ops.remap_act_backward(
                grad_y.masked_fill(remapped, 0.0), xl, torch.zeros(8), c, "silu", 1, False
            )
            assert same_bits(dx, expected).all(), (dtype, layout)


@pytest.mark.parametrize("capability", CAPABILITIES, indirect=True)
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_settled_masks_hold_at_extreme_thresholds_and_centres(capability, act):
    """The bounds that settle an estimated mask (csrc/cpu/act_tables16.h, fill_settle_bounds) at
    the ends of what a threshold and a centre can be: zero (bounds that settle every lane),
    infinite (only an infinite |e - c| unsettled: x up to 3e38 against a centre of -3.4e38
    overflows it) and subnormal thresholds, centres near the largest float (the band overflows:
    every lane unsettled), alongside ordinary channels; 40 channels, so that the lanes walk takes
    a whole step and a ragged one per row, and one channel per run. Around every flip of the
    forward's decision and at the specials, fp32 dx is the unmasked dx with the forward's
    remapped elements zeroed, bit for bit. (The bounds' width is what the tests around every
    flip check, with ordinary thresholds.)"""
    gen = torch.Generator().manual_seed(3)
    big = torch.finfo(torch.float32).max
    pairs = [(math.inf, 0.0), (math.inf, -big), (0.0, 0.0), (0.0, 1.0), (1e-45, 0.0),
             (1e-40, -1e-40), (1e-38, 0.0), (3e38, 0.0), (big, big), (1e30, -big), (0.5, big),
             (big, -big), (0.1, 0.1), (0.3, -0.2), (2.0, 1.5), (1e-3, 0.0)]
    threshold = torch.cat([torch.tensor([t for t, _ in pairs]), torch.rand(24, generator=gen)])
    center = torch.cat([torch.tensor([c for _, c in pairs]), torch.randn(24, generator=gen)])
    x = _points_where_the_mask_flips(act, threshold, center, around=32)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -1e-40, -88.8,
                             -104.0, 90.0, 3.875, -3.875, 6.0, -6.0, 1e31, 3e38, -3e38])
    x = torch.cat([x, specials.view(-1, 1).expand(-1, threshold.numel())])
    ops = torch.ops.lipkern
    for layout in ("rows", "channels_first"):
        xl = x if layout == "rows" else x.t().contiguous().unsqueeze(0)
        shape = [1, -1] + [1] * (xl.dim() - 2)
        grad_y = torch.randn(xl.shape, generator=gen)
        a = ops.remap_act(xl, torch.tensor(0.0), None, act, 0, False)
        remapped = (a - center.view(shape)).abs() < threshold.view(shape)
        dx = ops.remap_act_backward(grad_y, xl, threshold, center, act, 1, False)
        expected = ops.remap_act_backward(
            grad_y.masked_fill(remapped, 0.0), xl, torch.zeros_like(threshold), center, act, 1,
            False,
        )
        assert same_bits(dx, expected).all(), layout
