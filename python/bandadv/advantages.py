"""The public entry point: :func:`group_advantages`."""

from __future__ import annotations

from typing import Any, Literal

import torch

from . import ops
from .config import OPTION_NAMES, AdvantageConfig
from .reference import reference_group_advantages
from .types import GroupAdvantages, GroupStats

Backend = Literal["auto", "cpu", "cuda", "triton", "torch"]
BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    *,
    offsets: torch.Tensor | None = None,
    group_index: torch.Tensor | None = None,
    success: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
    config: AdvantageConfig | None = None,
    preset: str | None = None,
    backend: Backend = "auto",
    return_index: bool = False,
    validate: bool = True,
    out: GroupAdvantages | None = None,
    **options: Any,
) -> GroupAdvantages:
    """Group-relative advantages, success statistics and band masks in one fused pass.

    Args:
        rewards: ``[N]`` rewards (float16/bfloat16/float32/float64; bool and integers are read
            as float32), rollouts of one prompt contiguous; or ``[num_groups, G]``.
        group_size: G, for contiguous groups of equal size.
        offsets: integer ``[num_groups + 1]`` boundaries of contiguous ragged groups.
        group_index: integer group id per sample, in any order; per-group outputs are then
            ordered by ascending id. Sorting by id reads the ids back to the host.
        success: ``[N]`` bool or float in [0, 1], the raw success that pass rates count;
            default ``rewards > 0.5``.
        valid: ``[N]`` bool; invalid samples, and samples whose reward or success is NaN or
            infinite, are left out of every statistic and get advantage 0.
        prior: ``[num_groups]`` earlier pass-rate estimate per prompt (accidental-success rule).
        config: an :class:`AdvantageConfig`; ``preset`` ("trl", "verl", "openrlhf") and keyword
            ``options`` (its field names) build one instead, or override its fields. Building
            one validates every option (a few µs, as much as a small call): a trainer builds
            its config once and passes ``config=`` each step.
        backend: "auto", "cpu" (C++), "cuda", "triton" or "torch" (the float64 reference).
        return_index: also return ``kept_index``, the kept samples' indices, padded with -1.
        validate: check values that live on the device (offsets, success, prior ranges);
            False skips those host reads, for CUDA-graph capture. Shape, dtype and device
            checks always run, and the kernels check offsets themselves (on a GPU, with a
            device-side assert).
        out: the result of an earlier call with the same shapes, dtypes and return_index, whose
            tensors are then overwritten instead of allocated: a trainer passes last step's
            result to reuse its buffers (at a million samples, fresh outputs cost page faults).
            Not with group_index.

    Returns:
        :class:`GroupAdvantages`. Advantage of a valid sample of a kept group, for grpo:
        ``(r - mean) / (std + eps)`` (DeepSeekMath, arXiv 2402.03300); see AdvantageConfig.
    """
    # The checks are ordered so that a trainer's usual call (its config, a tensor, group_size)
    # passes them in few steps: at 512 x 16 the whole call is ~10 us, and the op alone ~8.6.
    cfg = config if type(config) is AdvantageConfig and not options and preset is None else None
    if cfg is None:
        cfg = _resolve_config(config, preset, options)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if type(rewards) is not torch.Tensor and not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() == 2:
        rewards, group_size, success, valid = _flatten_2d(rewards, group_size, success, valid)
    if out is not None and not isinstance(out, GroupAdvantages):
        raise TypeError(f"out must be a GroupAdvantages (the result of an earlier call), got {type(out).__name__}")
    if offsets is not None or group_index is not None or group_size is None:
        _check_layout(group_size, offsets, group_index)
        if group_index is not None:
            if out is not None:
                raise ValueError("out= needs group_size or offsets: with group_index, results are scattered back")
            return _by_group_index(rewards, group_index, success, valid, prior, cfg, backend, return_index, validate)
    elif type(group_size) is not int and (isinstance(group_size, bool) or not isinstance(group_size, int)):
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    elif group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if validate and (offsets is not None or success is not None or prior is not None):
        _check_values(rewards, group_size, offsets, success, valid, prior, backend)
    if backend == "auto" and out is None and _ENTRY is not None and not _is_compiling():
        # The usual call: bandadv._C's entry (_run's first choice), inline.
        if not (rewards.is_cuda and ops.TRITON_FOR_CUDA):
            result = _ENTRY(rewards, group_size or 0, offsets, success, valid, prior, cfg._op_options, return_index)
            if result is not NotImplemented:
                return result
    result = _run(rewards, group_size or 0, offsets, success, valid, prior, cfg, backend, return_index, out)
    return result if out is None else out  # out= gives back the caller's out, whichever path wrote it


def _check_layout(group_size, offsets, group_index) -> None:
    """Exactly one group layout is given (group_size when given alone is checked by the caller)."""
    given = [
        n for n, v in (("group_size", group_size), ("offsets", offsets), ("group_index", group_index)) if v is not None
    ]
    if len(given) != 1:
        raise ValueError(f"give exactly one group layout (group_size, offsets or group_index), got {given or 'none'}")


def _resolve_config(config: AdvantageConfig | None, preset: str | None, options: dict[str, Any]) -> AdvantageConfig:
    """The call's config. Keyword options and presets build (and validate) a new one on every
    call, which costs a few microseconds; a trainer builds its AdvantageConfig once and passes
    config= each step."""
    if config is None:
        return AdvantageConfig.from_preset(preset, **options)
    if preset is not None:
        raise ValueError("give config or preset, not both")
    if not isinstance(config, AdvantageConfig):
        raise TypeError(f"config must be an AdvantageConfig, got {type(config).__name__}")
    if not options:
        return config
    fields = {name: getattr(config, name) for name in OPTION_NAMES}
    if "estimator" in options and "scale" not in options:
        del fields["scale"]  # let the new estimator pick its default scale
    return AdvantageConfig.from_preset(None, **{**fields, **options})


def _flatten_2d(rewards, group_size, success, valid):
    if rewards.dim() != 2:
        return rewards, group_size, success, valid
    g = rewards.shape[1]
    if group_size is not None and group_size != g:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}, so group_size must be {g}, got {group_size}")

    def flat(t: torch.Tensor | None, name: str) -> torch.Tensor | None:
        if t is None or t.dim() == 1:
            return t
        if t.shape != rewards.shape:
            raise ValueError(f"{name} must have the shape of rewards {tuple(rewards.shape)}, got {tuple(t.shape)}")
        return t.reshape(-1)

    return rewards.reshape(-1), g, flat(success, "success"), flat(valid, "valid")


def _check_values(rewards, group_size, offsets, success, valid, prior, backend) -> None:
    """Checks that read tensor values (a host sync on a GPU), after the shape and dtype checks
    that they rely on. The compiled CPU kernel checks the values of offsets itself, and every
    kernel checks shapes and dtypes, so a call with nothing else to read skips both here."""
    # backend="torch" reads offsets in _run whatever `validate` says
    read_offsets = offsets is not None and backend != "torch" and (rewards.device.type != "cpu" or backend == "triton")
    read_success = success is not None and success.is_floating_point()
    if not (read_offsets or read_success or prior is not None) or torch.compiler.is_compiling():
        return
    ops.check_inputs(rewards, group_size or 0, offsets, success, valid, prior)
    if read_offsets:
        ops.check_offsets(offsets, rewards.shape[0])
    if read_success and success.numel():
        s = success[torch.isfinite(success)]
        if s.numel() and not bool(((s >= 0) & (s <= 1)).all()):
            raise ValueError("success must lie in [0, 1] (a bool, or a float credit per sample)")
    if prior is not None and prior.is_floating_point() and prior.numel():
        p = prior[~torch.isnan(prior)]
        if p.numel() and not bool(((p >= 0) & (p <= 1)).all()):
            raise ValueError("prior must lie in [0, 1] (NaN for prompts with no estimate)")


def _run(rewards, group_size, offsets, success, valid, prior, cfg, backend, return_index, out=None):
    """One op call on the backend asked for, and its result, a GroupAdvantages (with out=, the
    eager entry's is None: the caller returns its `out` in either case)."""
    buffers = _op_buffers(out, rewards, return_index) if out is not None else None
    if backend == "auto":
        use_triton = rewards.is_cuda and ops.TRITON_FOR_CUDA
    elif backend == "torch":
        return _run_reference(rewards, group_size, offsets, success, valid, prior, cfg, return_index, buffers)
    elif backend == "triton":
        use_triton = True
    else:  # cpu, cuda
        if rewards.device.type != backend:
            raise ValueError(f"backend={backend!r} needs rewards on {backend}, got {rewards.device}")
        if backend.upper() not in ops.COMPILED:
            raise RuntimeError(
                f"backend={backend!r}: bandadv was built without its {backend.upper()} kernel"
                + (f" ({ops.EXTENSION_ERROR})" if ops.EXTENSION_ERROR else "")
            )
        use_triton = False
    if not use_triton and _ENTRY is not None and not _is_compiling():
        # bandadv._C's entry: the op through the dispatcher, and the GroupAdvantages (see ops.ENTRY)
        result = _ENTRY(rewards, group_size, offsets, success, valid, prior, cfg._op_options, return_index, buffers)
        if result is not NotImplemented:
            return result
    outs = ops.group_advantages_op(
        rewards, group_size, offsets, success, valid, prior, cfg, return_index, triton=use_triton, out=buffers
    )  # fmt: skip
    return _result(outs, return_index)


_is_compiling = torch.compiler.is_compiling
_ENTRY = ops.ENTRY


def _run_reference(rewards, group_size, offsets, success, valid, prior, cfg, return_index, buffers) -> GroupAdvantages:
    """backend="torch": the float64 reference, with the kernels' checks."""
    ops.check_inputs(rewards, group_size, offsets, success, valid, prior)
    if offsets is not None:
        ops.check_offsets(offsets, rewards.shape[0])
    ref = reference_group_advantages(
        rewards, group_size=group_size or None, offsets=offsets, success=success, valid=valid, prior=prior,
        config=cfg, return_index=return_index,
    )  # fmt: skip
    outs = ops.op_outputs(ref, rewards)
    if buffers is not None:
        ops.check_out(buffers, dict(rewards=rewards, group_size=group_size, offsets=offsets, return_index=return_index))
        outs = tuple(b.copy_(o) for b, o in zip(buffers, outs, strict=True))
    return _result(outs, return_index)


def _op_buffers(out: GroupAdvantages, rewards: torch.Tensor, return_index: bool) -> tuple[torch.Tensor, ...]:
    """An earlier result's tensors as the op's outputs, to be written in place."""
    if (out.kept_index is not None) != return_index:
        raise ValueError(f"out comes from a call with return_index={not return_index}, this one has {return_index}")
    if return_index:
        kept_index = out.kept_index
    else:  # an empty tensor made once (eager), or in the graph being traced
        kept_index = rewards.new_empty(0, dtype=torch.int64) if _is_compiling() else ops.empty_index(rewards.device)
    return (
        out.advantages, out.sample_mask, out.reason, out.group_mask, out.stats.count, out.stats.values,
        out.num_kept, kept_index,
    )  # fmt: skip


def _result(outs: tuple[torch.Tensor, ...], return_index: bool) -> GroupAdvantages:
    """The op's outputs (ops.OUTPUT_NAMES) as a GroupAdvantages, where torch.ops ran the op (the
    eager entry builds it itself). Built with tuple.__new__, which is what the named tuples' own
    __new__ calls, for half their cost (~0.25 us)."""
    advantages, sample_mask, reason, group_mask, count, group_stats, num_kept, kept_index = outs
    stats = _new_tuple(GroupStats, (count, group_stats))
    return _new_tuple(
        GroupAdvantages,
        (advantages, sample_mask, reason, group_mask, stats, num_kept, kept_index if return_index else None),
    )


_new_tuple = tuple.__new__


def _by_group_index(rewards, group_index, success, valid, prior, cfg, backend, return_index, validate):
    """Sorts samples stably by group id, runs on contiguous groups, scatters back."""
    if group_index.dim() != 1 or group_index.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"group_index must have shape [{rewards.shape[0]}] like rewards, got {tuple(group_index.shape)}"
        )
    if group_index.is_floating_point() or group_index.is_complex() or group_index.dtype == torch.bool:
        raise ValueError(f"group_index must be an integer tensor, got {group_index.dtype}")
    if group_index.device != rewards.device:
        raise ValueError(f"group_index is on {group_index.device} but rewards is on {rewards.device}")
    order = torch.argsort(group_index, stable=True)
    _, sizes = torch.unique_consecutive(group_index[order], return_counts=True)
    offsets = torch.zeros(sizes.numel() + 1, dtype=torch.int64, device=rewards.device)
    torch.cumsum(sizes, 0, out=offsets[1:])

    ops.check_inputs(rewards, 0, offsets, success, valid, prior)

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return t[order] if t is not None else None

    if validate:
        _check_values(rewards, 0, None, success, valid, prior, backend)
    out = _run(rewards[order], 0, offsets, take(success), take(valid), prior, cfg, backend, False)
    advantages = torch.empty_like(out.advantages).index_put_((order,), out.advantages)
    sample_mask = torch.empty_like(out.sample_mask).index_put_((order,), out.sample_mask)
    kept_index = _kept_index(sample_mask) if return_index else None
    return GroupAdvantages(
        advantages=advantages, sample_mask=sample_mask, reason=out.reason, group_mask=out.group_mask,
        stats=out.stats, num_kept=out.num_kept, kept_index=kept_index,
    )  # fmt: skip


def _kept_index(sample_mask: torch.Tensor) -> torch.Tensor:
    """Ascending indices of True entries, padded with -1, without a host sync."""
    n = sample_mask.shape[0]
    slot = torch.cumsum(sample_mask, 0) - 1
    slot = torch.where(sample_mask, slot, n)  # unkept samples write to a spill slot
    index = torch.full((n + 1,), -1, dtype=torch.int64, device=sample_mask.device)
    index.scatter_(0, slot, torch.arange(n, device=sample_mask.device))
    index[n] = -1
    return index[:n]
