// Host-side glue of bandadv::group_advantages shared by the CPU and CUDA kernels: the checked
// inputs, the outputs and their allocation. The op's entry point, which reads and checks the
// arguments, is op_entry.h. Kept off torch/extension.h so that .cu files including it compile
// quickly.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/Storage.h>
#include <c10/util/SmallVector.h>
#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <string>
#include <string_view>

#include "group_math.h"

namespace bandadv {

using at::Tensor;

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

// Rows of group_stats, [kNumStats, G] in the accumulation dtype: one contiguous row per
// floating statistic (bandadv.GroupStats reads them by these positions, types.STAT_NAMES).
enum StatRow : int64_t { kSuccesses, kMean, kStd, kPassRate, kSuccessVar, kRewardVar, kNumStats };

// The op's outputs, in the schema's order (op_entry.h checks the names against the schema).
constexpr std::array<std::string_view, 8> kOutputNames = {
    "advantages", "sample_mask", "reason", "group_mask", "count", "group_stats", "num_kept", "kept_index"};

struct Outputs {
  Tensor advantages, sample_mask, reason, group_mask, count, group_stats, num_kept, kept_index;
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

// A fresh tensor; CPU ones straight from the CPU allocator, which skips a dispatcher round trip
// for each output (a noticeable share of a small call).
inline Tensor empty_on(c10::IntArrayRef size, const c10::TensorOptions& options) {
  if (options.device().is_cpu()) return at::detail::empty_cpu(size, options);
  return at::empty(size, options);
}

// What each output (kOutputNames) must be: its shape and dtype for these inputs, on the rewards'
// device.
struct OutputSpec {
  c10::SmallVector<int64_t, 2> sizes;
  at::ScalarType dtype;
};

inline std::array<OutputSpec, kOutputNames.size()> output_specs(const Inputs& in) {
  const int64_t n = in.num_samples, g = in.num_groups;
  return {{{{n}, in.acc_dtype},
           {{n}, at::kBool},
           {{g}, at::kInt},
           {{g}, at::kBool},
           {{g}, at::kInt},
           {{kNumStats, g}, in.acc_dtype},
           {{}, at::kLong},
           {{in.return_index ? n : 0}, at::kLong}}};
}

// The outputs in kOutputNames order.
inline std::array<Tensor*, kOutputNames.size()> output_slots(Outputs& out) {
  return {&out.advantages, &out.sample_mask, &out.reason,      &out.group_mask,
          &out.count,      &out.group_stats, &out.num_kept,    &out.kept_index};
}

// The outputs of a small CPU call are carved from one allocation: each output still has its own
// storage (so they never alias, and each pickles and resizes on its own), whose memory is its
// slice of the block; the block is freed with the last of them. Allocating eight buffers was a
// fifth of the instructions of a call on one group of 8 (callgrind: 12.6k of 65k), and ~0.85 us
// of a 512 x 16 call (57 KB of outputs: 9.5 -> 8.65 us through bandadv._C's entry). Only for
// blocks up to 64 KB, so that an output kept for long keeps little else alive.
constexpr size_t kSharedBlockBytes = 65536;
constexpr size_t kOutputAlignment = 64;  // as the CPU allocator aligns each buffer

struct OutputBlock {
  std::atomic<int> users;
  c10::DataPtr memory;
};

inline void release_output_block(void* block) {
  auto* b = static_cast<OutputBlock*>(block);
  if (b->users.fetch_sub(1, std::memory_order_acq_rel) == 1) delete b;
}

inline Outputs allocate_outputs(const Inputs& in) {
  Outputs out;
  const auto specs = output_specs(in);
  const auto slots = output_slots(out);
  constexpr size_t kCount = kOutputNames.size();
  std::array<size_t, kCount> bytes{}, at{};
  size_t total = 0;
  for (size_t i = 0; i < kCount; ++i) {
    bytes[i] = c10::elementSize(specs[i].dtype);
    for (const int64_t s : specs[i].sizes) bytes[i] *= static_cast<size_t>(s);
    at[i] = total;
    total += (bytes[i] + kOutputAlignment - 1) / kOutputAlignment * kOutputAlignment;
  }
  if (!in.rewards.device().is_cpu() || total > kSharedBlockBytes) {
    for (size_t i = 0; i < kCount; ++i) {
      *slots[i] = empty_on(specs[i].sizes, in.rewards.options().dtype(specs[i].dtype));
    }
    return out;
  }
  c10::Allocator* allocator = c10::GetCPUAllocator();
  auto* block = new OutputBlock{{1}, allocator->allocate(total)};
  struct Use {  // this function's own use of the block, dropped however it returns
    OutputBlock* block;
    ~Use() { release_output_block(block); }
  } use{block};
  char* base = static_cast<char*>(block->memory.get());
  for (size_t i = 0; i < kCount; ++i) {
    if (bytes[i] == 0) {  // no memory, as torch.empty(0) has: a slice would share its address with the next
      *slots[i] = at::detail::empty_cpu(specs[i].sizes, in.rewards.options().dtype(specs[i].dtype));
      continue;
    }
    block->users.fetch_add(1, std::memory_order_relaxed);
    c10::DataPtr slice(base + at[i], block, &release_output_block, c10::Device(c10::kCPU));
    // Resizable through the CPU allocator, like a tensor from torch.empty.
    c10::Storage storage(c10::Storage::use_byte_size_t(), bytes[i], std::move(slice), allocator, true);
    Tensor t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                        c10::scalarTypeToTypeMeta(specs[i].dtype));
    t.unsafeGetTensorImpl()->set_sizes_contiguous(specs[i].sizes);
    *slots[i] = std::move(t);
  }
  return out;
}

// A dtype as Python prints it (torch.float32), so that messages read alike from every backend.
inline std::string dtype_name(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

// The caller's buffers (the op's out= form), checked against what allocate_outputs would make:
// written in place, so that a trainer reuses them from step to step.
inline void check_outputs(const Inputs& in, Outputs& out) {
  const auto specs = output_specs(in);
  const auto slots = output_slots(out);
  for (size_t i = 0; i < specs.size(); ++i) {
    const Tensor& t = *slots[i];
    const OutputSpec& spec = specs[i];
    TORCH_CHECK_VALUE(t.sizes() == c10::IntArrayRef(spec.sizes) && t.scalar_type() == spec.dtype &&
                          t.device() == in.rewards.device() && t.is_contiguous(),
                      "bandadv.group_advantages: out ", kOutputNames[i], " must be a contiguous ",
                      dtype_name(spec.dtype), " tensor of shape ", c10::IntArrayRef(spec.sizes), " on ",
                      in.rewards.device(), " (from a call with the same inputs' shapes), got ",
                      dtype_name(t.scalar_type()), " ", t.sizes(), " on ", t.device());
  }
}

// The per-group outputs as the kernels write them (group_math.h).
template <typename acc_t>
GroupOutputs<acc_t> group_outputs(Outputs& out) {
  const int64_t g = out.group_mask.size(0);
  acc_t* stats = out.group_stats.data_ptr<acc_t>();
  return {out.reason.data_ptr<int32_t>(), out.group_mask.data_ptr<bool>(), out.count.data_ptr<int32_t>(),
          stats + kSuccesses * g,         stats + kMean * g,               stats + kStd * g,
          stats + kPassRate * g,          stats + kSuccessVar * g,         stats + kRewardVar * g};
}

}  // namespace bandadv
