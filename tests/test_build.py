"""The build: kernels registered with the dispatcher, and a wheel that installs and runs."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import bandadv
from conftest import extension_path

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_kernel_registered_when_built():
    # .ci/run sets BANDADV_REQUIRE_CUDA=1: torch there is a CUDA build and nvcc is installed, so a
    # change that breaks the CUDA build fails CI even though nothing runs on a GPU there.
    if os.environ.get("BANDADV_REQUIRE_CUDA") != "1":
        pytest.skip("BANDADV_REQUIRE_CUDA is not set")
    assert "CUDA" in bandadv.ops.COMPILED, bandadv.ops.EXTENSION_ERROR
    assert torch._C._dispatch_has_kernel_for_dispatch_key("bandadv::group_advantages", "CUDA")


@pytest.mark.skipif(shutil.which("objdump") is None or extension_path() is None, reason="objdump or the .so missing")
def test_avx_instructions_only_in_the_dispatched_kernel():
    # The CPU kernel is also compiled for AVX2 and called only where the CPU has it; an AVX
    # instruction anywhere else in the library would crash a baseline x86-64 CPU.
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", extension_path()], check=True, capture_output=True, text=True
    ).stdout
    function, outside, inside = "", set(), 0
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line
        elif "\t" in line and line.split("\t")[1].split(" ")[0].startswith("v"):  # VEX-encoded: AVX and later
            if "kernel_range_avx2" in function:
                inside += 1
            else:
                outside.add(function)
    if sysconfig.get_platform().endswith("x86_64"):
        assert inside > 0, "no AVX2 kernel was built"
    assert not outside, sorted(outside)[:5]


def test_baseline_simd_kernel_matches_the_reference():
    # This CPU takes the AVX2 kernel; the SSE2 one, which CPUs without AVX2 take, is run here by
    # forcing it, through the CPU tests that compare with the float64 reference.
    env = {**os.environ, "BANDADV_CPU_SIMD": "baseline"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_correctness.py",
         "-k", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


@pytest.mark.slow
def test_sdist_holds_every_native_source(tmp_path):
    # setuptools puts the extension's listed sources in an sdist but not the headers they
    # include (MANIFEST.in adds them); without them a build from the sdist fails. Built from a
    # copy of the checkout's files: an egg-info left by an earlier build would add its files.
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    source = tmp_path / "source"
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
        cwd=source, check=True, capture_output=True, timeout=600, env={**os.environ, "BANDADV_SKIP_EXT": "1"},
    )  # fmt: skip
    (sdist,) = glob.glob(str(tmp_path / "bandadv-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    native = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert native and native <= packed, sorted(native - packed)


@pytest.mark.slow
def test_wheel_installs_and_runs_in_fresh_venv(tmp_path):
    env = {**os.environ, "BANDADV_CUDA_ARCHS": os.environ.get("BANDADV_CUDA_ARCHS", "80")}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path)],
        check=True, env=env, timeout=1800,
    )  # fmt: skip
    (wheel,) = glob.glob(str(tmp_path / "bandadv-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("bandadv/_C") and n.endswith(".so") for n in names), names
    assert "bandadv/triton_kernels/group_advantage.py" in names
    assert not any(n.startswith("triton_kernels/") for n in names)  # never a top-level package

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # torch comes from this interpreter's site-packages (a plain path entry: its .pth files, such
    # as this checkout's editable install of bandadv, are not processed there).
    (site / "_torch_from_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True)
    smoke = (
        "import os, torch, bandadv\n"
        "assert bandadv.__file__.startswith(os.environ['SITE']), bandadv.__file__\n"
        "r = (torch.rand(64) < 0.5).float()\n"
        "ref = bandadv.group_advantages(r, 8, backend='torch')\n"
        "backends = ['cpu'] + (['triton'] if bandadv.ops.triton_available() and bandadv.ops.triton_interpreting() else [])\n"
        "for b in backends:\n"
        "    out = bandadv.group_advantages(r, 8, backend=b)\n"
        "    torch.testing.assert_close(out.advantages, ref.advantages)\n"
        "print('ok', sorted(bandadv.ops.COMPILED), backends)\n"
    )
    result = subprocess.run(
        [python, "-c", smoke], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "SITE": str(site), "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and "'CPU'" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not bandadv.ops.triton_available(), reason="triton not installed")
def test_triton_kernels_compile_for_gpu_targets():
    # The CPU interpreter accepts code that the GPU compiler rejects; compile every launcher
    # variant to cubin for sm_90 (and sm_80) with Triton's own pipeline, no GPU needed.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_compile_triton.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled" in result.stdout
