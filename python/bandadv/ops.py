"""Op registration: the schema, the fake (meta) kernels and the fallbacks.

Compiled kernels register themselves for the CPU and CUDA dispatch keys when bandadv._C
loads (csrc/). Where a key has no compiled kernel, the float64 reference is registered in its
place, so torch.ops.bandadv.group_advantages works on every device; COMPILED says which keys
have real kernels.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from .config import AdvantageConfig
from .reference import reference_group_advantages

GROUP_ADVANTAGES_SCHEMA = (
    "group_advantages(Tensor rewards, int group_size, Tensor? offsets, Tensor? success, Tensor? valid, "
    "Tensor? prior, str estimator, str scale, bool unbiased, float eps, str singleton, bool mask_all_equal, "
    "float[]? band, bool band_inclusive, float? min_std, int accidental_max_successes, "
    "float accidental_prior_max, str accidental_action, float accidental_clip, bool mask_too_few, "
    "bool return_index) -> (Tensor advantages, Tensor sample_mask, Tensor reason, Tensor group_mask, "
    "Tensor count, Tensor successes, Tensor mean, Tensor std, Tensor pass_rate, Tensor success_var, "
    "Tensor reward_var, Tensor num_kept, Tensor kept_index)"
)

_lib = torch.library.Library("bandadv", "DEF")
_lib.define(GROUP_ADVANTAGES_SCHEMA)


def built_for_torch(extension_path: str) -> str | None:
    """The torch version a compiled extension was built against, from the `.torch` file that
    setup.py writes beside it (None for a build without one)."""
    try:
        with open(extension_path + ".torch") as f:
            return f.read().strip()
    except OSError:
        return None


def _load_extension() -> str | None:
    """Loads bandadv._C, whose loading registers the compiled kernels; returns why not, or None.
    A build made for another torch is not loaded at all: torch's C++ ABI changes between
    releases, so it would fail on a missing symbol at best and miscompute at worst."""
    spec = importlib.util.find_spec("bandadv._C")
    if spec is None or spec.origin is None:
        return "bandadv._C is not built"
    built_for = built_for_torch(spec.origin)
    if built_for is not None and built_for != torch.__version__:
        return f"bandadv._C was built for torch {built_for}, but torch {torch.__version__} is installed"
    try:
        from . import _C  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


TRITON_AVAILABLE: bool = importlib.util.find_spec("triton") is not None

EXTENSION_ERROR: str | None = _load_extension()
if EXTENSION_ERROR is not None:  # the package still works, on the reference (and Triton for CUDA tensors)
    warnings.warn(
        f"bandadv: compiled kernels not available ({EXTENSION_ERROR}); using the float64 torch reference"
        + (" on CPU tensors and the Triton kernel on CUDA tensors" if TRITON_AVAILABLE else "")
        + ". Rebuild for this torch: pip install -e . --no-build-isolation",
        stacklevel=2,
    )


def _has_kernel(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("bandadv::group_advantages", key)


COMPILED: frozenset[str] = frozenset(key for key in ("CPU", "CUDA") if _has_kernel(key))


def check_inputs(rewards, group_size, offsets, success, valid, prior) -> None:
    """Shape, dtype and device checks of the op's tensors (no host sync); the compiled kernels
    make the same checks in csrc/op_common.h."""

    def fail(message: str) -> None:
        raise ValueError(f"bandadv.group_advantages: {message}")

    def integer(t: torch.Tensor) -> bool:
        return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)

    if rewards.dim() != 1:
        fail(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if rewards.is_complex():
        fail(f"rewards must be real, got {rewards.dtype}")
    n = rewards.shape[0]
    if group_size < 0:
        fail(f"group_size must be >= 1, got {group_size}")
    if (group_size > 0) == (offsets is not None):
        fail("give exactly one group layout: group_size >= 1 or offsets")
    if group_size > 0 and n % group_size:
        fail(f"rewards has {n} samples, which is not divisible by group_size={group_size}")
    num_groups = n // group_size if group_size > 0 else None
    if offsets is not None:
        if not integer(offsets):
            fail(f"offsets must be an integer tensor, got {offsets.dtype}")
        if offsets.dim() != 1 or offsets.shape[0] < 1:
            fail(f"offsets must be 1-D [num_groups + 1] with at least one entry, got shape {tuple(offsets.shape)}")
        num_groups = offsets.shape[0] - 1
    for name, t in (("offsets", offsets), ("success", success), ("valid", valid), ("prior", prior)):
        if t is not None and t.device != rewards.device:
            fail(f"{name} is on {t.device} but rewards is on {rewards.device}")
    for name, t in (("success", success), ("valid", valid)):
        if t is not None and (t.dim() != 1 or t.shape[0] != n):
            fail(f"{name} must have shape [{n}] like rewards, got {tuple(t.shape)}")
    if success is not None and success.is_complex():
        fail(f"success must be bool or real, got {success.dtype}")
    if valid is not None and valid.dtype != torch.bool:
        fail(f"valid must be a bool tensor, got {valid.dtype}")
    if prior is not None:
        if prior.dim() != 1 or prior.shape[0] != num_groups:
            fail(f"prior must have shape [num_groups] = [{num_groups}], got {tuple(prior.shape)}")
        if not prior.is_floating_point():
            fail(f"prior must be a floating tensor, got {prior.dtype}")


def _reference_op(
    rewards, group_size, offsets, success, valid, prior, estimator, scale, unbiased, eps, singleton,
    mask_all_equal, band, band_inclusive, min_std, accidental_max_successes, accidental_prior_max,
    accidental_action, accidental_clip, mask_too_few, return_index,
):  # fmt: skip
    """The reference with the op's signature and output dtypes."""
    check_inputs(rewards, group_size, offsets, success, valid, prior)
    config = AdvantageConfig(
        estimator=estimator, scale=scale, unbiased=unbiased, eps=eps, singleton=singleton,
        mask_all_equal=mask_all_equal, band=tuple(band) if band is not None else None,
        band_inclusive=band_inclusive, min_std=min_std, accidental_max_successes=accidental_max_successes,
        accidental_prior_max=accidental_prior_max, accidental_action=accidental_action,
        accidental_clip=accidental_clip, mask_too_few=mask_too_few,
    )  # fmt: skip
    out = reference_group_advantages(
        rewards, group_size=group_size or None, offsets=offsets, success=success, valid=valid, prior=prior,
        config=config, return_index=return_index,
    )  # fmt: skip
    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    st = out.stats
    kept_index = out.kept_index if return_index else torch.empty(0, dtype=torch.int64, device=rewards.device)
    return (
        out.advantages.to(acc), out.sample_mask, out.reason, out.group_mask, st.count, st.successes.to(acc),
        st.mean.to(acc), st.std.to(acc), st.pass_rate.to(acc), st.success_var.to(acc), st.reward_var.to(acc),
        out.num_kept, kept_index,
    )  # fmt: skip


for _key in ("CPU", "CUDA"):
    if _key not in COMPILED:
        _lib.impl("group_advantages", _reference_op, _key)


@torch.library.register_fake("bandadv::group_advantages")
def _group_advantages_fake(
    rewards, group_size, offsets, success, valid, prior, estimator, scale, unbiased, eps, singleton,
    mask_all_equal, band, band_inclusive, min_std, accidental_max_successes, accidental_prior_max,
    accidental_action, accidental_clip, mask_too_few, return_index,
):  # fmt: skip
    torch._check(rewards.dim() == 1, lambda: f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if group_size > 0:
        torch._check(n % group_size == 0, lambda: f"N={n} is not divisible by group_size={group_size}")
        num_groups = n // group_size
    else:
        torch._check(offsets is not None, lambda: "give a group layout: group_size >= 1 or offsets")
        num_groups = offsets.shape[0] - 1
    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    per_sample = rewards.new_empty(n, dtype=acc)
    per_group = rewards.new_empty(num_groups, dtype=acc)
    return (
        per_sample,
        rewards.new_empty(n, dtype=torch.bool),
        rewards.new_empty(num_groups, dtype=torch.int32),
        rewards.new_empty(num_groups, dtype=torch.bool),
        rewards.new_empty(num_groups, dtype=torch.int32),
        per_group,
        per_group.clone(),
        per_group.clone(),
        per_group.clone(),
        per_group.clone(),
        per_group.clone(),
        rewards.new_empty((), dtype=torch.int64),
        rewards.new_empty(n if return_index else 0, dtype=torch.int64),
    )


# --- Triton --------------------------------------------------------------------------------


def triton_available() -> bool:
    return TRITON_AVAILABLE


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _register_triton_op() -> None:
    """bandadv::group_advantages_triton, a triton_op so that torch.compile traces into it. Its
    schema is inferred from the annotations (torch before 2.15 ignores triton_op's schema=), and
    triton_op registers the function itself as the fake kernel."""
    from .triton_kernels.group_advantage import group_advantages_triton

    @torch.library.triton_op("bandadv::group_advantages_triton", mutates_args=())
    def _group_advantages_triton(
        rewards: torch.Tensor, group_size: int, offsets: torch.Tensor | None, success: torch.Tensor | None, valid: torch.Tensor | None,
        prior: torch.Tensor | None, estimator: str, scale: str, unbiased: bool, eps: float, singleton: str,
        mask_all_equal: bool, band: list[float] | None, band_inclusive: bool, min_std: float | None,
        accidental_max_successes: int, accidental_prior_max: float, accidental_action: str, accidental_clip: float,
        mask_too_few: bool, return_index: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        return group_advantages_triton(
            rewards, group_size, offsets, success, valid, prior, estimator, scale, unbiased, eps, singleton,
            mask_all_equal, band, band_inclusive, min_std, accidental_max_successes, accidental_prior_max,
            accidental_action, accidental_clip, mask_too_few, return_index, wrap=torch.library.wrap_triton,
        )  # fmt: skip


# Registered at import where it can run (a GPU, no interpreter), so that no registration
# happens while torch.compile traces a call.
TRITON_OP_REGISTERED = False
TRITON_OP_ERROR: str | None = None
if TRITON_AVAILABLE and not triton_interpreting() and torch.cuda.is_available():
    try:
        _register_triton_op()
        TRITON_OP_REGISTERED = True
    except Exception as error:  # an older torch or triton: the kernel still runs, called directly
        TRITON_OP_ERROR = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"bandadv: could not register the Triton kernel as a torch op ({TRITON_OP_ERROR}); backend='triton' "
            "calls it directly, so torch.compile cannot trace into it",
            stacklevel=2,
        )


def group_advantages_op(
    rewards: torch.Tensor,
    *,
    group_size: int = 0,
    offsets: torch.Tensor | None = None,
    success: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
    config: AdvantageConfig,
    return_index: bool = False,
    triton: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Calls the op with a config's options: torch.ops.bandadv.group_advantages (the compiled
    kernel of the tensor's device), or with triton=True the Triton kernel,
    torch.ops.bandadv.group_advantages_triton on CUDA tensors and the kernel itself under the CPU
    interpreter (triton_op rejects interpreted kernels)."""
    args = (rewards, group_size, offsets, success, valid, prior, *config.op_args(), return_index)
    if not triton:
        return torch.ops.bandadv.group_advantages.default(*args)
    if rewards.device.type == "cuda" and TRITON_OP_REGISTERED:
        return torch.ops.bandadv.group_advantages_triton.default(*args)
    if TRITON_AVAILABLE and (rewards.device.type == "cuda" or triton_interpreting()):
        from .triton_kernels.group_advantage import group_advantages_triton

        return group_advantages_triton(*args)
    if not TRITON_AVAILABLE:
        raise RuntimeError("backend='triton' needs the triton package")
    raise ValueError(
        f"backend='triton' needs CUDA tensors, got {rewards.device}; set TRITON_INTERPRET=1 before "
        "triton is imported to run the Triton kernel on the CPU interpreter"
    )
