"""The TRL adapter, tested by running TRL's own GRPOTrainer and RLOOTrainer (tiny random Qwen2,
character tokenizer, CPU, nothing downloaded)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REQUIRE_EXTENSION
from trl_helpers import base_args, coin_success, save_tiny_model, state_hash, tiny_dataset, vowel_reward

if REQUIRE_EXTENSION:  # make test / CI: the TRL tests must run, never skip
    import trl
else:
    trl = pytest.importorskip("trl")

import bandadv
from bandadv.integrations.trl import (
    PROMPT_ID_COLUMN,
    BandGRPOConfig,
    BandGRPOTrainer,
    BandRLOOConfig,
    BandRLOOTrainer,
)

REWARDS = [vowel_reward, coin_success]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def make_trainer(trainer_cls, config_cls, model_dir, out, *, dataset=None, reward_funcs=None, tracker=None, **args):
    from transformers import AutoTokenizer

    extra = {} if tracker is None else {"tracker": tracker}
    return trainer_cls(
        model=model_dir,
        reward_funcs=reward_funcs or REWARDS,
        args=config_cls(**base_args(out, **args)),
        train_dataset=dataset if dataset is not None else tiny_dataset(),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        **extra,
    )


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def assert_same_numbers(stock: list[float], band: list[float], what: str, scales: list[float] | None = None) -> None:
    """Relative difference <= 1e-6. A loss is a sum of zero-mean advantages times ratios that
    nearly cancel (RLOO's is rounding noise around 0 at ratio 1), so its difference is taken
    relative to the larger of the loss and its scale, the step's mean |advantage|."""
    assert len(stock) == len(band) >= 3, what
    scales = scales or [0.0] * len(stock)
    for step, (a, b, s) in enumerate(zip(stock, band, scales, strict=True)):
        scale = max(abs(a), abs(b), s)
        print(f"{what} step {step}: stock {a!r} bandadv {b!r} diff {abs(a - b):.3g} scale {scale:.3g}")
        assert abs(a - b) <= 1e-6 * scale, f"{what} differs at step {step}: stock {a!r}, bandadv {b!r}"


def assert_reproduces(stock, band) -> None:
    rewards_std = logged(stock, "reward_std")
    assert min(rewards_std) > 0.05 and max(logged(stock, "frac_reward_zero_std")) < 1, "rewards without spread"
    scales = logged(band, "bandadv/mean_abs_advantage")
    assert_same_numbers(logged(stock, "loss"), logged(band, "loss"), "loss", scales)
    assert_same_numbers(logged(stock, "grad_norm"), logged(band, "grad_norm"), "grad_norm")
    assert min(logged(band, "grad_norm")) > 1e-3
    # the last generation batch's advantages, as each trainer logged them for its completions table
    stock_adv = torch.tensor(list(stock._logs["advantages"]))
    band_adv = torch.tensor(list(band._logs["advantages"]))
    assert stock_adv.abs().max() > 0.1
    print("advantages: max abs diff", float((band_adv - stock_adv).abs().max()))
    torch.testing.assert_close(band_adv, stock_adv, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_grpo_reproduces_stock_trainer(model_dir, tmp_path, scale_rewards):
    args = dict(scale_rewards=scale_rewards, gradient_accumulation_steps=2)
    stock = make_trainer(trl.GRPOTrainer, trl.GRPOConfig, model_dir, tmp_path / "stock", **args)
    stock.train()
    band = make_trainer(BandGRPOTrainer, BandGRPOConfig, model_dir, tmp_path / "band", **args)
    band.train()
    assert band._bandadv_last["result"].advantages.numel() == 16  # bandadv's numbers were trained on
    assert_reproduces(stock, band)


@pytest.mark.parametrize(("beta", "clip"), [(0.0, None), (0.05, [0.1, 1.1])])
def test_rloo_reproduces_stock_trainer(model_dir, tmp_path, beta, clip):
    """beta > 0: RLOO folds the KL into the (clipped) reward; bandadv sees that same reward."""
    args = dict(beta=beta, reward_clip_range=clip, gradient_accumulation_steps=2)
    stock = make_trainer(trl.RLOOTrainer, trl.RLOOConfig, model_dir, tmp_path / "stock", **args)
    stock.train()
    band = make_trainer(BandRLOOTrainer, BandRLOOConfig, model_dir, tmp_path / "band", **args)
    band.train()
    assert_reproduces(stock, band)
    if beta:
        assert min(logged(band, "kl")[1:]) > 0  # the KL term was live after the first update


def loss_and_grads(trainer, inputs: dict, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    trainer.model.zero_grad()
    n = inputs["advantages"].shape[0]
    sub = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
           for k, v in inputs.items()}  # fmt: skip
    sub["num_items_in_batch"] = inputs["num_items_in_batch"]
    loss = trainer.compute_loss(trainer.model, sub)
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.model.parameters()]
    return loss.detach(), grads


def test_rloo_with_band_and_selection(model_dir, tmp_path):
    seen: list[list[int]] = []
    trainer = make_trainer(
        BandRLOOTrainer, BandRLOOConfig, model_dir, tmp_path, reward_funcs=[vowel_reward, recording_reward(seen)],
        beta=0.0, band=[0.2, 0.8], **selection_args(max_steps=3),
    )  # fmt: skip
    trainer.train()
    assert len(logged(trainer, "bandadv/kept_fraction")) == 3
    assert seen == [sorted(entry["rows"]) for entry in list(trainer._bandadv_sampler.selection_log)[:3]]
    assert int(trainer._bandadv_tracker.state["visits"].sum()) == 6
    out = trainer._bandadv_last["result"]
    assert bool((out.advantages[~out.sample_mask] == 0).all())


def test_grpo_selection_with_the_features_tracker(model_dir, tmp_path):
    # The cross-prompt model (issue 13) behind TRL's sampler: prompts of a level share a feature,
    # so a never-seen prompt of a level the tracker has seen is predicted off the bare ability
    # sigmoid(theta) (its own residual is still 0: only the shared weights moved it).
    dataset = tiny_dataset()
    levels = torch.tensor(dataset["level"])
    tracker = bandadv.PromptTracker(
        len(dataset), model="features", features=torch.nn.functional.one_hot(levels, 4).double()
    )
    trainer = make_trainer(
        BandGRPOTrainer, BandGRPOConfig, model_dir, tmp_path, dataset=dataset, tracker=tracker,
        tracker_model="features", **selection_args(max_steps=2),
    )  # fmt: skip
    trainer.train()
    assert trainer._bandadv_tracker is tracker and int(tracker.state["visits"].sum()) == 4
    seen = tracker.state["visits"][: len(dataset)] > 0
    unseen_of_seen_levels = ~seen & torch.isin(levels, levels[seen])
    assert bool(unseen_of_seen_levels.any())
    pass_rate = tracker.predict(torch.arange(len(dataset)))[0]
    bare = torch.sigmoid(tracker.state["ability"])
    assert bool((pass_rate[unseen_of_seen_levels] != bare).all())


def half_success(completions, level, **kwargs) -> list[float]:
    """Level-0 prompts always succeed (above any band); others succeed on every other sample."""
    return [1.0 if lv == 0 else float(i % 2) for i, lv in enumerate(level)]


def bonus(completions, **kwargs) -> list[float]:
    """A constant shaping reward: total reward > 0.5 everywhere, so success must come from
    success_reward's function, not from the total."""
    return [0.6] * len(completions)


@pytest.mark.parametrize("mask_loss", [True, False])
def test_band_masks_gradient_normaliser_and_metrics(model_dir, tmp_path, mask_loss):
    trainer = make_trainer(
        BandGRPOTrainer, BandGRPOConfig, model_dir, tmp_path, reward_funcs=[vowel_reward, half_success, bonus],
        band=[0.2, 0.8], success_reward="half_success", mask_loss=mask_loss, max_steps=2,
    )  # fmt: skip
    trainer.train()  # the bandadv/* metrics reach TRL's log
    keys = bandadv.group_advantages(torch.rand(8), 4).metrics().keys()
    for key in keys:
        assert len(logged(trainer, f"bandadv/{key}")) == 2, key

    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    batch = [trainer.train_dataset[i] for i in (0, 1, 4, 2) for _ in range(4)]  # levels 0, 1, 0, 2
    inputs = trainer._generate_and_score_completions(batch)
    out = trainer._bandadv_last["result"]
    assert out.reason.tolist() == [int(bandadv.Reason.ABOVE_BAND), 0, int(bandadv.Reason.ABOVE_BAND), 0]
    assert trainer._metrics["train"]["bandadv/above_band_fraction"][-1] == 0.5
    keep = out.sample_mask
    assert 0 < int(keep.sum()) < keep.numel(), "the batch must have masked and kept groups"
    assert torch.equal(out.group_mask.repeat_interleave(4), keep)
    assert bool((inputs["advantages"][~keep] == 0).all())
    tokens = inputs["completion_mask"].sum(1)
    expected_items = tokens[keep].sum() if mask_loss else tokens.sum()
    assert int(inputs["num_items_in_batch"]) == int(expected_items)

    masked_rows, kept_rows = (~keep).nonzero().squeeze(1), keep.nonzero().squeeze(1)
    _, masked_grads = loss_and_grads(trainer, inputs, masked_rows)
    assert all(bool((g == 0).all()) for g in masked_grads), "masked groups carry gradient"
    kept_loss, kept_grads = loss_and_grads(trainer, inputs, kept_rows)
    assert any(bool((g != 0).any()) for g in kept_grads)
    full_loss, full_grads = loss_and_grads(trainer, inputs, torch.arange(keep.numel()))
    torch.testing.assert_close(full_loss, kept_loss)  # masked rows add nothing, and the normaliser is shared
    for full, kept in zip(full_grads, kept_grads, strict=True):
        torch.testing.assert_close(full, kept, rtol=1e-5, atol=1e-7)


def test_none_reward_is_an_invalid_sample(model_dir, tmp_path):
    def sometimes_none(completions, **kwargs):
        return [None if i % 4 == 1 else float(len(c) % 3) for i, c in enumerate(completions)]

    trainer = make_trainer(
        BandGRPOTrainer, BandGRPOConfig, model_dir, tmp_path, reward_funcs=[sometimes_none], max_steps=1
    )
    trainer.train()
    last = trainer._bandadv_last
    out, rewards = last["result"], last["rewards"]
    invalid = torch.arange(rewards.numel()) % 4 == 1
    assert bool(torch.isnan(rewards[invalid]).all()) and not bool(torch.isnan(rewards[~invalid]).any())
    assert bool((out.stats.count == 3).all())  # left out of every statistic
    assert bool((out.advantages[invalid] == 0).all()) and not bool(out.sample_mask[invalid].any())


def recording_reward(seen: list):
    def reward(completions, **kwargs):
        seen.append(sorted(set(kwargs[PROMPT_ID_COLUMN])))
        return coin_success(completions, **kwargs)

    reward.__name__ = "coin_success"
    return reward


def selection_args(**overrides) -> dict:
    args = dict(prompt_selection="thompson", success_reward="coin_success", per_device_train_batch_size=8)
    args.update(overrides)
    return args


def test_thompson_selection_follows_tracker_with_one_batch_lag(model_dir, tmp_path):
    seen: list[list[int]] = []
    trainer = make_trainer(
        BandGRPOTrainer, BandGRPOConfig, model_dir, tmp_path, reward_funcs=[vowel_reward, recording_reward(seen)],
        tracker=bandadv.PromptTracker(16, decay=1.0), **selection_args(max_steps=24),
    )  # fmt: skip
    trainer.train()
    log = list(trainer._bandadv_sampler.selection_log)
    assert len(seen) == 24
    # the prompts generated are the chunks the tracker chose, in order
    assert seen == [sorted(entry["rows"]) for entry in log[:24]]
    # chunk t was drawn while batch t-1 was being handed out (the loader fetches one ahead): the
    # tracker knew batches 0..t-2. An epoch's first chunk (8 chunks of 2 prompts an epoch) is drawn
    # when the epoch starts, after every earlier batch was scored.
    expected = [2 * t if t % 8 == 0 else 2 * (t - 1) for t in range(24)]
    assert [entry["tracker_visits"] for entry in log[:24]] == expected
    # Level-0 prompts (every fourth) always succeed and level-3 ones succeed a quarter of the
    # time: far from target 0.5, so chosen less often than uniformly. In epochs 2 and 3 (chunks
    # 8..23), once every prompt has been seen, RepeatSampler takes level-0 prompts 8 times and
    # level 0 or 3 16 times (a sampler choosing chunks at random took them 3 and 10 times here).
    picks = [sum(1 for ids in seen[8:] for i in ids if i % 4 == level) for level in range(4)]
    assert picks[0] <= 2 and picks[0] + picks[3] <= 6, picks
    visits = trainer._bandadv_tracker.state["visits"][:16]
    assert int(visits.sum()) == 48


@pytest.mark.parametrize(("accumulation", "workers"), [(2, 0), (1, 1)])
def test_selection_lag(model_dir, tmp_path, accumulation, workers):
    """The lag the adapter documents: chunk t is drawn when the tracker knows batches up to
    t - 2 - workers * prefetch_factor (2), or every earlier epoch's batches, whichever is more."""
    trainer = make_trainer(
        BandGRPOTrainer, BandGRPOConfig, model_dir, tmp_path, gradient_accumulation_steps=accumulation,
        dataloader_num_workers=workers, **selection_args(max_steps=6),
    )  # fmt: skip
    trainer.train()
    prompts = 8 * accumulation // 4  # per generation batch: per_device 8 x accumulation, 4 generations each
    chunks_per_epoch = 16 // prompts
    visits = [entry["tracker_visits"] for entry in trainer._bandadv_sampler.selection_log]
    expected = [prompts * max(t - t % chunks_per_epoch, t - 1 - 2 * workers) if t else 0 for t in range(len(visits))]
    assert len(visits) >= 6 and visits == expected


def test_resume_continues_the_same_selection(model_dir, tmp_path):
    seen_full: list[list[int]] = []
    args = selection_args(max_steps=6, save_strategy="steps", save_steps=3)
    full = make_trainer(
        BandGRPOTrainer, BandGRPOConfig, model_dir, tmp_path / "full",
        reward_funcs=[vowel_reward, recording_reward(seen_full)], **args,
    )  # fmt: skip
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = torch.load(checkpoint / "bandadv_state.pt", weights_only=False)

    seen_resumed: list[list[int]] = []
    resumed = make_trainer(
        BandGRPOTrainer, BandGRPOConfig, model_dir, tmp_path / "resumed",
        reward_funcs=[vowel_reward, recording_reward(seen_resumed)], **args,
    )  # fmt: skip
    loaded: dict = {}
    original_load = resumed._load_optimizer_and_scheduler

    def load_and_record(ckpt):
        original_load(ckpt)
        loaded["state"] = {k: v.clone() for k, v in resumed._bandadv_tracker.state.items()}

    resumed._load_optimizer_and_scheduler = load_and_record
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in saved["tracker"]["state"].items():
        assert torch.equal(loaded["state"][name], value), name  # restored bit for bit
    assert len(seen_full) == 6 and seen_resumed == seen_full[3:]
    assert state_hash(resumed._bandadv_tracker) == state_hash(full._bandadv_tracker)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes(model_dir, tmp_path):
    """torchrun, two CPU processes (gloo): training runs, both ranks hold the same tracker after
    every step, and each rank trains on its slice of bandadv's result over the gathered batch."""
    script = Path(__file__).parent / "trl_two_process.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(script), model_dir, str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    steps = 4
    assert [len(r["hashes"]) for r in ranks] == [steps, steps]
    assert ranks[0]["hashes"] == ranks[1]["hashes"]
    assert len(set(ranks[0]["hashes"])) == steps  # the tracker moved every step
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == steps
    for b0, b1 in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True):
        torch.testing.assert_close(b0["rewards"], b1["rewards"], rtol=0, atol=0, equal_nan=True)
        assert torch.equal(b0["group_ids"], b1["group_ids"])
        single = bandadv.group_advantages(b0["rewards"], 4, success=b0["success"], config=b0["config"])
        n = b0["advantages"].numel()
        assert torch.equal(b0["advantages"], single.advantages[:n])
        assert torch.equal(b1["advantages"], single.advantages[n:])
        assert n == 8 and single.advantages.numel() == 16
    assert ranks[0]["log_has_bandadv"] and ranks[0]["selected"] == ranks[1]["selected"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(band=[0.9, 0.1]), "band"),
        (dict(band=[0.0, 1.5]), "band"),
        (dict(band=[0.5]), "band"),
        (dict(prompt_selection="uniformly"), "prompt_selection"),
        (dict(tracker_model="elo"), "tracker_model"),
        (dict(accidental_action="drop"), "accidental_action"),
        (dict(min_std=-1.0), "min_std"),
    ],
)
def test_bad_config_is_refused(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        BandGRPOConfig(**base_args(tmp_path, **overrides))


def test_unknown_option_is_refused_by_the_parser(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(BandGRPOConfig)
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false"]
    (args,) = parser.parse_args_into_dataclasses([*argv, "--band", "0.1", "0.9", "--prompt_selection", "thompson"])
    assert args.band == [0.1, 0.9] and args.prompt_selection == "thompson"
    with pytest.raises(ValueError, match="bandd"):
        parser.parse_args_into_dataclasses([*argv, "--bandd", "0.1", "0.9"])
    (args,) = trl.TrlParser(BandGRPOConfig).parse_args_and_config([*argv, "--min_std", "0.01", "--mask_loss", "false"])
    assert args.min_std == 0.01 and args.mask_loss is False
    with pytest.raises(TypeError, match="bandd"):
        BandGRPOConfig(**base_args(tmp_path), bandd=[0.1, 0.9])


def never_called(completions, **kwargs):
    raise AssertionError("a reward was computed: the check came after generation")


def iterable_dataset():
    return tiny_dataset().to_iterable_dataset()


@pytest.mark.parametrize(
    ("overrides", "dataset", "tracker", "match"),
    [
        (dict(success_reward="accuracy"), None, None, "success_reward"),
        (dict(prompt_selection="thompson", prompt_id_column="pid"), None, None, "prompt_id_column"),
        (dict(prompt_id_column="level", prompt_selection="thompson"), None, None, "prompt_id_column.*distinct"),
        (dict(prompt_id_column="pid"), "ids_out_of_range", 16, "prompt_id_column"),
        (dict(), None, 8, "tracker has 8 prompts"),
        (dict(prompt_selection="thompson"), "iterable", None, "iterable"),
        (dict(multi_objective_aggregation="normalize_then_sum"), None, None, "multi_objective_aggregation"),
        (dict(prompt_selection="thompson", tracker_model="features"), None, None, "tracker_model='features' needs"),
    ],
)
def test_bad_input_is_refused_when_the_trainer_is_built(model_dir, tmp_path, overrides, dataset, tracker, match):
    if dataset == "ids_out_of_range":
        dataset = tiny_dataset().add_column("pid", list(range(1, 17)))
    elif dataset == "iterable":
        dataset = iterable_dataset()
    tracker = bandadv.PromptTracker(tracker) if tracker else None
    with pytest.raises(ValueError, match=match):
        make_trainer(
            BandGRPOTrainer, BandGRPOConfig, model_dir, tmp_path, dataset=dataset, tracker=tracker,
            reward_funcs=[never_called], **overrides,
        )  # fmt: skip


def test_rloo_refuses_normalize_advantages(model_dir, tmp_path):
    with pytest.raises(ValueError, match="normalize_advantages"):
        make_trainer(BandRLOOTrainer, BandRLOOConfig, model_dir, tmp_path, normalize_advantages=True)


def test_config_type_is_checked(model_dir, tmp_path):
    with pytest.raises(TypeError, match="BandGRPOConfig"):
        BandGRPOTrainer(model=model_dir, reward_funcs=REWARDS, args=trl.GRPOConfig(**base_args(tmp_path)))


def test_bandadv_imports_without_trl():
    code = "import sys; sys.modules['trl'] = None; import bandadv, bandadv.integrations, bandadv.integrations.verl"
    subprocess.run([sys.executable, "-c", code], check=True)
    fails = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['trl'] = None; import bandadv.integrations.trl"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert fails.returncode != 0 and "trl" in fails.stderr


def test_example_script_runs(tmp_path):
    script = Path(__file__).parent.parent / "examples" / "trl_grpo.py"
    result = subprocess.run(
        [sys.executable, str(script), "--max_steps", "5", "--num_prompts", "16", "--output_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "step    5" in result.stdout and "kept" in result.stdout
