"""Which logits dtypes Triton can compile for a GPU target, from Triton's own tables.

Not every GPU target can convert every 8-bit float format: Triton 3.x compiles `float8_e4m3fn`
(its `fp8e4nv`) only for sm_89 and newer (and for AMD CDNA), so a kernel launched with such logits
on an A100 fails deep inside the compiler. `decomposed_kl` checks its inputs against this module
before launching, and the compile report (benchmarks/compile_report.py) checks this rule against
what the compiler actually does for sm_80, sm_90 and gfx942.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def triton_type(dtype: torch.dtype) -> str:
    """Triton's name for a tensor's element type (e.g. torch.float8_e4m3fn -> 'fp8e4nv'): the
    binder's own mangling, so the two can never disagree."""
    from triton.runtime.jit import mangle_type

    return mangle_type(torch.empty(0, dtype=dtype)).lstrip("*")


@functools.lru_cache(maxsize=None)
def _supported_fp8(target) -> tuple:
    from triton.compiler import make_backend

    return tuple(make_backend(target).parse_options({}).supported_fp8_dtypes)


def unsupported_type(name: str, target) -> Optional[str]:
    """Why Triton cannot compile element type `name` (e.g. 'fp8e4nv') for `target` (a
    triton.backends.compiler.GPUTarget), or None when it can. Only 8-bit floats depend on the target."""
    if not name.startswith("fp8"):
        return None
    supported = _supported_fp8(target)
    if name in supported:
        return None
    arch = f"sm_{target.arch}" if target.backend == "cuda" else target.arch
    return f"Triton cannot compile {name} loads for {arch} (it supports {', '.join(supported)} there)"


@functools.lru_cache(maxsize=None)
def device_target(device: torch.device):
    """The GPUTarget of a CUDA / ROCm device (no context switch: from torch's device properties)."""
    from triton.backends.compiler import GPUTarget

    props = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        return GPUTarget("hip", props.gcnArchName.split(":")[0], 64)
    return GPUTarget("cuda", 10 * props.major + props.minor, 32)


def check_dtype(name: str, t: torch.Tensor) -> None:
    """Raises TypeError naming the argument when `t` (a CUDA tensor) has a dtype that the Triton
    kernels cannot be compiled for on its device. No-op without Triton or for CPU tensors."""
    if not t.is_cuda or t.element_size() != 1:
        return
    try:
        reason = unsupported_type(triton_type(t.dtype), device_target(t.device))
    except ImportError:  # no Triton: the reference backend runs, and it reads any float dtype
        return
    if reason:
        raise TypeError(f"{name} has dtype {t.dtype}, which this GPU's Triton kernels cannot read: "
                        f"{reason}. Pass {name}.to(torch.bfloat16) (or float16 / float32) instead")
