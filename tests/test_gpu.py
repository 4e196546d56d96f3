"""The CUDA and Triton kernels on a GPU: against the float64 reference, CUDA-graph capture,
determinism, torch.compile. Marked `gpu`; skipped where no CUDA device is present (run by
benchmarks/gpu_check.sh on a GPU machine)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from test_correctness import cases

import bandadv
from bandadv import AdvantageConfig
from conftest import assert_matches_cpu_kernel, assert_matches_reference, make_offsets, random_rewards

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def gpu_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    found = ["cuda"] if "CUDA" in bandadv.ops.COMPILED else []
    return [*found, "triton"] if bandadv.ops.triton_available() else found


@pytest.fixture(params=gpu_backends() or ["none"])
def gpu_backend(request) -> str:
    if request.param == "none":
        pytest.skip("no GPU backend built")
    return request.param


def run_gpu(rewards, backend, config, return_index=True, **kwargs):
    layout = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out = bandadv.group_advantages(rewards.cuda(), config=config, backend=backend, return_index=return_index, **layout)
    ref = bandadv.reference_group_advantages(rewards, config=config, return_index=return_index, **kwargs)
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    out = bandadv.GroupAdvantages(
        advantages=cpu(out.advantages), sample_mask=cpu(out.sample_mask), reason=cpu(out.reason),
        group_mask=cpu(out.group_mask), num_kept=cpu(out.num_kept), kept_index=cpu(out.kept_index),
        stats=bandadv.GroupStats(count=cpu(out.stats.count), values=cpu(out.stats.values)),
    )  # fmt: skip
    return out, ref


# Team shapes of the CUDA kernel (segments of 1..32 lanes, blocks, block-strided loops) and
# Triton's BLOCK sizes; kept short, as each Triton variant compiles on first use.
@pytest.mark.parametrize("group_size", [1, 3, 16, 32, 33, 1024, 1025, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_groups(gpu_backend, group_size, dtype):
    gen = torch.Generator().manual_seed(group_size)
    num_groups = max(1, 8192 // group_size)
    rewards = random_rewards(num_groups * group_size, "continuous", gen, dtype)
    rewards[torch.rand(rewards.shape, generator=gen) < 0.05] = float("nan")
    out, ref = run_gpu(rewards, gpu_backend, AdvantageConfig(band=(0.1, 0.9)), group_size=group_size)
    assert_matches_reference(out, ref)


def cuda_only():
    if not torch.cuda.is_available() or "CUDA" not in bandadv.ops.COMPILED:
        pytest.skip("needs the CUDA kernel")


def assert_compaction_matches_cpu(rewards: torch.Tensor, config: AdvantageConfig, **layout) -> None:
    """The CUDA kernel's masks, kept_index and num_kept equal the C++ CPU kernel's, and its
    numbers are close to them."""
    on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in layout.items()}
    gpu = bandadv.group_advantages(rewards.cuda(), config=config, backend="cuda", return_index=True, **on_gpu)
    cpu = bandadv.group_advantages(rewards.cpu(), config=config, backend="cpu", return_index=True, **layout)
    assert_matches_cpu_kernel(gpu, cpu)
    kept = int(cpu.num_kept)
    assert torch.equal(cpu.kept_index[:kept], cpu.sample_mask.nonzero().flatten())
    assert bool((cpu.kept_index[kept:] == -1).all())


# About 1M samples: thousands of blocks, so kept_index and num_kept depend on the decoupled
# look-back across blocks. Group sizes that take 4-sample vector loads (4, 16, 64, 2048),
# 2-sample ones for float64, and 1-sample loads (6, 200 for float64, misaligned rewards).
@pytest.mark.parametrize("group_size", [4, 6, 16, 64, 200, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("aligned", [True, False])
def test_compaction_across_many_blocks(group_size, dtype, aligned):
    cuda_only()
    gen = torch.Generator().manual_seed(group_size)
    num_groups = (1 << 20) // group_size
    pass_rate = torch.rand(num_groups, generator=gen).repeat_interleave(group_size)
    rewards = (torch.rand(num_groups * group_size, generator=gen) < pass_rate).to(dtype)
    if not aligned:  # one element into a larger buffer: no vector load may be used
        rewards = torch.cat([rewards.new_zeros(1), rewards]).cuda()[1:]
    config = AdvantageConfig(band=(0.1, 0.9), accidental_max_successes=1)
    assert_compaction_matches_cpu(rewards, config, group_size=group_size)


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_compaction_of_ragged_groups_across_many_blocks(scale):
    cuda_only()
    gen = torch.Generator().manual_seed(5)
    sizes = torch.randint(0, 48, (40_000,), generator=gen)
    sizes[torch.rand(sizes.shape, generator=gen) < 0.01] = 700  # some groups longer than a warp
    rewards = random_rewards(int(sizes.sum()), "ternary", gen)
    valid = torch.rand(rewards.shape, generator=gen) > 0.1
    config = AdvantageConfig(band=(0.2, 0.8), scale=scale)  # batch: the std merged across blocks
    assert_compaction_matches_cpu(rewards, config, offsets=make_offsets(sizes.tolist()), valid=valid)


def test_nothing_kept_gives_an_index_of_minus_ones():
    cuda_only()
    rewards = torch.ones(4096 * 16, device="cuda")  # every group all-equal: all masked
    out = bandadv.group_advantages(rewards, 16, backend="cuda", return_index=True)
    assert int(out.num_kept) == 0 and bool((out.kept_index == -1).all()) and not bool(out.sample_mask.any())


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_property_matches_reference(case):
    rewards, layout, extras, config = case
    for backend in gpu_backends():
        out, ref = run_gpu(rewards, backend, config, **layout, **extras)
        assert_matches_reference(out, ref)


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_cuda_graph_capture(gpu_backend, scale):
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(0, 64, (500,), generator=gen).tolist()
    offsets = make_offsets(sizes).cuda()
    static = random_rewards(sum(sizes), "binary", gen).cuda()
    config = AdvantageConfig(scale=scale, band=(0.1, 0.9), accidental_max_successes=1)

    def step():
        return bandadv.group_advantages(
            static, offsets=offsets, config=config, backend=gpu_backend, return_index=True, validate=False
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside capture: kernel compilation, allocator
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    fresh = random_rewards(sum(sizes), "binary", gen).cuda()
    static.copy_(fresh)
    graph.replay()
    eager = bandadv.group_advantages(fresh, offsets=offsets, config=config, backend=gpu_backend, return_index=True)
    torch.cuda.synchronize()
    for a, b in [
        (captured.advantages, eager.advantages),
        (captured.kept_index, eager.kept_index),
        (captured.num_kept, eager.num_kept),
        (captured.reason, eager.reason),
    ]:
        assert torch.equal(a, b)


def test_bitwise_deterministic(gpu_backend):
    gen = torch.Generator().manual_seed(1)
    rewards = random_rewards((1 << 18) * 16, "continuous", gen).cuda()
    config = AdvantageConfig(scale="batch", band=(0.1, 0.9))
    first = bandadv.group_advantages(rewards, 16, config=config, backend=gpu_backend, return_index=True)
    for _ in range(3):
        again = bandadv.group_advantages(rewards, 16, config=config, backend=gpu_backend, return_index=True)
        assert torch.equal(first.advantages, again.advantages) and torch.equal(first.stats.std, again.stats.std)
        assert torch.equal(first.kept_index, again.kept_index)


def test_every_output_written(gpu_backend):
    # Poisoned caching-allocator memory must never leak into results.
    gen = torch.Generator().manual_seed(2)
    sizes = [0, 5, 1, 700, 33, 0, 2000]
    rewards = random_rewards(sum(sizes), "ternary", gen)
    for _ in range(3):
        torch.full((1 << 22,), float("nan"), device="cuda")  # leaves NaN in freed blocks
        out, ref = run_gpu(rewards, gpu_backend, AdvantageConfig(mask_all_equal=False), offsets=make_offsets(sizes))
        assert_matches_reference(out, ref)


def test_torch_compile_fullgraph(gpu_backend):
    def loss(rewards, logratio):
        out = bandadv.group_advantages(rewards, 16, band=(0.1, 0.9), backend=gpu_backend, validate=False)
        return -(out.advantages[:, None] * logratio * out.sample_mask[:, None]).sum()

    gen = torch.Generator().manual_seed(3)
    rewards = random_rewards(16 * 64, "binary", gen).cuda()
    logratio = torch.randn(16 * 64, 4, generator=gen).cuda()
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    torch.testing.assert_close(compiled(rewards, logratio), loss(rewards, logratio))


@pytest.mark.parametrize("model", ["beta", "logistic"])
def test_tracker_update_and_select_have_no_host_sync(model):
    gen = torch.Generator(device="cuda").manual_seed(0)
    tracker = bandadv.PromptTracker(100_000, model, device="cuda")
    ids = torch.randint(0, 100_000, (512,), device="cuda", generator=gen)
    rewards = (torch.rand(512 * 16, device="cuda", generator=gen) < 0.3).float()
    out = bandadv.group_advantages(rewards, 16, band=(0.1, 0.9), validate=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tracker.update(ids, out, 1, validate=False)
        tracker.prior(ids, validate=False)
        for strategy in ("thompson", "band", "learnability", "greso"):
            tracker.select(torch.arange(50_000, device="cuda"), 256, strategy, gen, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_opcheck(gpu_backend):
    name = "group_advantages" if gpu_backend == "cuda" else "group_advantages_triton"
    op = getattr(torch.ops.bandadv, name).default
    gen = torch.Generator().manual_seed(4)
    rewards = random_rewards(48, "ternary", gen).cuda()
    config = AdvantageConfig(band=(0.1, 0.9), accidental_max_successes=1, scale="batch")
    for layout in ((8, None), (0, make_offsets([5, 0, 1, 12, 30]).cuda())):
        prior = torch.rand(48 // 8 if layout[0] else 5, generator=gen).cuda()
        args = (rewards, *layout, None, None, prior)
        torch.library.opcheck(op, args, {**config.op_kwargs(), "return_index": True})
