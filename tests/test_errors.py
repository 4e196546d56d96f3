"""Every bad input raises an error that names the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import bandadv
from bandadv import AdvantageConfig

R = torch.rand(12)


def ga(*args, **kwargs):
    return bandadv.group_advantages(*args, **kwargs)


BAD_CALLS = [
    ("not divisible", lambda b: ga(R, 5, backend=b), "divisible by group_size"),
    ("group_size 0", lambda b: ga(R, 0, backend=b), "group_size"),
    ("group_size negative", lambda b: ga(R, -4, backend=b), "group_size"),
    ("group_size float", lambda b: ga(R, 4.0, backend=b), "group_size"),
    ("no layout", lambda b: ga(R, backend=b), "group layout"),
    ("two layouts", lambda b: ga(R, 4, offsets=torch.tensor([0, 12]), backend=b), "group layout"),
    (
        "three layouts",
        lambda b: ga(R, 4, offsets=torch.tensor([0, 12]), group_index=torch.zeros(12, dtype=torch.long), backend=b),
        "group layout",
    ),
    ("float offsets", lambda b: ga(R, offsets=torch.tensor([0.0, 12.0]), backend=b), "offsets must be an integer"),
    ("offsets start", lambda b: ga(R, offsets=torch.tensor([1, 12]), backend=b), "offsets must start at 0"),
    ("offsets end", lambda b: ga(R, offsets=torch.tensor([0, 11]), backend=b), "offsets must end at N"),
    ("offsets decreasing", lambda b: ga(R, offsets=torch.tensor([0, 8, 4, 12]), backend=b), "non-decreasing"),
    ("offsets 2-D", lambda b: ga(R, offsets=torch.tensor([[0, 12]]), backend=b), "offsets"),
    ("success shape", lambda b: ga(R, 4, success=torch.ones(11, dtype=torch.bool), backend=b), "success"),
    ("success range", lambda b: ga(R, 4, success=torch.full((12,), 2.0), backend=b), "success must lie in [0, 1]"),
    ("valid shape", lambda b: ga(R, 4, valid=torch.ones(13, dtype=torch.bool), backend=b), "valid"),
    ("valid dtype", lambda b: ga(R, 4, valid=torch.ones(12), backend=b), "valid must be a bool"),
    ("prior shape", lambda b: ga(R, 4, prior=torch.rand(4), backend=b), "prior"),
    ("prior range", lambda b: ga(R, 4, prior=torch.tensor([0.1, 1.5, 0.2]), backend=b), "prior must lie in [0, 1]"),
    ("rewards 3-D", lambda b: ga(R.view(2, 3, 2), 2, backend=b), "rewards must be 1-D"),
    ("rewards 2-D mismatch", lambda b: ga(R.view(3, 4), 3, backend=b), "group_size must be 4"),
    ("rewards complex", lambda b: ga(R.to(torch.complex64), 4, backend=b), "rewards must be real"),
    ("band order", lambda b: ga(R, 4, band=(0.8, 0.2), backend=b), "band must satisfy"),
    ("band range", lambda b: ga(R, 4, band=(-0.1, 0.5), backend=b), "band must satisfy"),
    ("band length", lambda b: ga(R, 4, band=(0.1, 0.5, 0.9), backend=b), "band must be a pair"),
    ("eps negative", lambda b: ga(R, 4, eps=-1e-6, backend=b), "eps"),
    ("estimator", lambda b: ga(R, 4, estimator="ppo", backend=b), "estimator must be one of"),
    ("scale", lambda b: ga(R, 4, scale="global", backend=b), "scale must be one of"),
    (
        "scale for rloo",
        lambda b: ga(R, 4, estimator="rloo", scale="group", backend=b),
        "scale applies to estimator='grpo' only",
    ),
    ("preset", lambda b: ga(R, 4, preset="deepspeed", backend=b), "preset must be one of"),
    ("unknown option", lambda b: ga(R, 4, bandd=(0.1, 0.9), backend=b), "unknown option"),
    ("config and preset", lambda b: ga(R, 4, config=AdvantageConfig(), preset="trl", backend=b), "config or preset"),
    ("min_std negative", lambda b: ga(R, 4, min_std=-1.0, backend=b), "min_std"),
    ("accidental count", lambda b: ga(R, 4, accidental_max_successes=-1, backend=b), "accidental_max_successes"),
    ("accidental action", lambda b: ga(R, 4, accidental_action="drop", backend=b), "accidental_action"),
    ("backend", lambda b: ga(R, 4, backend="tpu"), "backend must be one of"),
    ("group_index dtype", lambda b: ga(R, group_index=torch.zeros(12), backend=b), "group_index must be an integer"),
    (
        "group_index shape",
        lambda b: ga(R, group_index=torch.zeros(11, dtype=torch.long), backend=b),
        "group_index must have shape",
    ),
]


@pytest.mark.parametrize("name,call,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises(backend, name, call, message):
    with pytest.raises((ValueError, RuntimeError)) as info:
        call(backend)
    assert message in str(info.value)


def _op(rewards, group_size=0, offsets=None, **kw):
    args = {**AdvantageConfig().op_kwargs(), "return_index": False, **kw}
    return torch.ops.bandadv.group_advantages.default(rewards, group_size, offsets, None, None, None, **args)


OP_BAD_CALLS = [
    ("offsets start", lambda: _op(R, offsets=torch.tensor([2, 12])), "offsets must start at 0"),
    ("offsets end", lambda: _op(R, offsets=torch.tensor([0, 13])), "offsets must end at N"),
    ("offsets decreasing", lambda: _op(R, offsets=torch.tensor([0, 9, 3, 12])), "non-decreasing"),
    ("no layout", lambda: _op(R), "group layout"),
    ("estimator", lambda: _op(R, 4, estimator="ppo"), "estimator"),
    ("band", lambda: _op(R, 4, band=[0.9, 0.1]), "band"),
    ("eps", lambda: _op(R, 4, eps=-1.0), "eps"),
]


@pytest.mark.parametrize("name,call,message", OP_BAD_CALLS, ids=[c[0] for c in OP_BAD_CALLS])
def test_op_checks_its_own_inputs(name, call, message):
    # The op called directly (as a trainer's compiled graph would) still refuses bad input.
    with pytest.raises((ValueError, RuntimeError)) as info:
        call()
    assert message in str(info.value)


def test_validate_false_skips_value_checks_only():
    # validate=False skips host reads of values but never shape checks.
    with pytest.raises(ValueError, match="success"):
        ga(R, 4, success=torch.ones(11, dtype=torch.bool), validate=False)
    out = ga(R, 4, prior=torch.tensor([0.1, 0.2, 0.3]), validate=False)
    assert out.advantages.shape == (12,)
