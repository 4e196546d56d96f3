"""bandadv's verl estimator against verl's own, end to end, side by side in one run.

    python benchmarks/verl_bench.py [--prompts 512] [--group-size 16] [--lengths 1 1024] [--threads 2]

Each provider is called as verl's `compute_advantage` calls a registered estimator (token-level
rewards, response mask, the uid object array, the algorithm config): `bandadv_grpo` (this
package), verl 0.9.1's `grpo_vectorized` and its default `grpo` (a Python loop over a dict of
uids), all from verl's registry. One outcome reward per response, on its last token; uids are
one uuid string per prompt repeated over its responses, as `DataProto.repeat` lays them out.
warm: back-to-back calls; cold: each call after ~1 ms of other work (a 4 MB buffer rewritten,
evicting the caches). Inputs rotate among four sets. Ratios: the other provider's median over
this one's, from this run.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import numpy as np
import torch
import verl
from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos

from bandadv.bench import machine_name

PROVIDERS = {
    "bandadv_grpo": "bandadv_grpo",
    "verl grpo_vectorized": "grpo_vectorized",
    "verl grpo (loop)": "grpo",
}


def make_inputs(prompts: int, group_size: int, length: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = prompts * group_size
    uids = np.repeat(np.array([str(uuid.uuid4()) for _ in range(prompts)], dtype=object), group_size)
    lengths = torch.randint(1, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.int64)
    rewards = torch.zeros(n, length)
    rewards[torch.arange(n), lengths - 1] = (torch.rand(n, generator=gen) < 0.4).float()
    return {"token_level_rewards": rewards, "response_mask": mask, "index": uids}


def other_work(buffer: torch.Tensor) -> None:
    buffer.add_(1.0)  # ~1 ms: rewrites 4 MB, so the call after it starts with cold caches


def time_calls(fn, inputs: list[dict], config, cold: bool, budget_s: float, min_reps: int = 5) -> list[float]:
    buffer = torch.zeros(1 << 20)
    for x in inputs:
        fn(**x, config=config)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 400):
        x = inputs[len(times) % len(inputs)]
        if cold:
            other_work(buffer)
        t0 = time.perf_counter()
        fn(**x, config=config)
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def check_equal(inputs: dict, config) -> None:
    ours, _ = core_algos.get_adv_estimator_fn("bandadv_grpo")(**inputs, config=config)
    theirs, _ = core_algos.get_adv_estimator_fn("grpo")(**inputs, config=config)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 1024])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per provider and mode")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = OmegaConf.create({"adv_estimator": "bandadv_grpo", "norm_adv_by_std_in_grpo": True})
    print(f"verl {verl.__version__}, torch {torch.__version__}, {machine_name('cpu')}")
    print(f"{args.prompts} prompts x {args.group_size}, one reward per response; median ms (q20-q80)\n")
    header = f"{'response tokens':>15} {'provider':<22} {'mode':<5} {'median ms':>10} {'q20-q80 ms':>16}"
    print(header + "   vs " + ", ".join(PROVIDERS))
    for length in args.lengths:
        inputs = [make_inputs(args.prompts, args.group_size, length, seed) for seed in range(4)]
        check_equal(inputs[0], config)
        for mode in ("warm", "cold"):
            timed = {}
            for label, name in PROVIDERS.items():
                fn = core_algos.get_adv_estimator_fn(name)
                budget = args.budget if name != "grpo" else min(args.budget, 2.0)
                timed[label] = time_calls(fn, inputs, config, mode == "cold", budget)
            medians = {label: statistics.median(t) for label, t in timed.items()}
            for label, t in timed.items():
                ordered = sorted(t)
                q20, q80 = ordered[int(0.2 * len(t))], ordered[min(len(t) - 1, int(0.8 * len(t)))]
                ratios = "  ".join(
                    f"{medians[other] / medians[label]:8.1f}x" if other != label else "       - " for other in PROVIDERS
                )
                print(f"{length:>15} {label:<22} {mode:<5} {medians[label]:>10.3f} {q20:>7.3f}-{q80:<8.3f}   {ratios}")


if __name__ == "__main__":
    main()
