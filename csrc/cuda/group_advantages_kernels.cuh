// CUDA kernels of bandadv::group_advantages (device code; group_advantages.cu launches them).
// Each group is read by a team of threads: a segment of a warp (width = next power of two >= the
// lanes a group needs, so 512 groups of 16 floats are 128 warps of eight 4-lane segments) or a
// whole block for larger groups, looping in team-sized chunks when a group is longer than the
// team. A lane reads kVec consecutive samples per trip, as one vector load where the layout
// allows it (fixed groups whose size is a multiple of kVec, aligned rewards): wide coalesced
// loads, and kVec times fewer shuffles per sample in the reductions. Every chunk is reduced
// two-pass in registers and Chan-merged (csrc/group_math.h); reductions run in a fixed order, so
// results are bitwise reproducible.
//
// kept_index and num_kept come out of the same launch: the blocks' kept counts are scanned
// across blocks with a decoupled look-back (Merrill & Garland, "Single-pass Parallel Prefix
// Scan with Decoupled Look-back", NVIDIA NVR-2016-002), so there is no second kernel and no
// host sync. scale="batch" adds one launch before it, whose last block merges the moments of
// every group into the batch std.
#pragma once

#include <cstdint>

#include "../group_math.h"
#include "../op_common.h"

// Shared memory of a kernel, declared so that tests/cuda_emulator can give each emulated block
// its own copy.
#ifndef BANDADV_SHARED
#define BANDADV_SHARED(type, name) __shared__ type name
#endif
// A vector access; tests/cuda_emulator checks its alignment, which a GPU requires and a CPU
// does not.
// A check of a value that only the device reads (offsets): a device-side assert whose message
// names the argument, as torch's own index checks do (the error surfaces at the next
// synchronisation). tests/cuda_emulator turns it into an error of the op.
#ifndef BANDADV_DEVICE_CHECK
#define BANDADV_DEVICE_CHECK(cond, msg) CUDA_KERNEL_ASSERT_MSG(cond, msg)
#endif
#ifndef BANDADV_VECTOR
#define BANDADV_VECTOR(address, ...) (*reinterpret_cast<__VA_ARGS__*>(address))
#endif

// Included by one translation unit in each build: csrc/cuda/group_advantages.cu, and the CPU
// emulator that runs these kernels in the tests.
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
  acc_t* batch_std;  // scale="batch": written by the first launch, read by the second
  int64_t num_groups;
  int64_t group_size;
  int64_t num_samples;
  Options options;
  bool moments_only;
  acc_t* advantages;
  bool* sample_mask;
  GroupOutputs<acc_t> groups;
  int64_t* num_kept;
  int64_t* kept_index;             // null unless return_index
  unsigned long long* tile_state;  // [num_tiles] look-back words, then the tile counter; zeroed
  int64_t num_tiles;
  // moments_only: one (n, mean, m2) per tile, then a counter of finished tiles (zeroed).
  double* tile_moments;
  unsigned long long* tiles_done;
};

// kVec values moved as one access (a 16-, 8- or 4-byte load or store) where aligned.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// The samples one lane holds in one trip: rewards, success values and validity
// (sample_is_valid).
template <int kVec, typename acc_t>
struct LaneSamples {
  acc_t reward[kVec];
  acc_t success[kVec];
  bool ok[kVec];
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

// Inclusive prefix sum over the `width` lanes of each segment of a warp.
template <typename T>
__device__ __forceinline__ T inclusive_scan(T v, int rank, int width) {
  for (int offset = 1; offset < width; offset <<= 1) {
    const T before = __shfl_up_sync(kFullMask, v, offset, width);
    if (rank >= offset) v += before;
  }
  return v;
}

// `width` consecutive lanes of a warp own one group. Every lane of the warp must call reduce()
// and exclusive_scan() the same number of times (the segment kernel makes trip counts
// warp-uniform).
struct Segment {
  int rank;
  int size;
  template <typename T>
  __device__ __forceinline__ T reduce(T v) const {
    return butterfly(v, size);
  }
  // This lane's exclusive prefix of x over the segment, and the segment's total.
  __device__ __forceinline__ int exclusive_scan(int x, int& total) const {
    const int inclusive = inclusive_scan(x, rank, size);
    total = __shfl_sync(kFullMask, inclusive, size - 1, size);
    return inclusive - x;
  }
};

// Room for one partial of each warp of a block, of every type Block reduces or scans.
template <typename acc_t>
struct ReduceShared {
  FirstSums<acc_t> partial[32];
};

// A whole block owns one group; blockDim.x is a multiple of 32, at most 1024.
struct Block {
  int rank;
  int size;
  void* shared;  // a ReduceShared
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
  __device__ __forceinline__ int exclusive_scan(int x, int& total) const {
    const int inclusive = inclusive_scan(x, rank & 31, 32);
    int* warp_total = reinterpret_cast<int*>(shared);
    if ((rank & 31) == 31) warp_total[rank >> 5] = inclusive;
    __syncthreads();
    int before = 0;
    total = 0;
    for (int w = 0; w < (size >> 5); ++w) {
      before += w < (rank >> 5) ? warp_total[w] : 0;
      total += warp_total[w];
    }
    __syncthreads();
    return before + inclusive - x;
  }
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t success_at(const Params<scalar_t, acc_t>& p, int64_t i, acc_t r) {
  return p.success ? p.success[i] : default_success(r);
}

// Samples j0 .. j0 + kVec - 1 of the group starting at `begin`; those at or past `size` are
// invalid. kVec > 1 only for fixed groups with size % kVec == 0 and aligned rewards, so a lane's
// samples are either all in the group or all past it, and one aligned load reads them.
template <int kVec, typename scalar_t, typename acc_t>
__device__ __forceinline__ LaneSamples<kVec, acc_t> load_lane(const Params<scalar_t, acc_t>& p, int64_t begin,
                                                              int64_t j0, int64_t size) {
  LaneSamples<kVec, acc_t> x;
  const bool in = j0 < size;
  Pack<scalar_t, kVec> raw;
  if (in) raw = BANDADV_VECTOR(p.rewards + begin + j0, const Pack<scalar_t, kVec>);
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    x.reward[v] = acc_t(0);
    x.success[v] = acc_t(0);
    x.ok[v] = false;
    if (in) {
      const int64_t i = begin + j0 + v;
      x.reward[v] = static_cast<acc_t>(raw.v[v]);
      x.success[v] = success_at(p, i, x.reward[v]);
      x.ok[v] = sample_is_valid(x.reward[v], p.valid ? p.valid[i] : true, x.success[v]);
    }
  }
  return x;
}

// Moments of a group, read by `team` kVec samples per lane per trip. The lane's samples of the
// first trip are left in `first`, which is all of them for a group no longer than the team.
template <int kVec, typename scalar_t, typename acc_t, typename Team>
__device__ Moments<acc_t> group_moments(const Params<scalar_t, acc_t>& p, int64_t begin, int64_t size,
                                        int64_t trips, const Team& team, LaneSamples<kVec, acc_t>& first) {
  Moments<acc_t> m;
  for (int64_t t = 0; t < trips; ++t) {
    const int64_t j0 = (t * team.size + team.rank) * kVec;
    const LaneSamples<kVec, acc_t> x = load_lane<kVec>(p, begin, j0, size);
    if (t == 0) first = x;
    FirstSums<acc_t> a{0, acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const acc_t r = x.reward[v];
      const bool ok = x.ok[v];
      a = combine(a, FirstSums<acc_t>{ok ? 1 : 0, ok ? x.success[v] : acc_t(0), ok ? r : acc_t(0), r, r});
    }
    a = team.reduce(a);
    const acc_t shift = a.n > 0 ? a.sum / acc_t(a.n) : acc_t(0);
    SecondSums<acc_t> b{acc_t(0), acc_t(0)};
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const acc_t d = x.ok[v] ? x.reward[v] - shift : acc_t(0);
      b = combine(b, SecondSums<acc_t>{d, d * d});
    }
    b = team.reduce(b);
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
  return m;
}

// Advantages and mask of a group's samples and, when asked for, the indices of its kept samples
// from kept_index[slot] on, in ascending order.
template <int kVec, typename scalar_t, typename acc_t, typename Team>
__device__ void write_group(const Params<scalar_t, acc_t>& p, int64_t begin, int64_t size, int64_t trips,
                            const Team& team, const LaneSamples<kVec, acc_t>& first, const GroupResult<acc_t>& res,
                            int64_t slot) {
  for (int64_t t = 0; t < trips; ++t) {
    const int64_t j0 = (t * team.size + team.rank) * kVec;
    const LaneSamples<kVec, acc_t> x = t == 0 ? first : load_lane<kVec>(p, begin, j0, size);
    Pack<acc_t, kVec> advantage;
    Pack<bool, kVec> keep;
    int lane_kept = 0;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      keep.v[v] = res.kept && x.ok[v];
      advantage.v[v] = keep.v[v] ? sample_advantage(x.reward[v], res) : acc_t(0);
      lane_kept += keep.v[v] ? 1 : 0;
    }
    if (j0 < size) {
      BANDADV_VECTOR(p.advantages + begin + j0, Pack<acc_t, kVec>) = advantage;
      BANDADV_VECTOR(p.sample_mask + begin + j0, Pack<bool, kVec>) = keep;
    }
    if (p.kept_index) {  // uniform across the team
      int team_kept;
      int64_t at = slot + team.exclusive_scan(lane_kept, team_kept);
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        // Bounded: overlapping groups (bad offsets, which group_extent asserts on) could keep
        // more than N samples.
        if (keep.v[v] && at < p.num_samples) p.kept_index[at] = begin + j0 + v;
        at += keep.v[v] ? 1 : 0;
      }
      slot += team_kept;
    }
  }
}

// --- Decoupled look-back --------------------------------------------------------------------
// Each tile (the groups of one block) publishes one 64-bit word: a status in the top two bits
// and a count of kept samples below them, so that a single load sees both.
constexpr unsigned long long kAggregateReady = 1ull << 62;  // the tile's own count
constexpr unsigned long long kInclusiveReady = 2ull << 62;  // the count of this and every earlier tile
constexpr unsigned long long kCountBits = kAggregateReady - 1;

__device__ __forceinline__ unsigned long long load_state(const unsigned long long* word) {
  return *reinterpret_cast<const volatile unsigned long long*>(word);
}

__device__ __forceinline__ void store_state(unsigned long long* word, unsigned long long value) {
  atomicExch(word, value);
}

// Per-block shared state of the look-back.
struct TileShared {
  int64_t tile;
  int64_t kept[kSegmentBlock];  // kept samples of each group of the tile, then each one's first slot
};

// The block's tile, taken in the order blocks start rather than by blockIdx: every tile a block
// waits for in exclusive_prefix then belongs to a block that is already running, so every wait
// ends, whatever order the hardware schedules blocks in.
__device__ __forceinline__ int64_t acquire_tile(unsigned long long* counter, TileShared& sh) {
  if (threadIdx.x == 0) sh.tile = static_cast<int64_t>(atomicAdd(counter, 1ull));
  __syncthreads();
  return sh.tile;
}

// Publishes this tile's count and returns the count of all earlier tiles. Called by the 32
// lanes of warp 0, which read the states of 32 earlier tiles at a time (lane 0 the nearest)
// until one holds an inclusive count.
__device__ int64_t exclusive_prefix(unsigned long long* state, int64_t tile, int64_t aggregate) {
  const int lane = threadIdx.x & 31;
  const unsigned long long own = static_cast<unsigned long long>(aggregate);
  if (tile == 0) {
    if (lane == 0) store_state(state, kInclusiveReady | own);
    return 0;
  }
  if (lane == 0) store_state(state + tile, kAggregateReady | own);
  int64_t prefix = 0;
  for (int64_t window = tile;; window -= 32) {
    const int64_t t = window - 1 - lane;
    unsigned long long s = t >= 0 ? load_state(state + t) : kInclusiveReady;  // before tile 0: 0
    while (__any_sync(kFullMask, s < kAggregateReady)) {  // a tile of the window has not published yet
      if (s < kAggregateReady) s = load_state(state + t);
    }
    const unsigned inclusive = __ballot_sync(kFullMask, s >= kInclusiveReady);
    const int stop = inclusive ? __ffs(inclusive) - 1 : 31;  // the nearest inclusive count ends the walk
    int64_t count = lane <= stop ? static_cast<int64_t>(s & kCountBits) : 0;
    for (int offset = 16; offset > 0; offset >>= 1) count += __shfl_xor_sync(kFullMask, count, offset);
    prefix += count;
    if (inclusive) break;
  }
  if (lane == 0) store_state(state + tile, kInclusiveReady | static_cast<unsigned long long>(prefix + aggregate));
  return prefix;
}

// Turns sh.kept (each of the tile's `groups` kept counts, written by the group's team) into
// each group's first slot in kept_index: a scan within the tile by warp 0, and the look-back
// across tiles. The last tile writes num_kept. Every thread of the block calls it.
template <typename scalar_t, typename acc_t>
__device__ void tile_slots(const Params<scalar_t, acc_t>& p, int64_t tile, int groups, TileShared& sh) {
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int per_lane = (groups + 31) / 32;
    const int lo = min(groups, lane * per_lane), hi = min(groups, lo + per_lane);
    int64_t run = 0;
    for (int i = lo; i < hi; ++i) run += sh.kept[i];
    const int64_t inclusive = inclusive_scan(run, lane, 32);
    const int64_t aggregate = __shfl_sync(kFullMask, inclusive, 31);
    const int64_t prefix = exclusive_prefix(p.tile_state, tile, aggregate);
    int64_t at = prefix + inclusive - run;
    for (int i = lo; i < hi; ++i) {
      const int64_t k = sh.kept[i];
      sh.kept[i] = at;
      at += k;
    }
    if (lane == 0 && tile == p.num_tiles - 1) *p.num_kept = prefix + aggregate;
  }
  __syncthreads();
}

// --- Kernels --------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void group_extent(const Params<scalar_t, acc_t>& p, int64_t g, bool active,
                                             int64_t& begin, int64_t& size) {
  begin = 0;
  size = 0;
  if (!active) return;
  if (!p.offsets) {
    begin = g * p.group_size;
    size = p.group_size;
    return;
  }
  // Offsets are read on the device only (no host sync), so they are checked here: a group whose
  // bounds are out of order or outside [0, N] is read as empty whatever the assert does, so no
  // access ever leaves the tensors.
  const int64_t b = p.offsets[g], e = p.offsets[g + 1];
  const bool ok = 0 <= b && b <= e && e <= p.num_samples && (g > 0 || b == 0) &&
                  (g < p.num_groups - 1 || e == p.num_samples);
  BANDADV_DEVICE_CHECK(ok, "bandadv.group_advantages: offsets must start at 0, be non-decreasing and end at N");
  if (!ok) return;
  begin = b;
  size = e - b;
}

// --- scale="batch": the moments of every group merged, in the first launch ----------------
// Each block merges its groups' moments into one (n, mean, m2) per tile; the last block to
// finish merges those of all tiles. Every merge is a Chan merge in float64 in a fixed order
// (tiles split among a fixed number of threads, then a fixed tree), so the batch std does not
// depend on which block finishes last.
struct BatchShared {
  int64_t n[kSegmentBlock];
  double mean[kSegmentBlock];
  double m2[kSegmentBlock];
  bool last;
};

union KernelShared {
  TileShared tile;
  BatchShared batch;
};

__device__ __forceinline__ Moments<double> moments_at(int64_t n, double mean, double m2) {
  Moments<double> m;
  m.n = n;
  m.mean = mean;
  m.m2 = m2;
  return m;
}

// A group's moments, put in slot `local` of the tile by its team leader (n = 0 for a slot past
// the last group).
template <typename acc_t>
__device__ __forceinline__ void stash_moments(BatchShared& sh, int local, const Moments<acc_t>& m) {
  sh.n[local] = m.n;
  sh.mean[local] = static_cast<double>(m.mean);
  sh.m2[local] = static_cast<double>(m.m2);
}

// Every thread of the block calls it, after stash_moments for each of the tile's groups.
template <typename scalar_t, typename acc_t>
__device__ void merge_batch_moments(const Params<scalar_t, acc_t>& p, int64_t tile, int groups, BatchShared& sh) {
  __syncthreads();
  if (threadIdx.x == 0) {
    Moments<double> part;
    for (int i = 0; i < groups; ++i) part = merge_moments(part, moments_at(sh.n[i], sh.mean[i], sh.m2[i]));
    double* out = p.tile_moments + 3 * tile;
    out[0] = static_cast<double>(part.n);
    out[1] = part.mean;
    out[2] = part.m2;
    __threadfence();  // this tile's moments are visible before it counts as done
    sh.last = atomicAdd(p.tiles_done, 1ull) == static_cast<unsigned long long>(p.num_tiles - 1);
  }
  __syncthreads();
  if (!sh.last) return;
  __threadfence();
  // The last block: each of `threads` threads merges a run of tiles, then a tree merges the runs.
  const int threads = min(static_cast<int>(blockDim.x), kSegmentBlock);
  const int t = threadIdx.x;
  if (t < threads) {
    const int64_t per = (p.num_tiles + threads - 1) / threads;
    const int64_t lo = min(p.num_tiles, t * per), hi = min(p.num_tiles, lo + per);
    Moments<double> run;
    for (int64_t i = lo; i < hi; ++i) {
      const volatile double* m = p.tile_moments + 3 * i;  // written by other blocks: not from L1
      run = merge_moments(run, moments_at(static_cast<int64_t>(m[0]), m[1], m[2]));
    }
    sh.n[t] = run.n;
    sh.mean[t] = run.mean;
    sh.m2[t] = run.m2;
  }
  for (int stride = 1; stride < threads; stride <<= 1) {
    __syncthreads();
    if (t < threads && t % (2 * stride) == 0 && t + stride < threads) {
      const Moments<double> m = merge_moments(moments_at(sh.n[t], sh.mean[t], sh.m2[t]),
                                              moments_at(sh.n[t + stride], sh.mean[t + stride], sh.m2[t + stride]));
      sh.n[t] = m.n;
      sh.mean[t] = m.mean;
      sh.m2[t] = m.m2;
    }
  }
  if (t == 0) {
    const Moments<double> total = moments_at(sh.n[0], sh.mean[0], sh.m2[0]);
    *p.batch_std = static_cast<acc_t>(sqrt(variance_of(total, p.options.unbiased)));
  }
}

// The group's results, its statistics stored, and its kept count in sh.kept[local].
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ GroupResult<acc_t> finish(const Params<scalar_t, acc_t>& p, int64_t g, bool active,
                                                     const Moments<acc_t>& m, bool leader, int local,
                                                     TileShared& sh) {
  GroupResult<acc_t> res{};
  if (active) {
    const acc_t prior = p.prior ? p.prior[g] : acc_t(0);
    const acc_t batch_std = p.batch_std ? *p.batch_std : acc_t(0);
    res = finish_group(m, p.prior != nullptr, prior, batch_std, p.options);
  }
  if (leader) {
    if (active) p.groups.store(g, res);
    sh.kept[local] = res.kept ? res.count : 0;
  }
  return res;
}

template <int kVec, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSegmentBlock) segment_kernel(const Params<scalar_t, acc_t> p, int width) {
  BANDADV_SHARED(KernelShared, sh);
  const int64_t tile = p.moments_only ? blockIdx.x : acquire_tile(p.tile_state + p.num_tiles, sh.tile);
  const int groups = kSegmentBlock / width;
  const int local = threadIdx.x / width;
  const int64_t g = tile * groups + local;
  const bool active = g < p.num_groups;
  int64_t begin, size;
  group_extent(p, g, active, begin, size);
  const Segment team{static_cast<int>(threadIdx.x) % width, width};
  // Segments of one warp may own groups of different lengths: all loop to the warp's longest.
  const int64_t lanes = (size + kVec - 1) / kVec;
  const unsigned trips = __reduce_max_sync(kFullMask, static_cast<unsigned>((lanes + width - 1) / width));
  LaneSamples<kVec, acc_t> first;
  const Moments<acc_t> m = group_moments<kVec>(p, begin, size, trips, team, first);
  if (p.moments_only) {
    if (team.rank == 0) stash_moments(sh.batch, local, m);
    merge_batch_moments(p, tile, groups, sh.batch);
    return;
  }
  const GroupResult<acc_t> res = finish(p, g, active, m, team.rank == 0, local, sh.tile);
  tile_slots(p, tile, groups, sh.tile);
  write_group<kVec>(p, begin, size, trips, team, first, res, sh.tile.kept[local]);
}

// Up to 1024 threads per block: the bound keeps registers within what such a block may use.
template <int kVec, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(1024) block_kernel(const Params<scalar_t, acc_t> p) {
  BANDADV_SHARED(ReduceShared<acc_t>, reduce_shared);
  BANDADV_SHARED(KernelShared, sh);
  const int64_t g = p.moments_only ? blockIdx.x : acquire_tile(p.tile_state + p.num_tiles, sh.tile);
  int64_t begin, size;
  group_extent(p, g, true, begin, size);
  const int64_t lanes = (size + kVec - 1) / kVec;
  const int64_t trips = (lanes + blockDim.x - 1) / blockDim.x;
  const Block team{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), &reduce_shared};
  LaneSamples<kVec, acc_t> first;
  const Moments<acc_t> m = group_moments<kVec>(p, begin, size, trips, team, first);
  if (p.moments_only) {
    if (team.rank == 0) stash_moments(sh.batch, 0, m);
    merge_batch_moments(p, g, 1, sh.batch);
    return;
  }
  const GroupResult<acc_t> res = finish(p, g, true, m, team.rank == 0, 0, sh.tile);
  tile_slots(p, g, 1, sh.tile);
  write_group<kVec>(p, begin, size, trips, team, first, res, sh.tile.kept[0]);
}

// --- Launch plan (host) ----------------------------------------------------------------------

int next_power_of_two(int64_t x) {
  int p = 1;
  while (p < x && p < 1024) p <<= 1;
  return p;
}

// Samples per lane where they can be read as one aligned vector: 16 bytes, or 8 for 2-byte types.
template <typename scalar_t>
constexpr int kWideLoad = sizeof(scalar_t) >= 8 ? 2 : 4;

struct LaunchPlan {
  int vec;            // samples per lane: 1 or kWideLoad
  bool segments;      // segment_kernel, else block_kernel
  int width;          // lanes per group of segment_kernel
  int threads;        // threads per block
  int64_t num_tiles;  // blocks
};

// vec > 1 where every group starts aligned to a wide load: fixed groups whose size is a multiple
// of it, and aligned rewards. Teams: a segment of next_power_of_two(lanes) lanes (32 for ragged
// groups) where a typical group needs at most 32 lanes, else a block of up to 1024 threads.
template <typename scalar_t>
LaunchPlan plan_launch(int64_t num_groups, int64_t group_size, int64_t num_samples, const void* rewards) {
  constexpr int wide = kWideLoad<scalar_t>;
  const bool aligned = reinterpret_cast<uintptr_t>(rewards) % (wide * sizeof(scalar_t)) == 0;
  LaunchPlan plan;
  plan.vec = group_size > 0 && group_size % wide == 0 && aligned ? wide : 1;
  // A typical group: the fixed size, or the mean size of ragged groups (known on the host).
  const int64_t typical = group_size > 0 ? group_size : num_samples / num_groups;
  const int64_t lanes = (typical + plan.vec - 1) / plan.vec;
  plan.segments = lanes <= 32;
  plan.width = group_size > 0 ? next_power_of_two(lanes) : 32;
  plan.threads = plan.segments ? kSegmentBlock : (lanes <= 64 ? 64 : next_power_of_two(lanes));
  plan.num_tiles = plan.segments ? (num_groups * plan.width + kSegmentBlock - 1) / kSegmentBlock : num_groups;
  return plan;
}

// The scratch of one launch, in 8-byte words: moments_only, an (n, mean, m2) per tile and then
// the counter of finished tiles; otherwise a look-back word per tile and then the tile counter.
// Only the counters and look-back words must start zeroed: words [zeroed_from, size).
struct ScratchLayout {
  int64_t size;
  int64_t zeroed_from;
};

template <typename scalar_t, typename acc_t>
ScratchLayout scratch_layout(const Params<scalar_t, acc_t>& p) {
  if (p.moments_only) return {3 * p.num_tiles + 1, 3 * p.num_tiles};
  return {p.num_tiles + 1, 0};
}

// Points p's scratch at `words` (laid out as scratch_layout(p) says, 8-byte aligned).
template <typename scalar_t, typename acc_t>
void bind_scratch(Params<scalar_t, acc_t>& p, void* words) {
  if (p.moments_only) {
    p.tile_moments = static_cast<double*>(words);
    p.tiles_done = reinterpret_cast<unsigned long long*>(p.tile_moments + 3 * p.num_tiles);
  } else {
    p.tile_state = static_cast<unsigned long long*>(words);
  }
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The kernels' arguments, less the scratch and tile count that each launch sets.
template <typename scalar_t, typename acc_t>
Params<scalar_t, acc_t> make_params(const Inputs& in, Outputs& out, const at::Tensor& batch_std, bool moments_only) {
  Params<scalar_t, acc_t> p;
  p.rewards = in.rewards.data_ptr<scalar_t>();
  p.success = ptr_or_null<acc_t>(in.success);
  p.valid = ptr_or_null<bool>(in.valid);
  p.prior = ptr_or_null<acc_t>(in.prior);
  p.offsets = ptr_or_null<int64_t>(in.offsets);
  p.batch_std = ptr_or_null<acc_t>(batch_std);
  p.num_groups = in.num_groups;
  p.group_size = in.group_size;
  p.num_samples = in.num_samples;
  p.options = in.options;
  p.moments_only = moments_only;
  p.advantages = out.advantages.data_ptr<acc_t>();
  p.sample_mask = out.sample_mask.data_ptr<bool>();
  p.groups = group_outputs<acc_t>(out);
  p.num_kept = out.num_kept.data_ptr<int64_t>();
  p.kept_index = in.return_index ? out.kept_index.data_ptr<int64_t>() : nullptr;
  p.tile_state = nullptr;
  p.num_tiles = 0;
  p.tile_moments = nullptr;
  p.tiles_done = nullptr;
  return p;
}

}  // namespace
}  // namespace bandadv::cuda
