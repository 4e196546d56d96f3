"""verl (0.9.1): advantage estimators `bandadv_grpo`, `bandadv_dr_grpo` and `bandadv_rloo` in
verl's own registry (`verl.trainer.ppo.core_algos.register_adv_est`).

    algorithm.adv_estimator=bandadv_grpo
    +algorithm.bandadv.band=[0.1,0.9] +algorithm.bandadv.accidental_max_successes=1
    +algorithm.bandadv.success_key=acc

They are registered when this module is imported, and by `import verl` itself, which loads
the `verl.plugins` entry point bandadv's package declares (`bandadv = bandadv.integrations.verl`,
pyproject.toml), so verl's driver and Ray workers find them with no code change.

- Numbers: with no `algorithm.bandadv` options (masks off) they are verl's: `bandadv_grpo` is
  verl's `grpo` (`algorithm.norm_adv_by_std_in_grpo` honoured: False gives r - mean),
  `bandadv_dr_grpo` is r - mean, `bandadv_rloo` is verl's `rloo`; a uid with one response is
  scored as verl scores it (mean 0, std 1). They come from `group_advantages(preset="verl")`
  in one fused pass, broadcast over the response tokens (`advantage * response_mask`).
- Options (`algorithm.bandadv.<key>`, any other key is refused at the first call, naming it):
  `band`, `band_inclusive`, `mask_all_equal`, `min_std`, `accidental_max_successes`,
  `accidental_action`, `accidental_clip`, `mask_too_few` (AdvantageConfig's fields), `epsilon`
  (added to the std; default verl's 1e-6), and `success_key`: where the raw correctness lives
  in the batch (`non_tensor_batch`, as verl stores the extra fields a `compute_score` dict
  returns, or `batch`), distinct from the shaped score verl sums into `token_level_rewards`.
  Without it, success is score > 0.5. verl hands registered estimators no batch, only
  `token_level_rewards`, `response_mask`, `index` and `config`; the batch is read from the
  `data` argument of verl's `ray_trainer.compute_advantage` that called the estimator (or from
  `non_tensor_batch=` / `batch=` keywords, for direct callers). The V1 trainer's
  `_compute_advantage` builds that batch from the transfer queue without the reward's extra
  keys; there the key is read from each trajectory's `reward_extra_info` in the queue.
- Groups: verl's per-sample uids (strings, object arrays, ints, tensors) become groups in one
  O(N) pass without sorting: verl repeats each prompt's uid in a contiguous run, so run
  boundaries are where a uid differs from its neighbour; a uid that reappears after another
  falls back to a dict over the runs (groups by first appearance).
- What is not in verl's logs: an estimator has no way to verl's metric dict, so bandadv's
  per-step result (masks, per-prompt statistics) is kept: `last_result()`, and
  `last_metrics()` gives `bandadv/<key>` floats for a trainer that wants to log them.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..advantages import group_advantages
from ..config import AdvantageConfig
from ..types import GroupAdvantages

ESTIMATORS = {"bandadv_grpo": "grpo", "bandadv_dr_grpo": "dr_grpo", "bandadv_rloo": "rloo"}
CONFIG_KEY = "algorithm.bandadv"
# Options under algorithm.bandadv that are AdvantageConfig fields (the rest are verl-side).
ADVANTAGE_OPTIONS = (
    "band",
    "band_inclusive",
    "mask_all_equal",
    "min_std",
    "accidental_max_successes",
    "accidental_action",
    "accidental_clip",
    "mask_too_few",
)
OPTIONS = (*ADVANTAGE_OPTIONS, "epsilon", "success_key")

_last: dict[str, GroupAdvantages] = {}


# ---- uids -> groups ---------------------------------------------------------------------------


def uid_groups(index: Any, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """verl's per-sample uids as groups, in O(N) without sorting.

    Returns ``(offsets, None)`` when every uid occupies one contiguous run (verl's layout:
    ``offsets`` are the runs' CSR boundaries), else ``(None, group_index)`` with group ids
    numbered by first appearance.
    """
    if isinstance(index, torch.Tensor):
        return _tensor_uid_groups(index.reshape(-1), torch.device(device))
    uids = index if isinstance(index, np.ndarray) else np.asarray(index, dtype=object)
    uids = uids.reshape(-1)
    n = uids.shape[0]
    if n == 0:
        return torch.zeros(1, dtype=torch.int64, device=device), None
    starts = np.flatnonzero(_neighbours_differ(uids)) + 1
    bounds = np.empty(starts.shape[0] + 2, dtype=np.int64)
    bounds[0], bounds[1:-1], bounds[-1] = 0, starts, n
    heads = uids[bounds[:-1]].tolist()
    if len(set(heads)) == len(heads):
        return torch.from_numpy(bounds).to(device), None
    first_seen: dict[Any, int] = {}
    run_group = [first_seen.setdefault(h, len(first_seen)) for h in heads]
    sizes = torch.from_numpy(np.diff(bounds))
    group_index = torch.repeat_interleave(torch.tensor(run_group, dtype=torch.int64), sizes)
    return None, group_index.to(device)


def _neighbours_differ(uids: np.ndarray) -> np.ndarray:
    """``uids[1:] != uids[:-1]`` as a bool array, one vectorised pass."""
    if uids.dtype == object:
        # verl's uids are one str object per prompt, repeated by reference (DataProto.repeat),
        # so most neighbours are the same object: compare the object pointers in one integer
        # pass, then compare by value only where the pointers differ (about one per group).
        pointers = _object_pointers(uids)
        if pointers is not None:
            differ = pointers[1:] != pointers[:-1]
            where = np.flatnonzero(differ)
            differ[where] = uids[where + 1] != uids[where]
            return differ
    return np.asarray(uids[1:] != uids[:-1], dtype=bool)


def _object_pointers(uids: np.ndarray) -> np.ndarray | None:
    """The PyObject pointers of a contiguous object array, as integers (a view, no copy)."""
    if not uids.flags.c_contiguous or uids.dtype.itemsize != np.dtype(np.intp).itemsize:
        return None
    interface = dict(uids.__array_interface__)
    interface["typestr"] = np.dtype(np.intp).str
    interface["descr"] = [("", interface["typestr"])]
    return np.asarray(_PointerView(interface, uids))


class _PointerView:
    """Exposes an object array's pointer buffer to numpy; holds the array while a view lives."""

    __slots__ = ("__array_interface__", "base")

    def __init__(self, interface: dict, base: np.ndarray):
        self.__array_interface__, self.base = interface, base


def _tensor_uid_groups(index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = index.shape[0]
    starts = torch.nonzero(index[1:] != index[:-1]).flatten() + 1
    bounds = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), n)]).to(torch.int64)
    heads = index[bounds[:-1]]
    if torch.unique(heads).numel() == heads.numel():
        return bounds.to(device), None
    _, first = np.unique(heads.cpu().numpy(), return_index=True)
    rank = np.empty_like(first)  # group ids by first appearance of each distinct uid
    rank[np.argsort(first, kind="stable")] = np.arange(first.shape[0])
    _, inverse = np.unique(heads.cpu().numpy(), return_inverse=True)
    run_group = torch.from_numpy(rank[inverse.reshape(-1)])
    return None, torch.repeat_interleave(run_group, bounds.diff().cpu()).to(device)


def uid_index(index: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """verl's per-sample uids as integer group ids (by first appearance), O(N)."""
    offsets, group_index = uid_groups(index, device)
    if group_index is not None:
        return group_index
    sizes = offsets.diff()
    return torch.repeat_interleave(torch.arange(sizes.numel(), device=offsets.device), sizes)


# ---- options from verl's algorithm config ------------------------------------------------------


class _Options:
    __slots__ = ("config", "epsilon", "success_key")

    def __init__(self, config: AdvantageConfig, epsilon: float | None, success_key: str | None):
        self.config, self.epsilon, self.success_key = config, epsilon, success_key


_OPTIONS_CACHE: dict[tuple, _Options] = {}


def read_options(config: Any, estimator: str) -> _Options:
    """`algorithm.bandadv` of verl's algorithm config, checked: a bad value raises a
    ValueError naming its config key."""
    section = _get(config, "bandadv")
    if section is None:
        raw: dict[str, Any] = {}
    elif isinstance(section, Mapping) or hasattr(section, "items"):
        raw = _plain(section)
    else:
        raise ValueError(f"{CONFIG_KEY} must be a mapping of options, got {section!r}")
    key = (estimator, repr(sorted(raw.items())))
    cached = _OPTIONS_CACHE.get(key)
    if cached is not None:
        return cached
    unknown = sorted(k for k in raw if k not in OPTIONS)
    if unknown:
        raise ValueError(f"{CONFIG_KEY}.{unknown[0]}: unknown option; {CONFIG_KEY} takes {list(OPTIONS)}")
    fields = {k: raw[k] for k in ADVANTAGE_OPTIONS if raw.get(k) is not None}
    if "band" in fields:
        fields["band"] = _band(fields["band"])
    for name, value in fields.items():
        try:
            AdvantageConfig.from_preset("verl", estimator=estimator, **{name: value})
        except (ValueError, TypeError) as err:
            raise ValueError(f"{CONFIG_KEY}.{name}={value!r}: {err}") from None
    epsilon = raw.get("epsilon")
    if epsilon is not None and (
        isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0
    ):
        raise ValueError(f"{CONFIG_KEY}.epsilon must be a finite number >= 0, got {epsilon!r}")
    success_key = raw.get("success_key")
    if success_key is not None and (not isinstance(success_key, str) or not success_key):
        raise ValueError(f"{CONFIG_KEY}.success_key must be a non-empty string (a batch key), got {success_key!r}")
    options = _Options(AdvantageConfig.from_preset("verl", estimator=estimator, **fields), epsilon, success_key)
    if len(_OPTIONS_CACHE) >= 64:
        _OPTIONS_CACHE.clear()
    _OPTIONS_CACHE[key] = options
    return options


def _band(value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{CONFIG_KEY}.band must be [lo, hi] with 0 <= lo <= hi <= 1, got {value!r}") from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"{CONFIG_KEY}.band must be [lo, hi] with 0 <= lo <= hi <= 1, got {value!r}")
    return lo, hi


def _get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        try:
            return config.get(key, default)
        except (AttributeError, KeyError):
            return default
    return getattr(config, key, default)


def _plain(section: Any) -> dict[str, Any]:
    """An OmegaConf node or mapping as plain Python values."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(section, DictConfig):
            return OmegaConf.to_container(section, resolve=True)
    except ImportError:
        pass
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in section.items()}


# ---- the raw success signal --------------------------------------------------------------------


def _success(key: str, n: int, device: torch.device, non_tensor_batch: Any, batch: Any) -> torch.Tensor:
    if non_tensor_batch is None and batch is None:
        data = _calling_batch()
        if data is None:
            raise ValueError(
                f"{CONFIG_KEY}.success_key={key!r}: no batch to read it from (call through verl's "
                "compute_advantage, or pass non_tensor_batch= / batch=)"
            )
        non_tensor_batch, batch = data.non_tensor_batch, data.batch
    if non_tensor_batch is not None and key in non_tensor_batch:
        values = non_tensor_batch[key]
        try:
            success = torch.as_tensor(np.asarray(values, dtype=np.float32)).to(device)
        except (TypeError, ValueError):
            raise ValueError(
                f"{CONFIG_KEY}.success_key={key!r}: non_tensor_batch[{key!r}] must hold a number or bool "
                f"per response, got {np.asarray(values).dtype} values"
            ) from None
    elif batch is not None and key in batch.keys():
        success = batch[key].to(device)
        success = success.float() if success.dim() == 1 else success.float().sum(-1)
    elif (values := _v1_trainer_success(key, n)) is not None:
        success = torch.as_tensor(values).to(device)
    else:
        available = sorted([*(non_tensor_batch or {}).keys(), *(batch.keys() if batch is not None else ())])
        raise ValueError(
            f"{CONFIG_KEY}.success_key={key!r} is not in the batch (non_tensor_batch or batch); "
            f"keys there: {available}. The keys of a compute_score dict land in non_tensor_batch (in the V1 "
            "trainer, in each trajectory's reward_extra_info)."
        )
    if success.shape != (n,):
        raise ValueError(f"{CONFIG_KEY}.success_key={key!r}: expected {n} values, got shape {tuple(success.shape)}")
    finite = success[torch.isfinite(success)]
    if finite.numel() and not bool(((finite >= 0) & (finite <= 1)).all()):
        raise ValueError(f"{CONFIG_KEY}.success_key={key!r}: values must lie in [0, 1] (raw correctness)")
    return success


def _v1_trainer_success(key: str, n: int) -> np.ndarray | None:
    """`reward_extra_info[key]` of the rows of the V1 trainer's `_compute_advantage` on the stack:
    it builds the estimator's batch from the transfer queue without the reward's extra keys, so
    they are read from there (its rows, in the order of its `batch.keys`)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "_compute_advantage" and frame.f_globals.get("__name__") == (
            "verl.trainer.ppo.v1.trainer_base"
        ):
            break
        frame = frame.f_back
    meta = frame.f_locals.get("batch") if frame is not None else None
    if meta is None or len(getattr(meta, "keys", ())) != n:
        return None
    import transfer_queue as tq

    fields = tq.kv_batch_get(keys=meta.keys, partition_id=meta.partition_id, select_fields=["extra_fields"])
    values = []
    for extra in fields["extra_fields"]:
        extra = getattr(extra, "data", extra)
        info = extra.get("reward_extra_info", {}) if isinstance(extra, Mapping) else {}
        if key not in info:
            return None
        values.append(info[key])
    try:
        return np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(
            f"{CONFIG_KEY}.success_key={key!r}: reward_extra_info[{key!r}] must hold a number or bool per response"
        ) from None


def _calling_batch() -> Any:
    """The DataProto of the verl.trainer.ppo.ray_trainer.compute_advantage call on the stack
    (verl passes registered estimators no batch; GDPO alone gets one)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "compute_advantage" and frame.f_globals.get("__name__") == (
            "verl.trainer.ppo.ray_trainer"
        ):
            return frame.f_locals.get("data")
        frame = frame.f_back
    return None


# ---- the estimators ----------------------------------------------------------------------------


def compute_advantage(
    estimator: str,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    config: Any = None,
    non_tensor_batch: Any = None,
    batch: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One of bandadv's estimators on verl's arguments: (advantages, returns), the same tensor,
    ``[bs, response_length]``. ``norm_adv_by_std_in_grpo`` None reads the algorithm config's."""
    options = read_options(config, estimator)
    cfg = options.config
    if estimator == "grpo":
        if norm_adv_by_std_in_grpo is None:
            norm_adv_by_std_in_grpo = bool(_get(config, "norm_adv_by_std_in_grpo", True))
        if not norm_adv_by_std_in_grpo:
            cfg = dataclasses.replace(cfg, estimator="dr_grpo", scale=None)
    eps = options.epsilon if options.epsilon is not None else epsilon
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        n = scores.shape[0]
        success = None
        if options.success_key is not None:
            success = _success(options.success_key, n, scores.device, non_tensor_batch, batch)
        offsets, group_index = uid_groups(index, scores.device)
        if cfg.estimator == "grpo" and cfg.eps != eps:
            cfg = dataclasses.replace(cfg, eps=float(eps))
        out = group_advantages(
            scores, offsets=offsets, group_index=group_index, success=success, config=cfg, validate=False
        )
        _last["result"] = out
        advantages = broadcast_over_tokens(out.advantages.to(scores.dtype), response_mask)
    return advantages, advantages


def broadcast_over_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``advantages[:, None] * response_mask`` (verl's broadcast), bit for bit. An integer mask
    (verl's attention-mask slice) is converted once and multiplied in place: PyTorch's mixed-dtype
    multiply casts element by element and costs about twice as much at long responses."""
    if response_mask.is_floating_point() or response_mask.dtype == torch.bool:
        return advantages.unsqueeze(-1) * response_mask
    dtype = torch.promote_types(advantages.dtype, response_mask.dtype)
    return response_mask.to(dtype).mul_(advantages.unsqueeze(-1))


def compute_bandadv_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    config: Any = None,
    non_tensor_batch: Any = None,
    batch: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`bandadv_grpo`: (r - mean) / (std + epsilon) per uid (verl's grpo), or r - mean with
    `algorithm.norm_adv_by_std_in_grpo=False`; bandadv's masks from `algorithm.bandadv`."""
    return compute_advantage(
        "grpo", token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, config,
        non_tensor_batch, batch,
    )  # fmt: skip


def compute_bandadv_dr_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    config: Any = None,
    non_tensor_batch: Any = None,
    batch: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`bandadv_dr_grpo`: r - mean per uid (Dr. GRPO, arXiv 2503.20783)."""
    return compute_advantage(
        "dr_grpo", token_level_rewards, response_mask, index, epsilon, None, config, non_tensor_batch, batch
    )


def compute_bandadv_rloo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    config: Any = None,
    non_tensor_batch: Any = None,
    batch: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`bandadv_rloo`: r - mean of the others = n / (n - 1) * (r - mean) per uid (verl's rloo)."""
    return compute_advantage(
        "rloo", token_level_rewards, response_mask, index, epsilon, None, config, non_tensor_batch, batch
    )


ESTIMATOR_FUNCTIONS = {
    "bandadv_grpo": compute_bandadv_grpo_advantage,
    "bandadv_dr_grpo": compute_bandadv_dr_grpo_advantage,
    "bandadv_rloo": compute_bandadv_rloo_advantage,
}


def register() -> None:
    """Registers the estimators with verl's `register_adv_est` (idempotent)."""
    from verl.trainer.ppo.core_algos import register_adv_est

    for name, fn in ESTIMATOR_FUNCTIONS.items():
        register_adv_est(name)(fn)


def last_result() -> GroupAdvantages | None:
    """The GroupAdvantages of the latest call (masks, per-prompt statistics), or None."""
    return _last.get("result")


def last_metrics() -> dict[str, float]:
    """The latest call's `GroupAdvantages.metrics()` as `bandadv/<key>` floats."""
    result = last_result()
    return {} if result is None else {f"bandadv/{k}": v for k, v in result.metrics().items()}


# ---- the drop-in of earlier versions -----------------------------------------------------------


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    *,
    return_result: bool = False,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, GroupAdvantages]:
    """verl's `compute_grpo_outcome_advantage`, fused: (advantages, returns), equal.

    Args:
        token_level_rewards: ``[bs, response_length]``; a response's score is its row sum.
        response_mask: ``[bs, response_length]``.
        index: ``[bs]`` uid per response (numpy array of strings in verl, or a tensor).
        epsilon: added to the group std.
        norm_adv_by_std_in_grpo: False gives Dr. GRPO's r - mean.
        config: accepted for verl's signature; unused.
        return_result: also return the GroupAdvantages.
        **options: AdvantageConfig fields, e.g. band=(0.1, 0.9).
    """
    scores = token_level_rewards.sum(dim=-1)
    offsets, group_index = uid_groups(index, scores.device)
    out = group_advantages(
        scores,
        offsets=offsets,
        group_index=group_index,
        preset="verl",
        eps=epsilon,
        estimator="grpo" if norm_adv_by_std_in_grpo else "dr_grpo",
        **options,
    )
    advantages = broadcast_over_tokens(out.advantages.to(scores.dtype), response_mask)
    return (advantages, advantages, out) if return_result else (advantages, advantages)


try:  # registered on import where verl is installed; the plugin entry point does it in verl's processes
    register()
except ImportError:
    pass
