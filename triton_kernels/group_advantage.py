"""Triton kernel of bandadv.group_advantages.

Each program owns ROWS groups and reads them as a [ROWS, BLOCK] tile, looping over BLOCK-wide
chunks for groups longer than BLOCK: every chunk is reduced two-pass in registers (corrected
two-pass) and Chan-merged into the row's running moments, as in csrc/group_math.h, whose
functions the `_finish` and `_advantage` helpers below mirror line by line. A second sweep over
the (cached) rewards writes advantages and the sample mask. fp16/bf16 load and upcast in-kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Reason bits (csrc/group_math.h, bandadv.Reason).
ALL_EQUAL = tl.constexpr(1)
BELOW_BAND = tl.constexpr(2)
ABOVE_BAND = tl.constexpr(4)
LOW_STD = tl.constexpr(8)
ACCIDENTAL_SUCCESS = tl.constexpr(16)
TOO_FEW = tl.constexpr(32)

LOW_STD_SLACK = tl.constexpr(1e-5)  # kLowStdSlack of csrc/group_math.h

# Estimator and scale codes.
GRPO = tl.constexpr(0)
DR_GRPO = tl.constexpr(1)
RLOO = tl.constexpr(2)
SCALE_GROUP = tl.constexpr(0)
SCALE_BATCH = tl.constexpr(1)
SCALE_NONE = tl.constexpr(2)


@triton.jit
def _f64(bits):
    """A float64 option passed as its int64 bit pattern: Triton would narrow a Python float
    argument to float32, and the band must be compared in float64 as on every other backend."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """a / b rounded to nearest, as in C++ and CUDA: Triton's float32 `/` is an approximate
    division on the GPU (its float64 `/` is IEEE)."""
    if ACC == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """sqrt rounded to nearest: Triton's float32 tl.sqrt is approximate on the GPU."""
    if ACC == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _group_bounds(OFFSETS, rows, row_ok, num_groups, num_samples, group_size, FIXED: tl.constexpr):
    """Each row's first sample and size, and whether its offsets are bad: out of order or outside
    [0, N], a first one that is not 0 or a last one that is not N (offsets are read on the device
    only). A row with bad offsets reads as empty, so no access leaves the tensors."""
    if FIXED:
        begin = rows.to(tl.int64) * group_size
        size = tl.where(row_ok, group_size, 0).to(tl.int64)
        bad = rows < 0  # all False
    else:
        begin = tl.load(OFFSETS + rows, mask=row_ok, other=0).to(tl.int64)
        end = tl.load(OFFSETS + rows + 1, mask=row_ok, other=0).to(tl.int64)
        good = (begin >= 0) & (begin <= end) & (end <= num_samples)
        good = good & ((rows > 0) | (begin == 0)) & ((rows < num_groups - 1) | (end == num_samples))
        bad = row_ok & ~good
        begin = tl.where(good, begin, 0)
        size = tl.where(row_ok & good, end - begin, 0)
    return begin, size, bad


@triton.jit
def _load_chunk(REWARDS, SUCCESS, VALID, begin, size, start, cols,
                HAS_SUCCESS: tl.constexpr, HAS_VALID: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Rewards, success and validity of one [ROWS, BLOCK] chunk (sample_is_valid)."""
    pos = start + cols
    in_group = pos[None, :] < size[:, None]
    idx = begin[:, None] + pos[None, :]
    r = tl.load(REWARDS + idx, mask=in_group, other=0.0).to(ACC)
    if HAS_SUCCESS:
        s = tl.load(SUCCESS + idx, mask=in_group, other=0.0).to(ACC)
    else:
        s = tl.where(r > 0.5, 1.0, 0.0).to(ACC)
    ok = in_group & ((r - r) == 0.0) & ((s - s) == 0.0)  # finite reward and success
    if HAS_VALID:
        ok = ok & (tl.load(VALID + idx, mask=in_group, other=0) != 0)
    return r, s, ok, idx


@triton.jit
def _finish(n_i, k, mean, m2, lo, hi, prior, has_prior, batch_std,
            eps, band_lo, band_hi, min_std, accidental_max, accidental_prior_max,
            ESTIMATOR: tl.constexpr, SCALE: tl.constexpr, UNBIASED: tl.constexpr, SINGLETON_RAW: tl.constexpr,
            MASK_ALL_EQUAL: tl.constexpr, USE_BAND: tl.constexpr, BAND_INCLUSIVE: tl.constexpr,
            USE_MIN_STD: tl.constexpr, CLIP_ACTION: tl.constexpr, MASK_TOO_FEW: tl.constexpr,
            ACC: tl.constexpr):  # fmt: skip
    """finish_group and group_reason of csrc/group_math.h, over a vector of groups."""
    n = n_i.to(ACC)
    all_equal = (n_i > 0) & (lo == hi)
    mean = tl.where(all_equal, lo, mean)
    m2 = tl.where(all_equal, 0.0, m2)
    if UNBIASED:
        var = tl.where(n_i >= 2, _div(m2, tl.maximum(n - 1.0, 1.0), ACC), 0.0)
    else:
        var = tl.where(n_i >= 2, _div(m2, tl.maximum(n, 1.0), ACC), 0.0)
    std = _sqrt(var, ACC)
    mean = tl.where(n_i > 0, mean, 0.0)
    pass_rate = tl.where(n_i > 0, _div(k, tl.maximum(n, 1.0), ACC), 0.0)
    success_var = pass_rate * (1.0 - pass_rate)

    reason = tl.zeros(n_i.shape, dtype=tl.int32)
    if MASK_TOO_FEW:
        reason = tl.where(n_i < 2, reason | TOO_FEW, reason)
    if MASK_ALL_EQUAL:
        reason = tl.where((n_i >= 2) & all_equal, reason | ALL_EQUAL, reason)
    if USE_MIN_STD:
        reason = tl.where(
            (n_i >= 2) & (std.to(tl.float64) <= min_std * (1.0 + LOW_STD_SLACK)), reason | LOW_STD, reason
        )
    p64 = k.to(tl.float64) / tl.maximum(n_i, 1).to(tl.float64)  # band decided in float64
    if USE_BAND:
        if BAND_INCLUSIVE:
            below = p64 < band_lo
            above = p64 > band_hi
        else:
            below = p64 <= band_lo
            above = p64 >= band_hi
        reason = tl.where(below, reason | BELOW_BAND, reason)
        reason = tl.where(above, reason | ABOVE_BAND, reason)
    k64 = k.to(tl.float64)
    few_hits = (k64 >= 1.0) & (k64 <= accidental_max)  # accidental_max = 0: never
    prior_known = has_prior & (prior == prior)
    hard = (~prior_known) | (prior.to(tl.float64) < accidental_prior_max)
    reason = tl.where(few_hits & hard, reason | ACCIDENTAL_SUCCESS, reason)
    reason = tl.where(n_i == 0, TOO_FEW, reason)  # nothing to learn from, whatever the options

    if CLIP_ACTION:
        masking = ALL_EQUAL | BELOW_BAND | ABOVE_BAND | LOW_STD | TOO_FEW
    else:
        masking = ALL_EQUAL | BELOW_BAND | ABOVE_BAND | LOW_STD | TOO_FEW | ACCIDENTAL_SUCCESS
    kept = (reason & masking) == 0
    clip = kept & ((reason & ACCIDENTAL_SUCCESS) != 0)

    lone = n_i == 1
    if SINGLETON_RAW:
        raw = lone
    else:
        raw = n_i < 0  # all False
    center = tl.where(raw, 0.0, mean)
    group_std = tl.where(raw, 1.0, std)
    factor = tl.full(n_i.shape, 1.0, ACC)
    denom = tl.full(n_i.shape, 1.0, ACC)
    if ESTIMATOR == GRPO:
        if SCALE == SCALE_GROUP:
            denom = group_std + eps.to(ACC)  # eps rounded to ACC first, as acc_t(o.eps) in C++
        if SCALE == SCALE_BATCH:
            denom = denom * 0.0 + batch_std + eps.to(ACC)
    if ESTIMATOR == RLOO:
        factor = tl.where(n_i >= 2, _div(n, tl.maximum(n - 1.0, 1.0), ACC), factor)
    factor = tl.where(lone & ~raw, 0.0, factor)
    factor = tl.where(kept, factor, 0.0)
    live = (factor != 0.0) & (denom != 0.0)  # finish_group: a zero factor or denominator gives 0
    denom = tl.where(live, denom, 1.0)
    return mean, std, var, pass_rate, success_var, reason, kept, clip, center, factor, denom, live


@triton.jit
def _group_advantages_fwd_kernel(
    REWARDS, SUCCESS, VALID, PRIOR, OFFSETS, BATCH_STD,
    ADVANTAGES, SAMPLE_MASK, REASON, GROUP_MASK, COUNT, SUCCESSES, MEAN, STD, PASS_RATE, SUCCESS_VAR, REWARD_VAR,
    KEPT_COUNT, BAD_OFFSETS,
    num_groups, num_samples, group_size,
    eps, band_lo, band_hi, min_std, accidental_max, accidental_prior_max, accidental_clip,
    ESTIMATOR: tl.constexpr, SCALE: tl.constexpr, UNBIASED: tl.constexpr, SINGLETON_RAW: tl.constexpr,
    MASK_ALL_EQUAL: tl.constexpr, USE_BAND: tl.constexpr, BAND_INCLUSIVE: tl.constexpr,
    USE_MIN_STD: tl.constexpr, CLIP_ACTION: tl.constexpr, MASK_TOO_FEW: tl.constexpr,
    HAS_SUCCESS: tl.constexpr, HAS_VALID: tl.constexpr, HAS_PRIOR: tl.constexpr, FIXED: tl.constexpr,
    MOMENTS_ONLY: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    eps = _f64(eps)
    band_lo = _f64(band_lo)
    band_hi = _f64(band_hi)
    min_std = _f64(min_std)
    accidental_max = _f64(accidental_max)  # as bits: an int argument equal to 1 would be specialised
    accidental_prior_max = _f64(accidental_prior_max)
    accidental_clip = _f64(accidental_clip)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_groups
    begin, size, bad = _group_bounds(OFFSETS, rows, row_ok, num_groups, num_samples, group_size, FIXED)
    if not FIXED and not MOMENTS_ONLY:
        tl.atomic_add(BAD_OFFSETS, tl.sum(bad.to(tl.int32), axis=0))
    longest = tl.max(size, axis=0)
    cols = tl.arange(0, BLOCK)

    n = tl.zeros([ROWS], dtype=tl.int32)
    k = tl.zeros([ROWS], dtype=ACC)
    mean = tl.zeros([ROWS], dtype=ACC)
    m2 = tl.zeros([ROWS], dtype=ACC)
    lo = tl.zeros([ROWS], dtype=ACC)
    hi = tl.zeros([ROWS], dtype=ACC)
    for start in range(0, longest, BLOCK):
        r, s, ok, idx = _load_chunk(REWARDS, SUCCESS, VALID, begin, size, start, cols, HAS_SUCCESS, HAS_VALID, ACC)
        cn = tl.sum(ok.to(tl.int32), axis=1)
        cnf = tl.maximum(cn, 1).to(ACC)
        shift = _div(tl.sum(tl.where(ok, r, 0.0), axis=1), cnf, ACC)
        d = tl.where(ok, r - shift[:, None], 0.0)
        sum_d = tl.sum(d, axis=1)
        cmean = shift + _div(sum_d, cnf, ACC)  # set_two_pass
        cm2 = tl.maximum(tl.sum(d * d, axis=1) - sum_d * _div(sum_d, cnf, ACC), 0.0)
        ck = tl.sum(tl.where(ok, s, 0.0), axis=1)
        clo = tl.min(tl.where(ok, r, float("inf")), axis=1)
        chi = tl.max(tl.where(ok, r, -float("inf")), axis=1)
        # merge_moments (Chan et al.), with empty sides passing the other through
        total = n + cn
        na = n.to(ACC)
        nb = cn.to(ACC)
        nt = tl.maximum(total, 1).to(ACC)
        delta = cmean - mean
        merged_mean = mean + delta * _div(nb, nt, ACC)
        merged_m2 = m2 + cm2 + delta * delta * _div(na * nb, nt, ACC)
        first = n == 0
        empty = cn == 0
        mean = tl.where(empty, mean, tl.where(first, cmean, merged_mean))
        m2 = tl.where(empty, m2, tl.where(first, cm2, merged_m2))
        lo = tl.where(empty, lo, tl.where(first, clo, tl.minimum(lo, clo)))
        hi = tl.where(empty, hi, tl.where(first, chi, tl.maximum(hi, chi)))
        k += ck
        n = total

    if MOMENTS_ONLY:  # first launch of scale="batch": per-group (n, mean, m2) for the batch merge
        tl.store(COUNT + rows, n, mask=row_ok)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(REWARD_VAR + rows, m2, mask=row_ok)
    else:
        if HAS_PRIOR:
            prior = tl.load(PRIOR + rows, mask=row_ok, other=0.0).to(ACC)
        else:
            prior = tl.zeros([ROWS], dtype=ACC)
        batch_std = 0.0
        if SCALE == SCALE_BATCH:
            batch_std = tl.load(BATCH_STD).to(ACC)
        mean, std, var, pass_rate, success_var, reason, kept, clip, center, factor, denom, live = _finish(
            n, k, mean, m2, lo, hi, prior, HAS_PRIOR, batch_std,
            eps, band_lo, band_hi, min_std, accidental_max, accidental_prior_max,
            ESTIMATOR, SCALE, UNBIASED, SINGLETON_RAW, MASK_ALL_EQUAL, USE_BAND, BAND_INCLUSIVE,
            USE_MIN_STD, CLIP_ACTION, MASK_TOO_FEW, ACC,
        )  # fmt: skip
        tl.store(REASON + rows, reason, mask=row_ok)
        tl.store(GROUP_MASK + rows, kept.to(tl.int1), mask=row_ok)
        tl.store(COUNT + rows, n, mask=row_ok)
        tl.store(SUCCESSES + rows, k, mask=row_ok)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(STD + rows, std, mask=row_ok)
        tl.store(PASS_RATE + rows, pass_rate, mask=row_ok)
        tl.store(SUCCESS_VAR + rows, success_var, mask=row_ok)
        tl.store(REWARD_VAR + rows, var, mask=row_ok)

        kept_count = tl.zeros([ROWS], dtype=tl.int64)
        for start in range(0, longest, BLOCK):
            r, s, ok, idx = _load_chunk(REWARDS, SUCCESS, VALID, begin, size, start, cols, HAS_SUCCESS, HAS_VALID, ACC)
            keep = ok & kept[:, None]
            a = _div((r - center[:, None]) * factor[:, None], denom[:, None], ACC)
            a = tl.where(clip[:, None], tl.minimum(a, accidental_clip.to(ACC)), a)
            a = tl.where(keep & live[:, None], a, 0.0)
            in_group = (start + cols)[None, :] < size[:, None]
            tl.store(ADVANTAGES + idx, a, mask=in_group)
            tl.store(SAMPLE_MASK + idx, keep.to(tl.int1), mask=in_group)
            kept_count += tl.sum(keep.to(tl.int64), axis=1)
        tl.store(KEPT_COUNT + rows, kept_count, mask=row_ok)


@triton.jit
def _kept_index_kernel(SAMPLE_MASK, OFFSETS, FIRST_SLOT, KEPT_INDEX, num_groups, num_samples, group_size,
                       FIXED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Writes each kept sample's index at its group's first slot plus its rank in the group."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_groups
    begin, size, _ = _group_bounds(OFFSETS, rows, row_ok, num_groups, num_samples, group_size, FIXED)
    slot = tl.load(FIRST_SLOT + rows, mask=row_ok, other=0)
    cols = tl.arange(0, BLOCK)
    for start in range(0, tl.max(size, axis=0), BLOCK):
        pos = start + cols
        in_group = pos[None, :] < size[:, None]
        idx = begin[:, None] + pos[None, :]
        keep = tl.load(SAMPLE_MASK + idx, mask=in_group, other=0).to(tl.int64)
        rank = tl.cumsum(keep, axis=1) - 1
        at = slot[:, None] + rank  # < N unless bad offsets made groups overlap
        tl.store(KEPT_INDEX + at, idx, mask=in_group & (keep != 0) & (at < num_samples))
        slot += tl.sum(keep, axis=1)


# ---------------------------------------------------------------------------------------------
# Launcher: the op's arguments in, the op's outputs out. Needs torch only here, so the
# kernels above stay importable on their own.

import struct  # noqa: E402

import torch  # noqa: E402

_ESTIMATORS = {"grpo": 0, "dr_grpo": 1, "rloo": 2}
OFFSETS_ERROR = "bandadv.group_advantages: offsets must start at 0, be non-decreasing and end at N"
_SCALES = {"group": 0, "batch": 1, "none": 2}


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _tile(num_samples: int, num_groups: int, group_size: int) -> tuple[int, int]:
    """(ROWS, BLOCK): BLOCK covers a typical group (up to 1024, longer ones loop), and ROWS
    packs small groups so that 512 groups of 16 make a few programs, not 512."""
    typical = group_size if group_size > 0 else max(1, num_samples // max(num_groups, 1))
    block = min(max(triton.next_power_of_2(typical), 16), 1024)
    rows = min(max(2048 // block, 1), triton.next_power_of_2(max(num_groups, 1)))
    return rows, block


def group_advantages_triton(
    rewards: torch.Tensor, group_size: int, offsets: torch.Tensor | None, success: torch.Tensor | None,
    valid: torch.Tensor | None, prior: torch.Tensor | None, *, estimator: str, scale: str, unbiased: bool,
    eps: float, singleton: str, mask_all_equal: bool, band: list[float] | None, band_inclusive: bool,
    min_std: float | None, accidental_max_successes: int, accidental_prior_max: float, accidental_action: str,
    accidental_clip: float, mask_too_few: bool, return_index: bool, wrap=lambda kernel: kernel,
    out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Runs the Triton kernels with the op's arguments, bound by name (bandadv.ops.bind), and
    returns the op's outputs, written into `out` when given (the op's out= form, checked by the
    caller); `wrap` is torch.library.wrap_triton when traced as a triton_op.

    Inputs are assumed checked (bandadv.ops.check_inputs and AdvantageConfig), but for the values
    of offsets, which only the device reads: bad ones fail the call through torch._assert_async (a
    device-side assert on a GPU) and are never read past the tensors."""
    if not rewards.is_floating_point():
        rewards = rewards.float()
    rewards = rewards.contiguous()
    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    n = rewards.shape[0]
    fixed = group_size > 0
    num_groups = n // group_size if fixed else offsets.shape[0] - 1
    dev = rewards.device
    fresh = out is None
    if fresh:
        # The outputs' shapes and dtypes, as the C++ kernels make them. Imported here: the kernels
        # above are also loaded on their own, as a file (tests/_compile_triton.py).
        from bandadv.ops import output_specs

        layout = dict(rewards=rewards, group_size=group_size, offsets=offsets, return_index=return_index)
        out = tuple(torch.empty(shape, dtype=dtype, device=dev) for shape, dtype in output_specs(layout))
    advantages, sample_mask, reason, group_mask, count, group_stats, num_kept, kept_index = out
    successes, mean, std, pass_rate, success_var, reward_var = group_stats.unbind(0)  # rows as STAT_NAMES
    kept_count = torch.empty(num_groups, dtype=torch.int64, device=dev)  # every group writes its own
    kept_index.fill_(-1)
    if num_groups == 0:
        return (*out[:6], num_kept.zero_(), kept_index)

    offsets = offsets.to(torch.int64).contiguous() if not fixed else rewards  # placeholder pointer when fixed
    success_ptr = success.contiguous() if success is not None else rewards
    valid_ptr = valid.contiguous() if valid is not None else rewards
    prior_ptr = prior.contiguous() if prior is not None else rewards
    rows, block = _tile(n, num_groups, group_size)
    grid = (triton.cdiv(num_groups, rows),)
    batch_std = torch.zeros(1, dtype=acc, device=dev)
    bad_offsets = torch.zeros(1, dtype=torch.int32, device=dev)
    flags = dict(
        ESTIMATOR=_ESTIMATORS[estimator], SCALE=_SCALES[scale], UNBIASED=unbiased, SINGLETON_RAW=singleton == "raw",
        MASK_ALL_EQUAL=mask_all_equal, USE_BAND=band is not None, BAND_INCLUSIVE=band_inclusive,
        USE_MIN_STD=min_std is not None, CLIP_ACTION=accidental_action == "clip", MASK_TOO_FEW=mask_too_few,
        HAS_SUCCESS=success is not None, HAS_VALID=valid is not None, HAS_PRIOR=prior is not None, FIXED=fixed,
        ROWS=rows, BLOCK=block, ACC=tl.float64 if acc == torch.float64 else tl.float32,
    )  # fmt: skip
    band_lo, band_hi = (float(band[0]), float(band[1])) if band is not None else (0.0, 1.0)
    args = (
        rewards, success_ptr, valid_ptr, prior_ptr, offsets, batch_std,
        advantages, sample_mask, reason, group_mask, count, successes, mean, std, pass_rate, success_var, reward_var,
        kept_count, bad_offsets, num_groups, n, max(group_size, 1),
        _bits(eps), _bits(band_lo), _bits(band_hi), _bits(min_std or 0.0), _bits(accidental_max_successes),
        _bits(accidental_prior_max), _bits(accidental_clip),
    )  # fmt: skip
    kernel = wrap(_group_advantages_fwd_kernel)
    if scale == "batch":
        # Second launch: per-group moments first, merged here in float64 (Chan), no host sync.
        kernel[grid](*args, MOMENTS_ONLY=True, **flags)
        nf = count.to(torch.float64)
        total = nf.sum()
        batch_mean = (nf * mean.double()).sum() / total.clamp(min=1)
        batch_m2 = reward_var.double().sum() + (nf * (mean.double() - batch_mean) ** 2).sum()
        ddof = 1 if unbiased else 0
        var = torch.where(total >= 2, batch_m2 / (total - ddof).clamp(min=1), torch.zeros_like(batch_m2))
        batch_std.copy_(var.sqrt().reshape(1))
    kernel[grid](*args, MOMENTS_ONLY=False, **flags)
    if not fixed:
        torch._assert_async(bad_offsets == 0, OFFSETS_ERROR)
    if fresh:
        num_kept = kept_count.sum()
    else:
        torch.sum(kept_count, dim=0, out=num_kept)
    if return_index:
        first_slot = torch.cumsum(kept_count, 0) - kept_count
        wrap(_kept_index_kernel)[grid](sample_mask, offsets, first_slot, kept_index, num_groups, n,
                                       max(group_size, 1), FIXED=fixed, ROWS=rows, BLOCK=block)  # fmt: skip
    return (*out[:6], num_kept, kept_index)
