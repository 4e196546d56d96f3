// CUDA implementation of bandadv::group_advantages: checks, allocation, and the launches on the
// current stream. No host sync anywhere, so the op can be captured in a CUDA graph; offsets are
// trusted here (the Python wrapper checks their values unless validate=False).
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../op_common.h"
#include "launch.h"

namespace bandadv::cuda {
namespace {

// scale="batch": merges the per-group (n, mean, m2) of the first launch into the batch std,
// in float64 (Chan), on the device.
at::Tensor batch_std_from_moments(const Inputs& in, const Outputs& moments) {
  const at::Tensor n = moments.count.to(at::kDouble);
  const at::Tensor mean = moments.mean.to(at::kDouble);
  const at::Tensor total = n.sum();
  const at::Tensor batch_mean = (n * mean).sum() / total.clamp_min(1);
  const at::Tensor m2 = moments.reward_var.to(at::kDouble).sum() + (n * (mean - batch_mean).square()).sum();
  const double ddof = in.options.unbiased ? 1.0 : 0.0;
  const at::Tensor var = at::where(total >= 2, m2 / (total - ddof).clamp_min(1), at::zeros_like(m2));
  return var.sqrt().to(in.acc_dtype).reshape({1});
}

struct CudaBackend {
  static void run(const Inputs& in, Outputs& out) {
    const c10::cuda::CUDAGuard guard(in.rewards.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    Scratch scratch;
    // Every group's kept count is written by the main launch: no memset needed.
    scratch.kept_count = at::empty({in.num_groups}, in.rewards.options().dtype(at::kLong));
    if (in.options.scale == Scale::kBatch) {
      // The first launch leaves per-group moments in out's count, mean and reward_var; the
      // second, ordered after the merge on the same stream, overwrites them with the results.
      launch_group_advantages(in, out, scratch, /*moments_only=*/true, stream);
      scratch.batch_std = batch_std_from_moments(in, out);
    }
    launch_group_advantages(in, out, scratch, /*moments_only=*/false, stream);
    at::sum_out(out.num_kept, scratch.kept_count);
    if (in.return_index) {
      out.kept_index.fill_(-1);
      const at::Tensor first_slot = at::cumsum(scratch.kept_count, 0) - scratch.kept_count;
      launch_kept_index(in, out.sample_mask, first_slot, out.kept_index, stream);
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(bandadv, CUDA, m) { m.impl("group_advantages", &group_advantages_entry<CudaBackend>); }

}  // namespace bandadv::cuda
