"""Presets against the trainers' own formulas, re-derived from their source on the same inputs."""

from __future__ import annotations

import pytest
import torch

import bandadv
from bandadv.baselines import openrlhf, trl_grpo, verl_grpo_loop, verl_grpo_vectorized, verl_rloo_loop
from conftest import make_offsets


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
    torch.testing.assert_close(out.advantages, verl_grpo_loop(rewards, index), rtol=1e-5, atol=1e-5)
    out = bandadv.group_advantages(
        rewards, offsets=make_offsets(sizes), preset="verl", estimator="rloo", backend=backend
    )
    torch.testing.assert_close(out.advantages, verl_rloo_loop(rewards, index), rtol=1e-5, atol=1e-5)


def test_verl_by_uid_in_any_order(backend):
    gen = torch.Generator().manual_seed(4)
    uids = torch.randint(0, 40, (300,), generator=gen)
    rewards = _rewards(300, seed=4)
    out = bandadv.group_advantages(rewards, group_index=uids, preset="verl", backend=backend)
    torch.testing.assert_close(out.advantages, verl_grpo_loop(rewards, uids.tolist()), rtol=1e-5, atol=1e-5)


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


def test_verl_vectorized_matches_its_loop_on_binary_rewards(backend):
    # verl's vectorized variant (E[x^2] - E[x]^2, floored) agrees with its loop when rewards are
    # well scaled; bandadv's verl preset matches both there.
    gen = torch.Generator().manual_seed(6)
    uids = torch.randint(0, 50, (400,), generator=gen)
    rewards = (torch.rand(400, generator=gen) < 0.4).float()
    vectorized = verl_grpo_vectorized(rewards, uids)
    out = bandadv.group_advantages(rewards, group_index=uids, preset="verl", backend=backend)
    has_spread = out.stats.std[torch.unique(uids, return_inverse=True)[1]] > 0
    torch.testing.assert_close(out.advantages[has_spread], vectorized[has_spread], rtol=1e-4, atol=1e-4)
