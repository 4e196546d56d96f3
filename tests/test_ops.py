"""The op through the dispatcher: opcheck, fake tensors, torch.compile, determinism."""

from __future__ import annotations

import os

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
    assert shapes == [(96,), (96,), (6,), (6,), (6,), (6, 6), (), (96,)]
    dtypes = [t.dtype for t in outs]
    assert (
        dtypes == [torch.float32, torch.bool, torch.int32, torch.bool, torch.int32, torch.float32] + [torch.int64] * 2
    )


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


def test_interface_is_checked_against_the_config():
    # The options' order in the schema is AdvantageConfig's field order: two bool options with the
    # same default swapped in either place fail at import (check_interface), not silently.
    schema = bandadv.ops.GROUP_ADVANTAGES_SCHEMA
    names, defaults = bandadv.config.OPTION_NAMES, bandadv.config.OP_DEFAULTS
    assert bandadv.ops.check_interface(schema, names, defaults) == bandadv.ops.ARG_NAMES
    swapped_schema = schema.replace("bool band_inclusive", "bool TMP").replace(
        "bool mask_too_few", "bool band_inclusive"
    )
    swapped_schema = swapped_schema.replace("bool TMP", "bool mask_too_few")
    i, j = names.index("band_inclusive"), names.index("mask_too_few")
    swapped_names = list(names)
    swapped_names[i], swapped_names[j] = names[j], names[i]
    for args in ((swapped_schema, names, defaults), (schema, tuple(swapped_names), defaults)):
        with pytest.raises(RuntimeError, match="band_inclusive"):
            bandadv.ops.check_interface(*args)


@pytest.mark.parametrize(
    "old, new",
    [
        ("float eps=1e-06", "float eps=1e-05"),  # another default
        ("bool mask_too_few=True", "bool mask_too_few=False"),
        ("float accidental_clip=1.0", "int accidental_clip=1"),  # another type of default
        ("Tensor? prior=None, *, str estimator=", "Tensor? prior=None, str estimator="),  # options positional
    ],
)
def test_schema_defaults_are_the_configs(old, new):
    # A call passes only the options that differ from the schema's defaults (AdvantageConfig.op_changes),
    # so a schema default that is not AdvantageConfig's would silently change every call leaving it out.
    schema = bandadv.ops.GROUP_ADVANTAGES_SCHEMA
    assert old in schema
    with pytest.raises(RuntimeError, match="keyword-only with default"):
        bandadv.ops.check_interface(schema.replace(old, new), bandadv.config.OPTION_NAMES, bandadv.config.OP_DEFAULTS)


def test_op_defaults_are_the_default_config():
    # Called with no options, and with only a config's changes, the op computes what the full
    # argument list computes.
    op = torch.ops.bandadv.group_advantages.default
    rewards = torch.rand(64)
    for config in (AdvantageConfig(), AdvantageConfig(estimator="rloo", band=(0.2, 0.8), mask_too_few=False)):
        full = op(rewards, 8, **config.op_kwargs(), return_index=True)
        short = op(rewards, 8, **config.op_changes(), return_index=True)
        # torch calls a Python kernel (the reference fallback, the fake) without the defaulted
        # arguments: bind() fills them in.
        reference = bandadv.ops._reference_op(rewards, 8, **config.op_changes(), return_index=True)
        for a, b, c in zip(full, short, reference, strict=True):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert AdvantageConfig().op_changes() == {}


def test_config_op_kwargs_follow_the_schema():
    config = AdvantageConfig(band=(0.2, 0.7), band_inclusive=False, mask_too_few=False, min_std=0.1)
    bound = bandadv.ops.bind((None,) * len(bandadv.ops.INPUT_NAMES), {**config.op_kwargs(), "return_index": True})
    assert bound["band"] == [0.2, 0.7] and bound["band_inclusive"] is False and bound["mask_too_few"] is False
    assert bound["min_std"] == 0.1 and bound["return_index"] is True
    assert list(config.op_kwargs()) == list(bandadv.config.OPTION_NAMES)
    assert {name: bound[name] for name in bandadv.config.OPTION_NAMES if name != "band"} == {
        name: getattr(config, name) for name in bandadv.config.OPTION_NAMES if name != "band"
    }
    assert config.op_changes() == {"band": [0.2, 0.7], "band_inclusive": False, "min_std": 0.1, "mask_too_few": False}


def test_triton_signature_is_the_schema():
    # The Triton op's schema is inferred from a signature built from GROUP_ADVANTAGES_SCHEMA.
    inferred = torch._C.parse_schema("x" + torch.library.infer_schema(bandadv.ops._triton_op_impl, mutates_args=()))
    expected = torch._C.parse_schema(bandadv.ops.GROUP_ADVANTAGES_SCHEMA)

    def described(schema):
        return [(a.name, str(a.type), a.kwarg_only, a.default_value) for a in schema.arguments]

    assert described(inferred) == described(expected)
    assert len(inferred.returns) == len(expected.returns)


def test_group_stats_rows_by_name():
    values = torch.arange(6 * 3, dtype=torch.float32).view(6, 3)
    stats = bandadv.GroupStats(count=torch.tensor([1, 2, 3], dtype=torch.int32), values=values)
    for row, name in enumerate(bandadv.types.STAT_NAMES):
        assert torch.equal(getattr(stats, name), values[row]) and getattr(stats, name).is_contiguous()
    assert list(stats.as_dict()) == ["count", *bandadv.types.STAT_NAMES]


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck_out_form(case):
    # group_advantages.out writes into the caller's buffers (the public call's out=); the fallback
    # kernel (the reference, where no kernel was compiled) writes the same numbers.
    args, kwargs = case
    outs = op(*args, **kwargs)
    buffers = {name: torch.full_like(t, 7) for name, t in zip(bandadv.ops.OUTPUT_NAMES, outs, strict=True)}
    torch.library.opcheck(torch.ops.bandadv.group_advantages.out, args, {**kwargs, **buffers})
    assert torch.ops.bandadv.group_advantages.out(*args, **kwargs, **buffers) is None
    fallback = {name: torch.full_like(t, 7) for name, t in buffers.items()}
    bandadv.ops._reference_out_op(*args, **kwargs, **fallback)
    for name, w, f, o in zip(bandadv.ops.OUTPUT_NAMES, buffers.values(), fallback.values(), outs, strict=True):
        torch.testing.assert_close(w, o, rtol=0, atol=0, equal_nan=True, msg=name)
        torch.testing.assert_close(f, o, rtol=2e-6, atol=2e-6, equal_nan=True, msg=name)


@pytest.mark.skipif("CPU" not in bandadv.ops.COMPILED, reason="the compiled CPU kernel carves small outputs")
@pytest.mark.parametrize("num_groups, return_index", [(1, True), (48, False)])  # 48 groups: a 3.5 KB block
def test_small_outputs_are_independent_tensors(num_groups, return_index):
    # A small CPU call carves its outputs from one allocation (op_common.h); each must still act
    # as a tensor of its own: its own storage of its own size (no aliasing, for opcheck; a pickle
    # carries only it), resizable, shareable, freed with the last output.
    import pickle

    rewards = torch.rand(8 * num_groups, generator=torch.Generator().manual_seed(num_groups))
    outs = op(rewards, 8, return_index=return_index)
    assert outs[1].data_ptr() - outs[0].data_ptr() == -(-outs[0].nbytes // 64) * 64  # one block
    for i, a in enumerate(outs):
        assert a.untyped_storage().nbytes() == a.numel() * a.element_size()
        assert a.data_ptr() % 64 == 0
        for b in outs[i + 1 :]:
            assert not torch._C._overlaps(a, b)
    expected = [t.clone() for t in outs]
    assert len(pickle.dumps(outs[0])) < len(pickle.dumps(torch.cat([outs[0], outs[0]])))
    copies = pickle.loads(pickle.dumps(outs))
    outs[5].share_memory_()
    assert outs[5].is_shared()
    outs[0].resize_(10_000).fill_(3.0)  # moves to a buffer of its own; the others stay
    for t, c, e in zip(outs[1:], copies[1:], expected[1:], strict=True):
        assert torch.equal(t, e) and torch.equal(c, e)
    del outs, copies

    def resident_mb():  # now, not the peak (which earlier tests may have set)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    before = resident_mb()
    for _ in range(20_000):  # 10 MB or more if the blocks leaked
        op(rewards, 8, return_index=return_index)
    assert resident_mb() - before < 5
