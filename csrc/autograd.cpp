// Autograd of lipkern::remap_act, lipkern::remap_act_stats and lipkern::remap_act_backward for
// CPU tensors, and the version-counter kernel of lipkern::remap_act_, in C++.
//
// lipkern/ops/library.py registers the same formulas in Python for every device (the Autograd
// alias key); this AutogradCPU registration takes precedence for CPU tensors only. It exists for
// speed: the Python autograd kernel runs on every call, with or without grad, and inside a
// model Python between two multi-threaded ops costs several times its own time (the README's
// Backends section has the measurement). The formulas are
// those of library.py: dx from lipkern::remap_act_backward, its own gradients (double backward)
// from lipkern::remap_act_double_backward, no gradient for thresholds, centres or the statistics.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace lipkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using RemapActFn = at::Tensor(const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, c10::string_view, int64_t, bool);
using StatsTuple =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using RemapActStatsFn = StatsTuple(const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, c10::string_view, int64_t);
using RemapActBackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, c10::string_view, int64_t,
                                      bool);
using RemapActDoubleBackwardFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, c10::string_view, int64_t, bool);
using RemapActInplaceFn = void(const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, c10::string_view, int64_t);

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

const c10::TypedOperatorHandle<RemapActFn>& remap_act_op() {
  static const auto op = find_op<RemapActFn>("lipkern::remap_act");
  return op;
}

const c10::TypedOperatorHandle<RemapActStatsFn>& remap_act_stats_op() {
  static const auto op = find_op<RemapActStatsFn>("lipkern::remap_act_stats");
  return op;
}

const c10::TypedOperatorHandle<RemapActBackwardFn>& remap_act_backward_op() {
  static const auto op = find_op<RemapActBackwardFn>("lipkern::remap_act_backward");
  return op;
}

void save_for_backward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& threshold,
                       const std::optional<at::Tensor>& center, c10::string_view act,
                       int64_t channel_dim, bool straight_through) {
  ctx->save_for_backward({x, threshold, center.value_or(at::Tensor())});
  ctx->saved_data["act"] = std::string(act);
  ctx->saved_data["channel_dim"] = channel_dim;
  ctx->saved_data["straight_through"] = straight_through;
}

std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

at::Tensor grad_x(AutogradContext* ctx, const at::Tensor& grad_y) {
  const variable_list saved = ctx->get_saved_variables();
  // Through the dispatcher with its autograd key: under create_graph the dx it returns is itself
  // differentiable (RemapActBackwardFunction).
  return remap_act_backward_op().call(
      grad_y, saved[0], saved[1], optional_tensor(saved[2]), ctx->saved_data["act"].toStringRef(),
      ctx->saved_data["channel_dim"].toInt(), ctx->saved_data["straight_through"].toBool());
}

// Thresholds, centres and the string / int / bool arguments get no gradient.
variable_list with_no_parameter_grads(at::Tensor dx, size_t inputs) {
  variable_list grads(inputs);
  grads[0] = std::move(dx);
  return grads;
}

struct RemapActFunction : public torch::autograd::Function<RemapActFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& threshold,
                            const std::optional<at::Tensor>& center, c10::string_view act,
                            int64_t channel_dim, bool straight_through) {
    save_for_backward(ctx, x, threshold, center, act, channel_dim, straight_through);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return remap_act_op().call(x, threshold, center, act, channel_dim, straight_through);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return with_no_parameter_grads(grad_x(ctx, grads[0]), 6);
  }
};

struct RemapActStatsFunction : public torch::autograd::Function<RemapActStatsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& threshold, const std::optional<at::Tensor>& center,
                               c10::string_view act, int64_t channel_dim) {
    save_for_backward(ctx, x, threshold, center, act, channel_dim, false);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, amax, remapped, count, sum, sumsq] =
        remap_act_stats_op().call(x, threshold, center, act, channel_dim);
    // Extrema and counts of the input carry no gradient.
    ctx->mark_non_differentiable({amax, remapped, count, sum, sumsq});
    return {y, amax, remapped, count, sum, sumsq};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return with_no_parameter_grads(grad_x(ctx, grads[0]), 5);
  }
};

// dx = dy * act'(x) * keep as a function of dy and x: a gradient penalty differentiates it again.
struct RemapActBackwardFunction : public torch::autograd::Function<RemapActBackwardFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& x,
                            const at::Tensor& threshold, const std::optional<at::Tensor>& center,
                            c10::string_view act, int64_t channel_dim, bool straight_through) {
    ctx->save_for_backward({grad_y, x, threshold, center.value_or(at::Tensor())});
    ctx->saved_data["act"] = std::string(act);
    ctx->saved_data["channel_dim"] = channel_dim;
    ctx->saved_data["straight_through"] = straight_through;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return remap_act_backward_op().call(grad_y, x, threshold, center, act, channel_dim,
                                        straight_through);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto double_backward =
        find_op<RemapActDoubleBackwardFn>("lipkern::remap_act_double_backward");
    variable_list result(7);
    if (!grads[0].defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_grad_y, grad_x] = double_backward.call(
        grads[0], saved[0], saved[1], saved[2], optional_tensor(saved[3]),
        ctx->saved_data["act"].toStringRef(), ctx->saved_data["channel_dim"].toInt(),
        ctx->saved_data["straight_through"].toBool());
    result[0] = std::move(grad_grad_y);
    result[1] = std::move(grad_x);
    return result;
  }
};

// As the Python autograd kernel decides: a graph node whenever any tensor argument requires grad.
bool needs_graph(const at::Tensor& x, const at::Tensor& threshold,
                 const std::optional<at::Tensor>& center) {
  return at::GradMode::is_enabled() &&
         (x.requires_grad() || threshold.requires_grad() || (center && center->requires_grad()));
}

at::Tensor remap_act_autograd(const at::Tensor& x, const at::Tensor& threshold,
                              const std::optional<at::Tensor>& center, c10::string_view act,
                              int64_t channel_dim, bool straight_through) {
  if (!needs_graph(x, threshold, center)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return remap_act_op().call(x, threshold, center, act, channel_dim, straight_through);
  }
  return RemapActFunction::apply(x, threshold, center, act, channel_dim, straight_through);
}

StatsTuple remap_act_stats_autograd(const at::Tensor& x, const at::Tensor& threshold,
                                    const std::optional<at::Tensor>& center, c10::string_view act,
                                    int64_t channel_dim) {
  if (!needs_graph(x, threshold, center)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return remap_act_stats_op().call(x, threshold, center, act, channel_dim);
  }
  const variable_list out = RemapActStatsFunction::apply(x, threshold, center, act, channel_dim);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

at::Tensor remap_act_backward_autograd(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& threshold,
                                       const std::optional<at::Tensor>& center,
                                       c10::string_view act, int64_t channel_dim,
                                       bool straight_through) {
  if (!at::GradMode::is_enabled() || !(grad_y.requires_grad() || x.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return remap_act_backward_op().call(grad_y, x, threshold, center, act, channel_dim,
                                        straight_through);
  }
  return RemapActBackwardFunction::apply(grad_y, x, threshold, center, act, channel_dim,
                                         straight_through);
}

// What ATen's generated ADInplaceOrView kernels do for an in-place op: bump x's version counter, so
// that autograd refuses a backward that saved x before it was overwritten. An inference tensor
// has no version counter and may only be written inside inference mode (as torch.relu_ says);
// refused before anything is written.
void remap_act_inplace_or_view(const at::Tensor& x, const at::Tensor& threshold,
                               const std::optional<at::Tensor>& center, c10::string_view act,
                               int64_t channel_dim) {
  static const auto op = find_op<RemapActInplaceFn>("lipkern::remap_act_");
  TORCH_CHECK(!x.is_inference() || c10::InferenceMode::is_enabled(),
              "remap_act_: x is an inference tensor, which may be updated in place only inside "
              "torch.inference_mode(); clone it first to get a normal tensor");
  {
    at::AutoDispatchBelowADInplaceOrView below_inplace_or_view;
    op.call(x, threshold, center, act, channel_dim);
  }
  torch::autograd::increment_version(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(lipkern, AutogradCPU, m) {
  m.impl("remap_act", &remap_act_autograd);
  m.impl("remap_act_stats", &remap_act_stats_autograd);
  m.impl("remap_act_backward", &remap_act_backward_autograd);
}

TORCH_LIBRARY_IMPL(lipkern, ADInplaceOrView, m) {
  m.impl("remap_act_", &remap_act_inplace_or_view);
}

}  // namespace lipkern
