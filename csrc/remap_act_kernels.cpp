// The fused activation + remap kernels. This file is not compiled on its own: each
// csrc/capability/remap_act_kernels.<CAP>.cpp includes it and is compiled with that capability's
// instruction-set flags and CPU_CAPABILITY=<CAP>, so every build lands in its own namespace
// lipkern::<CAP> and uses the matching at::vec::Vectorized specialisation (the scheme ATen uses
// for its own CPU kernels). What the three kernels below share lives in csrc/cpu/, one header
// per concern.
//
// All arithmetic is in fp32 on whole vectors; the ragged end of a run uses partial loads and
// stores instead of a scalar loop, so an element's result does not depend on where it sits.

#ifndef CPU_CAPABILITY
#error "remap_act_kernels.cpp is compiled through csrc/capability/*.cpp with CPU_CAPABILITY set"
#endif

#include "remap_act.h"
#include "cpu/act_tables16.h"
#include "cpu/param_cache.h"
#include "cpu/remap_bits.h"
#include "cpu/stats_blocks.h"
#include "cpu/type_dispatch.h"
#include "cpu/vec_io.h"
#include "cpu/walk.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace lipkern {
namespace CPU_CAPABILITY {
namespace {

// Elements per parallel task of the elementwise kernels (ATen's GRAIN_SIZE).
constexpr int64_t kGrain = 32768;

// ---------------------------------------------------------------------------------------------
// Forward (also in place: y may equal x).

// kComputed: act(x) from the fp32 code; otherwise as load_activated reads it (16-bit smooth
// activations: from the table).
template <typename T, Act A, bool kLanes, bool kComputed>
C10_ALWAYS_INLINE void forward_steps(const T* x, T* y, int64_t begin, int64_t end,
                                     const RunParams<kLanes>& rp, const float* table) {
  for (int64_t i = begin; i < end; i += kStep) {
    const int64_t m = std::min(kStep, end - i);
    const F2 a = kComputed ? activate<A>(load(x + i, m)) : load_activated<T, A>(x + i, m, table);
    const StepParams p = rp.at(i, m);
    store(y + i, m, select(remap_mask(a.lo, p.t.lo, p.c.lo), p.c.lo, a.lo),
          select(remap_mask(a.hi, p.t.hi, p.c.hi), p.c.hi, a.hi));
  }
}

// forward_steps out of line, so that the computing and the gathering loop each get their own
// registers: with the gather and the grid polynomial in one loop the gathering steps took 1.5x
// their time.
template <typename T, Act A, bool kLanes, bool kComputed>
C10_NOINLINE void forward_chunk(const T* x, T* y, int64_t begin, int64_t end,
                                const RunParams<kLanes>& rp, const float* table) {
  forward_steps<T, A, kLanes, kComputed>(x, y, begin, end, rp, table);
}

// on_grid: whether the 16-bit smooth activations compute on the grid (sixteen_bit_on_grid).
template <typename T, Act A, bool kLanes>
void forward_run(const T* x, T* y, int64_t n, const RunParams<kLanes>& rp, const float* table,
                 bool on_grid) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (uses_table<T, A>()) {
    // The table holds what the fp32 code computes, so either gives the same bits.
    for_each_grid_chunk<T, A>(x, n, on_grid, [&](int64_t begin, int64_t end, auto on_grid) {
      forward_chunk<T, A, kLanes, decltype(on_grid)::value>(x, y, begin, end, rp, table);
    });
    return;
  }
#endif
  forward_steps<T, A, kLanes, !uses_table<T, A>()>(x, y, 0, n, rp, table);
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
  const std::vector<typename Bits<T>::type> bounds = remap_bounds<T>(args.params, g.channels);
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
  const bool on_grid = uses_table<T, A>() && sixteen_bit_on_grid();
  at::parallel_for(0, g.numel, kGrain, [&](int64_t begin, int64_t end) {
    for_each_run(g, begin, end, [&](int64_t p, int64_t n, int64_t ch) {
      if (g.inner == 1) {
        forward_run<T, A, true>(x + p, y + p, n, RunParams<true>(args.params, ch), table,
                                on_grid);
      } else {
        forward_run<T, A, false>(x + p, y + p, n, RunParams<false>(args.params, ch), table,
                                 on_grid);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Forward + per-channel statistics, over the block partition of cpu/stats_blocks.h.
//
// A chunk's accumulator takes one step (up to kStep elements) at a time, stores its y and folds
// into a block's slots: per channel in lanes mode (a chunk being up to kStep channels of a tile
// of rows, see stats_rows_lanes), into the run's one channel in row mode (fold_run). FloatStats
// computes in fp32 and serves every activation and dtype; on AVX-512 BitsStats decides 16-bit
// identity and ReLU without a centre on their bit patterns, as forward_bits does.

// The statistics are bound by vector operations, not memory: without a centre the remap test is
// |a| < t (|a - 0| is |a|, NaN and -0 included), and |a| is the one the magnitude max takes.
// Measured 0.88-1.02x the time, mostly about 0.94x (fwd+stats, one thread, alternated).
template <bool kCentred>
C10_ALWAYS_INLINE Mask stats_remap_mask(const fVec& a, const fVec& t, const fVec& c) {
  if constexpr (kCentred) {
    return remap_mask(a, t, c);
  } else {
    return less(a.abs(), t);
  }
}

// Rows of a lanes-mode tile (see stats_rows_lanes): 8 of fp32, whose tiles' sums then add up in
// fp32 partials per channel across kStatsTilesPerWiden tiles before they widen into float64 (a
// term is rounded at most once per row of its tile and once per tile added to the partials from
// its own on: 8 + 8 = kPartialTerms times, as LaneSums allows); 32 of 16-bit types, whose tiles'
// sums widen at once.
template <typename T>
constexpr bool kStatsFp32Partials = sizeof(T) == 4;
template <typename T>
constexpr int64_t kStatsTileRows = kStatsFp32Partials<T> ? 8 : 32;
constexpr int kStatsTilesPerWiden = kPartialTerms - kStatsTileRows<float>;
static_assert(kStatsTilesPerWiden >= 1);
static_assert(double(kStatsTileRows<float> * kStatsTilesPerWiden) * double(kPartialBound) *
                      double(kPartialBound) < 0x1p127,
              "the squares that kStatsTilesPerWiden tiles' partial sums add up cannot overflow "
              "fp32");

// What an accumulator is built from: the thresholds and centres, the 16-bit activation table,
// and the 16-bit remap bounds (remap_bound, one per channel; BitsStats only).
struct StatsInputs {
  const ChannelParams& params;
  const float* table;
  const int16_t* bounds;
};

// In fp32: a = act(x) as the forward computes it, compared, counted, maxed and summed.
template <typename T, Act A, bool kLanes, bool kCentred>
struct FloatStats {
  const StepParams p;
  const float* table;
  fVec amax0{0.f}, amax1{0.f}, count0{0.f}, count1{0.f};
  LaneSums sums;
  static constexpr bool kEvenOdd = false;  // lane i is channel i (see BitsStats)

  // Lanes mode: channels first .. first + m - 1; padding lanes load t = c = 0, so act(0) = 0 is
  // never remapped. Row mode: the run's channel, broadcast.
  FloatStats(const StatsInputs& in, int64_t first, int64_t m)
      : p(RunParams<kLanes>(in.params, first).at(0, m)), table(in.table) {}

  C10_ALWAYS_INLINE void step(const T* x, T* y, int64_t m) {
    const F2 a = load_activated<T, A>(x, m, table);
    Mask k0 = stats_remap_mask<kCentred>(a.lo, p.t.lo, p.c.lo),
         k1 = stats_remap_mask<kCentred>(a.hi, p.t.hi, p.c.hi);
    store(y, m, select(k0, kCentred ? p.c.lo : fVec(0.f), a.lo),
          select(k1, kCentred ? p.c.hi : fVec(0.f), a.hi));
    if (!kLanes && m < kStep) {
      // Padding lanes hold act(0) = 0, harmless for sums and max but not for the count.
      k0 = first_lanes(k0, std::min(m, kF));
      k1 = first_lanes(k1, std::max<int64_t>(m - kF, 0));
    }
    const fVec m0 = a.lo.abs(), m1 = a.hi.abs();
    amax0 = max_of_finite(amax0, m0);
    amax1 = max_of_finite(amax1, m1);
    count0 = add_one_where(k0, count0);
    count1 = add_one_where(k1, count1);
    sums.add(a);
  }

  // Whether a magnitude reached kPartialBound (a max that dropped a NaN may miss one, but that
  // lane's sums are NaN either way).
  C10_ALWAYS_INLINE bool large() const {
    const fVec bound(kPartialBound);
    return any(at_least(amax0, bound), at_least(amax1, bound));
  }

  C10_ALWAYS_INLINE void add_wide(const T* x, int64_t m) {
    sums.add_wide(load_activated<T, A>(x, m, table));
  }

  C10_ALWAYS_INLINE void fold_lane_max_and_counts(const BlockSlots& s, int64_t c0, int64_t m) {
    fold_max_and_counts(s, c0, m, {amax0, amax1}, {count0, count1});
  }

  C10_ALWAYS_INLINE void fold_run(const BlockSlots& s, int64_t ch) {
    fold_max_and_count(s, ch, lane_max_of_finite(max_of_finite(amax0, amax1)),
                       lane_total(count0 + count1));
    sums.fold_run(s.sum[ch], s.sumsq[ch]);
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// 16-bit identity and ReLU without a centre: the remap test, the magnitude max and the counts on
// x's bits (see remaps_on_bits), 32 lanes an instruction, and y stored from them. Only the sums
// widen, to fp32 (LaneSums). 4096 x 1024, channels_last and NCHW 16 x 256 x 28 x 28: 0.76-0.95x
// the time of FloatStats on one thread, 0.66-0.95x on two (the two switched in one process).
template <typename T, Act A, bool kLanes>
struct BitsStats {
  static_assert(sizeof(T) == 2 && remaps_on_bits<A>(), "16-bit identity or ReLU");
  const __m512i bound;
  __m512i amax = _mm512_setzero_si512();  // |a|'s bits: ordered like |a|, NaN above +inf
  // Remap counts: per lane in lanes mode (a tile's rows fit in 16 bits), the run's in row mode
  // (a run may be a whole block, up to kMaxStatsBlock elements).
  static_assert(kStatsTileRows<T> < 65536);
  __m512i lane_count = _mm512_setzero_si512();
  int64_t run_count = 0;
  LaneSums sums;
  // bf16's sums take the even lanes then the odd ones (widen_bf16_even_odd): a run's lanes all
  // go to one channel, and the lanes walk puts them back in channel order at its fold.
  static constexpr bool kEvenOdd = std::is_same_v<T, c10::BFloat16>;

  BitsStats(const StatsInputs& in, int64_t first, int64_t m)
      : bound(kLanes ? _mm512_maskz_loadu_epi16(first_lanes32(m), in.bounds + first)
                     : _mm512_set1_epi16(in.bounds[first])) {}

  C10_ALWAYS_INLINE void step(const T* x, T* y, int64_t m) {
    const ActBits b = act_bits<T, A>(x, m);
    const __mmask32 remap = _mm512_mask_cmplt_epu16_mask(b.lanes, b.magnitude, bound);
    store_bits(y, m, _mm512_maskz_mov_epi16(~remap, b.a));  // a remapped lane becomes +0
    amax = _mm512_max_epu16(amax, b.magnitude);
    if constexpr (kLanes) {
      lane_count = _mm512_mask_sub_epi16(lane_count, remap, lane_count, _mm512_set1_epi16(-1));
    } else {
      run_count += std::popcount(static_cast<uint32_t>(remap));
    }
    sums.add(sum_lanes(b.a));
  }

  C10_ALWAYS_INLINE static F2 sum_lanes(__m512i a) {
    if constexpr (kEvenOdd) {
      return widen_bf16_even_odd(a);
    } else {
      return widen_bits<T>(a);
    }
  }

  // Whether a magnitude reached kPartialBound (fp16 stays below it).
  C10_ALWAYS_INLINE bool large() const {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      constexpr int16_t kBoundBits = 0x5d00;
      static_assert(std::bit_cast<uint32_t>(kPartialBound) == uint32_t(kBoundBits) << 16,
                    "kPartialBound in bf16");
      return _mm512_cmpge_epu16_mask(amax, _mm512_set1_epi16(kBoundBits)) != 0;
    } else {
      return false;
    }
  }

  C10_ALWAYS_INLINE void add_wide(const T* x, int64_t m) {
    sums.add_wide(sum_lanes(act_bits<T, A>(x, m).a));
  }

  C10_ALWAYS_INLINE void fold_lane_max_and_counts(const BlockSlots& s, int64_t c0, int64_t m) {
    fold_max_and_counts(s, c0, m, widen_bits<T>(amax), widen_counts(lane_count));
  }

  C10_ALWAYS_INLINE void fold_run(const BlockSlots& s, int64_t ch) {
    fold_max_and_count(s, ch, bits_to_float<T>(lane_max_u16(amax)), static_cast<float>(run_count));
    sums.fold_run(s.sum[ch], s.sumsq[ch]);
  }
};
#endif

// Requests a tile of rows into L2 while the tile before it is walked: [c_begin, c_end) of each
// row, in address order, one cache line of x and one of y per 64 bytes the walk advances by (a
// step of 32 bytes, 16-bit on AVX2 and DEFAULT, still requests a line: that runs ahead, which is
// harmless). Addresses are formed only for rows of the tile, so none points past the tensor. y
// is requested as a read: the builds' flags do not include PRFCHW, without which GCC emits
// prefetcht1 for a write hint too.
template <typename T>
struct TilePrefetch {
  const char* x;
  const char* y;
  int64_t row_stride, row_bytes, rows_left;
  int64_t row = 0, byte = 0, row_end = 0;  // offsets from x and y; row_end: past the row's lines

  // `first`: the tile's first element's offset from x and y; rows may be 0.
  TilePrefetch(const T* x_, const T* y_, int64_t first, int64_t C, int64_t width, int64_t rows)
      : x(reinterpret_cast<const char*>(x_)),
        y(reinterpret_cast<const char*>(y_)),
        row_stride(C * int64_t(sizeof(T))),
        row_bytes(width * int64_t(sizeof(T))),
        rows_left(rows),
        row(first * int64_t(sizeof(T))) {
    start_row();
  }

  // From the row's first cache line (its start may lie inside one) to its last.
  C10_ALWAYS_INLINE void start_row() {
    const int64_t skew =
        static_cast<int64_t>((reinterpret_cast<uintptr_t>(x) + static_cast<uintptr_t>(row)) % 64);
    byte = row - skew;
    row_end = row + row_bytes;
  }

  C10_ALWAYS_INLINE void advance(int64_t bytes) {
    for (int64_t b = 0; b < bytes && rows_left > 0; b += 64) {
      __builtin_prefetch(x + std::max(byte, row), 0, 2);
      __builtin_prefetch(y + std::max(byte, row), 0, 2);
      byte += 64;
      if (byte >= row_end && --rows_left > 0) {
        row += row_stride;
        start_row();
      }
    }
  }
};

// Where a chunk's magnitudes reached kPartialBound, its sums dropped and redone in float64 (see
// LaneSums), and true returned; each_step(add) calls add(x, m) for each of the chunk's steps. x
// must still hold the input: the statistics never run in place (forward_stats_typed).
template <typename Acc, typename EachStep>
C10_ALWAYS_INLINE bool redo_sums_if_large(Acc& acc, EachStep&& each_step) {
  if (C10_LIKELY(!acc.large())) return false;
  acc.sums = LaneSums{};
  each_step([&](const auto* x, int64_t m) { acc.add_wide(x, m); });
  return true;
}

// Lanes mode: whole rows of C channels. A tile of rows is accumulated in registers per chunk of
// channels; its max and counts then go to the block's slots, and its sums either to fp32 partial
// sums per channel (a load, an add and a store each), which widen into the float64 slots once per
// kStatsTilesPerWiden tiles, or straight into float64 (4 conversions and 4 float64 loads, adds and
// stores per sum). A column of a tile goes down its rows, C apart: with fp32 and 32-row tiles
// that took 1.9-2.2x the forward's time on 4096 x 1024 (one thread, AMD EPYC Zen 4) where the
// same operations in address order took 1.0x. So fp32 takes tiles of 8 rows, whose sums only
// pay for themselves through the fp32 partials; 16-bit steps cost more in vector operations
// than in memory (identity and ReLU: about 17 for 32 elements against the forward's 7), and
// their 32-row tiles amortise the fold better. Against 32-row tiles with the float64 fold for
// every dtype, alternated builds, fwd+stats over fwd, one thread: fp32 ReLU 4096 x 1024
// 1.72-1.88x -> 1.29-1.48x, 16384 x 256 1.29-1.73x -> 1.05-1.21x, identity 1.61-1.70x ->
// 1.19-1.39x and 1.34-1.75x -> 0.94-1.27x, GELU within noise (benchmarks/RESULTS.md, "What
// the statistics cost"). The same 8-row tiles for 16-bit took its statistics 5-20 % longer
// (channels_last ReLU and identity, 2 threads); 4-row tiles took fp32 ReLU to 1.21x but fp32
// GELU up by 10 %. (On two threads fp32 GELU's 4096 x 1024 median moved 1.59x -> 1.46x, within
// its spread.)
//
// The walk goes down the tile's rows, C apart: the hardware prefetchers follow a few dozen
// pages at most, and a column of the tile touches one line in each of 2 x kStatsTileRows<T> rows
// of x and y. So the next tile is requested into L2 in address order, which the walk of this
// one then paces. Against requesting each row's next chunk into L1 a column ahead (2 threads,
// builds interleaved, fwd+stats / fwd, 32-row tiles): channels_last 16 x 256 x 28 x 28 fp32 GELU
// 1.25-1.44x -> 1.04-1.17x, bf16 ReLU 1.45-1.68x -> 1.22-1.37x, 4096 x 1024 16-bit ReLU
// 1.61-2.78x -> 1.38-1.60x.
// Not inlined into the task loop: inlined there (identity's was, ReLU's not), the prefetch's
// cursor was spilled and bf16 fwd+stats took 1.5-1.6x the forward on 4096 x 1024 against 1.3x.
template <typename Acc, typename T>
C10_NOINLINE void stats_rows_lanes(const T* x, T* y, int64_t rows, int64_t C, int64_t c_begin,
                                   int64_t c_end, const StatsInputs& in, const BlockSlots& s) {
  constexpr int64_t kStepBytes = kStep * int64_t(sizeof(T));
  constexpr int64_t kTileRows = kStatsTileRows<T>;
  constexpr bool kFp32Partials = kStatsFp32Partials<T>;
  // A tile's rows stay below the LaneSums widening, and its lanes are its channels in order.
  static_assert(!kFp32Partials || (kTileRows < kPartialTerms && !Acc::kEvenOdd));
  const int64_t width = c_end - c_begin;
  std::vector<float> partials(kFp32Partials ? 2 * width : 0, 0.f);
  float* const partial_sum = partials.data();
  float* const partial_sumsq = partial_sum + (kFp32Partials ? width : 0);
  int tiles = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    const int64_t r1 = std::min(rows, r0 + kTileRows);
    TilePrefetch<T> next(x, y, r1 * C + c_begin, C, width, std::min(rows, r1 + kTileRows) - r1);
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kStep) {
      const int64_t m = std::min(kStep, c_end - c0);
      Acc acc(in, c0, m);
      for (int64_t r = r0; r < r1; ++r) {
        next.advance(kStepBytes);
        acc.step(x + r * C + c0, y + r * C + c0, m);
      }
      acc.fold_lane_max_and_counts(s, c0, m);
      const bool redone = redo_sums_if_large(acc, [&](auto add) {
        for (int64_t r = r0; r < r1; ++r) add(x + r * C + c0, m);
      });
      if constexpr (kFp32Partials) {
        if (!redone) {
          acc.sums.add_partials_to(partial_sum + (c0 - c_begin), partial_sumsq + (c0 - c_begin),
                                   m);
          continue;
        }
      }
      acc.sums.fold_lanes(s.sum + c0, s.sumsq + c0, m, Acc::kEvenOdd);
    }
    if constexpr (kFp32Partials) {
      if (++tiles == kStatsTilesPerWiden || r1 == rows) {
        flush_partials_to_slots(partial_sum, s.sum + c_begin, width);
        flush_partials_to_slots(partial_sumsq, s.sumsq + c_begin, width);
        tiles = 0;
      }
    }
  }
}

template <typename Acc, typename T>
void stats_run_row(const T* x, T* y, int64_t n, int64_t ch, const StatsInputs& in,
                   const BlockSlots& s) {
  Acc acc(in, ch, kStep);
  for (int64_t i = 0; i < n; i += kStep) acc.step(x + i, y + i, std::min(kStep, n - i));
  redo_sums_if_large(acc, [&](auto add) {
    for (int64_t i = 0; i < n; i += kStep) add(x + i, std::min(kStep, n - i));
  });
  acc.fold_run(s, ch);
}

template <typename T, Act A>
void forward_stats_typed(const ForwardArgs& args, const StatsOut& out) {
  // A chunk whose sums overflowed fp32 redoes them from x (redo_sums_if_large).
  TORCH_INTERNAL_ASSERT(args.x != args.y, "the statistics pass does not run in place");
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
  // Tasks: each block's rows, or in lanes mode a chunk of its channels.
  const int64_t chunk = lanes ? stats_channel_chunk(block, nblocks, C) : C;
  const int64_t chunks = ceil_div(C, chunk);
  std::vector<double> sum(nblocks * C, 0.0), sumsq(nblocks * C, 0.0);
  std::vector<float> amax(nblocks * C, 0.f), remapped(nblocks * C, 0.f);
#if defined(CPU_CAPABILITY_AVX512)
  constexpr bool kOnBits = sizeof(T) == 2 && remaps_on_bits<A>();
#else
  constexpr bool kOnBits = false;
#endif
  std::vector<int16_t> bounds;
  if constexpr (kOnBits) {
    if (!args.params.center) bounds = remap_bounds<T>(args.params, C);
  }
  const StatsInputs in{args.params, activation_table_for<T, A>(), bounds.data()};

  auto blocks = [&](auto lanes_acc, auto row_acc) {
    using LanesAcc = typename decltype(lanes_acc)::type;
    using RowAcc = typename decltype(row_acc)::type;
    at::parallel_for(0, nblocks * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / chunks, c_begin = task % chunks * chunk;
        const BlockSlots slots{sum.data() + b * C, sumsq.data() + b * C, amax.data() + b * C,
                               remapped.data() + b * C};
        const int64_t begin = b * block, end = std::min(units, begin + block);
        if (lanes) {
          stats_rows_lanes<LanesAcc>(x + begin * C, y + begin * C, end - begin, C, c_begin,
                                     std::min(C, c_begin + chunk), in, slots);
        } else {
          for_each_run(g, begin, end, [&](int64_t p, int64_t n, int64_t ch) {
            stats_run_row<RowAcc>(x + p, y + p, n, ch, in, slots);
          });
        }
      }
    });
  };
  auto float_stats = [&](auto centred) {
    constexpr bool kCentred = decltype(centred)::value;
    blocks(std::type_identity<FloatStats<T, A, true, kCentred>>{},
           std::type_identity<FloatStats<T, A, false, kCentred>>{});
  };
  if (args.params.center) {
    float_stats(std::true_type{});
  } else if constexpr (kOnBits) {
#if defined(CPU_CAPABILITY_AVX512)
    blocks(std::type_identity<BitsStats<T, A, true>>{},
           std::type_identity<BitsStats<T, A, false>>{});
#endif
  } else {
    float_stats(std::false_type{});
  }

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

// dx for one fp32 vector: dy * act'(x), with dy zeroed (+0, masked_fill) where remapped (as the
// forward decides, on its own act(x), so both passes remap the same elements); for the smooth
// activations, `d` is act'(x).
template <Act A, bool kUnmasked>
C10_ALWAYS_INLINE fVec backward_vec(const fVec& x, Mask remap, fVec g, const fVec& d) {
  if constexpr (!kUnmasked) g = select(remap, fVec(0.f), g);
  if constexpr (is_smooth(A)) {
    return g * d;
  } else {
    if constexpr (A == Act::Identity) return g;
    // A select, as PyTorch's threshold_backward: +0 (not dy * 0) where x <= 0 or x is NaN.
    if constexpr (A == Act::Relu) return select(less(fVec(0.f), x), g, fVec(0.f));
  }
}

// The 16-bit smooth activations' tables where the kernel reads them (null otherwise): pairs for
// the backward that masks on act(x), derivative for the unmasked one and the one masking on keys,
// activation for SiLU's unsettled masks; the keys' per-channel intervals; and fp32 GELU's tail
// interval keys (lo, then hi, an array of channels each).
struct BackwardTables {
  const float* pairs;
  const float* derivative;
  const float* activation;
  RemapKeyTable keys;           // MaskMode::Keys only
  const float* tail_keys[2];    // MaskMode::TailIntervals only
  const float* settle_bounds[2];  // settle_mask's lo and hi, arrays of channels, if estimated
  bool computes;                // 16-bit smooth activations: sixteen_bit_on_grid()
};

// settle_mask's bounds of a step's lanes; -1 (settled, not remapped) in the lanes past a ragged
// end, whose padding (x = 0, t = 0, c = 0) would otherwise be unsettled at every row end.
template <bool kLanes>
C10_ALWAYS_INLINE void settle_bounds_at(const BackwardTables& tables, int64_t channel, int64_t i,
                                        int64_t m, F2& lo, F2& hi) {
  const float* lo_at = tables.settle_bounds[0] + channel + i;
  const float* hi_at = tables.settle_bounds[1] + channel + i;
  if constexpr (kLanes) {
    if (m >= kStep) {
      lo = load(lo_at, m);
      hi = load(hi_at, m);
      return;
    }
    float padded[2][kStep];
    std::fill(&padded[0][0], &padded[0][0] + 2 * kStep, -1.f);
    std::copy(lo_at, lo_at + m, padded[0]);
    std::copy(hi_at, hi_at + m, padded[1]);
    lo = load(padded[0], kStep);
    hi = load(padded[1], kStep);
  } else {
    lo.lo = lo.hi = fVec(*lo_at);
    hi.lo = hi.hi = fVec(*hi_at);
  }
}

// The tail interval keys of a step's lanes, as gelu_tail_mask_values takes them.
template <bool kLanes>
C10_ALWAYS_INLINE void tail_keys_at(const BackwardTables& tables, int64_t channel, int64_t i,
                                    int64_t m, F2& lo, F2& hi) {
  if constexpr (kLanes) {
    lo = load(tables.tail_keys[0] + channel + i, m);
    hi = load(tables.tail_keys[1] + channel + i, m);
  } else {
    lo.lo = lo.hi = fVec(tables.tail_keys[0][channel]);
    hi.lo = hi.hi = fVec(tables.tail_keys[1][channel]);
  }
}

// How a backward call masks: not at all (zero thresholds, or straight-through), or as the
// forward remaps, with a centre or without one (where SiLU settles its mask in fewer
// operations; GELU's loop measured 1.08x the time at standard deviation 1 in that mode). One
// loop per mode, so that none carries another's work: a shared loop converted fp16 x to fp32 for
// the unmasked branch on masked calls too.
// Keys: the 16-bit smooth activations on AVX-512, whose mask is decided on x's bits
// (remapped_by_keys), so that only act'(x) is evaluated, as unmasked.
// SidedTails: fp32 GELU where every channel's tails are uniform (uniform_tail_interval), whose
// off-grid lanes are masked by their side; TailIntervals: where some are not, masked by the
// interval of x's keys their channel remaps (gelu_tail_intervals), which costs two loads per
// vector in the lanes walk (1.03-1.09x the time of the sided mask at standard deviation 3). Both
// evaluate only act'(x) off the grid.
enum class MaskMode { None, Centred, Uncentred, Keys, SidedTails, TailIntervals };

constexpr bool needs_activation(MaskMode m) {
  return m == MaskMode::Centred || m == MaskMode::Uncentred || m == MaskMode::SidedTails ||
         m == MaskMode::TailIntervals;
}

template <typename T, Act A>
constexpr bool has_tail_intervals() {
  return has_fp32_tail(A) && !uses_table<T, A>();
}

template <typename T, Act A>
constexpr bool masks_by_keys() {
#if defined(CPU_CAPABILITY_AVX512)
  return uses_table<T, A>();
#else
  return false;
#endif
}

// kComputes: a 16-bit input's act(x) and act'(x) are computed, not gathered: GELU's and
// tanh-GELU's on the grid (every input of a chunk that for_each_grid_chunk tested lies on it),
// SiLU's from its sigmoid; the fp32 kernels always compute.
template <typename T, typename G, Act A, bool kLanes, MaskMode M, bool kComputes = false>
C10_ALWAYS_INLINE void backward_steps(const G* dy, const T* x, T* dx, int64_t begin, int64_t end,
                                      const RunParams<kLanes>& rp, const BackwardTables& tables) {
  for (int64_t i = begin; i < end; i += kStep) {
    const int64_t m = std::min(kStep, end - i);
    const F2 v = load(x + i, m);
    // a: the mask's activation (unused when unmasked; in SidedTails and TailIntervals, on GELU's
    // grid an estimate within estimate_error, off it a value that decides the lane's mask);
    // d: act'(x). `estimated`: the lanes whose a is an estimate that settles the mask (SiLU's
    // are all).
    F2 a = v, d = v, estimate_error;
    LanePair estimated{no_lanes(), no_lanes()}, off_grid{no_lanes(), no_lanes()};
    if constexpr (A == Act::Silu && uses_table<T, A>() && !kComputes) {
      static_assert(!needs_activation(M));
      const Indices index = load_indices(x + i, m);
      d = {gather(tables.derivative, index.lo), gather(tables.derivative, index.hi)};
    } else if constexpr (A == Act::Silu) {
      const ValueGrad lo = silu_from_sigmoid(v.lo), hi = silu_from_sigmoid(v.hi);
      a = {lo.value, hi.value};
      d = {lo.grad, hi.grad};
    } else if constexpr (M == MaskMode::SidedTails || M == MaskMode::TailIntervals) {
      static_assert(has_tail_intervals<T, A>());
      off_grid = gelu_estimate_and_derivative(v, a, estimate_error, d);
    } else if constexpr (kComputes) {
      // What the tables hold there, bit for bit (they were built by activate and derivative).
      static_assert(uses_table<T, A>() && A != Act::Silu);
      grid_value_and_derivative<A, needs_activation(M)>(v, a, d);
    } else if constexpr (uses_table<T, A>()) {
      const Indices index = load_indices(x + i, m);
      if constexpr (needs_activation(M)) {
        const ValueGrad lo = gather_pairs(tables.pairs, index.lo);
        const ValueGrad hi = gather_pairs(tables.pairs, index.hi);
        a = {lo.value, hi.value};
        d = {lo.grad, hi.grad};
      } else {
        d = {gather(tables.derivative, index.lo), gather(tables.derivative, index.hi)};
      }
    } else if constexpr (is_smooth(A) && needs_activation(M)) {
      estimated = activate_with_derivative<A>(v, a, d);
    } else {
      if constexpr (needs_activation(M)) a = activate<A>(v);
      if constexpr (is_smooth(A)) d = derivative<A>(v);
    }
    Mask remap_lo = no_lanes(), remap_hi = no_lanes();
    if constexpr (M == MaskMode::Keys) {
      static_assert(masks_by_keys<T, A>());
#if defined(CPU_CAPABILITY_AVX512)
      const __mmask32 remap =
          remapped_by_keys<kLanes>(tables.keys, rp.channel + (kLanes ? i : 0), x + i, m);
      remap_lo = static_cast<Mask>(remap);
      remap_hi = static_cast<Mask>(remap >> 16);
#endif
    } else if constexpr (M != MaskMode::None) {
      const StepParams p = rp.template at<M != MaskMode::Uncentred>(i, m);
      // fp32 GELU estimates its off-grid values in the Centred mode only.
      constexpr bool kEstimates =
          A == Act::Silu || (has_tail_intervals<T, A>() && M == MaskMode::Centred);
      if constexpr (M == MaskMode::SidedTails || M == MaskMode::TailIntervals) {
        if (any(off_grid.lo, off_grid.hi)) {
          if constexpr (M == MaskMode::SidedTails) {
            a = {gelu_sided_values(v.lo, off_grid.lo, a.lo),
                 gelu_sided_values(v.hi, off_grid.hi, a.hi)};
          } else {
            F2 lo, hi;
            tail_keys_at<kLanes>(tables, rp.channel, kLanes ? i : 0, m, lo, hi);
            a = {gelu_tail_mask_values(v.lo, off_grid.lo, lo.lo, hi.lo, p.c.lo, a.lo),
                 gelu_tail_mask_values(v.hi, off_grid.hi, lo.hi, hi.hi, p.c.hi, a.hi)};
          }
        }
        // On the grid a is an estimate: the lanes it leaves too close to call take the grid's
        // own value (their step's); the off-grid lanes' values decide as they are.
        const Settled lo = settle_grid_estimate(a.lo, estimate_error.lo, p.t.lo, p.c.lo);
        const Settled hi = settle_grid_estimate(a.hi, estimate_error.hi, p.t.hi, p.c.hi);
        remap_lo = lo.remap;
        remap_hi = hi.remap;
        if (any(lanes_except(lo.unsettled, off_grid.lo),
                lanes_except(hi.unsettled, off_grid.hi))) {
          const F2 exact = gelu_grid_values(v, off_grid, a);
          remap_lo = remap_mask(exact.lo, p.t.lo, p.c.lo);
          remap_hi = remap_mask(exact.hi, p.t.hi, p.c.hi);
        }
      } else if (kEstimates && (A == Act::Silu || any(estimated.lo, estimated.hi))) {
        // The estimates settle nearly every lane; the forward's act(x) decides the rest. (GELU's
        // value is estimated only off its grid: most steps have exact values throughout.)
        F2 bound_lo, bound_hi;
        settle_bounds_at<kLanes>(tables, rp.channel, kLanes ? i : 0, m, bound_lo, bound_hi);
        // |e - c|; without a centre the loop holds none.
        const F2 distance = M == MaskMode::Uncentred
                                ? F2{a.lo.abs(), a.hi.abs()}
                                : F2{(a.lo - p.c.lo).abs(), (a.hi - p.c.hi).abs()};
        Settled lo = settle_mask(distance.lo, p.t.lo, bound_lo.lo, bound_hi.lo);
        Settled hi = settle_mask(distance.hi, p.t.hi, bound_lo.hi, bound_hi.hi);
        remap_lo = lo.remap;
        remap_hi = hi.remap;
        if constexpr (A != Act::Silu) {
          // The other lanes' a is the forward's own, whose mask needs no settling.
          lo.unsettled = lo.unsettled & estimated.lo;
          hi.unsettled = hi.unsettled & estimated.hi;
        }
        if (any(lo.unsettled, hi.unsettled)) {
          const F2 exact = load_activated<T, A>(x + i, m, tables.activation);
          remap_lo = remap_mask(exact.lo, p.t.lo, p.c.lo);
          remap_hi = remap_mask(exact.hi, p.t.hi, p.c.hi);
        }
      } else {
        remap_lo = remap_mask(a.lo, p.t.lo, p.c.lo);
        remap_hi = remap_mask(a.hi, p.t.hi, p.c.hi);
      }
    }
    const F2 g = load(dy + i, m);
    store(dx + i, m, backward_vec<A, M == MaskMode::None>(v.lo, remap_lo, g.lo, d.lo),
          backward_vec<A, M == MaskMode::None>(v.hi, remap_hi, g.hi, d.hi));
  }
}

// backward_steps out of line per kind of chunk, as forward_chunk.
template <typename T, typename G, Act A, bool kLanes, MaskMode M, bool kComputes>
C10_NOINLINE void backward_chunk(const G* dy, const T* x, T* dx, int64_t begin, int64_t end,
                                 const RunParams<kLanes>& rp, const BackwardTables& tables) {
  backward_steps<T, G, A, kLanes, M, kComputes>(dy, x, dx, begin, end, rp, tables);
}

// Every backward but 16-bit SiLU's.
template <typename T, typename G, Act A, bool kLanes, MaskMode M>
void backward_run_grid_or_table(const G* dy, const T* x, T* dx, int64_t n,
                                const RunParams<kLanes>& rp, const BackwardTables& tables) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (uses_table<T, A>()) {
    // As the 16-bit forward: chunks on the grid compute what the gathers would load, where that
    // is faster (on an AMD EPYC, one thread, standard deviation 1: bf16 GELU 0.83x the time
    // with per-channel thresholds, 0.78x without; at 3 and 10, where nearly every chunk
    // gathers, the same time within noise).
    for_each_grid_chunk<T, A>(x, n, tables.computes, [&](int64_t begin, int64_t end, auto on_grid) {
      backward_chunk<T, G, A, kLanes, M, decltype(on_grid)::value>(dy, x, dx, begin, end, rp,
                                                                  tables);
    });
    return;
  }
#endif
  backward_steps<T, G, A, kLanes, M>(dy, x, dx, 0, n, rp, tables);
}

template <typename T, typename G, Act A, bool kLanes, MaskMode M>
void backward_run(const G* dy, const T* x, T* dx, int64_t n, const RunParams<kLanes>& rp,
                  const BackwardTables& tables) {
  if constexpr (A == Act::Silu && uses_table<T, A>()) {
    // SiLU's act'(x) is gathered only where its mask does not need act(x) (unmasked, or masked
    // on x's bits), which one sigmoid gives with act'(x).
    if (needs_activation(M) || tables.computes) {
      backward_steps<T, G, A, kLanes, M, true>(dy, x, dx, 0, n, rp, tables);
    } else if constexpr (!needs_activation(M)) {
      backward_steps<T, G, A, kLanes, M, false>(dy, x, dx, 0, n, rp, tables);
    }
  } else {
    backward_run_grid_or_table<T, G, A, kLanes, M>(dy, x, dx, n, rp, tables);
  }
}

// The kinds of data kept per parameter set.
template <typename T, Act A>
struct RemapKeysOf {};
template <typename T, Act A>
struct TailIntervalsOf {};

template <typename T, typename G, Act A>
void backward_typed(const BackwardArgs& args) {
  const G* dy = static_cast<const G*>(args.grad_y);
  const T* x = static_cast<const T*>(args.x);
  T* dx = static_cast<T*>(args.grad_x);
  const Geometry& g = args.geometry;
  // |a - c| < 0 never holds, so with zero thresholds (a calibration scan's, or an unconverted
  // model's) nothing is masked and act(x), half of the smooth activations' work, is not needed.
  const float* th = args.params.threshold;
  const bool unmasked =
      args.straight_through || std::none_of(th, th + g.channels, [](float v) { return v > 0.f; });
  const int64_t C = g.channels;
  // Data searched per channel (masks_by_keys' keys, GELU's tail intervals) is kept per
  // parameter set (param_cache.h): a first call makes it only where the call is large enough to
  // pay for the search, a repeat of the set makes it, later calls reuse it.
  std::shared_ptr<const std::vector<int16_t>> keys;
  if constexpr (masks_by_keys<T, A>()) {
    // A channel's four binary searches cost what masking on the keys saves on 700 (GELU) to
    // 1000 (SiLU) of its elements; a smaller first call decides from act(x). Against that, one
    // thread, 768 channels, rows 256 / 1024 / 4096: GELU and tanh-GELU 1.4x / 0.85-0.91x /
    // 0.73-0.81x the time, SiLU 1.5x / 0.98-1.02x / 0.86-0.88x.
    constexpr int64_t kMinElementsPerChannel = 1024;
    const Valley& shape = valley<T, A>();
    if (!unmasked && shape.shaped) {
      keys = parameter_set_cache<int16_t, RemapKeysOf<T, A>>().get(
          args.params, C, [&] { return g.numel >= kMinElementsPerChannel * C; }, [&] {
            std::vector<int16_t> made(4 * C);
            const float* a = activation_table<T, A>();
            at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
              for (int64_t c = c0; c < c1; ++c) {
                const RemapKeys r = remap_keys(a, shape, th[c],
                                               args.params.center ? args.params.center[c] : 0.f);
                made[c] = r.lo[0];
                made[C + c] = r.hi[0];
                made[2 * C + c] = r.lo[1];
                made[3 * C + c] = r.hi[1];
              }
            });
            return made;
          });
    }
  }
  // Channels whose tails are not uniform have their intervals searched (31 evaluations of 32
  // lanes per bound, for 32 channels at once: per channel about what the backward of 100 to 300
  // elements costs). Where a first call has fewer than kElementsPerSearchedChannel elements per
  // such channel, it takes the tail's estimate and its settling instead (Centred), which took
  // 1.2x the time of the intervals at 4096 x 1024 and 2x at 64 to 1024 rows (standard
  // deviation 3, per-channel thresholds).
  bool sided_tails = false;
  std::shared_ptr<const std::vector<float>> tail_keys;
  if constexpr (has_tail_intervals<T, A>()) {
    constexpr int64_t kElementsPerSearchedChannel = 4096;
    if (!unmasked) {
      sided_tails = gelu_tails_not_uniform(args.params, C, 1) == 0;
      if (!sided_tails) {
        const int64_t affordable = g.numel / kElementsPerSearchedChannel;
        tail_keys = parameter_set_cache<float, TailIntervalsOf<T, A>>().get(
            args.params, C,
            [&] { return gelu_tails_not_uniform(args.params, C, affordable + 1) <= affordable; },
            [&] { return gelu_tail_intervals(args.params, C); });
      }
    }
  }
  const bool tail_intervals = tail_keys != nullptr;
  const bool by_keys = keys != nullptr;
  // SiLU's estimates, and fp32 GELU's off its grid where its tails are neither sided nor searched
  // (the Centred mode), settle by each channel's bounds.
  const bool estimates =
      !unmasked && !by_keys &&
      (A == Act::Silu || (has_tail_intervals<T, A>() && !sided_tails && !tail_intervals));
  std::vector<float> settle_bounds;
  if (estimates) {
    settle_bounds.resize(2 * C);
    fill_settle_bounds(th, args.params.center, C, &settle_bounds[0], &settle_bounds[C]);
  }
  const bool with_activation = !unmasked && !by_keys;
  RemapKeyTable key_table{};
  if (by_keys) {
    const int16_t* k = keys->data();
    key_table = {{k, k + C, k + 2 * C, k + 3 * C}};
  }
  const bool computes = uses_table<T, A>() && sixteen_bit_on_grid();
  const bool computes_silu = A == Act::Silu && (with_activation || computes);
  BackwardTables tables{
      with_activation ? pair_table_for<T, A>() : nullptr,
      with_activation || computes_silu ? nullptr : derivative_table_for<T, A>(),
      A == Act::Silu && with_activation ? activation_table_for<T, A>() : nullptr, key_table,
      {}, {}, computes};
  if (estimates) {
    tables.settle_bounds[0] = &settle_bounds[0];
    tables.settle_bounds[1] = &settle_bounds[C];
  }
  if (tail_intervals) {
    tables.tail_keys[0] = tail_keys->data();
    tables.tail_keys[1] = tail_keys->data() + C;
  }
  const auto walk = [&](auto mode) {
    constexpr MaskMode M = decltype(mode)::value;
    at::parallel_for(0, g.numel, kGrain, [&](int64_t begin, int64_t end) {
      for_each_run(g, begin, end, [&](int64_t p, int64_t n, int64_t ch) {
        if (g.inner == 1) {
          backward_run<T, G, A, true, M>(dy + p, x + p, dx + p, n,
                                         RunParams<true>(args.params, ch), tables);
        } else {
          backward_run<T, G, A, false, M>(dy + p, x + p, dx + p, n,
                                          RunParams<false>(args.params, ch), tables);
        }
      });
    });
  };
  using None = std::integral_constant<MaskMode, MaskMode::None>;
  using Centred = std::integral_constant<MaskMode, MaskMode::Centred>;
  using Uncentred = std::integral_constant<MaskMode, MaskMode::Uncentred>;
  using Keys = std::integral_constant<MaskMode, MaskMode::Keys>;
  using SidedTails = std::integral_constant<MaskMode, MaskMode::SidedTails>;
  using TailIntervals = std::integral_constant<MaskMode, MaskMode::TailIntervals>;
  if (unmasked) {
    walk(None{});
  } else if (by_keys) {
    if constexpr (masks_by_keys<T, A>()) walk(Keys{});
  } else if (sided_tails) {
    if constexpr (has_tail_intervals<T, A>()) walk(SidedTails{});
  } else if (tail_intervals) {
    if constexpr (has_tail_intervals<T, A>()) walk(TailIntervals{});
  } else if constexpr (A == Act::Silu) {
    if (args.params.center) {
      walk(Centred{});
    } else {
      walk(Uncentred{});
    }
  } else {
    walk(Centred{});
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

#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kComputes16BitOnGrid = true;
#else
constexpr bool kComputes16BitOnGrid = false;
#endif

// Whether bf16 GELU's forward on the grid beats its gathers on this CPU: the 16-bit smooth
// activations' forward and backward go the same way (GELU, tanh-GELU and SiLU, bf16 and fp16,
// forward and backward, on an AMD EPYC and on an Intel Xeon). Inputs spread over the grid,
// the best of nine alternated calls each, about 0.3 ms once per process and build.
bool grid_beats_tables() {
#if defined(CPU_CAPABILITY_AVX512)
  using T = c10::BFloat16;
  constexpr int64_t n = 16384;
  std::vector<T> x(n), y(n);
  for (int64_t i = 0; i < n; ++i) {
    // A fixed scramble of [-3.5, 3.5): every chunk on the grid, table entries visited at random.
    x[i] = T(-3.5f + 7.f * static_cast<float>((i * 40503) % n) / n);
  }
  const float threshold = 0.1f;
  const RunParams<false> rp(ChannelParams{&threshold, nullptr}, 0);
  const float* table = activation_table<T, Act::Gelu>();
  const auto seconds = [&](auto on_grid) {
    const auto start = std::chrono::steady_clock::now();
    forward_chunk<T, Act::Gelu, false, decltype(on_grid)::value>(x.data(), y.data(), 0, n, rp,
                                                                  table);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  double grid = std::numeric_limits<double>::infinity(), gathers = grid;
  for (int round = 0; round < 9; ++round) {
    grid = std::min(grid, seconds(std::true_type{}));
    gathers = std::min(gathers, seconds(std::false_type{}));
  }
  return grid < gathers;
#else
  return false;
#endif
}

}  // namespace

KernelTable kernel_table() {
  return {C10_STRINGIZE(CPU_CAPABILITY), &forward, &forward_stats, &backward,
          kComputes16BitOnGrid, &grid_beats_tables, &parameter_set_counts,
          &forget_parameter_sets};
}

}  // namespace CPU_CAPABILITY
}  // namespace lipkern
