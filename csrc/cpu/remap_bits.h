// The remap of identity and ReLU decided on bit patterns, in x's own format.
// Included by csrc/remap_act_kernels.cpp only (see there): it lands in lipkern::<CAP>.
#pragma once

#include "remap_act.h"

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

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace lipkern
