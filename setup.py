"""Builds vgs_kernels with its C++ extension (vgs_kernels._C, the CPU kernels in csrc/).

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
    name="vgs-kernels",
    version="0.1.0",
    description="Fused kernels for Visual Gradient Steering (decomposed on-policy distillation of VLMs)",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # benchmarks/ ships inside the package as vgs_kernels.benchmarks (python -m vgs_kernels.benchmarks).
    packages=["vgs_kernels", "vgs_kernels.integrations", "vgs_kernels.benchmarks"],
    package_dir={"vgs_kernels": "vgs_kernels", "vgs_kernels.benchmarks": "benchmarks"},
    ext_modules=[
        CppExtension(
            "vgs_kernels._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    install_requires=["torch>=2.5", "tqdm", "matplotlib", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "vlm": ["transformers>=4.57", "tokenizers", "pillow"],
        "trl": ["trl>=1.16", "transformers>=5.0", "accelerate", "datasets", "tokenizers", "pillow"],
        "test": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["vgs-bench=vgs_kernels.benchmarks.__main__:main"]},
)
