"""Compiles the Triton kernels to cubin for real GPU targets, without a GPU.

The interpreter that runs the kernels' tests on the CPU accepts code the GPU compiler rejects
(globals that are not constexpr, loop-carried type changes, ...); this runs Triton's real
pipeline (ttir, ttgir, llir, ptx, cubin through the bundled ptxas) over the kernel variants the
launcher can produce. Run as a script with TRITON_INTERPRET unset; prints one line per variant.
"""

import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "triton_kernels"))

import group_advantage as ga  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

F32 = {"fp16": tl.float32, "bf16": tl.float32, "fp32": tl.float32, "fp64": tl.float64}


def compile_kernel(kernel, pointers: dict, scalars: dict, constexprs: dict, arch: int) -> None:
    names = kernel.arg_names
    signature = {**pointers, **scalars, **dict.fromkeys(constexprs, "constexpr")}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    triton.compile(source, target=GPUTarget("cuda", arch, 32))


def main_kernel(reward: str, arch: int, **flags) -> None:
    acc = "fp64" if reward == "fp64" else "fp32"
    pointers = {
        "REWARDS": f"*{reward}", "SUCCESS": f"*{acc}", "VALID": "*i1", "PRIOR": f"*{acc}", "OFFSETS": "*i64",
        "BATCH_STD": f"*{acc}", "ADVANTAGES": f"*{acc}", "SAMPLE_MASK": "*i1", "REASON": "*i32", "GROUP_MASK": "*i1",
        "COUNT": "*i32", "SUCCESSES": f"*{acc}", "MEAN": f"*{acc}", "STD": f"*{acc}", "PASS_RATE": f"*{acc}",
        "SUCCESS_VAR": f"*{acc}", "REWARD_VAR": f"*{acc}", "KEPT_COUNT": "*i64", "BAD_OFFSETS": "*i32",
    }  # fmt: skip
    scalars = {"num_groups": "i32", "num_samples": "i32", "group_size": "i32"}
    scalars |= dict.fromkeys(
        ["eps", "band_lo", "band_hi", "min_std", "accidental_max", "accidental_prior_max", "accidental_clip"], "i64"
    )
    constexprs = {"ROWS": 16, "BLOCK": 128, "ACC": F32[reward], **flags}
    compile_kernel(ga._group_advantages_fwd_kernel, pointers, scalars, constexprs, arch)


def variants():
    switches = ["UNBIASED", "SINGLETON_RAW", "MASK_ALL_EQUAL", "USE_BAND", "BAND_INCLUSIVE", "USE_MIN_STD",
                "CLIP_ACTION", "MASK_TOO_FEW", "HAS_SUCCESS", "HAS_VALID", "HAS_PRIOR"]  # fmt: skip
    dtypes = itertools.cycle(["fp16", "bf16", "fp32", "fp64"])
    for estimator, scale, fixed, moments_only, on in itertools.product(
        (0, 1, 2), (0, 1, 2), (True, False), (False, True), (True, False)
    ):
        if (estimator != 0 and scale != 2) or (moments_only and scale != 1):
            continue  # the launcher never makes these
        flags = dict.fromkeys(switches, on) | dict(
            ESTIMATOR=estimator, SCALE=scale, FIXED=fixed, MOMENTS_ONLY=moments_only
        )
        yield next(dtypes), flags


if __name__ == "__main__":
    count = 0
    for reward, flags in variants():
        main_kernel(reward, 90, **flags)
        count += 1
    main_kernel("bf16", 80, **next(iter(variants()))[1])
    for fixed in (True, False):
        compile_kernel(
            ga._kept_index_kernel,
            {"SAMPLE_MASK": "*i1", "OFFSETS": "*i64", "FIRST_SLOT": "*i64", "KEPT_INDEX": "*i64"},
            {"num_groups": "i32", "num_samples": "i32", "group_size": "i32"},
            {"FIXED": fixed, "ROWS": 16, "BLOCK": 128},
            90,
        )
    print(f"compiled {count + 3} Triton kernel variants to cubin (sm_90, one for sm_80)")
