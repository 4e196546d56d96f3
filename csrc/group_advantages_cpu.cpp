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

// Groups are read in chunks of this many samples, each chunk two-pass
// (mean, then centred squares) and the chunks Chan-merged: the same shape of
// computation the GPU kernels use, so the merge is exercised on the CPU too.
constexpr int64_t kChunk = 1024;
// Groups per parallel task; fixed, so results never depend on thread count.
constexpr int64_t kGrain = 256;

template <typename scalar_t, typename acc_t>
struct CpuGroupKernel {
  const Inputs& in;
  const scalar_t* rewards;
  const acc_t* success;
  const bool* valid;
  const acc_t* prior;
  const int64_t* offsets;

  explicit CpuGroupKernel(const Inputs& inputs)
      : in(inputs),
        rewards(inputs.rewards.data_ptr<scalar_t>()),
        success(inputs.success.defined() ? inputs.success.data_ptr<acc_t>() : nullptr),
        valid(inputs.valid.defined() ? inputs.valid.data_ptr<bool>() : nullptr),
        prior(inputs.prior.defined() ? inputs.prior.data_ptr<acc_t>() : nullptr),
        offsets(inputs.offsets.defined() ? inputs.offsets.data_ptr<int64_t>() : nullptr) {}

  int64_t begin(int64_t g) const { return offsets ? offsets[g] : g * in.group_size; }
  int64_t end(int64_t g) const { return offsets ? offsets[g + 1] : (g + 1) * in.group_size; }

  bool valid_at(int64_t i, acc_t r) const {
    const acc_t s = success ? success[i] : acc_t(0);
    return sample_is_valid(r, valid ? valid[i] : true, s);
  }

  Moments<acc_t> chunk_moments(int64_t lo, int64_t hi) const {
    Moments<acc_t> m;
    acc_t sum = 0;
    for (int64_t i = lo; i < hi; ++i) {
      const acc_t r = static_cast<acc_t>(rewards[i]);
      if (!valid_at(i, r)) continue;
      m.lo = m.n == 0 || r < m.lo ? r : m.lo;
      m.hi = m.n == 0 || r > m.hi ? r : m.hi;
      m.n += 1;
      sum += r;
      m.successes += success ? success[i] : default_success(r);
    }
    if (m.n == 0) return m;
    const acc_t shift = sum / acc_t(m.n);
    acc_t sum_d = 0, sum_d2 = 0;
    for (int64_t i = lo; i < hi; ++i) {
      const acc_t r = static_cast<acc_t>(rewards[i]);
      if (!valid_at(i, r)) continue;
      const acc_t d = r - shift;
      sum_d += d;
      sum_d2 += d * d;
    }
    set_two_pass(m, shift, sum_d, sum_d2);
    return m;
  }

  Moments<acc_t> group_moments(int64_t g) const {
    Moments<acc_t> m;
    for (int64_t lo = begin(g), e = end(g); lo < e; lo += kChunk) {
      m = merge_moments(m, chunk_moments(lo, std::min(lo + kChunk, e)));
    }
    return m;
  }

  // Writes group g's statistics and its samples' advantages and mask; returns
  // how many of its samples are kept.
  int64_t finish(int64_t g, const Moments<acc_t>& m, acc_t batch_std, Outputs& out) const {
    const GroupResult<acc_t> res = finish_group(m, prior != nullptr, prior ? prior[g] : acc_t(0), batch_std,
                                                in.options);
    out.reason.data_ptr<int32_t>()[g] = res.reason;
    out.group_mask.data_ptr<bool>()[g] = res.kept;
    out.count.data_ptr<int32_t>()[g] = static_cast<int32_t>(res.count);
    out.successes.data_ptr<acc_t>()[g] = res.successes;
    out.mean.data_ptr<acc_t>()[g] = res.mean;
    out.std.data_ptr<acc_t>()[g] = res.std;
    out.pass_rate.data_ptr<acc_t>()[g] = res.pass_rate;
    out.success_var.data_ptr<acc_t>()[g] = res.success_var;
    out.reward_var.data_ptr<acc_t>()[g] = res.reward_var;
    acc_t* adv = out.advantages.data_ptr<acc_t>();
    bool* mask = out.sample_mask.data_ptr<bool>();
    int64_t kept = 0;
    for (int64_t i = begin(g), e = end(g); i < e; ++i) {
      const acc_t r = static_cast<acc_t>(rewards[i]);
      const bool keep = res.kept && valid_at(i, r);
      adv[i] = keep ? sample_advantage(r, res) : acc_t(0);
      mask[i] = keep;
      kept += keep;
    }
    return kept;
  }

  void run(Outputs& out) const {
    const int64_t num_groups = in.num_groups;
    std::vector<int64_t> kept(num_groups);
    if (in.options.scale == Scale::kBatch && in.options.estimator == Estimator::kGrpo) {
      std::vector<Moments<acc_t>> moments(num_groups);
      at::parallel_for(0, num_groups, kGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t g = lo; g < hi; ++g) moments[g] = group_moments(g);
      });
      Moments<acc_t> batch;  // merged in group order: deterministic
      for (const auto& m : moments) batch = merge_moments(batch, m);
      const acc_t batch_std = std::sqrt(variance_of(batch, in.options.unbiased));
      at::parallel_for(0, num_groups, kGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t g = lo; g < hi; ++g) kept[g] = finish(g, moments[g], batch_std, out);
      });
    } else {
      at::parallel_for(0, num_groups, kGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t g = lo; g < hi; ++g) kept[g] = finish(g, group_moments(g), acc_t(0), out);
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
    if (!in.return_index) return;
    int64_t* index = out.kept_index.data_ptr<int64_t>();
    const bool* mask = out.sample_mask.data_ptr<bool>();
    at::parallel_for(0, num_groups, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        int64_t slot = kept[g];
        for (int64_t i = begin(g), e = end(g); i < e; ++i) {
          if (mask[i]) index[slot++] = i;
        }
      }
    });
    std::fill(index + total, index + in.num_samples, int64_t(-1));
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

OpOutputs group_advantages_cpu(const Tensor& rewards, int64_t group_size, const std::optional<Tensor>& offsets,
                               const std::optional<Tensor>& success, const std::optional<Tensor>& valid,
                               const std::optional<Tensor>& prior, c10::string_view estimator,
                               c10::string_view scale, bool unbiased, double eps, c10::string_view singleton,
                               bool mask_all_equal, std::optional<c10::ArrayRef<double>> band, bool band_inclusive,
                               std::optional<double> min_std, int64_t accidental_max_successes,
                               double accidental_prior_max, c10::string_view accidental_action,
                               double accidental_clip, bool mask_too_few, bool return_index) {
  const Inputs in = prepare_inputs(rewards, group_size, offsets, success, valid, prior, estimator, scale,
                                   unbiased, eps, singleton, mask_all_equal, band, band_inclusive, min_std,
                                   accidental_max_successes, accidental_prior_max, accidental_action,
                                   accidental_clip, mask_too_few, return_index);
  check_offsets_cpu(in);
  Outputs out = allocate_outputs(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.rewards.scalar_type(), "group_advantages_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    CpuGroupKernel<scalar_t, acc_t>(in).run(out);
  });
  return out.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(bandadv, CPU, m) { m.impl("group_advantages", &group_advantages_cpu); }

}  // namespace bandadv

extern "C" {
// Importing bandadv._C loads this library so that the static initializers
// above register the kernels; the module itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
