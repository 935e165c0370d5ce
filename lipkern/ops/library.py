"""The ``lipkern::*`` operators: schemas, fake (meta) kernels and autograd.

The schemas live here, in Python, so that the ops exist whatever backends are built; the C++
extension adds the CPU kernels (``TORCH_LIBRARY_IMPL(lipkern, CPU, ...)``) and
:mod:`lipkern.ops.triton_backend` the CUDA ones. Registering autograd and fake kernels once at
this level gives every backend the same ``torch.compile`` / ``torch.export`` / autograd
behaviour. For CPU tensors the extension overrides the autograd kernels with the same formulas in
C++ (``csrc/autograd.cpp``, the ``AutogradCPU`` key): this Python one runs on every call, grad or
not, which cost up to 25 us per call inside a model.
"""

from __future__ import annotations

import torch

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
