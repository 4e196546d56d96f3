"""Op registration: the schema, the fake (meta) kernels and the fallbacks.

Compiled kernels register themselves for the CPU and CUDA dispatch keys when bandadv._C
loads (csrc/). Where a key has no compiled kernel, the float64 reference is registered in its
place, so torch.ops.bandadv.group_advantages works on every device; COMPILED says which keys
have real kernels.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import warnings
from typing import Any

import torch

from .config import OP_DEFAULTS, OPTION_NAMES, AdvantageConfig
from .reference import reference_group_advantages
from .types import STAT_NAMES, GroupAdvantages, GroupStats

# The op's interface, written once. The C++ kernels read their arguments from it by name
# (csrc/op_entry.h); the fake, the reference op and the Triton op bind theirs by name through
# bind(), which fills in the defaults. The options are keyword-only, with AdvantageConfig's
# defaults (check_interface holds their names, order and defaults to AdvantageConfig at import),
# so a call through torch.ops passes only the options it changes: each argument passed from
# Python costs such a call about a microsecond's tenth (torch checks it for __torch_function__
# and converts it). Eager calls from the public function go through bandadv._C's entry instead
# (ENTRY below), which takes the options as one tuple in this order.
GROUP_ADVANTAGES_SCHEMA = (
    "group_advantages(Tensor rewards, int group_size=0, Tensor? offsets=None, Tensor? success=None, "
    'Tensor? valid=None, Tensor? prior=None, *, str estimator="grpo", str scale="group", bool unbiased=True, '
    'float eps=1e-06, str singleton="zero", bool mask_all_equal=True, float[]? band=None, bool band_inclusive=True, '
    "float? min_std=None, int accidental_max_successes=0, float accidental_prior_max=0.1, "
    'str accidental_action="mask", float accidental_clip=1.0, bool mask_too_few=True, bool return_index=False) '
    "-> (Tensor advantages, Tensor sample_mask, Tensor reason, Tensor group_mask, Tensor count, "
    "Tensor group_stats, Tensor num_kept, Tensor kept_index)"
)
# The arguments before and after the options.
INPUT_NAMES = ("rewards", "group_size", "offsets", "success", "valid", "prior")
TRAILING_NAMES = ("return_index",)


def check_interface(schema: str, option_names: tuple[str, ...], option_defaults: dict[str, Any]) -> tuple[str, ...]:
    """The schema's argument names, after checking that its options are option_names in order
    (AdvantageConfig's fields), keyword-only, with option_defaults as their defaults (the values
    AdvantageConfig.op_changes() leaves out of a call)."""
    arguments = torch._C.parse_schema(schema).arguments
    names = tuple(a.name for a in arguments)
    expected = (*INPUT_NAMES, *option_names, *TRAILING_NAMES)
    if names != expected:
        wrong = [
            f"{i}: schema {a!r}, expected {b!r}"
            for i, (a, b) in enumerate(zip(names, expected, strict=False))
            if a != b
        ]
        raise RuntimeError(
            "bandadv: the schema of group_advantages does not match AdvantageConfig's options "
            f"({len(names)} arguments, {len(expected)} expected; {', '.join(wrong) or 'lengths differ'})"
        )
    for a in arguments[len(INPUT_NAMES) :]:
        default = option_defaults.get(a.name, False)  # return_index: False
        if not a.kwarg_only or a.default_value != default or type(a.default_value) is not type(default):
            raise RuntimeError(
                f"bandadv: option {a.name!r} of the group_advantages schema must be keyword-only with default "
                f"{default!r} (AdvantageConfig's), got {'keyword-only' if a.kwarg_only else 'positional'} with "
                f"default {a.default_value!r}"
            )
    return names


def out_schema(schema: str) -> str:
    """The out= overload of a functional schema: the same arguments, then each output as a
    keyword argument written in place. It returns nothing, as torch.compile needs of a custom
    op that mutates its arguments."""
    name, rest = schema.split("(", 1)
    arguments, _ = rest.split(") -> ", 1)
    parsed = torch._C.parse_schema(schema)
    outputs = [r.name for r in parsed.returns]
    written = [f"Tensor({chr(ord('a') + i)}!) {output}" for i, output in enumerate(outputs)]
    keyword_only = "" if any(a.kwarg_only for a in parsed.arguments) else "*, "
    return f"{name}.out({arguments}, {keyword_only}{', '.join(written)}) -> ()"


ARG_NAMES: tuple[str, ...] = check_interface(GROUP_ADVANTAGES_SCHEMA, OPTION_NAMES, OP_DEFAULTS)
_SCHEMA = torch._C.parse_schema(GROUP_ADVANTAGES_SCHEMA)
ARG_DEFAULTS: dict[str, Any] = {a.name: a.default_value for a in _SCHEMA.arguments if a.name != "rewards"}
OUTPUT_NAMES: tuple[str, ...] = tuple(r.name for r in _SCHEMA.returns)
GROUP_ADVANTAGES_OUT_SCHEMA = out_schema(GROUP_ADVANTAGES_SCHEMA)

_lib = torch.library.Library("bandadv", "DEF")
_lib.define(GROUP_ADVANTAGES_SCHEMA)
_lib.define(GROUP_ADVANTAGES_OUT_SCHEMA)
_OP = torch.ops.bandadv.group_advantages  # its overloads, .default and .out
# What calling _OP.default runs: OpOverload.__call__ only forwards to this bound C++ function (an
# op defined and implemented in C++ has no Python dispatcher of its own), a Python frame and a
# re-pack of the arguments (~0.3 us, on a call of ~6) that eager calls skip. torch.compile traces
# _OP.default itself.
_OP_EAGER = _OP.default._op


def bind(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The op's arguments by name, however they were passed, with the schema's defaults for the
    ones left out (torch leaves them out when it calls a Python kernel of the op)."""
    return {**ARG_DEFAULTS, **dict(zip(ARG_NAMES, args, strict=False)), **kwargs}


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
# The eager entry of the compiled extension (csrc/python_entry.cpp): the op through the
# dispatcher, with the options as one tuple (AdvantageConfig.op_options()) instead of torch.ops'
# per-argument handling, and the out= overload's outputs as a tuple after them. It returns the
# GroupAdvantages itself (None with out=), or NotImplemented where torch.ops must take the call
# (__torch_function__ of a tensor subclass or a mode). The public function calls it in eager
# mode, and group_advantages_op otherwise.
ENTRY = None
if EXTENSION_ERROR is None:
    from . import _C

    _C.set_result_types(GroupAdvantages, GroupStats)  # which checks their fields against its own
    ENTRY = _C.group_advantages
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
# backend="auto" runs CUDA tensors on the Triton kernel where no CUDA kernel was compiled.
TRITON_FOR_CUDA: bool = "CUDA" not in COMPILED and TRITON_AVAILABLE


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


def check_offsets(offsets: torch.Tensor, num_samples: int) -> None:
    """The values of a checked offsets tensor (1-D, integer, at least one entry): a host read."""
    first, last, min_step = torch.stack(
        [offsets[0], offsets[-1], offsets.diff().min() if offsets.numel() > 1 else offsets[0] * 0]
    ).tolist()
    if first != 0:
        raise ValueError(f"bandadv.group_advantages: offsets must start at 0, got {first}")
    if last != num_samples:
        raise ValueError(
            f"bandadv.group_advantages: offsets must end at N = {num_samples} (the number of rewards), got {last}"
        )
    if min_step < 0:
        raise ValueError("bandadv.group_advantages: offsets must be non-decreasing")


def op_outputs(out: GroupAdvantages, rewards: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A result as the op's outputs (OUTPUT_NAMES), in the dtypes the kernels return."""
    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    kept_index = out.kept_index if out.kept_index is not None else rewards.new_empty(0, dtype=torch.int64)
    return (
        out.advantages.to(acc), out.sample_mask, out.reason, out.group_mask, out.stats.count,
        out.stats.values.to(acc), out.num_kept, kept_index,
    )  # fmt: skip


def output_specs(a: dict[str, Any]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each output (OUTPUT_NAMES) of a call with arguments `a` (csrc/op_common.h,
    output_specs)."""
    rewards, group_size, offsets = a["rewards"], a["group_size"], a["offsets"]
    n = rewards.shape[0]
    g = n // group_size if group_size > 0 else offsets.shape[0] - 1
    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    index = n if a["return_index"] else 0
    return [
        ((n,), acc), ((n,), torch.bool), ((g,), torch.int32), ((g,), torch.bool), ((g,), torch.int32),
        ((len(STAT_NAMES), g), acc), ((), torch.int64), ((index,), torch.int64),
    ]  # fmt: skip


def check_out(out: tuple[torch.Tensor, ...], a: dict[str, Any]) -> None:
    """The caller's buffers of the out= form, against what a call with arguments `a` makes
    (csrc/op_common.h, check_outputs)."""
    device = a["rewards"].device
    for name, t, (shape, dtype) in zip(OUTPUT_NAMES, out, output_specs(a), strict=True):
        if t.shape != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
            raise ValueError(
                f"bandadv.group_advantages: out {name} must be a contiguous {dtype} tensor of shape "
                f"{list(shape)} on {device} (from a call with the same inputs' shapes), got {t.dtype} "
                f"{list(t.shape)} on {t.device}"
            )


def _reference_op(*args, **kwargs):
    """The float64 reference as a kernel of the op (where no compiled kernel is registered)."""
    a = bind(args, kwargs)
    rewards, offsets = a["rewards"], a["offsets"]
    check_inputs(rewards, a["group_size"], offsets, a["success"], a["valid"], a["prior"])
    if offsets is not None:
        check_offsets(offsets, rewards.shape[0])
    options = {name: a[name] for name in OPTION_NAMES}
    options["band"] = tuple(options["band"]) if options["band"] is not None else None
    out = reference_group_advantages(
        rewards, group_size=a["group_size"] or None, offsets=offsets, success=a["success"], valid=a["valid"],
        prior=a["prior"], config=AdvantageConfig(**options), return_index=a["return_index"],
    )  # fmt: skip
    return op_outputs(out, rewards)


def _reference_out_op(*args, **kwargs):
    out = tuple(kwargs.pop(name) for name in OUTPUT_NAMES)
    result = _reference_op(*args, **kwargs)  # checks the inputs, which check_out's shapes rely on
    check_out(out, bind(args, kwargs))
    for t, r in zip(out, result, strict=True):
        t.copy_(r)


for _key in ("CPU", "CUDA"):
    if _key not in COMPILED:
        _lib.impl("group_advantages", _reference_op, _key)
        _lib.impl("group_advantages.out", _reference_out_op, _key)


@torch.library.register_fake("bandadv::group_advantages")
def _group_advantages_fake(*args, **kwargs):
    a = bind(args, kwargs)
    rewards, group_size, offsets = a["rewards"], a["group_size"], a["offsets"]
    torch._check(rewards.dim() == 1, lambda: f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if group_size > 0:
        torch._check(n % group_size == 0, lambda: f"N={n} is not divisible by group_size={group_size}")
    else:
        torch._check(offsets is not None, lambda: "give a group layout: group_size >= 1 or offsets")
    return tuple(rewards.new_empty(shape, dtype=dtype) for shape, dtype in output_specs(a))


@torch.library.register_fake("bandadv::group_advantages.out")
def _group_advantages_out_fake(*args, **kwargs):
    out = tuple(kwargs.pop(name) for name in OUTPUT_NAMES)
    _group_advantages_fake(*args, **kwargs)  # its checks
    check_out(out, bind(args, kwargs))


# --- Triton --------------------------------------------------------------------------------


def triton_available() -> bool:
    return TRITON_AVAILABLE


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Python types of the schema's argument types, for the Triton op's signature.
_PYTHON_TYPES = {
    "Tensor": torch.Tensor, "Optional[Tensor]": torch.Tensor | None, "int": int, "float": float,
    "Optional[float]": float | None, "Optional[List[float]]": list[float] | None, "str": str, "bool": bool,
}  # fmt: skip


def schema_signature() -> inspect.Signature:
    """GROUP_ADVANTAGES_SCHEMA as a Python signature (from which triton_op infers its schema)."""
    parameters = [
        inspect.Parameter(
            a.name,
            inspect.Parameter.KEYWORD_ONLY if a.kwarg_only else inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=ARG_DEFAULTS.get(a.name, inspect.Parameter.empty),
            annotation=_PYTHON_TYPES[str(a.type)],
        )
        for a in _SCHEMA.arguments
    ]
    returns = tuple[tuple(torch.Tensor for _ in _SCHEMA.returns)]
    return inspect.Signature(parameters, return_annotation=returns)


def _run_triton(a: dict[str, Any], wrap=lambda kernel: kernel, out=None) -> tuple[torch.Tensor, ...]:
    from .triton_kernels.group_advantage import group_advantages_triton

    check_inputs(a["rewards"], a["group_size"], a["offsets"], a["success"], a["valid"], a["prior"])
    if out is not None:
        check_out(out, a)
    return group_advantages_triton(**a, wrap=wrap, out=out)


def _triton_op_impl(*args, **kwargs):
    return _run_triton(bind(args, kwargs), wrap=torch.library.wrap_triton)


_triton_op_impl.__signature__ = schema_signature()


def _register_triton_op() -> None:
    """bandadv::group_advantages_triton, a triton_op so that torch.compile traces into it. Its
    schema is inferred from the signature, which is built from GROUP_ADVANTAGES_SCHEMA (torch
    before 2.15 ignores triton_op's schema=), and triton_op registers the function itself as the
    fake kernel."""
    torch.library.triton_op("bandadv::group_advantages_triton", mutates_args=())(_triton_op_impl)


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


_EMPTY_INDEX: dict[torch.device, torch.Tensor] = {}


def empty_index(device: torch.device) -> torch.Tensor:
    """An empty int64 tensor on `device`, made once: the out= form's kept_index without
    return_index (nothing is ever written to it)."""
    index = _EMPTY_INDEX.get(device)
    if index is None:
        index = _EMPTY_INDEX[device] = torch.empty(0, dtype=torch.int64, device=device)
    return index


def _given_tensors(offsets, success, valid, prior) -> dict[str, torch.Tensor]:
    given = dict(offsets=offsets, success=success, valid=valid, prior=prior)
    return {name: t for name, t in given.items() if t is not None}


_DEFAULT_CONFIG = AdvantageConfig()


def group_advantages_op(
    rewards: torch.Tensor,
    group_size: int = 0,
    offsets: torch.Tensor | None = None,
    success: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
    config: AdvantageConfig | None = None,
    return_index: bool = False,
    triton: bool = False,
    out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Calls the op with a config's options through torch.ops: bandadv.group_advantages (the
    compiled kernel of the tensor's device; in eager mode the public function calls it through
    ENTRY first), or with triton=True the Triton kernel,
    torch.ops.bandadv.group_advantages_triton on CUDA tensors and the kernel itself under the CPU
    interpreter (triton_op rejects interpreted kernels). With `out` (the outputs of an earlier
    call with the same shapes, in OUTPUT_NAMES order) the results are written there; the Triton
    kernel is then called directly."""
    # Only what differs from the schema's defaults is passed: each argument costs the call.
    kwargs = (config if config is not None else _DEFAULT_CONFIG).op_changes()
    if offsets is not None or success is not None or valid is not None or prior is not None or return_index:
        kwargs = {**kwargs, **_given_tensors(offsets, success, valid, prior)}
        if return_index:
            kwargs["return_index"] = True
    if not triton:
        if out is not None:
            _OP.out(rewards, group_size, **kwargs, **dict(zip(OUTPUT_NAMES, out, strict=True)))
            return out
        return (_OP.default if torch.compiler.is_compiling() else _OP_EAGER)(rewards, group_size, **kwargs)
    if rewards.device.type == "cuda" and TRITON_OP_REGISTERED and out is None:
        return torch.ops.bandadv.group_advantages_triton.default(rewards, group_size, **kwargs)
    if TRITON_AVAILABLE and (rewards.device.type == "cuda" or triton_interpreting()):
        return _run_triton(bind((rewards, group_size), kwargs), out=out)
    if not TRITON_AVAILABLE:
        raise RuntimeError("backend='triton' needs the triton package")
    raise ValueError(
        f"backend='triton' needs CUDA tensors, got {rewards.device}; set TRITON_INTERPRET=1 before "
        "triton is imported to run the Triton kernel on the CPU interpreter"
    )
