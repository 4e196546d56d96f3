"""The benchmark harness compares like with like: every provider runs, and where bandadv keeps a
group its advantages are the baseline's numbers (the baselines mask nothing)."""

from __future__ import annotations

import math

import pytest
import torch

from bandadv import bench, ops
from bandadv.bench import Case, format_table, make_inputs, providers, run_case

pytestmark = pytest.mark.skipif("CPU" not in ops.COMPILED, reason="the CPU kernel was not built")


@pytest.mark.parametrize("case", [Case(24, 8), Case(16, 5, ragged=True)], ids=lambda c: c.name)
def test_every_provider_runs_and_is_timed(case):
    rows = run_case(case, "cpu", budget_s=0.01, rotate=2)
    names = {r.provider for r in rows}
    assert {"bandadv-cpu", "bandadv-cpu rloo", "verl-vectorized", "verl-loop", "verl-loop rloo", "copy"} <= names
    if not case.ragged:
        assert {"trl-eager", "openrlhf", "openrlhf rloo"} <= names
    for r in rows:
        assert r.median_ms > 0 and r.q20_ms <= r.median_ms <= r.q80_ms
        assert all(math.isfinite(v) and v > 0 for v in r.ratios.values())
    assert "bandadv-cpu rloo" in format_table(rows)


@pytest.mark.parametrize(
    "bandadv_name,baseline,atol",
    [
        ("bandadv-cpu", "trl-eager", 2e-3),  # TRL's eps is 1e-4, bandadv's default 1e-6
        ("bandadv-cpu", "verl-loop", 1e-4),
        ("bandadv-cpu", "verl-vectorized", 1e-4),
        ("bandadv-cpu rloo", "openrlhf rloo", 1e-5),
        ("bandadv-cpu rloo", "verl-loop rloo", 1e-5),
    ],
)
def test_kept_groups_match_the_baselines(bandadv_name, baseline, atol):
    case = Case(64, 8)
    x = make_inputs(case, "cpu", seed=3)
    table = providers("cpu", case)
    out = table[bandadv_name][1](x)
    expected = table[baseline][1](x)
    kept = out.sample_mask
    assert kept.any() and not kept.all()  # the band and accidental rule mask some groups
    torch.testing.assert_close(out.advantages[kept], expected[kept].float(), rtol=1e-3, atol=atol)
    assert (out.advantages[~kept] == 0).all()


def test_tracker_rows_run_for_every_model():
    from bandadv.bench import format_tracker_table, run_tracker

    rows = run_tracker("cpu", num_prompts=2048, groups=64, budget_s=0.01, candidates=512, num_features=8)
    names = [r.provider for r in rows]
    for model in ("beta", "logistic", "features"):
        for what in ("update", "select thompson", "select band", "predict"):
            assert f"tracker-{model} {what}" in names
    assert all(r.median_ms > 0 for r in rows)
    assert "d=8" in format_tracker_table(rows)


def test_goal_rows_run():
    # `python -m bandadv bench` prints these ratios; here they only have to run (timings are for the bench).
    rows = bench.goals(budget_s=0.01, min_reps=3)
    assert [r[0].split(":")[0].split(" ")[0] for r in rows] == ["512x16", "512x16", "one", "", "1Mx16", "1Mx16"]
    assert all(ours > 0 and other > 0 and ratio > 0 for _, ours, other, ratio, _ in rows)
    assert "target" in bench.format_goals(rows)
