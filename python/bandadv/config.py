"""Options of :func:`bandadv.group_advantages`: one frozen dataclass, validated once."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

Estimator = Literal["grpo", "dr_grpo", "rloo"]
Scale = Literal["group", "batch", "none"]

ESTIMATORS = ("grpo", "dr_grpo", "rloo")
SCALES = ("group", "batch", "none")
SINGLETONS = ("zero", "raw")
ACCIDENTAL_ACTIONS = ("mask", "clip")


@dataclass(frozen=True)
class AdvantageConfig:
    """How advantages are estimated and which groups are masked.

    Advantage of a valid sample with reward r in a kept group of n valid samples:
      grpo:    (r - mean) / (std + eps), std of the group (scale="group"), of every valid
               reward in the batch (scale="batch", TRL's scale_rewards="batch"), or 1 ("none")
      dr_grpo: r - mean                      (Dr. GRPO, arXiv 2503.20783)
      rloo:    r - (sum - r) / (n - 1) = n / (n - 1) * (r - mean)

    Attributes:
        estimator: "grpo", "dr_grpo" or "rloo".
        scale: for grpo, "group" (default), "batch" or "none"; other estimators take "none".
        unbiased: Bessel-corrected std and variance (torch.std's default, as every trainer).
        eps: added to the std in the grpo denominator.
        singleton: a group with one valid sample gets advantage 0 ("zero", TRL) or is scored
            against mean 0 and std 1 ("raw", verl's compute_grpo_outcome_advantage).
        mask_all_equal: mask groups whose valid rewards are all identical (DAPO dynamic sampling).
        band: (lo, hi) pass-rate band; groups outside it are masked. None turns it off.
        band_inclusive: keep lo <= p <= hi (default); False keeps lo < p < hi (OpenRLHF, ROLL).
        min_std: mask groups with std <= min_std (continuous rewards; compared with a 1e-5
            relative slack, so that exact ties classify alike on float32 and float64 backends).
            None turns it off.
        accidental_max_successes: flag groups with 1..this many successes as accidental
            successes; 0 turns the rule off. With a prior, only prompts whose prior pass rate
            is below accidental_prior_max are flagged (a NaN prior counts as unknown: flagged).
        accidental_action: "mask" zeroes flagged groups; "clip" keeps them with positive
            advantages capped at accidental_clip.
        mask_too_few: mask groups with fewer than two valid samples (groups with none are
            always masked: there is nothing to keep).
    """

    estimator: Estimator = "grpo"
    scale: Scale | None = None
    unbiased: bool = True
    eps: float = 1e-6
    singleton: Literal["zero", "raw"] = "zero"
    mask_all_equal: bool = True
    band: tuple[float, float] | None = None
    band_inclusive: bool = True
    min_std: float | None = None
    accidental_max_successes: int = 0
    accidental_prior_max: float = 0.1
    accidental_action: Literal["mask", "clip"] = "mask"
    accidental_clip: float = 1.0
    mask_too_few: bool = True
    # The options as the op takes them (its schema's names and defaults are OPTION_NAMES and
    # OP_DEFAULTS: bandadv.ops.check_interface), made once here, since a trainer passes one config
    # every step: all of them in schema order (for bandadv._C.group_advantages, which converts
    # them once per tuple), and those that differ from the defaults (for calls through torch.ops).
    _op_options: tuple = field(init=False, repr=False, compare=False)
    _op_changes: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _one_of("estimator", self.estimator, ESTIMATORS)
        scale = self.scale if self.scale is not None else ("group" if self.estimator == "grpo" else "none")
        _one_of("scale", scale, SCALES)
        if self.estimator != "grpo" and scale != "none":
            raise ValueError(
                f"scale applies to estimator='grpo' only; estimator={self.estimator!r} needs scale='none' "
                f"(or None), got {scale!r}"
            )
        object.__setattr__(self, "scale", scale)
        _one_of("singleton", self.singleton, SINGLETONS)
        _one_of("accidental_action", self.accidental_action, ACCIDENTAL_ACTIONS)
        _number_at_least("eps", self.eps, 0.0)
        if self.band is not None:
            band = tuple(float(b) for b in self.band)
            if len(band) != 2 or not all(math.isfinite(b) for b in band):
                raise ValueError(f"band must be a pair (lo, hi) of finite floats, got {self.band!r}")
            lo, hi = band
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"band must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
            object.__setattr__(self, "band", band)
        if self.min_std is not None:
            _number_at_least("min_std", self.min_std, 0.0)
        if isinstance(self.accidental_max_successes, bool) or not isinstance(self.accidental_max_successes, int):
            raise ValueError(f"accidental_max_successes must be an int, got {self.accidental_max_successes!r}")
        if self.accidental_max_successes < 0:
            raise ValueError(f"accidental_max_successes must be >= 0, got {self.accidental_max_successes}")
        _number_at_least("accidental_prior_max", self.accidental_prior_max, 0.0)
        if self.accidental_prior_max > 1.0:
            raise ValueError(f"accidental_prior_max must be in [0, 1], got {self.accidental_prior_max}")
        _number_at_least("accidental_clip", self.accidental_clip, 0.0)
        options = self.op_kwargs()
        object.__setattr__(self, "_op_options", tuple(options.values()))
        object.__setattr__(self, "_op_changes", {name: v for name, v in options.items() if v != OP_DEFAULTS[name]})

    @classmethod
    def from_preset(cls, preset: str | None = None, **overrides: Any) -> AdvantageConfig:
        """The options of a trainer's preset, with any field overridden by keyword."""
        unknown = [name for name in overrides if name not in OPTION_NAMES]
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; options are {list(OPTION_NAMES)}")
        if preset is None:
            return cls(**overrides)
        _one_of("preset", preset, tuple(PRESETS))
        return cls(**{**PRESETS[preset], **overrides})

    def op_kwargs(self) -> dict[str, Any]:
        """Every option argument of torch.ops.bandadv.group_advantages, by name (keyword-only
        there), in schema order."""
        options = {name: getattr(self, name) for name in OPTION_NAMES}
        if self.band is not None:  # the schema's float[]
            options["band"] = list(self.band)
        return options

    def op_options(self) -> tuple:
        """Every option argument of the op, in schema order: op_kwargs()'s values (do not modify
        them: they are the config's own)."""
        return self._op_options

    def op_changes(self) -> dict[str, Any]:
        """The option arguments that differ from the op's defaults, by name: all a call needs to
        pass (do not modify the dict: it is the config's own)."""
        return self._op_changes


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AdvantageConfig) if f.init)
# The options' defaults in the op's schema: AdvantageConfig's, except scale, which the op cannot
# leave to the estimator ("group", grpo's default; the other estimators pass "none").
OP_DEFAULTS: dict[str, Any] = {
    **{f.name: f.default for f in dataclasses.fields(AdvantageConfig) if f.init},
    "scale": "group",
}

# Presets reproduce each trainer's advantage numbers. None of these trainers masks groups by
# default, so the presets turn the mask rules off; any of them can be turned back on by keyword.
PRESETS: dict[str, dict[str, Any]] = {
    # trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions:
    # (r - nanmean) / (nanstd + 1e-4), Bessel std; a lone sample gets std 0, so advantage 0.
    "trl": dict(estimator="grpo", eps=1e-4, unbiased=True, singleton="zero", mask_all_equal=False, mask_too_few=False),
    # verl/trainer/ppo/core_algos.py, compute_grpo_outcome_advantage: (r - mean) / (std + 1e-6)
    # with torch.std; a uid with one response gets mean 0 and std 1.
    "verl": dict(estimator="grpo", eps=1e-6, unbiased=True, singleton="raw", mask_all_equal=False, mask_too_few=False),
    # openrlhf/trainer/ppo_utils/experience_maker.py, advantage_estimator="group_norm":
    # (r - mean) / (std + 1e-9) with torch.std. A lone sample there gives 0 / NaN = NaN;
    # bandadv gives it advantage 0 instead of a NaN.
    "openrlhf": dict(
        estimator="grpo", eps=1e-9, unbiased=True, singleton="zero", mask_all_equal=False, mask_too_few=False
    ),
}


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _number_at_least(name: str, value: Any, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")
