"""Every kernel backend against the reference: forward, statistics, backward, in place.

One suite, parametrised over the backends available here (``cpu``, and ``triton`` through the
interpreter when there is no GPU). The exactness rules are those of :mod:`lipkern.testing`.
"""

import importlib.util
import math

import pytest
import torch

import lipkern
from lipkern.ops import reference
from lipkern.ops.api import normalise_arguments
from lipkern.testing import (
    EXACT_ACTIVATIONS,
    SUM_RTOL,
    compare_backward,
    compare_forward,
    compare_stats,
    lay_out,
    special_values,
    tie_thresholds,
)
from lipkern.ulp import same_bits

from conftest import kernel_backends

BACKENDS = kernel_backends()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTS = lipkern.ACTIVATIONS

# name -> (shape, channel_dim, how the tensor is laid out)
LAYOUTS = {
    "rows": ((37, 65), -1, "contiguous"),
    "nchw": ((3, 19, 5, 7), 1, "contiguous"),
    "channels_last": ((3, 19, 5, 7), 1, "channels_last"),
    "ncl": ((4, 11, 6), 1, "contiguous"),
    "strided": ((33, 24), -1, "strided"),
    "transposed": ((24, 33), 0, "transposed"),
}


def make_x(shape, dtype, how="contiguous", scale=2.0):
    """Random activations-like data in the requested layout (see lipkern.testing.lay_out)."""
    x = lay_out((torch.randn(shape) * scale).to(dtype), how)
    assert tuple(x.shape) == tuple(shape)
    return x


def make_threshold(kind, channels, scale=0.6):
    if kind == "tensor":
        return torch.tensor(scale)
    t = torch.rand(channels) * 2 * scale
    t[0] = 0.0  # per-channel zero: that channel is the plain activation
    if channels > 1:
        t[1] = 1e30  # huge: everything finite in that channel is remapped
    return t


def plant_threshold_ties(x, threshold, center, act, channel_dim):
    """Set every third per-channel threshold (from the fourth on) to |a - c| of one of its
    elements, so that element sits exactly on the threshold in fp32."""
    if threshold.dim() == 0:
        return threshold
    a = reference.activation_reference(x.float(), act).movedim(channel_dim, -1)
    a = a.reshape(-1, a.shape[-1])
    c = torch.zeros(()) if center is None else center
    threshold = threshold.clone()
    for k, tie in tie_thresholds(a, c.expand(a.shape[-1]), range(3, a.shape[-1], 3)).items():
        threshold[k] = tie
    return threshold


def make_center(kind, channels):
    if kind is None:
        return None
    if kind == "tensor":
        return torch.tensor(0.25)
    return torch.randn(channels) * 0.5


def plant_ties(x, threshold, center, channel_dim):
    """Overwrite some elements so that |x - c| == t exactly (a tie for identity / relu)."""
    flat = x.movedim(channel_dim, -1)
    t = threshold.expand(flat.shape[-1])
    c = torch.zeros_like(t) if center is None else center.expand(flat.shape[-1])
    tie = (c + t).to(x.dtype)
    finite = (tie.float() - c).abs() == t  # only where c + t is exact in x's dtype
    rows = flat.reshape(-1, flat.shape[-1]) if flat.is_contiguous() else None
    if rows is not None and rows.shape[0] > 2:
        rows[0] = torch.where(finite & t.isfinite(), tie, rows[0])
        rows[1] = torch.where(finite & t.isfinite(), (c - t).to(x.dtype), rows[1])


def check(comparison, what):
    assert comparison.ok, f"{what}: {comparison}"


def run_case(backend, act, dtype, layout, threshold_kind, center_kind):
    shape, channel_dim, how = LAYOUTS[layout]
    x = make_x(shape, dtype, how)
    channels = shape[channel_dim]
    threshold = make_threshold(threshold_kind, channels)
    center = make_center(center_kind, channels)
    if act in ("identity", "relu") and threshold_kind == "tensor" and how == "contiguous":
        plant_ties(x, threshold, center, channel_dim)
    threshold = plant_threshold_ties(x, threshold, center, act, channel_dim)
    return x, threshold, center, channel_dim


def test_required_backends_are_available():
    """The C++ backend must be built, and Triton must run (GPU or interpreter) when installed."""
    assert "cpu" in lipkern.available_backends("cpu"), lipkern._ext.missing_reason()
    if importlib.util.find_spec("triton") is not None:
        assert "triton" in lipkern.available_backends("cpu"), (
            "triton is installed and TRITON_INTERPRET=1, yet backend 'triton' is unavailable"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("center_kind", [None, "tensor", "channel"])
@pytest.mark.parametrize("threshold_kind", ["tensor", "channel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_forward_and_stats_match_reference(
    backend, act, dtype, threshold_kind, center_kind, layout
):
    x, threshold, center, channel_dim = run_case(
        backend, act, dtype, layout, threshold_kind, center_kind
    )
    y = lipkern.remap_act(x, threshold, act, center, channel_dim, backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    t, c, d = normalise_arguments(x, threshold, act, center, channel_dim)
    check(compare_forward(y, x, t, c, act, d), "forward")

    y_stats, stats = lipkern.remap_act_stats(x, threshold, act, center, channel_dim, backend=backend)
    assert same_bits(y_stats, y).all(), "remap_act_stats must return the same y as remap_act"
    check(compare_stats(stats, x, t, c, act, d), "statistics")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("straight_through", [False, True])
@pytest.mark.parametrize("layout", ["rows", "channels_last", "strided"])
@pytest.mark.parametrize("center_kind", [None, "channel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_backward_matches_reference(backend, act, dtype, center_kind, layout, straight_through):
    x, threshold, center, channel_dim = run_case(backend, act, dtype, layout, "channel", center_kind)
    x.requires_grad_(True)
    y = lipkern.remap_act(
        x, threshold, act, center, channel_dim, backend=backend, straight_through=straight_through
    )
    grad_y = torch.randn(x.shape).to(dtype)
    (dx,) = torch.autograd.grad(y, x, grad_y)
    assert dx.dtype == x.dtype
    t, c, d = normalise_arguments(x.detach(), threshold, act, center, channel_dim)
    check(
        compare_backward(dx, grad_y, x.detach(), t, c, act, d, straight_through), "backward"
    )


# Backends whose kernels are the lipkern::* ops of the device, which torch.compile traces as
# opaque ops (the interpreted Triton path is a Python autograd.Function, for numerics only).
COMPILED_BACKENDS = [b for b in kernel_backends() if b == "cpu"] + (
    ["triton"] if torch.cuda.is_available() else []
)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("layout", ["rows", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_ops_under_compile_fullgraph(backend, act, dtype, layout):
    """The compile axis: forward, statistics and backward through torch.compile(fullgraph=True)
    are the eager op's results bit for bit (the same kernels run), so they obey the same rules."""
    device = "cuda" if backend == "triton" else "cpu"
    x, threshold, center, channel_dim = run_case(backend, act, dtype, layout, "channel", "channel")
    x, threshold, center = x.to(device), threshold.to(device), center.to(device)
    grad_y = torch.randn(x.shape, device=device).to(dtype)

    def forward(x, threshold, center):
        y = lipkern.remap_act(x, threshold, act, center, channel_dim, backend=backend)
        _, stats = lipkern.remap_act_stats(x, threshold, act, center, channel_dim, backend=backend)
        return (y, *stats.as_tuple())

    def run(fn):
        leaf = x.detach().requires_grad_(True)
        y, *stats = fn(leaf, threshold, center)
        (dx,) = torch.autograd.grad(y, leaf, grad_y)  # through the compiled backward graph
        return [y.detach(), dx, *stats]

    torch._dynamo.reset()
    compiled = run(torch.compile(forward, fullgraph=True, backend="aot_eager"))
    for got, want in zip(compiled, run(forward)):
        assert same_bits(got, want).all() if got.is_floating_point() else torch.equal(got, want)
    t, c, d = normalise_arguments(x, threshold, act, center, channel_dim)
    y, dx = compiled[0].cpu(), compiled[1].cpu()
    t, c = t.cpu(), c.cpu()
    check(compare_forward(y, x.cpu(), t, c, act, d), "forward")
    check(compare_backward(dx, grad_y.cpu(), x.cpu(), t, c, act, d, False), "backward")


@pytest.mark.parametrize("act", ACTS)
def test_reference_straight_through_keeps_the_forward_value(act):
    """straight_through changes the gradient only: the reference's forward equals the plain
    remap bit for bit, with a centre (a -0 centre too) and with inf and NaN inputs."""
    x = make_x((37, 8), torch.float32)
    x[0, :4] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0])
    threshold = torch.rand(8)
    center = torch.randn(8) * 0.3
    center[1] = -0.0
    plain = reference.remap_act_reference(x, threshold, center, act, 1, False)
    through = reference.remap_act_reference(x, threshold, center, act, 1, True)
    assert same_bits(through, plain).all()


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("straight_through", [False, True])
def test_reference_backward_formula_equals_autograd(act, dtype, straight_through):
    """The written-out backward the kernels implement is what autograd derives."""
    x = make_x((16, 40), dtype)
    t = torch.rand(40) * 0.8
    c = torch.randn(40) * 0.1
    x.requires_grad_(True)
    y = reference.remap_act_reference(x, t, c, act, 1, straight_through)
    grad_y = torch.randn(x.shape).to(dtype)
    (auto,) = torch.autograd.grad(y, x, grad_y)
    # compare_backward judges `auto` against remap_act_backward_reference, the written form.
    assert compare_backward(auto, grad_y, x.detach(), t, c, act, 1, straight_through).ok


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1e30, math.inf])
@pytest.mark.parametrize("center", [None, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_special_values(backend, act, dtype, center, threshold):
    """NaN stays NaN, +-inf pass, -0 and subnormals, exact ties at t, fp16 max, t = 0 / huge / inf."""
    nonfinite, finite = special_values(dtype)
    x = torch.tensor((nonfinite + finite) * 3, dtype=torch.float32).to(dtype).reshape(3, -1)
    y = lipkern.remap_act(x, threshold, act, center, -1, backend=backend)
    t, c, d = normalise_arguments(x, threshold, act, center, -1)
    check(compare_forward(y, x, t, c, act, d), "forward")
    a = reference.activation_reference(x.float(), act)
    assert y[a.isnan()].isnan().all(), "NaN must stay NaN"
    if threshold == 0.0 and act in EXACT_ACTIVATIONS:
        # For the other activations compare_forward above already judged y against act(x).
        assert same_bits(y, a.to(dtype)).all(), "t = 0 must be the plain activation, bit for bit"
    _, stats = lipkern.remap_act_stats(x, threshold, act, center, -1, backend=backend)
    assert stats.amax[a.abs().amax(0).isnan()].isnan().all(), "NaN must propagate into amax"
    check(compare_stats(stats, x, t, c, act, d), "statistics")


@pytest.mark.parametrize("straight_through", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_reference_backend_differentiates_by_the_written_rule(act, dtype, straight_through):
    """Autograd through the reference (what backend="reference" runs) gives the rule the kernels
    implement, remap_act_backward_reference, at NaN and +-inf too, where autograd through
    PyTorch's own activations gives NaN for GELU and SiLU and dy for ReLU at NaN; through
    remap_act and through the y of remap_act_stats. Equal as values: autograd sums the two
    branches' zeros to +0 where the rule's product is -0."""
    nonfinite, finite = special_values(dtype)
    x = torch.tensor((nonfinite + finite) * 2, dtype=torch.float32).to(dtype).reshape(2, -1)
    threshold, center = torch.rand(x.shape[1]), torch.randn(x.shape[1]) * 0.1
    grad_y = torch.randn(x.shape).to(dtype)
    want = reference.remap_act_backward_reference(
        grad_y, x, threshold, center, act, 1, straight_through
    )
    leaf = x.clone().requires_grad_(True)
    y = lipkern.remap_act(leaf, threshold, act, center, 1, backend="reference",
                          straight_through=straight_through)
    (dx,) = torch.autograd.grad(y, leaf, grad_y)
    assert ((dx == want) | (dx.isnan() & want.isnan())).all()
    if not straight_through:
        y, _ = lipkern.remap_act_stats(leaf, threshold, act, center, 1, backend="reference")
        (dx,) = torch.autograd.grad(y, leaf, grad_y)
        assert ((dx == want) | (dx.isnan() & want.isnan())).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape, channel_dim",
    [((1,), -1), ((1, 1), -1), ((0, 5), -1), ((5, 0), -1), ((2, 0, 3, 3), 1), ((7,), 0),
     ((1, 3, 1, 1), 1), ((70_001, 3), -1), ((2, 3, 131, 257), 1)],
    ids=str,
)
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_shapes(backend, act, shape, channel_dim):
    """1 element, empty, odd sizes, more than 65,535 rows."""
    x = make_x(shape, torch.float32)
    channels = shape[channel_dim]
    threshold = torch.rand(channels) * 0.6
    y, stats = lipkern.remap_act_stats(x, threshold, act, None, channel_dim, backend=backend)
    t, c, d = normalise_arguments(x, threshold, act, None, channel_dim)
    check(compare_forward(y, x, t, c, act, d), "forward")
    check(compare_stats(stats, x, t, c, act, d), "statistics")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("act", ACTS)
def test_more_dimensions_than_onednn_takes(backend, act):
    """Rank 13: PyTorch's CPU erf-GELU hands contiguous tensors to oneDNN, which takes 12."""
    x = make_x((2,) * 12 + (3,), torch.float32)
    flat, grad_y = x.view(-1, 3), torch.randn(x.shape)
    threshold = torch.rand(3) * 0.6
    leaf = x.clone().requires_grad_(True)
    y = lipkern.remap_act(leaf, threshold, act, None, -1, backend=backend)
    (dx,) = torch.autograd.grad(y, leaf, grad_y)
    _, stats = lipkern.remap_act_stats(x, threshold, act, None, -1, backend=backend)
    t, c, d = normalise_arguments(flat, threshold, act, None, -1)
    check(compare_forward(y.view(-1, 3), flat, t, c, act, d), "forward")
    check(compare_backward(dx.view(-1, 3), grad_y.view(-1, 3), flat, t, c, act, d, False), "backward")
    check(compare_stats(stats, flat, t, c, act, d), "statistics")
    written = reference.remap_act_backward_reference(grad_y, x, t, c, act, x.dim() - 1, False)
    assert same_bits(written.view(-1, 3), reference.remap_act_backward_reference(
        grad_y.view(-1, 3), flat, t, c, act, d, False)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_scan_of_ten_million_counts_exactly(backend):
    """10^7 bf16 elements: counts exact and sums right (a bf16 accumulator stalls at 256)."""
    channels = 4
    rows = 2_500_000
    x = torch.ones(rows, channels, dtype=torch.bfloat16)
    x[::2, 1] = 2.0
    x[::5, 3] = 0.25
    _, stats = lipkern.remap_act_stats(x, 0.5, "identity", None, -1, backend=backend)
    assert stats.count.tolist() == [rows] * channels
    assert stats.remapped.tolist() == [0, 0, 0, rows // 5]
    expected = [rows * 1.0, rows * 1.5, rows * 1.0, rows * 0.8 + rows // 5 * 0.25]
    assert stats.sum.tolist() == pytest.approx(expected, rel=1e-12)
    assert stats.amax.tolist() == [1.0, 2.0, 1.0, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "identity"])
def test_merge_of_two_halves_equals_one_scan(backend, act):
    x = make_x((301, 17), torch.bfloat16)
    x[5, 3] = float("nan")
    _, whole = lipkern.remap_act_stats(x, 0.3, act, backend=backend)
    _, first = lipkern.remap_act_stats(x[:150], 0.3, act, backend=backend)
    _, second = lipkern.remap_act_stats(x[150:], 0.3, act, backend=backend)
    first_amax = first.amax.clone()
    merged = first.merge(second)
    assert same_bits(first.amax, first_amax).all()  # merge leaves its operands alone
    assert same_bits(merged.amax, whole.amax).all()
    assert torch.equal(merged.count, whole.count) and torch.equal(merged.remapped, whole.remapped)
    pointer = first.amax.data_ptr()
    assert first.merge_(second) is first and first.amax.data_ptr() == pointer
    assert same_bits(first.amax, merged.amax).all() and same_bits(first.sum, merged.sum).all()
    assert torch.equal(first.count, merged.count) and same_bits(first.sumsq, merged.sumsq).all()
    a = reference.activation_reference(x.float(), act).double()
    bound = 2 * SUM_RTOL * a.abs().nansum(0)  # each within SUM_RTOL of the truth
    finite = whole.sum.isfinite()
    assert ((merged.sum - whole.sum).abs() <= bound)[finite].all()
    assert merged.sum[~finite].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["rows", "channels_last"])
def test_inplace_equals_out_of_place(backend, act, dtype, layout):
    shape, channel_dim, how = LAYOUTS[layout]
    x = make_x(shape, dtype, how)
    threshold = torch.rand(shape[channel_dim])
    expected = lipkern.remap_act(x, threshold, act, None, channel_dim, backend=backend)
    pointer = x.data_ptr()
    out = lipkern.remap_act_(x, threshold, act, None, channel_dim, backend=backend)
    assert out is x and x.data_ptr() == pointer
    assert same_bits(x, expected).all()
