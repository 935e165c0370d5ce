// Float64 evaluators of the smooth activations, and of tanh-GELU's derivative (the fp32 grid's
// fallback).
// Included by csrc/remap_act_kernels.cpp only (see there): it lands in lipkern::<CAP>.
#pragma once

#include "remap_act.h"
#include "cpu/vec_io.h"

#include <cmath>

namespace lipkern {
namespace CPU_CAPABILITY {
namespace {

// The float64 evaluators give the values off the fp32 grid and tanh-GELU's derivative there
// (act_grid.h; GELU's and SiLU's derivatives are fp32 throughout). They work on widened lanes
// and round once to fp32, so they are correctly rounded up to a few 1e-10 relative (the
// double-rounding cases). In double, x^2 of an fp32 x is exact, so the Gaussian's argument
// carries no rounding (erfc's relative sensitivity to z is 2 z^2).

// exp(a) for finite (or NaN) double lanes, relative error below 3e-10 (fp32 needs ~1e-8), for
// results above ~1e-304 (smaller ones are flushed there; every caller's fp32 result has
// underflowed by then): a = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite), a degree-8 Taylor
// polynomial (remainder < 2e-10), times 2^n.
C10_ALWAYS_INLINE dVec exp_d(const dVec& a) {
  constexpr double kLn2Hi = 0x1.62e42fefa39efp-1;
  constexpr double kLn2Lo = 0x1.abc9e3b39803fp-56;
#if defined(CPU_CAPABILITY_AVX512)
  const dVec n = _mm512_roundscale_pd(_mm512_mul_pd(a, _mm512_set1_pd(M_LOG2E)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const dVec ac = a;
#else
  // Adding 1.5 * 2^52 rounds a / ln2 to an integer held in the low mantissa bits.
  constexpr double kShift = 0x1.8p52;
  const dVec ac = at::vec::clamp_min(a, dVec(-700.0));
  const dVec k = at::vec::fmadd(ac, dVec(M_LOG2E), dVec(kShift));
  const dVec n = k - dVec(kShift);
#endif
  dVec r = at::vec::fmadd(n, dVec(-kLn2Hi), ac);
  r = at::vec::fmadd(n, dVec(-kLn2Lo), r);
  dVec p(1.0 / 40320.0);
  for (const double c : {1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0}) {
    p = at::vec::fmadd(p, r, dVec(c));
  }
#if defined(CPU_CAPABILITY_AVX512)
  // scalef also gives the right 0 / inf for out-of-range n.
  return _mm512_scalef_pd(p, n);
#else
  // 2^n built from its bits: ((n + 1023) << 52), n read back from k's mantissa.
  using iVec = at::vec::Vectorized<int64_t>;
  const iVec bits = at::vec::cast<int64_t>(k) - at::vec::cast<int64_t>(dVec(kShift)) + iVec(1023);
  return p * at::vec::cast<double>(bits << iVec(52));
#endif
}

// 1 / d for d >= 1, relative error ~4e-9: AVX512's 14-bit estimate plus one Newton step is much
// cheaper than a division.
C10_ALWAYS_INLINE dVec recip_d(const dVec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const dVec r = _mm512_rcp14_pd(d);
  return at::vec::fmadd(r, at::vec::fnmadd(d, r, dVec(1.0)), r);
#else
  return dVec(1.0) / d;
#endif
}


// NaN stays NaN (at::vec::clamp keeps a NaN operand).
C10_ALWAYS_INLINE dVec clamp_d(const dVec& x, double bound) {
  return at::vec::clamp(x, dVec(-bound), dVec(bound));
}

// Beyond |x| = 40 GELU's Phi is 0 or 1 to far below fp32 resolution; clamping keeps inf out of
// 0 * inf products.
constexpr double kGeluClamp = 40.0;

// erfc(|x| / sqrt 2) for clamped x.
//
// erfc(z) = t exp(-z^2) R(t) with t = 1 / (1 + 0.35 z); R is a degree-10 least-squares fit of
// erfcx(z) / t over z in [0, 10.5] (max relative error 3.8e-9; beyond, fp32 GELU underflows).
C10_ALWAYS_INLINE dVec erfc_of_abs(const dVec& xc) {
  static constexpr double kR[] = {
      -0.02032525112510545, 0.16062136297309768, -0.4820011077430214, 0.6750640518003334,
      -0.5096608178417334,  0.40077415087012197, 0.008323309888157115, 0.19137990980835312,
      0.1804454741802711,   0.19793191679364627, 0.19744700350455824};
  const dVec z = xc.abs() * dVec(M_SQRT1_2);
  const dVec t = recip_d(at::vec::fmadd(z, dVec(0.35), dVec(1.0)));
  dVec r(kR[0]);
  for (int i = 1; i < 11; ++i) r = at::vec::fmadd(r, t, dVec(kR[i]));
  return t * exp_d(xc * xc * dVec(-0.5)) * r;
}

// GELU x Phi(x): for x > 0, x - (x/2) erfc(z); for x <= 0, (x/2) erfc(z); no cancellation either
// way (and -0 keeps its sign).
C10_ALWAYS_INLINE dVec gelu_d(const dVec& x) {
  const dVec xc = clamp_d(x, kGeluClamp);
  const dVec he = xc * dVec(0.5) * erfc_of_abs(xc);
  return dVec::blendv(he, x - he, x > dVec(0.0));
}

// tanh-GELU as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the 1 + tanh(u) form cancels
// for negative x. Beyond |x| = 12 the result is x or underflows fp32 (and exp(-2u) stays finite).
constexpr double kTanhClamp = 12.0;
constexpr double kTanhBeta = M_SQRT2 * M_2_SQRTPI * 0.5;
constexpr double kTanhKappa = 0.044715;

template <bool kValue, bool kGrad>
C10_ALWAYS_INLINE void gelu_tanh_d(const dVec& x, dVec& value, dVec& grad) {
  const dVec xc = clamp_d(x, kTanhClamp);
  const dVec u = dVec(kTanhBeta) * at::vec::fmadd(dVec(kTanhKappa) * xc, xc * xc, xc);
  const dVec e = exp_d(u * dVec(-2.0));
  const dVec s = recip_d(dVec(1.0) + e);
  if constexpr (kValue) value = at::vec::clamp_min(x, dVec(-kTanhClamp)) * s;
  if constexpr (kGrad) {
    // d/dx [x s(2u)] = s + 2 x u' s (1 - s); 1 - s = s e while e < 1 (no cancellation).
    const dVec du = dVec(kTanhBeta) * at::vec::fmadd(dVec(3.0 * kTanhKappa) * xc, xc, dVec(1.0));
    const dVec one_minus_s = dVec::blendv(s * e, dVec(1.0) - s, e >= dVec(1.0));
    grad = at::vec::fmadd(xc * dVec(2.0) * du * s, one_minus_s, s);
  }
}

// SiLU x sigmoid(x); beyond |x| = 200 the sigmoid is 0 or 1 in double.
constexpr double kSiluClamp = 200.0;

C10_ALWAYS_INLINE dVec silu_d(const dVec& x) {
  const dVec xc = clamp_d(x, kSiluClamp);
  return at::vec::clamp_min(x, dVec(-kSiluClamp)) * recip_d(dVec(1.0) + exp_d(xc.neg()));
}

// The value (kValue) and/or the derivative (kGrad, tanh-GELU only) of a smooth activation, which
// share the transcendental work.
template <Act A, bool kValue, bool kGrad>
C10_ALWAYS_INLINE void smooth_d(const dVec& x, dVec& value, dVec& grad) {
  static_assert(A == Act::GeluTanh || !kGrad, "GELU's and SiLU's derivatives are fp32");
  if constexpr (A == Act::Gelu) value = gelu_d(x);
  if constexpr (A == Act::GeluTanh) gelu_tanh_d<kValue, kGrad>(x, value, grad);
  if constexpr (A == Act::Silu) value = silu_d(x);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace lipkern
