// Kernel launcher of the CUDA backend, called by group_advantages_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include "../op_common.h"

namespace bandadv::cuda {

// One launch over all groups (after a memset of its look-back state), writing every output
// of `out`: kept_index too when in.return_index, whose entries past num_kept the caller has set
// to -1. With moments_only, writes only count, mean and (into reward_var) the centred m2 of each
// group: the first of the two launches of scale="batch". batch_std (acc dtype [1], on the
// device) is read by the second of those and is undefined otherwise.
void launch_group_advantages(const Inputs& in, Outputs& out, const at::Tensor& batch_std, bool moments_only,
                             cudaStream_t stream);

}  // namespace bandadv::cuda
