"""PromptTracker and BandController against plain float64 reimplementations."""

from __future__ import annotations

import math

import pytest
import torch

import bandadv
from bandadv import BandController, PromptTracker
from conftest import merged_counts, tracker_batch


def random_updates(num_prompts: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(steps):
        step += int(torch.randint(0, 3, (1,), generator=gen))
        groups = int(torch.randint(1, 12, (1,), generator=gen))
        ids = torch.randint(0, num_prompts, (groups,), generator=gen).tolist()  # duplicates on purpose
        hits = torch.randint(0, 9, (groups,), generator=gen).tolist()
        yield step, *tracker_batch(ids, hits)


def test_beta_update_matches_plain_reimplementation():
    lam, a0, b0, num = 0.9, 1.0, 2.0, 20
    tracker = PromptTracker(num, "beta", decay=lam, prior=(a0, b0))
    alpha, beta, last = [a0] * num, [b0] * num, [-1] * num
    for step, ids, out in random_updates(num, 40, seed=0):
        tracker.update(ids, out, step)
        for pid, (n, k) in merged_counts(ids, out).items():
            f = lam ** (step - last[pid]) if last[pid] >= 0 else 0.0
            alpha[pid] = f * alpha[pid] + (1 - f) * a0 + k
            beta[pid] = f * beta[pid] + (1 - f) * b0 + (n - k)
            last[pid] = step
    now = tracker.step
    mean, std = tracker.predict(torch.arange(num))
    for pid in range(num):
        f = lam ** (now - last[pid]) if last[pid] >= 0 else 0.0
        a, b = f * alpha[pid] + (1 - f) * a0, f * beta[pid] + (1 - f) * b0
        assert mean[pid].item() == pytest.approx(a / (a + b), rel=1e-12)
        assert std[pid].item() == pytest.approx(math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1))), rel=1e-12)


def test_logistic_update_matches_plain_reimplementation():
    lam, prec0, step_size, num = 0.95, 1.0, 0.5, 15
    tracker = PromptTracker(num, "logistic", decay=lam, difficulty_prior_precision=prec0, ability_step=step_size)
    d, prec, last, theta = [0.0] * num, [prec0] * num, [-1] * num, 0.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for step, ids, out in random_updates(num, 40, seed=1):
        tracker.update(ids, out, step)
        rows = []
        for pid, (n, k) in merged_counts(ids, out).items():
            f = lam ** (step - last[pid]) if last[pid] >= 0 else 0.0
            p = sig(theta - d[pid])
            info = n * p * (1 - p)
            rows.append((pid, k - n * p, info, prec0 + f * (prec[pid] - prec0) + info))
        theta += step_size * sum(r[1] for r in rows) / (sum(r[2] for r in rows) + 1.0)
        for pid, residual, _, precision in rows:
            d[pid] -= residual / precision
            prec[pid] = precision
            last[pid] = step
    assert tracker.state["ability"].item() == pytest.approx(theta, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(tracker.state["difficulty"][:num], torch.tensor(d, dtype=torch.float64))
    mean, _ = tracker.predict(torch.arange(num))
    torch.testing.assert_close(mean, torch.tensor([sig(theta - x) for x in d], dtype=torch.float64))


def test_logistic_predictions_follow_ability_for_unseen_prompts():
    tracker = PromptTracker(10, "logistic")
    for step in range(10):  # the policy keeps solving prompts 0..4
        tracker.update(*tracker_batch([0, 1, 2, 3, 4], [8, 8, 7, 8, 8]), step)
    p, _ = tracker.predict(torch.tensor([9]))
    assert p.item() > 0.6  # never seen, yet predicted easier than at the start (0.5)
    assert math.isnan(tracker.prior(torch.tensor([9])).item())


def _trained(model: str) -> PromptTracker:
    tracker = PromptTracker(30, model)
    rates = [0.05] * 10 + [0.5] * 10 + [0.95] * 10
    gen = torch.Generator().manual_seed(4)
    for step in range(20):
        hits = [int((torch.rand(16, generator=gen) < r).sum()) for r in rates]
        tracker.update(*tracker_batch(list(range(30)), hits, g=16), step)
    return tracker


@pytest.mark.parametrize("model", ["beta", "logistic"])
def test_thompson_prefers_medium_prompts(model):
    tracker = _trained(model)
    gen = torch.Generator().manual_seed(5)
    picks = torch.zeros(30)
    for _ in range(200):
        picks[tracker.select(torch.arange(30), 5, "thompson", gen)] += 1
    hard, medium, easy = picks[:10].sum(), picks[10:20].sum(), picks[20:].sum()
    assert medium > 5 * hard and medium > 5 * easy, (hard, medium, easy)


@pytest.mark.parametrize("strategy", ["thompson", "band", "learnability", "greso"])
@pytest.mark.parametrize("model", ["beta", "logistic"])
def test_select_distinct_and_reproducible(strategy, model):
    tracker = _trained(model)
    cands = torch.randperm(30, generator=torch.Generator().manual_seed(0))[:25]
    a = tracker.select(cands, 12, strategy, torch.Generator().manual_seed(9))
    b = tracker.select(cands, 12, strategy, torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and a.unique().numel() == 12
    assert set(a.tolist()) <= set(cands.tolist())


def test_band_learnability_and_greso_strategies():
    tracker = _trained("beta")
    gen = torch.Generator().manual_seed(1)
    band = tracker.select(torch.arange(30), 10, "band", gen, band=(0.3, 0.7), explore=0.0)
    assert sorted(band.tolist()) == list(range(10, 20))
    explored = tracker.select(torch.arange(30), 10, "band", gen, band=(0.3, 0.7), explore=0.3)
    assert len(set(explored.tolist()) & set(range(10, 20))) == 7
    assert sorted(tracker.select(torch.arange(30), 10, "learnability", gen).tolist()) == list(range(10, 20))
    # GRESO: prompts whose groups keep having zero variance are skipped more often.
    greso = PromptTracker(20, "beta")
    for step in range(6):
        greso.update(*tracker_batch(list(range(20)), [0] * 10 + [4] * 10), step)
    picks = torch.zeros(20)
    for _ in range(100):
        picks[greso.select(torch.arange(20), 5, "greso", gen)] += 1
    assert picks[10:].sum() > 3 * picks[:10].sum()


@pytest.mark.parametrize("model", ["beta", "logistic"])
def test_resume_is_bitwise(model):
    updates = list(random_updates(50, 30, seed=2))
    straight = PromptTracker(50, model)
    for step, ids, out in updates:
        straight.update(ids, out, step)
    first = PromptTracker(50, model)
    for step, ids, out in updates[:12]:
        first.update(ids, out, step)
    checkpoint = first.state_dict()
    resumed = PromptTracker(50, model)
    resumed.load_state_dict(checkpoint)
    for step, ids, out in updates[12:]:
        resumed.update(ids, out, step)
    for name, value in straight.state.items():
        assert torch.equal(value, resumed.state[name]), name
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(
        straight.select(torch.arange(50), 10, "thompson", g1), resumed.select(torch.arange(50), 10, "thompson", g2)
    )


def test_bad_input_raises():
    tracker = PromptTracker(10)
    ids, out = tracker_batch([1, 2], [3, 4])
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
        tracker.update(torch.tensor([1, 10]), out, 0)
    with pytest.raises(ValueError, match="must lie in"):
        tracker.update(torch.tensor([-1, 2]), out, 0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        tracker.update(ids, out, -1)
    tracker.update(ids, out, 5)
    with pytest.raises(ValueError, match="earlier than"):
        tracker.update(ids, out, 4)
    with pytest.raises(ValueError, match="integer tensor"):
        tracker.update(ids.float(), out, 6)
    with pytest.raises(ValueError, match="groups"):
        tracker.update(torch.tensor([1]), out, 6)
    with pytest.raises(ValueError, match="tracker lives on"):
        tracker.update(ids.to("meta"), out, 6)
    with pytest.raises(ValueError, match="k must be"):
        tracker.select(torch.arange(5), 6)
    with pytest.raises(ValueError, match="distinct"):
        tracker.select(torch.tensor([1, 1, 2]), 2)
    with pytest.raises(ValueError, match="strategy"):
        tracker.select(torch.arange(5), 2, "random")
    with pytest.raises(ValueError, match="model"):
        PromptTracker(10, "elo")
    with pytest.raises(ValueError, match="num_prompts"):
        PromptTracker(0)
    with pytest.raises(ValueError, match="checkpoint"):
        PromptTracker(11).load_state_dict(tracker.state_dict())


def test_million_prompts_update_and_select():
    tracker = PromptTracker(1_000_000, "beta")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1_000_000, (4096,), generator=gen)
    rewards = (torch.rand(4096 * 16, generator=gen) < 0.3).float()
    tracker.update(ids, bandadv.group_advantages(rewards, 16), 0, validate=False)
    chosen = tracker.select(torch.randperm(1_000_000, generator=gen)[:100_000], 512, "thompson", gen, validate=False)
    assert chosen.unique().numel() == 512


def test_band_controller():
    c = BandController(band=(0.2, 0.8), target_kept=0.5, step=0.05, min_width=0.2, bounds=(0.0, 1.0))
    assert c.update(0.2) == pytest.approx((0.15, 0.85))  # too few kept: widen
    assert c.update(0.5) == pytest.approx((0.15, 0.85))  # on target: hold
    for _ in range(20):
        c.update(0.9)  # too many kept: narrow, down to min_width
    lo, hi = c.band
    assert hi - lo == pytest.approx(0.2) and (lo + hi) / 2 == pytest.approx(0.5)
    for _ in range(40):
        c.update(0.0)
    assert c.band == (0.0, 1.0)
    assert c.metrics()["band_width"] == 1.0
    with pytest.raises(ValueError):
        BandController(band=(0.8, 0.2))


@pytest.mark.parametrize("compact", [True, False], ids=["cpu-rounds", "gpu-rounds"])
@pytest.mark.parametrize("shape", [0.3, 1.0, 2.5, 40.0])
def test_gamma_draws_have_the_gamma_mean_and_variance(shape, compact):
    # Thompson sampling under the beta model rests on this sampler (a Beta draw is x / (x + y)).
    from bandadv.tracker import _gamma

    n = 100_000
    gen = torch.Generator().manual_seed(int(shape * 10) + compact)
    x = _gamma(torch.full((n,), shape, dtype=torch.float64), gen, compact=compact)
    assert torch.isfinite(x).all() and (x > 0).all()
    assert abs(float(x.mean()) - shape) < 5 * math.sqrt(shape / n)  # Gamma(k, 1): mean k, variance k
    assert abs(float(x.var()) / shape - 1) < 0.05
    again = _gamma(
        torch.full((n,), shape, dtype=torch.float64), gen.manual_seed(int(shape * 10) + compact), compact=compact
    )
    assert torch.equal(x, again)
    grid = _gamma(torch.full((250, 400), shape, dtype=torch.float64), gen, compact=compact)  # any shape
    assert grid.shape == (250, 400) and abs(float(grid.mean()) - shape) < 5 * math.sqrt(shape / n)
