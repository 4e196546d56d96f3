"""Plain-torch float64 reference of bandadv.group_advantages: the oracle for every kernel.

Written for clarity, not speed: every statistic is a segment sum over the samples of a
group (index_add_), computed in float64 whatever the input dtype.
"""

from __future__ import annotations

import torch

from .config import AdvantageConfig
from .types import GroupAdvantages, GroupStats, Reason

f64 = torch.float64
# sigma <= min_std is tested with this relative slack on every backend (kLowStdSlack in
# csrc/group_math.h): exact ties are common with binary rewards, and float32 lands either side.
LOW_STD_SLACK = 1e-5


def reference_group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    offsets: torch.Tensor | None = None,
    success: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
    config: AdvantageConfig | None = None,
    return_index: bool = False,
) -> GroupAdvantages:
    """Advantages, masks and statistics in float64; the layout is group_size or offsets."""
    cfg = config if config is not None else AdvantageConfig()
    r = rewards.to(f64)
    n_samples = r.numel()
    device = r.device
    if (group_size is None) == (offsets is None):
        raise ValueError("give exactly one group layout: group_size or offsets")
    if group_size is not None:
        offsets = torch.arange(0, n_samples + 1, group_size, device=device)
    sizes = offsets.diff()
    num_groups = sizes.numel()
    group_of = torch.repeat_interleave(torch.arange(num_groups, device=device), sizes)

    def segment_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_groups, dtype=f64, device=device).index_add_(0, group_of, x)

    s = success.to(f64) if success is not None else (r > 0.5).to(f64)
    ok = torch.isfinite(r) & torch.isfinite(s)
    if valid is not None:
        ok &= valid
    r_ok = torch.where(ok, r, 0.0)

    n = segment_sum(ok.to(f64))
    k = segment_sum(torch.where(ok, s, 0.0))
    lo = torch.full((num_groups,), torch.inf, dtype=f64, device=device)
    lo = lo.scatter_reduce(0, group_of, torch.where(ok, r, torch.inf), "amin")
    hi = torch.full((num_groups,), -torch.inf, dtype=f64, device=device)
    hi = hi.scatter_reduce(0, group_of, torch.where(ok, r, -torch.inf), "amax")
    all_equal = (n > 0) & (lo == hi)

    mean = torch.where(n > 0, segment_sum(r_ok) / n.clamp(min=1), 0.0)
    mean = torch.where(all_equal, lo, mean)  # exact mean of identical values
    centred = torch.where(ok, r - mean[group_of], 0.0)
    m2 = torch.where(all_equal, 0.0, segment_sum(centred * centred))
    ddof = 1 if cfg.unbiased else 0
    var = torch.where(n >= 2, m2 / (n - ddof).clamp(min=1), 0.0)
    std = var.sqrt()
    pass_rate = torch.where(n > 0, k / n.clamp(min=1), 0.0)

    reason = torch.zeros(num_groups, dtype=torch.int32, device=device)

    def flag(condition: torch.Tensor, bit: Reason) -> None:
        reason.bitwise_or_(torch.where(condition, int(bit), 0).to(torch.int32))

    flag((n == 0) | ((n < 2) & cfg.mask_too_few), Reason.TOO_FEW)
    if cfg.mask_all_equal:
        flag((n >= 2) & all_equal, Reason.ALL_EQUAL)
    if cfg.min_std is not None:
        flag((n >= 2) & (std <= cfg.min_std * (1 + LOW_STD_SLACK)), Reason.LOW_STD)
    if cfg.band is not None:
        band_lo, band_hi = cfg.band
        below = pass_rate < band_lo if cfg.band_inclusive else pass_rate <= band_lo
        above = pass_rate > band_hi if cfg.band_inclusive else pass_rate >= band_hi
        flag((n > 0) & below, Reason.BELOW_BAND)
        flag((n > 0) & above, Reason.ABOVE_BAND)
    if cfg.accidental_max_successes > 0:
        few_hits = (n > 0) & (k >= 1) & (k <= cfg.accidental_max_successes)
        if prior is not None:
            p0 = prior.to(f64)
            few_hits &= torch.isnan(p0) | (p0 < cfg.accidental_prior_max)
        flag(few_hits, Reason.ACCIDENTAL_SUCCESS)

    masking = ~int(Reason.ACCIDENTAL_SUCCESS) if cfg.accidental_action == "clip" else -1
    group_mask = (reason & masking) == 0

    # Baseline and scale of each group's advantages.
    lone = n == 1
    raw = lone & (cfg.singleton == "raw")  # verl: a lone sample against mean 0, std 1
    center = torch.where(raw, 0.0, mean)
    if cfg.estimator == "rloo":
        factor = torch.where(n >= 2, n / (n - 1).clamp(min=1), 1.0)
    else:
        factor = torch.ones_like(n)
    denom = torch.ones_like(n)
    if cfg.estimator == "grpo" and cfg.scale == "group":
        denom = torch.where(raw, 1.0, std) + cfg.eps
    elif cfg.estimator == "grpo" and cfg.scale == "batch":
        batch_n = ok.sum()
        batch_mean = r_ok.sum() / batch_n.clamp(min=1)
        batch_m2 = torch.where(ok, r - batch_mean, 0.0).square().sum()
        batch_var = batch_m2 / (batch_n - ddof).clamp(min=1) if batch_n >= 2 else batch_m2 * 0
        denom = torch.full_like(n, float(batch_var.sqrt()) + cfg.eps)
    factor = torch.where((lone & ~raw) | ~group_mask, 0.0, factor)

    live = (factor != 0) & (denom != 0)  # denom is 0 only for eps == 0 on zero spread
    g = group_of
    adv = (r - center[g]) * factor[g] / torch.where(live, denom, 1.0)[g]
    clip = group_mask & ((reason & int(Reason.ACCIDENTAL_SUCCESS)) != 0)
    adv = torch.where(clip[g], adv.clamp(max=cfg.accidental_clip), adv)
    sample_mask = ok & group_mask[g]
    adv = torch.where(sample_mask & live[g], adv, 0.0)

    kept = sample_mask.nonzero().flatten()
    kept_index = None
    if return_index:
        kept_index = torch.full((n_samples,), -1, dtype=torch.int64, device=device)
        kept_index[: kept.numel()] = kept
    stats = GroupStats(
        count=n.to(torch.int32),
        values=torch.stack([k, mean, std, pass_rate, pass_rate * (1 - pass_rate), var]),  # STAT_NAMES
    )
    return GroupAdvantages(
        advantages=adv,
        sample_mask=sample_mask,
        reason=reason,
        group_mask=group_mask,
        stats=stats,
        num_kept=torch.tensor(kept.numel(), dtype=torch.int64, device=device),
        kept_index=kept_index,
    )
