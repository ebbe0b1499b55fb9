"""The steering step, pure: Gram matrix -> coefficients -> stats (TorchJD's Gramian -> weighting).

No state and no hook: the hook (vgs_kernels/steering/hook.py) gathers the component gradients,
computes G with vgs_kernels.ops.gram (all-reduced by vgs_kernels/distributed/), calls
``coefficients`` and writes sum_i c_i g_i with vgs_kernels.ops.combine. Every function here is a
device-side computation on [k, k] / [k] float32 tensors: no host synchronisation.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from vgs_kernels.steering import policies
from vgs_kernels.steering.components import ComponentSpec
from vgs_kernels.steering.health import std_descent

STAT_KEYS = ("step", "mode", "names", "gram", "norms", "cos", "coeffs", "eta", "fallback", "eta_ema",
             "eta_error", "std_descent")


def call_policy(policy: policies.Policy, G: Tensor, names: Sequence[str]) -> Tensor:
    """A user policy's coefficients, checked: k numbers (a [k] tensor or a sequence) for the k
    components ``names`` whose Gram matrix is G."""
    name, k = getattr(policy, "__name__", repr(policy)), len(names)
    c = policy(G, tuple(names))
    if not isinstance(c, Tensor):
        try:
            c = torch.as_tensor(c, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"policy {name} must return {k} coefficients (a [k] tensor), "
                            f"got {type(c).__name__}: {e}") from None
    if c.shape != (k,) or c.is_complex():
        raise ValueError(f"policy {name} must return a [k] = [{k}] tensor of coefficients for the "
                         f"components {tuple(names)}, got shape {tuple(c.shape)}")
    return c.to(device=G.device, dtype=torch.float32)


def coefficients(G: Tensor, spec: ComponentSpec, policy: Union[str, policies.Policy]) -> Tuple[Tensor, Tensor]:
    """(c [k], fell_back 0-d bool) of ``policy`` (a built-in name, "auto" measuring as "vgs", or a
    callable (G, names) -> c that sees the steered components only) for the Gram matrix G [k, k]
    of the components of ``spec``; the fixed components keep their weight; the plain weighted sum
    where G or the coefficients are not finite (policies.guard)."""
    w = spec.tensor(G.device)
    if callable(policy):
        steered = [n for i, n in enumerate(spec.names) if i not in set(spec.fixed_idx)]
        rule = lambda G_, w_, *_: call_policy(policy, G_, steered)  # noqa: E731
    else:
        rule = policies.BUILTIN["vgs" if policy == "auto" else policy]
    raw = policies.with_fixed(rule, G, w, spec.std, spec.vis, spec.fixed_idx)
    return policies.guard(G, raw, w)


def fixed_coefficients(spec: ComponentSpec, eta: Union[float, Tensor], device: torch.device) -> Tensor:
    """c = eta * w with the fixed components at their weight (one combined backward)."""
    return policies.fixed(spec.tensor(device), eta, spec.fixed_mask(device))


def step_stats(step: int, mode: str, spec: ComponentSpec, coeffs: Tensor, device: torch.device,
               G: Optional[Tensor] = None, fell_back: Optional[Tensor] = None) -> Dict[str, Any]:
    """The stats of one step, every key of STAT_KEYS (NaN where this step measured nothing; the hook
    fills eta_ema and eta_error for policy "auto")."""
    k, nan = len(spec.names), torch.full((), math.nan, device=device)
    stats: Dict[str, Any] = {"step": step, "mode": mode, "names": spec.names, "gram": nan.expand(k, k),
                             "norms": nan.expand(k), "cos": nan.expand(k, k), "coeffs": coeffs,
                             "eta": coeffs[spec.std] / spec.w[spec.std], "eta_ema": nan, "eta_error": nan,
                             "std_descent": nan, "fallback": torch.zeros((), dtype=torch.bool, device=device)}
    if G is not None:
        norms = G.diagonal().clamp_min(0).sqrt()
        denom = norms[:, None] * norms[None, :]
        stats.update(gram=G, norms=norms, cos=torch.where(denom > 0, G / denom, torch.zeros_like(G)),
                     fallback=fell_back, std_descent=std_descent(G, coeffs, spec.std))
    return stats
