"""Policies: the Gram matrix of the k component gradients -> k coefficients (TorchJD aggregator style).

Every policy here is a small pure function of G ([k, k] float32, G[a, b] = <g_a, g_b>) and the
components' base weights w ([k]: 1 for ``std``, gamma for ``vis``, lambda or 1 for the others) that
returns the coefficients c ([k] float32, on G's device, no host synchronisation); the steered
gradient is sum_i c_i g_i (vgs_kernels/ops/combine.py). All built-in rules are invariant to a common
scale of the gradients (GradScaler's loss scale cancels). ``std`` and ``vis`` are the indices of
the standard and visual components.

What each rule guarantees (d = sum_i c_i g_i is the step direction; tests/steering/test_policies.py checks
each property on random Gram matrices):

    vgs      exact Eq. 15: eta = |g_std| / |g_std + gamma g_vis|, c = eta * w.
             |eta (w_std g_std + w_vis g_vis)| = |w_std g_std|: the standard step's size, turned
             towards the visual gradient. No inner-product guarantee. g_std = 0 (nothing to keep)
             falls back to c = w, flagged (``_eta``), as project and auto's measurements do.
    project  conflict-aware VGS (not PCGrad): when <g_std, g_vis> < 0, g_std loses its part along
             g_vis before gamma g_vis is added; eta keeps |g_std|'s size as in vgs. For std and
             vis alone it guarantees <d, g_vis> >= 0 (std never pulls against vis); <d, g_std>
             may still be negative (the Std loss can rise to first order).
    pcgrad   PCGrad (Yu et al. 2020) exactly as TorchJD's PCGrad aggregator: each weighted
             gradient w_i g_i is projected, in a random order, off every other one it conflicts
             with, then they are summed; no eta. For k = 2: <d, g_i> >= 0 for both components.
    sum      the monolithic loss: c = w, d = the plain weighted gradient.
    fixed    a constant eta (the paper's practice): c = eta * w, needs no Gram (one combined backward)

Fixed-coefficient components (GRPO + VGS, Eq. 22): a component named in ``fixed`` keeps c_i = w_i
under every policy; the rule sees only the Gram matrix and weights of the other (steered)
components (``with_fixed``). Eq. 22's update (1 - alpha) g_GRPO + alpha * eta (g_std + gamma g_vis +
lambda g_lp) is then the components {grpo: 1 - alpha (fixed), std: alpha, vis: alpha gamma, lp:
alpha lambda}: every rule above is homogeneous in the steered weights (vgs's eta does not change when
they are all scaled by alpha), so the policy applies to the VGS part only and the GRPO gradient is
added unchanged. The fallback of ``guard`` is w for all components, the fixed ones included.

``auto`` (exact eta every K steps, EMA in between) is stateful: its state is ``AutoEta`` (below), which
the hook (vgs_kernels/steering/hook.py) keeps. A user policy is any callable (G, names) -> c.
``POLICIES`` is the one list of the policies' names (the hook, both TRL configs and their docs use it).
``guard`` is the one fallback for zero or non-finite norms: no NaN ever reaches ``.grad``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

Policy = Callable[[Tensor, Sequence[str]], Tensor]


def base_weights(names: Sequence[str], gamma: float = 2.0, weights: Optional[Mapping[str, float]] = None,
                 fixed: Sequence[str] = ()) -> Tuple[list, int, int]:
    """(w, std, vis) for components `names`: std is ``"std"`` (else the first that is not fixed),
    vis is ``"vis"`` (else the next steered one; -1 when there is none); w[std] = 1, w[vis] = gamma,
    others weights.get(name, 1.0). A fixed component is never std or vis."""
    names = list(names)
    steered = [i for i, n in enumerate(names) if n not in fixed]
    if not steered or "std" in fixed or "vis" in fixed:
        raise ValueError(f"fixed components {tuple(fixed)} must leave 'std' (and 'vis') to the policy: "
                         f"at least one of {names} must be steered")
    std = names.index("std") if "std" in names else steered[0]
    others = [i for i in steered if i != std]
    vis = names.index("vis") if "vis" in names else (others[0] if others else -1)
    extra = dict(weights or {})
    unknown = set(extra) - set(names)
    if unknown:
        raise ValueError(f"weights names components {sorted(unknown)} that are not among {names}")
    w = [float(extra.get(n, 1.0)) for n in names]
    if vis >= 0:
        w[vis] = float(extra.get(names[vis], gamma))
    return w, std, vis


def _steered_norm(G: Tensor, u: Tensor) -> Tensor:
    """|sum_i u_i g_i| from the Gram matrix (clamped: rounding can make u^T G u slightly negative)."""
    return (u @ G @ u).clamp_min(0).sqrt()


def _steering(w: Tensor, std: int, vis: int) -> Tensor:
    """u with u_std = w_std, u_vis = w_vis and 0 elsewhere: the combination eta is measured on."""
    u = torch.zeros_like(w)
    u[std] = w[std]
    if vis >= 0:
        u[vis] = w[vis]
    return u


def _eta(G: Tensor, w: Tensor, u: Tensor, std: int) -> Tensor:
    """|w_std g_std| / |sum_i u_i g_i|: the step size of the standard gradient kept (Eq. 15).

    NaN when g_std = 0 (e.g. a student equal to its teacher with the image): there is no step size to
    keep, and Eq. 15's eta = 0 would drop the Vis and LP gradients and, for a student initialised as its
    teacher, never move it. The NaN makes ``guard`` take the plain weighted sum (stats "fallback")."""
    size = w[std].abs() * G[std, std].clamp_min(0).sqrt()
    return torch.where(size > 0, size / _steered_norm(G, u), torch.full_like(size, math.nan))


def vgs(G: Tensor, w: Tensor, std: int = 0, vis: int = 1) -> Tensor:
    """Exact VGS (Eq. 15): eta = |w_std g_std| / |w_std g_std + w_vis g_vis|, c = eta * w.
    Components other than std and vis are added with the same eta and their own weight. g_std = 0:
    NaN, which ``guard`` turns into c = w with the fallback flag (``_eta``)."""
    return _eta(G, w, _steering(w, std, vis), std) * w


def project(G: Tensor, w: Tensor, std: int = 0, vis: int = 1) -> Tensor:
    """Conflict-aware VGS (PCGrad-style): when <g_std, g_vis> < 0, g_std loses its component
    along g_vis, g_std' = g_std - <g_std, g_vis> / |g_vis|^2 g_vis, before gamma g_vis is added;
    eta = |g_std| / |g_std' + gamma g_vis| keeps the standard gradient's step size, as in vgs."""
    if vis < 0:
        return vgs(G, w, std, vis)
    conflict = G[std, vis].clamp_max(0)
    # Removing the projection adds -<s, v>/|v|^2 * w_std to the coefficient of g_vis.
    shift = torch.where(G[vis, vis] > 0, -conflict / G[vis, vis], torch.zeros_like(conflict)) * w[std]
    u = _steering(w, std, vis)
    u[vis] = u[vis] + shift
    eta = _eta(G, w, u, std)
    c = eta * w
    c[vis] = eta * u[vis]
    return c


def pcgrad(G: Tensor, w: Tensor, std: int = 0, vis: int = 1) -> Tensor:
    """PCGrad on the weighted gradients w_i g_i, as TorchJD's PCGradWeighting: for each i, with a
    fresh ``torch.randperm`` order (CPU generator, as TorchJD), w_i g_i's projection is reduced by
    its component along every w_j g_j it has a negative inner product with; the results are summed.
    Device-side ``where`` instead of branches: no host synchronisation."""
    k = G.shape[0]
    w = w.to(G)
    Gw = G * w[:, None] * w[None, :]
    c, eye = torch.zeros_like(w), torch.eye(k, dtype=w.dtype, device=w.device)
    for i in range(k):
        cur = torch.zeros_like(w)
        cur[i] = 1.0
        for j in torch.randperm(k).tolist():
            if j == i:
                continue
            inner = Gw[j] @ cur
            step = torch.where((inner < 0) & (Gw[j, j] > 0), inner / Gw[j, j], torch.zeros_like(inner))
            cur = cur - step * eye[j]
        c = c + cur
    return c * w


def plain_sum(G: Tensor, w: Tensor, std: int = 0, vis: int = 1) -> Tensor:
    """The monolithic loss: c = w (no steering; the baseline)."""
    return w.to(device=G.device, dtype=torch.float32).clone()


def fixed(w: Tensor, eta, fixed_mask: Optional[Tensor] = None) -> Tensor:
    """A constant eta: c = eta * w (eta a number or a 0-d tensor, e.g. an EMA); c_i = w_i where
    ``fixed_mask`` ([k] bool) is True."""
    c = w * eta
    return c if fixed_mask is None else torch.where(fixed_mask, w, c)


def with_fixed(rule: Callable[..., Tensor], G: Tensor, w: Tensor, std: int, vis: int,
               fixed_idx: Sequence[int]) -> Tensor:
    """``rule(G', w', std', vis')`` on the steered components only (G' and w' without the rows and
    columns of ``fixed_idx``), with c_i = w_i for the fixed ones. No fixed component: ``rule`` as is."""
    if not fixed_idx:
        return rule(G, w, std, vis)
    keep = [i for i in range(G.shape[0]) if i not in set(fixed_idx)]
    idx = torch.tensor(keep, device=G.device)
    sub = rule(G.index_select(0, idx).index_select(1, idx), w.index_select(0, idx), keep.index(std),
               keep.index(vis) if vis in keep else -1)
    return w.to(device=G.device, dtype=torch.float32).clone().index_copy(0, idx, sub.to(torch.float32))


BUILTIN: Dict[str, Callable[..., Tensor]] = {"vgs": vgs, "project": project, "pcgrad": pcgrad, "sum": plain_sum}
POLICIES = (*BUILTIN, "fixed", "auto")


def guard(G: Tensor, coeffs: Tensor, fallback: Tensor) -> Tuple[Tensor, Tensor]:
    """(coeffs, or fallback when G or coeffs is not finite; fell_back flag as a 0-d bool tensor).

    A zero steered norm (eta = x/0) makes the coefficients non-finite, an overflowed component
    under AMP makes G non-finite (and, e.g., eta = x/inf = 0). The fallback (the plain weighted sum
    w) is finite, so a NaN never comes from the coefficients, while inf/NaN gradients still reach
    .grad (and GradScaler skips the step).
    """
    ok = torch.isfinite(G).all() & torch.isfinite(coeffs).all()
    return torch.where(ok, coeffs, fallback.to(coeffs)), ~ok


class AutoEta:
    """Policy "auto"'s state: the EMA of the exact eta, measured every ``every`` steps and again
    right after a measurement that fell back (which never feeds the EMA)."""

    def __init__(self, every: int, ema: float):
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        self.every, self.ema = every, ema
        self.value: Optional[Tensor] = None       # NaN until the first successful measurement
        self.retry: Union[bool, Tensor] = False   # the last measurement fell back

    def due(self, step: int) -> bool:
        if isinstance(self.retry, Tensor):  # read once after each measurement (one host sync)
            self.retry = bool(self.retry)
        return self.value is None or self.retry or step % self.every == 0

    def measured(self, eta: Tensor, fell_back: Tensor) -> Tensor:
        """Feeds an exact eta; returns eta_error = |EMA used so far - eta| / eta (NaN if none)."""
        prev = self.value.to(eta) if self.value is not None else torch.full_like(eta, math.nan)
        blended = torch.where(prev.isnan(), eta, self.ema * prev + (1 - self.ema) * eta)
        self.value, self.retry = torch.where(fell_back, prev, blended), fell_back
        return torch.where(fell_back, math.nan, (prev - eta).abs() / eta.abs())
