"""AMP: every GradScaler steers a hooked optimizer before unscaling it, and the Gram of scaled gradients.

``GradScaler.unscale_`` rescales ``.grad`` in place without a version bump (so
vgs_kernels/steering/components.py cannot see it), and an unscaled component 0 mixed with still-scaled
others would be a silently wrong step: ``guard_grad_scalers`` patches ``unscale_`` once, on the classes
(torch.amp.GradScaler and FSDP's ShardedGradScaler), to call the hook's ``apply()`` first.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import Tensor


def guard_grad_scalers() -> None:
    """Installs the steering guard on every GradScaler class (once; module docstring)."""
    classes = [torch.amp.GradScaler]
    try:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        classes.append(ShardedGradScaler)
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    for cls in classes:
        original = cls.__dict__.get("unscale_")
        if original is None or getattr(original, "_vgs_guard", False):
            continue

        @functools.wraps(original)
        def unscale_(scaler, optimizer, _original=original):
            hook = getattr(optimizer, "_vgs_steering", None) or getattr(
                getattr(optimizer, "optimizer", None), "_vgs_steering", None)
            if hook is not None and getattr(scaler, "_enabled", True):
                hook._unscaling = scaler
                try:
                    hook.apply()
                finally:
                    hook._unscaling = None
            return _original(scaler, optimizer)

        unscale_._vgs_guard = True
        cls.unscale_ = unscale_


def check_scaler(scaler: Optional[Any], backward_fn: Optional[Any]) -> None:
    """Refuses a scaler that the backward function's accelerator applies already."""
    if scaler is not None and getattr(getattr(backward_fn, "__self__", None), "scaler", None) is scaler:
        raise ValueError("scaler= is the GradScaler of backward_fn's accelerator, whose backward already "
                         "scales every loss: the losses would be scaled twice; drop scaler=")


def unscaled_gram(G: Tensor, scaler: Optional[Any]) -> Tensor:
    """The Gram of the unscaled gradients from that of the scaled ones (the policies do not care)."""
    scale = getattr(scaler, "_scale", None) if scaler is not None else None
    return G if scale is None else G / scale.to(G).square()


def stage(scaler: Any, optimizer: torch.optim.Optimizer) -> Optional[str]:
    """GradScaler's stage for `optimizer` this step ("READY", "UNSCALED", "STEPPED"), None if unknown."""
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer))
    return getattr(state.get("stage"), "name", None) if state else "READY"
