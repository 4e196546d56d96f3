"""verl: a drop-in for `compute_grpo_outcome_advantage` (verl/trainer/ppo/core_algos.py).

    from bandadv.integrations.verl import compute_grpo_outcome_advantage

Same arguments and returns as verl's; the numbers are verl's (preset="verl": torch.std, eps
added to the std, a uid with one response scored against mean 0 and std 1), computed in one
fused pass instead of a Python loop over a dict of lists. Keyword `options` turn on bandadv's
masks (band, accidental-success rule, ...), and `return_result=True` also returns the
GroupAdvantages (masks, per-prompt statistics, metrics).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..advantages import group_advantages
from ..types import GroupAdvantages


def uid_index(index: Any, device: torch.device) -> torch.Tensor:
    """verl's per-sample uids (strings, ints, any hashable) as integer group ids."""
    if isinstance(index, torch.Tensor):
        return index.to(device=device, dtype=torch.int64)
    _, inverse = np.unique(np.asarray(index), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.int64, device=device)


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
    """Outcome GRPO advantages broadcast over response tokens: (advantages, returns), equal.

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
    out = group_advantages(
        scores,
        group_index=uid_index(index, scores.device),
        preset="verl",
        eps=epsilon,
        estimator="grpo" if norm_adv_by_std_in_grpo else "dr_grpo",
        **options,
    )
    advantages = out.advantages.to(scores.dtype).unsqueeze(-1) * response_mask
    return (advantages, advantages, out) if return_result else (advantages, advantages)
