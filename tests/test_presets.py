"""Presets against the trainers' own formulas, re-derived from their source on the same inputs."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import bandadv
from conftest import make_offsets


def _trl_nanstd(x: torch.Tensor, dim=None) -> torch.Tensor:
    # trl/trainer/utils.py, nanstd: Bessel-corrected std over the non-NaN entries.
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    var = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim)
    return torch.sqrt(var * count / (count - 1))


def trl_grpo(rewards: torch.Tensor, g: int, scale: str = "group") -> torch.Tensor:
    # trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions.
    grouped = rewards.view(-1, g)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(g)
    if scale == "batch":
        std = _trl_nanstd(rewards).expand_as(rewards)
    else:
        std = (_trl_nanstd(grouped, dim=1) if g > 1 else torch.zeros(grouped.shape[0])).repeat_interleave(g)
    adv = rewards - mean
    return adv / (std + 1e-4) if scale != "none" else adv


def verl_grpo(scores: torch.Tensor, index: list[int], epsilon: float = 1e-6) -> torch.Tensor:
    # verl/trainer/ppo/core_algos.py, compute_grpo_outcome_advantage (norm_adv_by_std_in_grpo=True).
    id2score = defaultdict(list)
    for i, uid in enumerate(index):
        id2score[uid].append(scores[i])
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


def verl_rloo(scores: torch.Tensor, index: list[int]) -> torch.Tensor:
    # verl/trainer/ppo/core_algos.py, compute_rloo_outcome_advantage.
    id2score = defaultdict(list)
    for i, uid in enumerate(index):
        id2score[uid].append(scores[i])
    id2mean = {uid: torch.mean(torch.stack(v)) if len(v) > 1 else torch.tensor(0.0) for uid, v in id2score.items()}
    out = scores.clone()
    for i, uid in enumerate(index):
        n = len(id2score[uid])
        if n > 1:
            out[i] = scores[i] * n / (n - 1) - id2mean[uid] * n / (n - 1)
    return out


def openrlhf(rewards: torch.Tensor, g: int, estimator: str) -> torch.Tensor:
    # openrlhf/trainer/ppo_utils/experience_maker.py, reward shaping by advantage_estimator.
    r = rewards.view(-1, g)
    if estimator == "rloo":
        return (r - (r.sum(-1, keepdim=True) - r) / (g - 1)).flatten()
    if estimator == "dr_grpo":
        return (r - r.mean(-1, keepdim=True)).flatten()
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-9)).flatten()


def _rewards(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = (torch.rand(n, generator=gen) < 0.4).float() + 0.2 * torch.rand(n, generator=gen)
    r[: n // 8] = 1.0  # some all-equal groups
    return r


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("g", [1, 2, 8, 16])
def test_trl(backend, scale, g):
    rewards = _rewards(64 * g, seed=g)
    out = bandadv.group_advantages(rewards, g, preset="trl", scale=scale, backend=backend)
    torch.testing.assert_close(out.advantages, trl_grpo(rewards, g, scale), rtol=1e-5, atol=1e-5)


def test_trl_nan_rewards(backend):
    # TRL marks unscorable samples NaN and leaves them out of nanmean / nanstd; bandadv gives them
    # advantage 0 and the same numbers to the rest.
    rewards = _rewards(32 * 8, seed=5)
    rewards[::13] = float("nan")
    out = bandadv.group_advantages(rewards, 8, preset="trl", backend=backend)
    expected = trl_grpo(rewards, 8)
    scored = ~torch.isnan(rewards)
    torch.testing.assert_close(out.advantages[scored], expected[scored], rtol=1e-5, atol=1e-5)
    assert torch.all(out.advantages[~scored] == 0)


def test_verl_grpo_and_rloo_with_singletons(backend):
    gen = torch.Generator().manual_seed(2)
    sizes = torch.randint(1, 9, (60,), generator=gen).tolist()
    sizes[:5] = [1, 1, 1, 1, 1]
    rewards = _rewards(sum(sizes), seed=3)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).tolist()
    out = bandadv.group_advantages(rewards, offsets=make_offsets(sizes), preset="verl", backend=backend)
    torch.testing.assert_close(out.advantages, verl_grpo(rewards, index), rtol=1e-5, atol=1e-5)
    out = bandadv.group_advantages(
        rewards, offsets=make_offsets(sizes), preset="verl", estimator="rloo", backend=backend
    )
    torch.testing.assert_close(out.advantages, verl_rloo(rewards, index), rtol=1e-5, atol=1e-5)


def test_verl_by_uid_in_any_order(backend):
    gen = torch.Generator().manual_seed(4)
    uids = torch.randint(0, 40, (300,), generator=gen)
    rewards = _rewards(300, seed=4)
    out = bandadv.group_advantages(rewards, group_index=uids, preset="verl", backend=backend)
    torch.testing.assert_close(out.advantages, verl_grpo(rewards, uids.tolist()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "dr_grpo"])
def test_openrlhf(backend, estimator):
    rewards = _rewards(128 * 8, seed=8)
    out = bandadv.group_advantages(rewards, 8, preset="openrlhf", estimator=estimator, backend=backend)
    torch.testing.assert_close(out.advantages, openrlhf(rewards, 8, estimator), rtol=1e-5, atol=1e-5)


def test_openrlhf_dynamic_filtering_uses_strict_bounds(backend):
    # OpenRLHF keeps a group when low < mean reward < high (strict); bandadv's band_inclusive=False.
    rewards = (torch.arange(8).expand(9, 8) < torch.arange(9)[:, None]).float().flatten()  # 0..8 hits of 8
    out = bandadv.group_advantages(
        rewards, 8, preset="openrlhf", band=(0.0, 1.0), band_inclusive=False, backend=backend
    )
    assert out.group_mask.tolist() == [False] + [True] * 7 + [False]
