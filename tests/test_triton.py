"""Triton-specific behaviour. The Triton kernel also runs through every backend-parametrized
test (correctness, presets, API, errors) under TRITON_INTERPRET=1 on the CPU; see conftest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bandadv
from bandadv import AdvantageConfig
from conftest import BACKENDS, assert_matches_reference, make_offsets, random_rewards, run_both

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="Triton interpreter not active")


def test_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        bandadv.group_advantages(torch.rand(8), 4, backend="triton")


@pytest.mark.parametrize("group_size", [1, 16, 1000, 4096])
def test_large_and_small_groups_share_a_program(group_size):
    # Groups longer than one BLOCK (1024) loop and Chan-merge; small ones pack ROWS per program.
    gen = torch.Generator().manual_seed(group_size)
    rewards = random_rewards(max(1, 8192 // group_size) * group_size, "continuous", gen)
    out, ref = run_both(rewards, backend="triton", config=AdvantageConfig(scale="batch"), group_size=group_size)
    assert_matches_reference(out, ref)


def test_ragged_tile_mixes_long_and_empty_groups():
    gen = torch.Generator().manual_seed(5)
    sizes = [0, 3000, 1, 0, 17, 2049, 2, 0]
    rewards = random_rewards(sum(sizes), "ternary", gen, torch.float16)
    valid = torch.rand(sum(sizes), generator=gen) > 0.3
    config = AdvantageConfig(band=(0.2, 0.8), band_inclusive=False, singleton="raw", mask_too_few=False)
    out, ref = run_both(rewards, backend="triton", config=config, offsets=make_offsets(sizes), valid=valid)
    assert_matches_reference(out, ref)


def test_band_edges_compare_in_float64():
    # 27 of 30 is exactly the float64 0.9: inside an inclusive band, on the edge of a strict one.
    rewards = (torch.arange(30) < 27).float().repeat(4)
    for inclusive, expected in ((True, 0), (False, int(bandadv.Reason.ABOVE_BAND))):
        out = bandadv.group_advantages(rewards, 30, band=(0.1, 0.9), band_inclusive=inclusive, backend="triton")
        assert out.reason.tolist() == [expected] * 4


def test_triton_op_registers_and_runs():
    # On a GPU machine this op is what backend="triton" calls. Here it registers and runs its
    # interpreted kernels on CPU tensors; its fake path (triton_op traces the launcher through
    # wrap_triton) needs compiled kernels, so opcheck and torch.compile of it run in test_gpu.py.
    if not hasattr(torch.ops.bandadv, "group_advantages_triton"):
        bandadv.ops._register_triton_op()
    op = torch.ops.bandadv.group_advantages_triton.default
    # its schema is inferred from a signature built from the op's: the same arguments and types
    main = torch.ops.bandadv.group_advantages.default._schema

    def arguments(schema):
        return [(a.name, str(a.type).replace("SymInt", "int")) for a in schema.arguments]

    assert arguments(op._schema) == arguments(main) and len(op._schema.returns) == len(main.returns)
    from bandadv.triton_kernels.group_advantage import _group_advantages_fwd_kernel

    try:
        torch.library.wrap_triton(_group_advantages_fwd_kernel)
    except RuntimeError as error:  # torch < 2.14 with Triton 3.6: "only works on functions annotated with triton.jit"
        pytest.skip(f"registered; not run: this torch's wrap_triton refuses interpreted kernels ({error})")
    config = AdvantageConfig(band=(0.1, 0.9), accidental_max_successes=1)
    rewards = random_rewards(48, "ternary", torch.Generator().manual_seed(0))
    args = (rewards, 0, make_offsets([5, 0, 1, 12, 30]), None, None, torch.rand(5))
    out = op(*args, **config.op_kwargs(), return_index=True)
    ref = torch.ops.bandadv.group_advantages.default(*args, **config.op_kwargs(), return_index=True)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b)


def _header_constants() -> dict[str, float]:
    """kName = value pairs of csrc/group_math.h (its enums and constexprs), by name."""
    import re

    header = (Path(__file__).resolve().parents[1] / "csrc" / "group_math.h").read_text()
    return {name: float(value) for name, value in re.findall(r"\bk(\w+)\s*=\s*([0-9.eE+-]+)\s*[,;}]", header)}


def test_triton_constants_match_group_math_header():
    # The Triton kernel mirrors csrc/group_math.h; its copies of the header's constants are tied
    # to it here, so that a change on one side fails instead of silently diverging.
    from bandadv.triton_kernels import group_advantage as tk

    header = _header_constants()

    def snake(name: str) -> str:
        return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper()

    reasons = {"AllEqual", "BelowBand", "AboveBand", "LowStd", "AccidentalSuccess", "TooFew"}
    for name in reasons:
        assert getattr(tk, snake(name)).value == header[name] == int(bandadv.Reason[snake(name)]), name
    assert tk.LOW_STD_SLACK.value == header["LowStdSlack"]
    assert tk._ESTIMATORS == {"grpo": header["Grpo"], "dr_grpo": header["DrGrpo"], "rloo": header["Rloo"]}
    assert (tk.GRPO.value, tk.DR_GRPO.value, tk.RLOO.value) == (header["Grpo"], header["DrGrpo"], header["Rloo"])
    assert tk._SCALES == {"group": header["Group"], "batch": header["Batch"], "none": header["None"]}
    assert (tk.SCALE_GROUP.value, tk.SCALE_BATCH.value, tk.SCALE_NONE.value) == (
        header["Group"], header["Batch"], header["None"],
    )  # fmt: skip


@pytest.mark.parametrize("offsets", [[1, 5, 12], [0, 5, 11], [0, 5, 20], [0, 8, 4, 12], [0, -4, 12]])
def test_bad_offsets_fail_without_host_checks(offsets):
    # validate=False (CUDA-graph capture) skips the host read of offsets; the kernel checks them
    # itself, reads a group with bad bounds as empty and fails the call through _assert_async.
    with pytest.raises(RuntimeError, match="offsets must start at 0, be non-decreasing and end at N"):
        bandadv.group_advantages(torch.rand(12), offsets=torch.tensor(offsets), backend="triton", validate=False)
