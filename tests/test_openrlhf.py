"""The OpenRLHF adapter, tested through OpenRLHF 0.11.2's own code on the CPU: its experience
maker's `make_experience_batch` (rollout split, experience making, advantages and returns) on
Experiences its own `SamplesGenerator` built from rollout responses, its samples generator's
dynamic filtering with refill, its trainer's construction, and its `train_ppo_ray` launcher.

Faked, inside this file only: the vLLM and flash-attn packages (CUDA builds) while OpenRLHF's
modules import, Ray's object store (`ray.put/get/wait`), the models' forward passes behind
OpenRLHF's Ray actor groups, and the vLLM engines (Ray actors answering with fixed responses)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch

import bandadv
from conftest import REQUIRE_EXTENSION


@contextlib.contextmanager
def fake_cuda_only_packages():
    """vLLM and flash-attn as empty stand-ins while OpenRLHF imports (the real ones need CUDA);
    taken out of sys.modules afterwards, so that no other test sees them."""
    added = []

    def fake(name: str, **attrs) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__path__ = []
        module.__dict__.update(attrs)
        sys.modules[name] = module
        added.append(name)
        return module

    if importlib.util.find_spec("vllm") is None:
        fake("vllm", SamplingParams=types.SimpleNamespace, __version__="0.29.0")
        fake("vllm.inputs", TokensPrompt=dict)
        fake("vllm.utils", random_uuid=lambda: "uuid")
    if importlib.util.find_spec("flash_attn") is None:
        fake("flash_attn")
        fake("flash_attn.bert_padding", index_first_axis=None, pad_input=None, rearrange=None, unpad_input=None)
        fake("flash_attn.utils")
        fake("flash_attn.utils.distributed", all_gather=None)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


with fake_cuda_only_packages():
    if REQUIRE_EXTENSION:  # make test / CI: the OpenRLHF tests must run, never skip
        import openrlhf
    else:
        openrlhf = pytest.importorskip("openrlhf")
    import openrlhf.cli
    import openrlhf.trainer.ppo_trainer as ppo_trainer
    import openrlhf.trainer.ppo_trainer_async as ppo_trainer_async
    import openrlhf.trainer.ray.ppo_actor  # what train_ppo_ray imports (the launcher runs it as __main__)
    import openrlhf.trainer.ray.ppo_critic
    import openrlhf.utils
    import ray
    from openrlhf.trainer.ppo_utils.experience import make_experience_batch, split_experience_batch
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
    from openrlhf.utils.config import hierarchize

    from bandadv.integrations import openrlhf as bo

ESTIMATORS = ["group_norm", "rloo", "reinforce_baseline", "dr_grpo"]
N = 4  # responses per prompt
PROMPT_LEN = 3


# ---- OpenRLHF's args, Ray's object store, the models ---------------------------------------------


def make_args(estimator: str = "group_norm", n: int = N, bandadv: dict | None = None, **overrides):
    """OpenRLHF's nested args, built by its own `hierarchize` from train_ppo_ray's flat names."""
    flat = {
        "algo.advantage.estimator": estimator,
        "algo.advantage.gamma": 1.0,
        "algo.advantage.lambd": 1.0,
        "algo.advantage.no_std_norm": False,
        "algo.advantage.is_correction_level": "off",
        "algo.kl.use_loss": False,
        "algo.kl.estimator": "k1",
        "algo.kl.init_coef": 0.05,
        "algo.kl.target": None,
        "algo.dynamic_filtering_enable": False,
        "algo.dynamic_filtering_range": (0.0, 1.0),
        "rollout.n_samples_per_prompt": n,
        "rollout.batch_size": 6,
        "rollout.micro_batch_size": 5,
        "rollout.max_tokens_per_gpu": 40,
        "rollout.vllm_generate_batch_size": None,
        "rollout.max_new_tokens": 8,
        "train.dynamic_batch_enable": False,
        "train.colocate_all": False,
        "train.colocate_actor_ref": False,
        "train.colocate_critic_reward": False,
        "ds.ring_attn_size": 1,
        "ds.tensor_parallel_size": 1,
        "actor.num_nodes": 1,
        "actor.num_gpus_per_node": 2,
        "reward.clip_range": (-10.0, 10.0),
        "reward.overlong_buffer_len": None,
        "reward.overlong_penalty_factor": 1.0,
        "reward.stop_properly_penalty_coef": None,
        "data.max_len": 16,
        "vllm.enable_sleep": False,
        "logger.wandb.key": None,
        "logger.tensorboard_dir": None,
        "ckpt.best_metric_key": "",
    }
    flat.update({k.replace("__", "."): v for k, v in overrides.items()})
    if bandadv is not None:
        flat.update({f"algo.bandadv.{k}": v for k, v in bandadv.items()})
    return hierarchize(argparse.Namespace(**flat))


class Ref:
    """A Ray object ref of the fake object store."""

    def __init__(self, value):
        self.value = value


@pytest.fixture
def fake_ray(monkeypatch):
    monkeypatch.setattr(ray, "put", Ref)
    monkeypatch.setattr(ray, "get", lambda refs: [r.value for r in refs] if isinstance(refs, list) else refs.value)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (refs[:num_returns], refs[num_returns:]))


class ModelGroup:
    """A RayActorGroup whose batched `forward` answers with log-probs made from the tokens."""

    def __init__(self, scale: float):
        self.scale = scale

    def async_run_method_batch(self, method_name, sequences, action_mask, attention_mask, **kwargs):
        assert method_name == "forward"
        out = [-self.scale * (1 + (s[:, 1:] % 5).float()) for s in sequences]
        return [Ref([lp[:, -a.shape[1] :] for lp, a in zip(out, action_mask, strict=True)])]

    def async_run_method(self, method_name, **kwargs):
        return [Ref(None)]


def response(prompt: str, score: float, reward: float, length: int, token: int) -> dict:
    """What OpenRLHF's vLLM engine returns for one sampled response."""
    return {
        "prompt": prompt,
        "label": "",
        "observation_tokens": [7] * PROMPT_LEN + [token + t for t in range(length)],
        "action_ranges": [(PROMPT_LEN, PROMPT_LEN + length)],
        "reward": reward,
        "scores": score,
        "rollout_log_probs": None,
        "truncated": length >= 8,
        "extra_logs": {},
    }


def prompt_responses(prompt: str, scores: list[float], seed: int = 0) -> list[dict]:
    """One prompt's responses: the raw scores, a shaped reward (score + a format bonus), ragged lengths."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, score in enumerate(scores):
        bonus = 0.25 * float(torch.randint(0, 3, (1,), generator=gen))
        out.append(response(prompt, score, score + bonus, int(torch.randint(1, 9, (1,), generator=gen)), 11 * i))
    return out


def generator(args, engines=(), prompts=None) -> SamplesGenerator:
    cls = bo.BandadvSamplesGenerator
    return cls(types.SimpleNamespace(args=args), prompts, None, types.SimpleNamespace(pad_token_id=0), list(engines))


def rollout(score_table: list[list[float]], args=None, seed: int = 0) -> list:
    """Rollout samples built by OpenRLHF's own SamplesGenerator from engine responses."""
    gen = SamplesGenerator(types.SimpleNamespace(args=args or make_args()), None, None, None, [])
    samples = []
    for p, scores in enumerate(score_table):
        for r in prompt_responses(f"prompt {p}", scores, seed + p):
            samples.append(gen._process_response_into_experience(r, max_len=16))
    return samples


def maker(cls, args):
    strategy = types.SimpleNamespace(args=args)
    return cls(ModelGroup(0.1), None, None, ModelGroup(0.12), FixedKLController(args.algo.kl.init_coef), strategy,
               types.SimpleNamespace(pad_token_id=0))  # fmt: skip


def make_experiences(cls, args, samples):
    """OpenRLHF's step: RemoteExperienceMaker.make_experience_batch, as train_step calls it."""
    return maker(cls, args).make_experience_batch(copy.deepcopy(samples))


SCORES = [
    [1, 0, 0, 1],
    [1, 1, 1, 1],  # all correct
    [0, 1, 0, 0],  # one success: accidental
    [0, 0, 0, 0],  # all wrong
    [1, 1, 0, 1],
    [0.5, 0.25, 1, 0],  # partial credit
]


# ---- equal to OpenRLHF's own computation with the masks off -------------------------------------


def assert_experiences_equal(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.index == b.index and a.kl is None and b.kl is None
        torch.testing.assert_close(a.advantages, b.advantages, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.returns, b.returns, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.rewards, b.rewards, rtol=0, atol=0)
        for key, value in b.info.items():
            torch.testing.assert_close(a.info[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize(
    "setting",
    [
        {},
        {"algo__kl__init_coef": 0.0},
        {"reward__clip_range": (-0.4, 0.6)},
        {"reward__overlong_buffer_len": 3.0, "reward__stop_properly_penalty_coef": 0.5},
        {"algo__advantage__no_std_norm": True},
        {"train__dynamic_batch_enable": True},  # micro-batches by length: samples out of rollout order
        {"algo__advantage__gamma": 0.9},  # OpenRLHF sets it to 1 for these estimators
    ],
    ids=["kl", "no-kl", "clip", "length-penalties", "no-std-norm", "dynamic-batch", "gamma"],
)
def test_masks_off_equal_openrlhfs_own_computation(fake_ray, estimator, setting):
    args, their_args = make_args(estimator, **setting), make_args(estimator, **setting)
    samples = rollout(SCORES, args)
    theirs = make_experiences(RemoteExperienceMaker, their_args, samples)
    ours = make_experiences(bo.BandadvExperienceMaker, args, samples)
    assert_experiences_equal(ours, theirs)
    assert vars(args.algo.advantage) == vars(their_args.algo.advantage)  # OpenRLHF resets gamma to 1
    assert torch.cat([e.advantages.abs().sum(-1) for e in ours]).gt(0).any()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_masks_off_equal_openrlhf_on_random_rollouts(fake_ray, estimator):
    gen = torch.Generator().manual_seed(5)
    for trial in range(3):
        n = int(torch.randint(2, 7, (1,), generator=gen))
        prompts = int(torch.randint(1, 6, (1,), generator=gen))
        table = (torch.rand(prompts, n, generator=gen) < torch.rand(prompts, 1, generator=gen)).float().tolist()
        micro = int(torch.randint(1, 8, (1,), generator=gen))
        samples = rollout(table, seed=trial)
        theirs = make_experiences(
            RemoteExperienceMaker, make_args(estimator, n, rollout__micro_batch_size=micro), samples
        )
        ours = make_experiences(
            bo.BandadvExperienceMaker, make_args(estimator, n, rollout__micro_batch_size=micro), samples
        )
        assert_experiences_equal(ours, theirs)


def test_group_shaping_comes_from_bandadv(fake_ray, monkeypatch):
    """The adapter calls the op (preset openrlhf), and its advantages are what reach the returns."""
    calls = []
    real = bo.group_advantages

    def spy(*args, **kwargs):
        calls.append(kwargs["config"])
        out = real(*args, **kwargs)
        out.advantages.mul_(2.0)
        return out

    monkeypatch.setattr(bo, "group_advantages", spy)
    args = make_args("rloo", algo__kl__init_coef=0.0)
    samples = rollout(SCORES, args)
    ours = make_experiences(bo.BandadvExperienceMaker, args, samples)
    theirs = make_experiences(RemoteExperienceMaker, make_args("rloo", algo__kl__init_coef=0.0), samples)
    assert [c.estimator for c in calls] == ["rloo"] and calls[0].eps == 1e-9
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.advantages, 2 * b.advantages, rtol=1e-5, atol=1e-5)


# ---- bandadv's masks -------------------------------------------------------------------------------


def first_token_advantage(experiences) -> torch.Tensor:
    """Each response's advantage at its first action token, in rollout order (kl off: the
    shaped reward itself)."""
    values, order = [], []
    for e in experiences:
        first = e.action_mask.long().argmax(dim=1)
        values.append(e.advantages[torch.arange(len(first)), first])
        order.extend(e.index)
    out = torch.empty(len(order))
    out[torch.tensor(order)] = torch.cat(values)
    return out


def test_identical_rewards_get_zero_where_openrlhfs_float32_mean_leaves_noise(fake_ray):
    """What differs, on purpose: eight responses all rewarded 0.7 (a shaped score). OpenRLHF's
    float32 mean misses 0.7 by an ulp, and dividing by std + 1e-9 blows that up to about ±0.92
    per response; bandadv's statistics see identical rewards: advantage 0."""
    samples = rollout([[1] * 8, [1, 0] * 4], make_args(n=8))
    for s in samples[:8]:
        s.rewards = torch.tensor([0.7])
    args = dict(n=8, algo__kl__init_coef=0.0)
    ours = first_token_advantage(make_experiences(bo.BandadvExperienceMaker, make_args(**args), samples))
    theirs = first_token_advantage(make_experiences(RemoteExperienceMaker, make_args(**args), samples))
    assert ours[:8].eq(0).all() and theirs[:8].abs().min() > 0.5
    torch.testing.assert_close(ours[8:], theirs[8:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["group_norm", "rloo", "dr_grpo"])
def test_band_and_accidental_rule_zero_masked_groups(fake_ray, estimator):
    options = {"band": [0.1, 0.9], "accidental_max_successes": 1}
    samples = rollout(SCORES)
    ours = make_experiences(bo.BandadvExperienceMaker, make_args(estimator, bandadv=options, algo__kl__init_coef=0.0),
                            samples)  # fmt: skip
    theirs = make_experiences(RemoteExperienceMaker, make_args(estimator, algo__kl__init_coef=0.0), samples)
    ours_adv, theirs_adv = first_token_advantage(ours).view(-1, N), first_token_advantage(theirs).view(-1, N)
    pass_rate = torch.tensor(SCORES).mean(-1)
    successes = torch.tensor(SCORES).sum(-1)
    kept = (pass_rate > 0.1) & (pass_rate < 0.9) & ~((successes >= 1) & (successes <= 1))
    assert kept.tolist() == [True, False, False, False, True, True]
    torch.testing.assert_close(ours_adv[kept], theirs_adv[kept], rtol=1e-5, atol=1e-5)
    assert ours_adv[~kept].eq(0).all() and theirs_adv[~kept].ne(0).any()


def test_pass_rates_count_scores_not_shaped_rewards(fake_ray):
    """The band reads `scores` (raw correctness); rewards carry a format bonus > 0.5 even when wrong."""
    samples = rollout([[0, 0, 0, 1], [0, 0, 0, 1]])
    for s in samples:
        s.rewards += 0.6
    args = make_args("group_norm", bandadv={"band": [0.2, 1.0]})
    maker_ = maker(bo.BandadvExperienceMaker, args)
    maker_.make_experience_batch(copy.deepcopy(samples))
    assert maker_.bandadv_result.stats.pass_rate.tolist() == [0.25, 0.25]
    assert maker_.bandadv_result.group_mask.tolist() == [True, True]


def test_metrics_reach_openrlhfs_experience_info(fake_ray):
    """bandadv/<key> per sample in `info`: OpenRLHF's actor logs their sample means, which are
    GroupAdvantages.metrics()'s fractions; they survive the replay buffer's split and batch."""
    options = {"band": [0.1, 0.9], "mask_all_equal": True, "accidental_max_successes": 1, "min_std": 0.3}
    maker_ = maker(bo.BandadvExperienceMaker, make_args("group_norm", bandadv=options))
    experiences = maker_.make_experience_batch(rollout([*SCORES, [1, 1, 1, 1]]))
    expected = maker_.bandadv_result.metrics()
    # all correct, all wrong, accidental, std <= 0.3 (the three all-equal groups), kept
    assert [expected[f"{name}_fraction"] for name in ("all_correct", "all_wrong", "accidental", "low_std", "kept")] == (
        pytest.approx([2 / 7, 1 / 7, 1 / 7, 3 / 7, 3 / 7])
    )
    for name in (*bo.FLAG_METRICS, "mean_pass_rate"):
        logged = torch.cat([e.info[f"bandadv/{name}"] for e in experiences]).mean()
        assert logged.item() == pytest.approx(expected[name], abs=1e-6), name
    items = [item for e in experiences for item in split_experience_batch(e)]  # the replay buffer
    batch = make_experience_batch(items)
    logged = torch.tensor(batch.info["bandadv/kept_fraction"], dtype=torch.float)  # as the actor's training_step
    assert logged.shape == (len(items),) and logged.mean().item() == pytest.approx(expected["kept_fraction"])


# ---- dynamic filtering --------------------------------------------------------------------------


class Engine:
    """A vLLM engine actor: fixed responses per prompt, through `.remote` calls."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.generate_responses = types.SimpleNamespace(remote=self._generate)
        self.get_num_unfinished_requests = types.SimpleNamespace(remote=lambda: Ref(0))

    def _generate(self, prompt, label, sampling_params, max_length, hf_tokenizer, num_samples, images):
        assert num_samples == len(self.table[prompt])
        return Ref(prompt_responses(prompt, self.table[prompt], seed=int(prompt.split()[-1])))


TABLE = {f"prompt {i}": scores for i, scores in enumerate(SCORES + SCORES[::-1] + [[0, 1, 1, 0], [1, 1, 1, 0]])}


def loader(prompts):
    """OpenRLHF's prompt data loader (batch size 1): (datasource, prompts, labels, images)."""
    return iter([(["d"], [p], [""], [None]) for p in prompts])


def generate(cls, args, num_prompts=4):
    gen = cls(types.SimpleNamespace(args=args), None, None, types.SimpleNamespace(pad_token_id=0), [Engine(TABLE)])
    return gen._generate_vllm(loader(list(TABLE)), num_prompts, args.algo.dynamic_filtering_enable, max_len=16)


@pytest.mark.parametrize("filter_range", [(0.0, 1.0), (0.2, 0.8), (0.3, 1.0)])
def test_filtering_by_default_is_openrlhfs_mean_score_range(fake_ray, filter_range):
    """Without bandadv's own options the filter is OpenRLHF's: same prompts kept, same refills."""
    args = make_args(algo__dynamic_filtering_enable=True, algo__dynamic_filtering_range=filter_range)
    ours, ours_consumed, ours_exhausted = generate(bo.BandadvSamplesGenerator, args)
    theirs, consumed, exhausted = generate(SamplesGenerator, args)
    assert [e.prompts for e in ours] == [e.prompts for e in theirs]
    assert (ours_consumed, ours_exhausted) == (consumed, exhausted)
    assert [float(e.scores) for e in ours] == [float(e.scores) for e in theirs]
    assert consumed > 4  # some prompts were dropped and replaced


def test_filtering_by_bandadvs_masks_refills_with_new_prompts(fake_ray):
    args = make_args(algo__dynamic_filtering_enable=True, bandadv={"accidental_max_successes": 1})
    accepted, consumed, exhausted = generate(bo.BandadvSamplesGenerator, args, num_prompts=6)
    kept = [e.prompts[0] for e in accepted[::N]]
    assert len(kept) == 6 and not exhausted
    for prompt in kept:
        successes = sum(TABLE[prompt])
        assert 0 < successes < N and successes != 1  # open band (0, 1) and the accidental rule
    dropped = [p for p in list(TABLE)[:consumed] if p not in kept]
    assert dropped == ["prompt 1", "prompt 2", "prompt 3", "prompt 8", "prompt 9", "prompt 10"]  # refills dropped too
    assert consumed == 12
    assert accepted[0].info["bandadv/filter_kept_fraction"].item() == pytest.approx(6 / 12)
    assert accepted[0].info["bandadv/filter_accidental_fraction"].item() == pytest.approx(2 / 12)
    assert accepted[-1].info["bandadv/filter_all_correct_fraction"].item() == pytest.approx(2 / 12)


def test_generate_samples_reports_openrlhfs_pass_rate(fake_ray):
    """OpenRLHF's public generate_samples on top: the batch, its filter pass rate, the info keys."""
    args = make_args(algo__dynamic_filtering_enable=True, rollout__batch_size=3, bandadv={"band": [0.3, 0.8]})
    gen = bo.BandadvSamplesGenerator(types.SimpleNamespace(args=args), [b for b in loader(list(TABLE))], None,
                                     types.SimpleNamespace(pad_token_id=0), [Engine(TABLE)])  # fmt: skip
    samples, pass_rate, consumed, exhausted = gen.generate_samples(max_len=16)
    assert len(samples) == 3 * N and not exhausted
    assert pass_rate == pytest.approx(len(samples) / consumed * 100)
    assert all("bandadv/filter_below_band_fraction" in s.info for s in samples)
    assert all(0.3 < float(torch.cat([t.scores for t in samples[i : i + N]]).float().mean()) < 0.8
               for i in range(0, len(samples), N))  # fmt: skip


def test_filtering_needs_scores(fake_ray):
    args = make_args(algo__dynamic_filtering_enable=True)
    gen = generator(args)
    group = [gen._process_response_into_experience({**r, "scores": None}, max_len=16)
             for r in prompt_responses("prompt 0", [1, 0, 1, 0])]  # fmt: skip
    with pytest.raises(ValueError, match="scores"):
        bo._group_flags(group, bo.read_options(args).config())


def test_no_filtering_leaves_openrlhfs_generation_alone(fake_ray):
    args = make_args(algo__dynamic_filtering_enable=False)
    ours = generate(bo.BandadvSamplesGenerator, args)
    theirs = generate(SamplesGenerator, args)
    assert [e.prompts for e in ours[0]] == [e.prompts for e in theirs[0]] and ours[1:] == theirs[1:]


# ---- bad options fail at the first step, naming the option ---------------------------------------


@pytest.mark.parametrize(
    ("options", "overrides", "message"),
    [
        ({"bnd": [0.1, 0.9]}, {}, r"--algo\.bandadv\.bnd: unknown option"),
        ({"band": [0.1, 1.5]}, {}, r"--algo\.bandadv\.band must be LO HI"),
        ({"band": [0.8, 0.2]}, {}, r"--algo\.bandadv\.band must be LO HI"),
        ({"band": [0.5]}, {}, r"--algo\.bandadv\.band must be LO HI"),
        ({"accidental_max_successes": -1}, {}, r"--algo\.bandadv\.accidental_max_successes=-1"),
        ({"accidental_action": "drop"}, {}, r"--algo\.bandadv\.accidental_action='drop'"),
        ({"min_std": -0.1}, {}, r"--algo\.bandadv\.min_std=-0\.1"),
        ({"mask_all_equal": "yes"}, {}, r"--algo\.bandadv\.mask_all_equal is a flag"),
        ({}, {"algo__dynamic_filtering_enable": True, "algo__dynamic_filtering_range": (-1.0, 2.0)},
         r"--algo\.dynamic_filtering_range must be LO HI"),
        ({}, {"algo__advantage__estimator": "gae"}, r"--algo\.advantage\.estimator='gae'"),
        ({}, {"rollout__n_samples_per_prompt": 1}, r"--rollout\.n_samples_per_prompt=1"),
    ],
)  # fmt: skip
def test_bad_options_fail_before_the_first_rollout(fake_ray, options, overrides, message):
    """When OpenRLHF's trainer builds the experience maker and the samples generator."""
    args = make_args(bandadv=options, **overrides)
    with pytest.raises(ValueError, match=message):
        maker(bo.BandadvExperienceMaker, args)
    if "estimator" in message or "n_samples" in message:
        return
    filtering = make_args(bandadv=options, **{**overrides, "algo__dynamic_filtering_enable": True})
    with pytest.raises(ValueError, match=message):
        generator(filtering)


def test_options_changed_after_construction_fail_at_the_step(fake_ray):
    args = make_args()
    maker_ = maker(bo.BandadvExperienceMaker, args)
    args.algo.bandadv = types.SimpleNamespace(band=[0.2, 0.1])
    with pytest.raises(ValueError, match=r"--algo\.bandadv\.band must be LO HI"):
        maker_.make_experience_batch(rollout(SCORES[:2]))


def test_responses_not_in_whole_groups_are_refused(fake_ray):
    samples = rollout(SCORES[:2])[:-1]
    with pytest.raises(ValueError, match=r"not whole groups of --rollout\.n_samples_per_prompt=4"):
        make_experiences(bo.BandadvExperienceMaker, make_args(), samples)


# ---- installing it in OpenRLHF's trainer ------------------------------------------------------------


@pytest.fixture
def restore_openrlhf(monkeypatch):
    """The setup hook replaces module attributes of OpenRLHF's trainers: put them back afterwards."""
    for module in (ppo_trainer, ppo_trainer_async):
        for name in ("RemoteExperienceMaker", "SamplesGenerator"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name))


def test_install_makes_openrlhfs_trainer_build_bandadvs_classes(restore_openrlhf):
    hook_module, hook_name = bo.SETUP_HOOK.rsplit(".", 1)
    getattr(importlib.import_module(hook_module), hook_name)()  # as Ray's worker_process_setup_hook does
    args = make_args()
    trainer = ppo_trainer.BasePPOTrainer(types.SimpleNamespace(args=args), ModelGroup(0.1), None, None, None, None,
                                         types.SimpleNamespace(pad_token_id=0))  # fmt: skip
    assert type(trainer.experience_maker) is bo.BandadvExperienceMaker
    assert ppo_trainer.SamplesGenerator is bo.BandadvSamplesGenerator
    assert ppo_trainer_async.SamplesGenerator is bo.BandadvSamplesGenerator


FAKE_PACKAGES = {  # files of the vLLM and flash-attn stand-ins, for Ray's worker processes
    "vllm/__init__.py": "from types import SimpleNamespace as SamplingParams\n__version__ = '0.29.0'\n",
    "vllm/inputs.py": "TokensPrompt = dict\n",
    "vllm/utils.py": "def random_uuid():\n    return 'uuid'\n",
    "flash_attn/__init__.py": "",
    "flash_attn/bert_padding.py": "index_first_axis = pad_input = rearrange = unpad_input = None\n",
    "flash_attn/utils/__init__.py": "",
    "flash_attn/utils/distributed.py": "all_gather = None\n",
}


def python_path_with_fakes(folder) -> str:
    """A PYTHONPATH for a child process: the stand-ins written to `folder` (where the real
    packages are missing), then this process's path."""
    for name, text in FAKE_PACKAGES.items():
        if importlib.util.find_spec(name.split("/")[0]) is None:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
    return os.pathsep.join(p for p in (str(folder), *sys.path) if p)


@pytest.mark.slow
def test_rays_setup_hook_installs_it_in_openrlhfs_trainer_actor(tmp_path):
    """A real local Ray: an actor of OpenRLHF's own trainer class, started with the launcher's
    runtime env, builds bandadv's experience maker (about 20 s on the 2-core CI machine)."""
    path = python_path_with_fakes(tmp_path)
    ray.init(
        num_cpus=1, include_dashboard=False, object_store_memory=100 * 2**20,
        runtime_env={"worker_process_setup_hook": bo.SETUP_HOOK, "env_vars": {"PYTHONPATH": path}},
    )  # fmt: skip
    try:
        imported = ray.get(ray.remote(lambda: [m in sys.modules for m in ("deepspeed", "openrlhf")]).remote())
        trainer = ray.remote(ppo_trainer.BasePPOTrainer).remote(
            types.SimpleNamespace(args=make_args()), None, None, None, None, None, None
        )
        built = ray.get(trainer.__ray_call__.remote(lambda self: type(self.experience_maker).__qualname__))
        generators = ray.get(trainer.__ray_call__.remote(
            lambda self: [m.SamplesGenerator.__qualname__ for m in (ppo_trainer, ppo_trainer_async)]
        ))  # fmt: skip
    finally:
        ray.shutdown()
    assert imported == [False, False]  # a worker that never imports OpenRLHF's trainers (a vLLM engine's)
    assert built == "BandadvExperienceMaker"
    assert generators == ["BandadvSamplesGenerator", "BandadvSamplesGenerator"]
    assert ppo_trainer.RemoteExperienceMaker is RemoteExperienceMaker  # this process: untouched


class Started(Exception):
    """Raised by the fake get_strategy: train_ppo_ray got as far as configuring its strategy."""


@pytest.fixture
def launcher(monkeypatch, restore_openrlhf):
    seen = {}

    def get_strategy(args):
        seen["args"] = args
        raise Started

    def init(*args, runtime_env=None, **kwargs):
        seen["runtime_env"] = runtime_env

    seen["init"] = init

    monkeypatch.setattr(openrlhf.utils, "get_strategy", get_strategy)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    return seen


OPENRLHF_ARGS = [
    "--actor.model_name_or_path", "tiny", "--reward.remote_url", "http://rm", "--actor.num_gpus_per_node", "1",
    "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "4",
    "--algo.dynamic_filtering_enable",
]  # fmt: skip


def test_launcher_runs_openrlhfs_train_ppo_ray_with_bandadvs_options(launcher):
    bandadv_args = ["--algo.bandadv.band", "0.1", "0.9", "--algo.bandadv.accidental_max_successes", "1"]
    with pytest.raises(Started):
        bo.main([*OPENRLHF_ARGS[:6], *bandadv_args, *OPENRLHF_ARGS[6:]])
    args = launcher["args"]
    assert args.algo.bandadv.band == [0.1, 0.9] and args.algo.bandadv.accidental_max_successes == 1
    assert (
        args.algo.advantage.estimator == "group_norm" and args.critic.model_name_or_path is None
    )  # OpenRLHF's checks ran
    env = launcher["runtime_env"]
    assert env["worker_process_setup_hook"] == "bandadv.integrations.openrlhf_hook.install"
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"]  # OpenRLHF's own runtime env, kept
    config = bo.read_options(args).config(args.algo.advantage.estimator)
    assert config.band == (0.1, 0.9) and not config.band_inclusive and config.accidental_max_successes == 1
    assert ray.init is launcher["init"] and openrlhf.utils.config.hierarchize is hierarchize  # put back


def test_launcher_refuses_a_bad_option_before_ray_starts(launcher):
    with pytest.raises(ValueError, match=r"--algo\.bandadv\.band must be LO HI"):
        bo.main([*OPENRLHF_ARGS, "--algo.bandadv.band", "0.9", "0.1"])
    assert "runtime_env" not in launcher
    with pytest.raises(ValueError, match=r"--algo\.advantage\.estimator='gae'"):
        bo.main([*OPENRLHF_ARGS, "--algo.advantage.estimator", "gae"])
    with pytest.raises(SystemExit):  # argparse: a value that is not a number
        bo.main([*OPENRLHF_ARGS, "--algo.bandadv.min_std", "low"])


def test_python_dash_m_runs_openrlhfs_launcher(tmp_path):
    """`python -m bandadv.integrations.openrlhf --help`, in a fresh process: bandadv's options,
    then OpenRLHF's own parser's help (train_ppo_ray ran as __main__)."""
    env = {**os.environ, "PYTHONPATH": python_path_with_fakes(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "bandadv.integrations.openrlhf", "--help"], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.index("--algo.bandadv.band LO HI") < out.stdout.index("--algo.advantage.estimator")


@pytest.mark.parametrize("first", ["openrlhf.trainer.ppo_trainer", "openrlhf.trainer.ppo_trainer_async"])
def test_setup_hook_imports_nothing_and_patches_the_trainers_when_imported(tmp_path, first):
    """In a fresh process, as in a Ray worker: the hook imports neither OpenRLHF nor DeepSpeed;
    importing either trainer module first then gives both modules bandadv's classes."""
    script = f"""
import importlib, sys
from bandadv.integrations import openrlhf_hook
openrlhf_hook.install()
assert not any(m in sys.modules for m in ("openrlhf", "deepspeed")), "hook imported too much"
importlib.import_module({first!r})
import openrlhf.trainer.ppo_trainer as t, openrlhf.trainer.ppo_trainer_async as a
print(t.RemoteExperienceMaker.__qualname__, t.SamplesGenerator.__qualname__, a.SamplesGenerator.__qualname__)
"""
    env = {**os.environ, "PYTHONPATH": python_path_with_fakes(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["BandadvExperienceMaker", "BandadvSamplesGenerator", "BandadvSamplesGenerator"]


def test_split_arguments():
    values, rest = bo.split_arguments(["--x", "1", "--algo.bandadv.band_inclusive", "--algo.bandadv.min_std", "0.1"])
    assert rest == ["--x", "1"]
    assert values["band_inclusive"] is True and values["min_std"] == 0.1 and values["band"] is None


def test_openrlhf_preset_is_what_the_adapter_uses():
    config = bo.read_options(make_args("group_norm")).config("group_norm")
    assert config == bandadv.AdvantageConfig.from_preset("openrlhf", band_inclusive=False)
