// Launcher of the CUDA kernels of bandadv::group_advantages (group_advantages_kernels.cuh):
// the launch plan, the scratch each launch needs and the launches on the given stream.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>

#include "group_advantages_kernels.cuh"
#include "launch.h"

namespace bandadv::cuda {
namespace {

template <int kVec, typename scalar_t, typename acc_t>
void launch(Params<scalar_t, acc_t>& p, const LaunchPlan& plan, const Inputs& in, cudaStream_t stream) {
  p.num_tiles = plan.num_tiles;
  TORCH_CHECK(p.num_tiles < (int64_t(1) << 31), "bandadv.group_advantages: too many groups for one launch (",
              in.num_groups, ")");
  // Scratch of this launch; freed into the caching allocator on this stream, so not reused
  // before the kernel has run.
  const ScratchLayout layout = scratch_layout(p);
  const at::Tensor scratch = at::empty({layout.size}, in.rewards.options().dtype(at::kLong));
  int64_t* words = scratch.data_ptr<int64_t>();
  C10_CUDA_CHECK(cudaMemsetAsync(words + layout.zeroed_from, 0,
                                 (layout.size - layout.zeroed_from) * sizeof(int64_t), stream));
  bind_scratch(p, words);
  const auto blocks = static_cast<unsigned>(p.num_tiles);
  if (plan.segments) {
    segment_kernel<kVec, scalar_t, acc_t><<<blocks, kSegmentBlock, 0, stream>>>(p, plan.width);
  } else {
    block_kernel<kVec, scalar_t, acc_t><<<blocks, plan.threads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_group_advantages(const Inputs& in, Outputs& out, at::Tensor& batch_std, bool moments_only,
                             cudaStream_t stream) {
  if (in.num_groups == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.rewards.scalar_type(), "group_advantages_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    Params<scalar_t, acc_t> p = make_params<scalar_t, acc_t>(in, out, batch_std, moments_only);
    const LaunchPlan plan =
        plan_launch<scalar_t>(in.num_groups, in.group_size, in.num_samples, in.rewards.data_ptr());
    if (plan.vec > 1) {
      launch<kWideLoad<scalar_t>>(p, plan, in, stream);
    } else {
      launch<1>(p, plan, in, stream);
    }
  });
}

}  // namespace bandadv::cuda
