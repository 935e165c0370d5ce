// The fixed block partition of the statistics pass, its per-block slots and their folds.
// Included by csrc/remap_act_kernels.cpp only (see there): it lands in lipkern::<CAP>.
#pragma once

#include "remap_act.h"
#include "cpu/vec_io.h"

#include <algorithm>
#include <cmath>

namespace lipkern {
namespace CPU_CAPABILITY {
namespace {

// The flat range is cut into blocks whose size depends only on numel; each block accumulates
// into its own per-channel slots (fp64 sums of short fp32 partials, see LaneSums; fp32 max;
// remap counts in fp32, exact below 2^24), and the slots are combined block by block in index
// order. The result is therefore the same for any thread count, bit for bit.

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

// A lanes-mode block spans at least this many rows (all of them if fewer): its slots, C of each
// kind, are zeroed and combined once per block, which with rows of 65536 channels and one row
// per block cost 25x the forward's time.
constexpr int64_t kMinLanesBlockRows = 64;

// Block length in units (rows of C in lanes mode, elements in row mode), from the shape only.
int64_t stats_block_units(const Geometry& g, int64_t unit) {
  const int64_t units = g.numel / unit;
  const int64_t fewest = ceil_div(g.numel * g.channels, kMaxStatsSlots);
  const int64_t balanced = std::clamp(ceil_div(g.numel, kStatsBlocksForBalance), kMinStatsBlock,
                                      kLargeStatsBlock);
  const int64_t elements = std::max({balanced, ceil_div(g.numel, kMaxStatsBlocks), fewest});
  int64_t block = ceil_div(std::min(elements, kMaxStatsBlock), unit);
  if (unit > 1) {
    block = std::max(block, std::min(kMinLanesBlockRows, ceil_div(kMaxStatsBlock, unit)));
  }
  return std::max<int64_t>(1, std::min(block, units));
}

// Lanes mode: channels per task within a block, a multiple of kWidestStep (so every build's
// steps start where they would unsplit), when the blocks alone are too few for balance; C
// otherwise.
int64_t stats_channel_chunk(int64_t block_rows, int64_t blocks, int64_t channels) {
  if (blocks >= kStatsBlocksForBalance) return channels;
  const int64_t wanted = ceil_div(kStatsBlocksForBalance, blocks);
  const int64_t chunk =
      std::max(ceil_div(channels, wanted), ceil_div(kMinStatsBlock, block_rows));
  return std::min(ceil_div(chunk, kWidestStep) * kWidestStep, channels);
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

// A chunk's lane sums and sums of squares of the activations, 32 lanes (a step's two fp32
// vectors): in fp32 over at most kPartialTerms steps, then widened into fp64 lanes (METHOD.md
// section 4: fp32 inside a block, fp64 across). The fp32 part adds at most 16 terms from zero
// (15 roundings for the sums, 16 for the squares' fmadd chain), so it errs by at most 16 x 2^-24
// of their sum of |a| (of a^2), plus 2^-150 a term where a square falls below fp32's normal
// range; fp64 carries everything longer, so a scan's sums do not stall the way fp32 ones do. A
// step with a lane of |a| >= kPartialBound is widened at once, since 16 squares of it could
// overflow fp32 (fp16 never gets there; an fp16 inf gives inf either way). Widening every step
// (the sums within 1e-12 of fp64) took 19 of the 33 vector instructions of bf16 ReLU's step and
// left fwd+stats 1.3-1.6x the forward for 16 bits.
constexpr int kPartialTerms = 16;
constexpr float kPartialBound = 0x1p60f;

struct LaneSums {
  fVec part_sum[2], part_sumsq[2];
  int terms = 0;
  dVec sum[4], sumsq[4];

  // wide: whether a lane of a is at least kPartialBound in magnitude.
  C10_ALWAYS_INLINE void add(const F2& a, bool wide) {
    if (C10_UNLIKELY(wide)) return add_widened(a);
    part_sum[0] = part_sum[0] + a.lo;
    part_sum[1] = part_sum[1] + a.hi;
    part_sumsq[0] = at::vec::fmadd(a.lo, a.lo, part_sumsq[0]);
    part_sumsq[1] = at::vec::fmadd(a.hi, a.hi, part_sumsq[1]);
    if (++terms == kPartialTerms) widen_partials();
  }

  // v's 16 lanes widened and added into the float64 lanes acc[0] (its first 8) and acc[1], or
  // their squares, exact in float64, where `square`.
  C10_ALWAYS_INLINE static void add_wide(const fVec& v, dVec* acc, bool square) {
    dVec lo, hi;
    widen(v, lo, hi);
    acc[0] = square ? at::vec::fmadd(lo, lo, acc[0]) : acc[0] + lo;
    acc[1] = square ? at::vec::fmadd(hi, hi, acc[1]) : acc[1] + hi;
  }

  C10_ALWAYS_INLINE void add_widened(const F2& a) {
    const fVec halves[2] = {a.lo, a.hi};
    for (int k = 0; k < 2; ++k) {
      add_wide(halves[k], sum + 2 * k, false);
      add_wide(halves[k], sumsq + 2 * k, true);
    }
  }

  C10_ALWAYS_INLINE void widen_partials() {
    for (int k = 0; k < 2; ++k) {
      add_wide(part_sum[k], sum + 2 * k, false);
      add_wide(part_sumsq[k], sumsq + 2 * k, false);
      part_sum[k] = fVec(0.f);
      part_sumsq[k] = fVec(0.f);
    }
    terms = 0;
  }

  // Lane i into slot i of m consecutive channels' slots.
  C10_ALWAYS_INLINE void fold_lanes(double* sum_slots, double* sumsq_slots, int64_t m) {
    widen_partials();
    constexpr int64_t kD = dVec::size();
    for (int64_t k = 0; k < 4 && k * kD < m; ++k) {
      const int64_t mk = std::min(kD, m - k * kD);
      (dVec::loadu(sum_slots + k * kD, mk) + sum[k]).store(sum_slots + k * kD, mk);
      (dVec::loadu(sumsq_slots + k * kD, mk) + sumsq[k]).store(sumsq_slots + k * kD, mk);
    }
  }

  // All lanes into one channel's slots, in a fixed order, as trees: a run can be as short as
  // one 7x7 plane, and a sequential fold of the 32 sums (a chain of 32 dependent adds) then cost
  // more than the run.
  C10_ALWAYS_INLINE void fold_run(double& sum_slot, double& sumsq_slot) {
    widen_partials();
    sum_slot += lane_sum((sum[0] + sum[1]) + (sum[2] + sum[3]));
    sumsq_slot += lane_sum((sumsq[0] + sumsq[1]) + (sumsq[2] + sumsq[3]));
  }
};

struct BlockSlots {
  double* sum;
  double* sumsq;
  float* amax;
  float* remapped;
};

// The amax accumulators' max. It may drop a NaN operand (AVX-512's vmaxps returns its second
// operand then), which costs less than propagating it: a NaN activation also makes the channel's
// fp64 sum of squares NaN (nothing else can: squares are >= 0, and LaneSums keeps their fp32
// partials finite), and the final combine sets amax to NaN from there.
C10_ALWAYS_INLINE fVec max_of_finite(const fVec& a, const fVec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

inline float nan_max(float m, float v) {
  return (std::isnan(v) || v > m) ? v : m;
}

// A tile chunk's magnitude max and remap counts, one lane per channel from c0, into a block's
// slots; and a run's, reduced, into its channel's.
C10_ALWAYS_INLINE void fold_max_and_counts(const BlockSlots& s, int64_t c0, int64_t m,
                                           const F2& amax, const F2& counts) {
  const F2 mx = load(s.amax + c0, m);
  store(s.amax + c0, m, at::vec::maximum(mx.lo, amax.lo), at::vec::maximum(mx.hi, amax.hi));
  const F2 cnt = load(s.remapped + c0, m);
  store(s.remapped + c0, m, cnt.lo + counts.lo, cnt.hi + counts.hi);
}

C10_ALWAYS_INLINE void fold_max_and_count(const BlockSlots& s, int64_t ch, float amax,
                                          float count) {
  s.amax[ch] = nan_max(s.amax[ch], amax);
  s.remapped[ch] += count;
}

// A vector's lanes reduced: their max (NaN propagating) and their total (exact for counts).
C10_ALWAYS_INLINE float lane_max(const fVec& v) {
  return at::vec::vec_reduce_all<float>(
      [](const fVec& a, const fVec& b) { return at::vec::maximum(a, b); }, v);
}
C10_ALWAYS_INLINE float lane_total(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return a + b; }, v);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace lipkern
