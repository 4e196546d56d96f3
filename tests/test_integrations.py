"""Trainer adapters against the trainers' own formulas."""

from __future__ import annotations

import numpy as np
import torch

from bandadv.baselines import verl_grpo_loop
from bandadv.integrations.verl import compute_grpo_outcome_advantage


def test_verl_drop_in_matches_verl_loop_with_string_uids(backend):
    gen = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 30, (200,), generator=gen)
    uids = np.array([f"uid-{int(g):04d}" for g in groups])
    token_rewards = torch.zeros(200, 7)
    token_rewards[:, -1] = (torch.rand(200, generator=gen) < 0.4).float()  # outcome reward on the last token
    mask = (torch.rand(200, 7, generator=gen) < 0.9).float()
    adv, ret = compute_grpo_outcome_advantage(token_rewards, mask, uids, backend=backend)
    expected = verl_grpo_loop(token_rewards.sum(-1), uids.tolist()).unsqueeze(-1) * mask
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)
    assert adv is ret


def test_verl_drop_in_with_masks_returns_result(backend):
    token_rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    mask = torch.ones(4, 2)
    adv, _, result = compute_grpo_outcome_advantage(
        token_rewards, mask, np.array(["a", "a", "b", "b"]), band=(0.0, 1.0), band_inclusive=False,
        return_result=True, backend=backend,
    )  # fmt: skip
    assert result.group_mask.tolist() == [True, True]
    assert result.stats.pass_rate.tolist() == [0.5, 0.5]
    assert adv.shape == (4, 2)
