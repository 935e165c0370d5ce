"""The ``lipkern::*`` operators: schemas, fake (meta) kernels and autograd.

The schemas live here, in Python, so that the ops exist whatever backends are built; the C++
extension adds the CPU kernels (``TORCH_LIBRARY_IMPL(lipkern, CPU, ...)``) and
:mod:`lipkern.ops.triton_backend` the CUDA ones. Registering autograd and fake kernels once at
this level gives every backend the same ``torch.compile`` / ``torch.export`` / autograd
behaviour. For CPU tensors the extension overrides the autograd kernels with the same formulas in
C++ (``csrc/autograd.cpp``, the ``AutogradCPU`` key): this Python one runs on every call, grad or
not, which inside a model costs several times a small op's own time (the figures are in the
README, "Backends").

Higher-order gradients are supported, not refused: a gradient penalty (``create_graph=True``)
through a remap is a normal use in robustness training, and a refusal would push users to the
reference backend, which is many times slower. The backward ``dx = dy * act'(x) * keep`` is
differentiable in ``dy`` (the same op on the incoming gradient) and in ``x``
(``dy * act''(x) * keep``: the keep mask is piecewise constant, so it contributes nothing away
from the threshold, where the first derivative already jumps). That second derivative is
:func:`lipkern.ops.reference.activation_second_derivative` with the reference's mask; it differs
from a backend's own mask only inside the tie band around ``t`` (see ``lipkern.testing``).

``remap_act_`` overwrites ``x``, so like ATen's in-place ops it bumps ``x``'s version counter (a
backward that saved ``x`` earlier then raises instead of using the new values) and refuses an
inference tensor outside ``torch.inference_mode()``. The extension does both in C++ (the
``ADInplaceOrView`` key, no Python per call); without the extension the kernel below does it.
"""

from __future__ import annotations

import torch

from lipkern import _ext
from lipkern.ops import reference

_LIB = torch.library.Library("lipkern", "DEF")
_LIB.define(
    "remap_act(Tensor x, Tensor threshold, Tensor? center, str act, int channel_dim, "
    "bool straight_through=False) -> Tensor"
)
_LIB.define(
    "remap_act_backward(Tensor grad_y, Tensor x, Tensor threshold, Tensor? center, str act, "
    "int channel_dim, bool straight_through) -> Tensor"
)
_LIB.define(
    "remap_act_stats(Tensor x, Tensor threshold, Tensor? center, str act, int channel_dim) "
    "-> (Tensor y, Tensor amax, Tensor remapped, Tensor count, Tensor sum, Tensor sumsq)"
)
_LIB.define(
    "remap_act_(Tensor(a!) x, Tensor threshold, Tensor? center, str act, int channel_dim) -> ()"
)
_LIB.define(
    "remap_act_double_backward(Tensor grad_grad_x, Tensor grad_y, Tensor x, Tensor threshold, "
    "Tensor? center, str act, int channel_dim, bool straight_through) "
    "-> (Tensor grad_grad_y, Tensor grad_x)"
)


def _remap_act_double_backward(
    grad_grad_x, grad_y, x, threshold, center, act, channel_dim, straight_through
):
    """Gradients of ``dx = remap_act_backward(grad_y, x, ...)`` given ``grad_grad_x`` (module
    docstring). Written with differentiable ops, so every further order differentiates too."""
    grad_grad_y = torch.ops.lipkern.remap_act_backward(
        grad_grad_x, x, threshold, center, act, channel_dim, straight_through
    )
    second = reference.activation_second_derivative(x.float(), act)
    if not straight_through:
        _, _, mask = reference.activate_and_mask(x, threshold, center, act, channel_dim)
        second = second.masked_fill(mask, 0.0)
    grad_x = (grad_grad_x.float() * grad_y.float() * second).to(x.dtype)
    return grad_grad_y, grad_x


_LIB.impl("remap_act_double_backward", _remap_act_double_backward, "CompositeImplicitAutograd")


def overwrite(x: torch.Tensor, write) -> None:
    """Run ``write()``, which overwrites ``x``, as ATen's in-place ops do: refuse an inference
    tensor outside inference mode (it has no version counter that could tell autograd) before
    anything is written, then bump ``x``'s version counter."""
    if x.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            "remap_act_: x is an inference tensor, which may be updated in place only inside "
            "torch.inference_mode(); clone it first to get a normal tensor"
        )
    write()
    torch.autograd.graph.increment_version(x)


def _remap_act_inplace_or_view(x, threshold, center, act, channel_dim):
    def write():
        with torch._C._AutoDispatchBelowADInplaceOrView():
            torch.ops.lipkern.remap_act_(x, threshold, center, act, channel_dim)

    overwrite(x, write)


if _ext.missing_reason() is not None:
    _LIB.impl("remap_act_", _remap_act_inplace_or_view, "ADInplaceOrView")


@torch.library.register_fake("lipkern::remap_act")
def _remap_act_fake(x, threshold, center, act, channel_dim, straight_through=False):
    return torch.empty_like(x)


@torch.library.register_fake("lipkern::remap_act_backward")
def _remap_act_backward_fake(grad_y, x, threshold, center, act, channel_dim, straight_through):
    return torch.empty_like(x)


@torch.library.register_fake("lipkern::remap_act_stats")
def _remap_act_stats_fake(x, threshold, center, act, channel_dim):
    channels = x.shape[channel_dim]
    return (
        torch.empty_like(x),
        x.new_empty(channels, dtype=torch.float32),
        x.new_empty(channels, dtype=torch.int64),
        x.new_empty(channels, dtype=torch.int64),
        x.new_empty(channels, dtype=torch.float64),
        x.new_empty(channels, dtype=torch.float64),
    )


@torch.library.register_fake("lipkern::remap_act_")
def _remap_act_inplace_fake(x, threshold, center, act, channel_dim):
    return None


def _setup_context(ctx, inputs, output):
    x, threshold, center, act, channel_dim = inputs[:5]
    ctx.straight_through = inputs[5] if len(inputs) > 5 else False
    ctx.act, ctx.channel_dim = act, channel_dim
    ctx.save_for_backward(x, threshold, center)
    if isinstance(output, tuple):
        # Extrema and counts of the input carry no gradient.
        ctx.mark_non_differentiable(*output[1:])


def _grad_x(ctx, grad_y):
    x, threshold, center = ctx.saved_tensors
    return torch.ops.lipkern.remap_act_backward(
        grad_y, x, threshold, center, ctx.act, ctx.channel_dim, ctx.straight_through
    )


# Thresholds and centres come from calibration data, not from training: they get no gradient.
def _remap_act_backward(ctx, grad_y):
    return _grad_x(ctx, grad_y), None, None, None, None, None


def _remap_act_stats_backward(ctx, grad_y, *stats_grads):
    return _grad_x(ctx, grad_y), None, None, None, None


torch.library.register_autograd(
    "lipkern::remap_act", _remap_act_backward, setup_context=_setup_context
)
torch.library.register_autograd(
    "lipkern::remap_act_stats", _remap_act_stats_backward, setup_context=_setup_context
)


def _setup_backward_context(ctx, inputs, output):
    grad_y, x, threshold, center, act, channel_dim, straight_through = inputs
    ctx.save_for_backward(grad_y, x, threshold, center)
    ctx.act, ctx.channel_dim, ctx.straight_through = act, channel_dim, straight_through


def _remap_act_backward_backward(ctx, grad_grad_x):
    grad_y, x, threshold, center = ctx.saved_tensors
    grad_grad_y, grad_x = torch.ops.lipkern.remap_act_double_backward(
        grad_grad_x, grad_y, x, threshold, center, ctx.act, ctx.channel_dim, ctx.straight_through
    )
    return grad_grad_y, grad_x, None, None, None, None, None


torch.library.register_autograd(
    "lipkern::remap_act_backward",
    _remap_act_backward_backward,
    setup_context=_setup_backward_context,
)
