// CUDA implementation of bandadv::group_advantages: checks, allocation, and the launches on the
// current stream: one kernel for scale="group" and "none"; for "batch", a first kernel for the
// groups' moments and a few ATen ops that merge them before it. The kernel that writes the
// outputs follows a memset of its look-back state (and of kept_index to -1, when asked for). No
// host sync anywhere, so the op can be captured in a CUDA graph; offsets are trusted here (the
// Python wrapper checks their values unless validate=False).
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
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
    if (in.return_index && in.num_samples > 0) {
      // Every byte 0xff: -1 in each int64 entry past num_kept; the kernel writes the kept ones.
      C10_CUDA_CHECK(cudaMemsetAsync(out.kept_index.data_ptr(), 0xff, in.num_samples * sizeof(int64_t), stream));
    }
    if (in.num_groups == 0) {
      out.num_kept.zero_();
      return;
    }
    at::Tensor batch_std;
    if (in.options.scale == Scale::kBatch) {
      // The first launch leaves per-group moments in out's count, mean and reward_var; the
      // second, ordered after the merge on the same stream, overwrites them with the results.
      launch_group_advantages(in, out, batch_std, /*moments_only=*/true, stream);
      batch_std = batch_std_from_moments(in, out);
    }
    launch_group_advantages(in, out, batch_std, /*moments_only=*/false, stream);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(bandadv, CUDA, m) { m.impl("group_advantages", &group_advantages_entry<CudaBackend>); }

}  // namespace bandadv::cuda
