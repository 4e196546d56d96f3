// CPU kernel of bandadv::group_advantages: parallel over groups, each group's
// rewards read from cache while its moments, reason and advantages are made.
// The schema lives in python/bandadv/ops.py; this file registers the CPU
// implementation and the Python module stub that loads it.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "group_math.h"
#include "op_common.h"

namespace bandadv {
namespace {

// Groups are read in chunks of this many samples into a local buffer, each chunk reduced
// two-pass (mean, then centred squares) and the chunks Chan-merged: the same shape of
// computation the GPU kernels use, so the merge is exercised on the CPU too.
constexpr int64_t kChunk = 1024;
// Groups per parallel task; fixed, so results never depend on thread count.
constexpr int64_t kGrain = 256;
// Independent partial sums per reduction: breaks the add latency chain and lets the compiler
// keep them in one SIMD register. The summation order is fixed, so results are reproducible.
constexpr int kLanes = 4;

template <typename acc_t>
struct Chunk {
  int64_t size = 0;
  acc_t reward[kChunk];  // 0 where invalid
  acc_t ok[kChunk];      // 1 or 0
  acc_t success[kChunk]; // 0 where invalid
};

template <typename scalar_t, typename acc_t, bool kHasSuccess, bool kHasValid>
struct CpuGroupKernel {
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
  int32_t* reason;
  bool* group_mask;
  int32_t* count;
  acc_t *successes, *mean, *std, *pass_rate, *success_var, *reward_var;

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
        reason(out.reason.data_ptr<int32_t>()),
        group_mask(out.group_mask.data_ptr<bool>()),
        count(out.count.data_ptr<int32_t>()),
        successes(out.successes.data_ptr<acc_t>()),
        mean(out.mean.data_ptr<acc_t>()),
        std(out.std.data_ptr<acc_t>()),
        pass_rate(out.pass_rate.data_ptr<acc_t>()),
        success_var(out.success_var.data_ptr<acc_t>()),
        reward_var(out.reward_var.data_ptr<acc_t>()) {}

  int64_t begin(int64_t g) const { return offsets ? offsets[g] : g * group_size; }
  int64_t end(int64_t g) const { return offsets ? offsets[g + 1] : (g + 1) * group_size; }

  C10_ALWAYS_INLINE void load(int64_t lo, int64_t hi, Chunk<acc_t>& c) const {
    c.size = hi - lo;
    for (int64_t j = 0; j < c.size; ++j) {
      const acc_t r = static_cast<acc_t>(rewards[lo + j]);
      const acc_t s = kHasSuccess ? success[lo + j] : default_success(r);
      const bool ok = sample_is_valid(r, kHasValid ? valid[lo + j] : true, s);
      c.reward[j] = ok ? r : acc_t(0);
      c.ok[j] = ok ? acc_t(1) : acc_t(0);
      c.success[j] = ok ? s : acc_t(0);
    }
  }

  // Sums of a chunk in kLanes interleaved partials (a fixed order, so reproducible), written as
  // blocks of kLanes so that the compiler keeps each set of partials in SIMD registers.
  template <typename F>
  static C10_ALWAYS_INLINE void lane_sums(int64_t size, F&& add) {
    int64_t j = 0;
    for (; j + kLanes <= size; j += kLanes)
      for (int l = 0; l < kLanes; ++l) add(l, j + l);
    for (int l = 0; j < size; ++j, ++l) add(l, j);
  }

  static C10_ALWAYS_INLINE acc_t total(const acc_t (&part)[kLanes]) {
    acc_t t = 0;
    for (int l = 0; l < kLanes; ++l) t += part[l];
    return t;
  }

  C10_ALWAYS_INLINE Moments<acc_t> chunk_moments(const Chunk<acc_t>& c) const {
    acc_t n[kLanes] = {}, sum[kLanes] = {}, k[kLanes] = {};
    lane_sums(c.size, [&](int l, int64_t j) {
      n[l] += c.ok[j];
      sum[l] += c.reward[j];
      k[l] += c.success[j];
    });
    Moments<acc_t> m;
    m.n = static_cast<int64_t>(total(n));
    if (m.n == 0) return m;
    m.successes = total(k);
    const acc_t shift = total(sum) / acc_t(m.n);
    acc_t d[kLanes] = {}, d2[kLanes] = {}, lo[kLanes], hi[kLanes];
    for (int l = 0; l < kLanes; ++l) lo[l] = hi[l] = shift;  // shift lies within [min, max]
    lane_sums(c.size, [&](int l, int64_t j) {
      const bool ok = c.ok[j] != acc_t(0);
      const acc_t x = (c.reward[j] - shift) * c.ok[j];
      d[l] += x;
      d2[l] += x * x;
      const acc_t r = ok ? c.reward[j] : shift;
      lo[l] = r < lo[l] ? r : lo[l];
      hi[l] = r > hi[l] ? r : hi[l];
    });
    m.lo = lo[0];
    m.hi = hi[0];
    for (int l = 1; l < kLanes; ++l) {
      m.lo = lo[l] < m.lo ? lo[l] : m.lo;
      m.hi = hi[l] > m.hi ? hi[l] : m.hi;
    }
    set_two_pass(m, shift, total(d), total(d2));
    return m;
  }

  // Writes group g's statistics, advantages and mask; returns its number of kept samples.
  // The first chunk is still in `first` from the moments pass.
  int64_t finish(int64_t g, const Moments<acc_t>& m, acc_t batch_std, Chunk<acc_t>& first) const {
    const GroupResult<acc_t> res = finish_group(m, prior != nullptr, prior ? prior[g] : acc_t(0), batch_std, options);
    reason[g] = res.reason;
    group_mask[g] = res.kept;
    count[g] = static_cast<int32_t>(res.count);
    successes[g] = res.successes;
    mean[g] = res.mean;
    std[g] = res.std;
    pass_rate[g] = res.pass_rate;
    success_var[g] = res.success_var;
    reward_var[g] = res.reward_var;
    const int64_t b = begin(g), e = end(g);
    if (!res.kept) {
      std::fill(advantages + b, advantages + e, acc_t(0));
      std::fill(sample_mask + b, sample_mask + e, false);
      return 0;
    }
    for (int64_t lo = b; lo < e; lo += kChunk) {
      if (lo != b) load(lo, std::min(lo + kChunk, e), first);
      for (int64_t j = 0; j < first.size; ++j) {
        const acc_t a = sample_advantage(first.reward[j], res);
        advantages[lo + j] = first.ok[j] != acc_t(0) ? a : acc_t(0);
        sample_mask[lo + j] = first.ok[j] != acc_t(0);
      }
    }
    return res.count;
  }

  // Moments of group g; leaves its first chunk in `first`.
  Moments<acc_t> group_moments(int64_t g, Chunk<acc_t>& first) const {
    const int64_t b = begin(g), e = end(g);
    load(b, std::min(b + kChunk, e), first);
    Moments<acc_t> m = chunk_moments(first);
    if (e - b > kChunk) {
      Chunk<acc_t> rest;
      for (int64_t lo = b + kChunk; lo < e; lo += kChunk) {
        load(lo, std::min(lo + kChunk, e), rest);
        m = merge_moments(m, chunk_moments(rest));
      }
    }
    return m;
  }

  void run(Outputs& out, bool return_index) const {
    std::vector<int64_t> kept(num_groups);
    if (options.scale == Scale::kBatch) {
      std::vector<Moments<acc_t>> moments(num_groups);
      at::parallel_for(0, num_groups, kGrain, [&](int64_t lo, int64_t hi) {
        Chunk<acc_t> chunk;
        for (int64_t g = lo; g < hi; ++g) moments[g] = group_moments(g, chunk);
      });
      Moments<acc_t> batch;  // merged in group order: deterministic
      for (const auto& m : moments) batch = merge_moments(batch, m);
      const acc_t batch_std = std::sqrt(variance_of(batch, options.unbiased));
      at::parallel_for(0, num_groups, kGrain, [&](int64_t lo, int64_t hi) {
        Chunk<acc_t> chunk;
        for (int64_t g = lo; g < hi; ++g) {
          load(begin(g), std::min(begin(g) + kChunk, end(g)), chunk);
          kept[g] = finish(g, moments[g], batch_std, chunk);
        }
      });
    } else {
      at::parallel_for(0, num_groups, kGrain, [&](int64_t lo, int64_t hi) {
        Chunk<acc_t> chunk;
        for (int64_t g = lo; g < hi; ++g) kept[g] = finish(g, group_moments(g, chunk), acc_t(0), chunk);
      });
    }
    // Exclusive scan of kept counts gives each group its slot in kept_index.
    int64_t total = 0;
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t k = kept[g];
      kept[g] = total;
      total += k;
    }
    out.num_kept.fill_(total);
    if (!return_index) return;
    int64_t* index = out.kept_index.data_ptr<int64_t>();
    at::parallel_for(0, num_groups, kGrain, [&](int64_t lo, int64_t hi) {
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
      if (has_success && has_valid) CpuGroupKernel<scalar_t, acc_t, true, true>(in, out).run(out, in.return_index);
      if (has_success && !has_valid) CpuGroupKernel<scalar_t, acc_t, true, false>(in, out).run(out, in.return_index);
      if (!has_success && has_valid) CpuGroupKernel<scalar_t, acc_t, false, true>(in, out).run(out, in.return_index);
      if (!has_success && !has_valid) CpuGroupKernel<scalar_t, acc_t, false, false>(in, out).run(out, in.return_index);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(bandadv, CPU, m) { m.impl("group_advantages", &group_advantages_entry<CpuBackend>); }

}  // namespace bandadv

extern "C" {
// Importing bandadv._C loads this library so that the static initializers
// above register the kernels; the module itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
