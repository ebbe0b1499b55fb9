"""Which implementation runs an op: the Triton kernels (CUDA), the C++ kernels (CPU) or the
plain-torch reference.

`auto` (the default) picks Triton for CUDA tensors and C++ for CPU tensors, falling back to the
reference when the fast backend is not available. Force one with the environment variable
``VGS_KERNELS_BACKEND`` (auto | cpp | triton | reference), `set_backend(name)`, the
`use_backend(name)` context manager, or the ``backend=`` argument of the ops. Triton on CPU tensors
works only under ``TRITON_INTERPRET=1`` (slow; used by the tests).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from typing import Any, Dict, Iterator, Optional

import torch

BACKENDS = ("auto", "cpp", "triton", "reference")

try:  # The compiled extension registers torch.ops.vgs_kernels.* when imported.
    from vgs_kernels import _C  # noqa: F401

    HAS_CPP, CPP_ERROR = True, None
except ImportError as e:  # not built, or built against another torch (undefined symbols)
    HAS_CPP, CPP_ERROR = False, f"{type(e).__name__}: {e}"

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_current = _check(os.environ.get("VGS_KERNELS_BACKEND", "auto"))


def get_backend() -> str:
    """The backend set globally (may be ``auto``)."""
    return _current


def set_backend(name: str) -> None:
    """Force a backend for every op from now on (``auto`` restores device dispatch)."""
    global _current
    _current = _check(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block."""
    global _current
    previous, _current = _current, _check(name)
    try:
        yield
    finally:
        _current = previous


def resolve(device: torch.device, backend: Optional[str] = None) -> str:
    """The concrete backend (cpp | triton | reference) for tensors on `device`.

    `backend` overrides the global choice for one call. Asking for a backend that cannot run on
    `device` raises a clear error rather than silently running another.
    """
    name = _check(backend or _current)
    if name == "auto":
        if device.type == "cuda" and HAS_TRITON:
            return "triton"
        if device.type == "cpu" and HAS_CPP:
            return "cpp"
        if device.type in ("cpu", "cuda"):
            _warn_slow(device.type)
        return "reference"
    if name == "cpp":
        if not HAS_CPP:
            raise RuntimeError("backend 'cpp' requested but vgs_kernels._C is not built "
                               "(pip install --no-build-isolation -e .)")
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpp' runs on CPU tensors only, got device {device}")
    if name == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not TRITON_INTERPRET:
            raise RuntimeError(f"backend 'triton' needs CUDA tensors (got device {device}) "
                               "or TRITON_INTERPRET=1")
    return name


_warned: set = set()


def _why_not(device_type: str) -> Optional[str]:
    """Why `auto` cannot run the fast backend on `device_type` (None when it can)."""
    if device_type == "cpu" and not HAS_CPP:
        return (f"the compiled extension vgs_kernels._C did not load ({CPP_ERROR}); rebuild it against "
                "this torch: pip install --no-build-isolation -e .")
    if device_type == "cuda" and not HAS_TRITON:
        return "triton is not installed (pip install triton)"
    return None


def _warn_slow(device_type: str) -> None:
    """One warning per device type when `auto` falls back to the slow plain-torch reference."""
    if device_type not in _warned:
        _warned.add(device_type)
        warnings.warn(f"vgs_kernels: running the slow plain-torch reference on {device_type} tensors: "
                      f"{_why_not(device_type)}. See vgs_kernels.backend_info().", RuntimeWarning,
                      stacklevel=3)


def backend_info() -> Dict[str, Any]:
    """Which backend each device gets and why.

    Returns {"backend": the global setting, "cpu"/"cuda": the backend `auto` runs there,
    "cpu_reason"/"cuda_reason": why not the fast one (None when it is), "cpp_loaded": bool,
    "cpp_error": the extension's import error or None, "triton": Triton's version or None,
    "triton_interpret": bool, "torch": torch's version, "cuda_available": bool}.
    """
    triton_version = None
    if HAS_TRITON:
        import triton

        triton_version = triton.__version__
    info: Dict[str, Any] = {"backend": _current}
    for dev in ("cpu", "cuda"):
        info[dev] = _resolve_quietly(torch.device(dev))
        info[f"{dev}_reason"] = _why_not(dev)
    info.update(cpp_loaded=HAS_CPP, cpp_error=CPP_ERROR, triton=triton_version,
                triton_interpret=TRITON_INTERPRET, torch=torch.__version__,
                cuda_available=torch.cuda.is_available())
    return info


def _resolve_quietly(device: torch.device) -> str:
    """`resolve` without the fallback warning (for reports); errors become their message."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            return resolve(device)
        except RuntimeError as e:
            return f"unavailable: {e}"
