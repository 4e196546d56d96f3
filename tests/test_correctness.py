"""Every backend built here against the float64 reference, on fresh random inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bandadv
from bandadv import AdvantageConfig
from conftest import assert_matches_reference, make_offsets, random_rewards, run_both

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# Sizes around the 1024-sample chunk of the CPU kernel and the warp/block cut-offs of the GPU ones.
GROUP_SIZES = [1, 2, 3, 7, 16, 31, 32, 33, 64, 127, 512, 1023, 1024, 1025, 2048, 4096]


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("kind", ["binary", "continuous", "offset"])
def test_fixed_groups(backend, group_size, kind):
    gen = torch.Generator().manual_seed(group_size * 31 + len(kind))
    num_groups = max(1, 4096 // group_size) if group_size > 1 else 64
    rewards = random_rewards(num_groups * group_size, kind, gen)
    rewards[torch.rand(rewards.shape, generator=gen) < 0.05] = float("nan")
    out, ref = run_both(rewards, backend=backend, config=AdvantageConfig(band=(0.1, 0.9)), group_size=group_size)
    assert_matches_reference(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "estimator,scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"), ("dr_grpo", None), ("rloo", None)]
)
def test_dtypes_and_estimators(backend, dtype, estimator, scale):
    gen = torch.Generator().manual_seed(7)
    sizes = torch.randint(0, 40, (200,), generator=gen).tolist()
    rewards = random_rewards(sum(sizes), "ternary", gen, dtype)
    valid = torch.rand(rewards.shape, generator=gen) > 0.1
    config = AdvantageConfig(estimator=estimator, scale=scale, mask_all_equal=False, mask_too_few=False)
    out, ref = run_both(rewards, backend=backend, config=config, offsets=make_offsets(sizes), valid=valid)
    assert_matches_reference(out, ref)
    assert out.stats.mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_accidental_success_rule_with_prior_and_clip(backend):
    gen = torch.Generator().manual_seed(3)
    num_groups, g = 300, 16
    hits = torch.randint(0, 4, (num_groups,), generator=gen)
    rewards = (torch.arange(g).expand(num_groups, g) < hits[:, None]).float().flatten()
    prior = torch.rand(num_groups, generator=gen) * 0.3
    prior[::7] = float("nan")
    for action in ("mask", "clip"):
        config = AdvantageConfig(
            accidental_max_successes=1, accidental_prior_max=0.15, accidental_action=action, accidental_clip=0.5
        )
        out, ref = run_both(rewards, backend=backend, config=config, group_size=g, prior=prior)
        assert_matches_reference(out, ref)
        one_hit = hits == 1
        flagged = (out.reason & 16) != 0
        expected = one_hit & (torch.isnan(prior) | (prior < 0.15))
        assert torch.equal(flagged, expected)
        if action == "clip":
            in_flagged = flagged.repeat_interleave(g)
            assert float(out.advantages[in_flagged].max()) <= 0.5 + 1e-6
            assert float(out.advantages[~in_flagged].max()) > 3.0  # unflagged lone hits keep sqrt(15)
            assert torch.equal(out.group_mask, ((out.reason & ~16) == 0))


def test_group_of_4096_with_large_offset_keeps_advantages_accurate(backend):
    # Naive E[x^2] - E[x]^2 in float32 loses every digit of the std here (ulp(1e8) = 8); the
    # corrected two-pass keeps it. Advantages carry float32's own floor: ulp(1e4) / std ~ 1e-3.
    gen = torch.Generator().manual_seed(11)
    rewards = (1e4 + torch.randn(4 * 4096, generator=gen, dtype=torch.float64)).float()
    out, ref = run_both(rewards, backend=backend, config=AdvantageConfig(), group_size=4096)
    torch.testing.assert_close(out.advantages.double(), ref.advantages, rtol=0, atol=8e-3)
    torch.testing.assert_close(out.stats.std.double(), ref.stats.std, rtol=1e-3, atol=0)


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_short_and_long_groups_interleaved(backend, scale):
    # The CPU kernel stages short groups in tiles (64 groups, 4096 samples) and runs groups
    # over 1024 samples alone: cross every boundary, with empty and lone groups in between.
    sizes = [3] * 70 + [1500] + [1000] * 5 + [0, 1] * 40 + [1024, 1025, 7] + [16] * 130 + [4096]
    gen = torch.Generator().manual_seed(5)
    rewards = random_rewards(sum(sizes), "ternary", gen)
    rewards[torch.rand(rewards.shape, generator=gen) < 0.03] = float("nan")
    config = AdvantageConfig(scale=scale, band=(0.05, 0.95))
    out, ref = run_both(rewards, backend=backend, config=config, offsets=make_offsets(sizes))
    assert_matches_reference(out, ref)


def _config_strategy():
    return st.builds(
        AdvantageConfig,
        estimator=st.sampled_from(["grpo", "dr_grpo", "rloo"]),
        unbiased=st.booleans(),
        eps=st.sampled_from([0.0, 1e-9, 1e-6, 1e-4]),
        singleton=st.sampled_from(["zero", "raw"]),
        mask_all_equal=st.booleans(),
        band=st.one_of(st.none(), st.sampled_from([(0.0, 1.0), (0.1, 0.9), (0.25, 0.75), (0.5, 0.5), (0.0, 0.2)])),
        band_inclusive=st.booleans(),
        min_std=st.one_of(st.none(), st.sampled_from([0.0, 0.05, 0.3])),
        accidental_max_successes=st.integers(0, 3),
        accidental_prior_max=st.sampled_from([0.05, 0.2]),
        accidental_action=st.sampled_from(["mask", "clip"]),
        accidental_clip=st.sampled_from([0.0, 0.5, 2.0]),
        mask_too_few=st.booleans(),
    )


@st.composite
def cases(draw, ragged: bool | None = None, many_groups: bool = False):
    config = draw(_config_strategy())
    if config.estimator == "grpo":
        config = dataclasses.replace(config, scale=draw(st.sampled_from(["group", "batch", "none"])))
    if ragged is None:
        ragged = draw(st.booleans())
    if ragged:
        sizes = draw(st.lists(st.integers(0, 12) | st.integers(13, 1100), min_size=0, max_size=30))
        layout = {"offsets": make_offsets(sizes)}
        n, num_groups = sum(sizes), len(sizes)
    else:
        g = draw(st.integers(1, 40) | st.sampled_from([1024, 1030] + ([8, 16, 32, 64, 128] if many_groups else [])))
        # many_groups: past the CPU kernel's tiles (64 groups of 16, 32 of 128, 4 of 1024)
        num_groups = draw(st.integers(0, 8 if g > 128 else (150 if many_groups else 40)))
        layout = {"group_size": g}
        n = g * num_groups
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["binary", "ternary", "continuous", "two_values"]))
    dtype = draw(st.sampled_from(DTYPES))
    rewards = random_rewards(n, kind, gen, torch.float64)
    bad = torch.rand(n, generator=gen) < draw(st.sampled_from([0.0, 0.1, 0.5]))
    rewards[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)[
        torch.randint(0, 3, (n,), generator=gen)
    ][bad]
    rewards = rewards.to(dtype)
    extras = {}
    if draw(st.booleans()):
        extras["valid"] = torch.rand(n, generator=gen) > 0.2
    success_kind = draw(st.sampled_from(["default", "bool", "dyadic"]))
    if success_kind == "bool":
        extras["success"] = torch.rand(n, generator=gen) < 0.4
    elif success_kind == "dyadic":  # partial credit in quarters: sums stay exact in float32
        extras["success"] = torch.randint(0, 5, (n,), generator=gen).to(dtype) / 4
    if draw(st.booleans()):
        prior = torch.rand(num_groups, generator=gen)
        prior[torch.rand(num_groups, generator=gen) < 0.2] = float("nan")
        extras["prior"] = prior
    return rewards, layout, extras, config


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
@pytest.mark.parametrize("backend_name", ["cpu", "triton", "torch"])
def test_property_matches_reference(backend_name, case):
    from conftest import BACKENDS

    if backend_name not in BACKENDS:
        pytest.skip(f"backend {backend_name} not built")
    rewards, layout, extras, config = case
    out, ref = run_both(rewards, backend=backend_name, config=config, **layout, **extras)
    assert_matches_reference(out, ref)
    # Invariants that hold whatever the options.
    assert not torch.isnan(out.advantages).any()
    assert torch.all(out.advantages[~out.sample_mask] == 0)
    assert torch.all(out.stats.count >= 0)


@pytest.mark.skipif("CPU" not in bandadv.ops.COMPILED, reason="the CPU kernel was not built")
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(ragged=False, many_groups=True))
def test_cpu_fixed_groups_are_bit_for_bit_the_same_groups_as_offsets(case):
    # The CPU kernel sweeps groups of one size that is whole vectors (uniform_tile) in its own
    # loops, and any other layout group by group; both must make every sum in the same order.
    rewards, layout, extras, config = case
    g = layout["group_size"]
    offsets = torch.arange(0, rewards.shape[0] + 1, g, dtype=torch.int64)
    fixed = bandadv.group_advantages(rewards, g, config=config, backend="cpu", return_index=True, **extras)
    ragged = bandadv.group_advantages(
        rewards, offsets=offsets, config=config, backend="cpu", return_index=True, **extras
    )
    for name, a, b in zip(fixed._fields, fixed, ragged, strict=True):
        for x, y in zip(a, b, strict=True) if name == "stats" else [(a, b)]:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), name  # bits


@pytest.mark.skipif("CPU" not in bandadv.ops.COMPILED, reason="the CPU kernel was not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("group_size", [8, 16, 24])
def test_cpu_clean_and_flagged_tiles_are_the_same_bits(group_size, dtype):
    # A tile of groups whose samples are all valid takes a shorter path in the CPU kernel than a
    # tile with one invalid sample (or whose sums overflow): the groups they share must come out
    # the same, bit for bit.
    gen = torch.Generator().manual_seed(group_size)
    n = 200 * group_size  # tiles of up to 64 groups: the NaN below leaves the later tiles clean
    rewards = random_rewards(n, "continuous", gen, dtype)
    success = torch.rand(n, generator=gen)
    config = AdvantageConfig(band=(0.05, 0.95), accidental_max_successes=1)
    flagged_rewards, flagged_success = rewards.clone(), success.clone()
    flagged_rewards[3] = float("nan")  # group 0: its tile now stages flags
    flagged_success[group_size * 70 + 1] = float("nan")  # a group of the second tile
    for kwargs, flagged in [
        (dict(), dict(rewards=flagged_rewards)),
        (dict(success=success), dict(rewards=rewards, success=flagged_success)),
        (dict(valid=torch.ones(n, dtype=torch.bool)), dict(rewards=rewards, valid=torch.arange(n) != 5)),
    ]:
        clean = bandadv.group_advantages(rewards, group_size, config=config, backend="cpu", **kwargs)
        other = bandadv.group_advantages(group_size=group_size, config=config, backend="cpu", **{**kwargs, **flagged})
        # every group but the two that differ
        same = torch.ones(200, dtype=torch.bool)
        same[[0, 70]] = False
        per_sample = same.repeat_interleave(group_size)
        for a, b, keep in [
            (clean.advantages, other.advantages, per_sample),
            (clean.sample_mask, other.sample_mask, per_sample),
            (clean.reason, other.reason, same),
            (clean.stats.values, other.stats.values, same),
        ]:
            assert torch.equal(a[..., keep].contiguous().view(torch.uint8), b[..., keep].contiguous().view(torch.uint8))
    # Sums that overflow: the group's tile goes the flagged way, with the results of the general path.
    big = rewards.clone()
    big[group_size * 9 : group_size * 10] = torch.finfo(dtype).max / 2
    big[group_size * 9] = -torch.finfo(dtype).max / 3
    fixed = bandadv.group_advantages(big, group_size, config=config, backend="cpu")
    offsets = torch.arange(0, n + 1, group_size)
    ragged = bandadv.group_advantages(big, offsets=offsets, config=config, backend="cpu")
    for a, b in [(fixed.advantages, ragged.advantages), (fixed.stats.values, ragged.stats.values)]:
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    assert not torch.isfinite(fixed.stats.mean[9])  # the sum did overflow


def _near(bound: float, dtype: torch.dtype, steps: int = 3) -> list[float]:
    """bound in dtype and the values of dtype up to `steps` either side of it."""
    x = torch.tensor(bound, dtype=dtype)
    out, up, down = [x], x, x
    for _ in range(steps):
        up, down = torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)
        out += [up, down]
    return [float(v) for v in out]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([8, 16, 24]),
    st.sampled_from([torch.float32, torch.float64]),
    st.booleans(),
    st.tuples(*[st.one_of(st.integers(0, 48).map(lambda i: i / 48), st.floats(0, 1))] * 2),
    st.floats(0, 1),
)
def test_cpu_band_from_success_counts_is_the_pass_rates(group_size, dtype, inclusive, bounds, prior_max):
    # In a tile of groups whose samples are all valid, the CPU kernel decides the band from each
    # group's success count against two thresholds found once per call, and the accidental rule
    # from the prior against a bound rounded to the dtype; elsewhere it computes k / n in double
    # and compares the prior in double. Success counts and priors at and around the bounds must
    # get the same reasons both ways (the same sums: see the test above).
    lo, hi = sorted(bounds)
    counts = sorted({*_near(lo * group_size, dtype), *_near(hi * group_size, dtype), *range(group_size + 1)})
    counts = [k for k in counts if 0 <= k <= group_size]
    num_groups = len(counts) + 1  # and a group to flag, the last
    success = torch.zeros(num_groups, group_size, dtype=dtype)
    for g, k in enumerate(counts):  # k as whole successes and one part
        whole = min(int(k), group_size - 1)
        success[g, :whole] = 1
        success[g, whole] = k - whole
    gen = torch.Generator().manual_seed(group_size)
    rewards = torch.randn(num_groups * group_size, generator=gen, dtype=torch.float64).to(dtype)
    priors = [p for p in _near(prior_max, dtype) if 0 <= p <= 1]
    prior = torch.tensor([priors[g % len(priors)] for g in range(num_groups)], dtype=dtype)
    config = AdvantageConfig(
        band=(lo, hi), band_inclusive=inclusive, accidental_max_successes=group_size, accidental_prior_max=prior_max
    )
    flagged = rewards.clone()
    flagged[-1] = float("nan")  # the last group's tile (all of them: fewer than 64 groups) is flagged
    clean, other = (
        bandadv.group_advantages(r, group_size, success=success.view(-1), prior=prior, config=config, backend="cpu")
        for r in (rewards, flagged)
    )
    assert torch.equal(clean.stats.successes[:-1], other.stats.successes[:-1])
    assert torch.equal(clean.reason[:-1], other.reason[:-1])
    # and the prior is compared as a float64 would be: 1..G hits on a prompt whose prior < max
    k = clean.stats.successes.double()
    accidental = (k >= 1) & (k <= group_size) & (prior.double() < prior_max)
    assert torch.equal((clean.reason & int(bandadv.Reason.ACCIDENTAL_SUCCESS)) != 0, accidental)


def test_low_std_ties_classify_alike_on_every_backend(backend):
    # One hit in ten has population std exactly 0.3; float32 backends land on either side of it,
    # so min_std is compared with a small relative slack everywhere (found by hypothesis).
    rewards = (torch.arange(10) < torch.arange(1, 9)[:, None]).float().flatten()  # 1..8 hits of 10
    out = bandadv.group_advantages(rewards, 10, unbiased=False, min_std=0.3, mask_all_equal=False, backend=backend)
    std = torch.sqrt(torch.arange(1, 9) / 10 * (1 - torch.arange(1, 9) / 10))
    assert ((out.reason & int(bandadv.Reason.LOW_STD)) != 0).tolist() == (std <= 0.3 + 1e-9).tolist()


@pytest.mark.parametrize("group_size", [2, 3, 7, 13, 16, 33, 1023, 1030])
def test_all_equal_groups_of_any_value_are_masked(backend, group_size):
    # The float32 mean of n copies of v need not round back to v (7 copies of 0.7242819...), so
    # the all-equal test must compare the values themselves, never the mean (found on the CPU).
    gen = torch.Generator().manual_seed(group_size)
    values = torch.rand(64, generator=gen) * 10
    values[::9] = -values[::9]
    rewards = values.repeat_interleave(group_size)
    if group_size > 2:
        rewards[1 :: 5 * group_size] = float("nan")  # a NaN in some groups leaves the rest equal
    out = bandadv.group_advantages(rewards, group_size, backend=backend)
    assert ((out.reason & int(bandadv.Reason.ALL_EQUAL)) != 0).all(), out.reason
    assert not out.group_mask.any()
    assert torch.equal(out.stats.mean, values)
    assert (out.advantages == 0).all() and int(out.num_kept) == 0


@pytest.mark.skipif("CPU" not in bandadv.ops.COMPILED, reason="the CPU kernel was not built")
@pytest.mark.parametrize("group_size", [16, 12, 7])  # uniform tiles with AVX2 / with SSE2 only / neither
def test_cpu_outputs_past_the_caches_are_the_same_bits(group_size):
    # Past 8 MB of advantages the CPU kernel writes advantages and masks with streaming stores
    # (where the buffer is 16-byte aligned); each half of the batch alone stays under that.
    gen = torch.Generator().manual_seed(group_size)
    n = group_size * ((3 << 20) // group_size)  # 12 MB of float32 advantages
    rewards = random_rewards(n, "ternary", gen)
    rewards[torch.rand(n, generator=gen) < 0.01] = float("nan")
    config = AdvantageConfig(band=(0.1, 0.9), accidental_max_successes=1)
    whole = bandadv.group_advantages(rewards, group_size, config=config, backend="cpu")
    half = n // group_size // 2 * group_size
    parts = [bandadv.group_advantages(r, group_size, config=config, backend="cpu") for r in rewards.split(half)]
    for name in ("advantages", "sample_mask", "reason", "group_mask"):
        expected = torch.cat([getattr(p, name) for p in parts])
        assert torch.equal(getattr(whole, name).view(torch.uint8), expected.view(torch.uint8)), name
    # out= buffers one element off 16-byte alignment take the ordinary stores, to the same bits.
    storage = torch.empty(n + 1)
    out = whole._replace(advantages=storage[1:], sample_mask=torch.empty(n, dtype=torch.bool))
    again = bandadv.group_advantages(rewards, group_size, config=config, backend="cpu", out=out)
    assert again.advantages.data_ptr() % 16 != 0
    assert torch.equal(again.advantages.view(torch.uint8), whole.advantages.view(torch.uint8))
    assert torch.equal(again.sample_mask, whole.sample_mask)
