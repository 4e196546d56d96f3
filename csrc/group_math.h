// The per-group math of bandadv::group_advantages, written once.
//
// Every backend (the C++ CPU kernel, the CUDA kernel) reads a group's rewards
// with its own memory access pattern, folds them into Moments, and then calls
// the functions here to turn those moments into statistics, a reason code and
// the advantage formula. The Triton kernel mirrors these functions line by
// line; python/bandadv/reference.py is the float64 oracle they are tested
// against.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

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
// count_t is int64_t but where a kernel knows its groups are short (the CPU kernel's tiles,
// whose per-group math vectorises only over 32-bit counts: x86 has no vector conversion of
// 64-bit integers to floats before AVX-512); a count converts to the same float either way.
template <typename acc_t, typename count_t = int64_t>
struct Moments {
  count_t n = 0;
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
template <typename acc_t, typename count_t>
BANDADV_HD Moments<acc_t, count_t> merge_moments(const Moments<acc_t, count_t>& a, const Moments<acc_t, count_t>& b) {
  if (a.n == 0) return b;
  if (b.n == 0) return a;
  Moments<acc_t, count_t> out;
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
template <typename acc_t, typename count_t>
BANDADV_HD void set_two_pass(Moments<acc_t, count_t>& m, acc_t shift, acc_t sum_d, acc_t sum_d2) {
  const acc_t n = acc_t(m.n);
  m.mean = shift + sum_d / n;
  m.m2 = sum_d2 - sum_d * (sum_d / n);
  if (m.m2 < acc_t(0)) m.m2 = acc_t(0);
}

// Sample variance under the Bessel convention chosen; 0 below two samples. Branch-free (both
// sides are computed, and the one that applies kept), as is everything finish_group calls.
template <typename acc_t, typename count_t>
BANDADV_HD acc_t variance_of(const Moments<acc_t, count_t>& m, bool unbiased) {
  const acc_t var = m.m2 / acc_t(m.n - count_t(unbiased));
  return m.n >= 2 ? var : acc_t(0);
}

// Everything a backend writes for one group, and what it needs to turn each
// reward of the group into an advantage: a = (r - center) * factor / denom where live, else 0.
template <typename acc_t>
struct GroupResult {
  int64_t count;
  acc_t successes, mean, std, reward_var, pass_rate, success_var;
  int32_t reason;
  int32_t kept;  // 1 or 0 (not bool: the CPU kernel's vectorised loop stores them as 32-bit lanes)
  acc_t center, factor, denom;
  int32_t live;  // 1 or 0: whether the group's advantages are computed at all (else 0)
  int32_t clip;  // 1 or 0
  acc_t clip_value;
};

// The next value of type T after x toward `to` (std::nextafter, on the host and on a GPU).
template <typename T>
BANDADV_HD T next_toward(T x, T to) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  if constexpr (sizeof(T) == 4) {
    return nextafterf(x, to);
  } else {
    return nextafter(x, to);
  }
#else
  return std::nextafter(x, to);
#endif
}

// A double bound b as a T for comparisons that decide exactly as comparing x, converted to
// double, with b itself, for every T value x (NaN included: false either way):
//   double(x) <= b  <=>  x <= at_most<T>(b), the largest T at most b;
//   double(x) <  b  <=>  x <  at_least<T>(b), the smallest T at least b.
// (If x <= b, x is a T at most b, so at most the largest one; x < b likewise.) A group's
// statistics are then compared in their own type, with no conversion to double per group. (The
// Triton kernel compares in float64, which decides the same.)
template <typename T>
BANDADV_HD T at_most(double b) {
  constexpr T kMax = std::numeric_limits<T>::max();
  if (b >= double(kMax)) return b == std::numeric_limits<double>::infinity() ? T(b) : kMax;
  if (b < -double(kMax)) return -std::numeric_limits<T>::infinity();
  const T t = static_cast<T>(b);
  return double(t) > b ? next_toward(t, -std::numeric_limits<T>::infinity()) : t;
}

template <typename T>
BANDADV_HD T at_least(double b) {
  return -at_most<T>(-b);
}

// The options as finish_group applies them, worked out once per call (or per tile): each rule
// becomes the reason bit it may set (0 when off) or a count threshold, so that every choice in
// finish_group compares this group's own values. It is written branch-free, so that the CPU
// kernel's loop over a tile of groups vectorises: GCC 12 if-converts neither early returns nor
// selects on a loop-invariant condition. A GPU thread runs it as it is.
template <typename acc_t, typename count_t>
struct GroupRules {
  int32_t too_few, all_equal, low_std, below_band, above_band, accidental;  // bits, 0 when off
  int32_t band_exclusive, masking;
  double band_lo, band_hi;
  acc_t min_std, accidental_max, prior_max;  // as at_most / at_least make them (group_reason)
  bool unbiased;
  count_t raw_at, zero_at, group_std_from, rloo_from;  // counts at which a rule applies
  acc_t eps, fixed_denom, clip_value;
  // The band as success counts, for groups of exactly band_n valid samples (band_counts): a
  // pass rate k / n is below the band exactly when k < band_k_lo, above it when k > band_k_hi.
  count_t band_n;
  acc_t band_k_lo, band_k_hi;
};

template <typename acc_t, typename count_t = int64_t>
BANDADV_HD GroupRules<acc_t, count_t> group_rules(const Options& o, acc_t batch_std) {
  constexpr count_t kNever = std::numeric_limits<count_t>::max();  // no group has this many samples
  GroupRules<acc_t, count_t> r;
  r.too_few = o.mask_too_few ? kTooFew : 0;
  r.all_equal = o.mask_all_equal ? kAllEqual : 0;
  r.low_std = o.use_min_std ? kLowStd : 0;
  r.below_band = o.use_band ? kBelowBand : 0;
  r.above_band = o.use_band ? kAboveBand : 0;
  r.accidental = o.accidental_max_successes > 0 ? kAccidentalSuccess : 0;
  r.band_exclusive = o.band_inclusive ? 0 : 1;
  r.masking = kAllEqual | kBelowBand | kAboveBand | kLowStd | kTooFew |
              (o.accidental_action == AccidentalAction::kMask ? kAccidentalSuccess : 0);
  r.min_std = at_most<acc_t>(o.min_std * (1.0 + kLowStdSlack));  // std <= min_std
  r.band_lo = o.band_lo;
  r.band_hi = o.band_hi;
  r.accidental_max = at_most<acc_t>(double(o.accidental_max_successes));  // k <= max
  r.prior_max = at_least<acc_t>(o.accidental_prior_max);                   // prior < max
  r.unbiased = o.unbiased;
  // verl (compute_grpo_outcome_advantage) scores a lone sample against mean 0
  // and std 1; TRL and the default give it advantage 0.
  r.raw_at = o.singleton == Singleton::kRaw ? 1 : kNever;
  r.zero_at = o.singleton == Singleton::kRaw ? kNever : 1;
  // grpo divides by the group's std plus eps (scale="group"), by the batch's (scale="batch"), or
  // by 1 (scale="none", and every other estimator); rloo scales groups of two or more.
  const bool grpo = o.estimator == Estimator::kGrpo;
  r.group_std_from = grpo && o.scale == Scale::kGroup ? 0 : kNever;
  r.rloo_from = o.estimator == Estimator::kRloo ? 2 : kNever;
  r.eps = acc_t(o.eps);
  r.fixed_denom = grpo && o.scale == Scale::kBatch ? batch_std + acc_t(o.eps) : acc_t(1);
  r.clip_value = acc_t(o.accidental_clip);
  r.band_n = 0;
  r.band_k_lo = r.band_k_hi = acc_t(0);
  return r;
}

// Whether a group of n valid samples with success count k lies below (above) the band: its pass
// rate, decided in double from k / n on every backend, so that a pass rate exactly on a bound is
// classified identically everywhere.
template <typename acc_t, typename count_t>
BANDADV_HD bool below_band(acc_t k, count_t n, const GroupRules<acc_t, count_t>& r) {
  const double p = double(k) / double(n);
  return (p < r.band_lo) | (r.band_exclusive & (p == r.band_lo));
}
template <typename acc_t, typename count_t>
BANDADV_HD bool above_band(acc_t k, count_t n, const GroupRules<acc_t, count_t>& r) {
  const double p = double(k) / double(n);
  return (p > r.band_hi) | (r.band_exclusive & (p == r.band_hi));
}

// Sets the band as success counts for groups of n >= 1 valid samples (GroupRules::band_n). For a
// fixed n, k / n in double never decreases as k grows, so the counts below the band are those
// under one threshold, and the counts above it those over another: each found here by bisection
// over the ordered acc_t values, with below_band and above_band themselves as the test. Host code.
template <typename acc_t, typename count_t>
void band_counts(GroupRules<acc_t, count_t>& r, count_t n) {
  using Bits = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  constexpr Bits kSign = Bits(1) << (8 * sizeof(acc_t) - 1);
  // acc_t values (NaN aside) in order as unsigned integers, and back
  auto key = [](acc_t x) {
    Bits b;
    std::memcpy(&b, &x, sizeof b);
    return (b & kSign) ? Bits(~b) : Bits(b | kSign);
  };
  auto value = [](Bits k) {
    const Bits b = (k & kSign) ? Bits(k & ~kSign) : Bits(~k);
    acc_t x;
    std::memcpy(&x, &b, sizeof x);
    return x;
  };
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const Bits kLow = key(-inf), kHigh = key(inf);
  // The least key at which `up` holds, given that it holds from some key on, at kHigh but not at
  // kLow: searched outward from the key of `guess`, in steps that double, then by bisection (a
  // few tests where the guess is within a few values of the answer, as k = bound * n is).
  auto first_true = [&](acc_t guess, auto up) {
    const Bits start = std::min(std::max(key(guess), Bits(kLow + 1)), kHigh);
    Bits lo = kLow, hi = kHigh;  // up is false at lo and true at hi
    if (up(value(start))) {
      hi = start;
      for (Bits step = 1; lo == kLow; step *= 2) {
        const Bits probe = hi - kLow > step ? Bits(hi - step) : kLow;
        if (probe == kLow || !up(value(probe))) {
          lo = probe;
          if (probe == kLow) break;
        } else {
          hi = probe;
        }
      }
    } else {
      lo = start;
      for (Bits step = 1; hi == kHigh; step *= 2) {
        const Bits probe = kHigh - lo > step ? Bits(lo + step) : kHigh;
        if (probe == kHigh || up(value(probe))) {
          hi = probe;
          if (probe == kHigh) break;
        } else {
          lo = probe;
        }
      }
    }
    while (hi - lo > 1) {
      const Bits mid = lo + (hi - lo) / 2;
      if (up(value(mid))) {
        hi = mid;
      } else {
        lo = mid;
      }
    }
    return hi;
  };
  const double count = double(n);
  // k < band_k_lo: band_k_lo is the least k not below the band (+inf is never below it)
  r.band_k_lo = value(first_true(acc_t(r.band_lo * count), [&](acc_t k) { return !below_band(k, n, r); }));
  // k > band_k_hi: band_k_hi is the greatest k not above the band (-inf is never above it)
  r.band_k_hi = value(first_true(acc_t(r.band_hi * count), [&](acc_t k) { return above_band(k, n, r); }) - 1);
  r.band_n = n;
}

// kBandCounts: every group has r.band_n valid samples (band_counts), and the band is decided from
// its success count alone; the CPU kernel's tiles of groups with every sample valid.
template <bool kBandCounts = false, typename acc_t, typename count_t>
BANDADV_HD int32_t group_reason(const Moments<acc_t, count_t>& m, acc_t std, bool has_prior, acc_t prior,
                                const GroupRules<acc_t, count_t>& r) {
  const int32_t two = m.n >= 2;
  int32_t reason = r.too_few * (two ^ 1);
  reason |= r.all_equal * (two & int32_t(m.lo == m.hi));
  reason |= r.low_std * (two & int32_t(std <= r.min_std));
  const acc_t k = m.successes;
  if constexpr (kBandCounts) {
    reason |= r.below_band * int32_t(k < r.band_k_lo);
    reason |= r.above_band * int32_t(k > r.band_k_hi);
  } else {
    reason |= r.below_band * int32_t(below_band(k, m.n, r));
    reason |= r.above_band * int32_t(above_band(k, m.n, r));
  }
  // An "accidental" success: 1..max hits, on a prompt that earlier steps rated hard (prior below
  // the threshold). A NaN prior means no estimate yet.
  const int32_t prior_known = int32_t(has_prior) & int32_t(prior == prior);
  const int32_t rated_hard = (prior_known ^ 1) | int32_t(prior < r.prior_max);
  reason |= r.accidental * (int32_t(k >= acc_t(1)) & int32_t(k <= r.accidental_max) & rated_hard);
  return m.n > 0 ? reason : int32_t(kTooFew);  // nothing to learn from, whatever the options
}

template <bool kBandCounts = false, typename acc_t, typename count_t>
BANDADV_HD GroupResult<acc_t> finish_group(Moments<acc_t, count_t> m, bool has_prior, acc_t prior,
                                           const GroupRules<acc_t, count_t>& r) {
  GroupResult<acc_t> g;
  const int32_t some = m.n > 0;
  // All-equal groups get their exact mean, so r - mean is exactly 0 there and
  // no rounding residue can be blown up by a small denominator.
  const int32_t equal = some & int32_t(m.lo == m.hi);
  m.mean = equal ? m.lo : m.mean;
  m.m2 = equal ? acc_t(0) : m.m2;
  const acc_t var = variance_of(m, r.unbiased);
  const acc_t n = acc_t(m.n);
  g.count = m.n;
  g.successes = m.successes;
  g.mean = some ? m.mean : acc_t(0);
  g.reward_var = var;
  g.std = sqrt(var);
  const acc_t pass_rate = m.successes / n;
  g.pass_rate = some ? pass_rate : acc_t(0);
  g.success_var = g.pass_rate * (acc_t(1) - g.pass_rate);
  g.reason = group_reason<kBandCounts>(m, g.std, has_prior, prior, r);
  const int32_t kept = (g.reason & r.masking) == 0;
  g.kept = kept;
  g.clip = kept & int32_t((g.reason & kAccidentalSuccess) != 0);
  g.clip_value = r.clip_value;
  g.center = m.n == r.raw_at ? acc_t(0) : g.mean;
  const acc_t group_std = m.n == r.raw_at ? acc_t(1) : g.std;
  g.denom = m.n >= r.group_std_from ? group_std + r.eps : r.fixed_denom;
  // rloo: r - (sum - r) / (n - 1) == n / (n - 1) * (r - mean)
  const acc_t rloo_factor = n / (n - acc_t(1));
  g.factor = m.n >= r.rloo_from ? rloo_factor : acc_t(1);
  g.factor = m.n == r.zero_at ? acc_t(0) : g.factor;
  g.factor = kept ? g.factor : acc_t(0);
  // A zero factor gives advantages 0, and so does a zero denominator: it only arises with
  // eps == 0 on a zero-spread group, where every centred reward is exactly 0 (0, not 0 / 0).
  // Every backend reads `live` and this denominator (1 where not live) rather than re-deriving them.
  g.live = int32_t(g.factor != acc_t(0)) & int32_t(g.denom != acc_t(0));
  g.denom = g.live ? g.denom : acc_t(1);
  return g;
}

// The same, with the rules worked out here (a backend that finishes one group per thread).
template <typename acc_t, typename count_t>
BANDADV_HD GroupResult<acc_t> finish_group(const Moments<acc_t, count_t>& m, bool has_prior, acc_t prior,
                                           acc_t batch_std, const Options& o) {
  return finish_group(m, has_prior, prior, group_rules<acc_t, count_t>(o, batch_std));
}

// Where a backend writes each group's statistics, reason and mask: one array per output,
// indexed by group. Every kernel stores a finished group through store(), or through
// store_all_but_mask() and then its mask (the CPU kernel's vectorised loop over a tile, which a
// one-byte store among the four-byte ones keeps GCC 12 from vectorising).
template <typename acc_t>
struct GroupOutputs {
  int32_t* reason;
  bool* group_mask;
  int32_t* count;
  acc_t *successes, *mean, *std, *pass_rate, *success_var, *reward_var;

  BANDADV_HD void store(int64_t g, const GroupResult<acc_t>& r) const {
    store_all_but_mask(g, r);
    group_mask[g] = r.kept;
  }

  BANDADV_HD void store_all_but_mask(int64_t g, const GroupResult<acc_t>& r) const {
    reason[g] = r.reason;
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
  // Branch-free, so loops vectorize.
  acc_t a = (reward - g.center) * g.factor / g.denom;
  a = g.clip && a > g.clip_value ? g.clip_value : a;
  return g.live ? a : acc_t(0);
}

}  // namespace bandadv
