"""The op through the dispatcher: opcheck, fake tensors, torch.compile, determinism."""

from __future__ import annotations

import pytest
import torch

import bandadv
from bandadv import AdvantageConfig
from conftest import make_offsets, random_rewards

op = torch.ops.bandadv.group_advantages.default


def _op_args(
    rewards, *, group_size=0, offsets=None, success=None, valid=None, prior=None, config=None, return_index=False
):
    cfg = config or AdvantageConfig()
    return (rewards, group_size, offsets, success, valid, prior), {**cfg.op_kwargs(), "return_index": return_index}


def _opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    rewards = random_rewards(48, "ternary", gen)
    sizes = [5, 0, 1, 12, 30]
    yield _op_args(rewards, group_size=8)
    yield _op_args(rewards.double(), group_size=6, return_index=True)
    yield _op_args(rewards.half(), offsets=make_offsets(sizes), valid=torch.rand(48, generator=gen) > 0.2)
    yield _op_args(
        rewards, offsets=make_offsets(sizes), success=torch.rand(48, generator=gen) < 0.5,
        prior=torch.rand(5, generator=gen), return_index=True,
        config=AdvantageConfig(band=(0.1, 0.9), accidental_max_successes=1, min_std=0.01),
    )  # fmt: skip
    yield _op_args(rewards, group_size=4, config=AdvantageConfig(scale="batch"))
    yield _op_args(rewards[:0], group_size=4)


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    args, kwargs = case
    torch.library.opcheck(op, args, kwargs)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        rewards = torch.empty(96, dtype=torch.bfloat16)
        outs = op(*_op_args(rewards, group_size=16, return_index=True)[0], **_op_args(rewards, return_index=True)[1])
    shapes = [tuple(t.shape) for t in outs]
    assert shapes == [(96,), (96,), (6,), (6,), (6,), (6,), (6,), (6,), (6,), (6,), (6,), (), (96,)]
    assert outs[0].dtype == torch.float32 and outs[2].dtype == torch.int32 and outs[12].dtype == torch.int64


def test_torch_compile_fullgraph():
    def loss(rewards, logratio):
        out = bandadv.group_advantages(rewards, 16, band=(0.1, 0.9), accidental_max_successes=1)
        return -(out.advantages[:, None] * logratio * out.sample_mask[:, None]).sum()

    gen = torch.Generator().manual_seed(1)
    rewards = random_rewards(16 * 32, "binary", gen)
    logratio = torch.randn(16 * 32, 5, generator=gen)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(rewards, logratio), loss(rewards, logratio))


def test_torch_compile_with_offsets_and_index():
    def kept(rewards, offsets):
        out = bandadv.group_advantages(rewards, offsets=offsets, return_index=True)
        return out.kept_index, out.num_kept, out.stats.pass_rate

    gen = torch.Generator().manual_seed(2)
    sizes = [3, 7, 1, 16, 9]
    rewards = random_rewards(sum(sizes), "binary", gen)
    torch._dynamo.reset()
    compiled = torch.compile(kept, fullgraph=True, backend="eager")
    for a, b in zip(compiled(rewards, make_offsets(sizes)), kept(rewards, make_offsets(sizes)), strict=True):
        torch.testing.assert_close(a, b)


def test_deterministic_across_runs_and_thread_counts(backend):
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 3000, (40,), generator=gen).tolist()
    rewards = random_rewards(sum(sizes), "continuous", gen)
    config = AdvantageConfig(scale="batch", band=(0.1, 0.9))

    def run():
        out = bandadv.group_advantages(
            rewards, offsets=make_offsets(sizes), config=config, backend=backend, return_index=True
        )
        return [out.advantages, out.stats.mean, out.stats.std, out.kept_index]

    threads = torch.get_num_threads()
    try:
        first = run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    again = run()
    for a, b, c in zip(first, single, again, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
