// Walking a flat range of a [outer, C, inner] tensor in runs that share a parameter layout.
// Included by csrc/remap_act_kernels.cpp only (see there): it lands in lipkern::<CAP>.
#pragma once

#include "remap_act.h"
#include "cpu/vec_io.h"

namespace lipkern {
namespace CPU_CAPABILITY {
namespace {

// Lanes mode (inner == 1): a run is a stretch of consecutive channels of one row; thresholds and
// centres are loaded as vectors alongside the data. Row mode: a run is a stretch of one channel;
// its threshold and centre are broadcast.

// The divisions happen once per call: per run they cost more than the run itself when runs are
// short (rows of 32 channels, 7 x 7 planes).
template <typename F>
inline void for_each_run(const Geometry& g, int64_t begin, int64_t end, F&& body) {
  const bool lanes = g.inner == 1;
  const int64_t period = lanes ? g.channels : g.inner;
  const int64_t first_row = begin / period;
  int64_t run_end = std::min(end, (first_row + 1) * period);
  int64_t ch = lanes ? begin - first_row * period : first_row % g.channels;
  for (int64_t p = begin; p < end; p = run_end, run_end = std::min(end, p + period)) {
    body(p, run_end - p, ch);
    ch = lanes ? 0 : (ch + 1 == g.channels ? 0 : ch + 1);
  }
}

// Thresholds and centres for one step of a run.
struct StepParams {
  F2 t, c;
};

template <bool kLanes>
struct RunParams {
  int64_t channel;  // lanes: first channel of the run; row: the run's channel
  const float* t;   // at that channel
  const float* c;   // null without a centre
  fVec t_b, c_b;

  RunParams(const ChannelParams& p, int64_t ch)
      : channel(ch), t(p.threshold + ch), c(p.center ? p.center + ch : nullptr) {
    if constexpr (!kLanes) {
      t_b = fVec(*t);
      c_b = c ? fVec(*c) : fVec(0.f);
    }
  }

  // kCentred false: the caller knows there is no centre, and the loop holds no centre vectors.
  template <bool kCentred = true>
  inline StepParams at(int64_t i, int64_t n) const {
    if constexpr (kLanes) {
      // A remap without centre is the remap towards 0: |a - 0| = |a| and the fill is +0.
      const F2 zero{fVec(0.f), fVec(0.f)};
      return {load(t + i, n), kCentred && c ? load(c + i, n) : zero};
    } else {
      return {{t_b, t_b}, {c_b, c_b}};
    }
  }
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace lipkern
