// The per-group math of bandadv::group_advantages, written once.
//
// Every backend (the C++ CPU kernel, the CUDA kernel) reads a group's rewards
// with its own memory access pattern, folds them into Moments, and then calls
// the functions here to turn those moments into statistics, a reason code and
// the advantage formula. The Triton kernel mirrors these functions line by
// line; python/bandadv/reference.py is the float64 oracle they are tested
// against.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BANDADV_HD __host__ __device__ __forceinline__
#else
#define BANDADV_HD inline __attribute__((always_inline))
#endif

namespace bandadv {

// Bits of the per-group reason code; python/bandadv/types.py mirrors them as
// bandadv.Reason.
enum Reason : int32_t {
  kAllEqual = 1,
  kBelowBand = 2,
  kAboveBand = 4,
  kLowStd = 8,
  kAccidentalSuccess = 16,
  kTooFew = 32,
};

// sigma <= min_std is tested with this relative slack on every backend: binary rewards make exact
// ties common (10 samples at p = 0.1 have population std exactly 0.3), and a float32 std lands on
// either side of such a tie; with the slack, float32 and float64 backends classify ties alike.
constexpr double kLowStdSlack = 1e-5;

enum class Estimator : int32_t { kGrpo = 0, kDrGrpo = 1, kRloo = 2 };
enum class Scale : int32_t { kGroup = 0, kBatch = 1, kNone = 2 };
enum class Singleton : int32_t { kZero = 0, kRaw = 1 };
enum class AccidentalAction : int32_t { kMask = 0, kClip = 1 };

struct Options {
  Estimator estimator = Estimator::kGrpo;
  Scale scale = Scale::kGroup;
  bool unbiased = true;
  double eps = 1e-6;
  Singleton singleton = Singleton::kZero;
  bool mask_all_equal = true;
  bool use_band = false;
  double band_lo = 0.0;
  double band_hi = 1.0;
  bool band_inclusive = true;
  bool use_min_std = false;
  double min_std = 0.0;
  int64_t accidental_max_successes = 0;  // 0 turns the rule off
  double accidental_prior_max = 0.1;
  AccidentalAction accidental_action = AccidentalAction::kMask;
  double accidental_clip = 1.0;
  bool mask_too_few = true;
};

// Moments of the valid samples of a group (or of a chunk of one).
// m2 is the centred sum of squares, sum((r - mean)^2), never E[r^2] - E[r]^2.
template <typename acc_t>
struct Moments {
  int64_t n = 0;
  acc_t successes = 0;
  acc_t mean = 0;
  acc_t m2 = 0;
  acc_t lo = 0;  // smallest and largest valid reward, for the exact
  acc_t hi = 0;  // all-equal test
};

// A sample counts when the caller's valid flag is set and both its reward and
// its success value are finite: NaN and +-Inf are never read as numbers.
// x - x is 0 for every finite x and NaN for NaN and +-Inf; written out so the
// same test compiles for host and device without <cmath> overload questions.
template <typename acc_t>
BANDADV_HD bool is_finite(acc_t x) {
  return (x - x) == acc_t(0);
}

template <typename acc_t>
BANDADV_HD bool sample_is_valid(acc_t reward, bool valid_flag, acc_t success) {
  return valid_flag & is_finite(reward) & is_finite(success);  // no short circuit: vectorizes
}

// Default success signal when the caller gives none.
template <typename acc_t>
BANDADV_HD acc_t default_success(acc_t reward) {
  return reward > acc_t(0.5) ? acc_t(1) : acc_t(0);
}

// Chan et al. (1979) pairwise merge, so that groups read in chunks give the
// same centred m2 as one two-pass sweep would.
template <typename acc_t>
BANDADV_HD Moments<acc_t> merge_moments(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (a.n == 0) return b;
  if (b.n == 0) return a;
  Moments<acc_t> out;
  out.n = a.n + b.n;
  const acc_t na = acc_t(a.n), nb = acc_t(b.n), n = acc_t(out.n);
  const acc_t delta = b.mean - a.mean;
  out.mean = a.mean + delta * (nb / n);
  out.m2 = a.m2 + b.m2 + delta * delta * (na * nb / n);
  out.successes = a.successes + b.successes;
  out.lo = a.lo < b.lo ? a.lo : b.lo;
  out.hi = a.hi > b.hi ? a.hi : b.hi;
  return out;
}

// Corrected two-pass (Chan, Golub & LeVeque 1983): with d = r - shift, where shift is a
// first estimate of the mean, the sums of d and d^2 give a mean and centred m2 free of the
// rounding in that first estimate.
template <typename acc_t>
BANDADV_HD void set_two_pass(Moments<acc_t>& m, acc_t shift, acc_t sum_d, acc_t sum_d2) {
  const acc_t n = acc_t(m.n);
  m.mean = shift + sum_d / n;
  m.m2 = sum_d2 - sum_d * (sum_d / n);
  if (m.m2 < acc_t(0)) m.m2 = acc_t(0);
}

// Sample variance under the Bessel convention chosen; 0 below two samples.
template <typename acc_t>
BANDADV_HD acc_t variance_of(const Moments<acc_t>& m, bool unbiased) {
  if (m.n < 2) return acc_t(0);
  return m.m2 / acc_t(unbiased ? m.n - 1 : m.n);
}

// Everything a backend writes for one group, and what it needs to turn each
// reward of the group into an advantage: a = (r - center) * factor / denom.
template <typename acc_t>
struct GroupResult {
  int64_t count;
  acc_t successes, mean, std, reward_var, pass_rate, success_var;
  int32_t reason;
  bool kept;
  acc_t center, factor, denom;
  bool clip;
  acc_t clip_value;
};

template <typename acc_t>
BANDADV_HD int32_t group_reason(const Moments<acc_t>& m, acc_t std, bool has_prior, acc_t prior,
                                const Options& o) {
  if (m.n == 0) return kTooFew;  // nothing to learn from, whatever the options
  int32_t reason = 0;
  if (m.n < 2 && o.mask_too_few) reason |= kTooFew;
  if (m.n >= 2 && o.mask_all_equal && m.lo == m.hi) reason |= kAllEqual;
  if (m.n >= 2 && o.use_min_std && double(std) <= o.min_std * (1.0 + kLowStdSlack)) reason |= kLowStd;
  // The band is decided in float64 from k / n on every backend, so that a pass
  // rate sitting exactly on a bound is classified identically everywhere.
  if (o.use_band) {
    const double p = double(m.successes) / double(m.n);
    if (o.band_inclusive ? p < o.band_lo : p <= o.band_lo) reason |= kBelowBand;
    if (o.band_inclusive ? p > o.band_hi : p >= o.band_hi) reason |= kAboveBand;
  }
  // An "accidental" success: 1..max hits, on a prompt that earlier steps rated
  // hard (prior below the threshold). A NaN prior means no estimate yet.
  if (o.accidental_max_successes > 0 && double(m.successes) >= 1.0 &&
      double(m.successes) <= double(o.accidental_max_successes)) {
    const bool prior_known = has_prior && prior == prior;
    if (!prior_known || double(prior) < o.accidental_prior_max) reason |= kAccidentalSuccess;
  }
  return reason;
}

template <typename acc_t>
BANDADV_HD GroupResult<acc_t> finish_group(Moments<acc_t> m, bool has_prior, acc_t prior,
                                           acc_t batch_std, const Options& o) {
  GroupResult<acc_t> g;
  // All-equal groups get their exact mean, so r - mean is exactly 0 there and
  // no rounding residue can be blown up by a small denominator.
  if (m.n > 0 && m.lo == m.hi) {
    m.mean = m.lo;
    m.m2 = acc_t(0);
  }
  const acc_t var = variance_of(m, o.unbiased);
  const acc_t n = acc_t(m.n);
  g.count = m.n;
  g.successes = m.successes;
  g.mean = m.n > 0 ? m.mean : acc_t(0);
  g.reward_var = var;
  g.std = sqrt(var);
  g.pass_rate = m.n > 0 ? m.successes / n : acc_t(0);
  g.success_var = g.pass_rate * (acc_t(1) - g.pass_rate);
  g.reason = group_reason(m, g.std, has_prior, prior, o);

  int32_t masking = kAllEqual | kBelowBand | kAboveBand | kLowStd | kTooFew;
  if (o.accidental_action == AccidentalAction::kMask) masking |= kAccidentalSuccess;
  g.kept = (g.reason & masking) == 0;
  g.clip = g.kept && (g.reason & kAccidentalSuccess) != 0;
  g.clip_value = acc_t(o.accidental_clip);

  // verl (compute_grpo_outcome_advantage) scores a lone sample against mean 0
  // and std 1; TRL and the default give it advantage 0.
  const bool lone = m.n == 1;
  const bool raw = lone && o.singleton == Singleton::kRaw;
  g.center = raw ? acc_t(0) : g.mean;
  const acc_t group_std = raw ? acc_t(1) : g.std;
  g.factor = acc_t(1);
  g.denom = acc_t(1);
  switch (o.estimator) {
    case Estimator::kGrpo:
      if (o.scale == Scale::kGroup) g.denom = group_std + acc_t(o.eps);
      if (o.scale == Scale::kBatch) g.denom = batch_std + acc_t(o.eps);
      break;
    case Estimator::kDrGrpo:
      break;
    case Estimator::kRloo:
      // r - (sum - r) / (n - 1) == n / (n - 1) * (r - mean)
      if (m.n >= 2) g.factor = n / (n - acc_t(1));
      break;
  }
  if (lone && !raw) g.factor = acc_t(0);
  if (!g.kept) g.factor = acc_t(0);
  return g;
}

// Where a backend writes each group's statistics, reason and mask: one array per output,
// indexed by group. Every kernel stores a finished group through store().
template <typename acc_t>
struct GroupOutputs {
  int32_t* reason;
  bool* group_mask;
  int32_t* count;
  acc_t *successes, *mean, *std, *pass_rate, *success_var, *reward_var;

  BANDADV_HD void store(int64_t g, const GroupResult<acc_t>& r) const {
    reason[g] = r.reason;
    group_mask[g] = r.kept;
    count[g] = static_cast<int32_t>(r.count);
    successes[g] = r.successes;
    mean[g] = r.mean;
    std[g] = r.std;
    pass_rate[g] = r.pass_rate;
    success_var[g] = r.success_var;
    reward_var[g] = r.reward_var;
  }
};

template <typename acc_t>
BANDADV_HD acc_t sample_advantage(acc_t reward, const GroupResult<acc_t>& g) {
  // A zero denominator only arises with eps == 0 on a zero-spread group, where every centred
  // reward is exactly 0: the advantage is 0, not 0 / 0. Branch-free, so loops vectorize.
  const bool live = g.factor != acc_t(0) && g.denom != acc_t(0);
  acc_t a = (reward - g.center) * g.factor / (live ? g.denom : acc_t(1));
  a = g.clip && a > g.clip_value ? g.clip_value : a;
  return live ? a : acc_t(0);
}

}  // namespace bandadv
