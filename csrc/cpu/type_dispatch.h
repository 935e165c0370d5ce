// From the runtime dtype and activation to the kernel templates.
// Included by csrc/remap_act_kernels.cpp only (see there): it lands in lipkern::<CAP>.
#pragma once

#include "remap_act.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace lipkern {
namespace CPU_CAPABILITY {
namespace {

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

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace lipkern
