"""Builds bandadv._C: the C++ CPU kernels (and, once they exist, the CUDA kernels).

Environment:
  BANDADV_SKIP_EXT=1   build no native code; the package then runs on its torch reference.
"""

import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

CXX_FLAGS = ["-O3", "-std=c++20"]


def extensions():
    if os.environ.get("BANDADV_SKIP_EXT") == "1":
        return []
    sources = ["csrc/group_advantages_cpu.cpp"]
    return [
        CppExtension(
            "bandadv._C", sources, include_dirs=[os.path.abspath("csrc")], extra_compile_args={"cxx": CXX_FLAGS}
        )
    ]


setup(
    packages=["bandadv", "bandadv.triton_kernels"],
    package_dir={"bandadv": "python/bandadv", "bandadv.triton_kernels": "triton_kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
