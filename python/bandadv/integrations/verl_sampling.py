"""verl (0.9.1), V1 trainer: dynamic sampling by bandadv's group masks, and prompt selection by
`PromptTracker`.

Dynamic sampling: a replay buffer through verl's custom-sampler config.

    trainer.v1.sampler.custom_sampler.path=pkg://bandadv.integrations.verl_sampling
    trainer.v1.sampler.custom_sampler.name=BandReplayBuffer   # BandReplayBufferAsync: async trainers
    algorithm.filter_groups.enable=True algorithm.filter_groups.max_num_gen_batches=10
    +algorithm.bandadv.band=[0.1,0.9] +algorithm.bandadv.accidental_max_successes=1
    +algorithm.bandadv.success_key=acc

- verl's own DAPO filter (its V1 `ReplayBuffer._dapo_filtered_keys`) evicts a finished group
  when one metric has std 0 across its trajectories. `BandReplayBuffer` evicts it when bandadv's
  `group_mask` is False: `group_advantages` over the group's responses with the options of
  `algorithm.bandadv` (the estimators' section, so the two agree), all-equal on by default
  (`mask_all_equal=False` turns it off). With `success_key`, every statistic, all-equal included,
  is taken on the raw success (`reward_extra_info[success_key]`, where verl's reward loop puts
  the keys of a `compute_score` dict); without it, on the canonical score (the sum of
  `rm_scores`), success = score > 0.5, so that all-equal is verl's `metric=reward` filter. One
  response per session: a multi-turn session's final output, as verl's V1 grpo counts it.
- Everything else is verl's sync (or async) replay buffer, inherited: evicted groups are
  refilled (sync: 2k prompts per k evicted, at most `max_inflight_gen_batches` train batches in
  flight, surplus discarded once enough are kept; async: k per k). verl's built-in V1 buffer
  ignores `algorithm.filter_groups.max_num_gen_batches`; here it bounds one step's generation as
  verl's DAPO recipe did: at most that many train batches of prompts per step (the first one
  included), then a ValueError (0: no limit).
- `algorithm.filter_groups.enable=True` is required: verl then fetches prompts one at a time, so
  that refills are exact. Options are read from the trainer's config (verl hands the buffer the
  trainer's `_add_prompts_to_generate` as `refill_fn`) and checked when the trainer builds the
  buffer; a bad one raises naming its key.
- Logged (verl's step metrics): verl's `training/filter_groups/evicted_samples` (evicted
  groups) and `discarded_surplus_samples`, its filtered-value table (here keyed by the evicted
  groups' pass rates), and `training/filter_groups/bandadv/<reason>`: evicted groups per
  `bandadv.Reason` bit.

Prompt selection: a trainer in verl's trainer registry (`register_trainer`).

    trainer.v1.trainer_mode=bandadv_sync +data.bandadv.strategy=thompson

- `bandadv_sync` is verl's sync trainer (`PPOTrainerSync`; it reads `trainer.v1.sync` and behaves
  as `sync` everywhere) whose train loader draws each train batch of prompts with
  `PromptTracker.select` among the whole dataset, when the loader asks for its first prompt.
  Options `data.bandadv.<key>`: `strategy` (thompson, band, learnability, greso), `model` (beta,
  logistic), `decay`, `target`, `band`, `explore`, `seed` (default `data.seed`, else 0) and
  `success_key` (default `algorithm.bandadv.success_key`).
- The tracker is keyed by the dataset's stable index, the `extra_info.index` that verl's
  RLHFDataset puts in every sample as `index` (it must be distinct across the training set), not
  by the per-rollout uid. It is updated at every step with the outcomes of the groups trained
  (read from the transfer queue before the advantages) and of those a `BandReplayBuffer` evicted
  or discarded since, one group per (uid), success per response as above.
- The sampler and its tracker are part of the train loader's state, which verl checkpoints.
- Logged: `bandadv/tracker/groups` (groups observed this step), `bandadv/tracker/pass_rate`
  (their mean pass rate), `bandadv/tracker/seen_fraction` (share of the dataset seen so far)
  and `bandadv/tracker/selected_predicted_pass_rate` (the tracker's mean prediction for the
  latest batch it chose).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.dataset.rl_dataset import collate_fn

from ..advantages import group_advantages
from ..config import AdvantageConfig
from ..tracker import MODELS, STRATEGIES, PromptTracker
from ..types import GroupAdvantages, Reason
from .verl import CONFIG_KEY, _get, _plain, read_options

FILTER_METRIC = "bandadv"  # the base buffer's switch for its DAPO path; bandadv classifies the groups
SELECTION_KEY = "data.bandadv"
SELECTION_OPTIONS = ("strategy", "model", "decay", "target", "band", "explore", "seed", "success_key")
TRAINER_NAME = "bandadv_sync"


# ---- the outcome of finished groups, read from the transfer queue ------------------------------


@dataclasses.dataclass
class GroupOutcome:
    """One finished group: its responses' scores and raw success, and the dataset's index."""

    scores: np.ndarray
    success: np.ndarray | None
    dataset_index: Any = None


def _rows(values: Any) -> list:
    """The rows of a field of a transfer-queue TensorDict as Python values."""
    if isinstance(values, torch.Tensor) and not values.is_nested:
        return values.tolist()
    return [getattr(v, "data", v) for v in values]


def read_outcomes(data: Any, keys: list[str], success_key: str | None) -> dict[str, GroupOutcome]:
    """Groups of the trajectories ``keys`` (``{uid}_{session_id}_{index}``) from the fields
    ``rm_scores``, ``extra_fields`` and ``index`` of a ``tq.kv_batch_get`` result, one response
    per session (its final output), in order of first appearance."""
    final: dict[tuple[str, str], tuple[int, int]] = {}
    for row, key in enumerate(keys):
        uid, session, index = key.rsplit("_", 2)
        if (uid, session) not in final or final[(uid, session)][0] < int(index):
            final[(uid, session)] = (int(index), row)
    scores = [float(s.sum()) for s in data["rm_scores"]]
    extra = _rows(data["extra_fields"]) if success_key is not None else None
    dataset_index = _rows(data["index"]) if "index" in data.keys() else None
    by_uid: dict[str, list[int]] = defaultdict(list)
    for (uid, _), (_, row) in final.items():
        by_uid[uid].append(row)
    out = {}
    for uid, rows in by_uid.items():
        success = None
        if success_key is not None:
            success = np.array([_success_value(extra[r], success_key) for r in rows], dtype=np.float64)
        index = dataset_index[rows[0]] if dataset_index is not None else None
        out[uid] = GroupOutcome(np.array([scores[r] for r in rows], dtype=np.float64), success, index)
    return out


def _success_value(extra_fields: Any, success_key: str) -> float:
    info = extra_fields.get("reward_extra_info", {}) if isinstance(extra_fields, Mapping) else {}
    if success_key not in info:
        raise ValueError(
            f"{CONFIG_KEY}.success_key={success_key!r} is not in the trajectories' reward_extra_info "
            f"(keys there: {sorted(info)}); the keys of a compute_score dict land there"
        )
    value = info[success_key]
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{CONFIG_KEY}.success_key={success_key!r}: expected a number per response, got {value!r}"
        ) from None
    if not (0.0 <= value <= 1.0 or math.isnan(value)):
        raise ValueError(f"{CONFIG_KEY}.success_key={success_key!r}: values must lie in [0, 1], got {value}")
    return value


def outcome_advantages(outcomes: list[GroupOutcome], config: AdvantageConfig) -> GroupAdvantages:
    """`group_advantages` over the groups, in order: on the raw success where there is one (every
    statistic, all-equal included), else on the score with success = score > 0.5."""
    sizes = [len(o.scores) for o in outcomes]
    offsets = torch.tensor([0, *np.cumsum(sizes)], dtype=torch.int64)
    scores = torch.from_numpy(np.concatenate([o.scores for o in outcomes]) if outcomes else np.zeros(0))
    if outcomes and outcomes[0].success is not None:
        success = torch.from_numpy(np.concatenate([o.success for o in outcomes]))
        return group_advantages(success, offsets=offsets, success=success, config=config)
    return group_advantages(scores, offsets=offsets, config=config)


# ---- options ----------------------------------------------------------------------------------


def filter_options(algorithm: Any) -> tuple[AdvantageConfig, str | None]:
    """The group masks of `algorithm.bandadv` for the sampler: all-equal on unless set False."""
    options = read_options(algorithm, "grpo")
    section = _get(algorithm, "bandadv")
    explicit = _plain(section) if section is not None else {}
    config = options.config
    if explicit.get("mask_all_equal") is None:
        config = dataclasses.replace(config, mask_all_equal=True)
    return config, options.success_key


def _trainer_config(refill_fn: Any, config: Any) -> Any:
    if config is None:
        config = getattr(getattr(refill_fn, "__self__", None), "config", None)
    if config is None:
        raise TypeError(
            "BandReplayBuffer reads algorithm.bandadv and algorithm.filter_groups from the trainer's config: "
            "let verl's trainer build it (trainer.v1.sampler.custom_sampler), or pass config="
        )
    return config


# ---- dynamic sampling: the replay buffers -----------------------------------------------------


class _BandFiltering:
    """Overrides verl's DAPO classification of finished groups with bandadv's group masks."""

    def __init__(
        self,
        trainer_mode: str,
        trainer_config: Any,
        max_off_policy_threshold: int | None,
        max_off_policy_strategy: str,
        sampler_kwargs: Any,
        poll_interval: float = 2.0,
        refill_fn: Any = None,
        config: Any = None,
        **kwargs: Any,
    ):
        root = _trainer_config(refill_fn, config)
        algorithm = root.algorithm
        self.mask_config, self.success_key = filter_options(algorithm)
        filter_groups = _get(algorithm, "filter_groups")
        if not (filter_groups is not None and _get(filter_groups, "enable", False)):
            raise ValueError(
                f"{type(self).__name__} needs algorithm.filter_groups.enable=True (verl then fetches prompts one "
                "at a time, so that refills are exact); or remove trainer.v1.sampler.custom_sampler"
            )
        max_num = _get(filter_groups, "max_num_gen_batches", 0)
        if isinstance(max_num, bool) or not isinstance(max_num, int):
            raise ValueError(f"algorithm.filter_groups.max_num_gen_batches must be an int, got {max_num!r}")
        self.max_num_gen_batches = max_num
        self._verl_refill = refill_fn
        self._refill_budget: int | None = None
        self._budget_exhausted = False
        self._outcomes: dict[str, dict[str, tuple[GroupOutcome, int]]] = defaultdict(dict)  # uid -> (.., reason)
        self.cleared_outcomes: list[GroupOutcome] = []  # evicted or discarded, for a tracker
        sampler = _get(_get(root, "trainer", {}), "v1", {})
        sampler = _get(sampler, "sampler", {})
        kwargs.setdefault("sync_refill_failed_groups", bool(_get(sampler, "sync_refill_failed_groups", False)))
        if self._sync:
            kwargs.setdefault("train_batch_size", int(root.data.train_batch_size))
            kwargs.setdefault("gen_batch_size", 1)
            kwargs.setdefault("max_inflight_gen_batches", _get(filter_groups, "max_inflight_gen_batches", 1))
        super().__init__(
            trainer_mode=trainer_mode,
            trainer_config=trainer_config,
            max_off_policy_threshold=max_off_policy_threshold,
            max_off_policy_strategy=max_off_policy_strategy,
            sampler_kwargs=sampler_kwargs,
            poll_interval=poll_interval,
            refill_fn=self._refill,
            filter_groups_metric=FILTER_METRIC,
            **kwargs,
        )

    _sync = True

    # -- classification ----------------------------------------------------------------------
    def _dapo_filtered_keys(self, partition_id: str) -> tuple[set[str], Counter]:
        if partition_id == "val":
            return set(), Counter()
        known = self._outcomes[partition_id]
        finished = self.finished_keys[partition_id]
        for uid in known.keys() - finished:  # sampled (and trained) since: no longer ours to report
            del known[uid]
        new = finished - known.keys()
        keys = [key for key in self.partitions[partition_id] if key.split("_")[0] in new]
        if keys:
            import transfer_queue as tq

            fields = ["rm_scores", "index"] + (["extra_fields"] if self.success_key is not None else [])
            data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=fields)
            outcomes = read_outcomes(data, keys, self.success_key)
            uids = list(outcomes)
            out = outcome_advantages([outcomes[u] for u in uids], self.mask_config)
            reasons = out.reason.tolist()
            kept = out.group_mask.tolist()
            for g, uid in enumerate(uids):
                known[uid] = (outcomes[uid], 0 if kept[g] else int(reasons[g]) or -1)
        evicted = {uid: outcome for uid, (outcome, reason) in known.items() if reason != 0}
        return set(evicted), Counter(_pass_rate(o) for o in evicted.values())

    def _evict_terminal_groups(self, global_steps, partition_id, eviction_reasons):
        dapo_uids = eviction_reasons[1]
        reasons = [self._outcomes[partition_id][uid][1] for uid in dapo_uids if uid in self._outcomes[partition_id]]
        evicted_uids, stale, dapo, metrics = super()._evict_terminal_groups(
            global_steps, partition_id, eviction_reasons
        )
        if dapo_uids:
            prefix = self._metrics_prefix(partition_id)
            for reason in Reason:
                metrics[f"{prefix}/filter_groups/bandadv/{reason.name.lower()}"] = sum(
                    1 for r in reasons if r > 0 and r & reason
                )
        return evicted_uids, stale, dapo, metrics

    def _clear_groups(self, partition_id: str, uids: set[str]) -> None:
        known = self._outcomes[partition_id]
        for uid in uids:
            if uid in known:
                self.cleared_outcomes.append(known.pop(uid)[0])
        super()._clear_groups(partition_id, uids)

    def take_cleared_outcomes(self) -> list[GroupOutcome]:
        """The outcomes of groups evicted or discarded since the last call (not trained)."""
        out, self.cleared_outcomes = self.cleared_outcomes, []
        return out

    # -- the generation bound ------------------------------------------------------------------
    def sample(self, global_steps: int, partition_id: str, batch_size: int):
        limit = self.max_num_gen_batches
        self._refill_budget = None if partition_id == "val" or limit <= 0 else (limit - 1) * batch_size
        self._budget_exhausted = False
        return super().sample(global_steps, partition_id, batch_size)

    def _refill(self, num_prompts: int) -> int:
        budget = self._refill_budget
        if budget is not None:
            if num_prompts > budget:
                self._budget_exhausted, num_prompts = True, budget
            self._refill_budget = budget - num_prompts
        return self._verl_refill(num_prompts) if num_prompts > 0 else 0

    def _wait_for_next_poll(self, partition_id: str, last_debug_time: float) -> float:
        if self._budget_exhausted and not (self.pending_keys[partition_id] or self.running_keys[partition_id]):
            raise ValueError(
                f"num_gen_batches >= max_num_gen_batches={self.max_num_gen_batches}: generated too many without "
                "enough groups kept by bandadv's masks. Please check if your data are too difficult (or the band "
                "too narrow), or set algorithm.filter_groups.max_num_gen_batches=0 for endless trials."
            )
        return super()._wait_for_next_poll(partition_id, last_debug_time)


def _pass_rate(outcome: GroupOutcome) -> float:
    values = outcome.success if outcome.success is not None else (outcome.scores > 0.5).astype(np.float64)
    values = values[np.isfinite(values)]
    return round(float(values.mean()), 4) if values.size else math.nan


class BandReplayBuffer(_BandFiltering, ReplayBuffer):
    """verl's sync V1 replay buffer, groups evicted by bandadv's `group_mask` (module docstring)."""

    def _validate_mode_config(self) -> None:
        if self.trainer_mode != "sync":
            raise ValueError(
                f"trainer.v1.trainer_mode={self.trainer_mode!r} is asynchronous: set "
                "trainer.v1.sampler.custom_sampler.name=BandReplayBufferAsync"
            )
        super()._validate_mode_config()


class BandReplayBufferAsync(_BandFiltering, ReplayBufferAsync):
    """verl's async V1 replay buffer, groups evicted by bandadv's `group_mask` (module docstring)."""

    _sync = False

    def _validate_mode_config(self) -> None:
        if self.trainer_mode == "sync":
            raise ValueError(
                "trainer.v1.trainer_mode='sync': set trainer.v1.sampler.custom_sampler.name=BandReplayBuffer"
            )


# ---- prompt selection --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SelectionOptions:
    strategy: str = "thompson"
    model: str = "beta"
    decay: float = 0.95
    target: float = 0.5
    band: tuple[float, float] = (0.1, 0.9)
    explore: float = 0.1
    seed: int = 0
    success_key: str | None = None


def read_selection_options(config: Any) -> SelectionOptions:
    """`data.bandadv` of verl's trainer config, checked: a bad value raises naming its key."""
    section = _get(_get(config, "data"), "bandadv")
    if section is None:
        raw: dict[str, Any] = {}
    elif isinstance(section, Mapping) or hasattr(section, "items"):
        raw = {k: v for k, v in _plain(section).items() if v is not None}
    else:
        raise ValueError(f"{SELECTION_KEY} must be a mapping of options, got {section!r}")
    unknown = sorted(k for k in raw if k not in SELECTION_OPTIONS)
    if unknown:
        raise ValueError(
            f"{SELECTION_KEY}.{unknown[0]}: unknown option; {SELECTION_KEY} takes {list(SELECTION_OPTIONS)}"
        )
    if raw.get("strategy", "thompson") not in STRATEGIES:
        raise ValueError(f"{SELECTION_KEY}.strategy must be one of {list(STRATEGIES)}, got {raw['strategy']!r}")
    if raw.get("model", "beta") not in MODELS or raw.get("model") == "features":
        raise ValueError(f"{SELECTION_KEY}.model must be 'beta' or 'logistic', got {raw['model']!r}")
    for name, lo, hi in (("decay", 0.0, 1.0), ("target", 0.0, 1.0), ("explore", 0.0, 1.0)):
        value = raw.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi
        ):
            raise ValueError(f"{SELECTION_KEY}.{name} must be a number in [{lo}, {hi}], got {value!r}")
    if raw.get("decay") == 0:
        raise ValueError(f"{SELECTION_KEY}.decay must be in (0, 1], got 0")
    if "band" in raw:
        try:
            lo, hi = (float(v) for v in raw["band"])
        except (TypeError, ValueError):
            lo, hi = -1.0, -1.0
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"{SELECTION_KEY}.band must be [lo, hi] with 0 <= lo <= hi <= 1, got {raw['band']!r}")
        raw["band"] = (lo, hi)
    if "seed" not in raw:
        seed = _get(_get(config, "data"), "seed")
        raw["seed"] = 0 if seed is None else seed
    if isinstance(raw["seed"], bool) or not isinstance(raw["seed"], int):
        raise ValueError(f"{SELECTION_KEY}.seed must be an int, got {raw['seed']!r}")
    if "success_key" not in raw:
        algorithm_section = _get(_get(config, "algorithm"), "bandadv")
        raw["success_key"] = _get(algorithm_section, "success_key") if algorithm_section is not None else None
    elif not isinstance(raw["success_key"], str) or not raw["success_key"]:
        raise ValueError(f"{SELECTION_KEY}.success_key must be a non-empty string, got {raw['success_key']!r}")
    return SelectionOptions(**raw)


def dataset_indices(dataset: Any) -> list[Any]:
    """The stable index of each row: `extra_info.index` (verl's RLHFDataset reads it from the
    dataframe; any other map-style dataset gives it as `index` in each sample)."""
    frame = getattr(dataset, "dataframe", None)
    if frame is not None and "extra_info" in getattr(frame, "column_names", ()):
        return [(info or {}).get("index", 0) for info in frame["extra_info"]]
    return [dataset[i]["index"] for i in range(len(dataset))]


class TrackerSampler(Sampler[int]):
    """Dataset rows, `chunk_size` at a time, each chunk chosen by `tracker.select` among all rows
    when the loader asks for its first row. Chunk c of epoch e is drawn with a generator seeded
    from (seed, e, c). Stateful for verl's loader checkpoints (position and tracker)."""

    def __init__(self, tracker: PromptTracker, chunk_size: int, options: SelectionOptions):
        self.tracker, self.chunk_size, self.options = tracker, chunk_size, options
        self.num_chunks = tracker.num_prompts // chunk_size
        self.epoch, self.chunk, self.offset = 0, 0, 0
        self.rows: list[int] = []
        self.selected_predicted_pass_rate = math.nan

    def __len__(self) -> int:
        return self.num_chunks * self.chunk_size

    def _draw(self) -> list[int]:
        gen = torch.Generator(device=self.tracker.device)
        gen.manual_seed((self.options.seed * 1_000_003 + self.epoch) * 1_000_003 + self.chunk)
        candidates = torch.arange(self.tracker.num_prompts, device=self.tracker.device)
        o = self.options
        ids = self.tracker.select(
            candidates, self.chunk_size, o.strategy, gen, target=o.target, band=o.band, explore=o.explore
        )
        self.selected_predicted_pass_rate = float(self.tracker.predict(ids)[0].mean())
        return ids.tolist()

    def __iter__(self) -> Iterator[int]:
        while self.chunk < self.num_chunks:
            if self.offset == 0 or not self.rows:
                self.rows = self._draw()
            while self.offset < len(self.rows):
                row = self.rows[self.offset]
                self.offset += 1
                yield row
            self.chunk, self.offset = self.chunk + 1, 0
        self.epoch, self.chunk, self.offset, self.rows = self.epoch + 1, 0, 0, []

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "chunk": self.chunk, "offset": self.offset, "rows": list(self.rows),
            "tracker": self.tracker.state_dict(),
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.chunk, self.offset, self.rows = state["epoch"], state["chunk"], state["offset"], state["rows"]
        self.tracker.load_state_dict(state["tracker"])


@register_trainer(TRAINER_NAME)
class BandPPOTrainerSync(PPOTrainerSync):
    """verl's sync V1 trainer with prompts chosen by `PromptTracker` (module docstring)."""

    def __init__(self, config: DictConfig):
        self.selection = read_selection_options(config)  # before verl builds anything
        super().__init__(config)

    @property
    def trainer_mode(self) -> str:
        return "sync"  # registered as bandadv_sync; everything else in verl checks for "sync"

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        if value != TRAINER_NAME:
            raise ValueError(f"{type(self).__name__} is trainer.v1.trainer_mode={TRAINER_NAME}, got {value!r}")

    def _init_dataloader(self) -> None:
        super()._init_dataloader()
        indices = dataset_indices(self.train_dataset)
        self.row_of_index = {}
        for row, index in enumerate(indices):
            if index in self.row_of_index:
                raise ValueError(
                    f"data: the training set's extra_info.index must be distinct (the tracker's key); "
                    f"rows {self.row_of_index[index]} and {row} both have index {index!r}"
                )
            self.row_of_index[index] = row
        self.tracker = PromptTracker(len(indices), model=self.selection.model, decay=self.selection.decay)
        chunk = int(self.config.data.train_batch_size)
        self.prompt_sampler = TrackerSampler(self.tracker, chunk, self.selection)
        self.train_dataloader = StatefulDataLoader(
            dataset=self.train_dataset,
            batch_size=self.config.data.get("gen_batch_size", None) or chunk,
            num_workers=self.config.data["dataloader_num_workers"],
            drop_last=True,
            collate_fn=collate_fn,
            sampler=self.prompt_sampler,
        )
        self.train_dataloader_it = None

    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        self.observe_outcomes(batch.keys, batch.partition_id, metrics)
        return super()._compute_advantage(batch, metrics)

    def observe_outcomes(self, keys: list[str], partition_id: str, metrics: dict) -> None:
        """Folds the trained groups `keys`, and the groups the replay buffer evicted or
        discarded since, into the tracker at this step."""
        import transfer_queue as tq

        key = self.selection.success_key
        fields = ["rm_scores", "index"] + (["extra_fields"] if key is not None else [])
        data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=fields)
        outcomes = list(read_outcomes(data, keys, key).values())
        take = getattr(self.replay_buffer, "take_cleared_outcomes", None)
        if take is not None:
            outcomes += [o for o in take() if o.dataset_index is not None]
        if not outcomes:
            return
        try:
            rows = torch.tensor([self.row_of_index[o.dataset_index] for o in outcomes], dtype=torch.int64)
        except KeyError as err:
            raise ValueError(
                f"index {err.args[0]!r} of a trained group is not a training-set extra_info.index"
            ) from None
        out = outcome_advantages(outcomes, AdvantageConfig.from_preset("verl"))
        self.tracker.update(rows, out, int(self.global_steps))
        visits = self.tracker.state["visits"][: self.tracker.num_prompts]
        metrics["bandadv/tracker/groups"] = len(outcomes)
        metrics["bandadv/tracker/pass_rate"] = float(out.stats.pass_rate.mean())
        metrics["bandadv/tracker/seen_fraction"] = float((visits > 0).double().mean())
        metrics["bandadv/tracker/selected_predicted_pass_rate"] = self.prompt_sampler.selected_predicted_pass_rate


__all__ = [
    "BandPPOTrainerSync",
    "BandReplayBuffer",
    "BandReplayBufferAsync",
    "GroupOutcome",
    "SelectionOptions",
    "TrackerSampler",
    "read_outcomes",
    "read_selection_options",
]
