"""`python -m bandadv simulate`: a small RL problem trained on group_advantages.

Prompts need L sequential sub-steps (L = 1..12); the policy solves a prompt when every sub-step
succeeds, each with probability sigmoid(skill_j). It can also guess: a shortcut that succeeds
with probability 1/K whatever L is, controlled by one shared logit. Training is REINFORCE on
the advantages of group_advantages, so what the masks let through is exactly what is learned:
a lucky guess on a near-impossible prompt earns a large group-normalised advantage, and since
the guess logit is shared, reinforcing it costs accuracy on prompts the policy could solve.
As the skills improve, the band of teachable prompts slides toward larger L.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import torch

from .advantages import group_advantages
from .band import BandController
from .tracker import PromptTracker


@dataclass(frozen=True)
class SimConfig:
    num_prompts: int = 4000
    max_len: int = 12  # sub-steps of the hardest prompts
    guess_odds: int = 4  # a guess succeeds with probability 1 / guess_odds
    group_size: int = 16
    prompts_per_step: int = 64
    candidates_per_step: int = 512  # pool the tracker selects from
    steps: int = 300
    lr: float = 0.02
    target_accuracy: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class Method:
    name: str
    options: dict = field(default_factory=dict)
    tracker: str | None = None  # PromptTracker model: its prior feeds the accidental-success rule
    select: bool = False  # also pick prompts before rollout by Thompson sampling toward 0.5
    band_controller: bool = False


BAND = (0.1, 0.9)
METHODS = (
    Method("grpo", dict(mask_all_equal=False, mask_too_few=False)),
    Method("all-equal filter", dict()),
    Method("band", dict(band=BAND)),
    Method("band+accidental", dict(band=BAND, accidental_max_successes=2)),
    Method("band+accidental+prior", dict(band=BAND, accidental_max_successes=2), tracker="beta"),
    Method("tracker-beta", dict(band=BAND, accidental_max_successes=2), tracker="beta", select=True),
    Method("tracker-logistic", dict(band=BAND, accidental_max_successes=2), tracker="logistic", select=True),
    Method("tracker-features", dict(band=BAND, accidental_max_successes=2), tracker="features", select=True),
)
MAIN = Method(
    "tracker-beta + band controller",
    dict(accidental_max_successes=2),
    tracker="beta",
    select=True,
    band_controller=True,
)


class Policy(torch.nn.Module):
    def __init__(self, max_len: int) -> None:
        super().__init__()
        # Early sub-steps easy, later ones hard: at the start only short prompts are solvable.
        self.skill = torch.nn.Parameter(torch.linspace(0.0, -2.5, max_len, dtype=torch.float64))
        self.guess = torch.nn.Parameter(torch.tensor(math.log(0.1 / 0.9), dtype=torch.float64))

    def success_prob(self, lengths: torch.Tensor, guess_odds: int) -> torch.Tensor:
        """Exact probability of solving a prompt of each length (for evaluation)."""
        solve = torch.cumprod(torch.sigmoid(self.skill), 0)[lengths - 1]
        g = torch.sigmoid(self.guess)
        return g / guess_odds + (1 - g) * solve

    def rollout(self, lengths: torch.Tensor, guess_odds: int, gen: torch.Generator):
        """Samples one episode per entry: (reward, log-probability of the episode's actions)."""
        n, max_len = lengths.numel(), self.skill.numel()
        p_step = torch.sigmoid(self.skill)
        guessed = torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(self.guess).detach()
        lucky = torch.rand(n, generator=gen, dtype=torch.float64) < 1.0 / guess_odds
        ok = torch.rand(n, max_len, generator=gen, dtype=torch.float64) < p_step.detach()
        needed = torch.arange(max_len) < lengths[:, None]
        failed = needed & ~ok
        first_fail = torch.where(failed.any(1), failed.int().argmax(1), lengths)  # index of the first failure
        taken = torch.arange(max_len) <= first_fail[:, None]  # steps attempted, the failing one included
        taken &= needed
        step_logp = torch.where(ok, torch.log(p_step), torch.log1p(-p_step)) * taken
        solved = ~failed.any(1)
        reward = torch.where(guessed, lucky, solved).to(torch.float64)
        logp = torch.where(
            guessed,
            torch.nn.functional.logsigmoid(self.guess),
            torch.nn.functional.logsigmoid(-self.guess) + step_logp.sum(1),
        )
        return reward, logp


@dataclass
class History:
    eval_accuracy: list = field(default_factory=list)
    medium_accuracy: list = field(default_factory=list)
    guess_rate: list = field(default_factory=list)
    kept_fraction: list = field(default_factory=list)
    zero_variance_rollouts: list = field(default_factory=list)
    band: list = field(default_factory=list)
    pass_by_length: list = field(default_factory=list)
    rollouts: list = field(default_factory=list)


def train(method: Method, cfg: SimConfig, progress=None) -> History:
    gen = torch.Generator().manual_seed(cfg.seed)
    lengths = torch.randint(1, cfg.max_len + 1, (cfg.num_prompts,), generator=gen)
    policy = Policy(cfg.max_len)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    tracker = None
    if method.tracker == "features":  # the prompt's structure, its number of sub-steps, one-hot
        features = torch.nn.functional.one_hot(lengths - 1, cfg.max_len).to(torch.float64)
        tracker = PromptTracker(cfg.num_prompts, "features", features=features)
    elif method.tracker:
        tracker = PromptTracker(cfg.num_prompts, method.tracker)
    controller = (
        BandController(band=BAND, target_kept=0.5, step=0.02, min_width=0.2) if method.band_controller else None
    )
    all_lengths = torch.arange(1, cfg.max_len + 1)
    medium = (all_lengths >= 4) & (all_lengths <= 8)
    hist = History()
    rollouts = 0
    for step in range(cfg.steps):
        if method.select:
            pool = torch.randperm(cfg.num_prompts, generator=gen)[: cfg.candidates_per_step]
            prompts = tracker.select(pool, cfg.prompts_per_step, "thompson", gen, validate=False)
        else:
            prompts = torch.randint(0, cfg.num_prompts, (cfg.prompts_per_step,), generator=gen)
        sample_lengths = lengths[prompts].repeat_interleave(cfg.group_size)
        reward, logp = policy.rollout(sample_lengths, cfg.guess_odds, gen)
        rollouts += reward.numel()
        options = dict(method.options)
        if controller is not None:
            options["band"] = controller.band
        prior = tracker.prior(prompts, validate=False) if tracker is not None else None
        out = group_advantages(reward, cfg.group_size, prior=prior, **options)
        kept = out.sample_mask.sum()
        loss = -(out.advantages.detach() * logp).sum() / kept.clamp(min=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if tracker is not None:
            tracker.update(prompts, out, step, validate=False)
        m = out.metrics()
        if controller is not None:
            controller.update(m["kept_fraction"])
        with torch.no_grad():
            acc = policy.success_prob(all_lengths, cfg.guess_odds)
        hist.eval_accuracy.append(float(acc.mean()))
        hist.medium_accuracy.append(float(acc[medium].mean()))
        hist.guess_rate.append(float(torch.sigmoid(policy.guess.detach())))
        hist.kept_fraction.append(m["kept_fraction"])
        hist.zero_variance_rollouts.append(float((out.stats.std == 0).float().mean()))
        hist.band.append(options.get("band", (0.0, 1.0)))
        hist.pass_by_length.append(acc.tolist())
        hist.rollouts.append(rollouts)
        if progress is not None:
            progress(step, hist)
    return hist


def rollouts_to_target(hist: History, target: float) -> float:
    for acc, used in zip(hist.eval_accuracy, hist.rollouts, strict=True):
        if acc >= target:
            return used
    return math.inf


def _bar(fraction: float, width: int = 24) -> str:
    done = int(fraction * width)
    return "[" + "#" * done + "." * (width - done) + "]"


def main(cfg: SimConfig, png: str | None = "simulate.png", log_every: int = 10) -> History:
    print(f"bandadv simulate: {cfg.num_prompts} prompts of 1..{cfg.max_len} sub-steps, a guess wins 1 in "
          f"{cfg.guess_odds}; {cfg.prompts_per_step} prompts x {cfg.group_size} rollouts per step, {cfg.steps} steps")  # fmt: skip
    print(f"method: {MAIN.name}\n")
    print(f"{'step':>5} {'':26} {'eval acc':>8} {'medium':>7} {'guess':>6} {'kept':>5} {'band':>12} {'rollouts':>9}")
    start = time.time()

    def progress(step: int, h: History) -> None:
        line = (
            f"{step + 1:>5} {_bar((step + 1) / cfg.steps)} {h.eval_accuracy[-1]:>8.3f} {h.medium_accuracy[-1]:>7.3f} "
            f"{h.guess_rate[-1]:>6.3f} {h.kept_fraction[-1]:>5.2f} {f'({h.band[-1][0]:.2f}, {h.band[-1][1]:.2f})':>12} {h.rollouts[-1]:>9}"
        )
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            print(line, flush=True)
        elif sys.stdout.isatty():
            print(line, end="\r", flush=True)

    hist = train(MAIN, cfg, progress)
    print(
        f"\n{time.time() - start:.1f} s; final eval accuracy {hist.eval_accuracy[-1]:.3f}, guess rate {hist.guess_rate[-1]:.3f}"
    )
    if png:
        save_png(hist, cfg, png)
    return hist


def save_png(hist: History, cfg: SimConfig, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    passes = torch.tensor(hist.pass_by_length).numpy()  # [steps, lengths]
    image = axes[0].imshow(passes.T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                           extent=(0, len(passes), 0.5, cfg.max_len + 0.5))  # fmt: skip
    lo = [b[0] for b in hist.band]
    hi = [b[1] for b in hist.band]
    for level, style in ((0.1, ":"), (0.5, "-"), (0.9, ":")):
        # where the pass-rate curve crosses each level: the teachable band sliding up in L
        crossing = [float((row >= level).sum()) + 0.5 for row in passes]
        axes[0].plot(crossing, "w" + style, lw=1.2, label=f"pass rate = {level}")
    axes[0].set(title="pass rate per difficulty over training", xlabel="step", ylabel="sub-steps L")
    axes[0].legend(loc="upper left", fontsize=7)
    fig.colorbar(image, ax=axes[0])
    axes[1].plot(hist.kept_fraction, label="kept fraction of groups")
    axes[1].plot(hist.zero_variance_rollouts, label="zero-variance groups")
    axes[1].plot(lo, "k--", lw=0.8, label="band lo")
    axes[1].plot(hi, "k-.", lw=0.8, label="band hi")
    axes[1].set(title="masks and band", xlabel="step", ylim=(0, 1.02))
    axes[1].legend(fontsize=7)
    axes[2].plot(hist.eval_accuracy, label="eval accuracy (all L)")
    axes[2].plot(hist.medium_accuracy, label="accuracy on L = 4..8")
    axes[2].plot(hist.guess_rate, label="guess rate")
    axes[2].set(title="learning", xlabel="step", ylim=(0, 1.02))
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def compare(cfg: SimConfig, seeds: int = 3) -> list[dict]:
    """Every method at the same rollout budget over several seeds; prints the table."""
    print(f"bandadv simulate --compare: {len(METHODS)} methods x {seeds} seeds, {cfg.steps} steps x "
          f"{cfg.prompts_per_step * cfg.group_size} rollouts each (equal budgets)\n")  # fmt: skip
    rows = []
    for method in METHODS:
        runs = [train(method, replace(cfg, seed=cfg.seed + s)) for s in range(seeds)]

        def stat(values: list[float]) -> str:
            finite = [v for v in values if math.isfinite(v)]
            if not finite:
                return "never"
            spread = statistics.pstdev(finite) if len(finite) > 1 else 0.0
            missing = f" ({len(values) - len(finite)} never)" if len(finite) < len(values) else ""
            return (
                f"{statistics.mean(finite):.3f} ± {spread:.3f}{missing}"
                if max(finite) < 100
                else f"{statistics.mean(finite):,.0f} ± {spread:,.0f}{missing}"
            )

        row = {
            "method": method.name,
            "final eval acc": stat([h.eval_accuracy[-1] for h in runs]),
            "final acc L=4..8": stat([h.medium_accuracy[-1] for h in runs]),
            f"rollouts to {cfg.target_accuracy:.2f}": stat([rollouts_to_target(h, cfg.target_accuracy) for h in runs]),
            "zero-var groups": stat([statistics.mean(h.zero_variance_rollouts) for h in runs]),
            "peak guess rate": stat([max(h.guess_rate) for h in runs]),
            "final guess rate": stat([h.guess_rate[-1] for h in runs]),
        }
        rows.append(row)
        print(" | ".join(f"{v}" for v in row.values()), flush=True)
    print()
    keys = list(rows[0])
    widths = [max(len(k), *(len(r[k]) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for r in rows:
        print("  ".join(r[k].ljust(w) for k, w in zip(keys, widths, strict=True)))
    return rows
