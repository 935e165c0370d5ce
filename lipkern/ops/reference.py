"""The semantics of every lipkern op, in plain PyTorch.

This module is the ground truth: the C++ and Triton kernels are tested against it, and
``backend="reference"`` runs it. It favours clarity over speed.

All functions take *normalised* arguments (see :mod:`lipkern.ops.api`): ``threshold`` and
``center`` are float32 tensors of shape ``()`` or ``(C,)`` on ``x``'s device, ``channel_dim`` is
non-negative, ``act`` is one of :data:`lipkern.ops.activations.ACTIVATIONS`.

Per element, in float32::

    a    = act(float32(x))
    mask = |a - c| < t          # NaN compares false, so NaN is never remapped; t = 0 never remaps
    y    = c if mask else a     # rounded once to x.dtype
    dx   = dy * act'(x) * (1 if straight_through else not mask)

Statistics are taken per channel on ``a`` before the remap: max |a| (float32, NaN propagates,
0 for no elements), remapped and seen counts (int64), and the sum and sum of squares of ``a``
(float64).
"""

from __future__ import annotations

import math

import torch

from lipkern.ops.activations import (
    ACTIVATIONS,
    EXACT_ACTIVATIONS,
    GELU_TANH_CUBIC,
    GELU_TANH_SCALE,
    lookup,
)


# The most dimensions a oneDNN memory descriptor takes (DNNL_MAX_NDIMS).
_ONEDNN_MAX_DIMS = 12


def _pointwise(fn, x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    """``fn(x, *more)`` for an element-wise ``fn`` of tensors shaped like ``x``, at any rank.

    PyTorch's CPU erf-GELU and its backward hand a contiguous ``x`` (float32 / bfloat16) to
    oneDNN, which fails beyond 12 dimensions ("dimensions are invalid"). Element-wise, the same
    values come from flat views, and a contiguous ``x`` has one (the result viewed back is laid
    out as ``x``). Any other ``x`` takes PyTorch's own kernels, at any rank.
    """
    if x.dim() <= _ONEDNN_MAX_DIMS or not x.is_contiguous():
        return fn(x, *more)
    return fn(x.view(-1), *(t.reshape(-1) for t in more)).view(x.shape)


def activation_reference(x: torch.Tensor, act: str) -> torch.Tensor:
    """``act(x)`` on a float32 tensor, with PyTorch's own eager kernels.

    GELU and SiLU take their limits at infinity (``+inf -> +inf``, ``-inf -> -0``): PyTorch's
    formulas give NaN there (``inf * 0``), which would turn an infinite input into a NaN.

    Autograd through it gives :func:`activation_backward_reference`'s rule at every input: the
    smooth formula never sees an infinity (its gradient there would be NaN, and NaN times the
    unselected branch's zero stays NaN), and ReLU's NaN passes no gradient, where
    ``torch.relu``'s backward would pass ``dy``.
    """
    if act == "identity":
        return x
    if act == "relu":
        return torch.where(x.isnan(), x.detach(), torch.relu(x))
    infinite = x.isinf()
    a = _pointwise(lookup(act).torch_fn, torch.where(infinite, 0.0, x))
    limit = torch.where(x > 0, x, -0.0)
    return torch.where(infinite, limit, a)


def activation_backward_reference(grad_a: torch.Tensor, x: torch.Tensor, act: str) -> torch.Tensor:
    """``grad_a * act'(x)`` in float32, as PyTorch's autograd computes it.

    ReLU'(0) = 0 as in PyTorch; ReLU'(NaN) is taken as 0 (x > 0 is false), so that every backend
    can use the one comparison. GELU' and SiLU' take their limits at infinity (1 and 0).
    """
    if act == "identity":
        return grad_a
    if act == "relu":
        # A select, not a product: the gradient is +0 where x <= 0, as PyTorch's threshold_backward.
        return torch.where(x > 0, grad_a, 0.0)
    if act == "gelu":
        grad_x = _pointwise(lambda v, g: torch.ops.aten.gelu_backward(g, v), x, grad_a)
    elif act == "gelu_tanh":
        grad_x = torch.ops.aten.gelu_backward(grad_a, x, approximate="tanh")
    elif act == "silu":
        grad_x = torch.ops.aten.silu_backward(grad_a, x)
    else:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    # The derivatives' limits: 1 at +inf, 0 at -inf (PyTorch's formulas give NaN there).
    return torch.where(x.isinf(), torch.where(x > 0, grad_a, 0.0), grad_x)


def activation_second_derivative(x: torch.Tensor, act: str) -> torch.Tensor:
    """``act''(x)`` in float32, from float64 formulas (the double backward's ``x`` term).

    0 for identity and ReLU (piecewise linear: PyTorch's ReLU double backward is 0 too) and at
    +-inf (the limits); NaN stays NaN.
    """
    if act in EXACT_ACTIVATIONS:
        return torch.zeros_like(x, dtype=torch.float32)
    xd = x.double()
    if act == "gelu":
        # x Phi(x): 2 phi(x) + x phi'(x) = phi(x) (2 - x^2)
        second = torch.exp(-0.5 * xd * xd) / math.sqrt(2.0 * math.pi) * (2.0 - xd * xd)
    elif act == "gelu_tanh":
        # x (1 + tanh u) / 2, u = k (x + b x^3): sech^2(u) (u' - x tanh(u) u'^2 + x u'' / 2)
        u = GELU_TANH_SCALE * (xd + GELU_TANH_CUBIC * xd**3)
        du = GELU_TANH_SCALE * (1.0 + 3.0 * GELU_TANH_CUBIC * xd * xd)
        d2u = GELU_TANH_SCALE * 6.0 * GELU_TANH_CUBIC * xd
        tanh_u = torch.tanh(u)
        second = (1.0 - tanh_u * tanh_u) * (du - xd * tanh_u * du * du + 0.5 * xd * d2u)
    elif act == "silu":
        # x s(x): s (1 - s) (2 + x (1 - 2 s))
        s = torch.sigmoid(xd)
        second = s * (1.0 - s) * (2.0 + xd * (1.0 - 2.0 * s))
    else:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    return torch.where(x.isinf(), 0.0, second).float()


def broadcast_per_channel(p: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """View a () or (C,) parameter so that it broadcasts along ``channel_dim`` of an ndim tensor."""
    if p.dim() == 0:
        return p
    shape = [1] * ndim
    shape[channel_dim] = p.numel()
    return p.view(shape)


def activate_and_mask(x, threshold, center, act, channel_dim):
    a = activation_reference(x.float(), act)
    t = broadcast_per_channel(threshold, x.dim(), channel_dim)
    c = None if center is None else broadcast_per_channel(center, x.dim(), channel_dim)
    distance = a.abs() if c is None else (a - c).abs()
    return a, c, distance < t


def _remapped(a, c, mask):
    fill = torch.zeros((), dtype=a.dtype, device=a.device) if c is None else c
    return torch.where(mask, fill, a)


def remap_act_reference(x, threshold, center, act, channel_dim, straight_through=False):
    """The fused op's output, differentiable through autograd.

    With ``straight_through`` the forward value is unchanged but the gradient skips the mask
    (the BPDA gradient an adaptive attacker uses).
    """
    a, c, mask = activate_and_mask(x, threshold, center, act, channel_dim)
    y = _remapped(a, c, mask)
    if straight_through:
        # Not a + (y - a).detach(), which rounds a centre c to a + (c - a). Where the mask holds,
        # a is finite, so a.detach() - a is +0 and y - (+0) is y bit for bit (a -0 centre too).
        y = torch.where(mask, y.detach() - (a.detach() - a), a)
    return y.to(x.dtype)


def remap_act_backward_reference(grad_y, x, threshold, center, act, channel_dim, straight_through):
    """``dx`` for :func:`remap_act_reference`, written out (the kernels implement this formula)."""
    grad_a = grad_y.float()
    if not straight_through:
        _, _, mask = activate_and_mask(x, threshold, center, act, channel_dim)
        grad_a = grad_a.masked_fill(mask, 0.0)
    return activation_backward_reference(grad_a, x.float(), act).to(x.dtype)


def remap_act_stats_reference(x, threshold, center, act, channel_dim):
    """``(y, amax, remapped, count, sum, sumsq)``: the output plus per-channel statistics."""
    a, c, mask = activate_and_mask(x, threshold, center, act, channel_dim)
    y = _remapped(a, c, mask).to(x.dtype)
    channels = x.shape[channel_dim]
    reduce_dims = [d for d in range(x.dim()) if d != channel_dim]
    if x.numel() == 0:
        amax = torch.zeros(channels, dtype=torch.float32, device=x.device)
    else:
        amax = a.abs().amax(dim=reduce_dims) if reduce_dims else a.abs()
    per_channel = x.numel() // channels if channels else 0
    count = torch.full((channels,), per_channel, dtype=torch.int64, device=x.device)
    remapped = mask.to(torch.int64).sum(dim=reduce_dims) if reduce_dims else mask.to(torch.int64)
    a64 = a.double()
    total = a64.sum(dim=reduce_dims) if reduce_dims else a64
    total_sq = (a64 * a64).sum(dim=reduce_dims) if reduce_dims else a64 * a64
    return y, amax, remapped, count, total, total_sq


def remap_act_inplace_reference(x, threshold, center, act, channel_dim):
    """In-place forward: writes :func:`remap_act_reference` into ``x``."""
    x.copy_(remap_act_reference(x, threshold, center, act, channel_dim))
    return x
