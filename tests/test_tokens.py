"""The token-level testbed: its tasks and verifier, its policy, one GRPO step and determinism."""

from __future__ import annotations

import tempfile
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bandadv import tokens
from bandadv.tokens import EOS, EQ, METHODS, OPS, PAD, SEMI, Task, TokenConfig

TINY = TokenConfig(
    max_ops=3,
    mix=(1.0, 1.0, 1.0),
    warmup_mix=(1.0, 1.0, 0.2),
    d_model=32,
    layers=1,
    heads=2,
    warmup_steps=6,
    warmup_batch=16,
    num_prompts=40,
    group_size=4,
    prompts_per_step=4,
    candidates_per_step=8,
    steps=4,
    eval_every=2,
    eval_per_k=3,
    final_eval_per_k=4,
)


@pytest.fixture(autouse=True)
def _own_cache_one_thread(tmp_path, monkeypatch):
    # the warm-up cache goes to the temp dir: give each test its own; tiny models run fastest on
    # one thread (as --compare runs them), and spin-waiting threads slow a shared machine
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


tasks_st = st.builds(
    Task,
    st.tuples(*[st.integers(0, 9)] * tokens.WIDTH),
    st.text(alphabet=OPS, min_size=1, max_size=6),
    st.integers(2, 10),
)


def test_ops_on_a_known_string():
    assert tokens.apply_op([1, 2, 3], "R") == [3, 2, 1]
    assert tokens.apply_op([1, 2, 3], "L") == [2, 3, 1]
    assert tokens.apply_op([1, 2, 9], "I") == [2, 3, 0]
    assert tokens.apply_op([1, 2, 3], "S") == [2, 1, 3]
    task = Task((1, 2, 3), "RI", 5)
    assert task.states() == [[3, 2, 1], [4, 3, 2]] and task.answer == 4
    assert task.trace() == [3, 2, 1, SEMI, 4, 3, 2, SEMI, EQ, 4, EOS]
    with pytest.raises(ValueError, match="unknown op"):
        tokens.apply_op([1, 2, 3], "X")


@settings(max_examples=200, deadline=None)
@given(tasks_st)
def test_every_written_trace_verifies(task):
    assert tokens.rewards(task, task.trace()) == (1.0, 1.0, False)
    # a direct answer: right, but no written work
    assert tokens.rewards(task, task.trace(direct=True)) == (1.0, 0.0, True)
    assert len(task.prompt(6)) == TokenConfig().prompt_len
    assert len(task.prompt(6)) + len(task.trace()) <= TokenConfig().max_len <= 48


@settings(max_examples=200, deadline=None)
@given(tasks_st, st.data())
def test_a_wrong_intermediate_state_fails_the_process_reward(task, data):
    trace = task.trace()
    line = data.draw(st.integers(0, task.k - 1))
    col = data.draw(st.integers(0, tokens.WIDTH - 1))
    at = line * (tokens.WIDTH + 1) + col
    trace[at] = (trace[at] + data.draw(st.integers(1, 9))) % 10
    outcome, process, _ = tokens.rewards(task, trace)
    assert process == 0.0 and outcome == 1.0  # the outcome reward reads the answer alone


def test_malformed_completions_earn_nothing():
    task = Task((1, 2, 3), "R", 5)
    right = task.answer
    for completion in ([3, 2, 1, SEMI], [3, 2, SEMI, EQ, right, EOS], [EQ, right, right, EOS], [EQ, EOS], []):
        assert tokens.rewards(task, completion)[1] == 0.0
    assert tokens.rewards(task, [EQ, right, EOS, PAD, PAD])[0] == 1.0
    assert tokens.rewards(task, [EQ, (right + 1) % 5, EOS])[0] == 0.0


def test_sizes_fit_the_issue():
    cfg = TokenConfig()
    assert cfg.max_len <= 48
    assert sum(p.numel() for p in tokens.Policy(cfg).parameters()) <= 1_000_000


def test_kv_cache_generation_matches_the_full_forward():
    torch.manual_seed(0)
    policy = tokens.Policy(TINY)
    gen = torch.Generator().manual_seed(0)
    batch = [tokens.random_task(k, 5, gen) for k in (1, 2, 3) for _ in range(4)]
    prompts = torch.tensor([t.prompt(TINY.max_ops) for t in batch])
    completions = policy.generate(prompts, 1.0, gen).clone()
    assert (completions != PAD).any(1).all()
    with torch.no_grad():
        logp, mask = policy.completion_logp(prompts, completions)
        # near-zero temperature: the sample is the full forward's argmax at every position
        greedy = policy.generate(prompts, 1e-6, gen).clone()
        logits = policy(torch.cat([prompts, greedy], 1)[:, :-1])[:, prompts.shape[1] - 1 :]
    real = greedy != PAD
    assert torch.equal(logits.argmax(-1)[real], greedy[real])
    assert mask.equal(completions != PAD) and torch.all(logp[mask] <= 0)


def test_the_model_learns_the_warmup_data():
    # one op: the model must look the op up and move the digits
    cfg = replace(
        TINY, max_ops=1, mix=(1.0,), warmup_mix=(1.0,), layers=2, warmup_steps=250, warmup_batch=64, warmup_lr=5e-3
    )
    gen = torch.Generator().manual_seed(1)
    seqs, mask = tokens.warmup_batch(cfg, 256, gen)

    def token_accuracy(policy):
        with torch.no_grad():
            hit = policy(seqs[:, :-1]).argmax(-1) == seqs[:, 1:]
        return float(hit[mask[:, 1:]].float().mean())

    torch.manual_seed(cfg.seed)
    before = token_accuracy(tokens.Policy(cfg))
    after = token_accuracy(tokens.warmup(cfg))
    assert before < 0.3 and after > 0.9, (before, after)


def test_one_grpo_step_moves_logprobs_toward_positive_advantages():
    torch.manual_seed(0)
    policy = tokens.Policy(TINY)
    gen = torch.Generator().manual_seed(0)
    batch = [tokens.random_task(2, 5, gen) for _ in range(16)]
    prompts = torch.tensor([t.prompt(TINY.max_ops) for t in batch])
    completions = policy.generate(prompts, 1.0, gen).clone()
    advantages = torch.tensor([1.0, -1.0] * 8, dtype=torch.float64)
    kept = torch.ones(16, dtype=torch.bool)
    kept[-2:] = False  # masked samples are left alone

    def seq_logp():
        with torch.no_grad():
            logp, mask = policy.completion_logp(prompts, completions)
        return (logp * mask).sum(1)

    before = seq_logp()
    loss = tokens.grpo_loss(policy, prompts, completions, advantages, kept, 1.0)
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 1e-3 * p.grad
    change = seq_logp() - before
    expected = torch.sign(advantages[:-2]).float()
    # first order: each sample's own term dominates its change
    assert (torch.sign(change[:-2]) == expected).float().mean() >= 0.85
    assert change[:-2][expected > 0].mean() > 0 > change[:-2][expected < 0].mean()


def test_training_is_deterministic_per_seed():
    first, second = tokens.warmup(TINY).state_dict(), tokens.warmup(TINY).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = tokens.warmup(replace(TINY, seed=1)).state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)
    by_name = {m.name: m for m in METHODS}
    for method in ("tracker-beta", "all-equal filter (DAPO)"):
        a = tokens.train(by_name[method], "outcome", TINY)
        b = tokens.train(by_name[method], "outcome", TINY)
        assert (a.eval_solved, a.zero_variance, a.final_outcome) == (b.eval_solved, b.zero_variance, b.final_outcome)
    c = tokens.train(by_name["tracker-beta"], "outcome", replace(TINY, seed=1))
    assert c.zero_variance != a.zero_variance or c.final_outcome != a.final_outcome


def test_equal_budgets_count_screening_rollouts():
    by_name = {m.name: m for m in METHODS}
    budget = TINY.steps * TINY.prompts_per_step * TINY.group_size
    dapo = tokens.train(by_name["all-equal filter (DAPO)"], "process", TINY)
    plain = tokens.train(by_name["grpo"], "process", TINY)
    assert plain.step_rollouts[-1] == budget and len(plain.step_rollouts) == TINY.steps
    # DAPO's screening rounds spend the same budget in fewer updates
    assert dapo.step_rollouts[-1] == budget and len(dapo.step_rollouts) <= TINY.steps


def test_main_prints_steps_and_writes_png(tmp_path, capsys):
    hist = tokens.main(TINY, png=str(tmp_path / "t.png"))
    out = capsys.readouterr().out
    assert "solved per k" in out and "guess rate" in out
    assert len(hist.final_solved) == TINY.max_ops and len(hist.eval_solved) >= 2
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_unknown_reward_is_refused():
    with pytest.raises(ValueError, match="reward must be one of"):
        tokens.train(METHODS[0], "answer", TINY)


def test_command_line_reaches_the_tokens_testbed(monkeypatch):
    from bandadv import simulate
    from bandadv.__main__ import main

    calls = []
    monkeypatch.setattr(tokens, "main", lambda cfg, reward, png: calls.append(("main", cfg.steps, reward, png)))
    monkeypatch.setattr(tokens, "compare", lambda cfg, seeds, jobs, out, png: calls.append(("compare", cfg.steps, seeds, jobs, out, png)))  # fmt: skip
    monkeypatch.setattr(simulate, "main", lambda cfg, png: calls.append(("small", cfg.steps, png)))
    main(["simulate", "--testbed", "tokens", "--steps", "7", "--reward", "process"])
    main(["simulate", "--testbed", "tokens", "--compare", "--seeds", "4", "--out", "t.txt", "--png", "t.png"])
    main(["simulate", "--steps", "5"])
    assert calls == [
        ("main", 7, "process", "simulate_tokens.png"),
        ("compare", TokenConfig().steps, 4, 2, "t.txt", "t.png"),
        ("small", 5, "simulate.png"),
    ]


def test_compare_table_and_record_from_real_runs():
    import json

    runs = {(0, reward, s): tokens.train(METHODS[0], reward, replace(TINY, seed=s)) for reward in ("outcome", "process") for s in (0, 1)}  # fmt: skip
    lines = tokens.table(runs, TINY, seeds=2)
    assert len(lines) == 3 and lines[1].startswith("grpo") and "outcome" in lines[1] and "process" in lines[2]
    assert "±" in lines[1] and f"rollouts to {TINY.target_accuracy:.2f}" in lines[0]
    record = json.loads(json.dumps(tokens._record(METHODS[0], "outcome", 0, runs[(0, "outcome", 0)])))
    assert record["method"] == "grpo" and len(record["final_solved"]) == TINY.max_ops
    assert tokens.rollouts_to_target(runs[(0, "outcome", 0)], 2.0) == float("inf")
    assert tokens.rollouts_to_target(runs[(0, "outcome", 0)], 0.0) == 0
