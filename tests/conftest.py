"""Shared helpers: random cases, the backends built here, and comparison with the oracle."""

from __future__ import annotations

import importlib.util
import os
import shutil

# Without a GPU, Triton kernels run on the CPU interpreter; it must be chosen before triton is
# imported (torch.compile's inductor imports it).
if "TRITON_INTERPRET" not in os.environ and not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

import bandadv
from bandadv import AdvantageConfig, GroupAdvantages

torch.set_num_threads(2)


def kernel_backends() -> list[str]:
    """Backends with a real kernel for CPU tensors in this build (asked of the dispatcher)."""
    backends = []
    if "CPU" in bandadv.ops.COMPILED:
        backends.append("cpu")
    if bandadv.ops.triton_available() and bandadv.ops.triton_interpreting():
        backends.append("triton")
    return backends


BACKENDS = [*kernel_backends(), "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def make_offsets(sizes: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)


def random_rewards(n: int, kind: str, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    if kind == "binary":
        r = (torch.rand(n, generator=gen) < torch.rand(1, generator=gen)).to(torch.float64)
    elif kind == "ternary":  # correctness plus a format bonus: many ties
        r = (torch.rand(n, generator=gen) < 0.5).to(torch.float64) + 0.1 * (torch.rand(n, generator=gen) < 0.5)
    elif kind == "two_values":  # two arbitrary floats: all-equal groups whose mean does not round back
        r = (torch.rand(2, generator=gen, dtype=torch.float64) * 10)[torch.randint(0, 2, (n,), generator=gen)]
    elif kind == "offset":  # large mean, unit spread: stresses the centred variance
        r = 1000.0 + torch.randn(n, generator=gen, dtype=torch.float64)
    else:
        r = torch.randn(n, generator=gen, dtype=torch.float64) * 2.0
    return r.to(dtype)


def assert_matches_reference(out: GroupAdvantages, ref: GroupAdvantages, *, atol: float = 2e-4, rtol: float = 2e-4):
    """Compares a backend's result with the float64 oracle: masks exact, numbers close."""
    torch.testing.assert_close(out.reason, ref.reason, rtol=0, atol=0)
    torch.testing.assert_close(out.group_mask, ref.group_mask, rtol=0, atol=0)
    torch.testing.assert_close(out.sample_mask, ref.sample_mask, rtol=0, atol=0)
    torch.testing.assert_close(out.stats.count, ref.stats.count, rtol=0, atol=0)
    assert int(out.num_kept) == int(ref.num_kept)
    if ref.kept_index is not None:
        torch.testing.assert_close(out.kept_index, ref.kept_index, rtol=0, atol=0)
    for name in ("successes", "pass_rate", "success_var"):
        torch.testing.assert_close(getattr(out.stats, name).double(), getattr(ref.stats, name), rtol=1e-6, atol=1e-6)
    scale = max(1.0, float(ref.stats.mean.abs().max())) if ref.stats.mean.numel() else 1.0
    torch.testing.assert_close(out.stats.mean.double(), ref.stats.mean, rtol=rtol, atol=atol * scale)
    torch.testing.assert_close(out.stats.std.double(), ref.stats.std, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.stats.reward_var.double(), ref.stats.reward_var, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.advantages.double(), ref.advantages, rtol=rtol, atol=atol)
    assert out.advantages.dtype == (torch.float64 if ref_is_double(out) else torch.float32)


def ref_is_double(out: GroupAdvantages) -> bool:
    return out.stats.mean.dtype == torch.float64


def run_both(rewards, *, backend: str, config: AdvantageConfig, return_index=True, **layout):
    out = bandadv.group_advantages(rewards, config=config, backend=backend, return_index=return_index, **layout)
    ref = bandadv.reference_group_advantages(rewards, config=config, return_index=return_index, **layout)
    return out, ref


REQUIRE_EXTENSION = os.environ.get("BANDADV_REQUIRE_EXT") == "1"


def extension_path() -> str | None:
    """The compiled extension this Python loads (builds for other Pythons may sit beside it)."""
    spec = importlib.util.find_spec("bandadv._C")
    return spec.origin if spec is not None else None


def assert_matches_cpu_kernel(out: GroupAdvantages, cpu: GroupAdvantages) -> None:
    """Another kernel's result (on any device) against the C++ CPU kernel's: reasons, masks,
    counts and compaction exactly, numbers close."""
    for name in ("reason", "group_mask", "sample_mask", "num_kept", "kept_index"):
        assert torch.equal(getattr(out, name).cpu(), getattr(cpu, name)), name
    assert torch.equal(out.stats.count.cpu(), cpu.stats.count)
    torch.testing.assert_close(out.advantages.cpu(), cpu.advantages, atol=2e-4, rtol=2e-4)
    for name in ("successes", "mean", "std", "pass_rate", "success_var", "reward_var"):
        torch.testing.assert_close(getattr(out.stats, name).cpu(), getattr(cpu.stats, name), atol=2e-4, rtol=2e-4)


def tracker_batch(ids: list[int], hits: list[int], g: int = 8):
    """Prompt ids and a GroupAdvantages for groups of g binary rewards with the given hit counts."""
    rewards = (torch.arange(g).expand(len(hits), g) < torch.tensor(hits)[:, None]).float()
    return torch.tensor(ids), bandadv.group_advantages(rewards.flatten(), g)


def merged_counts(ids, out) -> dict[int, list[float]]:
    """(n, k) summed per prompt id, for prompts with any valid sample: what a tracker update sees."""
    totals: dict[int, list[float]] = {}
    for pid, n, k in zip(ids.tolist(), out.stats.count.tolist(), out.stats.successes.tolist(), strict=True):
        total = totals.setdefault(pid, [0.0, 0.0])
        total[0] += n
        total[1] += k
    return {pid: v for pid, v in sorted(totals.items()) if v[0] > 0}
