// The entry point of bandadv::group_advantages for one dispatch key: reads the arguments from the
// dispatcher's stack by name, checks and converts them once, allocates the outputs, runs the
// backend and pushes the outputs. The schema is written once, in python/bandadv/ops.py; this file
// looks each argument up there by name (and checks that the two agree on the names), so no
// argument's position is assumed here and a reordered schema can never feed one option's value
// to another. Host code only: included by the .cpp files that register kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <string_view>

#include "op_common.h"

namespace bandadv {

enum Arg : int {
  kRewards, kGroupSize, kOffsets, kSuccess, kValid, kPrior, kEstimator, kScale, kUnbiased, kEps,
  kSingleton, kMaskAllEqual, kBand, kBandInclusive, kMinStd, kAccidentalMaxSuccesses,
  kAccidentalPriorMax, kAccidentalAction, kAccidentalClip, kMaskTooFew, kReturnIndex, kNumArgs
};
constexpr std::array<std::string_view, kNumArgs> kArgNames = {
    "rewards", "group_size", "offsets", "success", "valid", "prior", "estimator", "scale", "unbiased", "eps",
    "singleton", "mask_all_equal", "band", "band_inclusive", "min_std", "accidental_max_successes",
    "accidental_prior_max", "accidental_action", "accidental_clip", "mask_too_few", "return_index"};
// The outputs are pushed in kOutputNames order (op_common.h); the schema must return them in this
// order, and the out= overload takes them, by these names, as keyword arguments.

// Where each argument sits in the registered schema, after checking that its arguments are
// exactly kArgNames (and, for the out= overload, the outputs), in any order, and its returns
// exactly kOutputNames (none for the out= overload).
struct ArgPositions {
  std::array<int, kNumArgs> at{};
  std::array<int, kOutputNames.size()> out_at{};  // the out= overload only

  ArgPositions(const c10::FunctionSchema& schema, bool out_form) {
    const auto& args = schema.arguments();
    const size_t expected = kNumArgs + (out_form ? kOutputNames.size() : 0);
    TORCH_CHECK(args.size() == expected, "bandadv: the schema of ", schema.name(), " has ", args.size(),
                " arguments, but the compiled kernel reads ", expected, "; rebuild bandadv");
    auto position = [&](std::string_view name) {
      const std::optional<int> i = schema.argumentIndexWithName(name);
      TORCH_CHECK(i.has_value(), "bandadv: the schema of ", schema.name(), " has no argument '", std::string(name),
                  "', which the compiled kernel reads; rebuild bandadv");
      return *i;
    };
    for (int a = 0; a < kNumArgs; ++a) at[a] = position(kArgNames[a]);
    if (out_form) {
      for (size_t o = 0; o < kOutputNames.size(); ++o) out_at[o] = position(kOutputNames[o]);
    }
    const auto& returns = schema.returns();
    const size_t returned = out_form ? 0 : kOutputNames.size();  // the out= form returns nothing
    TORCH_CHECK(returns.size() == returned, "bandadv: the schema of ", schema.name(), " returns ", returns.size(),
                " outputs, but the compiled kernel returns ", returned);
    for (size_t o = 0; o < returned; ++o) {
      TORCH_CHECK(returns[o].name() == kOutputNames[o], "bandadv: output ", o, " of ", schema.name(), " is '",
                  returns[o].name(), "', but the compiled kernel returns '", std::string(kOutputNames[o]),
                  "' there");
    }
  }
};

// The arguments of one call, read by name.
struct Args {
  const c10::IValue* base;
  const ArgPositions& positions;

  const c10::IValue& operator[](Arg a) const { return base[positions.at[a]]; }
  Tensor tensor_or_undefined(Arg a) const { return (*this)[a].isNone() ? Tensor() : (*this)[a].toTensor(); }
};

inline Inputs prepare_inputs(const Args& args) {
  const char* op = "bandadv.group_advantages: ";
  Inputs in;
  const Tensor& rewards_in = args[kRewards].toTensor();
  TORCH_CHECK_VALUE(rewards_in.dim() == 1, op, "rewards must be 1-D [N], got shape ", rewards_in.sizes());
  TORCH_CHECK_VALUE(!rewards_in.is_complex(), op, "rewards must be real, got ", rewards_in.scalar_type());
  const Tensor rewards = rewards_in.is_floating_point() ? rewards_in : rewards_in.to(at::kFloat);
  in.rewards = rewards.contiguous();
  in.num_samples = rewards.size(0);
  in.acc_dtype = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  const int64_t group_size = args[kGroupSize].toInt();
  const Tensor offsets = args.tensor_or_undefined(kOffsets);
  TORCH_CHECK_VALUE(group_size >= 0, op, "group_size must be >= 1, got ", group_size);
  TORCH_CHECK_VALUE(!(group_size > 0 && offsets.defined()), op,
                    "give exactly one group layout: group_size or offsets, not both");
  TORCH_CHECK_VALUE(group_size > 0 || offsets.defined(), op, "give a group layout: group_size >= 1 or offsets");
  if (group_size > 0) {
    TORCH_CHECK_VALUE(in.num_samples % group_size == 0, op, "rewards has ", in.num_samples,
                      " samples, which is not divisible by group_size=", group_size);
    in.group_size = group_size;
    in.num_groups = in.num_samples / group_size;
  } else {
    check_same_device(offsets, rewards, "offsets");
    TORCH_CHECK_VALUE(!offsets.is_floating_point() && !offsets.is_complex() && offsets.scalar_type() != at::kBool,
                      op, "offsets must be an integer tensor, got ", offsets.scalar_type());
    TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 1, op,
                      "offsets must be 1-D [num_groups + 1] with at least one entry, got shape ", offsets.sizes());
    in.offsets = offsets.to(at::kLong).contiguous();
    in.num_groups = offsets.size(0) - 1;
  }

  const auto acc = rewards.options().dtype(in.acc_dtype);
  if (const Tensor success = args.tensor_or_undefined(kSuccess); success.defined()) {
    check_per_sample(success, rewards, "success");
    TORCH_CHECK_VALUE(!success.is_complex(), op, "success must be bool or real, got ", success.scalar_type());
    in.success = success.to(acc).contiguous();
  }
  if (const Tensor valid = args.tensor_or_undefined(kValid); valid.defined()) {
    check_per_sample(valid, rewards, "valid");
    TORCH_CHECK_VALUE(valid.scalar_type() == at::kBool, op, "valid must be a bool tensor, got ", valid.scalar_type());
    in.valid = valid.contiguous();
  }
  if (const Tensor prior = args.tensor_or_undefined(kPrior); prior.defined()) {
    check_same_device(prior, rewards, "prior");
    TORCH_CHECK_VALUE(prior.dim() == 1 && prior.size(0) == in.num_groups, op,
                      "prior must have shape [num_groups] = [", in.num_groups, "], got ", prior.sizes());
    TORCH_CHECK_VALUE(prior.is_floating_point(), op, "prior must be a floating tensor, got ", prior.scalar_type());
    in.prior = prior.to(acc).contiguous();
  }

  Options& o = in.options;
  o.estimator = parse_estimator(args[kEstimator].toStringView());
  o.scale = parse_scale(args[kScale].toStringView());
  TORCH_CHECK_VALUE(o.estimator == Estimator::kGrpo || o.scale == Scale::kNone, op,
                    "scale applies to estimator='grpo' only; estimator='", args[kEstimator].toStringRef(),
                    "' needs scale='none', got '", args[kScale].toStringRef(), "'");
  o.unbiased = args[kUnbiased].toBool();
  o.eps = args[kEps].toDouble();
  TORCH_CHECK_VALUE(o.eps >= 0.0, op, "eps must be >= 0, got ", o.eps);
  o.singleton = parse_singleton(args[kSingleton].toStringView());
  o.mask_all_equal = args[kMaskAllEqual].toBool();
  if (!args[kBand].isNone()) {
    const c10::List<double> band = args[kBand].toDoubleList();
    TORCH_CHECK_VALUE(band.size() == 2, op, "band must be (lo, hi), got ", band.size(), " values");
    const double lo = band[0], hi = band[1];
    TORCH_CHECK_VALUE(0.0 <= lo && lo <= hi && hi <= 1.0, op, "band must satisfy 0 <= lo <= hi <= 1, got (", lo,
                      ", ", hi, ")");
    o.use_band = true;
    o.band_lo = lo;
    o.band_hi = hi;
  }
  o.band_inclusive = args[kBandInclusive].toBool();
  if (!args[kMinStd].isNone()) {
    o.min_std = args[kMinStd].toDouble();
    TORCH_CHECK_VALUE(o.min_std >= 0.0, op, "min_std must be >= 0, got ", o.min_std);
    o.use_min_std = true;
  }
  o.accidental_max_successes = args[kAccidentalMaxSuccesses].toInt();
  TORCH_CHECK_VALUE(o.accidental_max_successes >= 0, op, "accidental_max_successes must be >= 0, got ",
                    o.accidental_max_successes);
  o.accidental_prior_max = args[kAccidentalPriorMax].toDouble();
  TORCH_CHECK_VALUE(0.0 <= o.accidental_prior_max && o.accidental_prior_max <= 1.0, op,
                    "accidental_prior_max must be in [0, 1], got ", o.accidental_prior_max);
  o.accidental_action = parse_accidental_action(args[kAccidentalAction].toStringView());
  o.accidental_clip = args[kAccidentalClip].toDouble();
  TORCH_CHECK_VALUE(o.accidental_clip >= 0.0, op, "accidental_clip must be >= 0, got ", o.accidental_clip);
  o.mask_too_few = args[kMaskTooFew].toBool();
  in.return_index = args[kReturnIndex].toBool();
  return in;
}

inline void push_outputs(torch::jit::Stack& stack, Outputs& out) {
  for (Tensor* t : output_slots(out)) torch::jit::push(stack, std::move(*t));
}

// Boxed kernels: the dispatcher hands them the stack that Python (or a C++ caller, boxed by the
// dispatcher) filled. Register as torch::CppFunction::makeFromBoxedFunction<&entry<Backend>>().
template <typename Backend>
void group_advantages_entry(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  static const ArgPositions positions(op.schema(), /*out_form=*/false);  // one schema per registration
  const Inputs in = prepare_inputs(Args{stack->data() + stack->size() - kNumArgs, positions});
  Outputs out = allocate_outputs(in);
  Backend::run(in, out);
  torch::jit::drop(*stack, kNumArgs);
  push_outputs(*stack, out);
}

// group_advantages.out: the same, written into the caller's outputs; returns nothing.
template <typename Backend>
void group_advantages_out_entry(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  static const ArgPositions positions(op.schema(), /*out_form=*/true);
  constexpr size_t kCount = kNumArgs + kOutputNames.size();
  const Args args{stack->data() + stack->size() - kCount, positions};
  const Inputs in = prepare_inputs(args);
  Outputs out;
  const auto slots = output_slots(out);
  for (size_t o = 0; o < kOutputNames.size(); ++o) *slots[o] = args.base[positions.out_at[o]].toTensor();
  check_outputs(in, out);
  Backend::run(in, out);
  torch::jit::drop(*stack, kCount);
}

// The two overloads of the op for one dispatch key.
template <typename Backend>
void register_kernels(torch::Library& m) {
  m.impl("group_advantages", torch::CppFunction::makeFromBoxedFunction<&group_advantages_entry<Backend>>());
  m.impl("group_advantages.out", torch::CppFunction::makeFromBoxedFunction<&group_advantages_out_entry<Backend>>());
}

}  // namespace bandadv
