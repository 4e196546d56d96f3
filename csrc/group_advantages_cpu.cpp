// CPU kernel of bandadv::group_advantages: parallel over groups, which are staged in tiles
// and swept with explicit SIMD (SSE2, or AVX2 where the CPU has it) while their moments,
// reasons and advantages are made. The schema lives in python/bandadv/ops.py; this file
// registers the CPU implementation (python_entry.cpp is the module that loads it).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__SSE2__) && defined(__x86_64__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string_view>
#include <type_traits>
#include <vector>

#include "group_math.h"
#include "op_entry.h"

namespace bandadv {
namespace {

// Groups are read in chunks of this many samples into a local buffer, each chunk reduced
// two-pass (mean, then centred squares) and the chunks Chan-merged: the same shape of
// computation the GPU kernels use, so the merge is exercised on the CPU too.
constexpr int64_t kChunk = 1024;
// Groups of at most kChunk samples are handled in tiles of up to kTile groups and kStage staged
// samples: moments of every group of the tile, then the per-group math of all of them (so that
// the divisions and square roots of different groups overlap), then their advantages.
constexpr int64_t kTile = 64;
constexpr int64_t kStage = 4096;
static_assert(kChunk <= kStage);
// Samples per parallel task, at least: PyTorch's own grain (at::internal::GRAIN_SIZE). A task
// is ~50 us of work here; smaller ones gain nothing on an idle machine and, on a busy one, make
// every call wait at the OpenMP barrier for a descheduled thread (measured on the 2-core CI VM
// beside two busy processes, 512x16 per call: 12 ms median with 2048-sample tasks on 2 threads,
// 24 us on one). Each group's results depend on that group alone, so how the groups are split
// among threads never changes a result.
constexpr int64_t kGrainSamples = 32768;
constexpr int64_t kPrefetchBytes = 2048;
// Advantages larger than this (a quarter of this VM's L3) are written, with the sample mask,
// past the caches: writes that would only evict the rewards still to be read, and whose lines
// would first be read for ownership. 1M x 16 with out=: 10.8 -> 8.3 ms on two threads.
constexpr int64_t kStreamBytes = int64_t(8) << 20;
// Rewards larger than this (this VM's L2) are fetched a tile ahead in uniform tiles, a group at a
// time: the hardware prefetcher alone left each tile's first sweep waiting on memory (a third of
// the kernel's samples at 1M groups of 16, in perf), and a whole tile fetched at once stalled on
// full miss buffers. Smaller batches are left to the hardware: the prefetches cost ~3% there.
constexpr int64_t kFetchAheadBytes = int64_t(1) << 20;

// Explicit SIMD through the GCC/Clang vector extensions, kBytes wide: 16 (SSE2, the x86-64
// baseline the wheel targets) or, on CPUs that have it, 32 (AVX2; see kernel_range_avx2).
// Written out because the compiler would not if-convert the NaN tests on its own, which left
// the sweeps scalar and branchy. Sums are kept per lane and the lanes added in a fixed order
// at the end, so results are reproducible on a machine (the lane count, and so the last bits
// of a sum, can differ between CPUs with and without AVX2).
template <typename acc_t, int kBytes>
struct Simd {
  static constexpr int kWidth = kBytes / sizeof(acc_t);
  using lane_int = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  typedef acc_t V __attribute__((vector_size(kBytes)));
  typedef lane_int M __attribute__((vector_size(kBytes)));  // lanes of all ones (true) or zeros

  static C10_ALWAYS_INLINE V load(const acc_t* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
  }
  static C10_ALWAYS_INLINE void store(acc_t* p, V v) { __builtin_memcpy(p, &v, sizeof v); }
  static C10_ALWAYS_INLINE V splat(acc_t x) { return V{} + x; }
  static C10_ALWAYS_INLINE M splat_lanes(lane_int x) { return M{} + x; }
  // The lanes of m as bits, lane i as bit i.
  static C10_ALWAYS_INLINE int bits(M m) {
    int out = 0;
#if defined(__SSE2__) && defined(__x86_64__)
    if constexpr (sizeof(acc_t) == 4) {
      __m128 part[kBytes / 16];
      __builtin_memcpy(part, &m, sizeof m);
      for (int i = 0; i < kBytes / 16; ++i) out |= _mm_movemask_ps(part[i]) << (4 * i);
    } else {
      __m128d part[kBytes / 16];
      __builtin_memcpy(part, &m, sizeof m);
      for (int i = 0; i < kBytes / 16; ++i) out |= _mm_movemask_pd(part[i]) << (2 * i);
    }
#else
    for (int i = 0; i < kWidth; ++i) out |= int(m[i] != 0) << i;
#endif
    return out;
  }
  // A store that bypasses the caches (p 16-byte aligned), for outputs far larger than them.
  static C10_ALWAYS_INLINE void stream(acc_t* p, V v) {
#if defined(__SSE2__) && defined(__x86_64__)
    if constexpr (sizeof(acc_t) == 4) {
      __m128 part[kBytes / 16];
      __builtin_memcpy(part, &v, sizeof v);
      for (int i = 0; i < kBytes / 16; ++i) _mm_stream_ps(p + 4 * i, part[i]);
      return;
    } else {
      __m128d part[kBytes / 16];
      __builtin_memcpy(part, &v, sizeof v);
      for (int i = 0; i < kBytes / 16; ++i) _mm_stream_pd(p + 2 * i, part[i]);
      return;
    }
#endif
    store(p, v);
  }
  // Writes the lanes of m as bools (bytes of 0 or 1); float lanes are packed with SSE2, where
  // the compiler would otherwise move them out one by one.
  template <bool kStream = false>
  static C10_ALWAYS_INLINE void store_mask(bool* p, M m) {
#if defined(__SSE2__) && defined(__x86_64__)
    if constexpr (sizeof(acc_t) == 4) {
      __m128i half[kBytes / 16];
      __builtin_memcpy(half, &m, sizeof m);
      if constexpr (kBytes == 16) {
        const __m128i words = _mm_packs_epi32(half[0], half[0]);
        const int32_t bytes = _mm_cvtsi128_si32(_mm_packs_epi16(words, words)) & 0x01010101;
        __builtin_memcpy(p, &bytes, sizeof bytes);
        return;
      } else if constexpr (kBytes == 32) {
        const __m128i words = _mm_packs_epi32(half[0], half[1]);
        const int64_t bytes = _mm_cvtsi128_si64(_mm_packs_epi16(words, words)) & 0x0101010101010101LL;
        if constexpr (kStream) {
          _mm_stream_si64(reinterpret_cast<long long*>(p), bytes);
        } else {
          __builtin_memcpy(p, &bytes, sizeof bytes);
        }
        return;
      }
    }
#endif
    for (int i = 0; i < kWidth; ++i) p[i] = m[i] != 0;
  }
  // kWidth bytes of `value` (0 or 1): the mask of kWidth samples that are all valid.
  template <bool kStream = false>
  static C10_ALWAYS_INLINE void store_mask(bool* p, bool value) {
    if constexpr (kWidth == 8) {
      const int64_t bytes = value ? 0x0101010101010101LL : 0;
#if defined(__SSE2__) && defined(__x86_64__)
      if constexpr (kStream) {
        _mm_stream_si64(reinterpret_cast<long long*>(p), bytes);
        return;
      }
#endif
      __builtin_memcpy(p, &bytes, sizeof bytes);
    } else if constexpr (kWidth == 4) {
      const int32_t bytes = value ? 0x01010101 : 0;
#if defined(__SSE2__) && defined(__x86_64__)
      if constexpr (kStream) {
        _mm_stream_si32(reinterpret_cast<int*>(p), bytes);
        return;
      }
#endif
      __builtin_memcpy(p, &bytes, sizeof bytes);
    } else {
      for (int i = 0; i < kWidth; ++i) p[i] = value;
    }
  }
  // True when no lane of m is set.
  static C10_ALWAYS_INLINE bool none(M m) {
#if defined(__SSE2__) && defined(__x86_64__)
    __m128i half[kBytes / 16];
    __builtin_memcpy(half, &m, sizeof m);
    __m128i any = half[0];
    for (int i = 1; i < kBytes / 16; ++i) any = _mm_or_si128(any, half[i]);
    return _mm_movemask_epi8(any) == 0;
#else
    bool none = true;
    for (int i = 0; i < kWidth; ++i) none &= m[i] == 0;
    return none;
#endif
  }
  static C10_ALWAYS_INLINE V select(M m, V a, V b) { return (V)(((M)a & m) | ((M)b & ~m)); }
  static C10_ALWAYS_INLINE V keep(M m, V a) { return (V)((M)a & m); }  // a where m, else +0
  // sum() of each of v[0..8), made for the eight at once where that is cheaper (8 float lanes:
  // 21 shuffles and adds in all, against 6 for each sum), with the same adds in the same order.
  static constexpr bool kBatchedSum = kWidth == 8 && sizeof(acc_t) == 4;
  static C10_ALWAYS_INLINE void sum8(const V* v, acc_t* out) {
    if constexpr (kBatchedSum) {
      // t[i] + t[i + 4] of v[g] and v[g + 4], side by side
      V a[4];
      for (int g = 0; g < 4; ++g) {
        a[g] = __builtin_shufflevector(v[g], v[g + 4], 0, 1, 2, 3, 8, 9, 10, 11) +
               __builtin_shufflevector(v[g], v[g + 4], 4, 5, 6, 7, 12, 13, 14, 15);
      }
      // ... + t[i + 2], for vectors (0, 1 | 4, 5) and (2, 3 | 6, 7) ...
      const V b01 = __builtin_shufflevector(a[0], a[1], 0, 1, 8, 9, 4, 5, 12, 13) +
                    __builtin_shufflevector(a[0], a[1], 2, 3, 10, 11, 6, 7, 14, 15);
      const V b23 = __builtin_shufflevector(a[2], a[3], 0, 1, 8, 9, 4, 5, 12, 13) +
                    __builtin_shufflevector(a[2], a[3], 2, 3, 10, 11, 6, 7, 14, 15);
      // ... + t[i + 1]: lane g holds sum(v[g])
      store(out, __builtin_shufflevector(b01, b23, 0, 2, 8, 10, 4, 6, 12, 14) +
                     __builtin_shufflevector(b01, b23, 1, 3, 9, 11, 5, 7, 13, 15));
    } else {
      for (int g = 0; g < 8; ++g) out[g] = sum(v[g]);
    }
  }
  // The lanes in a fixed order: one after another up to 4 lanes, pairwise (halves, then
  // quarters, ...) for 8, where the chain of 7 adds showed in profiles.
  static C10_ALWAYS_INLINE acc_t sum(V v) {
#if defined(__SSE2__) && defined(__x86_64__)
    if constexpr (kWidth == 8 && sizeof(acc_t) == 4) {  // the same tree in three SSE adds
      __m128 half[2];
      __builtin_memcpy(half, &v, sizeof v);
      __m128 s = _mm_add_ps(half[0], half[1]);  // t[i] + t[i + 4]
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));   // t[i] + t[i + 2]
      s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
      return _mm_cvtss_f32(s);
    }
#endif
    if constexpr (kWidth >= 8) {
      acc_t t[kWidth];
      __builtin_memcpy(t, &v, sizeof v);
      for (int half = kWidth / 2; half >= 1; half /= 2)
        for (int i = 0; i < half; ++i) t[i] += t[i + half];
      return t[0];
    } else {
      acc_t t = v[0];
      for (int i = 1; i < kWidth; ++i) t += v[i];
      return t;
    }
  }
};

// Staging buffers of one parallel task: a tile of short groups, packed and each padded to whole
// vectors, or one chunk of a long group.
template <typename acc_t>
struct Stage {
  alignas(64) acc_t reward[kStage];   // staged rewards (NaN where unflagged), then 0 where invalid
  alignas(64) acc_t success[kStage];  // staged success values, when given
  alignas(64) acc_t ok[kStage];       // 1 or 0
};

// This thread's stage, allocated on first use and kept: a call on a small batch then pays no
// allocation. Kernels never nest, so one stage per thread and type suffices.
template <typename acc_t>
Stage<acc_t>& thread_stage() {
  thread_local std::unique_ptr<Stage<acc_t>> stage;
  if (!stage) stage.reset(new Stage<acc_t>);  // left uninitialised: every read follows a write
  return *stage;
}

// Count, sums and range of one chunk's valid samples, from its load.
template <typename acc_t>
struct ChunkSums {
  acc_t n, sum, successes, lo, hi;
};

// One parallel task of a CpuGroupKernel K (its `range`) compiled for AVX2 (32-byte vectors),
// called only where the CPU has it. flatten
// inlines the whole kernel here, so no AVX2 code exists outside this function: an out-of-line
// copy of anything it calls is compiled for the baseline.
template <typename K, typename acc_t>
#if defined(__x86_64__)
__attribute__((target("avx2,fma"), flatten))
#endif
int64_t kernel_range_avx2(const K& k, int64_t lo, int64_t hi, const Moments<acc_t>* pre, acc_t batch_std,
                          Moments<acc_t>* moments_out, int64_t* kept) {
  return k.range(lo, hi, pre, batch_std, moments_out, kept);
}

template <typename scalar_t, typename acc_t, bool kHasSuccess, bool kHasValid, int kBytes>
struct CpuGroupKernel {
  using S = Simd<acc_t, kBytes>;
  using V = typename S::V;
  using M = typename S::M;
  static constexpr int kW = S::kWidth;
  static_assert(kChunk % kW == 0 && kStage % kW == 0);

  const scalar_t* rewards;
  const acc_t* success;
  const bool* valid;
  const acc_t* prior;
  const int64_t* offsets;
  int64_t group_size;
  int64_t num_groups;
  int64_t num_samples;
  const Options& options;
  acc_t* advantages;
  bool* sample_mask;
  GroupOutputs<acc_t> groups;
  bool stream;   // outputs far larger than the caches: advantages and masks bypass them
  bool uniform;  // groups of one size that is whole vectors (uniform_tile)
  bool fetch_ahead;  // rewards larger than the caches keep: fetched a tile ahead (uniform_tile)

  CpuGroupKernel(const Inputs& in, Outputs& out)
      : rewards(in.rewards.data_ptr<scalar_t>()),
        success(in.success.defined() ? in.success.data_ptr<acc_t>() : nullptr),
        valid(in.valid.defined() ? in.valid.data_ptr<bool>() : nullptr),
        prior(in.prior.defined() ? in.prior.data_ptr<acc_t>() : nullptr),
        offsets(in.offsets.defined() ? in.offsets.data_ptr<int64_t>() : nullptr),
        group_size(in.group_size),
        num_groups(in.num_groups),
        num_samples(in.num_samples),
        options(in.options),
        advantages(out.advantages.data_ptr<acc_t>()),
        sample_mask(out.sample_mask.data_ptr<bool>()),
        groups(group_outputs<acc_t>(out)),
        stream(in.num_samples * int64_t(sizeof(acc_t)) > kStreamBytes),
        uniform(!in.offsets.defined() && in.group_size % kW == 0 && in.group_size <= kChunk),
        fetch_ahead(in.num_samples * int64_t(sizeof(scalar_t)) > kFetchAheadBytes) {}

  int64_t begin(int64_t g) const { return offsets ? offsets[g] : g * group_size; }
  int64_t end(int64_t g) const { return offsets ? offsets[g + 1] : (g + 1) * group_size; }

  static int64_t padded_size(int64_t size) { return (size + kW - 1) / kW * kW; }

  // Reads samples [lo, hi) (at most kChunk) into the staging buffers at `at` and sums them in
  // the same sweep. A sample is valid under
  // sample_is_valid (group_math.h): flag set, reward and success finite.
  // The range (lo, hi) is only ever used for the exact all-equal test, so it is kept in a
  // cheaper form than a running min/max: (v, v) when every valid sample equals v, and
  // (-inf, +inf) otherwise. merge_moments and the test lo == hi treat it exactly as a range.
  C10_ALWAYS_INLINE ChunkSums<acc_t> load(int64_t lo, int64_t hi, Stage<acc_t>& st, int64_t at) const {
    constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
    const int64_t size = hi - lo, padded = padded_size(size);
    acc_t* reward_out = st.reward + at;
    acc_t* ok_out = st.ok + at;
    acc_t* success_in = st.success + at;
    // Stage in acc_t; an unset valid flag reads as a NaN reward, and the padding is invalid.
    // Rewards already in acc_t, in whole vectors and with no flags, are read where they lie.
    const acc_t* staged = reward_out;
    if (std::is_same_v<scalar_t, acc_t> && !kHasValid && size == padded) {
      staged = reinterpret_cast<const acc_t*>(rewards + lo);
    } else {
      for (int64_t j = 0; j < size; ++j) {
        const acc_t r = static_cast<acc_t>(rewards[lo + j]);
        reward_out[j] = kHasValid ? (valid[lo + j] ? r : nan) : r;
      }
      for (int64_t j = size; j < padded; ++j) reward_out[j] = nan;
    }
    if constexpr (kHasSuccess) {
      for (int64_t j = 0; j < size; ++j) success_in[j] = success[lo + j];
      for (int64_t j = size; j < padded; ++j) success_in[j] = acc_t(0);
    }
    // The first valid reward, which every other valid reward is compared with.
    acc_t first = 0;
    for (int64_t j = 0; j < size; ++j) {
      if (sample_is_valid(staged[j], true, kHasSuccess ? success_in[j] : acc_t(0))) {
        first = staged[j];
        break;
      }
    }
    const V one = S::splat(1), half = S::splat(0.5), vfirst = S::splat(first);
    V n = {}, sum = {}, k = {};
    M differ = {};
    for (int64_t j = 0; j < padded; j += kW) {
      const V r = S::load(staged + j);
      M ok = (r - r) == V{};  // finite, as is_finite in group_math.h
      V s;
      if constexpr (kHasSuccess) {
        s = S::load(success_in + j);
        ok &= (s - s) == V{};
      } else {
        s = S::keep(r > half, one);  // default_success
      }
      const V rv = S::keep(ok, r), w = S::keep(ok, one);
      S::store(reward_out + j, rv);
      S::store(ok_out + j, w);
      n += w;
      sum += rv;
      k += S::keep(ok, s);
      differ |= ok & (r != vfirst);
    }
    const bool all_equal = S::none(differ);
    return {S::sum(n), S::sum(sum), S::sum(k), all_equal ? first : -inf, all_equal ? first : inf};
  }

  // Moments of a loaded chunk: a second sweep of centred sums about the first sweep's mean.
  C10_ALWAYS_INLINE Moments<acc_t> chunk_moments(const Stage<acc_t>& st, int64_t at, int64_t size,
                                                 const ChunkSums<acc_t>& s) const {
    Moments<acc_t> m;
    m.n = static_cast<int64_t>(s.n);
    if (m.n == 0) return m;
    m.successes = s.successes;
    m.lo = s.lo;
    m.hi = s.hi;
    const acc_t shift = s.sum / s.n;
    acc_t sum_d, sum_d2;
    centred_sums(st, at, size, shift, sum_d, sum_d2);
    set_two_pass(m, shift, sum_d, sum_d2);
    return m;
  }

  // The second sweep of a loaded chunk: sums of d = r - shift and of d^2 over its valid samples.
  C10_ALWAYS_INLINE void centred_sums(const Stage<acc_t>& st, int64_t at, int64_t size, acc_t shift, acc_t& sum_d,
                                      acc_t& sum_d2) const {
    const V vshift = S::splat(shift);
    V d = {}, d2 = {};
    const acc_t* reward = st.reward + at;
    const acc_t* ok = st.ok + at;
    for (int64_t j = 0; j < size; j += kW) {
      const V x = (S::load(reward + j) - vshift) * S::load(ok + j);
      d += x;
      d2 += x * x;
    }
    sum_d = S::sum(d);
    sum_d2 = S::sum(d2);
  }

  // Whether advantages written from `adv` on are streamed (`stream`, and adv 16-byte aligned).
  bool streams(const acc_t* adv) const { return stream && reinterpret_cast<uintptr_t>(adv) % 16 == 0; }

  // One vector of advantages and of mask bytes, streamed past the caches where `nt` (the mask
  // where S packs it into one 8-byte store). The mask is given per lane (M) or, where every one
  // of the kW samples is valid, as their group's kept flag (bool).
  template <typename Mask>
  static C10_ALWAYS_INLINE void put(acc_t* adv, bool* mask, V a, Mask m, bool nt) {
    if (nt) {
      S::stream(adv, a);
      S::template store_mask<true>(mask, m);
    } else {
      S::store(adv, a);
      S::store_mask(mask, m);
    }
  }

  // Advantages and mask of samples [lo, lo + size) of a kept group, staged at `at`. The vector
  // body computes sample_advantage (group_math.h) in the same operation order.
  C10_ALWAYS_INLINE void write_chunk(int64_t lo, int64_t size, const Stage<acc_t>& st, int64_t at,
                                     const GroupResult<acc_t>& res) const {
    const acc_t* reward = st.reward + at;
    const acc_t* okv = st.ok + at;
    acc_t* adv = advantages + lo;
    bool* mask = sample_mask + lo;
    const V center = S::splat(res.center), factor = S::splat(res.factor);
    const V denom = S::splat(res.denom), clip = S::splat(res.clip_value);
    const M alive = S::splat(res.live ? acc_t(1) : acc_t(0)) > V{};
    const bool nt = streams(adv);
    int64_t j = 0;
    for (; j + kW <= size; j += kW) {
      const M ok = S::load(okv + j) > V{};
      V a = (S::load(reward + j) - center) * factor / denom;
      if (res.clip) a = S::select(a > clip, clip, a);
      put(adv + j, mask + j, S::keep(ok & alive, a), ok, nt);
    }
    for (; j < size; ++j) {
      const bool ok = okv[j] > acc_t(0);
      adv[j] = ok ? sample_advantage(reward[j], res) : acc_t(0);
      mask[j] = ok;
    }
  }

  GroupResult<acc_t> finish_stats(int64_t g, const Moments<acc_t>& m, acc_t batch_std) const {
    const GroupResult<acc_t> res = finish_group(m, prior != nullptr, prior ? prior[g] : acc_t(0), batch_std, options);
    groups.store(g, res);
    return res;
  }

  // Zero advantages and a false mask for the samples of an unkept group.
  void write_unkept(int64_t g) const {
    std::fill(advantages + begin(g), advantages + end(g), acc_t(0));
    std::fill(sample_mask + begin(g), sample_mask + end(g), false);
  }

  // Moments of group g, read chunk by chunk through the stage.
  Moments<acc_t> group_moments(int64_t g, Stage<acc_t>& st) const {
    const int64_t b = begin(g), e = end(g);
    Moments<acc_t> m;
    for (int64_t lo = b; lo < e; lo += kChunk) {
      const int64_t hi = std::min(lo + kChunk, e);
      m = merge_moments(m, chunk_moments(st, 0, hi - lo, load(lo, hi, st, 0)));
    }
    return m;
  }

  // A group of more than kChunk samples, on its own; returns its number of kept samples.
  int64_t long_group(int64_t g, const Moments<acc_t>* pre, acc_t batch_std, Stage<acc_t>& st) const {
    const GroupResult<acc_t> res = finish_stats(g, pre ? pre[g] : group_moments(g, st), batch_std);
    if (!res.kept) {
      write_unkept(g);
      return 0;
    }
    for (int64_t lo = begin(g), e = end(g); lo < e; lo += kChunk) {
      const int64_t hi = std::min(lo + kChunk, e);
      load(lo, hi, st, 0);
      write_chunk(lo, hi - lo, st, 0, res);
    }
    return res.count;
  }

  // A tile's groups, one array per field, as the vectorised per-group loops read and write them.
  struct Tile {
    int32_t n[kTile];  // counts: a tile's groups have at most kChunk samples
    acc_t successes[kTile], mean[kTile], m2[kTile], lo[kTile], hi[kTile], prior[kTile];
    acc_t sum[kTile], shift[kTile], sum_d[kTile], sum_d2[kTile];  // the two sweeps' sums
    acc_t center[kTile], factor[kTile], denom[kTile];
    int32_t kept[kTile], live[kTile], clip[kTile];
    V lanes[3][kTile];  // per-lane sums of each group (uniform_tile), before S::sum
    acc_t count[kTile];  // valid samples, as S::sum makes them (then n)
    int64_t at[kTile], size[kTile];  // where each group is staged, and its number of samples
  };

  // The moments of a tile's groups from their two sweeps' sums (chunk_moments, with its two
  // divisions per group made in loops over the tile, which GCC vectorises).
  static void tile_shifts(Tile& tile, int64_t t) {
    for (int64_t i = 0; i < t; ++i) tile.shift[i] = tile.sum[i] / acc_t(tile.n[i]);
  }
  static void tile_moments(Tile& tile, int64_t t) {
    for (int64_t i = 0; i < t; ++i) {
      Moments<acc_t, int32_t> m;
      m.n = tile.n[i];
      set_two_pass(m, tile.shift[i], tile.sum_d[i], tile.sum_d2[i]);
      tile.mean[i] = m.n > 0 ? m.mean : acc_t(0);  // a group with no valid sample: zeros
      tile.m2[i] = m.n > 0 ? m.m2 : acc_t(0);
    }
  }

  // The per-group math of a tile's groups (first, ...), stored: a loop GCC vectorises (eight float
  // groups per AVX2 operation; it needs -fno-math-errno and -fno-trapping-math, and ivdep for the
  // outputs, which never overlap).
  // kBandCounts: every group of the tile has rules.band_n valid samples (a clean uniform tile), and
  // its band is decided from its success count (band_counts in group_math.h), not in double.
  template <bool kBandCounts = false>
  void finish_tile(int64_t first, int64_t t, const GroupRules<acc_t, int32_t>& rules, Tile& tile) const {
    const bool has_prior = prior != nullptr;
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC ivdep
#endif
    for (int64_t i = 0; i < t; ++i) {
      Moments<acc_t, int32_t> m;
      m.n = tile.n[i];
      m.successes = tile.successes[i];
      m.mean = tile.mean[i];
      m.m2 = tile.m2[i];
      m.lo = tile.lo[i];
      m.hi = tile.hi[i];
      const GroupResult<acc_t> res = finish_group<kBandCounts>(m, has_prior, tile.prior[i], rules);
      groups.store_all_but_mask(first + i, res);
      tile.center[i] = res.center;
      tile.factor[i] = res.factor;
      tile.denom[i] = res.denom;
      tile.live[i] = res.live;
      tile.kept[i] = res.kept;
      tile.clip[i] = res.clip;
    }
    for (int64_t i = 0; i < t; ++i) groups.group_mask[first + i] = tile.kept[i];
  }

  // Groups [lo, hi): statistics, advantages, masks, and each group's kept count into `kept` where
  // given (for kept_index); returns their sum. With `pre`, the groups' moments are given
  // (scale="batch", whose first pass made them) and not recomputed.
  int64_t run_groups(int64_t lo, int64_t hi, const Moments<acc_t>* pre, acc_t batch_std, int64_t* kept) const {
    Stage<acc_t>& st = thread_stage<acc_t>();
    GroupRules<acc_t, int32_t> rules = group_rules<acc_t, int32_t>(options, batch_std);
    // Clean uniform tiles decide the band from success counts: every group there has G samples.
    if (uniform && !pre && options.use_band) band_counts(rules, static_cast<int32_t>(group_size));
    const bool has_prior = prior != nullptr;
    Tile tile;
    if (!has_prior) std::fill_n(tile.prior, kTile, acc_t(0));  // read, unused, by finish_group
    if (uniform && !pre) {
      const int64_t per_tile = std::min(kTile, kStage / group_size);
      auto sweep = [&](auto vectors) {
        int64_t total = 0;
        for (int64_t g = lo; g < hi; g += per_tile) {
          total += uniform_tile<decltype(vectors)::value>(g, std::min(per_tile, hi - g), rules, tile, st, kept);
        }
        return total;
      };
      // Unrolled for groups of 8 and 16 with AVX2 and float sums, the common case, for 5-9% of the
      // kernel's time: each unrolled size is one more copy of every float kernel to compile (~8 s
      // of this file's build, which took 80 s with four sizes unrolled everywhere, 38 s with none).
      if constexpr (kBytes == 32 && sizeof(acc_t) == 4) {
        if (group_size == kW) return sweep(std::integral_constant<int, 1>{});
        if (group_size == 2 * kW) return sweep(std::integral_constant<int, 2>{});
      }
      return sweep(std::integral_constant<int, 0>{});
    }
    int64_t g = lo, total = 0;
    while (g < hi) {
      if (end(g) - begin(g) > kChunk) {
        const int64_t k = long_group(g, pre, batch_std, st);
        if (kept) kept[g] = k;
        total += k;
        ++g;
        continue;
      }
      // A tile of consecutive short groups: stage and sum each ...
      const int64_t first = g;
      int64_t t = 0, used = 0;
      for (; g < hi && t < kTile; ++g, ++t) {
        const int64_t b = begin(g), size = end(g) - b;
        if (size > kChunk || used + padded_size(size) > kStage) break;
        tile.at[t] = used;
        tile.size[t] = size;
        // The hardware prefetcher alone left the first read of each group stalled (a fifth of the
        // kernel's time at 1M groups of 16, in perf): fetch a few KB ahead.
        constexpr int64_t ahead = kPrefetchBytes / sizeof(scalar_t);
        if (b + ahead < num_samples) __builtin_prefetch(rewards + b + ahead);
        const ChunkSums<acc_t> sums = load(b, b + size, st, used);
        if (pre) {
          tile.n[t] = static_cast<int32_t>(pre[g].n);
          tile.successes[t] = pre[g].successes;
          tile.mean[t] = pre[g].mean;
          tile.m2[t] = pre[g].m2;
          tile.lo[t] = pre[g].lo;
          tile.hi[t] = pre[g].hi;
        } else {  // a group with no valid sample sums to zeros here, as in chunk_moments
          tile.n[t] = static_cast<int32_t>(sums.n);
          tile.sum[t] = sums.sum;
          tile.successes[t] = sums.successes;
          tile.lo[t] = sums.lo;
          tile.hi[t] = sums.hi;
        }
        tile.prior[t] = has_prior ? prior[g] : acc_t(0);
        used += padded_size(size);
      }
      // ... their moments ...
      if (!pre) {
        tile_shifts(tile, t);
        for (int64_t i = 0; i < t; ++i) {
          tile.sum_d[i] = tile.sum_d2[i] = acc_t(0);
          if (tile.n[i] > 0) centred_sums(st, tile.at[i], tile.size[i], tile.shift[i], tile.sum_d[i], tile.sum_d2[i]);
        }
        tile_moments(tile, t);
      }
      // ... then the per-group math of the whole tile, then its advantages.
      finish_tile(first, t, rules, tile);
      for (int64_t i = 0; i < t; ++i) {
        const int64_t gi = first + i;
        if (tile.kept[i]) {
          GroupResult<acc_t> res{};
          res.center = tile.center[i];
          res.factor = tile.factor[i];
          res.denom = tile.denom[i];
          res.live = tile.live[i];
          res.clip = tile.clip[i];
          res.clip_value = rules.clip_value;
          write_chunk(begin(gi), end(gi) - begin(gi), st, tile.at[i], res);
        } else {
          write_unkept(gi);
        }
        const int64_t k = tile.kept[i] ? tile.n[i] : 0;
        if (kept) kept[gi] = k;
        total += k;
      }
    }
    return total;
  }

  // S::sum of each of v[0..count), into out.
  static void lane_sums(const V* v, int64_t count, acc_t* out) {
    int64_t i = 0;
    if constexpr (S::kBatchedSum) {
      for (; i + 8 <= count; i += 8) S::sum8(v + i, out + i);
    }
    for (; i < count; ++i) out[i] = S::sum(v[i]);
  }

  // Groups first, ..., first + t - 1 of one size G that is whole vectors (`uniform`; not
  // scale="batch"); returns their kept samples. Their samples lie back to back and need no
  // padding, so each sweep runs over the tile with no per-group staging, tests or calls. Every
  // sum is made as load and centred_sums make it, lane by lane in the same order and then S::sum,
  // so the results are bit for bit the general path's (a test holds them to it).
  //
  // A tile whose samples are all valid (every reward and success finite, no valid flag unset:
  // the common case) is "clean": its later sweeps read the rewards where they lie, with no flags,
  // and its masks are its groups' kept flags. The first sweep finds out, and only a tile that is
  // not clean is then staged with its flags (stage_flags). Multiplying by a flag of 1 and masking
  // with all-true lanes change no bit, so both kinds of tile give the same results.
  //
  // kVectors is G / kW where a common G makes it known at compile time (its loops then unroll;
  // see run_groups), else 0.
  template <int kVectors>
  int64_t uniform_tile(int64_t first, int64_t t, const GroupRules<acc_t, int32_t>& rules, Tile& tile,
                       Stage<acc_t>& st, int64_t* kept) const {
    constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    const int64_t size = kVectors > 0 ? kVectors * kW : group_size, vectors = size / kW;
    const int64_t base = first * size, count = t * size;
    // Stage in acc_t (an unset valid flag reads as a NaN reward), unless already so.
    const acc_t* staged = st.reward;
    if constexpr (std::is_same_v<scalar_t, acc_t> && !kHasValid) {
      staged = reinterpret_cast<const acc_t*>(rewards + base);
    } else {
      for (int64_t j = 0; j < count; ++j) {
        const acc_t r = static_cast<acc_t>(rewards[base + j]);
        st.reward[j] = kHasValid ? (valid[base + j] ? r : nan) : r;
      }
    }
    // The first sweep (load), as if every sample were valid: per lane, the sum of the rewards and
    // of the successes. Had a sample a reward (or success) that is not finite, its group's sum is
    // not finite either (no IEEE sum with an infinite or NaN term is), and the tile is then swept
    // again with its flags (stage_flags), which sums the valid samples only. A clean tile whose
    // sums overflow goes that way too, and gets the same results there.
    for (int64_t i = 0; i < t; ++i) {
      V sum = {}, k = {};
      for (int64_t v = 0; v < vectors; ++v) {
        const int64_t j = (i * vectors + v) * kW;
        const V r = S::load(staged + j);
        sum += r;
        k += success_of(r, j, base);
      }
      tile.lanes[1][i] = sum;
      tile.lanes[2][i] = k;
    }
    lane_sums(tile.lanes[1], t, tile.sum);
    lane_sums(tile.lanes[2], t, tile.successes);
    int32_t unclean = 0;
    for (int64_t i = 0; i < t; ++i) {
      unclean |= int32_t(!(tile.sum[i] - tile.sum[i] == acc_t(0)));
      if constexpr (kHasSuccess) unclean |= int32_t(!(tile.successes[i] - tile.successes[i] == acc_t(0)));
    }
    const bool clean = !unclean;
    if (clean) {  // every group counts G samples, and its first valid reward is its first
      for (int64_t i = 0; i < t; ++i) {
        tile.n[i] = static_cast<int32_t>(size);
        tile.lo[i] = staged[i * size];
      }
    } else {
      stage_flags(staged, base, t, vectors, tile, st);
    }
    if (prior) std::copy_n(prior + first, t, tile.prior);  // else zeros, from run_groups
    tile_shifts(tile, t);
    if (clean) {
      centred_tile<true>(staged, t, vectors, tile, st);
    } else {
      centred_tile<false>(st.reward, t, vectors, tile, st);
    }
    tile_moments(tile, t);
    if (clean) {
      finish_tile<true>(first, t, rules, tile);
    } else {
      finish_tile<false>(first, t, rules, tile);
    }
    // The next tile's rewards, fetched a group's worth at a time while this tile is written (its
    // longest sweep), so that they are in the cache when the next tile's first sweep reads them.
    const char* ahead = reinterpret_cast<const char*>(rewards + base + count);
    const int64_t ahead_bytes =
        fetch_ahead ? std::min(count, num_samples - base - count) * int64_t(sizeof(scalar_t)) : 0;
    if (clean) {
      write_tile<true>(staged, base, t, vectors, rules, tile, st, ahead, ahead_bytes);
    } else {
      write_tile<false>(st.reward, base, t, vectors, rules, tile, st, ahead, ahead_bytes);
    }
    int64_t total = 0;
    for (int64_t i = 0; i < t; ++i) {
      const int64_t k = tile.kept[i] ? tile.n[i] : 0;
      if (kept) kept[first + i] = k;
      total += k;
    }
    return total;
  }

  // Lanes of valid samples among rewards r, samples j.. of the tile at `base` (sample_is_valid in
  // group_math.h: reward, and success where given, finite), and their success values.
  C10_ALWAYS_INLINE M sample_valid(V r, int64_t j, int64_t base) const {
    M ok = (r - r) == V{};
    if constexpr (kHasSuccess) {
      const V s = S::load(success + base + j);
      ok &= (s - s) == V{};
    }
    return ok;
  }
  C10_ALWAYS_INLINE V success_of(V r, int64_t j, int64_t base) const {
    if constexpr (kHasSuccess) {
      return S::load(success + base + j);
    } else {
      return S::keep(r > S::splat(0.5), S::splat(1));  // default_success
    }
  }

  // A tile that is not clean: its rewards staged with the invalid ones zeroed, the flags (1 or
  // 0) beside them, and each group's count, sum and successes of valid samples (summed per lane
  // as load sums them) and its first valid reward.
  void stage_flags(const acc_t* staged, int64_t base, int64_t t, int64_t vectors, Tile& tile, Stage<acc_t>& st) const {
    const V one = S::splat(1);
    for (int64_t i = 0; i < t; ++i) {
      V n = {}, sum = {}, k = {};
      acc_t first_valid = 0;
      bool found = false;
      for (int64_t v = 0; v < vectors; ++v) {
        const int64_t j = (i * vectors + v) * kW;
        const V r = S::load(staged + j);
        const M ok = sample_valid(r, j, base);
        const V w = S::keep(ok, one);
        if (!found) {
          if (const int valid_lanes = S::bits(ok)) {
            first_valid = staged[j + __builtin_ctz(valid_lanes)];
            found = true;
          }
        }
        const V rv = S::keep(ok, r);
        S::store(st.reward + j, rv);
        S::store(st.ok + j, w);
        n += w;
        sum += rv;
        k += S::keep(ok, success_of(r, j, base));
      }
      tile.lanes[0][i] = n;
      tile.lanes[1][i] = sum;
      tile.lanes[2][i] = k;
      tile.lo[i] = first_valid;
    }
    lane_sums(tile.lanes[0], t, tile.count);
    lane_sums(tile.lanes[1], t, tile.sum);
    lane_sums(tile.lanes[2], t, tile.successes);
    for (int64_t i = 0; i < t; ++i) tile.n[i] = static_cast<int32_t>(tile.count[i]);
  }

  // The second sweep (centred_sums) of a tile's groups, rewards `reward` (flags in st.ok unless
  // kClean), which also tests whether every valid reward equals the first: the group's range as
  // load keeps it.
  template <bool kClean>
  C10_ALWAYS_INLINE void centred_tile(const acc_t* reward, int64_t t, int64_t vectors, Tile& tile,
                                      const Stage<acc_t>& st) const {
    constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
    for (int64_t i = 0; i < t; ++i) {
      const V vshift = S::splat(tile.shift[i]), vfirst = S::splat(tile.lo[i]);
      V d = {}, d2 = {};
      M differ = {};
      for (int64_t v = 0; v < vectors; ++v) {
        const int64_t j = (i * vectors + v) * kW;
        const V rv = S::load(reward + j);
        if constexpr (kClean) {
          const V x = rv - vshift;  // (rv - shift) * 1
          d += x;
          d2 += x * x;
          differ |= rv != vfirst;
        } else {
          const V w = S::load(st.ok + j);
          const V x = (rv - vshift) * w;
          d += x;
          d2 += x * x;
          differ |= (w > V{}) & (rv != vfirst);
        }
      }
      tile.lanes[0][i] = d;
      tile.lanes[1][i] = d2;
      const bool all_equal = S::none(differ);
      tile.hi[i] = all_equal ? tile.lo[i] : inf;
      tile.lo[i] = all_equal ? tile.lo[i] : -inf;
    }
    lane_sums(tile.lanes[0], t, tile.sum_d);
    lane_sums(tile.lanes[1], t, tile.sum_d2);
  }

  // Advantages and masks of a tile's groups (write_chunk's formula; an unkept group has factor
  // 0, so its advantages are 0, and its mask is cleared). In a clean tile every sample is valid,
  // so a group's mask is its kept flag. Clipping is decided per group (it applies to few), and
  // the output pointers are locals: a store through bool* may alias any member, which would
  // otherwise be read again after every mask store.
  template <bool kClean>
  C10_ALWAYS_INLINE void write_tile(const acc_t* reward, int64_t base, int64_t t, int64_t vectors,
                                    const GroupRules<acc_t, int32_t>& rules, Tile& tile, const Stage<acc_t>& st,
                                    const char* ahead, int64_t ahead_bytes) const {
    using lane_int = typename S::lane_int;
    const V clip = S::splat(rules.clip_value);
    acc_t* const adv = advantages + base;
    bool* const mask = sample_mask + base;
    const bool nt = streams(advantages);  // and so every group's first sample, G being whole vectors
    const int64_t group_bytes = vectors * kW * int64_t(sizeof(scalar_t));
    for (int64_t i = 0; i < t; ++i) {
      for (int64_t b = i * group_bytes, e = std::min(b + group_bytes, ahead_bytes); b < e; b += 64) {
        __builtin_prefetch(ahead + b);
      }
      const V center = S::splat(tile.center[i]), factor = S::splat(tile.factor[i]), denom = S::splat(tile.denom[i]);
      const M alive = S::splat_lanes(-lane_int(tile.live[i])), in_group = S::splat_lanes(-lane_int(tile.kept[i]));
      const bool group_kept = tile.kept[i] != 0, clipped = tile.clip[i] != 0;
      for (int64_t v = 0; v < vectors; ++v) {
        const int64_t j = (i * vectors + v) * kW;
        V a = (S::load(reward + j) - center) * factor / denom;
        if (clipped) a = S::select(a > clip, clip, a);
        if constexpr (kClean) {
          put(adv + j, mask + j, S::keep(alive, a), group_kept, nt);
        } else {
          const M ok = S::load(st.ok + j) > V{};
          put(adv + j, mask + j, S::keep(ok & alive, a), ok & in_group, nt);
        }
      }
    }
  }

  // One parallel task: the moments of groups [lo, hi) into moments_out (the first pass of
  // scale="batch"), or their results (run_groups), returning their kept samples.
  int64_t range(int64_t lo, int64_t hi, const Moments<acc_t>* pre, acc_t batch_std, Moments<acc_t>* moments_out,
                int64_t* kept) const {
    if (moments_out) {
      Stage<acc_t>& st = thread_stage<acc_t>();
      for (int64_t g = lo; g < hi; ++g) moments_out[g] = group_moments(g, st);
      return 0;
    }
    const int64_t total = run_groups(lo, hi, pre, batch_std, kept);
#if defined(__SSE2__) && defined(__x86_64__)
    if (stream) _mm_sfence();  // the streamed stores are ordered before the task ends
#endif
    return total;
  }

  int64_t parallel_range(int64_t grain, const Moments<acc_t>* pre, acc_t batch_std, Moments<acc_t>* moments_out,
                         int64_t* kept) const {
    std::atomic<int64_t> total{0};
    at::parallel_for(0, num_groups, grain, [&](int64_t lo, int64_t hi) {
      if constexpr (kBytes == 32) {
        total += kernel_range_avx2(*this, lo, hi, pre, batch_std, moments_out, kept);
      } else {
        total += range(lo, hi, pre, batch_std, moments_out, kept);
      }
    });
    return total.load();
  }

  void run(Outputs& out, bool return_index) const {
    const int64_t grain = std::max<int64_t>(1, kGrainSamples * num_groups / std::max<int64_t>(1, num_samples));
    // Each group's kept count, for kept_index only: the total comes from the tasks' own sums.
    std::unique_ptr<int64_t[]> kept(return_index ? new int64_t[num_groups] : nullptr);
    int64_t total;
    if (options.scale == Scale::kBatch) {
      std::vector<Moments<acc_t>> moments(num_groups);
      parallel_range(grain, nullptr, acc_t(0), moments.data(), nullptr);
      Moments<acc_t> batch;  // merged in group order: deterministic
      for (const auto& m : moments) batch = merge_moments(batch, m);
      const acc_t batch_std = std::sqrt(variance_of(batch, options.unbiased));
      total = parallel_range(grain, moments.data(), batch_std, nullptr, kept.get());
    } else {
      total = parallel_range(grain, nullptr, acc_t(0), nullptr, kept.get());
    }
    *out.num_kept.data_ptr<int64_t>() = total;
    if (!return_index) return;
    // Exclusive scan of kept counts gives each group its slot in kept_index.
    for (int64_t g = 0, slot = 0; g < num_groups; ++g) {
      const int64_t k = kept[g];
      kept[g] = slot;
      slot += k;
    }
    int64_t* index = out.kept_index.data_ptr<int64_t>();
    at::parallel_for(0, num_groups, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        int64_t slot = kept[g];
        for (int64_t i = begin(g), e = end(g); i < e; ++i) {
          if (sample_mask[i]) index[slot++] = i;
        }
      }
    });
    std::fill(index + total, index + num_samples, int64_t(-1));
  }
};

// 32-byte vectors where the CPU has AVX2 and FMA, unless BANDADV_CPU_SIMD=baseline (which tests
// use to run the baseline kernel on such CPUs).
bool use_avx2() {
  static const bool use = [] {
    const char* forced = std::getenv("BANDADV_CPU_SIMD");
    if (forced && std::string_view(forced) == "baseline") return false;
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return use;
}

void check_offsets_cpu(const Inputs& in) {
  if (!in.offsets.defined()) return;
  const int64_t* o = in.offsets.data_ptr<int64_t>();
  const int64_t g = in.num_groups;
  TORCH_CHECK_VALUE(o[0] == 0, "bandadv.group_advantages: offsets must start at 0, got ", o[0]);
  TORCH_CHECK_VALUE(o[g] == in.num_samples, "bandadv.group_advantages: offsets must end at N = ",
                    in.num_samples, " (the number of rewards), got ", o[g]);
  for (int64_t i = 0; i < g; ++i) {
    TORCH_CHECK_VALUE(o[i] <= o[i + 1], "bandadv.group_advantages: offsets must be non-decreasing, but offsets[",
                      i, "] = ", o[i], " > offsets[", i + 1, "] = ", o[i + 1]);
  }
}

struct CpuBackend {
  static void run(const Inputs& in, Outputs& out) {
    check_offsets_cpu(in);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.rewards.scalar_type(), "group_advantages_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const bool has_success = in.success.defined(), has_valid = in.valid.defined();
      auto launch = [&](auto bytes) {
        constexpr int kBytes = decltype(bytes)::value;
        if (has_success && has_valid) CpuGroupKernel<scalar_t, acc_t, true, true, kBytes>(in, out).run(out, in.return_index);
        if (has_success && !has_valid) CpuGroupKernel<scalar_t, acc_t, true, false, kBytes>(in, out).run(out, in.return_index);
        if (!has_success && has_valid) CpuGroupKernel<scalar_t, acc_t, false, true, kBytes>(in, out).run(out, in.return_index);
        if (!has_success && !has_valid) CpuGroupKernel<scalar_t, acc_t, false, false, kBytes>(in, out).run(out, in.return_index);
      };
      if (use_avx2()) {
        launch(std::integral_constant<int, 32>{});
      } else {
        launch(std::integral_constant<int, 16>{});
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(bandadv, CPU, m) { register_kernels<CpuBackend>(m); }

}  // namespace bandadv
