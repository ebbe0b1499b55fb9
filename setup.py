"""The C++ extension vgs_kernels._C (the CPU kernels in csrc/); everything else is in pyproject.toml.

torch must already be installed: `pip install --no-build-isolation -e .`
Set VGS_KERNELS_PORTABLE=1 to build without -march=native (e.g. for a wheel that moves).
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math", "-fno-math-errno"]
if os.environ.get("VGS_KERNELS_PORTABLE", "0") != "1":
    cxx.append("-march=native")

setup(
    ext_modules=[
        CppExtension(
            "vgs_kernels._C",
            sorted(glob.glob("csrc/*.cpp")),
            depends=sorted(glob.glob("csrc/*.h")),  # rebuilt when a header changes, and shipped in an sdist
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
