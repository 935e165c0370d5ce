// The fixed block partition of the statistics pass, its per-block slots and their folds.
// Included by csrc/remap_act_kernels.cpp only (see there): it lands in lipkern::<CAP>.
#pragma once

#include "remap_act.h"
#include "cpu/vec_io.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

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

// The lanes of v added as a pairwise tree (a fixed order, log2 of the lanes deep, with a short
// dependency chain): lane i and lane i + size / 2, and so on down.
template <typename V>
C10_ALWAYS_INLINE typename V::value_type lane_tree_sum(const V& v) {
  typename V::value_type lanes[V::size()];
  v.store(lanes);
  for (int64_t width = V::size() / 2; width >= 1; width /= 2) {
    for (int64_t i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
}

C10_ALWAYS_INLINE double lane_sum(const dVec& v) {
  return lane_tree_sum(v);
}

// An F2's lanes in float64: lo's in d0 (its first half) and d1, hi's in d2 and d3 (on AVX-512,
// 32 lanes: 8 in each).
// Named, not an array: GCC keeps an aggregate in registers only where every access has a constant
// offset, and an array walked in a loop left LaneSums on the stack, a store and a reload per
// partial and step.
struct D4 {
  dVec d0{0.0}, d1{0.0}, d2{0.0}, d3{0.0};
};

// v's lanes widened and added into acc (exact in float64), or their squares, where `square`.
C10_ALWAYS_INLINE void widen_into(const F2& v, D4& acc, bool square) {
  dVec w0, w1, w2, w3;
  widen(v.lo, w0, w1);
  widen(v.hi, w2, w3);
  if (square) {
    acc.d0 = at::vec::fmadd(w0, w0, acc.d0);
    acc.d1 = at::vec::fmadd(w1, w1, acc.d1);
    acc.d2 = at::vec::fmadd(w2, w2, acc.d2);
    acc.d3 = at::vec::fmadd(w3, w3, acc.d3);
  } else {
    acc.d0 = acc.d0 + w0;
    acc.d1 = acc.d1 + w1;
    acc.d2 = acc.d2 + w2;
    acc.d3 = acc.d3 + w3;
  }
}

// v's lanes added into slots [first, m) of a run of channels' slots (none where first >= m).
C10_ALWAYS_INLINE void add_to_slots(double* slots, const dVec& v, int64_t first, int64_t m) {
  if (first >= m) return;
  const int64_t n = std::min<int64_t>(dVec::size(), m - first);
  (dVec::loadu(slots + first, n) + v).store(slots + first, n);
}

#if defined(CPU_CAPABILITY_AVX512)
// Float64 lanes of 32 channels added even channels first (d0, d1: 0, 2, ..., 30; d2, d3: 1, 3,
// ..., 31; see widen_bf16_even_odd), put back in channel order.
C10_ALWAYS_INLINE void even_odd_to_channel_order(D4& acc) {
  const __m512i first = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i second = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  const __m512d even_lo = acc.d0, even_hi = acc.d1, odd_lo = acc.d2, odd_hi = acc.d3;
  acc.d0 = _mm512_permutex2var_pd(even_lo, first, odd_lo);
  acc.d1 = _mm512_permutex2var_pd(even_lo, second, odd_lo);
  acc.d2 = _mm512_permutex2var_pd(even_hi, first, odd_hi);
  acc.d3 = _mm512_permutex2var_pd(even_hi, second, odd_hi);
}
#endif

// Channels' fp32 partial sums added into their float64 slots, and zeroed.
inline void flush_partials_to_slots(float* partials, double* slots, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    slots[i] += static_cast<double>(partials[i]);
    partials[i] = 0.f;
  }
}

// A chunk's lane sums and sums of squares of the activations, a step's two fp32 vectors of
// lanes: in fp32 over at most kPartialTerms steps, then widened into fp64 lanes (METHOD.md
// section 4: fp32 inside a block, fp64 across). The fp32 part adds at most 16 terms from zero
// (15 roundings for the sums, 16 for the squares' fmadd chain), so it errs by at most 16 x 2^-24
// of their sum of |a| (of a^2), plus 2^-150 a term where a square falls below fp32's normal
// range; fp64 carries everything longer, so a scan's sums do not stall the way fp32 ones do.
// The lanes walk (stats_rows_lanes) adds its short tiles' partials per channel in fp32 across a
// few tiles before they widen, within the same 16 roundings (the overflow margin for its squares:
// kStatsTilesPerWiden in csrc/remap_act_kernels.cpp).
// Widening every step (the sums within 1e-12 of fp64) took 19 of the 33 vector instructions of
// bf16 ReLU's step and left fwd+stats 1.3-1.6x the forward for 16 bits.
//
// 16 squares of 2^62 overflow fp32, so a chunk whose magnitude max (kept anyway) reaches
// kPartialBound has its sums redone from x with every step widened at once (redo_sums_if_large
// in csrc/remap_act_kernels.cpp): the steps test nothing. An inf reaches the bound and gives inf
// either way; so does fp16's, which is the only value of fp16 that can. A NaN need not be seen by
// the max (see max_of_finite) and needs no redo: its lane's sums are NaN either way.
constexpr int kPartialTerms = 16;
constexpr float kPartialBound = 0x1p59f;

// A run of at most this many steps, none widened, folds its partials into one sum in fp32: a tree
// over a step's lanes adds 5 roundings (32 lanes; 4 for the 16 of AVX2 and DEFAULT) to the 11 of
// the partials, within the 16 above; its squares (352 on AVX-512) below kPartialBound^2 stay
// below 2^127. On AVX-512 a 7x7 or 14x14 plane is a run of 2 or 7 steps, and widening its
// partials into float64 lanes to add them there cost about a quarter of its time.
constexpr int kFp32FoldTerms = 11;
static_assert(kFp32FoldTerms + std::bit_width(static_cast<uint64_t>(kStep)) - 1 <=
                  kPartialTerms,
              "a short run's fold rounds a term at most kPartialTerms times");
static_assert(double(kFp32FoldTerms) * kStep * double(kPartialBound) * double(kPartialBound) <
                  0x1p127,
              "a short run's squares cannot overflow its fp32 fold");

// lane_tree_sum's tree, written out on AVX-512 (_mm512_reduce_add_ps leaves the order to the
// compiler, and the rounding count above rests on the depth).
C10_ALWAYS_INLINE float lane_sum(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 w = v;
  const __m256 halves = _mm256_add_ps(
      _mm512_castps512_ps256(w), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1)));
  const __m128 quarters =
      _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
  const __m128 eighths = _mm_add_ps(quarters, _mm_movehl_ps(quarters, quarters));
  return _mm_cvtss_f32(_mm_add_ss(eighths, _mm_movehdup_ps(eighths)));
#else
  return lane_tree_sum(v);
#endif
}

struct LaneSums {
  F2 part_sum{fVec(0.f), fVec(0.f)}, part_sumsq{fVec(0.f), fVec(0.f)};
  int terms = 0;
  bool widened = false;  // whether sum and sumsq hold anything
  D4 sum, sumsq;

  C10_ALWAYS_INLINE void add(const F2& a) {
    part_sum = {part_sum.lo + a.lo, part_sum.hi + a.hi};
    part_sumsq = {at::vec::fmadd(a.lo, a.lo, part_sumsq.lo),
                  at::vec::fmadd(a.hi, a.hi, part_sumsq.hi)};
    if (++terms == kPartialTerms) widen_partials();
  }

  // a in float64 at once, not through the fp32 partials.
  C10_ALWAYS_INLINE void add_wide(const F2& a) {
    widen_into(a, sum, false);
    widen_into(a, sumsq, true);
    widened = true;
  }

  C10_ALWAYS_INLINE void widen_partials() {
    widen_into(part_sum, sum, false);
    widen_into(part_sumsq, sumsq, false);
    part_sum = part_sumsq = {fVec(0.f), fVec(0.f)};
    terms = 0;
    widened = true;
  }

  // Lane i into slot i of m consecutive channels' slots; even_odd: the lanes were added even
  // channels first (see widen_bf16_even_odd; AVX-512 only).
  C10_ALWAYS_INLINE void fold_lanes(double* sum_slots, double* sumsq_slots, int64_t m,
                                    bool even_odd = false) {
    widen_partials();
#if defined(CPU_CAPABILITY_AVX512)
    if (even_odd) {
      even_odd_to_channel_order(sum);
      even_odd_to_channel_order(sumsq);
    }
#endif
    constexpr int64_t kD = dVec::size();
    add_to_slots(sum_slots, sum.d0, 0, m);
    add_to_slots(sum_slots, sum.d1, kD, m);
    add_to_slots(sum_slots, sum.d2, 2 * kD, m);
    add_to_slots(sum_slots, sum.d3, 3 * kD, m);
    add_to_slots(sumsq_slots, sumsq.d0, 0, m);
    add_to_slots(sumsq_slots, sumsq.d1, kD, m);
    add_to_slots(sumsq_slots, sumsq.d2, 2 * kD, m);
    add_to_slots(sumsq_slots, sumsq.d3, 3 * kD, m);
  }

  // The fp32 partials added into m consecutive channels' fp32 partial sums, lane i into channel
  // i. Only for a chunk too short to have widened anything (stats_rows_lanes), which would be
  // dropped.
  C10_ALWAYS_INLINE void add_partials_to(float* sum_partials, float* sumsq_partials, int64_t m) {
    TORCH_INTERNAL_ASSERT_DEBUG_ONLY(!widened);
    const F2 sums = load(sum_partials, m), sumsqs = load(sumsq_partials, m);
    store(sum_partials, m, sums.lo + part_sum.lo, sums.hi + part_sum.hi);
    store(sumsq_partials, m, sumsqs.lo + part_sumsq.lo, sumsqs.hi + part_sumsq.hi);
  }

  // All lanes into one channel's slots, in a fixed order, as trees: a run can be as short as
  // one 7x7 plane, and a sequential fold of the 32 sums (a chain of 32 dependent adds) then cost
  // more than the run.
  C10_ALWAYS_INLINE void fold_run(double& sum_slot, double& sumsq_slot) {
    if (!widened && terms <= kFp32FoldTerms) {
      sum_slot += lane_sum(part_sum.lo + part_sum.hi);
      sumsq_slot += lane_sum(part_sumsq.lo + part_sumsq.hi);
      return;
    }
    widen_partials();
    sum_slot += lane_sum((sum.d0 + sum.d1) + (sum.d2 + sum.d3));
    sumsq_slot += lane_sum((sumsq.d0 + sumsq.d1) + (sumsq.d2 + sumsq.d3));
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
// fp64 sum of squares NaN (nothing else can: squares are >= 0, so an overflow gives inf, never
// NaN), and the final combine sets amax to NaN from there.
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

// A vector's lanes reduced: their max, which may drop a NaN as max_of_finite does (its channel's
// sum of squares keeps it), and their total (exact for counts).
C10_ALWAYS_INLINE float lane_max_of_finite(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_max_ps(v);
#else
  return at::vec::vec_reduce_all<float>(
      [](const fVec& a, const fVec& b) { return at::vec::maximum(a, b); }, v);
#endif
}
C10_ALWAYS_INLINE float lane_total(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return a + b; }, v);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace lipkern
