// Tables of every 16-bit input's activation and derivative, and the step load that uses them.
// Included by csrc/remap_act_kernels.cpp only (see there): it lands in lipkern::<CAP>.
#pragma once

#include "cpu/act_grid.h"

#include <bit>
#include <cmath>
#include <limits>
#include <vector>

namespace lipkern {
namespace CPU_CAPABILITY {
namespace {

// A float16 or bfloat16 x has only 65536 values, so each smooth activation is tabulated once per
// process (256 KB of fp32, built on first use by activate<A> itself, hence bit-identical to it),
// and one gather replaces the grid polynomial: the 16-bit bits are the index. The backward's
// act'(x) of GELU and tanh-GELU is tabulated the same way, by derivative<A>. On AVX-512, where
// the CPU's gathers cost more than the polynomials, the kernels gather only for chunks with a
// lane off the grid (for_each_grid_chunk below).

constexpr int64_t k16BitValues = 65536;

template <typename T, Act A>
constexpr bool uses_table() {
  return !std::is_same_v<T, float> && is_smooth(A);
}

// Every 16-bit pattern of T, a step at a time, as floats: fill(first index, values).
template <typename T, typename F>
void for_each_16bit_step(F&& fill) {
  uint16_t bits[kStep];
  for (int64_t i = 0; i < k16BitValues; i += kStep) {
    for (int64_t j = 0; j < kStep; ++j) bits[j] = static_cast<uint16_t>(i + j);
    fill(i, load(reinterpret_cast<const T*>(bits), kStep));
  }
}

// f evaluated at every 16-bit pattern of T, in pattern order.
template <typename T, typename F>
std::vector<float> tabulate(F&& f) {
  std::vector<float> values(k16BitValues);
  for_each_16bit_step<T>([&](int64_t i, const F2& v) {
    const F2 out = f(v);
    out.lo.store(values.data() + i);
    out.hi.store(values.data() + i + kF);
  });
  return values;
}

template <typename T, Act A>
const float* activation_table() {
  static const std::vector<float> table = tabulate<T>([](const F2& x) { return activate<A>(x); });
  return table.data();
}

template <typename T, Act A>
const float* derivative_table() {
  static const std::vector<float> table =
      tabulate<T>([](const F2& x) { return derivative<A>(x); });
  return table.data();
}

// act(x) and act'(x) side by side (value at 2i, derivative at 2i + 1), for the masked backward,
// which needs both: one 64-bit gather fetches the pair, and a gather's cost goes by the elements
// it loads (on an AMD EPYC with AVX-512, two pair gathers of 8 and two permutes took 0.65x the
// time of two float gathers of 16).
template <typename T, Act A>
const float* pair_table() {
  static const std::vector<float> table = [] {
    const float* value = activation_table<T, A>();
    const float* grad = derivative_table<T, A>();
    std::vector<float> pairs(2 * k16BitValues);
    for (int64_t i = 0; i < k16BitValues; ++i) {
      pairs[2 * i] = value[i];
      pairs[2 * i + 1] = grad[i];
    }
    return pairs;
  }();
  return table.data();
}

// The tables a kernel over T reads (null where none is used); fetched before the parallel
// region, so that the one-time build happens on the calling thread.
template <typename T, Act A>
const float* activation_table_for() {
  if constexpr (uses_table<T, A>()) return activation_table<T, A>();
  return nullptr;
}

// A 16-bit backward reads act'(x) from the derivative table wherever gathers are the faster
// (sixteen_bit_on_grid), except SiLU's where its mask needs act(x) too, which one sigmoid gives
// with act'(x); GELU and tanh-GELU read act(x) beside it from the pair table.
template <typename T, Act A>
const float* derivative_table_for() {
  if constexpr (uses_table<T, A>()) return derivative_table<T, A>();
  return nullptr;
}

template <typename T, Act A>
const float* pair_table_for() {
  if constexpr (uses_table<T, A>() && A != Act::Silu) return pair_table<T, A>();
  return nullptr;
}

// The table indices (the 16-bit patterns, zero-extended) of one step: the first and second
// float vector's lanes. Padding lanes read index 0 (x = +0).
#if defined(CPU_CAPABILITY_AVX512)
using Index = __m512i;
#elif defined(CPU_CAPABILITY_AVX2)
using Index = __m256i;
#else
struct Index {
  uint32_t lane[kF];
};
#endif

struct Indices {
  Index lo, hi;
};

template <typename T>
C10_ALWAYS_INLINE Indices load_indices(const T* p, int64_t n) {
  using V = at::vec::Vectorized<T>;
  const V raw = n >= kStep ? V::loadu(p) : V::loadu(p, n);
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i bits = raw;
  return {_mm512_cvtepu16_epi32(_mm512_castsi512_si256(bits)),
          _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(bits, 1))};
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i bits = raw;
  return {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(bits)),
          _mm256_cvtepu16_epi32(_mm256_extracti128_si256(bits, 1))};
#else
  uint16_t bits[kStep];
  raw.store(bits);
  Indices out;
  for (int64_t i = 0; i < kF; ++i) {
    out.lo.lane[i] = bits[i];
    out.hi.lane[i] = bits[kF + i];
  }
  return out;
#endif
}

C10_ALWAYS_INLINE fVec gather(const float* table, const Index& index) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_i32gather_ps(index, table, sizeof(float));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_i32gather_ps(table, index, sizeof(float));
#else
  float values[kF];
  for (int64_t i = 0; i < kF; ++i) values[i] = table[index.lane[i]];
  return fVec::loadu(values);
#endif
}

// The act(x) and act'(x) of one float vector's lanes from pair_table.
C10_ALWAYS_INLINE ValueGrad gather_pairs(const float* pairs, const Index& index) {
#if defined(CPU_CAPABILITY_AVX512)
  const double* table = reinterpret_cast<const double*>(pairs);
  const __m512 first = _mm512_castpd_ps(_mm512_i32gather_pd(_mm512_castsi512_si256(index), table, 8));
  const __m512 second = _mm512_castpd_ps(_mm512_i32gather_pd(_mm512_extracti64x4_epi64(index, 1), table, 8));
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  return {_mm512_permutex2var_ps(first, even, second), _mm512_permutex2var_ps(first, odd, second)};
#elif defined(CPU_CAPABILITY_AVX2)
  const double* table = reinterpret_cast<const double*>(pairs);
  const __m256 first = _mm256_castpd_ps(_mm256_i32gather_pd(table, _mm256_castsi256_si128(index), 8));
  const __m256 second = _mm256_castpd_ps(_mm256_i32gather_pd(table, _mm256_extracti128_si256(index, 1), 8));
  // shuffle_ps picks within 128-bit halves (lanes 0 1 4 5 | 2 3 6 7); the 64-bit permute restores
  // the order.
  const __m256d value = _mm256_castps_pd(_mm256_shuffle_ps(first, second, _MM_SHUFFLE(2, 0, 2, 0)));
  const __m256d grad = _mm256_castps_pd(_mm256_shuffle_ps(first, second, _MM_SHUFFLE(3, 1, 3, 1)));
  return {_mm256_castpd_ps(_mm256_permute4x64_pd(value, _MM_SHUFFLE(3, 1, 2, 0))),
          _mm256_castpd_ps(_mm256_permute4x64_pd(grad, _MM_SHUFFLE(3, 1, 2, 0)))};
#else
  float value[kF], grad[kF];
  for (int64_t i = 0; i < kF; ++i) {
    value[i] = pairs[2 * index.lane[i]];
    grad[i] = pairs[2 * index.lane[i] + 1];
  }
  return {fVec::loadu(value), fVec::loadu(grad)};
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// The 16-bit pattern of v in T, which must represent it exactly (as it does the grids' bounds).
template <typename T>
constexpr uint16_t exact_bits(float v) {
  const uint32_t f = std::bit_cast<uint32_t>(v);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (f & 0xffffu) throw "not a bfloat16";
    return static_cast<uint16_t>(f >> 16);
  } else {
    if (f & 0x1fffu) throw "not a float16";
    return static_cast<uint16_t>(((((f >> 23) & 0xffu) - 112u) << 10) | ((f >> 13) & 0x3ffu));
  }
}

// Whether the n elements of p all lie on act's fp32 grid, tested on their bits (NaN is off).
template <typename T, Act A>
bool all_on_grid(const T* p, int64_t n) {
  constexpr uint16_t kBound = exact_bits<T>(act_table<A>().bound);
  using V = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < n; i += kStep) {
    const __m512i raw = n - i >= kStep ? V::loadu(p + i) : V::loadu(p + i, n - i);
    const __m512i magnitude = _mm512_and_si512(raw, _mm512_set1_epi16(0x7fff));
    // Stopping at the first step off the grid: where the inputs spread (standard deviation 3 and
    // 10) nearly every chunk has one in its first steps, and testing the whole chunk cost the
    // forward 1.03-1.16x the time there (one thread); stopping brought it to the gathering
    // loop's time within noise.
    if (_mm512_cmpge_epu16_mask(magnitude, _mm512_set1_epi16(kBound))) return false;
  }
  return true;
}

// [0, n) of x handed to chunk(begin, end, on_grid) with on_grid a std::bool_constant: where the
// fp32 polynomials cost less than the gathers (`grid`, see cpu_16bit_method in remap_act.h) in
// chunks of 1024 elements, computed where they lie on the grid (off it the polynomials cost far
// more than the gathers); otherwise whole, gathered. The kernels compile one loop for each.
template <typename T, Act A, typename F>
C10_ALWAYS_INLINE void for_each_grid_chunk(const T* x, int64_t n, bool grid, F&& chunk) {
  if (!grid) return chunk(0, n, std::false_type{});
  constexpr int64_t kChunk = 32 * kStep;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    if (all_on_grid<T, A>(x + c0, c1 - c0)) {
      chunk(c0, c1, std::true_type{});
    } else {
      chunk(c0, c1, std::false_type{});
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// The remap decided on x's bits for the 16-bit smooth activations.
//
// A 16-bit x's order key is its bits from +0 up and its bits with the magnitude flipped below
// (as int16): -inf < ... < -0 < +0 < ... < +inf, NaNs outside [key(-inf), key(+inf)]. Every
// GELU, tanh-GELU and SiLU table is a valley in key order: act(x) does not increase from -inf to
// its minimum and does not decrease from there to +inf (valley() checks it when first used).
// fl(act(x) - c) then moves monotonically along each side, so the x that the forward remaps,
// |fl(act(x) - c)| < t, form one interval of keys on each side of the minimum, found by binary
// search with the forward's own test on the table's act(x). The backward then masks with four
// integer compares on 32 lanes instead of evaluating act(x).

inline int16_t order_key(uint16_t bits) {
  return static_cast<int16_t>(bits & 0x8000 ? bits ^ 0x7fff : bits);
}

// order_key's inverse (the map is its own inverse on the bits).
inline uint16_t bits_of_key(int key) {
  const auto bits = static_cast<uint16_t>(key);
  return bits & 0x8000 ? bits ^ 0x7fff : bits;
}

// A table that is not a valley (none is; a change of the fp32 code could make one) keeps
// deciding from act(x): its remapped x need not form two intervals.
struct Valley {
  bool shaped;
  int first, bottom, last;  // the keys of -inf, of the (first) minimum and of +inf
};

template <typename T, Act A>
const Valley& valley() {
  static const Valley shape = [] {
    const float* a = activation_table<T, A>();
    const uint16_t inf = Bits<T>::kInf;
    Valley v{true, order_key(0x8000 | inf), 0, order_key(inf)};
    float lowest = std::numeric_limits<float>::infinity();
    for (int k = v.first; k <= v.last; ++k) {
      const float value = a[bits_of_key(k)];
      v.shaped = v.shaped && !std::isnan(value);
      if (value < lowest) {
        lowest = value;
        v.bottom = k;
      }
    }
    for (int k = v.first + 1; k <= v.last; ++k) {
      const float before = a[bits_of_key(k - 1)], value = a[bits_of_key(k)];
      v.shaped = v.shaped && (k <= v.bottom ? value <= before : value >= before);
    }
    return v;
  }();
  return shape;
}

// The smallest k in [lo, hi] where pred holds, pred being false then true; hi + 1 if none.
template <typename P>
int first_key_where(int lo, int hi, P&& pred) {
  while (lo <= hi) {
    const int mid = lo + (hi - lo) / 2;
    if (pred(mid)) {
      hi = mid - 1;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// The keys remapped for threshold t and centre c: [lo[i], hi[i]] left and right of the minimum
// (empty where lo > hi). The ends lie within [key(-inf) - 1, key(+inf) + 1], inside int16.
struct RemapKeys {
  int16_t lo[2], hi[2];
};

inline RemapKeys remap_keys(const float* a, const Valley& v, float t, float c) {
  // |d| < t is d < t and d > -t, for d = fl(act(x) - c) as the forward's remap_mask has it.
  const auto below = [&](int k) { return a[bits_of_key(k)] - c < t; };
  const auto above = [&](int k) { return a[bits_of_key(k)] - c > -t; };
  const auto not_above = [&](int k) { return !above(k); };
  const auto not_below = [&](int k) { return !below(k); };
  // Left of the minimum d does not increase, right of it d does not decrease.
  const int lo_left = first_key_where(v.first, v.bottom, below);
  const int hi_left = first_key_where(v.first, v.bottom, not_above) - 1;
  const int lo_right = first_key_where(v.bottom, v.last, above);
  const int hi_right = first_key_where(v.bottom, v.last, not_below) - 1;
  return {{static_cast<int16_t>(lo_left), static_cast<int16_t>(lo_right)},
          {static_cast<int16_t>(hi_left), static_cast<int16_t>(hi_right)}};
}

// Per channel, structure of arrays (lo[0], hi[0], lo[1], hi[1]), for lanes-mode vector loads.
struct RemapKeyTable {
  const int16_t* bound[4];
};

#if defined(CPU_CAPABILITY_AVX512)
// The lanes of a step's first n that the forward remaps: channel ch (row mode) or ch + lane
// (lanes mode).
template <bool kLanes, typename T>
C10_ALWAYS_INLINE __mmask32 remapped_by_keys(const RemapKeyTable& keys, int64_t ch, const T* x,
                                            int64_t n) {
  const __mmask32 lanes = first_lanes32(n);
  const __m512i bits = load_bits16(x, n);
  const __m512i key = _mm512_xor_si512(
      bits, _mm512_and_si512(_mm512_srai_epi16(bits, 15), _mm512_set1_epi16(0x7fff)));
  __m512i b[4];
  for (int j = 0; j < 4; ++j) {
    b[j] = kLanes ? _mm512_maskz_loadu_epi16(lanes, keys.bound[j] + ch)
                  : _mm512_set1_epi16(keys.bound[j][ch]);
  }
  const __mmask32 in_either =
      _mm512_mask_cmple_epi16_mask(_mm512_cmpge_epi16_mask(key, b[0]), key, b[1]) |
      _mm512_mask_cmple_epi16_mask(_mm512_cmpge_epi16_mask(key, b[2]), key, b[3]);
  return in_either & lanes;
}
#endif

// act(x) for the first n elements of p, as the two float vectors of one step; padding lanes hold
// act(0) = 0.
template <typename T, Act A>
C10_ALWAYS_INLINE F2 load_activated(const T* p, int64_t n, const float* table) {
  if constexpr (uses_table<T, A>()) {
    const Indices index = load_indices(p, n);
    return {gather(table, index.lo), gather(table, index.hi)};
  } else {
    return activate<A>(load(p, n));
  }
}

// |a - c| < t in fp32; NaN compares false and t = 0 never holds.
C10_ALWAYS_INLINE Mask remap_mask(const fVec& a, const fVec& t, const fVec& c) {
  return less((a - c).abs(), t);
}

struct Settled {
  Mask remap, unsettled;
};

// The remap mask from an estimate e of act(x) within relative 2^-20.8 of the kernel's own act(x)
// (or absolute 2^-90, where e underflows), given distance = |e - c|: settled where |distance - t|
// exceeds how far the kernel's |act(x) - c| can lie from it, r(e) = |e| 2^-19 + |e - c| 2^-22 +
// 2^-90 (that and both roundings of the difference, with a margin of 2 and more). Only lanes
// with |distance - t| <= r(e) can be decided otherwise, and there |e| <= |c| + distance and
// distance <= t + r(e) bound r(e) by a band of the channel's: the lanes with distance in
// [lo, hi], which holds [t - band, t + band] (fill_settle_bounds), are unsettled. Three compares
// per vector where comparing |distance - t| with the band took six operations.
C10_ALWAYS_INLINE Settled settle_mask(const fVec& distance, const fVec& t, const fVec& lo,
                                      const fVec& hi) {
  Settled out;
  out.remap = less(distance, t);
#if defined(CPU_CAPABILITY_AVX512)
  out.unsettled = _mm512_mask_cmp_ps_mask(at_least(distance, lo), distance, hi, _CMP_LE_OQ);
#else
  out.unsettled = at_least(distance, lo) & at_least(hi, distance);
#endif
  return out;
}

// settle_mask's bounds of every channel, kF channels at a time (they are computed on every masked
// call: a scalar loop in double took 2 ns a channel, 2 us of the 28 us SiLU's masked backward of
// 64 rows x 1024 channels takes); c null means no centre. Thresholds are >= 0 and centres finite (the
// op rejects others). Where it matters r(e) is at most
// ((|c| + t) 2^-19 + t 2^-22 + 2^-90) / (1 - 2^-19 - 2^-22 - 2^-43), below
// B = ((|c| + t) (2^-19 + 2^-22) + 2^-90) (1 + 2^-17), which band is at least: its constants
// carry (1 + 2^-15), its sum and fma lose at most (1 - 2^-23) (a subnormal sum's absolute 2^-150,
// far less than the margin on 2^-90). Each end v = fl(t -+ band) is then moved outwards by
// |v| 2^-21, at least four of v's ulps, where v's rounding and the move's took half of one each;
// below 2^-125, t -+ band was exact, and the monotone rounding keeps the moved end beyond it. So
// lo <= t - B and hi >= t + B. A channel with t = 0 remaps nothing: its bounds -1 settle every
// lane (distance >= 0). One with t = inf remaps every finite distance: its bounds [inf, inf] leave
// unsettled only an infinite one (e infinite, or e - c overflowed), which act(x) decides. A band
// that overflows leaves every lane unsettled.
inline void fill_settle_bounds(const float* t, const float* c, int64_t channels, float* lo,
                               float* hi) {
  constexpr float kRelative = (0x1p-19f + 0x1p-22f) * (1 + 0x1p-15f);
  constexpr float kAbsolute = 0x1p-90f * (1 + 0x1p-15f);
  const fVec inf(std::numeric_limits<float>::infinity());
  for (int64_t ch = 0; ch < channels; ch += kF) {
    const int64_t n = std::min<int64_t>(kF, channels - ch);
    const fVec tv = fVec::loadu(t + ch, n);
    const fVec cv = c ? fVec::loadu(c + ch, n) : fVec(0.f);
    const fVec band = fused_madd(cv.abs() + tv, fVec(kRelative), fVec(kAbsolute));
    const fVec below = tv - band, above = tv + band;
    const fVec low = fused_madd(below.abs(), fVec(-0x1p-21f), below);
    const fVec high = fused_madd(above.abs(), fVec(0x1p-21f), above);
    const Mask positive = less(fVec(0.f), tv);
    const Mask finite_positive = positive & less(tv, inf);
    const fVec unbanded = select(positive, tv, fVec(-1.f));
    select(finite_positive, low, unbanded).store(lo + ch, n);
    select(finite_positive, high, unbanded).store(hi + ch, n);
  }
}

// The remap mask from GELU's grid estimate e, within `error` (1 + 2^-20)^-1 of the grid's value
// (gelu_estimate_errors): |fl(e - c)| and the kernel's |fl(act(x) - c)| lie within that and
// both roundings of the difference of each other, less than band = error + t 2^-21 where either
// is near t; lanes closer to t than that are unsettled. Strictly less, so a lane exactly band
// away from t is settled, and so is every lane of an infinite t (|d - t| = inf = band), which
// remaps every finite value, as the forward does, without a compare of its own.
C10_ALWAYS_INLINE Settled settle_grid_estimate(const fVec& e, const fVec& error, const fVec& t,
                                               const fVec& c) {
  const fVec distance = (e - c).abs();
  const fVec band = fused_madd(t, fVec(0x1p-21f), error);
  Settled out;
  out.remap = less(distance, t);
  out.unsettled = less((distance - t).abs(), band);
  return out;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace lipkern
