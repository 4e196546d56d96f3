"""The Python API: layouts, result helpers, empty batches, dtypes, the reference fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bandadv
from bandadv import AdvantageConfig, Reason
from bandadv.types import FLAG_NAMES
from conftest import REQUIRE_EXTENSION, assert_matches_reference, extension_path, make_offsets, random_rewards


def test_readme_example_one_hit_in_sixteen():
    rewards = torch.zeros(2, 16)
    rewards[0, 0] = 1.0  # one lucky hit in 16: sqrt(15) with the population std, 15/4 with Bessel's
    rewards[1, :8] = 1.0
    plain = bandadv.group_advantages(rewards, mask_all_equal=False, unbiased=False)
    assert float(plain.advantages[0]) == pytest.approx(15**0.5, rel=1e-5)
    assert float(bandadv.group_advantages(rewards).advantages[0]) == pytest.approx(15 / 4, rel=1e-5)
    out = bandadv.group_advantages(rewards, band=(0.1, 0.9), accidental_max_successes=1)
    assert out.reason.tolist() == [Reason.BELOW_BAND | Reason.ACCIDENTAL_SUCCESS, 0]
    assert out.group_mask.tolist() == [False, True]
    assert torch.all(out.advantages[:16] == 0) and out.sample_mask[16:].all()
    assert out.stats.pass_rate.tolist() == [1 / 16, 0.5]
    assert out.stats.success_var.tolist() == pytest.approx([15 / 256, 0.25])


def test_two_dimensional_rewards_match_flat(backend):
    rewards = random_rewards(64, "binary", torch.Generator().manual_seed(0)).view(8, 8)
    a = bandadv.group_advantages(rewards, backend=backend)
    b = bandadv.group_advantages(rewards.flatten(), 8, backend=backend)
    assert torch.equal(a.advantages, b.advantages) and torch.equal(a.reason, b.reason)


def test_group_index_matches_contiguous_layout(backend):
    gen = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, 20, (30,), generator=gen).tolist()
    rewards = random_rewards(sum(sizes), "ternary", gen)
    ids = torch.repeat_interleave(torch.arange(30) * 3 + 5, torch.tensor(sizes))  # sparse, ascending ids
    perm = torch.randperm(ids.numel(), generator=gen)
    config = AdvantageConfig(band=(0.2, 0.8))
    contiguous = bandadv.group_advantages(
        rewards, offsets=make_offsets(sizes), config=config, backend=backend, return_index=True
    )
    shuffled = bandadv.group_advantages(
        rewards[perm], group_index=ids[perm], config=config, backend=backend, return_index=True
    )
    torch.testing.assert_close(shuffled.advantages, contiguous.advantages[perm])
    assert torch.equal(shuffled.sample_mask, contiguous.sample_mask[perm])
    assert torch.equal(shuffled.reason, contiguous.reason)
    torch.testing.assert_close(shuffled.stats.mean, contiguous.stats.mean)
    expected_index = torch.nonzero(shuffled.sample_mask).flatten()
    assert torch.equal(shuffled.compact(), expected_index)
    assert torch.all(shuffled.kept_index[expected_index.numel() :] == -1)


def test_kept_index_and_compact(backend):
    rewards = random_rewards(16 * 20, "binary", torch.Generator().manual_seed(2))
    out = bandadv.group_advantages(rewards, 16, band=(0.2, 0.8), backend=backend, return_index=True)
    expected = torch.nonzero(out.sample_mask).flatten()
    assert int(out.num_kept) == expected.numel()
    assert torch.equal(out.compact(), expected)
    assert out.kept_index.shape == (320,) and torch.all(out.kept_index[expected.numel() :] == -1)
    with pytest.raises(ValueError, match="return_index=True"):
        bandadv.group_advantages(rewards, 16, backend=backend).compact()


def test_metrics(backend):
    rewards = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)
    out = bandadv.group_advantages(rewards, band=(0.3, 0.9), accidental_max_successes=1, backend=backend)
    m = out.metrics()
    assert m["kept_fraction"] == 0.25
    assert m["kept_sample_fraction"] == 0.25
    assert m["all_correct_fraction"] == 0.25 and m["all_wrong_fraction"] == 0.25
    assert m["accidental_fraction"] == 0.25
    assert m["below_band_fraction"] == 0.5 and m["above_band_fraction"] == 0.25
    assert m["mean_pass_rate"] == pytest.approx((1 + 0 + 0.25 + 0.5) / 4)
    assert m["max_abs_advantage"] == pytest.approx(0.5 / ((1 / 3) ** 0.5 + 1e-6), rel=1e-5)
    assert all(isinstance(v, float) for v in m.values())


def test_group_flags_and_their_fractions(backend):
    # Seven kinds of group, each with the flags it must have, repeated 1, 2, 4, ... 64 times so
    # that every flag is set on a different number of groups: a flag under another's name shows.
    kinds = [
        ([1, 1, 1, 1], {"all_correct", "above_band", "all_equal", "low_std"}),
        ([0, 0, 0, 0], {"all_wrong", "below_band", "all_equal", "low_std"}),
        ([1, 0, 0, 0], {"accidental", "below_band"}),
        ([1, 1, 0, 0], {"kept"}),
        ([0.6, 0.6, 0.6, 0.62], {"all_correct", "above_band", "low_std"}),  # all successes, std 0.01
        ([1, 1, 1, 0], {"above_band"}),  # pass rate 0.75
        ([0.1, 0.1, 0.1, 0.12], {"all_wrong", "below_band", "low_std"}),  # no success, std 0.01
    ]
    assert set().union(*(names for _, names in kinds)) == set(FLAG_NAMES)
    repeats = torch.tensor([2**i for i in range(len(kinds))])
    rewards = torch.tensor([r for r, _ in kinds]).repeat_interleave(repeats, dim=0)
    out = bandadv.group_advantages(rewards, band=(0.3, 0.7), accidental_max_successes=1, min_std=0.05, backend=backend)
    flags = out.group_flags()
    assert flags.dtype == torch.bool and flags.shape == (rewards.shape[0], len(FLAG_NAMES))
    m = out.metrics()
    counts = set()
    for j, name in enumerate(FLAG_NAMES):
        expected = torch.tensor([name in names for _, names in kinds]).repeat_interleave(repeats)
        assert torch.equal(flags[:, j], expected), name
        count = sum(2**i for i, (_, names) in enumerate(kinds) if name in names)
        assert m[f"{name}_fraction"] == count / rewards.shape[0], name
        counts.add(count)
    assert len(counts) == len(FLAG_NAMES)  # the premise: no two flags on as many groups


@pytest.mark.parametrize("layout", ["group_size", "offsets", "group_index"])
def test_empty_batch(backend, layout):
    rewards = torch.empty(0)
    kwargs = {
        "group_size": {"group_size": 8},
        "offsets": {"offsets": torch.zeros(1, dtype=torch.long)},
        "group_index": {"group_index": torch.empty(0, dtype=torch.long)},
    }[layout]
    out = bandadv.group_advantages(rewards, backend=backend, return_index=True, **kwargs)
    assert out.advantages.shape == (0,) and out.reason.shape == (0,) and int(out.num_kept) == 0
    assert out.metrics()["kept_fraction"] == 0.0
    assert out.group_flags().shape == (0, len(FLAG_NAMES))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.int64, torch.uint8])
def test_bool_and_integer_rewards_read_as_float32(backend, dtype):
    rewards = (torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5).to(dtype)
    out = bandadv.group_advantages(rewards, 8, backend=backend)
    ref = bandadv.reference_group_advantages(rewards.float(), group_size=8)
    assert out.advantages.dtype == torch.float32
    assert_matches_reference(out, ref)


def test_success_separate_from_shaped_reward(backend):
    # Shaped rewards (format bonus) must not move the pass rate: success drives the band.
    correct = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    shaped = correct.float() + 0.6  # every sample above 0.5: the default rule would call all of them correct
    default = bandadv.group_advantages(shaped, 8, band=(0.05, 0.95), backend=backend)
    given = bandadv.group_advantages(shaped, 8, band=(0.05, 0.95), success=correct, backend=backend)
    assert default.stats.pass_rate.item() == 1.0 and default.reason.item() & Reason.ABOVE_BAND
    assert given.stats.pass_rate.item() == 0.125 and given.group_mask.item()


def test_non_finite_rewards_are_invalid_not_numbers(backend):
    rewards = torch.tensor([1.0, float("nan"), 0.0, float("inf"), 1.0, -float("inf"), 0.0, 0.0])
    out = bandadv.group_advantages(rewards, 8, backend=backend)
    clean = bandadv.group_advantages(rewards[[0, 2, 4, 6, 7]], 5, backend=backend)
    assert out.stats.count.item() == 5
    torch.testing.assert_close(out.advantages[[0, 2, 4, 6, 7]], clean.advantages)
    assert out.advantages[[1, 3, 5]].tolist() == [0, 0, 0] and not out.sample_mask[[1, 3, 5]].any()


def test_config_overrides():
    base = AdvantageConfig(band=(0.1, 0.9))
    out = bandadv.group_advantages(torch.rand(16), 4, config=base, estimator="rloo")
    assert out.advantages.shape == (16,)
    assert AdvantageConfig.from_preset("trl", eps=1e-3).eps == 1e-3
    assert AdvantageConfig.from_preset("verl").singleton == "raw"
    assert AdvantageConfig(estimator="rloo").scale == "none" and AdvantageConfig().scale == "group"


def test_keyword_options_cached_per_value_and_type():
    # Configs built from keyword options are cached; each distinct option set still gets its own,
    # and a value the validation rejects is rejected even after an equal accepted one was cached.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    one_hit = bandadv.group_advantages(rewards, 4, accidental_max_successes=1)
    assert one_hit.group_mask.tolist() == [False, True]
    assert bandadv.group_advantages(rewards, 4, accidental_max_successes=2).group_mask.tolist() == [False, False]
    assert bandadv.group_advantages(rewards, 4, accidental_max_successes=1).group_mask.tolist() == [False, True]
    with pytest.raises(ValueError, match="accidental_max_successes must be an int"):
        bandadv.group_advantages(rewards, 4, accidental_max_successes=True)
    assert bandadv.group_advantages(rewards, 4, band=[0.3, 0.6]).group_mask.tolist() == [False, True]  # a list


def test_backend_cpu_refuses_what_it_cannot_run():
    if "CPU" not in bandadv.ops.COMPILED:
        with pytest.raises(RuntimeError, match="without its CPU kernel"):
            bandadv.group_advantages(torch.rand(8), 4, backend="cpu")
    with pytest.raises(ValueError, match="needs rewards on cuda"):
        bandadv.group_advantages(torch.rand(8), 4, backend="cuda")


def test_extension_built_when_required():
    # `make test` sets BANDADV_REQUIRE_EXT=1, so a broken C++ build fails CI instead of skipping.
    if not REQUIRE_EXTENSION:
        pytest.skip("BANDADV_REQUIRE_EXT is not set")
    assert "CPU" in bandadv.ops.COMPILED, bandadv.ops.EXTENSION_ERROR


def test_import_without_extension_warns_and_uses_reference():
    code = (
        "import sys, warnings\n"
        "sys.modules['bandadv._C'] = None\n"  # makes `from . import _C` raise ImportError
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, bandadv\n"
        "assert any('compiled kernels not available' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "assert bandadv.ops.COMPILED == frozenset()\n"
        "out = bandadv.group_advantages(torch.tensor([1., 0, 0, 1]), 4)\n"
        "print(out.advantages.tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=300)
    assert result.returncode == 0, result.stderr
    values = eval(result.stdout.strip().splitlines()[-1])
    assert values == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], rel=1e-5)


def test_build_records_the_torch_it_was_built_for():
    if not REQUIRE_EXTENSION:
        pytest.skip("BANDADV_REQUIRE_EXT is not set")
    assert bandadv.ops.built_for_torch(extension_path()) == torch.__version__


@pytest.mark.skipif(extension_path() is None, reason="the extension was not built")
@pytest.mark.parametrize("other", ["recorded", "installed"])
def test_build_for_another_torch_is_not_loaded(tmp_path, other):
    # A copy of the package and this build, run where the build's torch is not the installed one:
    # "recorded", this torch with a build record naming another; "installed", another torch
    # beside this Python (BANDADV_OTHER_TORCH_PYTHON, made by `make test-other-torch`) with this
    # build as it is. The extension is refused before it is loaded (one warning of one line,
    # both versions, how to rebuild); CPU tensors run on the reference, CUDA tensors go to Triton.
    package = tmp_path / "bandadv"
    shutil.copytree(Path(bandadv.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Path(__file__).resolve().parents[1] / "triton_kernels", package / "triton_kernels")
    if other == "recorded":
        python, built_for = sys.executable, "2.10.0+cu126"
        (package / (Path(extension_path()).name + ".torch")).write_text(built_for + "\n")
    else:
        python, built_for = os.environ.get("BANDADV_OTHER_TORCH_PYTHON"), torch.__version__
        if not python:
            pytest.skip("BANDADV_OTHER_TORCH_PYTHON is not set (make test-other-torch sets it)")
    code = f"""
import sys, warnings
sys.path.insert(0, {str(tmp_path)!r})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, bandadv
assert bandadv.__file__.startswith({str(tmp_path)!r}), bandadv.__file__
assert sys.version_info[:2] == {tuple(sys.version_info[:2])!r}, "another Python cannot load this build at all"
assert torch.__version__ != {built_for!r}, torch.__version__
messages = [str(w.message) for w in caught if "bandadv" in str(w.message)]
assert len(messages) == 1 and "\\n" not in messages[0], messages
assert "built for torch {built_for}" in messages[0] and f"torch {{torch.__version__}} is installed" in messages[0]
assert "pip install" in messages[0], messages
assert "bandadv._C" not in sys.modules and bandadv.ops.COMPILED == frozenset()
rewards = torch.tensor([1.0, 0, 0, 1, 0.5, 0.2, 0.9, 0.9])
out = bandadv.group_advantages(rewards, 4)
ref = bandadv.reference_group_advantages(rewards, group_size=4)
assert torch.allclose(out.advantages.double(), ref.advantages)

from torch._subclasses.fake_tensor import FakeTensorMode
chosen = []
def record(*args, triton=False, **kwargs):
    chosen.append(triton)
    raise KeyboardInterrupt
bandadv.ops.group_advantages_op = record
with FakeTensorMode():
    on_cuda = torch.rand(8, device="cuda")
try:
    bandadv.group_advantages(on_cuda, 4, validate=False)
except KeyboardInterrupt:
    pass
assert chosen == [bandadv.ops.TRITON_AVAILABLE], chosen
print("ok", torch.__version__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().startswith("ok"), result.stderr


def test_readme_usage_example_runs():
    # The README's first code block is what a new user pastes: it must run as written.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["out"].advantages.shape == (512 * 16,)
    assert torch.isfinite(namespace["loss"])


def _tensors(out: bandadv.GroupAdvantages) -> list[torch.Tensor]:
    return [
        out.advantages,
        out.sample_mask,
        out.reason,
        out.group_mask,
        out.stats.count,
        out.stats.values,
        out.num_kept,
    ]


@pytest.mark.parametrize("return_index", [False, True])
def test_out_reuses_an_earlier_result(backend, return_index):
    # A trainer passes last step's result: the new results land in its tensors, equal to a fresh call's.
    gen = torch.Generator().manual_seed(3)
    sizes = [5, 0, 8, 1, 16, 3]
    layout = {"offsets": make_offsets(sizes)}
    kw = dict(backend=backend, return_index=return_index, band=(0.2, 0.8), accidental_max_successes=1, **layout)
    first = bandadv.group_advantages(torch.rand(33, generator=gen), **kw)
    before = [t.clone() for t in _tensors(first)]
    rewards = (torch.rand(33, generator=gen) < 0.5).float()
    again = bandadv.group_advantages(rewards, out=first, **kw)
    assert again is first  # the call returns out, its tensors rewritten
    fresh = bandadv.group_advantages(rewards, **kw)
    for a, b, f in zip(_tensors(again), _tensors(first), _tensors(fresh), strict=True):
        assert a.data_ptr() == b.data_ptr() and torch.equal(a, f)
    assert any(not torch.equal(t, old) for t, old in zip(_tensors(again), before, strict=True))
    if return_index:
        assert again.kept_index.data_ptr() == first.kept_index.data_ptr() and torch.equal(
            again.kept_index, fresh.kept_index
        )
    else:
        assert again.kept_index is None


def test_out_must_match_the_call(backend):
    first = bandadv.group_advantages(torch.rand(32), 8, backend=backend)
    with pytest.raises(ValueError, match=r"out advantages must be a contiguous torch\.float32 tensor of shape \[48\]"):
        bandadv.group_advantages(torch.rand(48), 8, backend=backend, out=first)
    with pytest.raises(ValueError, match="out reason must be"):
        bandadv.group_advantages(torch.rand(32), 4, backend=backend, out=first)
    with pytest.raises(ValueError, match=r"out advantages must be a contiguous torch\.float64"):
        bandadv.group_advantages(torch.rand(32, dtype=torch.float64), 8, backend=backend, out=first)
    with pytest.raises(ValueError, match="return_index"):
        bandadv.group_advantages(torch.rand(32), 8, backend=backend, out=first, return_index=True)
    with pytest.raises(ValueError, match="group_index"):
        bandadv.group_advantages(torch.rand(32), group_index=torch.arange(32) // 8, backend=backend, out=first)
    with pytest.raises(TypeError, match="out must be a GroupAdvantages"):
        bandadv.group_advantages(torch.rand(32), 8, backend=backend, out=first.advantages)
