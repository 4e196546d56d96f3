"""Small calls of the CUDA kernel for compute-sanitizer (memcheck, racecheck): every layout,
team shape, load width and option path once, on shapes small enough to run under
instrumentation. BANDADV_CHECK_DEVICE=cpu runs the same calls on the CPU kernel (gpu_check.sh's
dry run)."""

import os

import torch

import bandadv

device = os.environ.get("BANDADV_CHECK_DEVICE", "cuda")
gen = torch.Generator().manual_seed(0)
cases = []
for g in (1, 3, 16, 32, 33, 200, 1500):
    r = (torch.rand(g * 7, generator=gen) < 0.4).float()
    cases.append(({"group_size": g}, r, 0))
# Many blocks (the look-back across them), and rewards one element off a vector boundary.
cases.append(({"group_size": 16}, (torch.rand(3000 * 16, generator=gen) < 0.5).float(), 0))
cases.append(({"group_size": 8}, (torch.rand(257 * 8 + 1, generator=gen) < 0.5).float(), 1))
sizes = [0, 1, 2, 31, 33, 500, 0, 1400]
offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
cases.append(({"offsets": offsets}, torch.rand(sum(sizes), generator=gen), 0))
for layout, rewards, skip in cases:
    layout = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in layout.items()}
    rewards = rewards.to(device)[skip:]  # skip: the first element off, leaving the rest misaligned
    valid = torch.rand(rewards.shape, device=device) > 0.2
    for scale in ("group", "batch"):
        bandadv.group_advantages(rewards, backend=device, scale=scale, band=(0.1, 0.9), return_index=True, **layout)
        bandadv.group_advantages(
            rewards.half(), backend=device, valid=valid, success=valid, return_index=True, **layout
        )
if device == "cuda":
    torch.cuda.synchronize()
print("sanitizer driver: ok")
