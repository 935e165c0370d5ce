// Activations and their derivatives in fp32: the grid polynomials of the smooth ones, with the
// float64 evaluators off the grid (and GELU's fp32 tail for the backward).
// Included by csrc/remap_act_kernels.cpp only (see there): it lands in lipkern::<CAP>.
#pragma once

#include "activation_tables.h"
#include "cpu/act_eval.h"

#include <ATen/Parallel.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace lipkern {
namespace CPU_CAPABILITY {
namespace {

// The grid (csrc/activation_tables.h, fitted by scripts/fit_activation_tables.py).
//
// act(x) = hi[q] + (lo[q] + c1[q] h + h (h P_q(h))) with q = round(x / w) and h = x - q w exact:
// the activation is approximated around each grid point, so no term cancels, and the result is
// within 1.32 fp32 ulps of the truth (tests/test_cpu_kernels.py), for every dtype. Inputs off
// the grid (|x| >= bound, rare for activations, and +-inf) take the float64 path (act_eval.h),
// except in GELU's backward (gelu_grad_off_grid, gelu_tail) and where GELU's value is known
// (gelu_value_at_the_ends).

template <Act A>
constexpr const ActTable& act_table() {
  if constexpr (A == Act::Gelu) return kGeluTable;
  if constexpr (A == Act::GeluTanh) return kGeluTanhTable;
  if constexpr (A == Act::Silu) return kSiluTable;
}

// act'(x) of GELU and tanh-GELU on the same grid, fitted to an absolute error of (1 + |x|) 2^-24
// or so: the backward's accuracy rule is absolute in those terms, since act' crosses zero.
template <Act A>
constexpr const ActTable& grad_table() {
  if constexpr (A == Act::Gelu) return kGeluGradTable;
  if constexpr (A == Act::GeluTanh) return kGeluTanhGradTable;
}

// Each lane's grid column q + kActGrid / 2, which `t` holds in its low mantissa bits (see
// grid_point), and one table row read at those columns. Lanes off the grid (and NaN) read some
// column: their value is replaced (or stays NaN through h).
#if defined(CPU_CAPABILITY_AVX512)
using GridCols = __m512i;
C10_ALWAYS_INLINE GridCols grid_cols(const fVec& t) {
  // vpermt2ps reads the low 5 bits only.
  static_assert(kActGrid == 2 * kF, "one two-register permute covers the grid");
  return _mm512_castps_si512(t);
}
C10_ALWAYS_INLINE fVec lookup(const float* row, const GridCols& col) {
  return _mm512_permutex2var_ps(_mm512_loadu_ps(row), col, _mm512_loadu_ps(row + kF));
}
#elif defined(CPU_CAPABILITY_AVX2)
using GridCols = __m256i;
C10_ALWAYS_INLINE GridCols grid_cols(const fVec& t) {
  return _mm256_and_si256(_mm256_castps_si256(t), _mm256_set1_epi32(kActGrid - 1));
}
C10_ALWAYS_INLINE fVec lookup(const float* row, const GridCols& col) {
  return _mm256_i32gather_ps(row, col, sizeof(float));
}
#else
struct GridCols {
  uint32_t col[kF];
};
C10_ALWAYS_INLINE GridCols grid_cols(const fVec& t) {
  GridCols cols;
  t.store(cols.col);  // the bits of t, as ints
  for (int64_t i = 0; i < kF; ++i) cols.col[i] &= kActGrid - 1;
  return cols;
}
C10_ALWAYS_INLINE fVec lookup(const float* row, const GridCols& col) {
  float v[kF];
  for (int64_t i = 0; i < kF; ++i) v[i] = row[col.col[i]];
  return fVec::loadu(v);
}
#endif

// a b + c rounded once: the grid's error bound counts on it, and the generic Vectorized fmadd
// rounds the product first.
C10_ALWAYS_INLINE fVec fused_madd(const fVec& a, const fVec& b, const fVec& c) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return at::vec::fmadd(a, b, c);
#else
  float fa[kF], fb[kF], fc[kF];
  a.store(fa);
  b.store(fb);
  c.store(fc);
  for (int64_t i = 0; i < kF; ++i) fa[i] = std::fma(fa[i], fb[i], fc[i]);
  return fVec::loadu(fa);
#endif
}

// a b - c rounded once, without a negation of its own.
C10_ALWAYS_INLINE fVec fused_msub(const fVec& a, const fVec& b, const fVec& c) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return at::vec::fmsub(a, b, c);
#else
  return fused_madd(a, b, c.neg());
#endif
}

// Where x lies on a grid of step w: its column and the offset h from the grid point.
struct GridPoint {
  GridCols col;
  fVec h;
};

template <typename Table>  // ActTable or ActTailTable
C10_ALWAYS_INLINE GridPoint grid_point(const Table& T, const fVec& x) {
  // x / w is exact (w is a power of two); adding 1.5 * 2^23 rounds it to an integer (to nearest
  // even, the magic number being even) that sits in t's low mantissa bits, offset by
  // kActGrid / 2 so that they hold the grid column. Valid for |x / w| < 2^22, far beyond the
  // grid; it replaces a round, a conversion and an add.
  constexpr float kMagic = 0x1.8p23f + kActGrid / 2;
  const fVec t = at::vec::fmadd(x, fVec(T.inv_step), fVec(kMagic));
  const fVec q = t - fVec(kMagic);
  // q w is exact and so is x - q w (Sterbenz: |h| <= w / 2 <= |x| / 2).
  return {grid_cols(t), at::vec::fnmadd(q, fVec(T.step), x)};
}

// The grid polynomial with its rows 0 and 2 at g's columns given, for a caller that uses them too.
C10_ALWAYS_INLINE fVec grid_poly(const ActTable& T, const GridPoint& g, const fVec& row0,
                                 const fVec& row2) {
  const fVec& h = g.h;
  fVec p = lookup(T.coef[kActTableRows - 1], g.col);
  for (int k = kActTableRows - 2; k >= 3; --k) p = fused_madd(p, h, lookup(T.coef[k], g.col));
  const fVec linear = fused_madd(row2, h, lookup(T.coef[1], g.col));
  return fused_madd(h, h * p, linear) + row0;
}

C10_ALWAYS_INLINE fVec grid_poly(const ActTable& T, const GridPoint& g) {
  return grid_poly(T, g, lookup(T.coef[0], g.col), lookup(T.coef[2], g.col));
}

C10_ALWAYS_INLINE fVec grid_eval(const ActTable& T, const fVec& x) {
  return grid_poly(T, grid_point(T, x));
}

struct ValueGrad {
  fVec value, grad;
};

// e^y (e^-y with kNegated, bit for bit e^(-y), the negation folded into the reduction) for y in
// [-kSiluClamp, kSiluClamp] (or NaN), within about 1 ulp: y = n ln2 + r with |r| <= ln2 / 2
// (Cody-Waite), a degree-7 Taylor polynomial (remainder below 2^-27), times 2^n, which
// overflows to inf and underflows to 0 as exp does.
template <bool kNegated = false>
C10_ALWAYS_INLINE fVec exp_f(const fVec& y) {
  constexpr float kLn2Hi = 0x1.62e4p-1f;  // few enough bits that n kLn2Hi is exact
  constexpr float kLn2Lo = 0x1.7f7d1cp-20f;
  constexpr float kLog2e = kNegated ? -M_LOG2E : M_LOG2E;
#if defined(CPU_CAPABILITY_AVX512)
  const fVec n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(kLog2e)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const fVec n = (y * fVec(kLog2e)).round();
#endif
  fVec r = kNegated ? fused_msub(n, fVec(-kLn2Hi), y) : fused_madd(n, fVec(-kLn2Hi), y);
  r = fused_madd(n, fVec(-kLn2Lo), r);
  fVec p(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) {
    p = fused_madd(p, r, fVec(c));
  }
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);
#else
  // 2^n as 2^h 2^(n - h), each factor built from its exponent bits, so that every n that still
  // gives a nonzero finite result is reached; |n| is capped at 160, beyond which the result is
  // 0 or inf either way. A NaN n becomes 0 before the int conversion (undefined for NaN in
  // scalar code); the NaN stays in p.
  using iVec = at::vec::Vectorized<int32_t>;
  const fVec finite_n = select(equal(n, n), n, fVec(0.f));
  const fVec capped = at::vec::clamp(finite_n, fVec(-160.f), fVec(160.f));
  const fVec h = (capped * fVec(0.5f)).floor();
  const auto pow2 = [](const fVec& e) {
    return at::vec::cast<float>((at::vec::convert_to_int_of_same_size(e) + iVec(127)) << iVec(23));
  };
  return p * pow2(h) * pow2(capped - h);
#endif
}

// GELU's act'(x) off its grid (|x| >= 3.875), in every lane: with a = |x| and s(a) = a phi(a) -
// Q(a) (Q = 1 - Phi), act'(x) is 1 + s(a) on the right and -s(a) on the left. s falls from 8e-4 at
// the grid's end; for 3.875 <= a < 5.875 it comes from a second grid over a (kGeluGradTailTable: 32
// columns of w = 1/16 centred at (k + 1/2) w, a cubic in h each), within 4.3e-6 relative and 0.0013
// (1 + |x|) 2^-24 absolute, so that over every fp32 of that range act'(x) is within 0.21 (1 + |x|)
// 2^-24 of float64, which the rounding of 1 + s to fp32 alone reaches near x = 3.875 (the
// backward's rule allows 8). From a = 5.875 on, s is below 0.18 (1 + a) 2^-24 and the limits are
// returned: 1 on the right, -0 on the left (act' < 0 there, and the sign of a zero result is the
// truth's); so are they for +-inf. Unpacked and branch-free: an exp and a division per lane
// (gelu_tail's form, on the step's packed off-grid lanes) cost the backward 1.3x ATen's time at
// standard deviation 3, where a fifth of the lanes are off the grid.
C10_ALWAYS_INLINE fVec gelu_grad_off_grid(const fVec& x) {
  constexpr const ActTailTable& T = kGeluGradTailTable;
  static_assert(T.end - kActGrid * T.step == act_table<Act::Gelu>().bound &&
                    T.step * T.inv_step == 1.f,
                "the tail grid's 32 columns start where GELU's grid ends");
  const fVec a = x.abs();
  // a - w / 2 is exact over the range (both are multiples of a's ulp and the difference stays
  // above 2), and puts the centres on the multiples of w that grid_point rounds to.
  const GridPoint g = grid_point(T, a - fVec(T.step / 2));
  fVec s = lookup(T.coef[kActTailRows - 1], g.col);
  for (int k = kActTailRows - 2; k >= 0; --k) s = fused_madd(s, g.h, lookup(T.coef[k], g.col));
  const Mask positive = less(fVec(0.f), x);
  const fVec limit = select(positive, fVec(1.f), fVec(-0.f));
  // At least: a = T.end itself would wrap round to the first column.
  return select(at_least(a, fVec(T.end)), limit, select(positive, fVec(1.f) + s, s.neg()));
}

// GELU's value off its grid (|x| >= 3.875) in fp32, from the Gaussian tail: with a = |x| and Q(a) =
// 1 - Phi(a) = phi(a) M(a) (M: Mills' ratio), GELU(x) = max(x, 0) - a Q(a) = max(x, 0) - E F, where
// E = exp(-a^2 / 2) and F = a M(a) / sqrt(2 pi), a degree-6 polynomial in 1 / a^2 (a least-squares
// fit, relative error 1.2e-8 over 3.875 <= a <= 15). No term cancels. a is clamped at kTailEnd =
// 11.5, where every intermediate is still a normal fp32 (E > 2^-96): beyond it the right tail has
// reached x, and the left tail's value (below 2^-96) is returned as -0, well inside the absolute
// 2^-90 settle_mask allows. Carried on to their subnormal values they took a microcode assist on
// nearly every operation (15x ATen's gelu_backward time for |x| in [14, 15]). a^2 = hi + lo exactly
// (an fma), and E = exp(-hi / 2) (1 - lo / 2): a rounded a^2 would move E by up to a^2 2^-25
// relative, 2^-18 at a = 11.5. The value is within 2^-22.2 relative (2^-96 beyond kTailEnd) over
// every fp32 with 3.875 <= |x| < 15.5: not the forward's, which rounds the float64 value, but an
// estimate with which the backward settles its mask, as SiLU's (act_tables16.h, settle_mask).
C10_ALWAYS_INLINE fVec gelu_tail(const fVec& x) {
  static constexpr float kPoly[] = {0x1.c23516p-22f, -0x1.1affbep-19f, 0x1.825ee4p-17f,
                                    -0x1.553c9ap-14f, 0x1.8505c2p-11f, -0x1.513222p-7f,
                                    0x1.8b548p-2f};
  // The polynomial's argument: 1 / a^2 mapped onto [-1, 1].
  constexpr float kScale = 0x1.016e0cp+5f, kOffset = -0x1.249cbcp+0f;
  constexpr float kTailEnd = 11.5f;
  const fVec a = at::vec::minimum(x.abs(), fVec(kTailEnd));
  const fVec a2 = a * a;
  const fVec a2_lo = fused_madd(a, a, a2.neg());
  const fVec e_hi = exp_f(a2 * fVec(-0.5f));
  const fVec e = fused_madd(e_hi, a2_lo * fVec(-0.5f), e_hi);
  const fVec inv_a = fVec(1.f) / a;
  const fVec s = fused_madd(inv_a * inv_a, fVec(kScale), fVec(kOffset));
  fVec f(kPoly[0]);
  for (int k = 1; k < 7; ++k) f = fused_madd(f, s, fVec(kPoly[k]));
  const fVec correction = e * f;
  const Mask positive = less(fVec(0.f), x);
  const Mask vanished = less(x, fVec(-kTailEnd));
  return select(positive, x - correction, select(vanished, fVec(-0.f), correction.neg()));
}

// Whether the backward takes act's off-grid lanes in fp32 instead of float64: its derivative
// from gelu_grad_off_grid, and its value, an estimate to settle the mask with, from gelu_tail.
constexpr bool has_fp32_tail(Act A) {
  return A == Act::Gelu;
}

// A step's off-grid lanes take GELU's act'(x) from gelu_grad_off_grid.
C10_ALWAYS_INLINE void patch_gelu_grad_off_grid(const F2& x, Mask off_lo, Mask off_hi, F2& grad) {
  grad = {select(off_lo, gelu_grad_off_grid(x.lo), grad.lo),
          select(off_hi, gelu_grad_off_grid(x.hi), grad.hi)};
}

// The first n lanes of packed (1 <= n <= 16) evaluated in float64 and rounded to fp32, into
// value (kValue) and grad (kGrad); lanes from n on are left unspecified.
template <Act A, bool kValue, bool kGrad>
C10_ALWAYS_INLINE void evaluate_packed(const fVec& packed, int n, fVec& value, fVec& grad) {
  dVec lo, hi, value_lo, value_hi, grad_lo, grad_hi;
  widen(packed, lo, hi);
  smooth_d<A, kValue, kGrad>(lo, value_lo, grad_lo);
  if (n > dVec::size()) {
    smooth_d<A, kValue, kGrad>(hi, value_hi, grad_hi);
  } else {
    value_hi = grad_hi = dVec(0.0);
  }
  if constexpr (kValue) narrow_parts(value_lo, value_hi, value);
  if constexpr (kGrad) narrow_parts(grad_lo, grad_hi, grad);
}

// The first n lanes of packed off the grid, into value (kValue) and grad (kGrad): the value by
// gelu_tail where kFp32Tail, in float64 otherwise.
template <Act A, bool kValue, bool kGrad, bool kFp32Tail>
C10_ALWAYS_INLINE void evaluate_off_grid(const fVec& packed, int n, fVec& value, fVec& grad) {
  if constexpr (kFp32Tail) {
    static_assert(has_fp32_tail(A) && kValue && !kGrad);
    value = gelu_tail(packed);
  } else {
    evaluate_packed<A, kValue, kGrad>(packed, n, value, grad);
  }
}

// GELU's value where its fp32 rounding is known without evaluating it: x from 5.375 up (x Q(x)
// is below half an ulp of x there) and -0 from -14.375 down (|GELU(x)| < 2^-150), what the
// float64 evaluation rounds to over every fp32 of those ranges (its last other results are at
// 5.3475 and -14.356). The lanes are taken out of `off`. At standard deviation 10 these are half
// of the lanes off the grid.
C10_ALWAYS_INLINE void gelu_value_at_the_ends(const fVec& x, Mask& off, fVec& value) {
  const Mask is_x = at_least(x, fVec(5.375f)), is_zero = less(x, fVec(-14.375f));
  value = select(is_zero, fVec(-0.f), select(is_x, x, value));
  off = lanes_except(off, is_x | is_zero);
}

// The lanes of a step off the fp32 grid (off_lo, off_hi) evaluated and rounded to fp32, into
// value (kValue) and grad (kGrad); the other lanes keep theirs. On AVX-512 the step's off-grid
// lanes are packed together first, so a step of 32 values with at most 8 of them pays one
// float64 evaluation of 8 lanes instead of four: inputs of standard deviation 3 put a fifth of
// the lanes off GELU's grid, nearly every vector had one, and the fp32 forward took 2.6x
// F.gelu's time (0.7x the time with this packing). Where more than 16 lanes are off (standard
// deviation 10) the unpacked evaluation is faster: GELU's fp32 tail takes it; for float64 it
// measured 0.77x the time there but 1.1-1.6x at standard deviations 1 and 3, the extra code
// slowing the inlined loop around it. kFp32Tail: GELU's value estimate only (gelu_tail).
template <Act A, bool kValue, bool kGrad, bool kFp32Tail = false>
C10_ALWAYS_INLINE void patch_off_grid(const F2& x, Mask off_lo, Mask off_hi, F2& value,
                                      F2& grad) {
  static_assert(!kFp32Tail || (kValue && !kGrad), "GELU's derivative: gelu_grad_off_grid");
  constexpr bool kEnds = A == Act::Gelu && kValue && !kGrad && !kFp32Tail;
  const auto take_the_ends = [&] {
    gelu_value_at_the_ends(x.lo, off_lo, value.lo);
    gelu_value_at_the_ends(x.hi, off_hi, value.hi);
    return !any(off_lo, off_hi);
  };
  // Both vectors evaluated whole, their off-grid lanes taken.
  const auto evaluate_unpacked = [&] {
    const fVec xs[2] = {x.lo, x.hi};
    fVec values[2], grads[2];
    for (int k = 0; k < 2; ++k) {
      evaluate_off_grid<A, kValue, kGrad, kFp32Tail>(xs[k], kF, values[k], grads[k]);
    }
    if constexpr (kValue) {
      value = {select(off_lo, values[0], value.lo), select(off_hi, values[1], value.hi)};
    }
    if constexpr (kGrad) {
      grad = {select(off_lo, grads[0], grad.lo), select(off_hi, grads[1], grad.hi)};
    }
  };
#if defined(CPU_CAPABILITY_AVX512)
  // Only where that saves a float64 evaluation: at standard deviation 3 (at most 8 lanes off in
  // most steps) taking them everywhere cost 1.12x the time.
  if constexpr (kEnds) {
    if (__builtin_popcount(off_lo) + __builtin_popcount(off_hi) > dVec::size() && take_the_ends()) {
      return;
    }
  }
  const int n_lo = __builtin_popcount(off_lo), n_hi = __builtin_popcount(off_hi);
  // The tail evaluates 16 lanes at a time: with more than 16 off the grid, packing saves no
  // evaluation, and the unpacked form took 0.7x the time of the packed one (std 10).
  if (kFp32Tail && n_lo + n_hi > kF) return evaluate_unpacked();
  const int n = n_lo + n_hi;
  const fVec packed_lo = _mm512_maskz_compress_ps(off_lo, x.lo);
  const fVec packed_hi = _mm512_maskz_compress_ps(off_hi, x.hi);
  // packed[0]: x.lo's lanes, then x.hi's first ones up to 16 lanes; packed[1]: x.hi's others.
  const auto lanes_from = [](int first, int end) {
    return static_cast<Mask>(((1u << end) - 1) & ~((1u << first) - 1));
  };
  const int hi_in_first = std::min<int>(n_hi, kF - n_lo);
  const Mask first_of_hi = lanes_from(n_lo, n_lo + hi_in_first);
  const Mask rest_of_hi = lanes_from(hi_in_first, n_hi);
  const fVec packed[2] = {_mm512_mask_expand_ps(packed_lo, first_of_hi, packed_hi),
                          _mm512_maskz_compress_ps(rest_of_hi, packed_hi)};
  fVec values[2], grads[2];
  for (int k = 0; k * kF < n; ++k) {
    evaluate_off_grid<A, kValue, kGrad, kFp32Tail>(packed[k], std::min<int>(n - k * kF, kF),
                                                   values[k], grads[k]);
  }
  if (n <= kF) values[1] = grads[1] = fVec(0.f);
  const auto put = [&](const fVec (&results)[2], F2& out) {
    out.lo = _mm512_mask_expand_ps(out.lo, off_lo, results[0]);
    const fVec for_hi = _mm512_mask_expand_ps(_mm512_maskz_compress_ps(first_of_hi, results[0]),
                                              rest_of_hi, results[1]);
    out.hi = _mm512_mask_expand_ps(out.hi, off_hi, for_hi);
  };
  if constexpr (kValue) put(values, value);
  if constexpr (kGrad) put(grads, grad);
#else
  if constexpr (kEnds) {
    if (take_the_ends()) return;
  }
  evaluate_unpacked();
#endif
}

// ReLU as PyTorch's clamp_min(x, 0): -0 and NaN pass through unchanged.
C10_ALWAYS_INLINE fVec relu(const fVec& x) {
  return select(less(x, fVec(0.f)), fVec(0.f), x);
}

// Where a step leaves the grid: |x| >= its bound (NaN stays on, and gives NaN there).
template <Act A>
C10_ALWAYS_INLINE Mask off_grid(const fVec& x) {
  return at_least(x.abs(), fVec(act_table<A>().bound));
}

// act(+-0) = +-0 as PyTorch's: the grid's h^2 term would turn -0 into +0.
C10_ALWAYS_INLINE fVec grid_value(const fVec& x, const fVec& on_grid) {
  return select(equal(x, fVec(0.f)), x, on_grid);
}

// act(x) for a step of two vectors.
template <Act A>
C10_ALWAYS_INLINE F2 activate(const F2& x) {
  if constexpr (A == Act::Identity) return x;
  if constexpr (A == Act::Relu) return {relu(x.lo), relu(x.hi)};
  if constexpr (is_smooth(A)) {
    F2 a{grid_value(x.lo, grid_eval(act_table<A>(), x.lo)),
         grid_value(x.hi, grid_eval(act_table<A>(), x.hi))};
    const Mask off_lo = off_grid<A>(x.lo), off_hi = off_grid<A>(x.hi);
    if (any(off_lo, off_hi)) patch_off_grid<A, true, false>(x, off_lo, off_hi, a, a);
    return a;
  }
}

// SiLU from one sigmoid s = 1 / (1 + e^-x) in fp32: the derivative s (1 + x (1 - s)), as ATen's
// silu_backward computes it, within 2 (1 + |x|) 2^-24 (1.84 at worst seen,
// tests/test_cpu_kernels.py), inside the backward's rule of 8, at a third of the 8-row grid
// polynomial's cost; and the value x s, within about 5 2^-24 relative of the exact value (exp,
// 1 + e, the division and the product), which the backward uses to settle its mask (the
// forward's value is the grid's). The clamp gives +-inf the limits (derivative 1 and
// -0, value inf and -0) instead of inf * 0. Its upper end is low (from 24 ln 2 = 16.64 up,
// 1 + e^-x rounds to 1 already) so that e^-x never underflows: an fp32 result that underflows,
// to a subnormal or to 0, takes a microcode assist, and with the clamp at kSiluClamp the
// backward took 5.2x ATen's time for x in [110, 200]. (From x = -83 down to -88.7, s itself is
// subnormal: a band that narrow is left to the assists.)
C10_ALWAYS_INLINE ValueGrad silu_from_sigmoid(const fVec& x) {
  constexpr float kSigmoidIsOne = 32.f;
  const fVec xc = at::vec::clamp(x, fVec(-kSiluClamp), fVec(kSigmoidIsOne));
  const fVec s = fVec(1.f) / (fVec(1.f) + exp_f<true>(xc));
  return {at::vec::clamp_min(x, fVec(-kSiluClamp)) * s,
          s * fused_madd(xc, fVec(1.f) - s, fVec(1.f))};
}

// act'(x) of a smooth activation for a step; NaN gives NaN (through h, or SiLU's s).
template <Act A>
C10_ALWAYS_INLINE F2 derivative(const F2& x) {
  if constexpr (A == Act::Silu) {
    return {silu_from_sigmoid(x.lo).grad, silu_from_sigmoid(x.hi).grad};
  } else {
    static_assert(act_table<A>().bound == grad_table<A>().bound);
    F2 d{grid_eval(grad_table<A>(), x.lo), grid_eval(grad_table<A>(), x.hi)};
    const Mask off_lo = off_grid<A>(x.lo), off_hi = off_grid<A>(x.hi);
    if (any(off_lo, off_hi)) {
      if constexpr (has_fp32_tail(A)) {
        patch_gelu_grad_off_grid(x, off_lo, off_hi, d);
      } else {
        patch_off_grid<A, false, true>(x, off_lo, off_hi, d, d);
      }
    }
    return d;
  }
}

// Lanes of a step, as two masks.
struct LanePair {
  Mask lo, hi;
};

// The grid's act(x) (when kValue) and act'(x) of GELU or tanh-GELU for a step, sharing the grid
// point (both tables have one grid): what activate and derivative give on the grid, bit for bit;
// lanes off it are left for the caller to replace.
template <Act A, bool kValue>
C10_ALWAYS_INLINE void grid_value_and_derivative(const F2& x, F2& value, F2& grad) {
  static_assert(act_table<A>().step == grad_table<A>().step &&
                act_table<A>().bound == grad_table<A>().bound);
  const GridPoint g_lo = grid_point(act_table<A>(), x.lo), g_hi = grid_point(act_table<A>(), x.hi);
  if constexpr (kValue) {
    value = {grid_value(x.lo, grid_poly(act_table<A>(), g_lo)),
             grid_value(x.hi, grid_poly(act_table<A>(), g_hi))};
  }
  grad = {grid_poly(grad_table<A>(), g_lo), grid_poly(grad_table<A>(), g_hi)};
}

// act(x) and act'(x) of GELU or tanh-GELU for a step, as activate and derivative give them,
// sharing the grid point (both tables have one grid), except that where act has an fp32 tail
// the off-grid lanes' value is its estimate; returned: the lanes whose value is an estimate.
template <Act A>
C10_ALWAYS_INLINE LanePair activate_with_derivative(const F2& x, F2& value, F2& grad) {
  grid_value_and_derivative<A, true>(x, value, grad);
  const Mask off_lo = off_grid<A>(x.lo), off_hi = off_grid<A>(x.hi);
  if (!any(off_lo, off_hi)) return {no_lanes(), no_lanes()};
  if constexpr (has_fp32_tail(A)) {
    patch_gelu_grad_off_grid(x, off_lo, off_hi, grad);
    patch_off_grid<A, true, false, true>(x, off_lo, off_hi, value, value);
    return {off_lo, off_hi};
  } else {
    patch_off_grid<A, true, true>(x, off_lo, off_hi, value, grad);
    return {no_lanes(), no_lanes()};
  }
}

// Off its grid GELU(x) = max(x, 0) - |x| Q(|x|) lies within 2.1e-4 of max(x, 0): |x| Q(|x|) falls
// from 2.0659e-4 at the grid's end. A channel whose threshold and centre remap all or none of
// the left tail's values, [-2.1e-4, -0], and none of the right's, [3.875 - 2.1e-4, inf], remaps
// all or none of the left tail's x and none of the right's, without a search.
constexpr float kGeluTailGap = 2.1e-4f;

// Off the grid GELU's forward value does not decrease along the int32 view of x's bits
// (tests/test_cpu_kernels.py checks every fp32 of the tails): that view grows with |x| on the left,
// where the value rises to -0, and with x on the right, where it rises to x; every left value
// (at most -0) lies below every right one. Neither does d = fl(act(x) - c), so a channel remaps
// the off-grid x of one interval of keys, [lo, hi] (none where lo > hi), with which the backward
// masks its off-grid lanes without their value.
struct KeyInterval {
  int32_t lo = std::numeric_limits<int32_t>::max();
  int32_t hi = std::numeric_limits<int32_t>::min();
};

// The magnitudes off the grid, 3.875 to inf, as bits.
constexpr uint32_t kTailFirstBits = 0x40780000u;
constexpr uint32_t kTailLastBits = 0x7f800000u;
constexpr int64_t kTailKeys = int64_t{kTailLastBits} - kTailFirstBits + 1;  // per side

// The j-th off-grid key in increasing order: the left side's from -3.875 to -inf, then the right
// side's from 3.875 to inf.
inline int32_t tail_key(int64_t j) {
  static_assert(act_table<Act::Gelu>().bound == 3.875f);
  const uint32_t bits = j < kTailKeys ? 0x80000000u | static_cast<uint32_t>(kTailFirstBits + j)
                                      : static_cast<uint32_t>(kTailFirstBits + j - kTailKeys);
  return static_cast<int32_t>(bits);
}

// The interval of a channel whose tails are uniform, decided from the ends of each side's values
// in the fp32 the kernel compares in; false otherwise. A channel with t = 0 remaps nothing.
inline bool uniform_tail_interval(float t, float c, KeyInterval& out) {
  constexpr float kBound = act_table<Act::Gelu>().bound;
  static_assert(kBound == 3.875f, "the gap is bounded from 3.875 on");
  out = {};
  if (!(t > 0.f)) return true;
  const float left_low = -kGeluTailGap - c, left_high = -0.f - c;
  const bool left_all = std::abs(left_low) < t && std::abs(left_high) < t;
  const bool left_none = left_low >= t || left_high <= -t;
  if (left_all) out = {tail_key(0), tail_key(kTailKeys - 1)};
  return (left_all || left_none) && (kBound - kGeluTailGap) - c >= t;
}

// The intervals of up to kStep channels (t, c: theirs), searched on the forward's own values:
// from the first key with d > -t up to, not including, the first with d >= t.
inline void search_tail_intervals(const float* t, const float* c, int64_t n, KeyInterval* out) {
  int64_t first[2][kStep];  // [0]: first key index with d > -t; [1]: first with d >= t
  for (int bound = 0; bound < 2; ++bound) {
    int64_t lo[kStep], hi[kStep];
    std::fill(lo, lo + kStep, 0);
    std::fill(hi, hi + kStep, 2 * kTailKeys);
    // 2 kTailKeys < 2^31: 31 halvings leave one candidate.
    for (int halving = 0; halving < 31; ++halving) {
      float values[kStep];
      for (int64_t j = 0; j < kStep; ++j) {
        const int64_t mid = j < n ? std::min(lo[j] + (hi[j] - lo[j]) / 2, 2 * kTailKeys - 1) : 0;
        const int32_t key = tail_key(mid);
        std::memcpy(&values[j], &key, sizeof key);
      }
      const F2 a = activate<Act::Gelu>(load(values, kStep));
      store(values, kStep, a.lo, a.hi);
      for (int64_t j = 0; j < n; ++j) {
        if (lo[j] == hi[j]) continue;
        const int64_t mid = lo[j] + (hi[j] - lo[j]) / 2;
        const float d = values[j] - c[j];
        if (bound == 0 ? d > -t[j] : d >= t[j]) {
          hi[j] = mid;
        } else {
          lo[j] = mid + 1;
        }
      }
    }
    std::copy(lo, lo + kStep, first[bound]);
  }
  for (int64_t j = 0; j < n; ++j) {
    out[j] = {};
    if (first[0][j] < first[1][j]) out[j] = {tail_key(first[0][j]), tail_key(first[1][j] - 1)};
  }
}

// Each channel's tail interval, as two arrays of C keys (lo, then hi; stored in floats, as the
// kernel loads them).
inline std::vector<float> gelu_tail_intervals(const ChannelParams& p, int64_t channels) {
  std::vector<KeyInterval> intervals(channels);
  std::vector<int64_t> searched;
  for (int64_t ch = 0; ch < channels; ++ch) {
    const float c = p.center ? p.center[ch] : 0.f;
    if (!uniform_tail_interval(p.threshold[ch], c, intervals[ch])) searched.push_back(ch);
  }
  const int64_t batches = (static_cast<int64_t>(searched.size()) + kStep - 1) / kStep;
  at::parallel_for(0, batches, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = std::min<int64_t>(kStep, searched.size() - b * kStep);
      float t[kStep], c[kStep];
      KeyInterval found[kStep];
      for (int64_t j = 0; j < n; ++j) {
        const int64_t ch = searched[b * kStep + j];
        t[j] = p.threshold[ch];
        c[j] = p.center ? p.center[ch] : 0.f;
      }
      search_tail_intervals(t, c, n, found);
      for (int64_t j = 0; j < n; ++j) intervals[searched[b * kStep + j]] = found[j];
    }
  });
  std::vector<float> keys(2 * channels);
  for (int64_t ch = 0; ch < channels; ++ch) {
    std::memcpy(&keys[ch], &intervals[ch].lo, sizeof(int32_t));
    std::memcpy(&keys[channels + ch], &intervals[ch].hi, sizeof(int32_t));
  }
  return keys;
}

// An estimate of GELU's grid value at x = q w + h from its value at the grid point and the
// derivative table's first terms there: a(q w) + h (a'(q w) + h a''(q w) / 2), which takes the
// value table's row 0 only, the derivative's rows 0 and 2 being read for act'(x) anyway. Per grid
// column, how far it can lie from the grid's own value: |lo|, each coefficient's difference from
// the value table's (rows 2 and 3) and the value table's higher terms at |h| <= w / 2, plus both
// evaluations' rounding: ten roundings between them, each within 2^-24 of its intermediate, and
// no term of M (the sum of every term's bound) in more than seven of those intermediates, so
// together within 7 x 2^-24 M < 2^-21 M; times 1 + 2^-20 for the rounding of the band it makes
// (settle_grid_estimate). Per column, because the left end's columns, whose values are near 0,
// have small higher terms: one bound for all (2.6e-4) left a threshold below 2.1e-4 unsettled
// on a fortieth of the lanes at std 3, and the backward took 1.2x the time.
inline const float* gelu_estimate_errors() {
  static const std::array<float, kActGrid> errors = [] {
    const ActTable& value = act_table<Act::Gelu>();
    const ActTable& grad = grad_table<Act::Gelu>();
    const double half_step = value.step / 2.0;
    const auto coef = [](const ActTable& table, int row, int q) {
      return double{table.coef[row][q]};
    };
    std::array<float, kActGrid> out{};
    for (int q = 0; q < kActGrid; ++q) {
      double dropped = std::abs(coef(value, 1, q)) +
                       std::abs(coef(value, 2, q) - coef(grad, 0, q)) * half_step +
                       std::abs(coef(value, 3, q) - coef(grad, 2, q) / 2) * half_step * half_step;
      double largest = std::abs(coef(value, 0, q)) + std::abs(coef(value, 1, q)) +
                       std::abs(coef(grad, 0, q)) * half_step +
                       std::abs(coef(grad, 2, q)) / 2 * half_step * half_step;
      for (int k = 2; k < kActTableRows; ++k) {
        const double term = std::abs(coef(value, k, q)) * std::pow(half_step, k - 1);
        largest += term;
        if (k >= 4) dropped += term;
      }
      out[q] = static_cast<float>((dropped + 0x1p-21 * largest) * (1 + 0x1p-10) * (1 + 0x1p-20));
    }
    return out;
  }();
  return errors.data();
}

// GELU's act'(x) for a step and, on the grid, the estimate of act(x) and how far it can lie
// from the grid's value; returned: the lanes off the grid, whose value is left for the caller
// to decide the mask of.
C10_ALWAYS_INLINE LanePair gelu_estimate_and_derivative(const F2& x, F2& estimate, F2& error,
                                                        F2& grad) {
  constexpr const ActTable& value = act_table<Act::Gelu>();
  constexpr const ActTable& slope = grad_table<Act::Gelu>();
  static_assert(value.step == slope.step && value.bound == slope.bound);
  const auto evaluate = [&](const fVec& v, fVec& estimated, fVec& derivative) {
    const GridPoint g = grid_point(value, v);
    const fVec slope_at_point = lookup(slope.coef[0], g.col);
    const fVec curvature_at_point = lookup(slope.coef[2], g.col);
    const fVec half_h = g.h * fVec(0.5f);  // exact
    estimated = fused_madd(g.h, fused_madd(curvature_at_point, half_h, slope_at_point),
                           lookup(value.coef[0], g.col));
    derivative = grid_poly(slope, g, slope_at_point, curvature_at_point);
    return g.col;
  };
  const GridCols col_lo = evaluate(x.lo, estimate.lo, grad.lo);
  const GridCols col_hi = evaluate(x.hi, estimate.hi, grad.hi);
  error = {lookup(gelu_estimate_errors(), col_lo), lookup(gelu_estimate_errors(), col_hi)};
  const Mask off_lo = off_grid<Act::Gelu>(x.lo), off_hi = off_grid<Act::Gelu>(x.hi);
  if (any(off_lo, off_hi)) patch_gelu_grad_off_grid(x, off_lo, off_hi, grad);
  return {off_lo, off_hi};
}

// GELU's grid value for a step, as activate has it, where the lanes are on the grid; the
// off-grid lanes keep `decided`.
C10_ALWAYS_INLINE F2 gelu_grid_values(const F2& x, const LanePair& off, const F2& decided) {
  const auto on_grid = [&](const fVec& v, Mask off_lanes, const fVec& kept) {
    return select(off_lanes, kept, grid_value(v, grid_eval(act_table<Act::Gelu>(), v)));
  };
  return {on_grid(x.lo, off.lo, decided.lo), on_grid(x.hi, off.hi, decided.hi)};
}

// How many channels' tails are not uniform (and need a search), counted up to `limit`.
inline int64_t gelu_tails_not_uniform(const ChannelParams& p, int64_t channels, int64_t limit) {
  KeyInterval unused;
  int64_t count = 0;
  for (int64_t ch = 0; ch < channels && count < limit; ++ch) {
    count += !uniform_tail_interval(p.threshold[ch], p.center ? p.center[ch] : 0.f, unused);
  }
  return count;
}

// Where x is off the grid, a value of its side (x on the right, -0 on the left), which decides
// the mask of a channel whose tails are uniform.
C10_ALWAYS_INLINE fVec gelu_sided_values(const fVec& x, Mask off, const fVec& value) {
#if defined(CPU_CAPABILITY_AVX512)
  // vmaxps gives its second operand unless the first is larger: -0 for every x <= -3.875 (NaN
  // is on the grid), one instruction for a compare and a blend.
  return select(off, _mm512_max_ps(x, _mm512_set1_ps(-0.f)), value);
#else
  return select(off, select(less(fVec(0.f), x), x, fVec(-0.f)), value);
#endif
}

// Whether x's key lies in [lo, hi] (keys as fVec bits).
C10_ALWAYS_INLINE Mask key_within(const fVec& x, const fVec& lo, const fVec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i key = _mm512_castps_si512(x);
  return _mm512_mask_cmple_epi32_mask(_mm512_cmpge_epi32_mask(key, _mm512_castps_si512(lo)), key,
                                      _mm512_castps_si512(hi));
#else
  using iVec = at::vec::Vectorized<int32_t>;
  const iVec key = at::vec::cast<int32_t>(x);
  return at::vec::cast<float>((key >= at::vec::cast<int32_t>(lo)) &
                              (key <= at::vec::cast<int32_t>(hi)));
#endif
}

// Where x is off the grid, a value that the remap test |a - c| < t decides as the forward's own
// value: c where x lies in its channel's tail interval (t > 0 there), NaN elsewhere.
C10_ALWAYS_INLINE fVec gelu_tail_mask_values(const fVec& x, Mask off, const fVec& lo,
                                             const fVec& hi, const fVec& c, const fVec& value) {
  const fVec decided =
      select(key_within(x, lo, hi), c, fVec(std::numeric_limits<float>::quiet_NaN()));
  return select(off, decided, value);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace lipkern
