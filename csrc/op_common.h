// Host-side glue of bandadv::group_advantages shared by the CPU and CUDA
// kernels: argument checks, dtype conversions and output allocation. Kept off
// torch/extension.h so that .cu files including it compile quickly.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "group_math.h"

namespace bandadv {

using at::Tensor;

// The op's outputs, in schema order.
using OpOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                             Tensor, Tensor, Tensor, Tensor, Tensor>;

struct Inputs {
  Tensor rewards;  // 1-D contiguous, floating
  Tensor offsets;  // int64 [G + 1], contiguous; undefined for fixed groups
  Tensor success;  // accumulation dtype, contiguous; undefined for the default
  Tensor valid;    // bool, contiguous; undefined when all valid
  Tensor prior;    // accumulation dtype [G], contiguous; undefined when absent
  int64_t num_samples = 0;
  int64_t num_groups = 0;
  int64_t group_size = 0;  // > 0 for fixed groups
  at::ScalarType acc_dtype = at::kFloat;
  Options options;
  bool return_index = false;
};

struct Outputs {
  Tensor advantages, sample_mask, reason, group_mask, count, successes, mean, std, pass_rate,
      success_var, reward_var, num_kept, kept_index;

  OpOutputs as_tuple() const {
    return {advantages, sample_mask, reason, group_mask, count,    successes, mean,
            std,        pass_rate,   success_var, reward_var, num_kept, kept_index};
  }
};

inline Estimator parse_estimator(std::string_view s) {
  if (s == "grpo") return Estimator::kGrpo;
  if (s == "dr_grpo") return Estimator::kDrGrpo;
  if (s == "rloo") return Estimator::kRloo;
  TORCH_CHECK_VALUE(false, "bandadv.group_advantages: estimator must be 'grpo', 'dr_grpo' or 'rloo', got '",
                    std::string(s), "'");
}

inline Scale parse_scale(std::string_view s) {
  if (s == "group") return Scale::kGroup;
  if (s == "batch") return Scale::kBatch;
  if (s == "none") return Scale::kNone;
  TORCH_CHECK_VALUE(false, "bandadv.group_advantages: scale must be 'group', 'batch' or 'none', got '",
                    std::string(s), "'");
}

inline Singleton parse_singleton(std::string_view s) {
  if (s == "zero") return Singleton::kZero;
  if (s == "raw") return Singleton::kRaw;
  TORCH_CHECK_VALUE(false, "bandadv.group_advantages: singleton must be 'zero' or 'raw', got '",
                    std::string(s), "'");
}

inline AccidentalAction parse_accidental_action(std::string_view s) {
  if (s == "mask") return AccidentalAction::kMask;
  if (s == "clip") return AccidentalAction::kClip;
  TORCH_CHECK_VALUE(false, "bandadv.group_advantages: accidental_action must be 'mask' or 'clip', got '",
                    std::string(s), "'");
}

inline void check_same_device(const Tensor& t, const Tensor& rewards, const char* name) {
  TORCH_CHECK_VALUE(t.device() == rewards.device(), "bandadv.group_advantages: ", name,
                    " is on ", t.device(), " but rewards is on ", rewards.device());
}

inline void check_per_sample(const Tensor& t, const Tensor& rewards, const char* name) {
  check_same_device(t, rewards, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rewards.size(0), "bandadv.group_advantages: ", name,
                    " must have shape [", rewards.size(0), "] like rewards, got ", t.sizes());
}

inline Inputs prepare_inputs(const Tensor& rewards_in, int64_t group_size, const std::optional<Tensor>& offsets,
                             const std::optional<Tensor>& success, const std::optional<Tensor>& valid,
                             const std::optional<Tensor>& prior, std::string_view estimator,
                             std::string_view scale, bool unbiased, double eps, std::string_view singleton,
                             bool mask_all_equal, std::optional<c10::ArrayRef<double>> band, bool band_inclusive,
                             std::optional<double> min_std, int64_t accidental_max_successes,
                             double accidental_prior_max, std::string_view accidental_action,
                             double accidental_clip, bool mask_too_few, bool return_index) {
  const char* op = "bandadv.group_advantages: ";
  Inputs in;
  TORCH_CHECK_VALUE(rewards_in.dim() == 1, op, "rewards must be 1-D [N], got shape ", rewards_in.sizes());
  TORCH_CHECK_VALUE(!rewards_in.is_complex(), op, "rewards must be real, got ", rewards_in.scalar_type());
  Tensor rewards = rewards_in.is_floating_point() ? rewards_in : rewards_in.to(at::kFloat);
  in.rewards = rewards.contiguous();
  in.num_samples = rewards.size(0);
  in.acc_dtype = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  const bool has_offsets = offsets.has_value() && offsets->defined();
  TORCH_CHECK_VALUE(group_size >= 0, op, "group_size must be >= 1, got ", group_size);
  TORCH_CHECK_VALUE(!(group_size > 0 && has_offsets), op,
                    "give exactly one group layout: group_size or offsets, not both");
  TORCH_CHECK_VALUE(group_size > 0 || has_offsets, op, "give a group layout: group_size >= 1 or offsets");
  if (group_size > 0) {
    TORCH_CHECK_VALUE(in.num_samples % group_size == 0, op, "rewards has ", in.num_samples,
                      " samples, which is not divisible by group_size=", group_size);
    in.group_size = group_size;
    in.num_groups = in.num_samples / group_size;
  } else {
    const Tensor& o = *offsets;
    check_same_device(o, rewards, "offsets");
    TORCH_CHECK_VALUE(!o.is_floating_point() && !o.is_complex() && o.scalar_type() != at::kBool, op,
                      "offsets must be an integer tensor, got ", o.scalar_type());
    TORCH_CHECK_VALUE(o.dim() == 1 && o.size(0) >= 1, op,
                      "offsets must be 1-D [num_groups + 1] with at least one entry, got shape ", o.sizes());
    in.offsets = o.to(at::kLong).contiguous();
    in.num_groups = o.size(0) - 1;
  }

  const auto acc = rewards.options().dtype(in.acc_dtype);
  if (success.has_value() && success->defined()) {
    check_per_sample(*success, rewards, "success");
    TORCH_CHECK_VALUE(!success->is_complex(), op, "success must be bool or real, got ", success->scalar_type());
    in.success = success->to(acc).contiguous();
  }
  if (valid.has_value() && valid->defined()) {
    check_per_sample(*valid, rewards, "valid");
    TORCH_CHECK_VALUE(valid->scalar_type() == at::kBool, op, "valid must be a bool tensor, got ",
                      valid->scalar_type());
    in.valid = valid->contiguous();
  }
  if (prior.has_value() && prior->defined()) {
    check_same_device(*prior, rewards, "prior");
    TORCH_CHECK_VALUE(prior->dim() == 1 && prior->size(0) == in.num_groups, op,
                      "prior must have shape [num_groups] = [", in.num_groups, "], got ", prior->sizes());
    TORCH_CHECK_VALUE(prior->is_floating_point(), op, "prior must be a floating tensor, got ",
                      prior->scalar_type());
    in.prior = prior->to(acc).contiguous();
  }

  Options& o = in.options;
  o.estimator = parse_estimator(estimator);
  o.scale = parse_scale(scale);
  TORCH_CHECK_VALUE(o.estimator == Estimator::kGrpo || o.scale == Scale::kNone, op,
                    "scale applies to estimator='grpo' only; estimator='", std::string(estimator),
                    "' needs scale='none', got '", std::string(scale), "'");
  o.unbiased = unbiased;
  TORCH_CHECK_VALUE(eps >= 0.0, op, "eps must be >= 0, got ", eps);
  o.eps = eps;
  o.singleton = parse_singleton(singleton);
  o.mask_all_equal = mask_all_equal;
  if (band.has_value()) {
    TORCH_CHECK_VALUE(band->size() == 2, op, "band must be (lo, hi), got ", band->size(), " values");
    const double lo = (*band)[0], hi = (*band)[1];
    TORCH_CHECK_VALUE(0.0 <= lo && lo <= hi && hi <= 1.0, op,
                      "band must satisfy 0 <= lo <= hi <= 1, got (", lo, ", ", hi, ")");
    o.use_band = true;
    o.band_lo = lo;
    o.band_hi = hi;
  }
  o.band_inclusive = band_inclusive;
  if (min_std.has_value()) {
    TORCH_CHECK_VALUE(*min_std >= 0.0, op, "min_std must be >= 0, got ", *min_std);
    o.use_min_std = true;
    o.min_std = *min_std;
  }
  TORCH_CHECK_VALUE(accidental_max_successes >= 0, op, "accidental_max_successes must be >= 0, got ",
                    accidental_max_successes);
  o.accidental_max_successes = accidental_max_successes;
  TORCH_CHECK_VALUE(0.0 <= accidental_prior_max && accidental_prior_max <= 1.0, op,
                    "accidental_prior_max must be in [0, 1], got ", accidental_prior_max);
  o.accidental_prior_max = accidental_prior_max;
  o.accidental_action = parse_accidental_action(accidental_action);
  TORCH_CHECK_VALUE(accidental_clip >= 0.0, op, "accidental_clip must be >= 0, got ", accidental_clip);
  o.accidental_clip = accidental_clip;
  o.mask_too_few = mask_too_few;
  in.return_index = return_index;
  return in;
}

// A fresh tensor; CPU ones straight from the CPU allocator, which skips a dispatcher round trip
// for each of the 13 outputs (a noticeable share of a small call).
inline Tensor empty_on(c10::IntArrayRef size, const c10::TensorOptions& options) {
  if (options.device().is_cpu()) return at::detail::empty_cpu(size, options);
  return at::empty(size, options);
}

inline Outputs allocate_outputs(const Inputs& in) {
  const auto dev = in.rewards.options();
  const auto acc = dev.dtype(in.acc_dtype);
  const int64_t n = in.num_samples, g = in.num_groups;
  Outputs out;
  out.advantages = empty_on({n}, acc);
  out.sample_mask = empty_on({n}, dev.dtype(at::kBool));
  out.reason = empty_on({g}, dev.dtype(at::kInt));
  out.group_mask = empty_on({g}, dev.dtype(at::kBool));
  out.count = empty_on({g}, dev.dtype(at::kInt));
  out.successes = empty_on({g}, acc);
  out.mean = empty_on({g}, acc);
  out.std = empty_on({g}, acc);
  out.pass_rate = empty_on({g}, acc);
  out.success_var = empty_on({g}, acc);
  out.reward_var = empty_on({g}, acc);
  out.num_kept = empty_on({}, dev.dtype(at::kLong));
  out.kept_index = empty_on({in.return_index ? n : 0}, dev.dtype(at::kLong));
  return out;
}

// The per-group outputs as the kernels write them (group_math.h).
template <typename acc_t>
GroupOutputs<acc_t> group_outputs(Outputs& out) {
  return {out.reason.data_ptr<int32_t>(),    out.group_mask.data_ptr<bool>(),  out.count.data_ptr<int32_t>(),
          out.successes.data_ptr<acc_t>(),   out.mean.data_ptr<acc_t>(),       out.std.data_ptr<acc_t>(),
          out.pass_rate.data_ptr<acc_t>(),   out.success_var.data_ptr<acc_t>(), out.reward_var.data_ptr<acc_t>()};
}

// The op's entry point for one dispatch key: checks and converts the arguments once, allocates
// the outputs, and hands both to Backend::run. Register as &group_advantages_entry<Backend>.
template <typename Backend>
OpOutputs group_advantages_entry(const Tensor& rewards, int64_t group_size, const std::optional<Tensor>& offsets,
                                 const std::optional<Tensor>& success, const std::optional<Tensor>& valid,
                                 const std::optional<Tensor>& prior, c10::string_view estimator,
                                 c10::string_view scale, bool unbiased, double eps, c10::string_view singleton,
                                 bool mask_all_equal, std::optional<c10::ArrayRef<double>> band,
                                 bool band_inclusive, std::optional<double> min_std, int64_t accidental_max_successes,
                                 double accidental_prior_max, c10::string_view accidental_action,
                                 double accidental_clip, bool mask_too_few, bool return_index) {
  const Inputs in = prepare_inputs(rewards, group_size, offsets, success, valid, prior, estimator, scale,
                                   unbiased, eps, singleton, mask_all_equal, band, band_inclusive, min_std,
                                   accidental_max_successes, accidental_prior_max, accidental_action,
                                   accidental_clip, mask_too_few, return_index);
  Outputs out = allocate_outputs(in);
  Backend::run(in, out);
  return out.as_tuple();
}

}  // namespace bandadv
