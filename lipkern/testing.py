"""How a backend's output is judged against the reference (shared by the tests and ``verify``).

Exactness rules:

- ``relu`` and ``identity`` involve no rounding but the final cast, so every backend must be
  bit-identical to the reference (NaN matches any NaN).
- ``gelu``, ``gelu_tanh`` and ``silu`` go through ``erf`` / ``tanh`` / ``exp``, whose fp32
  implementations differ between libraries by an ulp or two. An element passes when it is within
  1 ulp of the reference in the output dtype, or when it is no further from the float64 value
  of the activation than the reference is, plus 1 ulp (PyTorch's fp32 ``1 + erf`` form cancels
  for negative inputs, so the reference itself can be many ulps off there).
- The mask ``|a - c| < t`` is compared outside a *tie band*: where ``|a - c|`` lies within
  ``TIE_BAND_ULPS`` fp32 ulps of ``t`` (ulps of ``a``, ``c`` and ``t`` added, the rounding a
  backend's ``a`` and ``a - c`` can carry), a 1-ulp difference in ``a`` legitimately flips the
  comparison; there either outcome is accepted, as long as the value is the remapped ``c`` or
  the activation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lipkern.ops import reference
from lipkern.ops.activations import EXACT_ACTIVATIONS, GELU_TANH_CUBIC, GELU_TANH_SCALE
from lipkern.ulp import same_bits, ulp_distance, ulp_size

TIE_BAND_ULPS = 4



def activation_float64(x: torch.Tensor, act: str) -> torch.Tensor:
    """The activation in float64, in forms that do not cancel (the ground truth for accuracy).

    ``1 + erf(x / sqrt2)`` and ``1 + tanh(u)`` lose everything for negative ``x`` even in
    float64, so GELU uses ``erfc`` and GELU-tanh ``2 sigmoid(2u)``.
    """
    x = x.double()
    if act in EXACT_ACTIVATIONS:
        return reference.activation_reference(x, act)
    if act == "gelu":
        a = 0.5 * x * torch.special.erfc(-x / 2**0.5)
    elif act == "gelu_tanh":
        u = GELU_TANH_SCALE * (x + GELU_TANH_CUBIC * x**3)
        a = x * torch.sigmoid(2 * u)
    else:
        a = x * torch.sigmoid(x)
    return torch.where(x.isinf(), torch.where(x > 0, x, -0.0), a)


def activation_grad_float64(x: torch.Tensor, act: str) -> torch.Tensor:
    """``act'(x)`` in float64 without cancellation (limits 1 and 0 at +-inf)."""
    x = x.double()
    if act == "identity":
        return torch.ones_like(x)
    if act == "relu":
        return (x > 0).double()
    if act == "gelu":
        cdf = 0.5 * torch.special.erfc(-x / 2**0.5)
        grad = cdf + x * torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5
    elif act == "gelu_tanh":
        u = GELU_TANH_SCALE * (x + GELU_TANH_CUBIC * x**3)
        s, s_neg = torch.sigmoid(2 * u), torch.sigmoid(-2 * u)
        du = GELU_TANH_SCALE * (1 + 3 * GELU_TANH_CUBIC * x * x)
        grad = s + 2 * x * s * s_neg * du
    else:
        s = torch.sigmoid(x)
        grad = s * (1 + x * torch.sigmoid(-x))
    return torch.where(x.isinf(), (x > 0).double(), grad)


@dataclass
class Comparison:
    max_ulp: int  # largest ulp distance from the reference outside the tie band
    mask_mismatches: int  # elements outside the tie band whose remap decision differs
    failures: int  # elements that break the rule for this activation
    tie_band: int  # elements inside the tie band

    @property
    def ok(self) -> bool:
        return self.failures == 0 and self.mask_mismatches == 0


def _per_channel(p, ndim, channel_dim):
    return reference.broadcast_per_channel(p, ndim, channel_dim)


def _fp32_ulp(v: torch.Tensor) -> torch.Tensor:
    return ulp_size(v.float().nan_to_num(posinf=0.0, neginf=0.0), torch.float32)


def reference_mask_and_band(x, threshold, center, act, channel_dim):
    """Reference activation ``a`` (fp32), its mask, and the tie band around ``t``.

    The band also holds the elements where the reference's own decision differs from the
    float64 one (its fp32 activation can be far off where the formula cancels): there the
    reference is no authority, and either decision is accepted.
    """
    a = reference.activation_reference(x.float(), act)
    t = _per_channel(threshold, x.dim(), channel_dim).expand_as(a)
    c = (
        torch.zeros_like(a)
        if center is None
        else _per_channel(center, x.dim(), channel_dim).expand_as(a)
    )
    distance = (a - c).abs()
    mask = distance < t
    width = TIE_BAND_ULPS * (_fp32_ulp(a) + _fp32_ulp(c) + _fp32_ulp(t))
    band = ((distance.double() - t.double()).abs() <= width) & t.gt(0) & a.isfinite()
    if act not in EXACT_ACTIVATIONS:
        exact_mask = (activation_float64(x, act) - c.double()).abs() < t.double()
        band |= exact_mask != mask
    return a, c, mask, band


def _close_or_more_accurate(value, ref_value, truth64, max_ulps):
    """``value`` within ``max_ulps`` of ``ref_value``, or no further from ``truth64`` + 1 ulp."""
    near = ulp_distance(value, ref_value) <= max_ulps
    err = (value.double() - truth64).abs()
    ref_err = (ref_value.double() - truth64).abs()
    more_accurate = err <= ref_err + ulp_size(ref_value, value.dtype)
    both_nan = value.isnan() & ref_value.isnan()
    return near | (more_accurate & truth64.isfinite()) | both_nan


def compare_forward(y, x, threshold, center, act, channel_dim) -> Comparison:
    """Judge a backend's forward output ``y`` for the normalised arguments."""
    y_ref = reference.remap_act_reference(x, threshold, center, act, channel_dim)
    a, c, ref_mask, band = reference_mask_and_band(x, threshold, center, act, channel_dim)
    fill = c.to(y.dtype)
    distance = ulp_distance(y, y_ref)
    if act in EXACT_ACTIVATIONS:
        failures = int((~same_bits(y, y_ref)).sum())
        return Comparison(_max(distance), 0, failures, 0)
    truth = torch.where(ref_mask, c.double(), activation_float64(x, act))
    good = _close_or_more_accurate(y, y_ref, truth, 1)
    activation_value = a.to(y.dtype)
    # Where the activation rounds to within the 1 ulp allowed of the fill value, the output
    # cannot tell the two decisions apart (nor is the sign of a zero a decision).
    decisions_differ = ulp_distance(activation_value, fill) > 1
    mismatch = ((y == fill) != ref_mask) & ~band & decisions_differ
    # Inside the band either decision is right, provided the value is one of the two outcomes.
    either = same_bits(y, fill) | _close_or_more_accurate(
        y, activation_value, activation_float64(x, act), 1
    )
    failures = (~good & ~band) | (band & ~either)
    return Comparison(
        _max(torch.where(band, 0, distance)),
        int(mismatch.sum()),
        int(failures.sum()),
        int(band.sum()),
    )


def _derivative_error_bound(grad_y, x, dtype):
    """Absolute error an fp32 evaluation of ``dy * act'(x)`` may carry.

    The derivative's terms cancel (GELU' crosses zero near x = -0.75, SiLU' near x = -1.28), so
    fp32 evaluations are accurate only relative to the terms' size, about ``|dy| (1 + |x|)``;
    the output rounding to ``dtype`` comes on top.
    """
    terms = grad_y.double().abs() * (1.0 + x.double().abs())
    return 8 * 2.0**-24 * terms


def compare_backward(dx, grad_y, x, threshold, center, act, channel_dim, straight_through):
    """Judge a backend's ``dx``: exact for ReLU / identity; else within 2 ulps, or no less
    accurate than the reference, or within the fp32 cancellation bound of the derivative.

    Elements in the tie band may use either mask decision.
    """
    dx_ref = reference.remap_act_backward_reference(
        grad_y, x, threshold, center, act, channel_dim, straight_through
    )
    distance = ulp_distance(dx, dx_ref)
    if act in EXACT_ACTIVATIONS:
        return Comparison(_max(distance), 0, int((~same_bits(dx, dx_ref)).sum()), 0)
    _, _, ref_mask, band = reference_mask_and_band(x, threshold, center, act, channel_dim)
    if straight_through:
        ref_mask, band = torch.zeros_like(ref_mask), torch.zeros_like(band)
    unmasked_truth = grad_y.double() * activation_grad_float64(x, act)
    truth = unmasked_truth.masked_fill(ref_mask, 0.0)
    bound = _derivative_error_bound(grad_y, x, dx.dtype)
    good = _close_or_more_accurate(dx, dx_ref, truth, 2) | (
        (dx.double() - truth).abs() <= bound + ulp_size(truth, dx.dtype)
    )
    unmasked = reference.activation_backward_reference(grad_y.float(), x.float(), act)
    either = (dx == 0) | _close_or_more_accurate(dx, unmasked.to(dx.dtype), unmasked_truth, 2) | (
        (dx.double() - unmasked_truth).abs() <= bound + ulp_size(unmasked_truth, dx.dtype)
    )
    failures = (~good & ~band) | (band & ~either)
    return Comparison(
        _max(torch.where(band, 0, distance)), 0, int(failures.sum()), int(band.sum())
    )


def amax_within_tolerance(amax, x, act, channel_dim) -> torch.Tensor:
    """Per channel: a backend's max |act(x)| against the reference's, by the forward's rule.

    Exact for ReLU / identity; otherwise within 1 ulp of the reference maximum, or no further
    from the float64 maximum than the reference is, plus 1 ulp.
    """
    reduce = [d for d in range(x.dim()) if d != channel_dim]
    ref = reference.activation_reference(x.float(), act).abs()
    truth = activation_float64(x, act).abs()
    if x.numel():
        ref = ref.amax(reduce) if reduce else ref
        truth = truth.amax(reduce) if reduce else truth
    else:
        ref = torch.zeros(x.shape[channel_dim])
        truth = ref.double()
    if act in EXACT_ACTIVATIONS:
        return same_bits(amax, ref)
    return _close_or_more_accurate(amax, ref, truth, 1)


def _max(distance: torch.Tensor) -> int:
    return int(distance.max()) if distance.numel() else 0
