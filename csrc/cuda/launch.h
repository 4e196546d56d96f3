// Kernel launchers of the CUDA backend, called by group_advantages_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include "../op_common.h"

namespace bandadv::cuda {

// Per-group results the kernel writes besides the op's outputs.
struct Scratch {
  at::Tensor kept_count;  // int64 [G]: kept samples per group
  at::Tensor batch_std;   // acc dtype [1], read on the device; undefined unless scale == "batch"
};

// One launch over all groups. With moments_only, writes only count, mean and (into
// reward_var) the centred m2 of each group: the first of the two launches of scale="batch".
void launch_group_advantages(const Inputs& in, Outputs& out, const Scratch& scratch, bool moments_only,
                             cudaStream_t stream);

// Scatters each kept sample's index to first_slot[group] + its rank among the group's kept.
void launch_kept_index(const Inputs& in, const at::Tensor& sample_mask, const at::Tensor& first_slot,
                       at::Tensor& kept_index, cudaStream_t stream);

}  // namespace bandadv::cuda
