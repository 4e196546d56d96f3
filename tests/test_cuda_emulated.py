"""The CUDA kernels' own source (csrc/cuda/group_advantages_kernels.cuh), run on the CPU by the
fiber emulator in tests/cuda_emulator: against the float64 reference on random cases, and
against the C++ CPU kernel (masks, reasons, kept_index and num_kept exactly) for every team
shape, load width and dtype. This checks the kernels' logic, including the decoupled look-back
across blocks resident at once in shuffled order; the GPU's memory ordering, timing and
resource limits are checked only on a GPU (tests/test_gpu.py, benchmarks/gpu_check.sh)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from test_correctness import cases

import bandadv
from bandadv import AdvantageConfig
from bandadv.advantages import _result
from conftest import assert_matches_cpu_kernel, assert_matches_reference, make_offsets, random_rewards

ROOT = Path(__file__).resolve().parents[1]
_LIBRARIES: list[torch.library.Library] = []  # the emulator's op definitions, alive for the session


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """torch.ops.bandadv_emulator.group_advantages, built on first use (about 15 s)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    from torch.utils import cpp_extension

    if not hasattr(torch.ops.bandadv_emulator, "configure"):
        lib = torch.library.Library("bandadv_emulator", "DEF")
        lib.define(reordered_schema())
        lib.define(bandadv.ops.out_schema(reordered_schema()))
        lib.define("configure(int max_threads, int seed) -> ()")
        lib.define("counters() -> int[]")
        _LIBRARIES.append(lib)
        cpp_extension.load(
            name="bandadv_cuda_emulator",
            sources=[str(ROOT / "tests/cuda_emulator/emulated_op.cpp")],
            extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests/cuda_emulator")],
            extra_cflags=["-O2", "-std=c++20", "-U_FORTIFY_SOURCE"],
            build_directory=str(tmp_path_factory.mktemp("cuda_emulator")),
            is_python_module=False,
        )
    return torch.ops.bandadv_emulator


def reordered_schema() -> str:
    """bandadv's schema with the options in reverse order. The kernels read their arguments by
    name (csrc/op_entry.h), so every test here, calling the emulated op by name, also checks
    that no argument's position is assumed in C++."""
    schema = bandadv.ops.GROUP_ADVANTAGES_SCHEMA
    head, rest = schema.split("(", 1)
    arguments, returns = rest.split(") -> ", 1)
    arguments = arguments.split(", ")
    inputs, trailing = len(bandadv.ops.INPUT_NAMES) + 1, len(bandadv.ops.TRAILING_NAMES)  # + 1: the "*"
    assert arguments[inputs - 1] == "*"
    options = arguments[inputs:-trailing]
    assert options[0].startswith("str estimator=") and len(options) > 10
    return f"{head}({', '.join(arguments[:inputs] + options[::-1] + arguments[-trailing:])}) -> {returns}"


def call_emulated(ops, rewards, config, *, group_size=0, offsets=None, success=None, valid=None, prior=None):
    args = (rewards, group_size, offsets, success, valid, prior)
    return ops.group_advantages.default(**bandadv.ops.bind(args, {**config.op_kwargs(), "return_index": True}))


def run_emulated(ops, rewards, config, **layout):
    return _result(call_emulated(ops, rewards, config, **layout), return_index=True)


def run_cpu(rewards, config, **layout):
    return bandadv.group_advantages(rewards, config=config, backend="cpu", return_index=True, **layout)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_property_matches_reference(emulated, case):
    rewards, layout, extras, config = case
    out = run_emulated(emulated, rewards, config, **layout, **extras)
    ref = bandadv.reference_group_advantages(rewards, config=config, return_index=True, **layout, **extras)
    assert_matches_reference(out, ref)


# Segments of 1..32 lanes reading 1 or 4 samples each, blocks of 64..1024 threads, block-strided
# loops; 4-sample loads need group_size % 4 == 0 and aligned rewards (2-sample for float64).
@pytest.mark.parametrize("group_size", [1, 3, 4, 16, 32, 33, 64, 132, 1024, 1030, 4100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("aligned", [True, False])
def test_fixed_groups_match_the_cpu_kernel(emulated, group_size, dtype, aligned):
    gen = torch.Generator().manual_seed(group_size)
    num_groups = max(2, 4000 // group_size)
    rewards = random_rewards(num_groups * group_size + 1, "ternary", gen, dtype)
    rewards = rewards[1:] if not aligned else rewards[:-1]  # [1:]: one element off every boundary
    assert (rewards.data_ptr() % 16 == 0) == aligned
    rewards[torch.rand(rewards.shape, generator=gen) < 0.05] = float("nan")
    config = AdvantageConfig(band=(0.1, 0.9), accidental_max_successes=1)
    out = run_emulated(emulated, rewards, config, group_size=group_size)
    assert_matches_cpu_kernel(out, run_cpu(rewards, config, group_size=group_size))


@pytest.mark.parametrize("max_threads", [256, 2048, 16384])
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_many_blocks_in_flight(emulated, max_threads, scale):
    # 256: one block at a time, so each finds its predecessor's inclusive count; 16384: 64 blocks
    # at once, interleaved, so the look-back walks windows of tiles that have published only
    # their own count, and the batch merge's last block is any of them.
    gen = torch.Generator().manual_seed(max_threads)
    sizes = torch.randint(0, 40, (1200,), generator=gen)
    rewards = random_rewards(int(sizes.sum()), "binary", gen)
    valid = torch.rand(rewards.shape, generator=gen) > 0.1
    offsets = make_offsets(sizes.tolist())
    config = AdvantageConfig(band=(0.2, 0.8), scale=scale)
    cpu = run_cpu(rewards, config, offsets=offsets, valid=valid)
    for seed in range(2):
        emulated.configure(max_threads, seed)
        try:
            out = run_emulated(emulated, rewards, config, offsets=offsets, valid=valid)
        finally:
            emulated.configure(12288, 0)
        assert_matches_cpu_kernel(out, cpu)


def test_nothing_kept(emulated):
    rewards = torch.ones(300 * 16)  # every group all-equal
    out = run_emulated(emulated, rewards, AdvantageConfig(), group_size=16)
    assert int(out.num_kept) == 0 and bool((out.kept_index == -1).all()) and not bool(out.sample_mask.any())


@pytest.mark.parametrize("num_groups", [128, 192, 1000])
def test_batch_std_merges_every_block(emulated, num_groups):
    # Groups of 132 (33 lanes of 4 samples): one 64-thread block each, so the last block's 64
    # threads each merge a run of tiles (2, 3 and 16 here) before the tree: every run counts.
    gen = torch.Generator().manual_seed(num_groups)
    rewards = random_rewards(num_groups * 132, "continuous", gen)
    rewards[-132:] *= 100.0  # the last tile changes the batch std visibly
    config = AdvantageConfig(scale="batch")
    out = run_emulated(emulated, rewards, config, group_size=132)
    assert_matches_cpu_kernel(out, run_cpu(rewards, config, group_size=132))


def test_results_do_not_depend_on_block_order(emulated):
    # Bitwise: the look-back's counts are integers and the batch merge runs in a fixed order,
    # whichever blocks run together and whichever finishes last.
    gen = torch.Generator().manual_seed(11)
    sizes = torch.randint(1, 60, (900,), generator=gen)
    rewards = random_rewards(int(sizes.sum()), "continuous", gen)
    offsets = make_offsets(sizes.tolist())
    config = AdvantageConfig(band=(0.2, 0.8), scale="batch")
    runs = []
    for max_threads, seed in ((256, 0), (4096, 1), (16384, 2)):
        emulated.configure(max_threads, seed)
        try:
            runs.append(call_emulated(emulated, rewards, config, offsets=offsets))
        finally:
            emulated.configure(12288, 0)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("group_size", [8, 16, 64])
def test_vector_loads_cut_warp_operations(emulated, group_size):
    # Counted, not timed: 4 samples per lane means a quarter of the lanes and shorter
    # butterflies, so several times fewer shuffles and votes per sample than 1-sample loads
    # (misaligned rewards) of the same groups.
    rewards = (torch.rand(256 * group_size + 1) < 0.5).float()
    config = AdvantageConfig(band=(0.1, 0.9))
    per_sample = {}
    for name, r in (("aligned", rewards[:-1]), ("misaligned", rewards[1:])):
        emulated.counters()
        run_emulated(emulated, r, config, group_size=group_size)
        per_sample[name] = emulated.counters()[0] / r.numel()
    assert per_sample["misaligned"] > 4 * per_sample["aligned"], per_sample


BAD_OFFSETS = {
    "start": [1, 5, 12],
    "end short": [0, 5, 11],
    "end past N": [0, 5, 20],
    "decreasing": [0, 8, 4, 12],
    "negative": [0, -4, 12],
    "far past N": [0, 1 << 40, 12],
}


@pytest.mark.parametrize("name", BAD_OFFSETS)
def test_bad_offsets_fail_on_the_device(emulated, name):
    # The CUDA kernels read offsets on the device only (no host sync, so validate=False and CUDA
    # graphs skip the host check): they assert there, naming offsets, and read a group with bad
    # bounds as empty. Every tensor is guarded, so any access outside one would fault here.
    rewards = torch.rand(12)
    offsets = torch.tensor(BAD_OFFSETS[name])
    with pytest.raises(ValueError, match=r"device-side assert: bandadv\.group_advantages: offsets must start at 0"):
        call_emulated(emulated, rewards, AdvantageConfig(), offsets=offsets)
    out = run_emulated(emulated, rewards, AdvantageConfig(), offsets=torch.tensor([0, 5, 12]))  # still usable
    assert int(out.num_kept) == 12


def test_out_form_writes_the_callers_buffers(emulated):
    # The out= overload (csrc/op_entry.h) runs the same kernels on the caller's tensors.
    gen = torch.Generator().manual_seed(4)
    sizes = [7, 0, 33, 1, 64, 5]
    rewards = random_rewards(sum(sizes), "ternary", gen)
    config = AdvantageConfig(band=(0.2, 0.8), accidental_max_successes=1)
    args = bandadv.ops.bind((rewards, 0, make_offsets(sizes)), {**config.op_kwargs(), "return_index": True})
    fresh = emulated.group_advantages.default(**args)
    buffers = {name: torch.full_like(t, 3) for name, t in zip(bandadv.ops.OUTPUT_NAMES, fresh, strict=True)}
    emulated.group_advantages.out(**args, **buffers)
    for name, written, expected in zip(bandadv.ops.OUTPUT_NAMES, buffers.values(), fresh, strict=True):
        torch.testing.assert_close(written, expected, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="out group_stats must be a contiguous"):
        emulated.group_advantages.out(**args, **{**buffers, "group_stats": buffers["group_stats"].t()})
