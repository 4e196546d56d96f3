"""Result types of :func:`bandadv.group_advantages`."""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch


class Reason(enum.IntFlag):
    """Why a group was flagged; bits of the per-group ``reason`` code (csrc/group_math.h)."""

    ALL_EQUAL = 1  # every valid reward identical: no learning signal
    BELOW_BAND = 2  # pass rate under the band's low edge
    ABOVE_BAND = 4  # pass rate over the band's high edge
    LOW_STD = 8  # reward std <= min_std
    ACCIDENTAL_SUCCESS = 16  # 1..accidental_max_successes hits on a prompt rated hard
    TOO_FEW = 32  # fewer than two valid samples


# Rows of the op's group_stats output, [len(STAT_NAMES), num_groups] in the accumulation dtype
# (csrc/op_common.h, StatRow).
STAT_NAMES = ("successes", "mean", "std", "pass_rate", "success_var", "reward_var")

# Columns of GroupAdvantages.group_flags(); metrics() reports the fraction of groups with each as
# "<name>_fraction".
FLAG_NAMES = ("kept", "all_correct", "all_wrong", "accidental", "below_band", "above_band", "all_equal", "low_std")


class GroupStats(NamedTuple):
    """Per-group success statistics, each a ``[num_groups]`` tensor: ``count`` (int32) and the
    rows of ``values`` (``[6, num_groups]``, one contiguous row per statistic, in STAT_NAMES
    order), read as views by name.

    ``count`` is the number n of valid samples, ``successes`` k the summed success signal,
    ``pass_rate`` k / n, ``success_var`` p(1 - p) (the learnability of LILO, arXiv 2502.12272),
    ``reward_var`` the sample variance of the valid rewards (Bessel-corrected when unbiased) and
    ``std`` its square root. Groups with no valid sample report zeros; groups with one report
    variance 0.

    Immutable (a named tuple, as GroupAdvantages): made on every call, so it costs no more
    than a tuple.
    """

    count: torch.Tensor
    values: torch.Tensor

    @property
    def successes(self) -> torch.Tensor:
        return self.values[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.values[1]

    @property
    def std(self) -> torch.Tensor:
        return self.values[2]

    @property
    def pass_rate(self) -> torch.Tensor:
        return self.values[3]

    @property
    def success_var(self) -> torch.Tensor:
        return self.values[4]

    @property
    def reward_var(self) -> torch.Tensor:
        return self.values[5]

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Every statistic by name, count first."""
        return {"count": self.count, **dict(zip(STAT_NAMES, self.values.unbind(0), strict=True))}


class GroupAdvantages(NamedTuple):
    """Advantages, masks and statistics of one batch of groups: an immutable named tuple, so
    that building one per call costs no more than a tuple (a frozen dataclass's __init__ cost a
    microsecond, a sixth of a small call).

    Attributes:
        advantages: ``[N]`` per-sample advantage, 0 for masked or invalid samples.
        sample_mask: ``[N]`` bool, True for valid samples of kept groups.
        reason: ``[num_groups]`` int32 bit set of :class:`Reason`.
        group_mask: ``[num_groups]`` bool, True for kept groups.
        stats: :class:`GroupStats`.
        num_kept: 0-dim int64, the number of kept samples.
        kept_index: ``[N]`` int64 indices of kept samples in ascending order, padded with -1
            (only with ``return_index=True``; None otherwise).
    """

    advantages: torch.Tensor
    sample_mask: torch.Tensor
    reason: torch.Tensor
    group_mask: torch.Tensor
    stats: GroupStats
    num_kept: torch.Tensor
    kept_index: torch.Tensor | None = None

    def compact(self) -> torch.Tensor:
        """The kept samples' indices without padding (reads num_kept: a host sync)."""
        if self.kept_index is None:
            raise ValueError("compact() needs the result of group_advantages(..., return_index=True)")
        return self.kept_index[: int(self.num_kept)]

    def group_flags(self) -> torch.Tensor:
        """``[num_groups, len(FLAG_NAMES)]`` bool, each group's flags in FLAG_NAMES order: kept
        (``group_mask``); all correct and all wrong (pass rate 1 or 0, of groups with a valid
        sample); then one column per :class:`Reason` bit: accidental success, below and above the
        band, all rewards equal, std at most ``min_std``."""
        seen = self.stats.count > 0
        p = self.stats.pass_rate
        bits = (Reason.ACCIDENTAL_SUCCESS, Reason.BELOW_BAND, Reason.ABOVE_BAND, Reason.ALL_EQUAL, Reason.LOW_STD)
        columns = [self.group_mask, seen & (p == 1), seen & (p == 0), *((self.reason & int(b)) != 0 for b in bits)]
        return torch.stack(columns, dim=1)

    def metrics(self) -> dict[str, float]:
        """Scalars for a logger, read back to the host in one transfer: the fraction of groups
        with each of :meth:`group_flags` (``<flag>_fraction``), the fraction of samples kept, the
        mean pass rate of groups with a valid sample, and the mean and max |advantage| of the kept
        samples."""
        groups = self.reason.numel()
        seen = self.stats.count > 0
        p = self.stats.pass_rate
        kept_adv = self.advantages[self.sample_mask].abs().to(torch.float64)
        none = p.new_zeros((), dtype=torch.float64)
        values = torch.cat(
            [
                self.group_flags().sum(0, dtype=torch.float64) / max(groups, 1),
                torch.stack(
                    [
                        self.num_kept.to(torch.float64) / max(self.advantages.numel(), 1),
                        (p.to(torch.float64) * seen).sum() / seen.sum().clamp(min=1),
                        kept_adv.mean() if kept_adv.numel() else none,
                        kept_adv.max() if kept_adv.numel() else none,
                    ]
                ),
            ]
        )
        names = (
            *(f"{name}_fraction" for name in FLAG_NAMES),
            "kept_sample_fraction",
            "mean_pass_rate",
            "mean_abs_advantage",
            "max_abs_advantage",
        )
        return dict(zip(names, values.tolist(), strict=True))
