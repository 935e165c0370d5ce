// The fused activation + remap kernels. This file is not compiled on its own: each
// csrc/capability/remap_act_kernels.<CAP>.cpp includes it and is compiled with that capability's
// instruction-set flags and CPU_CAPABILITY=<CAP>, so every build lands in its own namespace
// lipkern::<CAP> and uses the matching at::vec::Vectorized specialisation (the scheme ATen uses
// for its own CPU kernels).
//
// All arithmetic is in fp32 on whole vectors; the ragged end of a run uses partial loads and
// stores instead of a scalar loop, so an element's result does not depend on where it sits.

#include "remap_act.h"
#include "activation_tables.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#ifndef CPU_CAPABILITY
#error "remap_act_kernels.cpp is compiled through csrc/capability/*.cpp with CPU_CAPABILITY set"
#endif

namespace lipkern {
namespace CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;
using dVec = at::vec::Vectorized<double>;
constexpr int64_t kF = fVec::size();
// One step covers one 16-bit vector, i.e. two float vectors.
constexpr int64_t kStep = 2 * kF;
static_assert(at::vec::Vectorized<c10::BFloat16>::size() == kStep, "bf16 vector = 2 float vectors");
static_assert(at::vec::Vectorized<c10::Half>::size() == kStep, "fp16 vector = 2 float vectors");
static_assert(dVec::size() * 2 == kF, "a float vector widens into two double vectors");

// Elements per parallel task of the elementwise kernels (ATen's GRAIN_SIZE).
constexpr int64_t kGrain = 32768;

struct F2 {
  fVec lo, hi;
};

// The per-vector helpers below are C10_ALWAYS_INLINE: GCC otherwise calls the activations out of
// line, re-broadcasting every polynomial constant per vector (about 1.3x slower GELU).

template <typename T>
C10_ALWAYS_INLINE F2 load(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n >= kStep) return {fVec::loadu(p), fVec::loadu(p + kF)};
    return {fVec::loadu(p, std::min(n, kF)), n > kF ? fVec::loadu(p + kF, n - kF) : fVec(0.f)};
  } else {
    using V = at::vec::Vectorized<T>;
    const V v = n >= kStep ? V::loadu(p) : V::loadu(p, n);
    auto [lo, hi] = at::vec::convert_to_float<T>(v);
    return {lo, hi};
  }
}

#if defined(CPU_CAPABILITY_AVX512_BF16)
// vcvtne2ps2bf16 rounds 32 floats to bf16 in one instruction (to nearest even; NaN stays NaN),
// where at::vec's integer rounding takes about 18. It reads fp32 subnormals as zero, so a step
// holding one is left to at::vec, which keeps them (bf16 has fp32's exponent range).
C10_ALWAYS_INLINE bool store_bf16_rounded(c10::BFloat16* p, int64_t n, const fVec& lo, const fVec& hi) {
  constexpr int kSubnormal = 0x20;  // vfpclassps category
  if (_mm512_fpclass_ps_mask(lo, kSubnormal) | _mm512_fpclass_ps_mask(hi, kSubnormal)) return false;
  const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  if (n >= kStep) {
    _mm512_storeu_si512(p, v);
  } else {
    _mm512_mask_storeu_epi16(p, static_cast<__mmask32>((uint64_t(1) << n) - 1), v);
  }
  return true;
}
#endif

template <typename T>
C10_ALWAYS_INLINE void store(T* p, int64_t n, const fVec& lo, const fVec& hi) {
#if defined(CPU_CAPABILITY_AVX512_BF16)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (store_bf16_rounded(p, n, lo, hi)) return;
  }
#endif
  if constexpr (std::is_same_v<T, float>) {
    if (n >= kStep) {
      lo.store(p);
      hi.store(p + kF);
    } else {
      lo.store(p, std::min(n, kF));
      if (n > kF) hi.store(p + kF, n - kF);
    }
  } else {
    const auto v = at::vec::convert_from_float<T>(lo, hi);
    if (n >= kStep) {
      v.store(p);
    } else {
      v.store(p, n);
    }
  }
}

C10_ALWAYS_INLINE void widen(const fVec& v, dVec& lo, dVec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
#else
  float f[kF];
  v.store(f);
  double d[kF];
  for (int64_t i = 0; i < kF; ++i) d[i] = f[i];
  lo = dVec::loadu(d);
  hi = dVec::loadu(d + dVec::size());
#endif
}

// ---------------------------------------------------------------------------------------------
// Activations and their derivatives.
//
// The float64 evaluators give the derivatives (backward) and the values off the fp32 grid below.
// They work on widened lanes and round once to fp32, so they are correctly rounded up to a few
// 1e-10 relative (the double-rounding cases). In double, x^2 of an fp32 x is exact, so the
// Gaussian's argument carries no rounding (erfc's relative sensitivity to z is 2 z^2).

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

C10_ALWAYS_INLINE void narrow_parts(const dVec& lo, const dVec& hi, fVec& out) {
#if defined(CPU_CAPABILITY_AVX512)
  out = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
#elif defined(CPU_CAPABILITY_AVX2)
  out = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
#else
  double d[kF];
  lo.store(d);
  hi.store(d + dVec::size());
  float f[kF];
  for (int64_t i = 0; i < kF; ++i) f[i] = static_cast<float>(d[i]);
  out = fVec::loadu(f);
#endif
}

// NaN stays NaN (at::vec::clamp keeps a NaN operand).
C10_ALWAYS_INLINE dVec clamp_d(const dVec& x, double bound) {
  return at::vec::clamp(x, dVec(-bound), dVec(bound));
}

// Beyond |x| = 40 GELU's Phi is 0 or 1 to far below fp32 resolution; clamping keeps inf out of
// 0 * inf products.
constexpr double kGeluClamp = 40.0;

// erfc(|x| / sqrt 2) and exp(-x^2 / 2) for clamped x.
//
// erfc(z) = t exp(-z^2) R(t) with t = 1 / (1 + 0.35 z); R is a degree-10 least-squares fit of
// erfcx(z) / t over z in [0, 10.5] (max relative error 3.8e-9; beyond, fp32 GELU underflows).
struct GaussTail {
  dVec erfc, gauss;
};

C10_ALWAYS_INLINE GaussTail gauss_tail(const dVec& xc) {
  static constexpr double kR[] = {
      -0.02032525112510545, 0.16062136297309768, -0.4820011077430214, 0.6750640518003334,
      -0.5096608178417334,  0.40077415087012197, 0.008323309888157115, 0.19137990980835312,
      0.1804454741802711,   0.19793191679364627, 0.19744700350455824};
  const dVec z = xc.abs() * dVec(M_SQRT1_2);
  const dVec t = recip_d(at::vec::fmadd(z, dVec(0.35), dVec(1.0)));
  dVec r(kR[0]);
  for (int i = 1; i < 11; ++i) r = at::vec::fmadd(r, t, dVec(kR[i]));
  const dVec gauss = exp_d(xc * xc * dVec(-0.5));
  return {t * gauss * r, gauss};
}

// Each smooth activation as one evaluator yielding the value and/or the derivative, so that the
// backward pass (which needs both: the value for the mask) shares the transcendental work.
template <bool kValue, bool kGrad>
C10_ALWAYS_INLINE void gelu_d(const dVec& x, dVec& value, dVec& grad) {
  const dVec xc = clamp_d(x, kGeluClamp);
  const GaussTail g = gauss_tail(xc);
  if constexpr (kValue) {
    // x > 0: x Phi(x) = x - (x/2) erfc(z); x <= 0: (x/2) erfc(z), no cancellation either way
    // (and -0 keeps its sign).
    const dVec he = xc * dVec(0.5) * g.erfc;
    value = dVec::blendv(he, x - he, x > dVec(0.0));
  }
  if constexpr (kGrad) {
    const dVec half_e = g.erfc * dVec(0.5);
    const dVec cdf = dVec::blendv(half_e, dVec(1.0) - half_e, xc >= dVec(0.0));
    grad = at::vec::fmadd(xc * dVec(0.5 * M_2_SQRTPI * M_SQRT1_2), g.gauss, cdf);
  }
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

template <bool kValue, bool kGrad>
C10_ALWAYS_INLINE void silu_d(const dVec& x, dVec& value, dVec& grad) {
  const dVec xc = clamp_d(x, kSiluClamp);
  const dVec s = recip_d(dVec(1.0) + exp_d(xc.neg()));
  if constexpr (kValue) value = at::vec::clamp_min(x, dVec(-kSiluClamp)) * s;
  if constexpr (kGrad) grad = s * at::vec::fmadd(xc, dVec(1.0) - s, dVec(1.0));
}

template <Act A, bool kValue, bool kGrad>
C10_ALWAYS_INLINE void smooth_d(const dVec& x, dVec& value, dVec& grad) {
  if constexpr (A == Act::Gelu) gelu_d<kValue, kGrad>(x, value, grad);
  if constexpr (A == Act::GeluTanh) gelu_tanh_d<kValue, kGrad>(x, value, grad);
  if constexpr (A == Act::Silu) silu_d<kValue, kGrad>(x, value, grad);
}

// ---------------------------------------------------------------------------------------------
// fp32 evaluation on a grid (csrc/activation_tables.h, fitted by scripts/fit_activation_tables.py).
//
// act(x) = hi[q] + (lo[q] + c1[q] h + h (h P_q(h))) with q = round(x / w) and h = x - q w exact:
// the activation is approximated around each grid point, so no term cancels, and the result is
// within 1.32 fp32 ulps of the truth (tests/test_cpu_kernels.py), for every dtype. Inputs off
// the grid (|x| >= bound, rare for activations, and +-inf) take the float64 path above for their
// whole vector.

template <Act A>
constexpr const ActTable& act_table() {
  if constexpr (A == Act::Gelu) return kGeluTable;
  if constexpr (A == Act::GeluTanh) return kGeluTanhTable;
  if constexpr (A == Act::Silu) return kSiluTable;
}

// Each lane's grid column q + kActGrid / 2, which `t` holds in its low mantissa bits (see
// smooth_grid), and one table row read at those columns. Lanes off the grid (and NaN) read some
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

template <Act A>
C10_ALWAYS_INLINE fVec smooth_grid(const fVec& x) {
  constexpr const ActTable& T = act_table<A>();
  // x / w is exact (w is a power of two); adding 1.5 * 2^23 rounds it to an integer (to nearest
  // even, the magic number being even) that sits in t's low mantissa bits, offset by
  // kActGrid / 2 so that they hold the grid column. Valid for |x / w| < 2^22, far beyond the
  // grid; it replaces a round, a conversion and an add.
  constexpr float kMagic = 0x1.8p23f + kActGrid / 2;
  const fVec t = at::vec::fmadd(x, fVec(T.inv_step), fVec(kMagic));
  const fVec q = t - fVec(kMagic);
  const GridCols col = grid_cols(t);
  // q w is exact and so is x - q w (Sterbenz: |h| <= w / 2 <= |x| / 2).
  const fVec h = at::vec::fnmadd(q, fVec(T.step), x);
  fVec p = lookup(T.coef[kActTableRows - 1], col);
  for (int k = kActTableRows - 2; k >= 3; --k) p = fused_madd(p, h, lookup(T.coef[k], col));
  const fVec linear = fused_madd(lookup(T.coef[2], col), h, lookup(T.coef[1], col));
  return fused_madd(h, h * p, linear) + lookup(T.coef[0], col);
}

template <Act A>
C10_ALWAYS_INLINE fVec smooth_double(const fVec& x) {
  dVec lo, hi, vlo, vhi, unused;
  widen(x, lo, hi);
  smooth_d<A, true, false>(lo, vlo, unused);
  smooth_d<A, true, false>(hi, vhi, unused);
  fVec out;
  narrow_parts(vlo, vhi, out);
  return out;
}

// Lane masks. AVX-512 compares write k-registers, which at::vec turns into vector masks and back
// (two conversions per compare, a third of the forward's time); elsewhere masks are vectors.
#if defined(CPU_CAPABILITY_AVX512)
using Mask = __mmask16;
C10_ALWAYS_INLINE Mask less(const fVec& a, const fVec& b) {
  return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ);
}
C10_ALWAYS_INLINE Mask at_least(const fVec& a, const fVec& b) {
  return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ);
}
C10_ALWAYS_INLINE Mask equal(const fVec& a, const fVec& b) {
  return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ);
}
C10_ALWAYS_INLINE fVec select(Mask m, const fVec& yes, const fVec& no) {
  return _mm512_mask_blend_ps(m, no, yes);
}
C10_ALWAYS_INLINE bool any(Mask m) {
  return m != 0;
}
// m restricted to its first n lanes (0 <= n <= kF).
C10_ALWAYS_INLINE Mask first_lanes(Mask m, int64_t n) {
  return m & static_cast<Mask>((1u << n) - 1);
}
C10_ALWAYS_INLINE fVec add_one_where(Mask m, const fVec& count) {
  return _mm512_mask_add_ps(count, m, count, _mm512_set1_ps(1.f));
}
#else
using Mask = fVec;
C10_ALWAYS_INLINE Mask less(const fVec& a, const fVec& b) {
  return a < b;
}
C10_ALWAYS_INLINE Mask at_least(const fVec& a, const fVec& b) {
  return a >= b;
}
C10_ALWAYS_INLINE Mask equal(const fVec& a, const fVec& b) {
  return a == b;
}
C10_ALWAYS_INLINE fVec select(const Mask& m, const fVec& yes, const fVec& no) {
  return fVec::blendv(no, yes, m);
}
C10_ALWAYS_INLINE bool any(const Mask& m) {
  return m.zero_mask() != (1 << kF) - 1;
}
C10_ALWAYS_INLINE Mask first_lanes(const Mask& m, int64_t n) {
  return fVec::set(fVec(0.f), m, n);
}
C10_ALWAYS_INLINE fVec add_one_where(const Mask& m, const fVec& count) {
  return count + (m & fVec(1.f));
}
#endif

// ReLU as PyTorch's clamp_min(x, 0): -0 and NaN pass through unchanged.
C10_ALWAYS_INLINE fVec relu(const fVec& x) {
  return select(less(x, fVec(0.f)), fVec(0.f), x);
}

constexpr bool is_smooth(Act A) {
  return A == Act::Gelu || A == Act::GeluTanh || A == Act::Silu;
}

template <Act A>
C10_ALWAYS_INLINE fVec activate(const fVec& x) {
  if constexpr (A == Act::Identity) return x;
  if constexpr (A == Act::Relu) return relu(x);
  if constexpr (is_smooth(A)) {
    // act(+-0) = +-0 as PyTorch's: the grid's h^2 term would turn -0 into +0.
    const fVec a = select(equal(x, fVec(0.f)), x, smooth_grid<A>(x));
    const Mask off_grid = at_least(x.abs(), fVec(act_table<A>().bound));  // NaN stays on
    return any(off_grid) ? select(off_grid, smooth_double<A>(x), a) : a;
  }
}

// ---------------------------------------------------------------------------------------------
// 16-bit inputs: tables of all 65536 activations and derivatives.
//
// A float16 or bfloat16 x has only 65536 values, so each smooth activation is tabulated once per
// process (256 KB of fp32, built on first use by activate<A> itself, hence bit-identical to it),
// and one gather replaces the grid polynomial: the 16-bit bits are the index. The backward's
// act'(x) is tabulated the same way in float64 (512 KB), from the float64 evaluators it replaces.

constexpr int64_t k16BitValues = 65536;

template <typename T, Act A>
constexpr bool uses_table() {
  return !std::is_same_v<T, float> && is_smooth(A);
}

// act'(x) of one step as four double vectors, lanes in order (the float64 evaluators).
struct D4 {
  dVec d[4];
};

template <Act A>
C10_ALWAYS_INLINE D4 derivatives(const F2& x) {
  D4 out;
  dVec w[4], unused;
  widen(x.lo, w[0], w[1]);
  widen(x.hi, w[2], w[3]);
  for (int k = 0; k < 4; ++k) smooth_d<A, false, true>(w[k], unused, out.d[k]);
  return out;
}

// Every 16-bit pattern of T, a step at a time, as floats: fill(first index, values).
template <typename T, typename F>
void for_each_16bit_step(F&& fill) {
  uint16_t bits[kStep];
  for (int64_t i = 0; i < k16BitValues; i += kStep) {
    for (int64_t j = 0; j < kStep; ++j) bits[j] = static_cast<uint16_t>(i + j);
    fill(i, load(reinterpret_cast<const T*>(bits), kStep));
  }
}

template <typename T, Act A>
const float* activation_table() {
  static const std::vector<float> table = [] {
    std::vector<float> values(k16BitValues);
    for_each_16bit_step<T>([&](int64_t i, const F2& v) {
      activate<A>(v.lo).store(values.data() + i);
      activate<A>(v.hi).store(values.data() + i + kF);
    });
    return values;
  }();
  return table.data();
}

template <typename T, Act A>
const double* derivative_table() {
  static const std::vector<double> table = [] {
    std::vector<double> values(k16BitValues);
    for_each_16bit_step<T>([&](int64_t i, const F2& v) {
      const D4 d = derivatives<A>(v);
      for (int k = 0; k < 4; ++k) d.d[k].store(values.data() + i + k * dVec::size());
    });
    return values;
  }();
  return table.data();
}

// The tables a kernel over T reads (null where none is used); fetched before the parallel
// region, so that the one-time build happens on the calling thread.
template <typename T, Act A>
const float* activation_table_for() {
  if constexpr (uses_table<T, A>()) return activation_table<T, A>();
  return nullptr;
}

template <typename T, Act A>
const double* derivative_table_for() {
  if constexpr (uses_table<T, A>()) return derivative_table<T, A>();
  return nullptr;
}

// The table indices (the 16-bit patterns, zero-extended) of one step: the first and second
// float vector's lanes. Padding lanes read index 0 (x = +0).
#if defined(CPU_CAPABILITY_AVX512)
using Index = __m512i;
#elif defined(CPU_CAPABILITY_AVX2)
using Index = __m256i;
#else
struct Index {
  uint32_t lane[kF];
};
#endif

struct Indices {
  Index lo, hi;
};

template <typename T>
C10_ALWAYS_INLINE Indices load_indices(const T* p, int64_t n) {
  using V = at::vec::Vectorized<T>;
  const V raw = n >= kStep ? V::loadu(p) : V::loadu(p, n);
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i bits = raw;
  return {_mm512_cvtepu16_epi32(_mm512_castsi512_si256(bits)),
          _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(bits, 1))};
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i bits = raw;
  return {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(bits)),
          _mm256_cvtepu16_epi32(_mm256_extracti128_si256(bits, 1))};
#else
  uint16_t bits[kStep];
  raw.store(bits);
  Indices out;
  for (int64_t i = 0; i < kF; ++i) {
    out.lo.lane[i] = bits[i];
    out.hi.lane[i] = bits[kF + i];
  }
  return out;
#endif
}

C10_ALWAYS_INLINE fVec gather(const float* table, const Index& index) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_i32gather_ps(index, table, sizeof(float));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_i32gather_ps(table, index, sizeof(float));
#else
  float values[kF];
  for (int64_t i = 0; i < kF; ++i) values[i] = table[index.lane[i]];
  return fVec::loadu(values);
#endif
}

// The two double vectors of table values at one float vector's lanes.
C10_ALWAYS_INLINE void gather(const double* table, const Index& index, dVec& lo, dVec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  lo = _mm512_i32gather_pd(_mm512_castsi512_si256(index), table, sizeof(double));
  hi = _mm512_i32gather_pd(_mm512_extracti64x4_epi64(index, 1), table, sizeof(double));
#elif defined(CPU_CAPABILITY_AVX2)
  lo = _mm256_i32gather_pd(table, _mm256_castsi256_si128(index), sizeof(double));
  hi = _mm256_i32gather_pd(table, _mm256_extracti128_si256(index, 1), sizeof(double));
#else
  double values[kF];
  for (int64_t i = 0; i < kF; ++i) values[i] = table[index.lane[i]];
  lo = dVec::loadu(values);
  hi = dVec::loadu(values + dVec::size());
#endif
}

// act(x) for the first n elements of p, as the two float vectors of one step; padding lanes hold
// act(0) = 0.
template <typename T, Act A>
C10_ALWAYS_INLINE F2 load_activated(const T* p, int64_t n, const float* table) {
  if constexpr (uses_table<T, A>()) {
    const Indices index = load_indices(p, n);
    return {gather(table, index.lo), gather(table, index.hi)};
  } else {
    const F2 v = load(p, n);
    return {activate<A>(v.lo), activate<A>(v.hi)};
  }
}

// |a - c| < t in fp32; NaN compares false and t = 0 never holds.
C10_ALWAYS_INLINE Mask remap_mask(const fVec& a, const fVec& t, const fVec& c) {
  return less((a - c).abs(), t);
}

// ---------------------------------------------------------------------------------------------
// Walking a flat range of a [outer, C, inner] tensor in runs that share a parameter layout.
//
// Lanes mode (inner == 1): a run is a stretch of consecutive channels of one row; thresholds and
// centres are loaded as vectors alongside the data. Row mode: a run is a stretch of one channel;
// its threshold and centre are broadcast.

template <typename F>
inline void for_each_run(const Geometry& g, int64_t begin, int64_t end, F&& body) {
  const bool lanes = g.inner == 1;
  const int64_t period = lanes ? g.channels : g.inner;
  int64_t p = begin;
  while (p < end) {
    const int64_t row = p / period;
    const int64_t run_end = std::min(end, (row + 1) * period);
    const int64_t ch = lanes ? p - row * period : row % g.channels;
    body(p, run_end - p, ch);
    p = run_end;
  }
}

// Thresholds and centres for one step of a run.
struct StepParams {
  F2 t, c;
};

template <bool kLanes>
struct RunParams {
  const float* t;  // lanes: first channel of the run; row: the run's channel
  const float* c;  // null without a centre
  fVec t_b, c_b;

  RunParams(const ChannelParams& p, int64_t ch) : t(p.threshold + ch), c(p.center ? p.center + ch : nullptr) {
    if constexpr (!kLanes) {
      t_b = fVec(*t);
      c_b = c ? fVec(*c) : fVec(0.f);
    }
  }

  inline StepParams at(int64_t i, int64_t n) const {
    if constexpr (kLanes) {
      // A remap without centre is the remap towards 0: |a - 0| = |a| and the fill is +0.
      return {load(t + i, n), c ? load(c + i, n) : F2{fVec(0.f), fVec(0.f)}};
    } else {
      return {{t_b, t_b}, {c_b, c_b}};
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Forward (also in place: y may equal x).

template <typename T, Act A, bool kLanes>
void forward_run(const T* x, T* y, int64_t n, const RunParams<kLanes>& rp, const float* table) {
  for (int64_t i = 0; i < n; i += kStep) {
    const int64_t m = std::min(kStep, n - i);
    const F2 a = load_activated<T, A>(x + i, m, table);
    const StepParams p = rp.at(i, m);
    store(y + i, m, select(remap_mask(a.lo, p.t.lo, p.c.lo), p.c.lo, a.lo),
          select(remap_mask(a.hi, p.t.hi, p.c.hi), p.c.hi, a.hi));
  }
}

// Identity and ReLU without a centre decide |a| < t on the bit patterns, in x's own format: the
// non-NaN magnitudes of a float are ordered like its bits with the sign cleared, so |x| < t holds
// exactly when those bits are below the bits of the smallest T that is >= t, and NaN bits lie above
// every such bound (at most +inf's). A step is then a load, an and, a compare or three, an and and
// a store: 16-bit data skips two conversions each way, fp32 the subtraction of a zero centre and
// the blend, which is what an input remap between a LayerNorm and a Linear costs (ViT's FC1).
template <Act A>
constexpr bool remaps_on_bits() {
  return A == Act::Identity || A == Act::Relu;
}

// The integer lanes holding a T's bits, and the bits of +inf.
template <typename T>
struct Bits {
  using type = int16_t;
  static constexpr int16_t kInf = std::is_same_v<T, c10::Half> ? 0x7c00 : 0x7f80;
};
template <>
struct Bits<float> {
  using type = int32_t;
  static constexpr int32_t kInf = 0x7f800000;
};

// The bits of the smallest non-negative T that is >= t (t >= 0 and not NaN; +-0 gives 0, so
// nothing is remapped).
template <typename T>
typename Bits<T>::type remap_bound(float t) {
  if (!(t > 0.f)) return 0;
  if constexpr (std::is_same_v<T, float>) {
    return c10::bit_cast<int32_t>(t);
  } else {
    const T nearest(t);  // t's floor or ceiling in T
    return static_cast<int16_t>(nearest.x + (static_cast<float>(nearest) < t ? 1 : 0));
  }
}

template <typename T, Act A, bool kLanes>
void forward_run_bits(const T* x, T* y, int64_t n, const typename Bits<T>::type* bound) {
  using I = typename Bits<T>::type;
  using iVec = at::vec::Vectorized<I>;
  constexpr int64_t kW = iVec::size();
  const iVec magnitude_bits(std::numeric_limits<I>::max()), zero(0), inf(Bits<T>::kInf);
  const iVec bound_b(*bound);
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t m = std::min(kW, n - i);
    const iVec v = m >= kW ? iVec::loadu(x + i) : iVec::loadu(x + i, m);
    const iVec magnitude = v & magnitude_bits;
    iVec b = bound_b;
    if constexpr (kLanes) b = m >= kW ? iVec::loadu(bound + i) : iVec::loadu(bound + i, m);
    iVec keep = magnitude >= b;
    if constexpr (A == Act::Relu) {
      // relu(x) = +0 for x < 0; -0 and NaN of either sign pass, as clamp_min(x, 0) (relu above).
      keep = keep & ((v >= zero) | (magnitude == zero) | (magnitude > inf));
    }
    const iVec out = v & keep;  // a remapped lane becomes +0
    if (m >= kW) {
      out.store(y + i);
    } else {
      out.store(y + i, m);
    }
  }
}

template <typename T, Act A>
void forward_bits(const ForwardArgs& args) {
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  const Geometry& g = args.geometry;
  std::vector<typename Bits<T>::type> bounds(g.channels);
  for (int64_t c = 0; c < g.channels; ++c) bounds[c] = remap_bound<T>(args.params.threshold[c]);
  at::parallel_for(0, g.numel, kGrain, [&](int64_t begin, int64_t end) {
    for_each_run(g, begin, end, [&](int64_t p, int64_t n, int64_t ch) {
      if (g.inner == 1) {
        forward_run_bits<T, A, true>(x + p, y + p, n, bounds.data() + ch);
      } else {
        forward_run_bits<T, A, false>(x + p, y + p, n, bounds.data() + ch);
      }
    });
  });
}

template <typename T, Act A>
void forward_typed(const ForwardArgs& args) {
  if constexpr (remaps_on_bits<A>()) {
    if (!args.params.center) return forward_bits<T, A>(args);
  }
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  const Geometry& g = args.geometry;
  const float* table = activation_table_for<T, A>();
  at::parallel_for(0, g.numel, kGrain, [&](int64_t begin, int64_t end) {
    for_each_run(g, begin, end, [&](int64_t p, int64_t n, int64_t ch) {
      if (g.inner == 1) {
        forward_run<T, A, true>(x + p, y + p, n, RunParams<true>(args.params, ch), table);
      } else {
        forward_run<T, A, false>(x + p, y + p, n, RunParams<false>(args.params, ch), table);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Forward + per-channel statistics.
//
// The flat range is cut into blocks whose size depends only on numel; each block accumulates
// into its own per-channel slots (fp64 sums, fp32 max, remap counts in fp32, exact below 2^24),
// and the slots are combined block by block in index order. The result is therefore the same
// for any thread count, bit for bit.

// A block is one parallel task, so a tensor is cut into at least kStatsBlocksForBalance of them
// where it can be: with 5 blocks on 2 threads (ViT-tiny's MLP at batch 8, 1.2 M elements) one
// thread did 3 and the scan ran 30 % slower. Blocks stay at least kMinStatsBlock elements (their
// zeroed slots and the final combine are per block), and grow no larger than kLargeStatsBlock
// until kMaxStatsBlocks is reached: each block owns C slots that every tile revisits, and at
// 64 Ki elements the slots of a 4096 x 1024 tensor took 1.5 MB and GELU stats ran 10 % slower.
constexpr int64_t kStatsBlocksForBalance = 16;
constexpr int64_t kMinStatsBlock = 16384;
constexpr int64_t kLargeStatsBlock = 262144;
constexpr int64_t kMaxStatsBlocks = 1024;
// Keeps a block's per-channel fp32 remap count exact.
constexpr int64_t kMaxStatsBlock = int64_t(1) << 22;
// Bounds the per-block slots (24 bytes each) when C is large.
constexpr int64_t kMaxStatsSlots = int64_t(1) << 22;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Block length in units (rows of C in lanes mode, elements in row mode), from the shape only.
int64_t stats_block_units(const Geometry& g, int64_t unit) {
  const int64_t units = g.numel / unit;
  const int64_t fewest = ceil_div(g.numel * g.channels, kMaxStatsSlots);
  const int64_t balanced = std::clamp(ceil_div(g.numel, kStatsBlocksForBalance), kMinStatsBlock,
                                      kLargeStatsBlock);
  const int64_t elements = std::max({balanced, ceil_div(g.numel, kMaxStatsBlocks), fewest});
  return std::max<int64_t>(1, std::min({ceil_div(std::min(elements, kMaxStatsBlock), unit), units}));
}

struct BlockSlots {
  double* sum;
  double* sumsq;
  float* amax;
  float* remapped;
};

// The amax accumulators' max. It may drop a NaN operand (AVX-512's vmaxps returns its second
// operand then), which costs less than propagating it: a NaN activation also makes the channel's
// fp64 sum of squares NaN (nothing else can: squares are >= 0 and cannot overflow fp64), and the
// final combine sets amax to NaN from there.
C10_ALWAYS_INLINE fVec max_of_finite(const fVec& a, const fVec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

// The lanes of v added as a pairwise tree (a fixed order, with a short dependency chain).
C10_ALWAYS_INLINE double lane_sum(const dVec& v) {
  double d[dVec::size()];
  v.store(d);
  for (int64_t width = dVec::size() / 2; width >= 1; width /= 2) {
    for (int64_t i = 0; i < width; ++i) d[i] += d[i + width];
  }
  return d[0];
}

inline float nan_max(float m, float v) {
  return (std::isnan(v) || v > m) ? v : m;
}

// Lanes mode: whole rows of C channels. A tile of rows is accumulated in registers per chunk of
// channels before touching the block's slots, so the slots' loads and stores are amortised.
template <typename T, Act A>
void stats_rows_lanes(const T* x, T* y, int64_t rows, int64_t C, const ChannelParams& params,
                      const BlockSlots& s, const float* table) {
  constexpr int64_t kTile = 16;
  constexpr int64_t kD = dVec::size();
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t r1 = std::min(rows, r0 + kTile);
    for (int64_t c0 = 0; c0 < C; c0 += kStep) {
      const int64_t m = std::min(kStep, C - c0);
      // Padding lanes (m < kStep) load x = 0 and t = c = 0: act(0) = 0 is never remapped and
      // adds nothing, and they are not stored back.
      const StepParams p = RunParams<true>(params, c0).at(0, m);
      dVec sum[4], sumsq[4];
      fVec amax0(0.f), amax1(0.f), count0(0.f), count1(0.f);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = r * C + c0;
        const F2 a = load_activated<T, A>(x + off, m, table);
        const fVec &a0 = a.lo, &a1 = a.hi;
        const Mask k0 = remap_mask(a0, p.t.lo, p.c.lo), k1 = remap_mask(a1, p.t.hi, p.c.hi);
        store(y + off, m, select(k0, p.c.lo, a0), select(k1, p.c.hi, a1));
        amax0 = max_of_finite(amax0, a0.abs());
        amax1 = max_of_finite(amax1, a1.abs());
        count0 = add_one_where(k0, count0);
        count1 = add_one_where(k1, count1);
        dVec d[4];
        widen(a0, d[0], d[1]);
        widen(a1, d[2], d[3]);
        for (int k = 0; k < 4; ++k) {
          sum[k] = sum[k] + d[k];
          sumsq[k] = at::vec::fmadd(d[k], d[k], sumsq[k]);
        }
      }
      const F2 mx = load(s.amax + c0, m);
      store(s.amax + c0, m, at::vec::maximum(mx.lo, amax0), at::vec::maximum(mx.hi, amax1));
      const F2 cnt = load(s.remapped + c0, m);
      store(s.remapped + c0, m, cnt.lo + count0, cnt.hi + count1);
      for (int64_t k = 0; k < 4 && k * kD < m; ++k) {
        const int64_t mk = std::min(kD, m - k * kD);
        (dVec::loadu(s.sum + c0 + k * kD, mk) + sum[k]).store(s.sum + c0 + k * kD, mk);
        (dVec::loadu(s.sumsq + c0 + k * kD, mk) + sumsq[k]).store(s.sumsq + c0 + k * kD, mk);
      }
    }
  }
}

template <typename T, Act A>
void stats_run_row(const T* x, T* y, int64_t n, int64_t ch, const ChannelParams& params,
                   const BlockSlots& s, const float* table) {
  const RunParams<false> rp(params, ch);
  const StepParams p = rp.at(0, kStep);
  dVec sum[4], sumsq[4];
  fVec amax(0.f), count(0.f);
  for (int64_t i = 0; i < n; i += kStep) {
    const int64_t m = std::min(kStep, n - i);
    const F2 a = load_activated<T, A>(x + i, m, table);
    const fVec &a0 = a.lo, &a1 = a.hi;
    Mask k0 = remap_mask(a0, p.t.lo, p.c.lo), k1 = remap_mask(a1, p.t.hi, p.c.hi);
    store(y + i, m, select(k0, p.c.lo, a0), select(k1, p.c.hi, a1));
    if (m < kStep) {
      // Padding lanes hold act(0) = 0, harmless for sums and max but not for the count.
      k0 = first_lanes(k0, std::min(m, kF));
      k1 = first_lanes(k1, std::max<int64_t>(m - kF, 0));
    }
    amax = max_of_finite(amax, max_of_finite(a0.abs(), a1.abs()));
    count = add_one_where(k1, add_one_where(k0, count));
    dVec d[4];
    widen(a0, d[0], d[1]);
    widen(a1, d[2], d[3]);
    for (int k = 0; k < 4; ++k) {
      sum[k] = sum[k] + d[k];
      sumsq[k] = at::vec::fmadd(d[k], d[k], sumsq[k]);
    }
  }
  // Fold the lanes in a fixed order, as trees: a run can be as short as one 7x7 plane, and a
  // sequential fold of the 32 sums (a chain of 32 dependent adds) then cost more than the run.
  s.sum[ch] += lane_sum((sum[0] + sum[1]) + (sum[2] + sum[3]));
  s.sumsq[ch] += lane_sum((sumsq[0] + sumsq[1]) + (sumsq[2] + sumsq[3]));
  s.amax[ch] = nan_max(s.amax[ch], at::vec::vec_reduce_all<float>(
                                       [](const fVec& a, const fVec& b) {
                                         return at::vec::maximum(a, b);
                                       },
                                       amax));
  s.remapped[ch] += at::vec::vec_reduce_all<float>(
      [](const fVec& a, const fVec& b) { return a + b; }, count);
}

template <typename T, Act A>
void forward_stats_typed(const ForwardArgs& args, const StatsOut& out) {
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  const Geometry& g = args.geometry;
  const int64_t C = g.channels;
  // Lanes mode cuts blocks at row boundaries (rows of C channels); row mode anywhere.
  const bool lanes = g.inner == 1;
  const int64_t unit = lanes ? C : 1;
  const int64_t units = g.numel / unit;
  const int64_t block = stats_block_units(g, unit);
  const int64_t nblocks = (units + block - 1) / block;
  std::vector<double> sum(nblocks * C, 0.0), sumsq(nblocks * C, 0.0);
  std::vector<float> amax(nblocks * C, 0.f), remapped(nblocks * C, 0.f);
  const float* table = activation_table_for<T, A>();

  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const BlockSlots slots{sum.data() + b * C, sumsq.data() + b * C, amax.data() + b * C,
                             remapped.data() + b * C};
      const int64_t begin = b * block, end = std::min(units, begin + block);
      if (lanes) {
        stats_rows_lanes<T, A>(x + begin * C, y + begin * C, end - begin, C, args.params, slots,
                               table);
      } else {
        for_each_run(g, begin, end, [&](int64_t p, int64_t n, int64_t ch) {
          stats_run_row<T, A>(x + p, y + p, n, ch, args.params, slots, table);
        });
      }
    }
  });

  at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s = 0, q = 0;
      float m = 0.f;
      int64_t r = 0;
      for (int64_t b = 0; b < nblocks; ++b) {
        s += sum[b * C + c];
        q += sumsq[b * C + c];
        m = nan_max(m, amax[b * C + c]);
        r += static_cast<int64_t>(remapped[b * C + c]);
      }
      out.sum[c] = s;
      out.sumsq[c] = q;
      out.amax[c] = std::isnan(q) ? static_cast<float>(q) : m;
      out.remapped[c] = r;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward: dx = dy * act'(x) * (straight_through or not mask).

// dx for one fp32 vector: dy * act'(x), with dy zeroed (+0, masked_fill) where remapped.
// `a` is act(x) as the forward computes it, so both passes remap the same elements; for the
// smooth activations, `dlo` and `dhi` are act'(x) of the lower and upper lanes, in double.
template <Act A>
C10_ALWAYS_INLINE fVec backward_vec(const fVec& x, const fVec& a, fVec g, const fVec& t,
                                    const fVec& c, bool straight_through, const dVec& dlo,
                                    const dVec& dhi) {
  if (!straight_through) g = select(remap_mask(a, t, c), fVec(0.f), g);
  if constexpr (is_smooth(A)) {
    // dy * act'(x) is formed in double, so dx is rounded once.
    dVec glo, ghi;
    widen(g, glo, ghi);
    fVec out;
    narrow_parts(glo * dlo, ghi * dhi, out);
    return out;
  } else {
    if constexpr (A == Act::Identity) return g;
    // A select, as PyTorch's threshold_backward: +0 (not dy * 0) where x <= 0 or x is NaN.
    if constexpr (A == Act::Relu) return select(less(fVec(0.f), x), g, fVec(0.f));
  }
}

struct BackwardTables {
  const float* activation;  // null with straight_through (no mask) or without a table
  const double* derivative;
};

template <typename T, typename G, Act A, bool kLanes>
void backward_run(const G* dy, const T* x, T* dx, int64_t n, const RunParams<kLanes>& rp,
                  bool straight_through, const BackwardTables& tables) {
  for (int64_t i = 0; i < n; i += kStep) {
    const int64_t m = std::min(kStep, n - i);
    const F2 v = load(x + i, m);
    // a: the mask's activation (unused with straight_through); d: act'(x).
    F2 a = v;
    D4 d;
    if constexpr (uses_table<T, A>()) {
      // One index load serves both tables.
      const Indices index = load_indices(x + i, m);
      if (!straight_through) {
        a = {gather(tables.activation, index.lo), gather(tables.activation, index.hi)};
      }
      gather(tables.derivative, index.lo, d.d[0], d.d[1]);
      gather(tables.derivative, index.hi, d.d[2], d.d[3]);
    } else {
      if (!straight_through) a = {activate<A>(v.lo), activate<A>(v.hi)};
      if constexpr (is_smooth(A)) d = derivatives<A>(v);
    }
    const F2 g = load(dy + i, m);
    const StepParams p = rp.at(i, m);
    store(dx + i, m,
          backward_vec<A>(v.lo, a.lo, g.lo, p.t.lo, p.c.lo, straight_through, d.d[0], d.d[1]),
          backward_vec<A>(v.hi, a.hi, g.hi, p.t.hi, p.c.hi, straight_through, d.d[2], d.d[3]));
  }
}

template <typename T, typename G, Act A>
void backward_typed(const BackwardArgs& args) {
  const G* dy = static_cast<const G*>(args.grad_y);
  const T* x = static_cast<const T*>(args.x);
  T* dx = static_cast<T*>(args.grad_x);
  const Geometry& g = args.geometry;
  const BackwardTables tables{
      args.straight_through ? nullptr : activation_table_for<T, A>(), derivative_table_for<T, A>()};
  at::parallel_for(0, g.numel, kGrain, [&](int64_t begin, int64_t end) {
    for_each_run(g, begin, end, [&](int64_t p, int64_t n, int64_t ch) {
      if (g.inner == 1) {
        backward_run<T, G, A, true>(dy + p, x + p, dx + p, n, RunParams<true>(args.params, ch),
                                    args.straight_through, tables);
      } else {
        backward_run<T, G, A, false>(dy + p, x + p, dx + p, n, RunParams<false>(args.params, ch),
                                     args.straight_through, tables);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Type and activation dispatch.

template <typename F>
void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::Identity: return f(std::integral_constant<Act, Act::Identity>{});
    case Act::Relu: return f(std::integral_constant<Act, Act::Relu>{});
    case Act::Gelu: return f(std::integral_constant<Act, Act::Gelu>{});
    case Act::GeluTanh: return f(std::integral_constant<Act, Act::GeluTanh>{});
    case Act::Silu: return f(std::integral_constant<Act, Act::Silu>{});
  }
}

template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "lipkern: x must be float16, bfloat16 or float32, got ", dtype);
  }
}

void forward(const ForwardArgs& args) {
  dispatch_dtype(args.dtype, [&](auto t) {
    dispatch_act(args.act, [&](auto a) { forward_typed<decltype(t), decltype(a)::value>(args); });
  });
}

void forward_stats(const ForwardArgs& args, const StatsOut& out) {
  dispatch_dtype(args.dtype, [&](auto t) {
    dispatch_act(args.act, [&](auto a) {
      forward_stats_typed<decltype(t), decltype(a)::value>(args, out);
    });
  });
}

void backward(const BackwardArgs& args) {
  dispatch_dtype(args.dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_act(args.act, [&](auto a) {
      constexpr Act A = decltype(a)::value;
      if (args.grad_dtype == args.dtype) {
        backward_typed<T, T, A>(args);
      } else {
        TORCH_CHECK(args.grad_dtype == at::kFloat, "lipkern: grad_y must be float32 or x's dtype");
        backward_typed<T, float, A>(args);
      }
    });
  });
}

}  // namespace

KernelTable kernel_table() {
  return {C10_STRINGIZE(CPU_CAPABILITY), &forward, &forward_stats, &backward};
}

}  // namespace CPU_CAPABILITY
}  // namespace lipkern
