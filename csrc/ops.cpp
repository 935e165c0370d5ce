// CPU implementations of the lipkern::* operators (schemas: lipkern/ops/library.py).
//
// The public API has normalised the arguments and checked their types; what is checked here is
// what the kernels would otherwise silently get wrong (dtype, shapes), and the values of
// thresholds and centres, which the API leaves to the backend that reads them (a few small ops
// per call in Python), with messages that name the argument.

#include "remap_act.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <string>

namespace lipkern {

Act parse_act(const std::string& act) {
  if (act == "identity") return Act::Identity;
  if (act == "relu") return Act::Relu;
  if (act == "gelu") return Act::Gelu;
  if (act == "gelu_tanh") return Act::GeluTanh;
  if (act == "silu") return Act::Silu;
  TORCH_CHECK_VALUE(false, "lipkern: act must be one of identity, relu, gelu, gelu_tanh, silu; got '",
                    act, "'");
}

namespace {

void check_x(const at::Tensor& x, int64_t channel_dim) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                       x.scalar_type() == at::kHalf,
                   "lipkern: x must be float16, bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "lipkern: the CPU kernels got x on ", x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1, "lipkern: x must have at least one dimension");
  TORCH_CHECK_INDEX(channel_dim >= 0 && channel_dim < x.dim(), "lipkern: channel_dim ",
                    channel_dim, " is out of range for x with ", x.dim(), " dimensions");
}

// A () or (C,) float32 parameter, checked, as `length` contiguous floats (1 or C): a threshold
// must be >= 0, a centre finite.
at::Tensor expand_param(const at::Tensor& p, const char* name, int64_t channels, int64_t length,
                        bool is_threshold) {
  TORCH_CHECK_TYPE(p.scalar_type() == at::kFloat, "lipkern: ", name, " must be float32, got ",
                   p.scalar_type());
  TORCH_CHECK(p.device().is_cpu(), "lipkern: ", name, " must be on the CPU like x, got ",
              p.device());
  TORCH_CHECK_VALUE(p.dim() == 0 || (p.dim() == 1 && p.size(0) == channels), "lipkern: ", name,
                    " must have shape () or (", channels, ",), got ", p.sizes());
  at::Tensor full = p.expand({length}).contiguous();
  const float* v = full.data_ptr<float>();
  for (int64_t i = 0; i < length; ++i) {
    TORCH_CHECK_VALUE(!std::isnan(v[i]), "lipkern: ", name, " must not contain NaN (channel ", i,
                      ")");
    if (is_threshold) {
      TORCH_CHECK_VALUE(v[i] >= 0.f, "lipkern: threshold must be >= 0, got ", v[i], " (channel ",
                        i, ")");
    } else {
      TORCH_CHECK_VALUE(std::isfinite(v[i]), "lipkern: center must be finite, got ", v[i],
                        " (channel ", i, ")");
    }
  }
  return full;
}

// x itself when dense, else a dense copy laid out like torch.empty_like(x), so that outputs
// allocated with empty_like share the kernel's layout.
at::Tensor dense(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return x;
  at::Tensor copy = at::empty_like(x);
  copy.copy_(x);
  return copy;
}

// Everything a kernel call needs besides the data pointers; keeps the expanded parameters alive.
// `rows_per_row`: how many rows of C channels the geometry's lanes-mode rows hold (see below).
struct Prepared {
  Geometry geometry;
  at::Tensor threshold, center;
  ChannelParams params;
  Act act;
  int64_t rows_per_row = 1;
};

// Lanes mode (channel stride 1) walks one row of C channels at a time in steps of up to 32
// lanes (two AVX-512 vectors): a short row leaves most lanes of its last step idle and pays a
// run's set-up. channels_last SiLU with C = 16 took 2.4x F.silu's time and 3.7x its backward's,
// with C = 3 12x and 19x (fp32, one thread). Such rows are therefore walked several at a time,
// as one row of R C channels whose parameters are the C repeated R times: R C at least
// kShortRow, and a multiple of the widest step where that stays below 4 kShortRow. Rows of whole
// steps from 64 channels up are left alone: with C = 64, 128 and 192 the wide rows measured
// 0.95-1.1x the time (bf16 GELU the slowest).
constexpr int64_t kShortRow = 256;

bool is_short_row(int64_t channels) {
  return channels < kShortRow && (channels < 2 * kWidestStep || channels % kWidestStep != 0);
}

// Row mode (channel stride above 1) walks one channel's plane of `inner` elements at a time:
// short planes (ResNet's 7 x 7) leave the last step of each partly idle and pay a run's set-up,
// 1.6x F.gelu's time in fp32. Where the plane is short and C inner parameters stay few, the
// smooth activations' forward and fp32 backward walk the tensor as rows of C inner elements
// instead, each element with its channel's parameters (32 x 512 x 7 x 7, one thread: 0.70-0.80x
// the time). Not ReLU and identity, whose per-channel remap bounds would multiply (bf16 ReLU on
// 14 x 14 planes took 1.7x the time), nor the 16-bit backward, whose per-channel mask keys
// would (1.2x), nor the statistics (as rows of C x 14 x 14 positions, 16 of them, they took
// 2.6x the time).
constexpr int64_t kMaxPlanesAsRow = int64_t(1) << 16;

// Below this many elements a call keeps its own rows and planes: building the repeated
// parameters and a second statistics call cost more than they save (1 x 197 x 100 took 1.4x
// the time of its forward and 1.6x of its statistics).
constexpr int64_t kMinWalkedWide = int64_t(1) << 16;

// p's C values, each repeated `each` times in a row, and that repeated `times` times.
at::Tensor tiled(const at::Tensor& p, int64_t each, int64_t times) {
  const int64_t C = p.numel();
  at::Tensor out = at::empty({C * each * times}, p.options());
  const float* src = p.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) std::fill_n(dst + c * each, each, src[c]);
  for (int64_t r = 1; r < times; ++r) std::copy_n(dst, C * each, dst + r * C * each);
  return out;
}

int64_t rows_per_wide_row(int64_t channels) {
  const int64_t aligned = std::lcm(channels, kWidestStep);
  const int64_t period = aligned < 4 * kShortRow ? aligned : channels;
  return (kShortRow + period - 1) / period * (period / channels);
}

// `flat_if_uniform`: with per-tensor parameters the channel does not matter (no statistics), so
// the whole tensor is one run; `planes_as_rows`: a smooth activation's short planes may be
// walked as rows (see kMaxPlanesAsRow).
Prepared prepare(const at::Tensor& xd, const at::Tensor& threshold,
                 const std::optional<at::Tensor>& center, const std::string& act,
                 int64_t channel_dim, bool flat_if_uniform, bool planes_as_rows) {
  Prepared p;
  p.act = parse_act(act);
  const int64_t C = xd.size(channel_dim);
  const bool uniform = threshold.dim() == 0 && (!center.has_value() || center->dim() == 0);
  const bool flat = (flat_if_uniform && uniform) || C <= 1;
  const int64_t length = flat ? std::min<int64_t>(C, 1) : C;
  p.threshold = expand_param(threshold, "threshold", C, length, true);
  if (center.has_value()) p.center = expand_param(*center, "center", C, length, false);
  const int64_t numel = xd.numel();
  p.geometry = flat ? Geometry{numel, 1, numel} : Geometry{numel, C, xd.stride(channel_dim)};
  const int64_t inner = p.geometry.inner;
  const bool walked_wide = !flat && numel >= kMinWalkedWide;
  int64_t plane = 1;
  if (walked_wide && planes_as_rows && is_smooth(p.act) && inner > 1 && is_short_row(inner) &&
      C * inner <= kMaxPlanesAsRow) {
    plane = inner;
    p.geometry = Geometry{numel, C * inner, 1};
  }
  if (walked_wide && p.geometry.inner == 1 && is_short_row(p.geometry.channels)) {
    p.rows_per_row = rows_per_wide_row(p.geometry.channels);
    p.geometry.channels *= p.rows_per_row;
  }
  if (plane > 1 || p.rows_per_row > 1) {
    p.threshold = tiled(p.threshold, plane, p.rows_per_row);
    if (p.center.defined()) p.center = tiled(p.center, plane, p.rows_per_row);
  }
  p.params = {p.threshold.data_ptr<float>(),
              p.center.defined() ? p.center.data_ptr<float>() : nullptr};
  return p;
}

ForwardArgs forward_args(const at::Tensor& xd, const at::Tensor& y, const Prepared& p) {
  return {xd.data_ptr(), y.data_ptr(), xd.scalar_type(), p.act, p.geometry, p.params};
}

// The statistics of rows walked R at a time (see rows_per_wide_row): the whole wide rows in one
// call, with statistics per position in the wide row, and the rows left over (fewer than R) in
// another, with the plain geometry; each channel's R + 1 partial results are then combined in
// a fixed order, so the result stays independent of the thread count.
void wide_row_stats(const at::Tensor& xd, at::Tensor& y, const Prepared& p, int64_t C,
                    const StatsOut& out) {
  const int64_t wide = p.geometry.channels;
  const int64_t whole = xd.numel() / wide * wide;
  const int64_t parts = wide + C;
  const auto opts = xd.options();
  at::Tensor amax = at::zeros({parts}, opts.dtype(at::kFloat));
  at::Tensor remapped = at::zeros({parts}, opts.dtype(at::kLong));
  at::Tensor sum = at::zeros({parts}, opts.dtype(at::kDouble));
  at::Tensor sumsq = at::zeros({parts}, opts.dtype(at::kDouble));
  float* a = amax.data_ptr<float>();
  int64_t* r = remapped.data_ptr<int64_t>();
  double* s = sum.data_ptr<double>();
  double* q = sumsq.data_ptr<double>();
  ForwardArgs args = forward_args(xd, y, p);
  if (whole > 0) {
    args.geometry.numel = whole;
    kernels().forward_stats(args, {a, r, s, q});
  }
  if (whole < xd.numel()) {
    const int64_t bytes = whole * xd.element_size();
    args.x = static_cast<const char*>(args.x) + bytes;
    args.y = static_cast<char*>(args.y) + bytes;
    // The repeated parameters start with the C channels' own.
    args.geometry = Geometry{xd.numel() - whole, C, 1};
    kernels().forward_stats(args, {a + wide, r + wide, s + wide, q + wide});
  }
  for (int64_t c = 0; c < C; ++c) {
    float m = 0.f;
    int64_t remapped_total = 0;
    double sum_total = 0.0, sumsq_total = 0.0;
    for (int64_t k = c; k < parts; k += C) {
      if (!std::isnan(m) && !(a[k] <= m)) m = a[k];  // NaN, once seen, stays (the kernels' rule)
      remapped_total += r[k];
      sum_total += s[k];
      sumsq_total += q[k];
    }
    out.amax[c] = m;
    out.remapped[c] = remapped_total;
    out.sum[c] = sum_total;
    out.sumsq[c] = sumsq_total;
  }
}

at::Tensor remap_act_cpu(const at::Tensor& x, const at::Tensor& threshold,
                         const std::optional<at::Tensor>& center, c10::string_view act,
                         int64_t channel_dim, bool straight_through) {
  check_x(x, channel_dim);
  const at::Tensor xd = dense(x);
  const Prepared p = prepare(xd, threshold, center, std::string(act), channel_dim, true, true);
  at::Tensor y = at::empty_like(xd);
  if (xd.numel() > 0) kernels().forward(forward_args(xd, y, p));
  return y;
}

void remap_act_inplace_cpu(const at::Tensor& x, const at::Tensor& threshold,
                           const std::optional<at::Tensor>& center, c10::string_view act,
                           int64_t channel_dim) {
  check_x(x, channel_dim);
  const at::Tensor xd = dense(x);
  const Prepared p = prepare(xd, threshold, center, std::string(act), channel_dim, true, true);
  if (xd.numel() > 0) kernels().forward(forward_args(xd, xd, p));
  if (!xd.is_same(x)) x.copy_(xd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> remap_act_stats_cpu(
    const at::Tensor& x, const at::Tensor& threshold, const std::optional<at::Tensor>& center,
    c10::string_view act, int64_t channel_dim) {
  check_x(x, channel_dim);
  const at::Tensor xd = dense(x);
  const Prepared p = prepare(xd, threshold, center, std::string(act), channel_dim, false, false);
  const int64_t C = x.size(channel_dim);
  const auto opts = x.options();
  at::Tensor y = at::empty_like(xd);
  at::Tensor amax = at::zeros({C}, opts.dtype(at::kFloat));
  at::Tensor remapped = at::zeros({C}, opts.dtype(at::kLong));
  at::Tensor count = at::full({C}, C > 0 ? x.numel() / C : 0, opts.dtype(at::kLong));
  at::Tensor sum = at::zeros({C}, opts.dtype(at::kDouble));
  at::Tensor sumsq = at::zeros({C}, opts.dtype(at::kDouble));
  const StatsOut out{amax.data_ptr<float>(), remapped.data_ptr<int64_t>(), sum.data_ptr<double>(),
                     sumsq.data_ptr<double>()};
  if (xd.numel() == 0) return {y, amax, remapped, count, sum, sumsq};
  if (p.rows_per_row == 1) {
    kernels().forward_stats(forward_args(xd, y, p), out);
  } else {
    wide_row_stats(xd, y, p, C, out);
  }
  return {y, amax, remapped, count, sum, sumsq};
}

at::Tensor remap_act_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                  const at::Tensor& threshold,
                                  const std::optional<at::Tensor>& center, c10::string_view act,
                                  int64_t channel_dim, bool straight_through) {
  check_x(x, channel_dim);
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "lipkern: grad_y has shape ", grad_y.sizes(),
                    " but x has ", x.sizes());
  TORCH_CHECK(grad_y.device().is_cpu(), "lipkern: grad_y must be on the CPU like x");
  const at::Tensor xd = dense(x);
  const Prepared p = prepare(xd, threshold, center, std::string(act), channel_dim, true,
                             xd.scalar_type() == at::kFloat);
  // dy is read in fp32: keep it as is when it is x's dtype or float32, and lay it out like x.
  const at::ScalarType grad_dtype =
      grad_y.scalar_type() == xd.scalar_type() ? xd.scalar_type() : at::kFloat;
  at::Tensor gd = grad_y;
  if (gd.scalar_type() != grad_dtype || gd.strides() != xd.strides()) {
    gd = at::empty_like(xd, xd.options().dtype(grad_dtype));
    gd.copy_(grad_y);
  }
  at::Tensor grad_x = at::empty_like(xd);
  if (xd.numel() > 0) {
    kernels().backward({gd.data_ptr(), grad_dtype, xd.data_ptr(), grad_x.data_ptr(),
                        xd.scalar_type(), p.act, p.geometry, p.params, straight_through});
  }
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(lipkern, CPU, m) {
  m.impl("remap_act", &remap_act_cpu);
  m.impl("remap_act_backward", &remap_act_backward_cpu);
  m.impl("remap_act_stats", &remap_act_stats_cpu);
  m.impl("remap_act_", &remap_act_inplace_cpu);
}

}  // namespace lipkern
