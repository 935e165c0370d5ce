// Vector I/O of one kernel step: loads and stores in every dtype, fp32 <-> fp64 lanes, lane masks,
// 16-bit bit patterns.
// Included by csrc/remap_act_kernels.cpp only (see there): it lands in lipkern::<CAP>.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

#if defined(CPU_CAPABILITY_AVX512)
// The first n (<= kStep) of a step's 32 16-bit lanes.
C10_ALWAYS_INLINE __mmask32 first_lanes32(int64_t n) {
  return n >= kStep ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t(1) << n) - 1);
}

// The bits of a step's first n 16-bit values; padding lanes hold +0.
template <typename T>
C10_ALWAYS_INLINE __m512i load_bits16(const T* x, int64_t n) {
  static_assert(sizeof(T) == 2 && kStep == 32, "a step of 32 16-bit lanes");
  return n >= kStep ? _mm512_loadu_si512(x) : _mm512_maskz_loadu_epi16(first_lanes32(n), x);
}
#endif

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
// One kortest instead of two moves to general registers and an or.
C10_ALWAYS_INLINE bool any(Mask a, Mask b) {
  return _mm512_kortestz(a, b) == 0;
}
// m restricted to its first n lanes (0 <= n <= kF).
C10_ALWAYS_INLINE Mask first_lanes(Mask m, int64_t n) {
  return m & static_cast<Mask>((1u << n) - 1);
}
C10_ALWAYS_INLINE fVec add_one_where(Mask m, const fVec& count) {
  return _mm512_mask_add_ps(count, m, count, _mm512_set1_ps(1.f));
}
C10_ALWAYS_INLINE Mask no_lanes() {
  return 0;
}
C10_ALWAYS_INLINE Mask lanes_except(Mask m, Mask drop) {
  return m & static_cast<Mask>(~drop);
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
C10_ALWAYS_INLINE bool any(const Mask& a, const Mask& b) {
  return any(a | b);
}
C10_ALWAYS_INLINE Mask first_lanes(const Mask& m, int64_t n) {
  return fVec::set(fVec(0.f), m, n);
}
C10_ALWAYS_INLINE fVec add_one_where(const Mask& m, const fVec& count) {
  return count + (m & fVec(1.f));
}
C10_ALWAYS_INLINE Mask no_lanes() {
  return fVec(0.f);
}
C10_ALWAYS_INLINE Mask lanes_except(const Mask& m, const Mask& drop) {
  return select(drop, fVec(0.f), m);
}
#endif

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace lipkern
