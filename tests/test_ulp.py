"""lipkern.ulp: ulp distances and spacings for fp16 / bf16 / fp32 (and fp64)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipkern.ulp import NAN_MISMATCH, same_bits, ulp_distance, ulp_size

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _next_up(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, math.inf))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_neighbours_are_one_ulp_apart(dtype):
    info = torch.finfo(dtype)
    x = torch.tensor(
        [-info.max, -1.0, -info.smallest_normal, 0.0, info.smallest_normal, 1.0, 3.5], dtype=dtype
    )
    assert ulp_distance(x, _next_up(x)).tolist() == [1] * x.numel()
    assert ulp_distance(_next_up(x), x).tolist() == [1] * x.numel()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_special_values(dtype):
    info = torch.finfo(dtype)
    tiny = info.smallest_normal * info.eps  # smallest subnormal
    nan, inf = math.nan, math.inf
    a = torch.tensor([0.0, -0.0, nan, nan, 1.0, info.max, -info.max, tiny, inf], dtype=dtype)
    b = torch.tensor([-0.0, 0.0, nan, 1.0, nan, inf, -inf, -tiny, inf], dtype=dtype)
    assert ulp_distance(a, b).tolist() == [0, 0, 0, NAN_MISMATCH, NAN_MISMATCH, 1, 1, 2, 0]


def test_nan_payloads_are_equal():
    a = torch.tensor([0x7FC00000, 0x7FC00001, -0x00400000], dtype=torch.int32).view(torch.float32)
    b = torch.tensor([0x7FC00001, 0x7FC00000, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    assert ulp_distance(a, b).tolist() == [0, 0, 0]
    assert same_bits(a, b).all()


def test_same_bits_tells_signed_zeros_apart():
    a = torch.tensor([0.0, -0.0, 1.0, math.nan], dtype=torch.bfloat16)
    b = torch.tensor([-0.0, -0.0, 1.0, math.nan], dtype=torch.bfloat16)
    assert same_bits(a, b).tolist() == [False, True, True, True]
    with pytest.raises(TypeError, match="b"):
        same_bits(a, b.float())


def test_distance_in_dtype_of_first_argument():
    one = torch.tensor([1.0], dtype=torch.float16)
    exact = torch.tensor([1.0 + 2.0**-10], dtype=torch.float64)  # next fp16 above 1
    assert ulp_distance(one, exact).item() == 1
    # An fp64 value between two fp16 values is compared through its rounding.
    assert ulp_distance(one, torch.tensor([1.0 + 2.0**-12], dtype=torch.float64)).item() == 0
    assert ulp_distance(torch.tensor([1.0]), torch.tensor([1.0 + 2.0**-23])).item() == 1


def test_broadcasting_and_unsupported_dtype():
    a = torch.zeros(3, 1)
    b = torch.tensor([0.0, 1.4e-45, -1.4e-45])
    assert ulp_distance(a, b).shape == (3, 3)
    with pytest.raises(TypeError, match="a"):
        ulp_distance(torch.zeros(2, dtype=torch.int32), torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_ulp_size(dtype):
    info = torch.finfo(dtype)
    tiny = info.smallest_normal * info.eps
    x = torch.tensor([0.0, -1.0, 1.0, info.smallest_normal, info.max, math.inf, math.nan])
    got = ulp_size(x, dtype)
    assert got.dtype == torch.float64
    assert got[0].item() == tiny
    assert got[1].item() == got[2].item() == info.eps
    assert got[3].item() == tiny  # subnormal spacing continues into the first normal binade
    big = torch.tensor(info.max, dtype=dtype)
    below_max = torch.nextafter(big, torch.zeros((), dtype=dtype))
    assert got[4].item() == float(big.double() - below_max.double())  # gap below max
    assert got[5].item() == math.inf and math.isnan(got[6].item())


@settings(max_examples=200, deadline=None)
@given(
    st.floats(allow_nan=False, width=32),
    st.floats(allow_nan=False, width=32),
)
def test_distance_is_a_metric_consistent_with_order(x, y):
    a, b = torch.tensor([x]), torch.tensor([y])
    d = ulp_distance(a, b).item()
    assert d == ulp_distance(b, a).item()
    assert (d == 0) == (x == y)
    # Walking up d ulps from the smaller value reaches the larger one.
    lo, hi = (a, b) if x <= y else (b, a)
    if d <= 4:
        for _ in range(d):
            lo = _next_up(lo)
        assert lo.item() == hi.item()
