"""OpenRLHF (0.11.2): group shaping and dynamic filtering from bandadv in OpenRLHF's Ray trainer.

    python -m bandadv.integrations.openrlhf <train_ppo_ray's arguments> \\
        --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt 8 \\
        --algo.dynamic_filtering_enable --algo.bandadv.band 0.1 0.9 \\
        --algo.bandadv.accidental_max_successes 1

runs `openrlhf.cli.train_ppo_ray` itself with bandadv's options added to its parser and its
trainer's classes replaced in every Ray worker (`openrlhf_hook.install`, run by Ray's
`worker_process_setup_hook`, which swaps them in when a worker imports OpenRLHF's trainers):

- `BandadvExperienceMaker` (a `RemoteExperienceMaker`): `compute_advantages_and_returns` takes
  the per-prompt shaping of `--algo.advantage.estimator` from `bandadv.group_advantages(preset=
  "openrlhf")`: `group_norm` is (r - mean) / (std + 1e-9), `rloo` r - mean of the others,
  `reinforce_baseline` and `dr_grpo` r - mean. The rest is OpenRLHF's: length penalties before,
  then `compute_reward` (reward clip, KL in the reward), cumulative returns (gamma 1), and for
  `reinforce_baseline` the whitening over the batch's action tokens (`--algo.advantage.no_std_norm`
  honoured). With bandadv's masks off the numbers are OpenRLHF's.
- `BandadvSamplesGenerator` (a `SamplesGenerator`): with `--algo.dynamic_filtering_enable`, a
  prompt's responses are dropped when bandadv's `group_mask` drops the group, instead of when the
  mean score leaves `--algo.dynamic_filtering_range`, and a new prompt is sent for each one
  dropped, as OpenRLHF does. Success is each response's `scores` (the raw correctness a remote
  reward function returns beside the shaped `rewards`). Without `--algo.bandadv.band` the band is
  `--algo.dynamic_filtering_range`, open like OpenRLHF's (lo < pass rate < hi): OpenRLHF's own
  filter, which the mask rules below then extend.

Options (`--algo.bandadv.<name>`, `args.algo.bandadv.<name>` after OpenRLHF's `hierarchize`):
`band LO HI`, `band_inclusive` (flag: lo <= p <= hi), `mask_all_equal` (flag: all rewards
equal), `min_std`, `accidental_max_successes`, `accidental_action` (mask | clip),
`accidental_clip`, `mask_too_few` (flag), as AdvantageConfig's fields. A bad value stops the
launcher before Ray starts, and any other route when the trainer builds these classes (before its
first rollout), naming `--algo.bandadv.<name>`.

Logged: `bandadv/<key>` per sample in each experience's `info` (the route OpenRLHF's actor logs
`info` by, averaged over samples): the group's kept flag, pass rate and mask reasons, so the
logged means are `GroupAdvantages.metrics()`'s fractions; with filtering, `bandadv/filter_<key>`,
the fractions over every group the step's rollout generated, dropped ones included.
"""

from __future__ import annotations

import argparse
import itertools
import math
import runpy
import sys
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import openrlhf.trainer.ppo_trainer as _ppo_trainer
import openrlhf.trainer.ppo_trainer_async as _ppo_trainer_async
import openrlhf.trainer.ppo_utils.samples_generator as _samples_generator
import openrlhf.utils.config as _openrlhf_config
import ray
import torch
from openrlhf.models.utils import compute_reward
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf.trainer.ppo_utils.length_penalty import apply_length_penalties
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
from openrlhf.utils.logging_utils import init_logger

from ..advantages import group_advantages
from ..config import ACCIDENTAL_ACTIONS, AdvantageConfig
from ..types import FLAG_NAMES, GroupAdvantages

logger = init_logger(__name__)

# OpenRLHF's group estimators and the bandadv estimator of their per-prompt shaping.
ESTIMATORS = {"group_norm": "grpo", "rloo": "rloo", "reinforce_baseline": "dr_grpo", "dr_grpo": "dr_grpo"}
# OpenRLHF whitens these over the batch's action tokens after the shaping (experience_maker.py).
WHITENED = ("reinforce_baseline",)
PREFIX = "algo.bandadv"
SETUP_HOOK = "bandadv.integrations.openrlhf_hook.install"  # light: imports nothing of OpenRLHF

# argparse arguments of each option; the names are AdvantageConfig's fields.
ARGUMENTS: dict[str, dict[str, Any]] = {
    "band": dict(
        nargs=2, type=float, metavar=("LO", "HI"), default=None,
        help="pass-rate band of kept groups (default: --algo.dynamic_filtering_range when filtering)",
    ),
    "band_inclusive": dict(action="store_true", help="keep lo <= pass rate <= hi (default lo < p < hi, as OpenRLHF)"),
    "mask_all_equal": dict(action="store_true", help="mask groups whose rewards are all equal"),
    "min_std": dict(type=float, default=None, help="mask groups whose reward std is <= this"),
    "accidental_max_successes": dict(type=int, default=0, help="mask groups with 1..this many successes"),
    "accidental_action": dict(choices=ACCIDENTAL_ACTIONS, default="mask", help="mask, or clip positive advantages"),
    "accidental_clip": dict(type=float, default=1.0, help="cap of positive advantages with accidental_action=clip"),
    "mask_too_few": dict(action="store_true", help="mask groups with fewer than two valid responses"),
}  # fmt: skip
OPTIONS = tuple(ARGUMENTS)

# Per-group flags logged as bandadv/<name>: GroupAdvantages.metrics()'s fractions.
FLAG_METRICS = tuple(f"{name}_fraction" for name in FLAG_NAMES)


# ---- options from OpenRLHF's args -----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds `--algo.bandadv.<name>` to an OpenRLHF parser (for a launcher of your own); OpenRLHF's
    `hierarchize` then puts them at `args.algo.bandadv`."""
    for name, kwargs in ARGUMENTS.items():
        parser.add_argument(f"--{PREFIX}.{name}", dest=f"{PREFIX}.{name}", **kwargs)
    return parser


class Options:
    """bandadv's options of one run, checked; `config(estimator)` for OpenRLHF's estimator."""

    __slots__ = ("_configs", "fields")

    def __init__(self, fields: dict[str, Any]):
        self.fields = fields
        self._configs: dict[str, AdvantageConfig] = {}

    def config(self, estimator: str | None = None) -> AdvantageConfig:
        """The AdvantageConfig for OpenRLHF's `estimator` (None: masks only, as the filter uses)."""
        cached = self._configs.get(estimator)
        if cached is None:
            if estimator is not None and estimator not in ESTIMATORS:
                raise ValueError(
                    f"--algo.advantage.estimator={estimator!r}: bandadv shapes the per-prompt groups of "
                    f"{list(ESTIMATORS)}; use one of those with bandadv's experience maker"
                )
            shaping = {} if estimator is None else {"estimator": ESTIMATORS[estimator]}
            cached = self._configs[estimator] = AdvantageConfig.from_preset("openrlhf", **shaping, **self.fields)
        return cached


_OPTIONS_CACHE: dict[str, Options] = {}


def read_options(args: Any) -> Options:
    """`args.algo.bandadv` of OpenRLHF's (hierarchized) args, checked: a bad value raises a
    ValueError naming `--algo.bandadv.<name>` (or `--algo.dynamic_filtering_range`)."""
    algo = getattr(args, "algo", None)
    section = getattr(algo, "bandadv", None)
    if section is None:
        raw: dict[str, Any] = {}
    elif isinstance(section, Mapping):
        raw = dict(section)
    elif isinstance(section, SimpleNamespace) or hasattr(section, "__dict__"):
        raw = dict(vars(section))
    else:
        raise ValueError(f"args.{PREFIX} must hold bandadv's options (a namespace), got {section!r}")
    filtering = bool(getattr(algo, "dynamic_filtering_enable", False))
    filter_range = getattr(algo, "dynamic_filtering_range", None)
    key = repr((sorted(raw.items()), filtering, filter_range))
    cached = _OPTIONS_CACHE.get(key)
    if cached is not None:
        return cached
    unknown = sorted(k for k in raw if k not in OPTIONS)
    if unknown:
        raise ValueError(f"--{PREFIX}.{unknown[0]}: unknown option; bandadv's options are {list(OPTIONS)}")
    fields = {k: v for k, v in raw.items() if v is not None}
    for name, value in fields.items():
        if ARGUMENTS[name].get("action") == "store_true" and not isinstance(value, bool):
            raise ValueError(f"--{PREFIX}.{name} is a flag: True or False, got {value!r}")
        if name == "band":
            fields[name] = _band(value, f"--{PREFIX}.band")
        try:
            AdvantageConfig.from_preset("openrlhf", **{name: fields[name]})
        except (ValueError, TypeError) as err:
            raise ValueError(f"--{PREFIX}.{name}={value!r}: {err}") from None
    fields.setdefault("band_inclusive", False)  # OpenRLHF's range is open: lo < mean score < hi
    if filtering and "band" not in fields and filter_range is not None:
        fields["band"] = _band(filter_range, "--algo.dynamic_filtering_range", hint=f" (or set --{PREFIX}.band)")
    options = Options(fields)
    options.config()  # the fields together
    if len(_OPTIONS_CACHE) >= 64:
        _OPTIONS_CACHE.clear()
    _OPTIONS_CACHE[key] = options
    return options


def _band(value: Any, option: str, hint: str = "") -> tuple[float, float]:
    message = f"{option} must be LO HI with 0 <= LO <= HI <= 1 (a pass-rate band), got {value!r}{hint}"
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
        raise ValueError(message)
    return lo, hi


# ---- the experience maker ------------------------------------------------------------------------


class BandadvExperienceMaker(RemoteExperienceMaker):
    """OpenRLHF's experience maker with the per-prompt shaping of its group estimators from
    `bandadv.group_advantages(preset="openrlhf")`; `bandadv_result` holds the latest step's
    GroupAdvantages (prompts in rollout order)."""

    bandadv_result: GroupAdvantages | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._config()  # bad options stop the trainer actor's construction, before any rollout

    def _config(self) -> AdvantageConfig:
        args = self.strategy.args
        estimator = args.algo.advantage.estimator
        config = read_options(args).config(estimator)
        n = args.rollout.n_samples_per_prompt
        if n < 2:
            raise ValueError(f"--rollout.n_samples_per_prompt={n}: {estimator} needs groups of at least 2 responses")
        return config

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences: list) -> list:
        args = self.strategy.args
        estimator = args.algo.advantage.estimator
        config = self._config()
        n = args.rollout.n_samples_per_prompt

        for experience in experiences:  # at least float32 for the penalties and group statistics
            experience.rewards = experience.rewards.to(torch.promote_types(experience.rewards.dtype, torch.float32))
        apply_length_penalties(experiences, args)

        sizes = [len(experience.index) for experience in experiences]
        order = _rollout_order(experiences, n)
        rewards = _in_rollout_order(torch.cat([e.rewards for e in experiences]), order)
        success = None
        if all(e.scores is not None for e in experiences):
            success = _in_rollout_order(torch.cat([e.scores for e in experiences]).to(rewards.dtype), order)
        try:
            out = group_advantages(rewards, n, success=success, config=config)
        except ValueError as err:
            source = "the responses' scores" if success is not None else "rewards > 0.5"
            raise ValueError(f"bandadv on OpenRLHF's rewards (success: {source}): {err}") from None
        self.bandadv_result = out

        per_sample_std = out.stats.std.to(rewards.dtype).repeat_interleave(n)[order].split(sizes)
        shaped = out.advantages.to(rewards.dtype)[order].split(sizes)
        logged = _logged_per_sample(out, n)[order].split(sizes)
        for experience, reward, std, values in zip(experiences, shaped, per_sample_std, logged, strict=True):
            experience.info["group_reward_std"] = std
            for j, name in enumerate((*FLAG_METRICS, "mean_pass_rate")):
                experience.info[f"bandadv/{name}"] = values[:, j]
            self._returns(experience, reward, args)

        if estimator in WHITENED:
            _whiten(experiences, args.algo.advantage.no_std_norm)
        return experiences

    def _returns(self, experience: Any, reward: torch.Tensor, args: Any) -> None:
        """OpenRLHF's per-token step for its group estimators: KL in the reward, returns with gamma 1."""
        token_reward = compute_reward(
            reward, self.kl_ctl.value, experience.kl, action_mask=experience.action_mask,
            reward_clip_range=args.reward.clip_range,
        )  # fmt: skip
        if args.algo.advantage.gamma != 1.0:
            logger.warning(f"gamma is set to 1.0 for {self.advantage_estimator}")
            args.algo.advantage.gamma = 1.0
        experience.returns = self.get_cumulative_returns(token_reward, experience.action_mask, 1.0)
        experience.advantages = experience.returns.clone()
        experience.info["return"] = token_reward.sum(dim=-1)
        experience.kl = None


def _rollout_order(experiences: list, n: int) -> torch.Tensor:
    """The rollout position of each sample of the concatenated micro-batches (their `index`,
    which OpenRLHF's `split_rollout_samples` set), checked to be a permutation of whole groups."""
    order = torch.tensor(list(itertools.chain.from_iterable(e.index for e in experiences)), dtype=torch.int64)
    total = order.numel()
    if total % n:
        raise ValueError(
            f"{total} responses are not whole groups of --rollout.n_samples_per_prompt={n} "
            "(OpenRLHF's group estimators need n responses per prompt)"
        )
    if total and (
        int(order.min()) < 0
        or int(order.max()) >= total
        or not bool(torch.bincount(order, minlength=total).eq(1).all())
    ):
        raise ValueError("the experiences' index fields must number the rollout's responses 0..N-1 once each")
    return order


def _in_rollout_order(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(values)
    out[order] = values
    return out


def _logged_per_sample(out: GroupAdvantages, n: int) -> torch.Tensor:
    """``[N, len(FLAG_METRICS) + 1]`` float32: each group's flags and pass rate on its samples."""
    logged = torch.cat([out.group_flags().to(torch.float32), out.stats.pass_rate.to(torch.float32)[:, None]], dim=1)
    return logged.repeat_interleave(n, dim=0)


def _whiten(experiences: list, no_std_norm: bool) -> None:
    """OpenRLHF's normalisation of reinforce(_baseline) advantages: minus their mean over every
    action token of the batch, over the std (unless `--algo.advantage.no_std_norm`)."""
    advantages = torch.cat([e.advantages.flatten() for e in experiences]).float()
    mask = torch.cat([e.action_mask.flatten() for e in experiences])
    tokens = mask.sum()
    mean = (advantages * mask).sum() / tokens
    rstd = 1
    if not no_std_norm:
        rstd = (((advantages - mean).pow(2) * mask).sum() / tokens).clamp(min=1e-8).rsqrt()
    for experience in experiences:
        experience.advantages = (experience.advantages - mean) * rstd


# ---- dynamic filtering ---------------------------------------------------------------------------


class BandadvSamplesGenerator(SamplesGenerator):
    """OpenRLHF's samples generator whose dynamic filtering drops the prompts bandadv's
    `group_mask` drops (and sends a new prompt for each, as OpenRLHF does)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        read_options(self.args)  # bad options stop the construction, before any rollout

    def _generate_vllm(self, dataloader_iter, num_prompts: int, dynamic_filtering, **generate_kwargs):
        if not dynamic_filtering:
            return super()._generate_vllm(dataloader_iter, num_prompts, dynamic_filtering, **generate_kwargs)
        config = read_options(self.args).config()
        prompts, labels, images, exhausted = _samples_generator._collect_prompt_batch(dataloader_iter, num_prompts)
        if not prompts:
            return [], 0, True
        prompts_consumed = len(prompts)
        pending = self._dispatch_prompts_to_vllm(prompts, labels, images=images, **generate_kwargs)
        accepted: list = []
        tally = torch.zeros(len(FLAG_METRICS), dtype=torch.float64)
        groups = 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=10.0)
            for ref in ready:
                group = [self._process_response_into_experience(r, **generate_kwargs) for r in ray.get(ref)]
                flags = _group_flags(group, config)
                tally += flags
                groups += 1
                if flags[0]:
                    accepted.extend(group)
                    continue
                logger.info(f"bandadv filtered out a prompt: scores={[round(float(e.scores[0]), 2) for e in group]}")
                new_prompts, new_labels, new_images, exhausted = _samples_generator._collect_prompt_batch(
                    dataloader_iter, 1
                )
                prompts_consumed += len(new_prompts)
                if new_prompts:
                    pending.extend(
                        self._dispatch_prompts_to_vllm(new_prompts, new_labels, images=new_images, **generate_kwargs)
                    )
        fractions = (tally / max(groups, 1)).tolist()
        for experience in accepted:
            for name, value in zip(FLAG_METRICS, fractions, strict=True):
                experience.info[f"bandadv/filter_{name}"] = torch.tensor([value])
        return accepted, prompts_consumed, exhausted


def _group_flags(group: list, config: AdvantageConfig) -> torch.Tensor:
    """One prompt's responses through bandadv: its FLAG_METRICS as a float64 vector."""
    if not group:
        return torch.zeros(len(FLAG_METRICS), dtype=torch.float64)
    if any(e.scores is None for e in group):
        raise ValueError(
            "--algo.dynamic_filtering_enable with bandadv counts successes in each response's `scores`; "
            "the reward function (--reward.remote_url or --train.agent_func_path) must return `scores`"
        )
    success = torch.cat([e.scores for e in group]).to(torch.float32)
    rewards = torch.cat([e.rewards if e.rewards is not None else e.scores for e in group]).to(torch.float32)
    try:
        out = group_advantages(rewards, len(group), success=success, config=config)
    except ValueError as err:
        raise ValueError(f"bandadv's dynamic filtering on the responses' scores: {err}") from None
    return out.group_flags()[0].to(torch.float64)


# ---- installing it in OpenRLHF's Ray processes ---------------------------------------------------


def install_classes() -> None:
    """Makes OpenRLHF's trainers build bandadv's experience maker and samples generator in this
    process (both the synchronous PPOTrainer and the async trainer's actors). In Ray's workers,
    `SETUP_HOOK` (bandadv.integrations.openrlhf_hook.install) calls it when they import
    OpenRLHF's trainer modules."""
    _ppo_trainer.RemoteExperienceMaker = BandadvExperienceMaker
    _ppo_trainer.SamplesGenerator = BandadvSamplesGenerator
    _ppo_trainer_async.SamplesGenerator = BandadvSamplesGenerator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bandadv.integrations.openrlhf", add_help=False, allow_abbrev=False,
        usage="%(prog)s [train_ppo_ray's arguments] [bandadv's arguments]",
        description="OpenRLHF's train_ppo_ray with bandadv's group shaping and dynamic filtering. bandadv's arguments:",
    )  # fmt: skip
    return add_arguments(parser)


def split_arguments(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """bandadv's `--algo.bandadv.*` options out of a train_ppo_ray command line:
    (their values by name, the rest)."""
    namespace, rest = _parser().parse_known_args(list(argv))
    values = {name: getattr(namespace, f"{PREFIX}.{name}") for name in OPTIONS}
    return values, rest


def main(argv: Sequence[str] | None = None) -> None:
    """`openrlhf.cli.train_ppo_ray` with bandadv's options and classes (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values, rest = split_arguments(argv)
    if "-h" in rest or "--help" in rest:
        print(_parser().format_help() + "\nOpenRLHF's train_ppo_ray arguments follow.\n", flush=True)
    install_classes()
    original_hierarchize = _openrlhf_config.hierarchize
    original_init = ray.init

    def hierarchize(flat: argparse.Namespace) -> Any:
        args = original_hierarchize(flat)
        args.algo.bandadv = SimpleNamespace(**values)
        read_options(args).config(args.algo.advantage.estimator)  # fails here, before Ray starts
        return args

    def init(*args: Any, runtime_env: Any = None, **kwargs: Any) -> Any:
        runtime_env = dict(runtime_env or {})
        runtime_env.setdefault("worker_process_setup_hook", SETUP_HOOK)
        return original_init(*args, runtime_env=runtime_env, **kwargs)

    saved_argv = sys.argv
    _openrlhf_config.hierarchize, ray.init = hierarchize, init
    sys.argv = ["openrlhf.cli.train_ppo_ray", *rest]
    try:
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)
    finally:
        _openrlhf_config.hierarchize, ray.init = original_hierarchize, original_init
        sys.argv = saved_argv


if __name__ == "__main__":  # under its own name, not __main__: its classes are defined once
    from bandadv.integrations.openrlhf import main as _main

    _main()
