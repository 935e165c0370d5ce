"""Units-in-the-last-place helpers shared by the tests and ``lipkern verify``.

The distance between two floats of one format is the number of representable values between
them: reinterpret the bits as a sign-magnitude integer and map it onto a monotone integer line
(negative values mirrored below zero). On that line +0 and -0 coincide, the largest finite value
is one step below infinity, and subnormals are ordinary steps, so one integer subtraction gives the
distance for every non-NaN pair. fp16 and bf16 are handled through their 16-bit patterns,
fp32 through 32-bit and fp64 through 64-bit patterns.
"""

from __future__ import annotations

import torch

__all__ = [
    "NAN_MISMATCH",
    "SUPPORTED_DTYPES",
    "same_bits",
    "ulp_distance",
    "ulp_size",
]

# Distance reported when exactly one side is NaN: larger than any distance between numbers.
NAN_MISMATCH = torch.iinfo(torch.int64).max

_INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
SUPPORTED_DTYPES = tuple(_INT_VIEW)


def _check_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype not in _INT_VIEW:
        raise TypeError(
            f"{name}: ulp helpers support {', '.join(str(d) for d in SUPPORTED_DTYPES)}, got {dtype}"
        )


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Monotone int64 image of the float values of ``x`` (+0 and -0 both map to 0)."""
    bits = x.contiguous().view(_INT_VIEW[x.dtype]).to(torch.int64)
    width = x.element_size() * 8
    magnitude = bits & ((1 << (width - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def _from_ordered(ordered: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    int_dtype = _INT_VIEW[dtype]
    sign = torch.where(ordered < 0, torch.iinfo(int_dtype).min, 0)
    bits = ordered.abs() | sign
    return bits.to(int_dtype).view(dtype)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise distance between ``a`` and ``b`` in ulps of ``a.dtype``, as int64.

    ``b`` is rounded to ``a.dtype`` first when its dtype differs (so an fp64 ground truth is
    compared through its correctly rounded value). NaN against NaN is 0 whatever the payloads;
    NaN against a number is ``NAN_MISMATCH``. +0 and -0 are 0 apart (use :func:`same_bits`
    where the sign of zero matters); the largest finite value is 1 ulp from infinity.
    Broadcasting follows torch rules.
    """
    _check_dtype(a.dtype, "a")
    _check_dtype(b.dtype, "b")
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    a, b = torch.broadcast_tensors(a, b)
    dist = (_ordered(a) - _ordered(b)).abs()
    a_nan, b_nan = a.isnan(), b.isnan()
    dist = torch.where(a_nan & b_nan, 0, dist)
    return torch.where(a_nan ^ b_nan, NAN_MISMATCH, dist)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise bit identity of two tensors of one dtype, except that any NaN equals any NaN.

    This is the "bit-exact" criterion: it tells +0 from -0, which :func:`ulp_distance` does not.
    """
    _check_dtype(a.dtype, "a")
    if b.dtype != a.dtype:
        raise TypeError(f"b: same_bits needs equal dtypes, got {a.dtype} and {b.dtype}")
    a, b = torch.broadcast_tensors(a, b)
    int_dtype = _INT_VIEW[a.dtype]
    equal = a.contiguous().view(int_dtype) == b.contiguous().view(int_dtype)
    return equal | (a.isnan() & b.isnan())


def ulp_size(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Spacing of the format ``dtype`` (default ``x.dtype``) at ``|x|``, returned in float64.

    It is the gap from ``|x|`` (rounded to ``dtype``) to the next larger representable
    magnitude, except at the largest finite value, where the gap below is used because the
    next value is infinity. ``ulp_size(0)`` is the smallest subnormal; infinity gives inf and
    NaN gives NaN.
    """
    dtype = x.dtype if dtype is None else dtype
    _check_dtype(dtype, "dtype")
    mag = x.to(dtype).abs()
    ordered = _ordered(mag)
    up = _from_ordered(ordered + 1, dtype).to(torch.float64)
    down = _from_ordered((ordered - 1).clamp_min(0), dtype).to(torch.float64)
    mag64 = mag.to(torch.float64)
    gap = torch.where(up.isinf() & mag.isfinite(), mag64 - down, up - mag64)
    gap = torch.where(mag.isinf(), float("inf"), gap)
    return torch.where(mag.isnan(), float("nan"), gap)
