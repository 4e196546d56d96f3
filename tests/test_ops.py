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
@pytest.mark.parametrize("num_groups, return_index", [(1, True), (48, False), (512, False)])  # 3.5 and 37 KB blocks
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


@pytest.mark.parametrize("num_groups, return_index", [(0, True), (0, False), (1, False), (3, True)])
def test_outputs_save_and_load(tmp_path, num_groups, return_index):
    # torch.save refuses two storages at one address with different dtypes: empty outputs (no
    # groups; kept_index without return_index) must not share an address with another output.
    rewards = torch.rand(8 * num_groups, generator=torch.Generator().manual_seed(5))
    outs = op(rewards, 8, return_index=return_index)
    torch.save(outs, tmp_path / "outs.pt")
    for a, b in zip(torch.load(tmp_path / "outs.pt"), outs, strict=True):
        assert torch.equal(a, b)
    result = bandadv.group_advantages(rewards, 8, return_index=return_index)
    torch.save(result, tmp_path / "result.pt")
    assert torch.equal(torch.load(tmp_path / "result.pt", weights_only=False).advantages, result.advantages)


# --- The eager entry, bandadv._C.group_advantages (csrc/python_entry.cpp) ---------------------

entry = bandadv.ops.ENTRY
needs_entry = pytest.mark.skipif(entry is None, reason="bandadv._C is not loaded")


def _config_strategy():
    from hypothesis import strategies as st

    band = st.one_of(st.none(), st.tuples(st.floats(0, 0.5), st.floats(0.5, 1)))
    grpo = st.builds(
        AdvantageConfig, estimator=st.just("grpo"), scale=st.sampled_from(["group", "batch", "none"]),
        unbiased=st.booleans(), eps=st.sampled_from([0.0, 1e-6, 1e-4, 0.5]), singleton=st.sampled_from(["zero", "raw"]),
        mask_all_equal=st.booleans(), band=band, band_inclusive=st.booleans(),
        min_std=st.one_of(st.none(), st.floats(0, 0.5)), accidental_max_successes=st.integers(0, 3),
        accidental_prior_max=st.floats(0, 1), accidental_action=st.sampled_from(["mask", "clip"]),
        accidental_clip=st.floats(0, 2), mask_too_few=st.booleans(),
    )  # fmt: skip
    others = st.builds(AdvantageConfig, estimator=st.sampled_from(["dr_grpo", "rloo"]), band=band)
    return st.one_of(grpo, others)


def _entry_case(data):
    """A random call: its op arguments (positional inputs) and config."""
    from hypothesis import strategies as st

    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    if data.draw(st.booleans()):
        group_size, num_groups = data.draw(st.integers(1, 20)), data.draw(st.integers(0, 12))
        n, offsets = group_size * num_groups, None
    else:
        sizes = data.draw(st.lists(st.integers(0, 20), max_size=12))
        n, group_size, offsets, num_groups = sum(sizes), 0, make_offsets(sizes), len(sizes)
    rewards = random_rewards(n, data.draw(st.sampled_from(["binary", "ternary", "continuous"])), gen, dtype)
    success = (torch.rand(n, generator=gen) < 0.5) if data.draw(st.booleans()) else None
    valid = (torch.rand(n, generator=gen) < 0.8) if data.draw(st.booleans()) else None
    prior = torch.rand(num_groups, generator=gen) if data.draw(st.booleans()) else None
    return (rewards, group_size, offsets, success, valid, prior), data.draw(_config_strategy())


def _assert_same(outs, expected):
    assert len(outs) == len(expected)
    for name, a, b in zip(bandadv.ops.OUTPUT_NAMES[: len(outs)], outs, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


def _assert_result_is(result, expected, return_index):
    # The entry's GroupAdvantages holds the op's outputs, kept_index only with return_index.
    assert type(result) is bandadv.GroupAdvantages and type(result.stats) is bandadv.GroupStats
    assert (result.kept_index is None) != return_index
    r = result
    outs = (r.advantages, r.sample_mask, r.reason, r.group_mask, r.stats.count, r.stats.values, r.num_kept)
    _assert_same(outs + ((r.kept_index,) if return_index else ()), expected[: len(outs) + return_index])


@needs_entry
def test_entry_gives_what_torch_ops_gives():
    # The entry calls the same op through the dispatcher, its options from one tuple
    # (AdvantageConfig.op_options(), converted once per tuple and cached): every output the same,
    # bit for bit, for any config (far more than the cache holds, so entries are evicted and
    # made again), layout, dtype and optional input, in both forms.
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None)
    @given(st.data(), st.booleans())
    def check(data, return_index):
        inputs, config = _entry_case(data)
        expected = op(*inputs, **config.op_kwargs(), return_index=return_index)
        _assert_result_is(entry(*inputs, config.op_options(), return_index, None), expected, return_index)
        buffers = tuple(torch.full_like(t, 7) for t in expected)
        assert entry(*inputs, config.op_options(), return_index, buffers) is None
        _assert_same(buffers, expected)

    check()


@needs_entry
def test_entry_errors_are_the_ops():
    rewards = torch.rand(12)
    options = AdvantageConfig().op_options()
    for args, error, message in [
        ((rewards, 5, None, None, None, None), ValueError, "not divisible by group_size=5"),
        ((rewards, 0, torch.tensor([0, 5, 11]), None, None, None), ValueError, "offsets must end at N = 12"),
        ((rewards, 4, None, torch.rand(3), None, None), ValueError, "success must have shape"),
        ((rewards, 4, None, None, torch.ones(12), None), ValueError, "valid must be a bool tensor"),
        ((rewards.view(3, 4), 4, None, None, None, None), ValueError, "rewards must be 1-D"),
    ]:
        with pytest.raises(error, match=message):
            entry(*args, options, False, None)
        with pytest.raises(error, match=message):
            op(*args)
    with pytest.raises(TypeError, match="takes 8 or 9 arguments"):
        entry(rewards, 4)
    with pytest.raises(ValueError, match="has 14 options, got 2"):
        entry(rewards, 4, None, None, None, None, ("grpo", "group"), False, None)
    with pytest.raises(TypeError, match="option unbiased must be a bool"):
        entry(rewards, 4, None, None, None, None, ("grpo", "group", 1, *options[3:]), False, None)
    with pytest.raises(ValueError, match="estimator must be 'grpo', 'dr_grpo' or 'rloo', got 'ppo'"):
        entry(rewards, 4, None, None, None, None, ("ppo", *options[1:]), False, None)
    with pytest.raises(ValueError, match=r"out group_mask must be a contiguous torch\.bool"):
        outs = op(rewards, 4)
        entry(rewards, 4, None, None, None, None, options, False, (*outs[:3], outs[3].int(), *outs[4:]))


@needs_entry
def test_entry_checks_the_result_types():
    # The entry fills GroupAdvantages and GroupStats by position: types whose fields are not the
    # ones it fills, in its order, are refused (and the types set before stay).
    from typing import NamedTuple

    fields = bandadv.GroupAdvantages._fields
    swapped = NamedTuple("Swapped", [(name, object) for name in (fields[1], fields[0], *fields[2:])])

    class Short(NamedTuple):
        count: object

    for types, message in [
        ((swapped, bandadv.GroupStats), r"Swapped has fields \(sample_mask, advantages, .*\), but this build fills "
         r"\(advantages, sample_mask, reason, group_mask, stats, num_kept, kept_index\)"),
        ((bandadv.GroupAdvantages, Short), r"Short has fields \(count\), but this build fills \(count, values\)"),
        ((dict, bandadv.GroupStats), "takes named tuple types"),
    ]:  # fmt: skip
        with pytest.raises(TypeError, match=message):
            bandadv._C.set_result_types(*types)
    result = bandadv.group_advantages(torch.rand(8), 4)
    assert type(result) is bandadv.GroupAdvantages and type(result.stats) is bandadv.GroupStats


@needs_entry
def test_public_call_goes_through_the_dispatcher():
    # Dispatch modes and the profiler see the op, as when it is called through torch.ops.
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    rewards = torch.rand(32)
    with Seen():
        out = bandadv.group_advantages(rewards, 8)
        bandadv.group_advantages(rewards, 8, out=out)
    assert [f for f in seen if f.namespace == "bandadv"] == [op, torch.ops.bandadv.group_advantages.out]
    with torch.profiler.profile() as prof:
        bandadv.group_advantages(rewards, 8)
    assert "bandadv::group_advantages" in [e.name for e in prof.events()]


@needs_entry
def test_public_call_honours_torch_function():
    # A tensor subclass's __torch_function__, in any tensor argument, and a torch function mode
    # see the op: the entry leaves such calls to torch.ops.
    from torch.overrides import TorchFunctionMode

    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(4)
    rewards, success = random_rewards(32, "ternary", gen), torch.rand(32, generator=gen) < 0.5
    expected = bandadv.group_advantages(rewards, 8, success=success)
    calls = [
        lambda: bandadv.group_advantages(rewards.as_subclass(Logged), 8, success=success),
        lambda: bandadv.group_advantages(rewards, 8, success=success.as_subclass(Logged)),
        lambda: bandadv.group_advantages(rewards, 8, success=success, out=expected._replace(
            advantages=torch.empty_like(expected.advantages).as_subclass(Logged))),
    ]  # fmt: skip
    for call in calls:
        seen.clear()
        out = call()
        assert op in seen or torch.ops.bandadv.group_advantages.out in seen
        torch.testing.assert_close(out.advantages.as_subclass(torch.Tensor), expected.advantages)
    seen.clear()
    with Mode():
        out = bandadv.group_advantages(rewards, 8, success=success)
    assert op in seen
    torch.testing.assert_close(out.advantages, expected.advantages)


@needs_entry
def test_large_calls_release_the_gil():
    # As torch.ops does, the entry lets other Python threads run while a large call computes.
    import sys
    import threading
    import time

    rewards = torch.rand(1 << 23)
    entry(rewards, 16, None, None, None, None, AdvantageConfig().op_options(), False, None)  # warm up
    stamps, stop = [], threading.Event()

    def spin():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    thread = threading.Thread(target=spin)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the spinning thread has a core of its own
    try:
        thread.start()
        time.sleep(0.01)
        start = time.perf_counter()
        entry(rewards, 16, None, None, None, None, AdvantageConfig().op_options(), False, None)
        end = time.perf_counter()
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
        torch.set_num_threads(threads)
    # Holding the GIL, the call would let the spinner run only around its start and its end.
    middle = [t for t in stamps if start + 0.25 * (end - start) < t < end - 0.25 * (end - start)]
    assert end - start > 0.005 and len(middle) > 100
