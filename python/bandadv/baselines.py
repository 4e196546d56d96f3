"""How trainers compute group advantages today, re-derived from their source.

Used as the baselines of the benchmarks and as the formulas the presets are tested against.
Each computes advantages only: no masks and no per-prompt statistics.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def trl_nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    # trl/trainer/utils.py, nanstd: Bessel-corrected std over the non-NaN entries.
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    var = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim)
    return torch.sqrt(var * count / (count - 1))


def trl_grpo(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    # trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions:
    # view / nanmean / nanstd / repeat_interleave, then (r - mean) / (std + 1e-4).
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    if scale == "batch":
        std = trl_nanstd(rewards).expand_as(rewards)
    elif group_size > 1:
        std = trl_nanstd(grouped, dim=1).repeat_interleave(group_size)
    else:
        std = torch.zeros_like(rewards)
    advantages = rewards - mean
    return advantages / (std + 1e-4) if scale != "none" else advantages


def _scores_by_uid(scores: torch.Tensor, index: list) -> dict:
    id2score = defaultdict(list)
    for i, uid in enumerate(index):
        id2score[uid].append(scores[i])
    return id2score


def verl_grpo_loop(scores: torch.Tensor, index: list, epsilon: float = 1e-6) -> torch.Tensor:
    # verl/trainer/ppo/core_algos.py, compute_grpo_outcome_advantage: a dict of lists per uid;
    # a uid with one response gets mean 0 and std 1.
    id2score = _scores_by_uid(scores, index)
    id2mean, id2std = {}, {}
    for uid, values in id2score.items():
        if len(values) == 1:
            id2mean[uid], id2std[uid] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            stacked = torch.stack(values)
            id2mean[uid], id2std[uid] = torch.mean(stacked), torch.std(stacked)
    out = scores.clone()
    for i, uid in enumerate(index):
        out[i] = (scores[i] - id2mean[uid]) / (id2std[uid] + epsilon)
    return out


def verl_rloo_loop(scores: torch.Tensor, index: list) -> torch.Tensor:
    # verl/trainer/ppo/core_algos.py, compute_rloo_outcome_advantage.
    id2score = _scores_by_uid(scores, index)
    id2mean = {uid: torch.mean(torch.stack(v)) if len(v) > 1 else torch.tensor(0.0) for uid, v in id2score.items()}
    out = scores.clone()
    for i, uid in enumerate(index):
        n = len(id2score[uid])
        if n > 1:
            out[i] = scores[i] * n / (n - 1) - id2mean[uid] * n / (n - 1)
    return out


def verl_grpo_vectorized(scores: torch.Tensor, gidx: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    # verl/trainer/ppo/core_algos.py, compute_grpo_vectorized_outcome_advantage, with
    # verl/utils group_mean_std: segment sums by index_add_ and bincount, std from
    # (sum2 - sum^2 / count) / (count - 1) floored at eps; singletons get mean 0, std 1.
    num_groups = int(gidx.max()) + 1 if gidx.numel() else 0
    scores = scores.float()
    count = torch.bincount(gidx, minlength=num_groups).float()
    total = torch.zeros(num_groups, device=scores.device).index_add_(0, gidx, scores)
    total2 = torch.zeros(num_groups, device=scores.device).index_add_(0, gidx, scores * scores)
    mean = total / count.clamp(min=1)
    var = (total2 - total * total / count.clamp(min=1)) / (count - 1).clamp(min=1)
    std = var.clamp(min=epsilon).sqrt()
    lone = count <= 1
    mean = torch.where(lone, torch.zeros_like(mean), mean)
    std = torch.where(lone, torch.ones_like(std), std)
    return (scores - mean[gidx]) / (std[gidx] + epsilon)


def openrlhf(rewards: torch.Tensor, group_size: int, estimator: str = "group_norm") -> torch.Tensor:
    # openrlhf/trainer/ppo_utils/experience_maker.py, reward shaping by advantage_estimator.
    r = rewards.view(-1, group_size)
    if estimator == "rloo":
        return (r - (r.sum(-1, keepdim=True) - r) / (group_size - 1)).flatten()
    if estimator == "dr_grpo":
        return (r - r.mean(-1, keepdim=True)).flatten()
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-9)).flatten()
