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
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "cpp", "triton", "reference")

try:  # The compiled extension registers torch.ops.vgs_kernels.* when imported.
    from vgs_kernels import _C  # noqa: F401

    HAS_CPP = True
except ImportError:  # pragma: no cover - only when the package was not built
    HAS_CPP = False

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
