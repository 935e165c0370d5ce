"""The ops under misuse: in-place writes autograd must see, higher-order gradients, argument
values that overflow float32."""

import pytest
import torch

import lipkern
from lipkern.ops.activations import SMOOTH_ACTIVATIONS, lookup
from conftest import kernel_backends

BACKENDS = ["reference", *kernel_backends()]
SMOOTH = SMOOTH_ACTIVATIONS


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_bumps_the_version_counter(backend):
    # autograd saved x for w's gradient; overwriting it must make backward refuse, as relu_ does.
    w = torch.randn(8, requires_grad=True)
    x = torch.randn(4, 8)
    loss = (w * x).sum()
    before = x._version
    lipkern.remap_act_(x, 0.5, act="relu", backend=backend)
    assert x._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_op_called_directly_bumps_the_version_of_views_and_base():
    base = torch.randn(4, 8)
    view = base[1:3]
    torch.ops.lipkern.remap_act_(view, torch.tensor(0.5), None, "relu", 1)
    assert view._version == base._version == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refuses_an_inference_tensor_outside_inference_mode(backend):
    with torch.inference_mode():
        x = torch.randn(4, 8)
    before = x.clone()
    with pytest.raises(RuntimeError, match="inference"):
        lipkern.remap_act_(x, 0.5, act="relu", backend=backend)
    assert torch.equal(x, before)
    with torch.inference_mode():
        lipkern.remap_act_(x, 0.5, act="relu", backend=backend)
    assert torch.equal(x, lipkern.remap_act(before, 0.5, act="relu", backend="reference"))


def _penalty_gradient(x, act, backend, threshold, center, straight_through, dtype):
    x = x.to(dtype).detach().requires_grad_()
    y = lipkern.remap_act(
        x, threshold, act=act, center=center, backend=backend, channel_dim=1,
        straight_through=straight_through,
    )
    weights = torch.linspace(-1, 2, y.shape[1], dtype=dtype).view(1, -1, 1)
    (grad,) = torch.autograd.grad((y * weights).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad((grad.float() ** 2).sum(), x)
    return second.float()


CPU_KERNELS = [b for b in kernel_backends() if b == "cpu"]


@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("act", ("relu", *SMOOTH))
@pytest.mark.parametrize("straight_through", (False, True))
def test_double_backward_equals_the_reference(backend, act, straight_through):
    # A gradient penalty differentiates the backward: the act'' term must not be dropped.
    x = torch.randn(16, 6, 3)
    threshold, center = torch.rand(6) * 0.3, torch.randn(6) * 0.1
    got = _penalty_gradient(x, act, backend, threshold, center, straight_through, torch.float32)
    want = _penalty_gradient(
        x, act, "reference", threshold, center, straight_through, torch.float32
    )
    assert want.abs().max() > 0 or act == "relu"
    # Not bit for bit: the C++ backward evaluates act' in float64 and rounds once, the reference
    # chains float32 torch ops, and the penalty sums ~300 such terms, so the two agree to float32
    # rounding of those sums, not to the last bit.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", SMOOTH)
def test_second_derivative_matches_autograd_of_pytorch_activations(act):
    x = torch.linspace(-6, 6, 241, dtype=torch.float64, requires_grad=True)
    torch_act = lookup(act).torch_fn
    (first,) = torch.autograd.grad(torch_act(x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    got = lipkern.ops.reference.activation_second_derivative(x.detach(), act)
    # Two float64 formulas (a closed form vs autograd through PyTorch's own activation) that
    # round differently where GELU's tail cancels, hence a relative 1e-5 rather than exact.
    torch.testing.assert_close(got.double(), second, rtol=1e-5, atol=1e-6)
    inf = torch.tensor([float("inf"), -float("inf")])
    assert torch.equal(lipkern.ops.reference.activation_second_derivative(inf, act), torch.zeros(2))


@pytest.mark.skipif("triton" not in kernel_backends(), reason="Triton is not available")
def test_double_backward_through_the_triton_interpreter_is_refused():
    x = torch.randn(4, 8, requires_grad=True)
    y = lipkern.remap_act(x, 0.1, act="gelu", backend="triton")
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    (grad,) = torch.autograd.grad(y.sum(), x)  # a first-order backward still works
    assert grad.shape == x.shape


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_gradgradcheck_of_the_kernels(backend):
    # Far from the threshold (where the mask jumps) the kernels' backward is differentiable.
    x = torch.cat([torch.linspace(-3, -1, 8), torch.linspace(1, 3, 8)]).reshape(4, 4)
    x.requires_grad_()

    def fn(v):
        return lipkern.remap_act(v, 0.05, act="silu", backend=backend)

    # float32 inputs (the kernels' dtype): central differences with eps=1e-2 carry an O(eps^2)
    # truncation error (times the third derivative) and float32 rounding of ~1e-7 / 1e-2
    # relative, so gradgradcheck's float64 defaults cannot apply; 2e-2 still catches a dropped
    # second-derivative term (SiLU's is ~0.1-0.5 on these inputs).
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-2, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("value", [1e300, 3.5e38, 10**400], ids=["1e300", "3.5e38", "10**400"])
def test_threshold_beyond_float32_is_infinite_as_a_float64_tensor_is(value):
    x = torch.randn(4, 8)
    want = lipkern.remap_act(x, torch.tensor(float("inf")), act="gelu")
    assert torch.equal(lipkern.remap_act(x, value, act="gelu"), want)
    assert torch.equal(lipkern.remap_act(x, torch.tensor(1e300, dtype=torch.float64), act="gelu"), want)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("threshold", -1e300, "threshold must be >= 0"),
        ("threshold", -(10**400), "threshold must be >= 0"),
        ("center", -1e39, "center must be finite"),
        ("center", 3.5e38, "center must be finite"),
        ("center", 10**400, "center must be finite"),  # beyond float64 too
    ],
    ids=["threshold=-1e300", "threshold=-10**400", "center=-1e39", "center=3.5e38", "center=10**400"],
)
def test_numbers_beyond_float32_name_the_argument(name, value, message):
    kwargs = {"threshold": 0.1, name: value}
    with pytest.raises(ValueError, match=message):
        lipkern.remap_act(torch.randn(4, 8), act="relu", **kwargs)


def test_largest_float32_values_are_kept():
    big = torch.finfo(torch.float32).max
    x = torch.randn(4, 8)
    assert torch.equal(
        lipkern.remap_act(x, 0.1, act="relu", center=big),
        lipkern.remap_act(x, 0.1, act="relu", center=torch.tensor(big)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["gelu", "silu"])
@pytest.mark.parametrize("parameter", ["threshold", "center"])
def test_inplace_with_a_threshold_or_centre_inside_x(backend, act, parameter):
    # The kernels read the parameters while they write x: a row of x as the threshold or centre
    # must act as the row's values before the call, not as they are being remapped.
    x = torch.randn(2000, 64)
    x[3] = x[3].abs()  # a valid threshold row: >= 0
    before = x.clone()
    if parameter == "threshold":
        args, kwargs = (x[3],), {}
        want = lipkern.remap_act(before, before[3].clone(), act=act, backend=backend)
    else:
        args, kwargs = (0.05,), {"center": x[3]}
        want = lipkern.remap_act(
            before, 0.05, act=act, center=before[3].clone(), backend=backend
        )
    lipkern.remap_act_(x, *args, act=act, backend=backend, **kwargs)
    assert torch.equal(x, want)
