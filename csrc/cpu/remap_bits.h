// The remap of identity and ReLU decided on bit patterns, in x's own format.
// Included by csrc/remap_act_kernels.cpp only (see there): it lands in lipkern::<CAP>.
#pragma once

#include "remap_act.h"
#include "cpu/vec_io.h"

#include <c10/util/bit_cast.h>

#include <cstdint>
#include <type_traits>

namespace lipkern {
namespace CPU_CAPABILITY {
namespace {

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

#if defined(CPU_CAPABILITY_AVX512)
// The lanes of a step's 32 16-bit values that are below zero (-0 and NaN are not): those ReLU
// maps to +0, the rule forward_run_bits applies on at::vec integers.
template <typename T>
C10_ALWAYS_INLINE __mmask32 negative_bits(const T* x, int64_t n) {
  const __mmask32 lanes = static_cast<__mmask32>((uint64_t(1) << std::min(n, kStep)) - 1);
  const __m512i raw = _mm512_maskz_loadu_epi16(lanes, x);
  const __m512i magnitude = _mm512_and_si512(raw, _mm512_set1_epi16(0x7fff));
  const __mmask32 signed_nonzero =
      _mm512_mask_cmpneq_epi16_mask(_mm512_movepi16_mask(raw), magnitude, _mm512_setzero_si512());
  return _mm512_mask_cmple_epu16_mask(signed_nonzero, magnitude, _mm512_set1_epi16(Bits<T>::kInf));
}

// The first n of a step's 32 16-bit values of x stored to y where keep holds, +0 elsewhere:
// identity's and ReLU's outputs are x or +0, so no rounding back from fp32 is needed.
template <typename T>
C10_ALWAYS_INLINE void store_kept_bits(const T* x, T* y, int64_t n, __mmask32 keep) {
  static_assert(sizeof(T) == 2 && kStep == 32, "a step of 32 16-bit lanes");
  if (n >= kStep) {
    _mm512_storeu_si512(y, _mm512_maskz_mov_epi16(keep, _mm512_loadu_si512(x)));
  } else {
    const __mmask32 lanes = static_cast<__mmask32>((uint64_t(1) << n) - 1);
    _mm512_mask_storeu_epi16(y, lanes, _mm512_maskz_loadu_epi16(lanes & keep, x));
  }
}
#endif

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace lipkern
