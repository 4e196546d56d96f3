"""`python -m bandadv demo`: one realistic GRPO batch through group_advantages."""

from __future__ import annotations

import time

import torch

from . import ops
from .advantages import group_advantages
from .types import Reason


def reason_names(code: int) -> str:
    return "|".join(r.name for r in Reason if code & r) or "kept"


def make_batch(num_prompts: int, group_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollouts of prompts with a spread of difficulty: correctness plus a format bonus, some
    reward calls failed (NaN)."""
    gen = torch.Generator().manual_seed(seed)
    solve_rate = torch.rand(num_prompts, generator=gen) ** 2  # many hard prompts, a few easy ones
    solve_rate[:4] = torch.tensor([0.0, 1.0, 0.03, 0.5])  # impossible, trivial, near-impossible, medium
    correct = torch.rand(num_prompts, group_size, generator=gen) < solve_rate[:, None]
    correct[2] = False
    correct[2, 5] = True  # one lucky hit on the near-impossible prompt
    well_formatted = torch.rand(num_prompts, group_size, generator=gen) < 0.8
    rewards = correct.float() + 0.1 * well_formatted.float()
    rewards[torch.rand(rewards.shape, generator=gen) < 0.01] = float("nan")  # reward call timed out
    return rewards, correct


def main(num_prompts: int = 64, group_size: int = 16, seed: int = 0) -> None:
    rewards, correct = make_batch(num_prompts, group_size, seed)
    options = dict(success=correct, band=(0.1, 0.9), accidental_max_successes=1)
    out = group_advantages(rewards, **options)
    plain = group_advantages(rewards, mask_all_equal=False, mask_too_few=False)
    backend = "C++ CPU kernel" if "CPU" in ops.COMPILED else "torch reference (extension not built)"
    print(f"bandadv demo: {num_prompts} prompts x {group_size} rollouts, shaped rewards, 1% NaN; backend: {backend}")
    print("options: band=(0.1, 0.9), accidental_max_successes=1, success=correctness (not the shaped reward)\n")
    print(
        f"{'prompt':>6} {'n':>3} {'k':>3} {'pass':>5} {'mean':>6} {'std':>6} {'max A (plain)':>13} {'max A':>6}  reason"
    )
    st = out.stats
    adv, plain_adv = out.advantages.view(num_prompts, group_size), plain.advantages.view(num_prompts, group_size)
    for g in range(8):
        print(
            f"{g:>6} {int(st.count[g]):>3} {int(st.successes[g]):>3} {float(st.pass_rate[g]):>5.2f} "
            f"{float(st.mean[g]):>6.3f} {float(st.std[g]):>6.3f} {float(plain_adv[g].max()):>13.3f} "
            f"{float(adv[g].max()):>6.3f}  {reason_names(int(out.reason[g]))}"
        )
    print("\nprompt 2 has one lucky hit among its rollouts: plain GRPO gives it advantage "
          f"{float(plain_adv[2].max()):.2f}; bandadv masks the group (ACCIDENTAL_SUCCESS).\n")  # fmt: skip
    print("metrics:")
    for name, value in out.metrics().items():
        print(f"  {name:<22} {value:.4f}")
    big = torch.rand(1 << 20, generator=torch.Generator().manual_seed(seed)) < 0.3
    start = time.perf_counter()
    group_advantages(big.float(), 16, band=(0.1, 0.9))
    print(f"\n65,536 prompts x 16 rollouts: {1e3 * (time.perf_counter() - start):.1f} ms on this machine's CPU")
