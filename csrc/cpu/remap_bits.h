// The remap of identity and ReLU decided on bit patterns, in x's own format, and on AVX-512
// the 16-bit step the statistics pass takes on them.
// Included by csrc/remap_act_kernels.cpp only (see there): it lands in lipkern::<CAP>.
#pragma once

#include "remap_act.h"
#include "cpu/vec_io.h"

#include <c10/util/bit_cast.h>

#include <cstdint>
#include <type_traits>
#include <vector>

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

// remap_bound of every channel's threshold.
template <typename T>
std::vector<typename Bits<T>::type> remap_bounds(const ChannelParams& params, int64_t channels) {
  std::vector<typename Bits<T>::type> bounds(channels);
  for (int64_t c = 0; c < channels; ++c) bounds[c] = remap_bound<T>(params.threshold[c]);
  return bounds;
}

#if defined(CPU_CAPABILITY_AVX512)
// One step of a 16-bit identity or ReLU on bits: a = act(x) and |a| (padding lanes hold +0).
struct ActBits {
  __m512i a, magnitude;
  __mmask32 lanes;  // the step's first n lanes
};

template <typename T, Act A>
C10_ALWAYS_INLINE ActBits act_bits(const T* x, int64_t n) {
  __m512i a = load_bits16(x, n);
  if constexpr (A == Act::Relu) {
    // relu(x) = +0 below zero, the bits from -0's successor to -inf, one unsigned range once
    // shifted; -0 and NaN of either sign pass, as forward_run_bits has it.
    const __m512i from_below_zero = _mm512_sub_epi16(a, _mm512_set1_epi16(int16_t(0x8001)));
    a = _mm512_maskz_mov_epi16(
        ~_mm512_cmple_epu16_mask(from_below_zero, _mm512_set1_epi16(Bits<T>::kInf - 1)), a);
  }
  return {a, _mm512_and_si512(a, _mm512_set1_epi16(0x7fff)), first_lanes32(n)};
}

// The first n of a step's 32 16-bit values stored to y.
template <typename T>
C10_ALWAYS_INLINE void store_bits(T* y, int64_t n, __m512i v) {
  if (n >= kStep) {
    _mm512_storeu_si512(y, v);
  } else {
    _mm512_mask_storeu_epi16(y, first_lanes32(n), v);
  }
}

// 32 unsigned 16-bit counts as fp32.
C10_ALWAYS_INLINE F2 widen_counts(__m512i v) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v))),
          _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)))};
}

// The largest of 32 unsigned 16-bit lanes: two halvings, then phminposuw on the complements
// (the least of 8), 7 instructions where a tree of shuffles and maxima takes 10.
C10_ALWAYS_INLINE uint16_t lane_max_u16(__m512i v) {
  const __m256i quarters =
      _mm256_max_epu16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  const __m128i eighths = _mm_max_epu16(_mm256_castsi256_si128(quarters),
                                        _mm256_extracti128_si256(quarters, 1));
  const __m128i complement = _mm_xor_si128(eighths, _mm_set1_epi16(-1));
  return static_cast<uint16_t>(~_mm_cvtsi128_si32(_mm_minpos_epu16(complement)));
}

// A 16-bit value's bits as the fp32 value they hold.
template <typename T>
C10_ALWAYS_INLINE float bits_to_float(uint16_t bits) {
  return static_cast<float>(T(bits, T::from_bits()));
}

// 32 bf16 values as fp32 (exact), the even lanes then the odd ones: bf16 is fp32's upper half,
// so a shift and a mask widen a 32-bit lane's pair, where widen_bits' in-order widening takes
// two zero-extensions, their shifts and an extract.
C10_ALWAYS_INLINE F2 widen_bf16_even_odd(__m512i v) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xffff0000u))))};
}

// 32 16-bit values as fp32 (exact).
template <typename T>
C10_ALWAYS_INLINE F2 widen_bits(__m512i v) {
  auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>(v));
  return {lo, hi};
}
#endif

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace lipkern
