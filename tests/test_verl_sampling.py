"""Dynamic sampling and prompt selection in verl 0.9.1's V1 trainer, through verl's own code on
the CPU: verl builds the trainer (its trainer registry), the replay buffer (its custom-sampler
config), the data loaders (its dataset config) and runs `prepare_step`, the replay buffer's
`sample()` with its refills, and `_compute_advantage`. Faked (tests/verl_sampling_helpers.py):
the TransferQueue store, the rollouts and the dataset's files."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REQUIRE_EXTENSION

if REQUIRE_EXTENSION:  # make test / CI: the verl tests must run, never skip
    import verl
else:
    verl = pytest.importorskip("verl")

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

import bandadv
from bandadv.integrations import verl as bv
from bandadv.integrations import verl_sampling as vs
from verl_sampling_helpers import (
    FakeTransferQueue,
    acc_by_uid,
    band_buffer_config,
    groups_of,
    make_trainer,
    run_step,
    trainer_config,
    true_pass_rate,
    write_prompts,
)

BAND = {"band": [0.1, 0.9], "accidental_max_successes": 1, "success_key": "acc"}


@pytest.fixture
def tq(monkeypatch):
    store = FakeTransferQueue()
    store.install(monkeypatch)
    return store


def expected_mask(acc: np.ndarray, **options) -> bool:
    """bandadv's own verdict on one group, from the raw success the fake rollout drew."""
    success = torch.from_numpy(acc)
    out = bandadv.group_advantages(
        success, acc.shape[0], success=success, preset="verl", mask_all_equal=True, **options
    )
    return bool(out.group_mask[0])


# ---- dynamic sampling ---------------------------------------------------------------------------


def test_verl_builds_the_band_replay_buffer_from_its_config(tq, tmp_path):
    trainer = make_trainer(band_buffer_config(tmp_path, **{"algorithm.bandadv": BAND}), tq)
    buffer = trainer.replay_buffer
    assert type(buffer) is vs.BandReplayBuffer and isinstance(buffer, ReplayBuffer)
    assert buffer.mask_config.band == (0.1, 0.9) and buffer.mask_config.accidental_max_successes == 1
    assert buffer.mask_config.mask_all_equal and buffer.success_key == "acc"
    assert buffer.gen_batch_size == 1 and trainer.config.data.gen_batch_size == 1  # verl's exact refills


def test_sampled_groups_are_those_bandadv_keeps_and_evicted_ones_are_refilled(tq, tmp_path):
    trainer = make_trainer(band_buffer_config(tmp_path, **{"algorithm.bandadv": BAND}), tq)
    manager = trainer.agent_loop_manager
    acc = acc_by_uid(manager)
    for _ in range(3):
        batch, metrics, advantages = run_step(trainer, tq)
        acc = acc_by_uid(manager)
        groups = groups_of(batch.keys)
        assert len(groups) == trainer.config.data.train_batch_size
        assert all(len(keys) == 8 for keys in groups.values())
        options = {k: v for k, v in BAND.items() if k != "success_key"}
        assert all(expected_mask(acc[uid], **options) for uid in groups)  # every sampled group kept by bandadv
        masked = [uid for uid in acc if not expected_mask(acc[uid], **options)]
        assert metrics["training/filter_groups/evicted_samples"] == len(masked)
        assert len(acc) == len(masked) + len(groups) + metrics.get(
            "training/filter_groups/discarded_surplus_samples", 0
        )
        reasons = {
            "all_equal": sum(acc[u].min() == acc[u].max() for u in masked),
            "accidental_success": sum(acc[u].sum() == 1 for u in masked),
        }
        for name, count in reasons.items():
            assert metrics[f"training/filter_groups/bandadv/{name}"] == count
        assert advantages.values().abs().sum() > 0  # verl's _compute_advantage ran on the kept groups
        manager.generated.clear()
    assert len(masked) > 0


def test_refills_in_flight_bound_and_surplus_are_verls(tq, tmp_path):
    """Rollouts that finish a poll later: verl's sync DAPO path refills 2k prompts per k evicted,
    at most max_inflight_gen_batches train batches in flight, and once enough groups are kept
    discards the surplus."""
    cfg = band_buffer_config(
        tmp_path, **{"algorithm.bandadv": BAND, "algorithm.filter_groups.max_inflight_gen_batches": 1}
    )
    trainer = make_trainer(cfg, tq)
    trainer.replay_buffer.poll_interval = 0.0
    refills = []
    verl_refill = trainer.replay_buffer._verl_refill
    trainer.replay_buffer._verl_refill = lambda n: refills.append(n) or verl_refill(n)
    manager = trainer.agent_loop_manager
    manager.defer()
    manager.pass_rate = lambda index: 0.0 if index % 3 else 0.5
    batch, metrics, _ = run_step(trainer, tq)
    acc = acc_by_uid(manager)
    options = {k: v for k, v in BAND.items() if k != "success_key"}
    kept = [uid for uid in acc if expected_mask(acc[uid], **options)]
    evicted = len(acc) - len(kept)
    assert len(groups_of(batch.keys)) == 6 and set(groups_of(batch.keys)) <= set(kept)
    assert metrics["training/filter_groups/evicted_samples"] == evicted
    assert metrics["training/filter_groups/discarded_surplus_samples"] == len(kept) - 6 > 0
    assert refills and all(n <= 6 for n in refills) and manager.max_in_flight <= 6  # 1 batch in flight
    assert sum(refills) <= 2 * evicted
    assert not tq.tags["train"]  # the surplus was cleared with the batch


def test_one_response_per_session_its_final_output():
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    rows, keys = [], []
    for session, acc in enumerate([1.0, 0.0, 1.0]):
        for turn in range(2):  # verl copies the final output's reward to the earlier ones
            keys.append(f"u1_{session}_{turn}")
            rows.append({
                "rm_scores": torch.tensor([0.0, acc + 0.3 * turn]), "index": 7,
                "extra_fields": {"reward_extra_info": {"acc": acc}},
            })  # fmt: skip
    (outcome,) = vs.read_outcomes(list_of_dict_to_tensordict(rows), keys, "acc").values()
    assert outcome.dataset_index == 7
    assert outcome.success.tolist() == [1.0, 0.0, 1.0] and outcome.scores.tolist() == pytest.approx([1.3, 0.3, 1.3])


def test_without_success_key_all_equal_is_on_the_score(tq, tmp_path):
    trainer = make_trainer(band_buffer_config(tmp_path), tq)
    batch, metrics, _ = run_step(trainer, tq)
    scores = {g["uid"]: g["score"] for g in trainer.agent_loop_manager.generated}
    assert all(np.ptp(scores[uid]) > 0 for uid in groups_of(batch.keys))
    assert metrics.get("training/filter_groups/evicted_samples", 0) == sum(np.ptp(s) == 0 for s in scores.values())


def test_max_num_gen_batches_bounds_a_step(tq, tmp_path):
    cfg = band_buffer_config(tmp_path, **{"algorithm.bandadv": BAND, "algorithm.filter_groups.max_num_gen_batches": 3})
    trainer = make_trainer(cfg, tq)
    trainer.agent_loop_manager.pass_rate = lambda index: 0.0  # nothing is ever kept
    with pytest.raises(ValueError, match=r"max_num_gen_batches=3: generated too many"):
        run_step(trainer, tq)
    assert len(trainer.agent_loop_manager.generated) == 3 * trainer.config.data.train_batch_size


def test_unbounded_when_max_num_gen_batches_is_zero(tq, tmp_path):
    trainer = make_trainer(band_buffer_config(tmp_path, **{"algorithm.bandadv": BAND}), tq)
    trainer.agent_loop_manager.pass_rate = lambda index: 0.0 if index % 8 else 0.5  # one prompt in 8 learnable
    batch, _, _ = run_step(trainer, tq)
    assert len(groups_of(batch.keys)) == trainer.config.data.train_batch_size
    assert len(trainer.agent_loop_manager.generated) > 3 * trainer.config.data.train_batch_size


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"algorithm.bandadv": {"bnad": 1}}, r"algorithm\.bandadv\.bnad: unknown option"),
        ({"algorithm.bandadv": {"band": [0.5, 2]}}, r"algorithm\.bandadv\.band must be"),
        ({"algorithm.filter_groups.enable": False}, r"algorithm\.filter_groups\.enable=True"),
        ({"algorithm.filter_groups.max_num_gen_batches": "x"}, r"algorithm\.filter_groups\.max_num_gen_batches"),
        ({"trainer.v1.trainer_mode": "colocate_async"}, r"custom_sampler\.name=BandReplayBufferAsync"),
    ],
)
def test_bad_config_fails_when_verl_builds_the_trainer(tq, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(band_buffer_config(tmp_path, **overrides), tq)


def test_missing_success_key_fails_at_the_first_sample(tq, tmp_path):
    trainer = make_trainer(band_buffer_config(tmp_path, **{"algorithm.bandadv": {"success_key": "correct"}}), tq)
    with pytest.raises(ValueError, match=r"algorithm\.bandadv\.success_key='correct' is not in .*'acc'"):
        run_step(trainer, tq)


def test_async_buffer_evicts_and_refills_one_for_one(tq, tmp_path):
    cfg = band_buffer_config(
        tmp_path, **{"algorithm.bandadv": BAND, "trainer.v1.trainer_mode": "colocate_async",
                     "trainer.v1.sampler.custom_sampler.name": "BandReplayBufferAsync"}
    )  # fmt: skip
    trainer = make_trainer(cfg, tq)
    assert type(trainer.replay_buffer) is vs.BandReplayBufferAsync
    trainer._add_prompts_to_generate(trainer.config.data.train_batch_size)
    batch, metrics = trainer.replay_buffer.sample(global_steps=1, partition_id="train", batch_size=6)
    acc = acc_by_uid(trainer.agent_loop_manager)
    options = {k: v for k, v in BAND.items() if k != "success_key"}
    assert len(groups_of(batch.keys)) == 6 and all(expected_mask(acc[u], **options) for u in groups_of(batch.keys))
    assert len(acc) == 6 + metrics["training/filter_groups/evicted_samples"]


# ---- prompt selection -----------------------------------------------------------------------------


def selection_config(tmp_path, **overrides):
    return trainer_config(tmp_path, **{"trainer.v1.trainer_mode": "bandadv_sync", **overrides})


@pytest.mark.parametrize("strategy", ["thompson", "band", "learnability", "greso"])
@pytest.mark.parametrize("model", ["beta", "logistic"])
def test_bandadv_sync_is_verls_sync_trainer_with_the_tracker_sampler(tq, tmp_path, strategy, model):
    trainer = make_trainer(selection_config(tmp_path, **{"data.bandadv": {"strategy": strategy, "model": model}}), tq)
    assert type(trainer) is vs.BandPPOTrainerSync and trainer.trainer_mode == "sync"
    assert type(trainer.replay_buffer) is ReplayBuffer  # verl's sync buffer, as trainer_mode=sync builds
    assert trainer.train_dataloader.sampler is trainer.prompt_sampler
    assert trainer.selection.strategy == strategy and trainer.tracker.model == model
    assert trainer.tracker.num_prompts == 48
    for _ in range(2):
        batch, metrics, _ = run_step(trainer, tq)
        assert len(groups_of(batch.keys)) == 6 and metrics["bandadv/tracker/groups"] == 6
    assert int((trainer.tracker.state["visits"][:48] > 0).sum()) == len(
        {g["index"] for g in trainer.agent_loop_manager.generated}
    )


def test_tracker_is_keyed_by_the_dataset_index_and_updated_each_step(tq, tmp_path):
    trainer = make_trainer(selection_config(tmp_path, **{"algorithm.bandadv": {"success_key": "acc"}}), tq)
    dataset = trainer.train_dataset
    assert type(dataset).__name__ == "RLHFDataset"
    row_of = {info["index"]: row for row, info in enumerate(dataset.dataframe["extra_info"])}
    assert any(row != index - 1000 for index, row in row_of.items())  # index is not the row
    reference = bandadv.PromptTracker(48, model="beta", decay=0.95)
    for _ in range(4):
        step = trainer.global_steps
        _, metrics, _ = run_step(trainer, tq)
        generated = trainer.agent_loop_manager.generated
        rows = torch.tensor([row_of[g["index"]] for g in generated])
        acc = torch.from_numpy(np.concatenate([g["acc"] for g in generated]))
        out = bandadv.group_advantages(acc, 8, success=acc, preset="verl")
        reference.update(rows, out, step)
        assert metrics["bandadv/tracker/groups"] == len(generated) == 6
        generated.clear()
    ids = torch.arange(48)
    for ours, theirs in zip(trainer.tracker.predict(ids), reference.predict(ids), strict=True):
        torch.testing.assert_close(ours, theirs)
    assert 0 < metrics["bandadv/tracker/seen_fraction"] <= 24 / 48


def extreme_share(trainer, tq, steps=16, skip=8) -> float:
    """The share of prompts chosen after `skip` steps whose true pass rate is 0 or 1."""
    chosen = []
    for step in range(steps):
        run_step(trainer, tq)
        if step >= skip:
            chosen += [g["index"] for g in trainer.agent_loop_manager.generated]
        trainer.agent_loop_manager.generated.clear()
    return float(np.mean([true_pass_rate(i) in (0.0, 1.0) for i in chosen]))


def test_selection_moves_toward_learnable_prompts(tq, tmp_path):
    """Thompson selection toward 0.5 chooses fewer prompts with pass rate 0 or 1 than verl's own
    shuffled loader, which draws them at their share (two of PASS_RATES's six levels)."""
    ours = extreme_share(make_trainer(selection_config(tmp_path, size=36, **{"data.bandadv": {"seed": 3}}), tq), tq)
    theirs = extreme_share(make_trainer(trainer_config(tmp_path, size=36, **{"data.shuffle": True}), tq), tq)
    assert ours < 0.2 and abs(theirs - 1 / 3) < 0.1, (ours, theirs)


def test_evicted_groups_also_reach_the_tracker(tq, tmp_path):
    cfg = selection_config(
        tmp_path, **{"algorithm.bandadv": BAND, "algorithm.filter_groups.enable": True,
                     "trainer.v1.sampler.custom_sampler.path": "pkg://bandadv.integrations.verl_sampling",
                     "trainer.v1.sampler.custom_sampler.name": "BandReplayBuffer"}
    )  # fmt: skip
    trainer = make_trainer(cfg, tq)
    assert type(trainer.replay_buffer) is vs.BandReplayBuffer
    _, metrics, _ = run_step(trainer, tq)
    generated = len(trainer.agent_loop_manager.generated)
    assert generated > 6 and metrics["bandadv/tracker/groups"] == generated
    distinct = len({g["index"] for g in trainer.agent_loop_manager.generated})  # a refill may repeat a prompt
    assert int(trainer.tracker.state["visits"][:48].sum()) == distinct


def indices(batch) -> list[int]:
    return [int(getattr(i, "data", i)) for i in batch["index"]]


def test_the_loader_checkpoint_carries_the_sampler_and_tracker(tq, tmp_path):
    cfg = selection_config(tmp_path)
    trainer = make_trainer(cfg, tq)
    for _ in range(2):
        run_step(trainer, tq)
    state = trainer.train_dataloader.state_dict()  # what verl's _save_checkpoint writes to data.pt
    next_batch = trainer._next_train_batch()
    fresh, resumed = make_trainer(cfg, FakeTransferQueue()), make_trainer(cfg, FakeTransferQueue())
    assert indices(fresh._next_train_batch()) != indices(next_batch)  # the tracker's state decides
    resumed.train_dataloader.load_state_dict(state)  # what verl's _load_checkpoint does
    assert indices(resumed._next_train_batch()) == indices(next_batch)
    for name, value in trainer.tracker.state.items():
        torch.testing.assert_close(resumed.tracker.state[name], value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"data.bandadv": {"strategy": "random"}}, r"data\.bandadv\.strategy must be one of"),
        ({"data.bandadv": {"stratgy": "band"}}, r"data\.bandadv\.stratgy: unknown option"),
        ({"data.bandadv": {"band": [0.9, 0.1]}}, r"data\.bandadv\.band must be"),
        ({"data.bandadv": {"model": "features"}}, r"data\.bandadv\.model must be"),
    ],
)
def test_bad_selection_config_fails_when_verl_builds_the_trainer(tq, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(selection_config(tmp_path, **overrides), tq)


def test_duplicate_dataset_index_fails_when_verl_builds_the_loader(tq, tmp_path):
    with pytest.raises(ValueError, match=r"extra_info\.index must be distinct.*index 10"):
        make_trainer(selection_config(tmp_path, duplicate_index=True), tq)


def test_plain_import_verl_registers_the_trainer(tmp_path):
    script = """
import sys
import verl
from verl.trainer.ppo.v1 import get_trainer_cls
assert "bandadv" in sys.modules, "import verl did not load the bandadv plugins"
cls = get_trainer_cls("bandadv_sync")
assert cls.__module__ == "bandadv.integrations.verl_sampling", cls.__module__
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_the_readme_lines_compose_in_verls_hydra_config_and_run(tq, tmp_path):
    """The override lines of the README's verl section, through verl's own Hydra config (struct
    mode, as main_ppo builds it): trainer, buffer and loader as configured, one step run."""
    from hydra import compose, initialize_config_dir

    data = write_prompts(tmp_path / "prompts.parquet", 48)
    readme = [
        "trainer.use_v1=True", "trainer.v1.trainer_mode=bandadv_sync", "+data.bandadv.strategy=thompson",
        "trainer.v1.sampler.custom_sampler.path=pkg://bandadv.integrations.verl_sampling",
        "trainer.v1.sampler.custom_sampler.name=BandReplayBuffer",
        "algorithm.filter_groups.enable=True", "algorithm.filter_groups.max_num_gen_batches=10",
        "+algorithm.bandadv.band=[0.1,0.9]", "+algorithm.bandadv.accidental_max_successes=1",
        "+algorithm.bandadv.success_key=acc",
    ]  # fmt: skip
    ours = [
        f"data.train_files={data}", f"data.val_files={data}", "data.filter_overlong_prompts=False",
        "data.train_batch_size=6", "data.dataloader_num_workers=0", "actor_rollout_ref.rollout.n=8",
        "algorithm.adv_estimator=bandadv_grpo",
    ]  # fmt: skip
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer/config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=readme + ours)
    trainer = make_trainer(cfg, tq)
    assert type(trainer) is vs.BandPPOTrainerSync and type(trainer.replay_buffer) is vs.BandReplayBuffer
    assert trainer.replay_buffer.max_num_gen_batches == 10 and trainer.selection.strategy == "thompson"
    batch, metrics, _ = run_step(trainer, tq)
    groups = groups_of(batch.keys)
    assert len(groups) == 6 and metrics["bandadv/tracker/groups"] >= 6
    # the estimator (algorithm.adv_estimator=bandadv_grpo) counted the raw success of the V1 batch,
    # which verl's _compute_advantage does not carry: read from the trajectories' reward_extra_info
    acc = acc_by_uid(trainer.agent_loop_manager)
    expected = sorted(float(acc[uid].sum()) for uid in groups)
    assert sorted(bv.last_result().stats.successes.tolist()) == expected
