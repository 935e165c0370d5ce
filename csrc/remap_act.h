// Shared declarations of lipkern's CPU kernels: the activation enum, the memory geometry of a
// tensor as the kernels see it, and the per-capability kernel table the dispatcher picks from.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace lipkern {

enum class Act : int { Identity, Relu, Gelu, GeluTanh, Silu };

// Parses the op's `act` argument; throws naming `act` on an unknown name.
Act parse_act(const std::string& act);

// GELU, tanh-GELU and SiLU (the others, identity and ReLU, are exact in any format).
constexpr bool is_smooth(Act a) {
  return a == Act::Gelu || a == Act::GeluTanh || a == Act::Silu;
}

// The widest step a kernel build takes, in elements: two AVX-512 fp32 vectors.
constexpr int64_t kWidestStep = 32;

// A dense tensor seen in memory order as [outer, C, inner] with the channel of the flat offset
// p being (p / inner) % C. Any non-overlapping dense layout fits (contiguous, channels_last,
// other permutations), so outputs can share the input's strides.
struct Geometry {
  int64_t numel;
  int64_t channels;
  int64_t inner;
};

// Per-channel parameters. `threshold` always points at `channels` floats (per-tensor values are
// expanded by the caller when the channel matters); `center` is null without a centre.
struct ChannelParams {
  const float* threshold;
  const float* center;
};

struct ForwardArgs {
  const void* x;
  void* y;  // may equal x (in-place)
  at::ScalarType dtype;
  Act act;
  Geometry geometry;
  ChannelParams params;
};

struct BackwardArgs {
  const void* grad_y;
  at::ScalarType grad_dtype;  // x's dtype or float32
  const void* x;
  void* grad_x;
  at::ScalarType dtype;
  Act act;
  Geometry geometry;
  ChannelParams params;
  bool straight_through;
};

// Per-channel outputs of the statistics pass, each `channels` long.
struct StatsOut {
  float* amax;
  int64_t* remapped;
  double* sum;
  double* sumsq;
};

// What a build's parameter-set caches (cpu/param_cache.h) did since they last forgot their
// sets: per-channel searches made, and calls that found a set's search kept.
struct ParameterSetCounts {
  int64_t made;
  int64_t reused;
};

struct KernelTable {
  const char* name;
  void (*forward)(const ForwardArgs&);
  void (*forward_stats)(const ForwardArgs&, const StatsOut&);
  void (*backward)(const BackwardArgs&);
  // Whether this build can compute the 16-bit smooth activations on the fp32 grid (the
  // AVX-512 builds; the others always read their tables), and whether that is faster than the
  // tables on this CPU, timed.
  bool computes_16bit_on_grid;
  bool (*grid_beats_tables)();
  ParameterSetCounts (*parameter_set_counts)();
  void (*forget_parameter_sets)();  // and zero the counts
};

// One table per compiled capability (each defined in its own build of remap_act_kernels.cpp).
#define LIPKERN_DECLARE_CAPABILITY(CAP) \
  namespace CAP {                       \
  KernelTable kernel_table();           \
  }
LIPKERN_DECLARE_CAPABILITY(DEFAULT)
#ifdef LIPKERN_HAVE_AVX2
LIPKERN_DECLARE_CAPABILITY(AVX2)
#endif
#ifdef LIPKERN_HAVE_AVX512
LIPKERN_DECLARE_CAPABILITY(AVX512)
#endif
#ifdef LIPKERN_HAVE_AVX512_BF16
LIPKERN_DECLARE_CAPABILITY(AVX512_BF16)
#endif
#undef LIPKERN_DECLARE_CAPABILITY

// The table for the capability in use (see dispatch.cpp).
const KernelTable& kernels();
// Name of the capability in use: "DEFAULT", "AVX2", "AVX512" or "AVX512_BF16".
std::string cpu_capability();
// Switches the capability (for tests and benchmarks); throws if this CPU or build lacks it.
void set_cpu_capability(const std::string& name);

// How the AVX-512 builds evaluate the 16-bit smooth activations on the fp32 grid's range:
// "grid" (the polynomials, tables only for chunks with a lane off the grid), "table" (the
// tables throughout) or "auto" (the faster of the two on this CPU, timed once per build).
// Both give the same bits. The environment variable LIPKERN_CPU_16BIT sets the initial choice.
// cpu_16bit_method gives the method in use ("grid" or "table"); set_cpu_16bit_method returns
// the choice it replaces (so that a caller can restore it).
std::string cpu_16bit_method();
std::string set_cpu_16bit_method(const std::string& name);
// The resolved choice for the capability in use: true for "grid".
bool sixteen_bit_on_grid();

}  // namespace lipkern
