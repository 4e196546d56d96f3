"""The verl adapter, tested through verl 0.9.1's own code: its estimator registry, the trainer's
`ray_trainer.compute_advantage`, the V1 trainer's `compute_advantage_for_multi_trajectories`, and
the `verl.plugins` entry point loaded by a plain `import verl` (CPU; no Ray cluster is started)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

from conftest import REQUIRE_EXTENSION

if REQUIRE_EXTENSION:  # make test / CI: the verl tests must run, never skip
    import verl
else:
    verl = pytest.importorskip("verl")

from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

import bandadv
from bandadv.integrations import verl as bv

SIZES = [16, 16, 1, 5, 16, 2, 7, 16, 3, 16, 1, 9]  # ragged, with lone responses


def make_batch(sizes=SIZES, order="contiguous", seed=0, length=6) -> DataProto:
    """A verl batch: one uuid per prompt repeated over its responses (as DataProto.repeat does),
    an outcome reward on each response's last token (correctness plus a format bonus), ragged
    response masks, and the raw correctness as `acc` in non_tensor_batch (a compute_score dict)."""
    gen = torch.Generator().manual_seed(seed)
    prompt_uids = [str(uuid.UUID(int=int(torch.randint(0, 2**62, (1,), generator=gen)))) for _ in sizes]
    uids = np.array([u for u, n in zip(prompt_uids, sizes, strict=True) for _ in range(n)], dtype=object)
    n = uids.shape[0]
    if order == "shuffled":
        uids = uids[torch.randperm(n, generator=gen).numpy()]
    elif order == "reappearing":  # runs, but a prompt's responses split in two runs
        uids = np.concatenate([uids[: n // 2], uids[n // 2 :][::-1], uids[:3]])
        n = uids.shape[0]
    pass_rate = torch.rand(n, generator=gen)
    acc = (torch.rand(n, generator=gen) < pass_rate).float()
    fmt = (torch.rand(n, generator=gen) < 0.7).float()
    lengths = torch.randint(1, length + 1, (n,), generator=gen)
    response_mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.int64)
    token_level_rewards = torch.zeros(n, length)
    token_level_rewards[torch.arange(n), lengths - 1] = acc + 0.6 * fmt  # shaped: > 0.5 without acc
    return DataProto.from_dict(
        tensors={"token_level_rewards": token_level_rewards, "response_mask": response_mask},
        non_tensors={"uid": uids, "acc": acc.numpy().astype(object)},
    )


def algorithm(estimator: str, norm: bool = True, **bandadv_options) -> OmegaConf:
    cfg = {"adv_estimator": estimator, "norm_adv_by_std_in_grpo": norm, "gamma": 1.0, "lam": 1.0}
    if bandadv_options:
        cfg["bandadv"] = bandadv_options
    return OmegaConf.create(cfg)


def verl_advantages(estimator: str, data: DataProto, norm: bool = True, **bandadv_options) -> torch.Tensor:
    """verl's trainer step: ray_trainer.compute_advantage, called as RayPPOTrainer.fit calls it."""
    config = algorithm(estimator, norm, **bandadv_options)
    out = compute_advantage(
        data, adv_estimator=config.adv_estimator, norm_adv_by_std_in_grpo=config.norm_adv_by_std_in_grpo, config=config
    )
    torch.testing.assert_close(out.batch["advantages"], out.batch["returns"], rtol=0, atol=0)
    return out.batch["advantages"]


@pytest.mark.parametrize("order", ["contiguous", "shuffled", "reappearing"])
@pytest.mark.parametrize("norm", [True, False])
def test_bandadv_grpo_equals_verl_grpo(order, norm):
    ours = verl_advantages("bandadv_grpo", make_batch(order=order), norm)
    theirs = verl_advantages("grpo", make_batch(order=order), norm)
    assert theirs.abs().sum() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["contiguous", "shuffled", "reappearing"])
def test_bandadv_dr_grpo_and_rloo_equal_verl(order):
    torch.testing.assert_close(
        verl_advantages("bandadv_dr_grpo", make_batch(order=order)),
        verl_advantages("grpo", make_batch(order=order), norm=False),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    torch.testing.assert_close(
        verl_advantages("bandadv_rloo", make_batch(order=order)),
        verl_advantages("rloo", make_batch(order=order)),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


@pytest.mark.parametrize("estimator,verl_estimator,norm", [("bandadv_grpo", "grpo", True),
                         ("bandadv_grpo", "grpo", False), ("bandadv_rloo", "rloo", True)])  # fmt: skip
def test_v1_trainer_path_equals_verl(estimator, verl_estimator, norm):
    def v1(name: str) -> torch.Tensor:
        data = make_batch(order="shuffled", seed=3)
        # the V1 trainer's keys: {uid}_{session_id}_{index}, one session per response here
        keys = [f"{uid}_{i}_0" for i, uid in enumerate(data.non_tensor_batch["uid"])]
        config = algorithm(name, norm)
        out = compute_advantage_for_multi_trajectories(
            data, batch_keys=keys, adv_estimator=name, norm_adv_by_std_in_grpo=norm, config=config
        )
        return out.batch["advantages"]

    torch.testing.assert_close(v1(estimator), v1(verl_estimator), rtol=1e-5, atol=1e-5)


def test_registry_holds_the_estimators():
    for name, fn in bv.ESTIMATOR_FUNCTIONS.items():
        assert core_algos.get_adv_estimator_fn(name) is fn


def test_masks_use_the_success_key_not_the_shaped_score():
    data = make_batch(seed=5)
    adv = verl_advantages(
        "bandadv_grpo", data, band=[0.1, 0.9], accidental_max_successes=1, success_key="acc", mask_all_equal=True
    )
    result = bv.last_result()
    uids = data.non_tensor_batch["uid"]
    offsets, _ = bv.uid_groups(uids)
    acc = torch.tensor(data.non_tensor_batch["acc"].astype(np.float32))
    scores = data.batch["token_level_rewards"].sum(-1)
    expected = bandadv.group_advantages(
        scores, offsets=offsets, success=acc, preset="verl", band=(0.1, 0.9), accidental_max_successes=1,
        mask_all_equal=True,
    )  # fmt: skip
    torch.testing.assert_close(result.stats.successes, expected.stats.successes)
    sizes = offsets.diff()
    torch.testing.assert_close(result.stats.successes, torch.segment_reduce(acc, "sum", lengths=sizes))
    assert not torch.equal(result.stats.successes, torch.segment_reduce((scores > 0.5).float(), "sum", lengths=sizes))
    assert 0 < int(result.group_mask.sum()) < result.group_mask.numel()  # some groups masked, some kept
    torch.testing.assert_close(adv, expected.advantages[:, None] * data.batch["response_mask"])
    kept = expected.sample_mask
    assert (adv[~kept] == 0).all() and (adv[kept].abs().sum(-1) > 0).any()
    metrics = bv.last_metrics()
    assert 0 < metrics["bandadv/kept_fraction"] < 1


def test_epsilon_from_config():
    data = make_batch(sizes=[4, 4], seed=7)
    plain = verl_advantages("bandadv_grpo", make_batch(sizes=[4, 4], seed=7))
    wide = verl_advantages("bandadv_grpo", data, epsilon=1.0)
    assert not torch.allclose(plain, wide)
    scores = data.batch["token_level_rewards"].sum(-1)
    expected = bandadv.group_advantages(scores, 4, preset="verl", eps=1.0).advantages
    torch.testing.assert_close(wide, expected[:, None] * data.batch["response_mask"])


@pytest.mark.parametrize(
    "options,message",
    [
        ({"bnad": [0.1, 0.9]}, r"algorithm\.bandadv\.bnad: unknown option"),
        ({"band": [0.2, 1.5]}, r"algorithm\.bandadv\.band must be"),
        ({"band": [0.9, 0.1]}, r"algorithm\.bandadv\.band must be"),
        ({"accidental_max_successes": -1}, r"algorithm\.bandadv\.accidental_max_successes"),
        ({"accidental_action": "drop"}, r"algorithm\.bandadv\.accidental_action"),
        ({"epsilon": -1.0}, r"algorithm\.bandadv\.epsilon"),
        ({"success_key": "correct"}, r"algorithm\.bandadv\.success_key='correct' is not in the batch.*'acc'"),
    ],
)
def test_bad_config_fails_at_the_first_call_naming_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        verl_advantages("bandadv_grpo", make_batch(), **options)


def test_success_key_outside_a_trainer_call_needs_a_batch():
    data = make_batch()
    fn = core_algos.get_adv_estimator_fn("bandadv_grpo")
    args = dict(
        token_level_rewards=data.batch["token_level_rewards"], response_mask=data.batch["response_mask"],
        index=data.non_tensor_batch["uid"], config=algorithm("bandadv_grpo", success_key="acc"),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"algorithm\.bandadv\.success_key='acc': no batch"):
        fn(**args)
    direct, _ = fn(**args, non_tensor_batch=data.non_tensor_batch)
    through_verl = verl_advantages("bandadv_grpo", data, success_key="acc")
    torch.testing.assert_close(direct, through_verl)


def distinct_copies(strings: list[str]) -> np.ndarray:
    """Equal strings as distinct objects (uids rebuilt per response, not repeated by reference)."""
    out = np.array([("x" + s)[1:] for s in strings], dtype=object)
    assert len({id(s) for s in out}) == len(out)
    return out


@pytest.mark.parametrize("make", [lambda s: np.array(s, dtype=object), distinct_copies, np.array, list])
def test_uid_groups_contiguous_runs(make):
    uids = make(["uid-b", "uid-b", "uid-a", "uid-a", "uid-a", "uid-c", "uid-d", "uid-d"])
    offsets, group_index = bv.uid_groups(uids)
    assert group_index is None and offsets.tolist() == [0, 2, 5, 6, 8]


@pytest.mark.parametrize("make", [lambda s: np.array(s, dtype=object), distinct_copies, np.array, list])
def test_uid_groups_reappearing_uid_falls_back_to_first_appearance(make):
    uids = make(["uid-b", "uid-b", "uid-a", "uid-b", "uid-c", "uid-c", "uid-a"])
    offsets, group_index = bv.uid_groups(uids)
    assert offsets is None and group_index.tolist() == [0, 0, 1, 0, 2, 2, 1]


def test_uid_groups_tensors_and_ints():
    assert bv.uid_groups(torch.tensor([7, 7, 3, 3, 3]))[0].tolist() == [0, 2, 5]
    assert bv.uid_groups(torch.tensor([7, 3, 7, 9]))[1].tolist() == [0, 1, 0, 2]
    assert bv.uid_groups(np.array([5, 5, 2]))[0].tolist() == [0, 2, 3]
    assert bv.uid_index(["q", "r", "q"]).tolist() == [0, 1, 0]
    assert bv.uid_index(["q", "q", "r"]).tolist() == [0, 0, 1]


def test_plain_import_verl_registers_through_the_entry_point(tmp_path):
    """A fresh process that never imports bandadv: `import verl` loads the verl.plugins entry
    point, and the estimator found in verl's registry computes verl's grpo numbers."""
    script = """
import sys, numpy as np, torch
import verl
from verl.trainer.ppo import core_algos
assert "bandadv" in sys.modules, "import verl did not load the bandadv plugin"
fn = core_algos.get_adv_estimator_fn("bandadv_grpo")
assert fn.__module__ == "bandadv.integrations.verl", fn.__module__
uids = np.array(["p", "p", "p", "q", "q", "r"], dtype=object)
rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
mask = torch.ones(6, 2)
ours, _ = fn(token_level_rewards=rewards, response_mask=mask, index=uids, config=None)
theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards.clone(), mask, uids)
torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
    # and the registration does come from the entry point: with verl's plugin loading off, it is absent
    env["VERL_USE_EXTERNAL_PLUGINS"] = "none"
    off = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert off.returncode != 0 and "did not load the bandadv plugin" in off.stderr


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float32, torch.bfloat16])
def test_broadcast_over_tokens_is_verls_product_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    advantages = torch.randn(64, generator=gen)
    advantages[:3] = torch.tensor([float("nan"), -0.0, float("inf")])
    mask = (torch.rand(64, 9, generator=gen) < 0.7).to(dtype)
    ours, theirs = bv.broadcast_over_tokens(advantages, mask), advantages.unsqueeze(-1) * mask
    assert ours.dtype == theirs.dtype and torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(theirs))
    assert torch.equal(torch.signbit(ours), torch.signbit(theirs))


def test_adapter_imports_without_verl():
    code = """
import sys, numpy as np, torch
sys.modules["verl"] = None
from bandadv.integrations.verl import compute_grpo_outcome_advantage
adv, _ = compute_grpo_outcome_advantage(torch.tensor([[1.0], [0.0]]), torch.ones(2, 1), np.array(["a", "a"], dtype=object))
assert adv.flatten().tolist()[0] > 0
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_v1_trainer_path_reads_the_success_key():
    data = make_batch(seed=11)
    keys = [f"{uid}_{i}_0" for i, uid in enumerate(data.non_tensor_batch["uid"])]
    config = algorithm("bandadv_grpo", band=[0.1, 0.9], success_key="acc")
    out = compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator="bandadv_grpo", config=config)
    offsets, _ = bv.uid_groups(data.non_tensor_batch["uid"])
    acc = torch.tensor(data.non_tensor_batch["acc"].astype(np.float32))
    torch.testing.assert_close(
        bv.last_result().stats.successes, torch.segment_reduce(acc, "sum", lengths=offsets.diff())
    )
    masked = ~bv.last_result().sample_mask
    assert masked.any() and (out.batch["advantages"][masked] == 0).all()
