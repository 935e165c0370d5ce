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
- Statistics (:func:`compare_stats`): ``count`` exact; ``amax`` exact for ReLU / identity and by
  the forward's rule otherwise; ``remapped`` exact outside the tie band; ``sum`` and ``sumsq``
  within ``SUM_RTOL`` of a float64 sum (relative to the sum of ``|a|`` resp. ``a^2``; ``sumsq``
  also ``SUMSQ_ATOL_PER_ELEMENT`` an element), plus, for the smooth activations, the
  per-element allowance the value rule grants each ``a``.

The inputs that exercise these rules come from here too (:func:`special_values`,
:func:`lay_out`, :func:`tie_thresholds`), so the op tests and ``lipkern verify`` probe the
same cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lipkern.ops import reference
from lipkern.ops.activations import EXACT_ACTIVATIONS, GELU_TANH_CUBIC, GELU_TANH_SCALE
from lipkern.ulp import same_bits, ulp_distance, ulp_size

TIE_BAND_ULPS = 4
# Bounds on the statistics' sums (METHOD.md section 4: fp32 inside a block, float64 across): the
# C++ kernels round a term at most 16 times in fp32 before widening (16 steps' partials, or 11
# and a tree over a step's lanes), which errs by at most 16 x 2^-24 of their sum of |a| (of
# a^2), plus, for squares below fp32's normal range, half fp32's smallest subnormal a term. One
# more 2^-24 covers the float64 part (n x 2^-53 for every size a test uses) and the reference's
# own rounding.
SUM_RTOL = 17 * 2.0**-24
SUMSQ_ATOL_PER_ELEMENT = 2.0**-150
# fp16's largest finite value: it overflows in intermediate fp16 arithmetic that a kernel must
# avoid, and is a plain large number in bf16/fp32.
FP16_MAX = 65504.0


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
    # Largest ulp distance from the float64 value rounded to the output's dtype, outside the tie
    # band and where that value is finite: what max_ulp cannot say where the reference's own fp32
    # formula cancels (GELU's tail, hundreds of millions of ulps from the truth).
    max_ulp_exact: int

    @property
    def ok(self) -> bool:
        return self.failures == 0 and self.mask_mismatches == 0


def _fp32_ulp(v: torch.Tensor) -> torch.Tensor:
    return ulp_size(v.float().nan_to_num(posinf=0.0, neginf=0.0), torch.float32)


def reference_mask_and_band(x, threshold, center, act, channel_dim):
    """Reference activation ``a`` (fp32), its mask, and the tie band around ``t``.

    The band also holds the elements where the reference's own decision differs from the
    float64 one (its fp32 activation can be far off where the formula cancels): there the
    reference is no authority, and either decision is accepted.
    """
    a = reference.activation_reference(x.float(), act)
    t = reference.broadcast_per_channel(threshold, x.dim(), channel_dim).expand_as(a)
    c = (
        torch.zeros_like(a)
        if center is None
        else reference.broadcast_per_channel(center, x.dim(), channel_dim).expand_as(a)
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


def _max_ulp_from_exact(value, truth64, band) -> int:
    distance = ulp_distance(value, truth64.to(value.dtype))
    return _max(torch.where(band | ~truth64.isfinite(), 0, distance))


def compare_forward(y, x, threshold, center, act, channel_dim) -> Comparison:
    """Judge a backend's forward output ``y`` for the normalised arguments."""
    y_ref = reference.remap_act_reference(x, threshold, center, act, channel_dim)
    a, c, ref_mask, band = reference_mask_and_band(x, threshold, center, act, channel_dim)
    fill = c.to(y.dtype)
    distance = ulp_distance(y, y_ref)
    if act in EXACT_ACTIVATIONS:
        failures = int((~same_bits(y, y_ref)).sum())
        return Comparison(_max(distance), 0, failures, 0, _max(distance))
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
        _max_ulp_from_exact(y, truth, band),
    )


DERIVATIVE_TERMS_FLAT_FROM = 8.0


def _derivative_error_bound(grad_y, x, dtype):
    """Absolute error an fp32 evaluation of ``dy * act'(x)`` may carry.

    The derivative's terms cancel (GELU' crosses zero near x = -0.75, SiLU' near x = -1.28), so
    fp32 evaluations are accurate only relative to the terms' size, about ``|dy| (1 + |x|)``;
    the output rounding to ``dtype`` comes on top. That size stops growing at
    ``|x| = DERIVATIVE_TERMS_FLAT_FROM``: beyond it the x-weighted terms (``x phi(x)``,
    ``x s(x) (1 - s(x))``, ``x sech^2(u) u'``) are below 0.003, and a bound growing with ``|x|``
    would pass any number for large inputs (0.4 off at ``|x| = 1e6``).
    """
    terms = grad_y.double().abs() * (1.0 + x.double().abs().clamp(max=DERIVATIVE_TERMS_FLAT_FROM))
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
        exact = _max(distance)
        return Comparison(exact, 0, int((~same_bits(dx, dx_ref)).sum()), 0, exact)
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
        _max(torch.where(band, 0, distance)),
        0,
        int(failures.sum()),
        int(band.sum()),
        _max_ulp_from_exact(dx, truth, band),
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


# ---------------------------------------------------------------------------------------------
# Inputs


def special_values(dtype: torch.dtype) -> tuple[list[float], list[float]]:
    """(non-finite values, finite special values) for inputs of ``dtype``: the values a kernel
    gets wrong first (signed zeros, subnormals of ``dtype`` and of fp32, fp16's and ``dtype``'s
    largest values, the GELU / SiLU tails where ``1 + erf`` cancels, values around 0.5)."""
    info = torch.finfo(dtype)
    smallest_subnormal = float(info.smallest_normal) * float(info.eps)
    finite = [
        -0.0,
        0.0,
        smallest_subnormal,
        -smallest_subnormal,
        float(info.smallest_normal),
        -3.0 * smallest_subnormal,
        1e-40,  # an fp32 subnormal (flushes to 0 in fp16, stays subnormal in bf16)
        -1e-40,
        3e-8,
        -3e-8,
        FP16_MAX,
        -FP16_MAX,
        float(info.max),
        -float(info.max),
        0.5,
        -0.5,
        0.4999,
        0.5001,
        1.0,
        -1.0,
        3.0,
        -3.0,
        -30.0,
        -9.0,
        9.0,
        1e30,
        -1e30,
    ]
    return [float("nan"), float("inf"), float("-inf")], finite


LAYOUTS = ("contiguous", "channels_last", "strided", "transposed")


def lay_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``x`` in the memory ``layout`` an op must read without a copy:
    ``contiguous``; ``channels_last`` (4-D); ``strided`` (every other element of the last
    axis of a wider buffer); ``transposed`` (2-D, column-major)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "transposed":
        return x.t().contiguous().t()
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def tie_thresholds(a: torch.Tensor, c: torch.Tensor, channels, generator=None) -> dict:
    """For ``channels`` of the [rows, C] activation ``a``: ``|a - c|`` of one finite, non-zero
    element, the threshold on which that element sits exactly (an fp32 tie)."""
    distance = (a - c).abs()
    ties = {}
    for k in channels:
        candidates = torch.nonzero(distance[:, k].isfinite() & (distance[:, k] > 0)).flatten()
        if candidates.numel():
            pick = candidates[torch.randint(candidates.numel(), (), generator=generator)]
            ties[k] = float(distance[pick, k])
    return ties


# ---------------------------------------------------------------------------------------------
# Statistics


def per_channel_rows(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """[C, everything else] view of an elementwise tensor (empty tensors included)."""
    channels = t.shape[channel_dim]
    return t.movedim(channel_dim, 0).reshape(channels, t.numel() // max(channels, 1))


@dataclass
class StatsComparison:
    problems: list  # what breaks the rule, one message per statistic
    mask_mismatches: int  # per-channel remapped counts beyond the channel's tie band

    @property
    def ok(self) -> bool:
        return not self.problems and self.mask_mismatches == 0


def _sum_close(got, want, values, allow, channel_dim, square) -> torch.Tensor:
    """Per channel: ``got`` within ``SUM_RTOL`` of the float64 sum of ``values`` (or of their
    squares), widened by the element-wise ``allow``ance; ``want`` (default: that sum) is the
    target. Non-finite targets must be matched exactly (NaN by NaN)."""
    v = per_channel_rows(values, channel_dim)
    e = per_channel_rows(allow, channel_dim)
    if square:
        target = (v * v).sum(dim=1) if want is None else want
        tol = (
            SUM_RTOL * (v * v).sum(dim=1)
            + SUMSQ_ATOL_PER_ELEMENT * v.shape[1]
            + (2 * v.abs() * e + e * e).sum(dim=1)
        )
    else:
        target = v.sum(dim=1) if want is None else want
        tol = SUM_RTOL * v.abs().sum(dim=1) + e.sum(dim=1)
    got, target = got.cpu(), target.cpu()
    finite = target.isfinite()
    same = (got == target) | (got.isnan() & target.isnan())
    return (((got - target).abs() <= tol) & finite) | (same & ~finite)


def compare_stats(stats, x, threshold, center, act, channel_dim) -> StatsComparison:
    """Judge a backend's statistics (a ``ChannelStats`` or the op's ``(amax, remapped, count,
    sum, sumsq)``) for the normalised arguments.

    ``count`` exact; ``amax`` by :func:`amax_within_tolerance` (exact for ReLU / identity);
    ``remapped`` may differ from the reference only by the channel's tie-band elements; ``sum``
    and ``sumsq`` within ``SUM_RTOL`` (of ``sum |a|`` resp. ``sum a^2``) of the float64 sum of
    the reference's ``a``, plus, for the smooth activations, the allowance ``ulp32(a) +
    2 |a - a64|`` per element that the value rule grants each ``a`` (a backend whose ``erf``
    differs from PyTorch's by an ulp is right, and its sum moves with it), or within
    ``SUM_RTOL`` plus one fp32 ulp per element of the sum of the float64 activation, where the
    reference's fp32 activation is the worse one (it overflows at bf16's largest value).
    """
    amax, remapped, count, total, total_sq = (
        (stats.amax, stats.remapped, stats.count, stats.sum, stats.sumsq)
        if hasattr(stats, "amax")
        else stats
    )
    x, threshold = x.cpu(), threshold.cpu()
    center = None if center is None else center.cpu()
    _, _, remapped_ref, count_ref, sum_ref, sumsq_ref = reference.remap_act_stats_reference(
        x, threshold, center, act, channel_dim
    )
    a, _, _, band = reference_mask_and_band(x, threshold, center, act, channel_dim)
    problems = []
    if not torch.equal(count.cpu(), count_ref):
        problems.append("count differs")
    if not bool(amax_within_tolerance(amax.cpu(), x, act, channel_dim).all()):
        problems.append("amax outside tolerance")
    slack = per_channel_rows(band, channel_dim).sum(dim=1).to(torch.int64)
    excess = ((remapped.cpu() - remapped_ref).abs() - slack).clamp_min(0)

    a64 = a.double()
    truth = activation_float64(x, act)
    if act in EXACT_ACTIVATIONS:
        allow = torch.zeros_like(a64)
    else:
        allow = ulp_size(a, torch.float32) + 2 * (a64 - truth).abs()
        allow = torch.where(a.isfinite() & truth.isfinite(), allow, 0.0)
    truth_allow = torch.where(truth.isfinite(), ulp_size(truth, torch.float32), 0.0)
    for name, got, want in (("sum", total, sum_ref), ("sumsq", total_sq, sumsq_ref)):
        square = name == "sumsq"
        ok = _sum_close(got, want, a64, allow, channel_dim, square)
        ok |= _sum_close(got, None, truth, truth_allow, channel_dim, square)
        if not bool(ok.all()):
            finite = want.isfinite()
            got = got.cpu()
            if bool((~ok & finite & ~got.isfinite()).any()):
                problems.append(f"{name} not finite where the reference is")
            elif bool((~ok & finite).any()):
                problems.append(f"{name} beyond tolerance")
            else:
                problems.append(f"{name} differs where the reference is not finite")
    return StatsComparison(problems, int(excess.sum()))
