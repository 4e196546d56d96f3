"""Side-by-side timing of bandadv against the advantage code trainers run today.

`python -m bandadv bench` prints the headline table for this machine; benchmarks/sweep.py runs
the full sweep and writes a results file. Every ratio compares providers timed in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from . import baselines, ops
from .advantages import group_advantages
from .config import AdvantageConfig
from .reference import reference_group_advantages

BAND_OPTIONS = dict(band=(0.1, 0.9), accidental_max_successes=1)  # masks and stats on


@dataclass(frozen=True)
class Case:
    prompts: int
    group_size: int
    ragged: bool = False

    @property
    def name(self) -> str:
        return f"{self.prompts}x{self.group_size}" + (" ragged" if self.ragged else "")


@dataclass
class Row:
    case: str
    samples: int
    provider: str
    computes: str
    median_ms: float
    q20_ms: float
    q80_ms: float
    gb_per_s: float
    ratios: dict


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def make_inputs(case: Case, device: str, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if case.ragged:
        sizes = torch.randint(1, 2 * case.group_size, (case.prompts,), generator=gen)
    else:
        sizes = torch.full((case.prompts,), case.group_size)
    n = int(sizes.sum())
    pass_rate = torch.rand(case.prompts, generator=gen).repeat_interleave(sizes)
    correct = torch.rand(n, generator=gen) < pass_rate
    rewards = correct.float() + 0.1 * (torch.rand(n, generator=gen) < 0.8).float()
    offsets = torch.zeros(case.prompts + 1, dtype=torch.int64)
    offsets[1:] = sizes.cumsum(0)
    index = torch.repeat_interleave(torch.arange(case.prompts), sizes)
    return {
        "rewards": rewards.to(device),
        "offsets": offsets.to(device),
        "index": index.to(device),
        "index_list": index.tolist() if n <= 65536 else None,
        "group_size": case.group_size,
        "ragged": case.ragged,
    }


def providers(device: str, case: Case, compile_reference: bool = False) -> dict[str, tuple[str, Callable]]:
    """name -> (what it computes, fn(inputs)). Baselines that cannot run a case are left out."""
    full = "advantages + masks + stats"
    only_adv = "advantages only"

    def bandadv_fn(backend: str, estimator: str = "grpo") -> Callable:
        config = AdvantageConfig(estimator=estimator, **BAND_OPTIONS)  # built once, as a trainer does

        def run(x):
            layout = {"offsets": x["offsets"]} if x["ragged"] else {"group_size": x["group_size"]}
            return group_advantages(x["rewards"], backend=backend, validate=False, config=config, **layout)

        return run

    out: dict[str, tuple[str, Callable]] = {}
    backends = []
    if device == "cpu" and "CPU" in ops.COMPILED:
        backends.append("cpu")
    if device == "cuda" and "CUDA" in ops.COMPILED:
        backends.append("cuda")
    if device == "cuda" and ops.triton_available():
        backends.append("triton")
    for backend in backends:
        out[f"bandadv-{backend}"] = (full, bandadv_fn(backend))
    samples = case.prompts * case.group_size
    small = samples <= 16384 and device == "cpu"  # the Python loops only where they finish
    if not case.ragged:
        out["trl-eager"] = (only_adv, lambda x: baselines.trl_grpo(x["rewards"], x["group_size"]))
        out["openrlhf"] = (only_adv, lambda x: baselines.openrlhf(x["rewards"], x["group_size"]))
    out["verl-vectorized"] = (only_adv, lambda x: baselines.verl_grpo_vectorized(x["rewards"], x["index"]))
    if small:
        out["verl-loop"] = (only_adv, lambda x: baselines.verl_grpo_loop(x["rewards"], x["index_list"]))
    # RLOO: bandadv's rloo estimator against the trainers' leave-one-out code.
    if backends:  # the first backend only: the comparison is of estimators, not kernels
        out[f"bandadv-{backends[0]} rloo"] = (full, bandadv_fn(backends[0], "rloo"))
    if not case.ragged:
        out["openrlhf rloo"] = (only_adv, lambda x: baselines.openrlhf(x["rewards"], x["group_size"], "rloo"))
    if small:
        out["verl-loop rloo"] = (only_adv, lambda x: baselines.verl_rloo_loop(x["rewards"], x["index_list"]))
    out["copy"] = ("copy of the rewards (bandwidth ceiling)", lambda x: x["rewards"].clone())
    # Last: compiling changes the allocator's state (large blocks then come back without page
    # faults), which would flatter whatever is timed after it.
    if compile_reference:
        compiled = torch.compile(reference_group_advantages, dynamic=False)

        def run_compiled(x):
            layout = {"offsets": x["offsets"]} if x["ragged"] else {"group_size": x["group_size"]}
            return compiled(x["rewards"], **layout)

        out["torch.compile(reference)"] = ("advantages + masks + stats, float64", run_compiled)
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_provider(fn: Callable, inputs: list[dict], device: str, budget_s: float, min_reps: int = 5) -> list[float]:
    """Per-call times in ms, rotating among input sets so repeats do not measure a warm cache."""
    for x in inputs:
        fn(x)  # warm-up on every input set: compilation (one per shape), allocator, code caches
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start_all < budget_s and len(times) < 200):
        x = inputs[len(times) % len(inputs)]
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(x)
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def graph_replay(fn: Callable, x: dict) -> Callable:
    """fn(x) captured once in a CUDA graph; the returned callable replays it (its own buffers)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(x)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return lambda _: graph.replay()


def run_case(
    case: Case, device: str, budget_s: float = 0.5, rotate: int = 4, compile_reference: bool = False
) -> list[Row]:
    inputs = [make_inputs(case, device, seed) for seed in range(rotate)]
    samples = inputs[0]["rewards"].numel()
    timed = {}
    for name, (computes, fn) in providers(device, case, compile_reference).items():
        timed[name] = (computes, time_provider(fn, inputs, device, budget_s))
        if device == "cuda" and name.startswith("bandadv-"):
            # launch overhead removed: one input set replayed (a warm L2 for small cases)
            replay = graph_replay(fn, inputs[0])
            timed[name + " (graph)"] = (computes, time_provider(replay, inputs, device, budget_s))
    medians = {name: statistics.median(t) for name, (_, t) in timed.items()}
    rows = []
    for name, (computes, t) in timed.items():
        med = medians[name]
        # bytes a fused pass must move: read rewards, write advantages (4 B) and the mask (1 B)
        moved = samples * (4 + 4 + 1) if name != "copy" else samples * 8
        ratios = {other: medians[other] / med for other in medians if other != name}
        rows.append(
            Row(case.name, samples, name, computes, med, quantile(t, 0.2), quantile(t, 0.8), moved / med / 1e6, ratios)
        )
    return rows


def run_tracker(
    device: str,
    num_prompts: int = 1 << 20,
    groups: int = 4096,
    budget_s: float = 0.5,
    candidates: int = 1 << 17,
    num_features: int = 256,
    models: tuple[str, ...] = ("beta", "logistic", "features"),
) -> list[Row]:
    """PromptTracker at a million prompts: one batch's update, and selection before rollouts (the
    features model with a [num_prompts, num_features] float32 X: 1 GiB at 2**20 x 256)."""
    from .tracker import PromptTracker

    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    inputs = []
    for _ in range(4):
        ids = torch.randint(0, num_prompts, (groups,), device=device, generator=gen)
        rewards = (torch.rand(groups * 16, device=device, generator=gen) < 0.3).float()
        out = group_advantages(rewards, 16, validate=False)
        cands = torch.randperm(num_prompts, device=device, generator=gen)[:candidates]
        inputs.append({"ids": ids, "out": out, "candidates": cands})
    for model in models:
        features = None
        if model == "features":
            features = torch.randn(num_prompts, num_features, device=device, generator=gen) / num_features**0.5
        tracker = PromptTracker(num_prompts, model, device=device, features=features)
        step = iter(range(1 << 30))
        cases = {
            f"tracker-{model} update": lambda x, t=tracker, s=step: t.update(
                x["ids"], x["out"], next(s), validate=False
            ),
            f"tracker-{model} select thompson": lambda x, t=tracker: t.select(
                x["candidates"], groups, "thompson", gen, validate=False
            ),
            f"tracker-{model} select band": lambda x, t=tracker: t.select(
                x["candidates"], groups, "band", gen, validate=False
            ),
            f"tracker-{model} predict": lambda x, t=tracker: t.predict(x["candidates"], validate=False),
        }
        d = f", d={num_features}" if model == "features" else ""
        for name, fn in cases.items():
            t = time_provider(fn, inputs, device, budget_s)
            med = statistics.median(t)
            label = f"{num_prompts} prompts{d}"
            what = {"update": f"{groups} groups", "predict": f"{candidates} ids"}.get(
                name.rsplit(" ", 1)[-1], f"{groups} of {candidates}"
            )
            rows.append(Row(label, groups, name, what, med, quantile(t, 0.2), quantile(t, 0.8), 0.0, {}))
        del tracker, features
    return rows


def environment(device: str) -> dict:
    import sys

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "machine": machine_name(device),
        "device": device,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_version,
        "bandadv_compiled": sorted(ops.COMPILED),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hostname_cores": os.cpu_count(),
    }


def format_table(
    rows: list[Row], baseline_names: tuple[str, ...] = ("trl-eager", "verl-vectorized", "openrlhf rloo", "copy")
) -> str:
    lines = [
        f"{'case':<16} {'provider':<26} {'median ms':>10} {'q20-q80 ms':>17} {'GB/s':>7}  vs "
        + ", ".join(baseline_names)
    ]
    for r in rows:
        ratio = "  ".join(f"{r.ratios[b]:7.2f}x" if b in r.ratios else "      - " for b in baseline_names)
        spread = f"{r.q20_ms:.3f}-{r.q80_ms:.3f}"
        lines.append(f"{r.case:<16} {r.provider:<26} {r.median_ms:>10.4f} {spread:>17} {r.gb_per_s:>7.1f}  {ratio}")
    return "\n".join(lines)


def save(rows: list[Row], device: str, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"environment": environment(device), "rows": [asdict(r) for r in rows]}, f, indent=1)


HEADLINE_CASES = (Case(512, 16), Case(2048, 16, ragged=True), Case(1 << 20, 16))


def headline(device: str | None = None, tracker: bool = False) -> None:
    """`python -m bandadv bench`: the headline table for this machine, in well under a minute;
    `--tracker` adds PromptTracker's update, selection and prediction at 2**20 prompts."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"bandadv bench on {machine_name(device)}, torch {torch.__version__}")
    print("bandadv runs with band masks, accidental-success rule and stats on; baselines compute advantages only.")
    print(
        "ratio = that provider's median / this provider's median, timed side by side in this run (>1: this is faster)\n"
    )
    rows = []
    for case in HEADLINE_CASES:
        rows += run_case(case, device, budget_s=0.4)
    print(format_table(rows))
    if device == "cpu":
        print("\nPer-call goals (the public call with masks and stats; cold = after ~1 ms of other work)")
        print(format_goals(goals()))
    if tracker:
        print("\nPromptTracker, 2**20 prompts: update of 4096 groups, selection of 4096 of 131072 candidates")
        print(format_tracker_table(run_tracker(device, budget_s=0.4)))


def _paired_median_us(
    ours: Callable, theirs: Callable, cold: bool, budget_s: float, min_reps: int = 200, rounds: int = 10
) -> tuple[float, float]:
    """Median µs per call of two providers, timed in alternating rounds so that a slow spell of a
    shared machine (this VM's speed moves by up to 2x for seconds at a time) falls on both:
    back to back (warm), or each call after ~1 ms of other work that rewrites a 4 MB buffer
    (cold: caches and branch predictors hold other work, as when a trainer calls once per step)."""
    buffer = torch.zeros(1 << 20)
    samples: list[list[float]] = [[], []]
    for fn in (ours, theirs):
        for _ in range(min(20, min_reps)):
            fn()
    for _ in range(rounds):
        for fn, times in zip((ours, theirs), samples, strict=True):
            start, count = time.perf_counter(), 0
            while count < -(-min_reps // rounds) or (time.perf_counter() - start < budget_s / rounds and count < 500):
                if cold:
                    buffer.add_(1.0)
                t0 = time.perf_counter()
                fn()
                times.append(1e6 * (time.perf_counter() - t0))
                count += 1
    return statistics.median(samples[0]), statistics.median(samples[1])


def goals(budget_s: float = 0.5, min_reps: int = 200) -> list[tuple[str, float, float, float, str]]:
    """The per-call goals of issue 14 on the CPU, each a ratio of two providers timed side by side
    in this run: (what, bandadv µs, other µs, ratio, target)."""
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(512 * 16, generator=gen) < 0.4).float()
    config = AdvantageConfig(**BAND_OPTIONS)  # a trainer builds its config once and passes it each step
    rows = []
    for cold in (False, True):
        ours, theirs = _paired_median_us(
            lambda: group_advantages(rewards, 16, config=config), lambda: baselines.trl_grpo(rewards, 16), cold,
            budget_s, min_reps,
        )  # fmt: skip
        rows.append(
            (f"512x16 public call vs trl-eager ({'cold' if cold else 'warm'})", ours, theirs, theirs / ours, ">= 10x")
        )
    one = torch.rand(8, generator=gen)
    ours, theirs = _paired_median_us(
        lambda: group_advantages(one, 8, config=config), lambda: torch.add(one, 1.0), False, budget_s, min_reps
    )
    rows.append(("one group of 8: public call / torch.add", ours, theirs, ours / theirs, "<= 3x"))
    # Keyword options build and validate a new AdvantageConfig on every call.
    ours, theirs = _paired_median_us(
        lambda: group_advantages(one, 8, **BAND_OPTIONS), lambda: torch.add(one, 1.0), False, budget_s, min_reps
    )
    rows.append(("  the same with keyword options (no config)", ours, theirs, ours / theirs, "-"))
    big = torch.rand((1 << 20) * 16, generator=gen)
    ours, theirs = _paired_median_us(
        lambda: group_advantages(big, 16, config=config), lambda: big.clone(), False, 4 * budget_s, min(10, min_reps),
        rounds=5,
    )  # fmt: skip
    rows.append(("1Mx16: fresh outputs / a fresh copy (clone)", ours, theirs, ours / theirs, "<= 1.5x"))
    workspace = group_advantages(big, 16, config=config)
    target = torch.empty_like(big)
    ours, theirs = _paired_median_us(
        lambda: group_advantages(big, 16, out=workspace, config=config), lambda: target.copy_(big), False,
        4 * budget_s, min(10, min_reps), rounds=5,
    )  # fmt: skip
    rows.append(("1Mx16: out= workspace / a copy into a buffer", ours, theirs, ours / theirs, "<= 1.5x"))
    return rows


def format_goals(rows: list[tuple[str, float, float, float, str]]) -> str:
    lines = [f"{'goal':<48} {'bandadv us':>11} {'other us':>10} {'ratio':>8}  {'target':<8}"]
    for what, ours, theirs, ratio, target in rows:
        lines.append(f"{what:<48} {ours:>11.1f} {theirs:>10.1f} {ratio:>7.2f}x  {target}")
    return "\n".join(lines)


def format_tracker_table(rows: list[Row]) -> str:
    lines = [f"{'case':<26} {'provider':<34} {'what':<16} {'median ms':>10} {'q20-q80 ms':>17}"]
    for r in rows:
        spread = f"{r.q20_ms:.3f}-{r.q80_ms:.3f}"
        lines.append(f"{r.case:<26} {r.provider:<34} {r.computes:<16} {r.median_ms:>10.3f} {spread:>17}")
    return "\n".join(lines)
