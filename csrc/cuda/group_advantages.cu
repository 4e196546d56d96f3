// CUDA kernels of bandadv::group_advantages. Each group is read by a team of threads: a
// segment of a warp (width = next power of two >= G, so 512 groups of 16 are 256 warps with
// two groups each) or a whole block for larger groups, looping in team-sized chunks when a
// group is longer than the team. Every chunk is reduced two-pass in registers and Chan-merged
// (csrc/group_math.h); reductions are fixed butterflies, so results are bitwise reproducible.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>

#include "../group_math.h"
#include "launch.h"

namespace bandadv::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kSegmentBlock = 256;  // threads per block of the segment kernel

template <typename scalar_t, typename acc_t>
struct Params {
  const scalar_t* rewards;
  const acc_t* success;
  const bool* valid;
  const acc_t* prior;
  const int64_t* offsets;
  const acc_t* batch_std;
  int64_t num_groups;
  int64_t group_size;
  Options options;
  bool moments_only;
  acc_t* advantages;
  bool* sample_mask;
  GroupOutputs<acc_t> groups;
  int64_t* kept_count;
};

// First reduction of a chunk: valid count, successes, sum, and the extremes of valid rewards.
template <typename acc_t>
struct FirstSums {
  int32_t n;
  acc_t k, sum, lo, hi;
};

// Second reduction: sums of d and d^2 around the chunk's first mean estimate.
template <typename acc_t>
struct SecondSums {
  acc_t d, d2;
};

template <typename acc_t>
__device__ __forceinline__ FirstSums<acc_t> combine(const FirstSums<acc_t>& a, const FirstSums<acc_t>& b) {
  FirstSums<acc_t> out;
  out.n = a.n + b.n;
  out.k = a.k + b.k;
  out.sum = a.sum + b.sum;
  out.lo = a.n == 0 ? b.lo : (b.n == 0 ? a.lo : (a.lo < b.lo ? a.lo : b.lo));
  out.hi = a.n == 0 ? b.hi : (b.n == 0 ? a.hi : (a.hi > b.hi ? a.hi : b.hi));
  return out;
}

template <typename acc_t>
__device__ __forceinline__ SecondSums<acc_t> combine(const SecondSums<acc_t>& a, const SecondSums<acc_t>& b) {
  return {a.d + b.d, a.d2 + b.d2};
}

template <typename acc_t>
__device__ __forceinline__ FirstSums<acc_t> shuffle_xor(const FirstSums<acc_t>& v, int offset, int width) {
  return {__shfl_xor_sync(kFullMask, v.n, offset, width), __shfl_xor_sync(kFullMask, v.k, offset, width),
          __shfl_xor_sync(kFullMask, v.sum, offset, width), __shfl_xor_sync(kFullMask, v.lo, offset, width),
          __shfl_xor_sync(kFullMask, v.hi, offset, width)};
}

template <typename acc_t>
__device__ __forceinline__ SecondSums<acc_t> shuffle_xor(const SecondSums<acc_t>& v, int offset, int width) {
  return {__shfl_xor_sync(kFullMask, v.d, offset, width), __shfl_xor_sync(kFullMask, v.d2, offset, width)};
}

// Butterfly over `width` lanes: every lane ends with the same, identically rounded total
// (each pairwise sum has the same two operands on both lanes).
template <typename T>
__device__ __forceinline__ T butterfly(T v, int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) v = combine(v, shuffle_xor(v, offset, width));
  return v;
}

// `width` consecutive lanes of a warp own one group. Every lane of the warp must call
// reduce() the same number of times (the segment kernel makes trip counts warp-uniform).
struct Segment {
  int rank;
  int size;
  template <typename T>
  __device__ __forceinline__ T reduce(T v) const {
    return butterfly(v, size);
  }
};

// A whole block owns one group; blockDim.x is a multiple of 32, at most 1024.
struct Block {
  int rank;
  int size;
  unsigned char* shared;  // room for 32 partials
  template <typename T>
  __device__ __forceinline__ T reduce(T v) const {
    v = butterfly(v, 32);
    T* partial = reinterpret_cast<T*>(shared);
    if ((rank & 31) == 0) partial[rank >> 5] = v;
    __syncthreads();
    T total = partial[0];
    for (int w = 1; w < (size >> 5); ++w) total = combine(total, partial[w]);  // same order everywhere
    __syncthreads();
    return total;
  }
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t success_at(const Params<scalar_t, acc_t>& p, int64_t i, acc_t r) {
  return p.success ? p.success[i] : default_success(r);
}

template <typename scalar_t, typename acc_t, typename Team>
__device__ void process_group(const Params<scalar_t, acc_t>& p, int64_t g, bool active, int64_t begin,
                              int64_t size, int64_t trips, const Team& team) {
  Moments<acc_t> m;
  acc_t first_reward = 0;  // the first chunk stays in registers for the write sweep
  bool first_ok = false;
  for (int64_t t = 0; t < trips; ++t) {
    const int64_t j = t * team.size + team.rank;
    acc_t r = 0, s = 0;
    bool ok = false;
    if (j < size) {
      const int64_t i = begin + j;
      r = static_cast<acc_t>(p.rewards[i]);
      s = success_at(p, i, r);
      ok = sample_is_valid(r, p.valid ? p.valid[i] : true, s);
    }
    if (t == 0) {
      first_reward = r;
      first_ok = ok;
    }
    const FirstSums<acc_t> a = team.reduce(FirstSums<acc_t>{ok ? 1 : 0, ok ? s : acc_t(0), ok ? r : acc_t(0), r, r});
    const acc_t shift = a.n > 0 ? a.sum / acc_t(a.n) : acc_t(0);
    const acc_t d = ok ? r - shift : acc_t(0);
    const SecondSums<acc_t> b = team.reduce(SecondSums<acc_t>{d, d * d});
    Moments<acc_t> chunk;
    chunk.n = a.n;
    if (a.n > 0) {
      chunk.successes = a.k;
      chunk.lo = a.lo;
      chunk.hi = a.hi;
      set_two_pass(chunk, shift, b.d, b.d2);
    }
    m = merge_moments(m, chunk);
  }
  if (!active) return;

  if (p.moments_only) {
    if (team.rank == 0) {
      p.groups.count[g] = static_cast<int32_t>(m.n);
      p.groups.mean[g] = m.mean;
      p.groups.reward_var[g] = m.m2;
    }
    return;
  }
  const acc_t prior = p.prior ? p.prior[g] : acc_t(0);
  const acc_t batch_std = p.batch_std ? *p.batch_std : acc_t(0);
  const GroupResult<acc_t> res = finish_group(m, p.prior != nullptr, prior, batch_std, p.options);
  if (team.rank == 0) {
    p.groups.store(g, res);
    p.kept_count[g] = res.kept ? res.count : 0;
  }
  for (int64_t t = 0; t < trips; ++t) {
    const int64_t j = t * team.size + team.rank;
    if (j >= size) continue;
    const int64_t i = begin + j;
    acc_t r = first_reward;
    bool ok = first_ok;
    if (t > 0) {
      r = static_cast<acc_t>(p.rewards[i]);
      ok = sample_is_valid(r, p.valid ? p.valid[i] : true, success_at(p, i, r));
    }
    const bool keep = res.kept && ok;
    p.advantages[i] = keep ? sample_advantage(r, res) : acc_t(0);
    p.sample_mask[i] = keep;
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void group_extent(const Params<scalar_t, acc_t>& p, int64_t g, bool active,
                                             int64_t& begin, int64_t& size) {
  begin = 0;
  size = 0;
  if (!active) return;
  begin = p.offsets ? p.offsets[g] : g * p.group_size;
  size = (p.offsets ? p.offsets[g + 1] : begin + p.group_size) - begin;
}

template <typename scalar_t, typename acc_t>
__global__ void segment_kernel(const Params<scalar_t, acc_t> p, int width) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = thread / width;
  const bool active = g < p.num_groups;
  int64_t begin, size;
  group_extent(p, g, active, begin, size);
  // Segments of one warp may own groups of different lengths: all loop to the warp's longest.
  const unsigned trips = __reduce_max_sync(kFullMask, static_cast<unsigned>((size + width - 1) / width));
  process_group(p, g, active, begin, size, trips, Segment{static_cast<int>(threadIdx.x) % width, width});
}

template <typename scalar_t, typename acc_t>
__global__ void block_kernel(const Params<scalar_t, acc_t> p) {
  __shared__ alignas(16) unsigned char shared[32 * sizeof(FirstSums<acc_t>)];
  const int64_t g = blockIdx.x;
  int64_t begin, size;
  group_extent(p, g, true, begin, size);
  const int64_t trips = (size + blockDim.x - 1) / blockDim.x;
  process_group(p, g, true, begin, size, trips, Block{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), shared});
}

__global__ void kept_index_kernel(const bool* sample_mask, const int64_t* offsets, int64_t group_size,
                                  int64_t num_groups, const int64_t* first_slot, int64_t* kept_index) {
  const int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (g >= num_groups) return;  // uniform across the warp
  const int64_t begin = offsets ? offsets[g] : g * group_size;
  const int64_t end = offsets ? offsets[g + 1] : begin + group_size;
  int64_t slot = first_slot[g];
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t i = base + lane;
    const bool keep = i < end && sample_mask[i];
    const unsigned ballot = __ballot_sync(kFullMask, keep);
    if (keep) kept_index[slot + __popc(ballot & ((1u << lane) - 1u))] = i;
    slot += __popc(ballot);
  }
}

int next_power_of_two(int64_t x) {
  int p = 1;
  while (p < x && p < 1024) p <<= 1;
  return p;
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

void launch_group_advantages(const Inputs& in, Outputs& out, const Scratch& scratch, bool moments_only,
                             cudaStream_t stream) {
  const int64_t num_groups = in.num_groups;
  if (num_groups == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.rewards.scalar_type(), "group_advantages_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    Params<scalar_t, acc_t> p;
    p.rewards = in.rewards.data_ptr<scalar_t>();
    p.success = ptr_or_null<acc_t>(in.success);
    p.valid = ptr_or_null<bool>(in.valid);
    p.prior = ptr_or_null<acc_t>(in.prior);
    p.offsets = ptr_or_null<int64_t>(in.offsets);
    p.batch_std = ptr_or_null<acc_t>(scratch.batch_std);
    p.num_groups = num_groups;
    p.group_size = in.group_size;
    p.options = in.options;
    p.moments_only = moments_only;
    p.advantages = out.advantages.data_ptr<acc_t>();
    p.sample_mask = out.sample_mask.data_ptr<bool>();
    p.groups = group_outputs<acc_t>(out);
    p.kept_count = scratch.kept_count.data_ptr<int64_t>();

    // A typical group: the fixed size, or the mean size of ragged groups (known on the host).
    const int64_t typical = in.group_size > 0 ? in.group_size : in.num_samples / num_groups;
    if (typical <= 32) {
      const int width = in.group_size > 0 ? next_power_of_two(typical) : 32;
      const int64_t threads = num_groups * width;
      const int64_t blocks = (threads + kSegmentBlock - 1) / kSegmentBlock;
      segment_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kSegmentBlock, 0, stream>>>(p, width);
    } else {
      const int threads = std::max(64, next_power_of_two(typical));
      block_kernel<scalar_t, acc_t><<<static_cast<unsigned>(num_groups), threads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_kept_index(const Inputs& in, const at::Tensor& sample_mask, const at::Tensor& first_slot,
                       at::Tensor& kept_index, cudaStream_t stream) {
  if (in.num_groups == 0) return;
  constexpr int kThreads = 256;  // 8 warps, one group each
  const int64_t blocks = (in.num_groups * 32 + kThreads - 1) / kThreads;
  kept_index_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      sample_mask.data_ptr<bool>(), ptr_or_null<int64_t>(in.offsets), in.group_size, in.num_groups,
      first_slot.data_ptr<int64_t>(), kept_index.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace bandadv::cuda
