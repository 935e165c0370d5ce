"""The public op API: argument errors, torch.library integration, compile, export, properties."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lipkern
from lipkern.ops.api import normalise_arguments
from lipkern.testing import compare_forward
from lipkern.ulp import same_bits

from conftest import kernel_backends

BACKENDS = kernel_backends()
X = torch.randn(4, 6)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # PyTorch warns that these layouts are beta / prototype
    CSR = X.to_sparse_csr()
    NESTED = torch.nested.nested_tensor([torch.randn(2, 6), torch.randn(3, 6)], layout=torch.jagged)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.zeros(3, dtype=torch.int32)), TypeError, "x must be float16, bfloat16 or float32"),
        (dict(x=torch.zeros(3, dtype=torch.complex64)), TypeError, "x must be float16"),
        (dict(x=torch.zeros(3, dtype=torch.float64)), TypeError, "got dtype torch.float64"),
        (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.tensor(1.0)), ValueError, "x must have at least one dimension"),
        (dict(x=X.to_sparse()), TypeError, r"x must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
        (dict(x=CSR), TypeError, r"x must be a dense \(strided\) tensor, got layout torch.sparse_csr"),
        (dict(x=X.to_mkldnn()), TypeError, r"x must be a dense \(strided\) tensor, got layout torch._mkldnn"),
        (dict(x=NESTED), TypeError, r"x must be a dense \(strided\) tensor, got a nested tensor"),
        (dict(threshold=-0.1), ValueError, "threshold must be >= 0"),
        (dict(threshold=float("nan")), ValueError, "threshold must not be NaN"),
        (dict(threshold=torch.tensor([0.1, -1, 0, 0, 0, 0])), ValueError, "threshold must be >= 0"),
        (dict(threshold=torch.tensor([0.1, float("nan"), 0, 0, 0, 0])), ValueError, "threshold must not contain NaN"),
        (dict(threshold=torch.zeros(5)), ValueError, r"threshold must have shape \(\) or \(6,\)"),
        (dict(threshold=torch.zeros(6, dtype=torch.int64)), TypeError, "threshold must be a floating-point"),
        (dict(threshold="0.1"), TypeError, "threshold must be a real number or a tensor, got builtins.str"),
        (dict(threshold=True), TypeError, "threshold must be a real number or a tensor, got builtins.bool"),
        (dict(center=torch.zeros(2, 3)), ValueError, r"center must have shape \(\) or \(6,\)"),
        (dict(center=float("inf")), ValueError, "center must be finite"),
        (dict(center=torch.tensor(float("nan"))), ValueError, "center must not contain NaN"),
        (dict(threshold=torch.full((6,), 0.1, requires_grad=True)), ValueError,
         r"threshold requires grad, but the remap is not differentiable .*pass threshold\.detach\(\)"),
        (dict(center=torch.zeros((), requires_grad=True)), ValueError,
         r"center requires grad, but the remap is not differentiable .*pass center\.detach\(\)"),
        (dict(channel_dim=2), ValueError, "channel_dim=2 is out of range"),
        (dict(channel_dim=-3), ValueError, "channel_dim=-3 is out of range"),
        (dict(channel_dim=1.0), TypeError, "channel_dim must be an int"),
        (dict(channel_dim=np.float64(1)), TypeError, r"channel_dim must be an integer \(an int or a numpy integer\), got float64"),
        (dict(channel_dim=True), TypeError, "channel_dim must be an integer .*got bool"),
        (dict(channel_dim=np.bool_(True)), TypeError, "channel_dim must be an integer .*got bool"),
        (dict(act="tanh"), ValueError, "act must be one of"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.parametrize("function", ["remap_act", "remap_act_stats", "remap_act_"])
def test_bad_input_raises_a_clear_error(function, kwargs, error, match):
    arguments = dict(x=X.clone(), threshold=0.1, act="relu", center=None, channel_dim=-1)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        getattr(lipkern, function)(**arguments)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_a_threshold_that_requires_grad_is_taken_where_nothing_records(backend):
    # Under no_grad no gradient can go missing: an nn.Parameter threshold serves inference.
    x, t = torch.randn(4, 6), torch.rand(6)
    want = lipkern.remap_act(x, t, "gelu", backend=backend)
    with torch.no_grad():
        y = lipkern.remap_act(x, torch.nn.Parameter(t.clone()), "gelu", center=torch.nn.Parameter(t * 0),
                              backend=backend)
    assert same_bits(y, want).all()


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("channel_dim", [np.int64(1), np.int32(-2), torch.tensor(1)], ids=repr)
def test_channel_dim_may_be_any_integer(backend, channel_dim):
    x, t = torch.randn(2, 6, 3), torch.rand(6)
    want, want_stats = lipkern.remap_act_stats(x, t, "gelu", channel_dim=1, backend=backend)
    y = lipkern.remap_act(x, t, "gelu", channel_dim=channel_dim, backend=backend)
    y_stats, stats = lipkern.remap_act_stats(x, t, "gelu", channel_dim=channel_dim, backend=backend)
    y_inplace = lipkern.remap_act_(x.clone(), t, "gelu", channel_dim=channel_dim, backend=backend)
    assert all(same_bits(out, want).all() for out in (y, y_stats, y_inplace))
    assert all(torch.equal(a, b) for a, b in zip(stats.as_tuple(), want_stats.as_tuple()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch_names_the_argument():
    with pytest.raises(ValueError, match="threshold is on cuda"):
        lipkern.remap_act(X, torch.tensor(0.1, device="cuda"), "relu")


def test_device_mismatch_on_meta_names_the_argument():
    """Same check without a GPU: a threshold on another device than x is refused by name."""
    with pytest.raises(ValueError, match="center is on meta"):
        lipkern.remap_act(X, 0.1, "relu", center=torch.zeros((), device="meta"))


def test_cpu_backend_on_a_non_cpu_tensor_is_refused():
    with pytest.raises(RuntimeError, match="backend 'cpu' runs on cpu tensors"):
        lipkern.remap_act(torch.zeros(3, device="meta"), 0.1, "relu", backend="cpu")


def test_a_model_on_the_meta_device_runs_for_its_shapes():
    """auto picks the reference there, whose PyTorch ops have meta kernels."""
    x = torch.empty(2, 8, 4, 4, device="meta")
    y, stats = lipkern.remap_act_stats(x, torch.zeros(8, device="meta"), "gelu", channel_dim=1)
    assert (y.shape, y.device.type, stats.amax.shape) == (x.shape, "meta", (8,))
    with torch.device("meta"):
        model = lipkern.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU()))
    assert model(torch.empty(2, 3, 4, 4, device="meta")).shape == (2, 8, 4, 4)


def test_inplace_refuses_a_tensor_that_requires_grad():
    with pytest.raises(RuntimeError, match="remap_act_ is for inference"):
        lipkern.remap_act_(torch.randn(3, requires_grad=True), 0.1)


def test_missing_extension_is_a_clear_error(monkeypatch):
    from lipkern import _ext

    monkeypatch.setattr(_ext, "missing_reason", lambda: "lipkern._C is not built; build it with pip")
    with pytest.raises(_ext.ExtensionNotBuiltError, match="build it"):
        lipkern.remap_act(X, 0.1, "relu", backend="cpu")
    with pytest.raises(_ext.ExtensionNotBuiltError):
        lipkern.remap_act(X, 0.1, "relu")  # auto must not fall back to the reference


def _op_samples():
    x = torch.randn(5, 7, 3)
    t = torch.rand(7)
    c = torch.randn(7) * 0.1
    for act in lipkern.ACTIVATIONS:
        yield (x, t, None, act, 1)
        yield (x.to(torch.bfloat16), torch.tensor(0.3), c, act, 2 if act == "relu" else 1)


@pytest.mark.parametrize("sample", list(_op_samples()), ids=lambda s: f"{s[3]}-{s[0].dtype}")
def test_opcheck(sample):
    x, t, c, act, dim = sample
    if dim == 2:
        t = torch.tensor(0.3)
        c = None
    grad_x = x.clone().requires_grad_(x.dtype == torch.float32)
    torch.library.opcheck(torch.ops.lipkern.remap_act.default, (grad_x, t, c, act, dim, False))
    torch.library.opcheck(torch.ops.lipkern.remap_act_stats.default, (x, t, c, act, dim))
    torch.library.opcheck(
        torch.ops.lipkern.remap_act_backward.default, (torch.randn_like(x), x, t, c, act, dim, True)
    )
    torch.library.opcheck(torch.ops.lipkern.remap_act_.default, (x.clone(), t, c, act, dim))


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("center", [None, "center"])
def test_autograd_kernels(device, center):
    """CPU tensors go through the C++ autograd kernel (csrc/autograd.cpp), other devices through
    the Python one (lipkern/ops/library.py; meta tensors reach it here): both give dx from
    remap_act_backward, no gradient to thresholds or centres, non-differentiable statistics, and
    no graph when nothing requires grad."""
    if device == "cpu":
        pytest.importorskip("lipkern._C", reason="lipkern's C++ extension is not built")
    ops = torch.ops.lipkern
    node = "RemapActFunction" if device == "cpu" else "GeneratedBackwardFor_lipkern_remap_act"
    x = torch.randn(6, 5, device=device)
    c = torch.randn(5, device=device) * 0.1 if center else None
    t = torch.full((5,), 0.4, device=device)
    grad_y = torch.randn(6, 5, device=device)
    expected = ops.remap_act_backward(grad_y, x, t, c, "gelu", 1, False)

    leaf = x.clone().requires_grad_(True)
    y = ops.remap_act(leaf, t, c, "gelu", 1, False)
    assert node in y.grad_fn.name()
    y.backward(grad_y)
    stats_leaf = x.clone().requires_grad_(True)
    y_s, *stats = ops.remap_act_stats(stats_leaf, t, c, "gelu", 1)
    assert not any(s.requires_grad for s in stats)
    y_s.backward(grad_y)
    if device == "cpu":
        assert torch.equal(leaf.grad, expected) and torch.equal(stats_leaf.grad, expected)
    else:
        assert leaf.grad.shape == stats_leaf.grad.shape == x.shape

    parameter = t.clone().requires_grad_(True)
    y = ops.remap_act(x, parameter, c, "gelu", 1, False)
    assert y.requires_grad  # as for any op taking a tensor that requires grad
    y.sum().backward()
    assert parameter.grad is None
    with torch.no_grad():
        assert ops.remap_act(leaf, t, c, "gelu", 1, False).grad_fn is None


def test_compile_fullgraph_has_no_graph_break():
    def block(x, threshold):
        h = torch.nn.functional.linear(x, torch.ones(16, 16) / 16)
        return lipkern.remap_act(h, threshold, "gelu", channel_dim=-1) * 2

    x = torch.randn(8, 16, requires_grad=True)
    threshold = torch.full((16,), 0.05)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    eager = block(x, threshold)
    out = compiled(x, threshold)
    assert same_bits(out, eager).all()
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    (g_compiled,) = torch.autograd.grad(compiled(x, threshold).sum(), x)
    assert torch.allclose(g_eager, g_compiled)
    explanation = torch._dynamo.explain(block)(x, threshold)
    assert explanation.graph_break_count == 0


def test_compile_of_stats_has_no_graph_break():
    def scan(x):
        y, stats = lipkern.remap_act_stats(x, 0.1, "relu", channel_dim=1)
        return y, stats.amax, stats.count

    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    y, amax, count = torch.compile(scan, fullgraph=True)(x)
    y_eager, amax_eager, count_eager = scan(x)
    assert same_bits(y, y_eager).all() and torch.equal(amax, amax_eager)
    assert torch.equal(count, count_eager)


@pytest.mark.parametrize("parameter", ["threshold", "center"])
def test_compile_takes_a_float_that_changes_between_calls(parameter):
    """From the second value on, torch.compile traces a float argument as a symbolic number;
    the values are still checked, by guards that retrace on a value eager would refuse."""

    def remap(x, value):
        if parameter == "threshold":
            return lipkern.remap_act(x, value, "gelu")
        return lipkern.remap_act(x, 0.1, "gelu", center=value)

    x = torch.randn(64, 8)
    torch._dynamo.reset()
    compiled = torch.compile(remap, fullgraph=True, backend="aot_eager")
    for value in (0.05, 0.1, 0.3):
        assert same_bits(compiled(x, value), remap(x, value)).all()
    bad, message = (-0.1, "threshold must be >= 0") if parameter == "threshold" else (
        float("inf"), "center must be finite"
    )
    with pytest.raises(ValueError, match=message):
        torch.compile(remap, backend="aot_eager")(x, bad)


def test_export_keeps_the_op():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.register_buffer("threshold", torch.full((8,), 0.05))

        def forward(self, x):
            return self.fc(lipkern.remap_act(x, self.threshold, "silu"))

    block = Block()
    exported = torch.export.export(block, (torch.randn(4, 8),))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert "lipkern.remap_act.default" in targets
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(exported.module()(x), block(x))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 40),
    channels=st.integers(1, 40),
    act=st.sampled_from(lipkern.ACTIVATIONS),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    threshold=st.floats(0, 4),
    per_channel=st.booleans(),
    with_center=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_forward_matches_reference(
    backend, rows, channels, act, dtype, threshold, per_channel, with_center, seed
):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, channels, generator=generator) * 3).to(dtype)
    t = torch.rand(channels, generator=generator) * threshold if per_channel else threshold
    c = torch.randn(channels, generator=generator) if with_center else None
    y, stats = lipkern.remap_act_stats(x, t, act, c, -1, backend=backend)
    tn, cn, d = normalise_arguments(x, t, act, c, -1)
    assert compare_forward(y, x, tn, cn, act, d).ok
    assert stats.count.tolist() == [rows] * channels


def test_prechecked_inplace_refuses_a_tensor_that_requires_grad():
    from lipkern.ops.api import remap_act_prechecked

    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace=True.*requires grad"):
        remap_act_prechecked(x, torch.tensor(0.1), None, "relu", -1, inplace=True)
    with torch.no_grad():
        y = x.detach().clone()
        assert remap_act_prechecked(y, torch.tensor(0.1), None, "relu", -1, inplace=True) is y


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("act", lipkern.ACTIVATIONS)
def test_forward_mode_and_torch_func_differentiate_by_the_backward_rule(backend, act):
    """The ops' autograd is reverse mode only (registered in C++ for CPU tensors, which
    forward-mode AD passed by with a zero tangent and functorch refused), so under forward-mode
    AD and torch.func transforms every backend runs the reference: the tangent of y is
    act'(x) * mask * v, the backward rule with v for dy, and torch.func.grad agrees with the
    kernels' reverse mode."""
    from lipkern.ops import reference
    from lipkern.testing import compare_backward

    x = torch.randn(5, 6) * 2
    threshold, center = torch.rand(6) * 0.5, torch.randn(6) * 0.1
    v = torch.randn(5, 6)

    def f(z):
        return lipkern.remap_act(z, threshold, act, center, -1, backend=backend)

    rule = reference.remap_act_backward_reference(v, x, threshold, center, act, 1, False)
    for tangent in (torch.func.jvp(f, (x,), (v,))[1],
                    (torch.func.jacfwd(f)(x) * v).sum((2, 3))):
        assert compare_backward(tangent, v, x, threshold, center, act, 1, False).ok
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, v)
        y, _ = lipkern.remap_act_stats(dual, threshold, act, center, -1, backend=backend)
        tangent = torch.autograd.forward_ad.unpack_dual(3 * y + dual).tangent
    assert torch.allclose(tangent, 3 * rule + v, rtol=1e-6, atol=1e-6)
    leaf = x.clone().requires_grad_(True)
    (reverse,) = torch.autograd.grad(f(leaf), leaf, v)
    assert torch.allclose(torch.func.vjp(f, x)[1](v)[0], reverse, rtol=1e-6, atol=1e-6)
    assert torch.allclose(torch.func.grad(lambda z: (f(z) * v).sum())(x), reverse,
                          rtol=1e-6, atol=1e-6)


def test_forward_mode_through_a_calibrated_model():
    """torch.func.jvp of a converted, calibrated model is its Jacobian times v (it was 0)."""
    torch.manual_seed(0)
    model = lipkern.convert(torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2)))
    lipkern.calibrate(model, [torch.randn(32, 8)], c_r=0.3, progress=False)
    assert model[1].threshold.max() > 0
    x, v = torch.randn(8), torch.randn(8)
    jvp = torch.func.jvp(model, (x,), (v,))[1]
    assert torch.allclose(jvp, torch.autograd.functional.jacobian(model, x) @ v, atol=1e-6)
    assert jvp.abs().max() > 0


def test_numbers_of_every_kind_are_thresholds_and_straight_through_is_a_bool():
    """numpy's scalars are numbers (np.float32 is no Python float); straight_through="no"
    would have meant True."""
    x = torch.randn(4, 6)
    want = lipkern.remap_act(x, 0.25, "gelu")
    for threshold in (np.float32(0.25), np.float64(0.25), np.float16(0.25)):
        assert same_bits(lipkern.remap_act(x, threshold, "gelu"), want).all()
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="straight_through must be a bool"):
            lipkern.remap_act(x, 0.25, "gelu", straight_through=bad)


def test_forward_mode_under_torch_compile():
    """Compiled, torch.func.jvp and grad take the reference too (the compiled jvp gave zero
    tangents, the compiled grad refused the C++ autograd)."""
    from lipkern.ops import reference

    x, v = torch.randn(5, 6) * 2, torch.randn(5, 6)
    threshold = torch.rand(6) * 0.5

    def f(z):
        return lipkern.remap_act(z, threshold, "gelu", None, -1)

    rule = reference.remap_act_backward_reference(v, x, threshold, None, "gelu", 1, False)
    jvp = torch.compile(lambda a, b: torch.func.jvp(f, (a,), (b,))[1], backend="aot_eager")
    assert torch.allclose(jvp(x, v), rule, rtol=1e-6, atol=1e-6)
    grad = torch.compile(torch.func.grad(lambda z: (f(z) * v).sum()), backend="aot_eager")
    assert torch.allclose(grad(x), rule, rtol=1e-6, atol=1e-6)
