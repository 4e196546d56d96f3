"""Builds bandadv._C: the C++ CPU kernel, the module with its eager entry (csrc/python_entry.cpp)
and, where torch has CUDA and nvcc is found, the CUDA kernel.

Environment:
  BANDADV_SKIP_EXT=1     build no native code; the package then runs on its torch reference.
  BANDADV_FORCE_CUDA=1   build the CUDA kernel even where no nvcc/CUDA torch was detected.
  BANDADV_SKIP_CUDA=1    build the CPU kernel only.
  BANDADV_CUDA_ARCHS     semicolon-separated compute capabilities, default "80;90" (PTX of the last
                         is embedded too, for newer GPUs).
"""

import glob
import os
import shutil

# torch finds CUDA_HOME from `which nvcc`; a /usr/local/bin/nvcc link would make that /usr/local.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# -fopenmp: at::parallel_for is inlined into this library and parallelises through OpenMP pragmas.
# -fno-math-errno and -fno-trapping-math let GCC vectorise the CPU kernel's per-group loop
# (square roots, and divisions computed for every group of a tile); neither changes a result.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
LINK_FLAGS = ["-fopenmp"]


def want_cuda() -> bool:
    if os.environ.get("BANDADV_SKIP_CUDA") == "1":
        return False
    if os.environ.get("BANDADV_FORCE_CUDA") == "1":
        return True
    nvcc = CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    return bool(torch.version.cuda and (nvcc or shutil.which("nvcc")))


def nvcc_flags() -> list[str]:
    archs = [a.strip().replace(".", "") for a in os.environ.get("BANDADV_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


class BuildRecordingTorch(BuildExtension):
    """Writes the torch version beside each extension (`_C....so.torch`), so that bandadv can
    refuse to load a build made for another torch, whose C++ ABI differs (bandadv.ops)."""

    def build_extension(self, ext):
        record = self.get_ext_fullpath(ext.name) + ".torch"
        try:
            with open(record) as f:
                built_for = f.read().strip()
        except OSError:
            built_for = None
        if built_for != torch.__version__:
            self.force = True  # setuptools would call a build for another torch up to date
        super().build_extension(ext)
        with open(record, "w") as f:
            f.write(torch.__version__ + "\n")

    def copy_extensions_to_source(self):  # in-place builds (pip install -e .) copy the record too
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            self.copy_file(regular_file + ".torch", inplace_file + ".torch", level=self.verbose)


def extensions():
    if os.environ.get("BANDADV_SKIP_EXT") == "1":
        return []
    sources = ["csrc/group_advantages_cpu.cpp", "csrc/python_entry.cpp"]
    include = [os.path.abspath("csrc")]
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        flags = {"cxx": CXX_FLAGS, "nvcc": nvcc_flags()}
        return [
            CUDAExtension(
                "bandadv._C", sources, include_dirs=include, extra_compile_args=flags, extra_link_args=LINK_FLAGS
            )
        ]
    return [
        CppExtension(
            "bandadv._C",
            sources,
            include_dirs=include,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=LINK_FLAGS,
        )
    ]


setup(
    packages=["bandadv", "bandadv.integrations", "bandadv.triton_kernels"],
    package_dir={
        "bandadv": "python/bandadv",
        "bandadv.integrations": "python/bandadv/integrations",
        "bandadv.triton_kernels": "triton_kernels",
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildRecordingTorch},
)
