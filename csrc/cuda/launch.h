// Kernel launcher of the CUDA backend, called by group_advantages_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include "../op_common.h"

namespace bandadv::cuda {

// One launch over all groups (after a memset of its scratch), writing every output of `out`:
// kept_index too when in.return_index, whose entries past num_kept the caller has set to -1.
// With moments_only, the first of the two launches of scale="batch": writes only batch_std,
// the std of every valid reward of the batch, which the second reads. batch_std is acc dtype
// [1] on the device for scale="batch", undefined otherwise.
void launch_group_advantages(const Inputs& in, Outputs& out, at::Tensor& batch_std, bool moments_only,
                             cudaStream_t stream);

}  // namespace bandadv::cuda
