"""TRL: `BandGRPOTrainer` and `BandRLOOTrainer`, TRL's own trainers with bandadv's advantages,
masks, metrics and prompt selection (TRL 1.16).

    from bandadv.integrations.trl import BandGRPOConfig, BandGRPOTrainer

    args = BandGRPOConfig(output_dir="out", band=[0.1, 0.9], prompt_selection="thompson")
    trainer = BandGRPOTrainer(model, reward_funcs=[accuracy], args=args, train_dataset=dataset)

What changes against the stock trainer, and nothing else:

- Advantages: `bandadv.group_advantages(preset="trl")` on the rewards TRL has gathered from all
  processes (TRL's weighted sum of the reward functions; `scale_rewards` group / batch / none as
  the op's `scale`), each process keeping its own slice. With the masks off (the defaults) the
  numbers are TRL's. RLOO uses `estimator="rloo"` on the reward RLOO itself optimises: after
  `reward_clip_range`, and with `beta > 0` minus `beta` times the sequence's summed log ratio to
  the reference model (RLOO's KL-in-reward). bandadv's reward statistics (mean, std, all-equal
  rule, min_std) then describe that penalised reward; pass rates and the band do not, as long as
  success comes from the raw rewards: from `success_reward`'s function, or by default total raw
  reward > 0.5 (never the penalised one).
- None from reward functions follows TRL: a function returning None does not apply to that
  sample; a sample no function scored is invalid (NaN: out of every statistic, advantage 0), and
  so is one whose `success_reward` function returned None.
- `mask_loss=True`: samples bandadv masks (and invalid ones) also leave the loss's token
  normaliser, through TRL's own loss mask (`tool_mask`, multiplied in) and `num_items_in_batch`.
  That changes the loss where the normaliser counts tokens (loss_type dapo, bnpo, cispo, vespo);
  grpo / sapo / luspo average per sequence and dr_grpo divides by a constant, so there masked
  samples only get advantage 0. RLOO's loss is a mean over sequences: advantage 0 only.
- Metrics: every key of `GroupAdvantages.metrics()` as `bandadv/<key>` in TRL's metric dict.
- Prompt selection (`prompt_selection`): a sampler with RepeatSampler's layout whose chunks
  `PromptTracker.select` picks; the tracker is updated from every training generation batch with
  the gathered prompt ids. The data loader runs ahead of training (accelerate fetches one batch
  ahead, and the Trainer takes a whole accumulation window at once), so the prompts of
  generation batch t are chosen before batch t - 1 is scored: the tracker then knows batches
  0..t-2, one generation batch of lag (each epoch's first chunks are drawn when the epoch starts,
  with no lag; `dataloader_num_workers=w` prefetches w * prefetch_factor batches more). Every
  rank runs the same sampler with the same seed on the same gathered data, so ranks hold
  bit-identical trackers without a broadcast.
  Checkpoints carry the tracker and the chunks already drawn, so a resumed run selects exactly
  what the uninterrupted run would have.
"""

from __future__ import annotations

import inspect
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from torch.utils.data import Sampler

from ..advantages import group_advantages
from ..config import ACCIDENTAL_ACTIONS, AdvantageConfig
from ..tracker import MODELS, STRATEGIES, PromptTracker

PROMPT_ID_COLUMN = "bandadv_prompt_id"  # added to the train dataset when prompt_id_column is None
STATE_FILE = "bandadv_state.pt"  # in each TRL checkpoint folder
TRACKER_MODELS = MODELS


@dataclass
class BandAdvArguments:
    """bandadv's options, as TRL config fields (so TrlParser / HfArgumentParser read them)."""

    band: list[float] | None = field(
        default=None, metadata={"help": "Pass-rate band (lo hi): groups outside it are masked. None: off."}
    )
    band_inclusive: bool = field(default=True, metadata={"help": "Keep lo <= p <= hi (False: lo < p < hi)."})
    mask_all_equal: bool = field(
        default=False, metadata={"help": "Mask groups whose rewards are all identical (DAPO dynamic sampling)."}
    )
    min_std: float | None = field(default=None, metadata={"help": "Mask groups with reward std <= min_std."})
    accidental_max_successes: int = field(
        default=0, metadata={"help": "Flag groups with 1..m successes as accidental (0: off)."}
    )
    accidental_prior_max: float = field(
        default=0.1, metadata={"help": "With a tracker, flag only prompts whose prior pass rate is below this."}
    )
    accidental_action: str = field(
        default="mask", metadata={"help": "'mask' flagged groups, or 'clip' their positive advantages."}
    )
    accidental_clip: float = field(default=1.0, metadata={"help": "Cap on positive advantages with 'clip'."})
    success_reward: str | None = field(
        default=None,
        metadata={"help": "Name of the reward function whose value (in [0, 1]) is the raw success; "
                  "default: success = total reward > 0.5."},
    )  # fmt: skip
    mask_loss: bool = field(
        default=True, metadata={"help": "Masked samples also leave the loss's token normaliser, not only get A = 0."}
    )
    prompt_selection: str | None = field(
        default=None, metadata={"help": f"PromptTracker.select strategy ({', '.join(STRATEGIES)}), or None."}
    )
    tracker_model: str = field(
        default="beta",
        metadata={"help": "PromptTracker model: 'beta', 'logistic' or 'features' (features: pass "
                  "tracker=PromptTracker(len(train_dataset), model='features', features=X))."},
    )  # fmt: skip
    prompt_id_column: str | None = field(
        default=None, metadata={"help": "Dataset column of integer prompt ids (default: the row index)."}
    )

    def _check_bandadv(self) -> None:
        """Refuses bad values, naming the field (the advantage options through AdvantageConfig)."""
        if self.prompt_selection is not None and self.prompt_selection not in STRATEGIES:
            raise ValueError(
                f"prompt_selection must be None or one of {list(STRATEGIES)}, got {self.prompt_selection!r}"
            )
        if self.tracker_model not in TRACKER_MODELS:
            raise ValueError(f"tracker_model must be one of {list(TRACKER_MODELS)}, got {self.tracker_model!r}")
        if self.accidental_action not in ACCIDENTAL_ACTIONS:
            raise ValueError(
                f"accidental_action must be one of {list(ACCIDENTAL_ACTIONS)}, got {self.accidental_action!r}"
            )
        if self.band is not None and len(self.band) != 2:
            raise ValueError(f"band must be two floats (lo, hi), got {self.band!r}")
        for name in ("success_reward", "prompt_id_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
        self.advantage_config(estimator="grpo", scale="group")  # band, min_std, accidental_*: checked there

    def advantage_config(self, estimator: str, scale: str) -> AdvantageConfig:
        """The op's options: TRL's conventions (preset "trl") plus these fields."""
        return AdvantageConfig.from_preset(
            "trl",
            estimator=estimator,
            scale=scale,
            mask_all_equal=self.mask_all_equal,
            band=tuple(self.band) if self.band is not None else None,
            band_inclusive=self.band_inclusive,
            min_std=self.min_std,
            accidental_max_successes=self.accidental_max_successes,
            accidental_prior_max=self.accidental_prior_max,
            accidental_action=self.accidental_action,
            accidental_clip=self.accidental_clip,
        )


@dataclass
class BandGRPOConfig(trl.GRPOConfig, BandAdvArguments):
    """`trl.GRPOConfig` plus bandadv's fields (see BandAdvArguments)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_bandadv()


@dataclass
class BandRLOOConfig(trl.RLOOConfig, BandAdvArguments):
    """`trl.RLOOConfig` plus bandadv's fields (see BandAdvArguments)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_bandadv()


class TrackerRepeatSampler(Sampler[int]):
    """RepeatSampler's layout (each chunk of `batch_size` prompts, every prompt `mini_repeat_count`
    times in a row, the chunk `repeat_count` times), with each chunk chosen by
    `tracker.select(strategy)` among all prompts, when the data loader asks for its first index.

    The generator of chunk c of epoch e is seeded from (seed, e, c), so a selection does not
    depend on how many were drawn before; `replay` holds chunks drawn before a checkpoint."""

    def __init__(
        self,
        tracker: PromptTracker,
        prompt_ids: torch.Tensor,
        batch_size: int,
        mini_repeat_count: int,
        repeat_count: int,
        strategy: str,
        seed: int,
    ) -> None:
        self.tracker = tracker
        self.prompt_ids = prompt_ids.to(tracker.device)  # [num_rows], distinct
        self.row_of_id = {int(i): row for row, i in enumerate(prompt_ids.tolist())}
        self.batch_size, self.mini_repeat_count, self.repeat_count = batch_size, mini_repeat_count, repeat_count
        self.strategy, self.seed = strategy, seed
        self.num_chunks = len(prompt_ids) // batch_size
        self.epoch = 0
        self.drawn: dict[tuple[int, int], list[int]] = {}  # (epoch, chunk) -> rows, the latest 64
        self.replay: dict[tuple[int, int], list[int]] = {}
        self.selection_log: deque[dict[str, Any]] = deque(maxlen=256)  # the latest draws and what they saw

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_chunks * self.batch_size * self.mini_repeat_count * self.repeat_count

    def _chunk(self, epoch: int, chunk: int) -> list[int]:
        key = (epoch, chunk)
        if key in self.replay:
            rows = self.replay.pop(key)
        else:
            gen = torch.Generator(device=self.tracker.device)
            gen.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + chunk)
            ids = self.tracker.select(self.prompt_ids, self.batch_size, self.strategy, gen, validate=False)
            rows = [self.row_of_id[i] for i in ids.tolist()]
        self.drawn[key] = rows
        for old in sorted(self.drawn)[:-64]:  # more than any loader prefetches
            del self.drawn[old]
        visits = int(self.tracker.state["visits"][: self.tracker.num_prompts].sum())
        self.selection_log.append({"epoch": epoch, "chunk": chunk, "rows": rows, "tracker_visits": visits})
        return rows

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        self.epoch += 1  # a next pass without set_epoch draws a new epoch, as RepeatSampler does
        for c in range(self.num_chunks):
            rows = self._chunk(epoch, c)
            for _ in range(self.repeat_count):
                for row in rows:
                    for _ in range(self.mini_repeat_count):
                        yield row


class _BandAdvMixin:
    """What BandGRPOTrainer and BandRLOOTrainer share: construction checks, the advantages, the
    tracker, the sampler and checkpoints. The stock trainer's methods run unchanged around it."""

    _config_class: type
    _estimator: str

    def _bandadv_init(self, trainer_class: type, tracker: PromptTracker | None, args: tuple, kwargs: dict) -> None:
        bound = inspect.signature(trainer_class.__init__).bind(self, *args, **kwargs)
        params = bound.arguments
        config = params.get("args")
        if config is None:  # as the stock trainer: a default config named after the model
            model = params["model"]
            name = model if isinstance(model, str) else model.config._name_or_path
            config = params["args"] = self._config_class(f"{name.split('/')[-1]}-{trainer_class.__name__[:-7]}")
        if not isinstance(config, self._config_class):
            raise TypeError(
                f"args must be a {self._config_class.__name__} (a {trainer_class.__name__[:-7]}Config with bandadv's "
                f"fields), got {type(config).__name__}"
            )
        if tracker is not None and not isinstance(tracker, PromptTracker):
            raise TypeError(f"tracker must be a bandadv.PromptTracker, got {type(tracker).__name__}")
        self._bandadv_check_trainer_options(config)
        uses_tracker = tracker is not None or config.prompt_selection is not None
        dataset, ids = params.get("train_dataset"), None
        if uses_tracker:
            dataset, ids = _prompt_ids(dataset, config, tracker)
            params["train_dataset"] = dataset
            if tracker is None and config.tracker_model == "features":
                raise ValueError(
                    "tracker_model='features' needs tracker=PromptTracker(len(train_dataset), model='features', "
                    "features=X), X one fixed vector per prompt that you compute (bandadv.tracker.features_from_texts)"
                )
            if tracker is None:
                tracker = PromptTracker(len(dataset), model=config.tracker_model)
        self._bandadv_tracker = tracker
        self._bandadv_id_column = (config.prompt_id_column or PROMPT_ID_COLUMN) if uses_tracker else None
        self._bandadv_ids = ids
        self._bandadv_sampler: TrackerRepeatSampler | None = None
        self._bandadv_replay: dict = {}
        self._bandadv_captured: dict[str, Any] = {}
        self._bandadv_last: dict[str, Any] = {}  # the latest batch's result, for tests and callbacks
        trainer_class.__init__(*bound.args, **bound.kwargs)
        if config.success_reward is not None and config.success_reward not in self.reward_func_names:
            raise ValueError(
                f"success_reward={config.success_reward!r} names no reward function; they are {self.reward_func_names}"
            )
        self._bandadv_success_index = (
            self.reward_func_names.index(config.success_reward) if config.success_reward is not None else None
        )

    def _bandadv_check_trainer_options(self, config) -> None:
        """Trainer options bandadv cannot honour, refused before the model is built."""

    def _bandadv_scale(self) -> str:
        return "none"

    # -- advantages ---------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._bandadv_captured["rewards_per_func"] = rewards_per_func  # gathered from all processes
        return rewards_per_func

    def _bandadv_rewards(self, rewards_per_func: torch.Tensor, output: dict) -> torch.Tensor:
        """The scalar reward per sample that the stock trainer normalises (all processes)."""
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # scored by no function: invalid
        return rewards

    def _generate_and_score_completions(self, inputs):
        self._bandadv_captured = {}
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func = self._bandadv_captured.pop("rewards_per_func")
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = self._bandadv_rewards(rewards_per_func, output)
        success = None
        if self._bandadv_success_index is not None:
            success = rewards_per_func[:, self._bandadv_success_index]
        group_ids = None  # the tracker follows training batches only (eval rows carry no prompt id)
        if self._bandadv_tracker is not None and mode == "train":
            group_ids = self._bandadv_group_ids(inputs, group_size)
        prior = None
        if group_ids is not None and self.args.accidental_max_successes > 0:
            prior = self._bandadv_tracker.prior(group_ids)
        config = self.args.advantage_config(self._estimator, self._bandadv_scale())
        out = group_advantages(rewards, group_size, success=success, prior=prior, config=config)

        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        output["advantages"] = out.advantages[local].to(output["advantages"].dtype)
        if self.args.mask_loss:
            self._bandadv_mask_loss(output, out.sample_mask[local])
        for key, value in out.metrics().items():
            self._metrics[mode][f"bandadv/{key}"].append(value)
        logged = self._logs["advantages"]  # the completions table shows the advantages trained on
        for _ in range(min(len(logged), out.advantages.numel())):
            logged.pop()
        logged.extend(out.advantages.tolist())
        if group_ids is not None:
            self._bandadv_tracker.update(group_ids, out, self.state.global_step)
        self._bandadv_last = {"rewards": rewards, "success": success, "result": out, "group_ids": group_ids}
        return output

    def _bandadv_mask_loss(self, output: dict, keep: torch.Tensor) -> None:
        """Masked samples leave the loss mask (so every token normaliser); see the module doc."""

    def _bandadv_group_ids(self, inputs: list[dict], group_size: int) -> torch.Tensor:
        """Prompt id of each group of the gathered batch (its first sample's)."""
        device = self._bandadv_tracker.device
        local = torch.tensor([int(x[self._bandadv_id_column]) for x in inputs], dtype=torch.int64)
        ids = self.accelerator.gather(local.to(self.accelerator.device)).to(device)
        return ids.view(-1, group_size)[:, 0].contiguous()

    # -- prompt selection -----------------------------------------------------------------------
    def _get_train_sampler(self, dataset=None):
        if self.args.prompt_selection is None or (dataset is not None and dataset is not self.train_dataset):
            return super()._get_train_sampler(dataset)
        self._bandadv_sampler = TrackerRepeatSampler(
            self._bandadv_tracker,
            self._bandadv_ids,
            batch_size=self.args.generation_batch_size // self.num_generations,
            mini_repeat_count=self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            strategy=self.args.prompt_selection,
            seed=self.args.seed,
        )
        self._bandadv_sampler.replay = dict(self._bandadv_replay)
        return self._bandadv_sampler

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._bandadv_id_column is not None and self._bandadv_id_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self._bandadv_id_column]

    # -- checkpoints ----------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self._bandadv_tracker is None or not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        drawn = dict(self._bandadv_sampler.drawn) if self._bandadv_sampler is not None else {}
        torch.save({"tracker": self._bandadv_tracker.state_dict(), "drawn": drawn}, os.path.join(folder, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self._bandadv_tracker is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint was not written by a bandadv trainer")
        state = torch.load(path, map_location=self._bandadv_tracker.device, weights_only=False)
        self._bandadv_tracker.load_state_dict(state["tracker"])
        self._bandadv_replay = dict(state["drawn"])
        if self._bandadv_sampler is not None:
            self._bandadv_sampler.replay = dict(state["drawn"])


def _prompt_ids(dataset, config, tracker: PromptTracker | None):
    """The train dataset (with a row-index id column added when prompt_id_column is None) and
    each row's prompt id, checked against the tracker and the selection."""
    import datasets

    if config.prompt_selection is not None and isinstance(
        dataset, datasets.IterableDataset | torch.utils.data.IterableDataset
    ):
        raise ValueError("prompt_selection needs a map-style train_dataset (rows by index); got an iterable dataset")
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(
            f"a tracker (prompt_selection or tracker=) needs train_dataset to be a datasets.Dataset, got "
            f"{type(dataset).__name__}"
        )
    num_rows = len(dataset)
    size = tracker.num_prompts if tracker is not None else num_rows
    if tracker is not None and tracker.num_prompts < num_rows:
        raise ValueError(f"tracker has {tracker.num_prompts} prompts but train_dataset has {num_rows} rows")
    if tracker is not None and tracker.model != config.tracker_model:
        raise ValueError(f"tracker_model={config.tracker_model!r} but the tracker passed has model {tracker.model!r}")
    if config.prompt_id_column is None:
        if PROMPT_ID_COLUMN in dataset.column_names:
            raise ValueError(f"train_dataset already has a column {PROMPT_ID_COLUMN!r}; pass prompt_id_column")
        dataset = dataset.add_column(PROMPT_ID_COLUMN, list(range(num_rows)))
        return dataset, torch.arange(num_rows)
    column = config.prompt_id_column
    if column not in dataset.column_names:
        raise ValueError(f"prompt_id_column={column!r} is not a column of train_dataset ({dataset.column_names})")
    values = dataset[column]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"prompt_id_column={column!r} must hold integer prompt ids")
    ids = torch.tensor(values, dtype=torch.int64)
    if num_rows and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise ValueError(
            f"prompt_id_column={column!r} holds ids in [{int(ids.min())}, {int(ids.max())}], outside the tracker's "
            f"[0, {size})"
        )
    if config.prompt_selection is not None and torch.unique(ids).numel() != num_rows:
        raise ValueError(
            f"prompt_id_column={column!r} must hold distinct ids for prompt_selection (one row per prompt)"
        )
    return dataset, ids


class BandGRPOTrainer(_BandAdvMixin, trl.GRPOTrainer):
    """`trl.GRPOTrainer` with bandadv's advantages, masks, metrics and prompt selection.

    Same constructor as GRPOTrainer, `args` a BandGRPOConfig, plus `tracker=` (a PromptTracker
    of at least len(train_dataset) prompts) to pass your own."""

    _config_class = BandGRPOConfig
    _estimator = "grpo"

    def __init__(self, *args, tracker: PromptTracker | None = None, **kwargs) -> None:
        self._bandadv_init(trl.GRPOTrainer, tracker, args, kwargs)

    def _bandadv_check_trainer_options(self, config) -> None:
        if config.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "multi_objective_aggregation must be 'sum_then_normalize' with bandadv (it normalises one reward per "
                f"sample), got {config.multi_objective_aggregation!r}"
            )

    def _bandadv_scale(self) -> str:
        return self.scale_rewards

    def _bandadv_mask_loss(self, output: dict, keep: torch.Tensor) -> None:
        completion_mask = output["completion_mask"]
        keep = keep.to(completion_mask.dtype).unsqueeze(1)
        tool_mask = output.get("tool_mask")
        output["tool_mask"] = keep * (torch.ones_like(completion_mask) if tool_mask is None else tool_mask)
        loss_mask = completion_mask * output["tool_mask"]
        output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()


class BandRLOOTrainer(_BandAdvMixin, trl.RLOOTrainer):
    """`trl.RLOOTrainer` with bandadv's advantages (estimator "rloo"), masks, metrics and prompt
    selection. With `beta > 0` bandadv sees RLOO's KL-penalised reward (see the module doc)."""

    _config_class = BandRLOOConfig
    _estimator = "rloo"

    def __init__(self, *args, tracker: PromptTracker | None = None, **kwargs) -> None:
        self._bandadv_logps: list[torch.Tensor] | None = None
        self._bandadv_init(trl.RLOOTrainer, tracker, args, kwargs)

    def _bandadv_check_trainer_options(self, config) -> None:
        if config.normalize_advantages:
            raise ValueError(
                "normalize_advantages must be False with bandadv (RLOO's batch normalisation of advantages is not an "
                "op option); use BandGRPOTrainer with scale_rewards='batch' for a batch-scaled estimator"
            )

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self._bandadv_logps is not None:  # inside _generate_and_score_completions: old, then ref
            self._bandadv_logps.append(result[0])
        return result

    def _generate_and_score_completions(self, inputs):
        self._bandadv_logps = []
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._bandadv_logps = None

    def _bandadv_rewards(self, rewards_per_func: torch.Tensor, output: dict) -> torch.Tensor:
        rewards = super()._bandadv_rewards(rewards_per_func, output)
        if self.reward_clip_range:
            rewards = rewards.clamp(min=self.reward_clip_range[0], max=self.reward_clip_range[1])
        if self.beta != 0.0:
            # RLOO's KL in the reward (rloo_trainer.py, _generate_and_score_completions): beta times
            # the summed first-order log ratio old - ref over the completion.
            if len(self._bandadv_logps) != 2:
                raise RuntimeError(
                    f"expected RLOO to compute old and reference log-probs once each, saw {len(self._bandadv_logps)} "
                    "calls: this TRL version is not supported by bandadv's RLOO adapter"
                )
            old, ref = self._bandadv_logps
            kl = ((old - ref) * output["completion_mask"]).sum(-1)
            rewards = rewards - self.beta * self.accelerator.gather(kl)
        return rewards
