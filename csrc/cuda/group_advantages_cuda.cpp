// CUDA implementation of bandadv::group_advantages: checks, allocation, and the launches on the
// current stream: one kernel for scale="group" and "none"; for "batch", a first one before it
// that computes the batch std. Each kernel follows a memset of its scratch (and of kept_index to
// -1, when asked for). No host sync anywhere, so the op can be captured in a CUDA graph; the values
// of offsets are therefore checked by the kernels, on the device (group_extent).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../op_entry.h"
#include "launch.h"

namespace bandadv::cuda {
namespace {

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
      batch_std = at::empty({1}, in.rewards.options().dtype(in.acc_dtype));
      launch_group_advantages(in, out, batch_std, /*moments_only=*/true, stream);
    }
    launch_group_advantages(in, out, batch_std, /*moments_only=*/false, stream);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(bandadv, CUDA, m) { register_kernels<CudaBackend>(m); }

}  // namespace bandadv::cuda
