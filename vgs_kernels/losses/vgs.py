"""The paper's loss (Eq. 13-18, App. E): per-term cotangents on top of the decomposed KL.

    total = η · [Std + γ·Vis + λ·LP]

Std, Vis, Lang and VDS are the per-position terms of `decomposed_kl` (docs/ARCHITECTURE.md, "The method"). LP is Lang
counted only on the tokens whose (detached) VDS lies above the `lp_quantile` quantile of the
batch's valid tokens. Every reduced term is a weighted sum of per-position terms,

    std = Σ_t w_t Std_t      vis = Σ_t w_t f_t Vis_t      lp = Σ_t w_t g_t Lang_t

with w_t the reduction weight (below), g_t ∈ {0, 1} the LP gate and f_t the adaptive-γ factor
(App. E: f_t = 0 below the 0.4 VDS quantile, 1/2 up to 0.7, 1 above; f_t = 1 when not adaptive).
Since γ_t = γ·f_t, `total = η(std + γ·vis + λ·lp)` holds in both modes and `vis` stays the
component the steering hook weighs by γ. The weights are detached, so the backward of each
reduced term is one call of the op's backward with per-position cotangents (no extra kernel).

Reductions: vgs_kernels/losses/base.py ("sequence", the paper's, "token", "sum", "none": then total, std,
vis, lp have the leading shape).
"""
from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from vgs_kernels.losses.base import Count, DistillationLoss
from vgs_kernels.ops.decomposed_kl import KLTerms, acc_dtype, decomposed_kl, valid_mask
from vgs_kernels.ops.fused_linear import (FusedLinearConfig, Gate, Pair, check_inputs, fused_linear_kl_loss,
                                         vocab_heads)

STEER = ("visual", "language")


class _Reduced(NamedTuple):
    total: Tensor
    std: Tensor
    vis: Tensor
    lp: Tensor
    vds: Optional[Tensor]


class VGSLossOutput(_Reduced):
    """total = η(std + γ·vis + λ·lp). total, std, vis, lp: scalars (leading shape for reduction
    "none"), differentiable; vds: detached per-position VDS, float32, zero where masked (None for
    the monolithic loss, which does not compute it).

    Beyond the five fields, the output carries what `GradientSteering.backward(out)` needs so the
    weights are given once: ``weights`` ({"std": 1, "vis": γ, "lp": λ}; {"std": 1} for the
    monolithic loss), ``eta`` (the loss's own η or None) and ``components`` (False when only
    ``total`` is differentiable, e.g. ``FusedLinearVGSLoss(components=False)``).
    Other methods' components ride in ``extra`` (read as attributes too: language steering's
    ``out.lang``, ``out.vp``; GRPO + VGS's ``out.grpo``). ``fixed`` names the components whose
    coefficient is their weight, never rescaled by a policy (policies.with_fixed), and ``steered``
    is the part of ``total`` the policy's eta scales (``total`` minus the fixed components).
    """

    # Unknown (None) for an output built without them (e.g. by _make): the hook then uses its own.
    weights: Optional[Dict[str, float]] = None
    eta: Optional[Union[float, Tensor]] = None
    components: bool = True
    extra: Dict[str, Tensor] = {}
    fixed: Tuple[str, ...] = ()
    steered: Optional[Tensor] = None

    def __new__(cls, total: Tensor, std: Tensor, vis: Tensor, lp: Tensor, vds: Optional[Tensor], *,
                weights: Optional[Dict[str, float]] = None, eta: Optional[Union[float, Tensor]] = None,
                components: bool = True, extra: Optional[Dict[str, Tensor]] = None,
                fixed: Sequence[str] = (), steered: Optional[Tensor] = None) -> "VGSLossOutput":
        self = super().__new__(cls, total, std, vis, lp, vds)
        self.weights = dict(weights) if weights is not None else None
        self.eta, self.components = eta, components
        self.extra, self.fixed = dict(extra or {}), tuple(fixed)
        self.steered = total if steered is None else steered
        return self

    def __getattr__(self, name: str) -> Tensor:
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no component {name!r} (components: "
                             f"{list(self.weights or ('std', 'vis', 'lp'))})")

    def losses(self) -> Dict[str, Tensor]:
        """The components by name, as GradientSteering.backward takes them."""
        return {name: getattr(self, name) for name in (self.weights or ("std", "vis", "lp"))}


def masked_quantile(x: Tensor, valid: Tensor, q: Sequence[float]) -> Tensor:
    """Quantiles `q` of x[valid] (torch.quantile's linear interpolation), without a host sync.

    x, valid: same shape (valid bool). Returns [len(q)] in x.dtype; zeros when nothing is valid.
    """
    x, valid = x.detach().reshape(-1), valid.reshape(-1)
    if x.numel() == 0:  # an empty batch ([B, 0, V]): nothing is valid
        return torch.zeros(len(q), dtype=x.dtype, device=x.device)
    n = valid.sum()
    v = torch.where(valid, x, torch.inf).sort().values  # the valid values first, in order
    pos = torch.tensor(q, dtype=x.dtype, device=x.device) * (n - 1).clamp(min=0)
    lo, hi = pos.floor().long(), pos.ceil().long()
    out = torch.lerp(v[lo], v[hi], pos - lo)
    return torch.where(n > 0, out, torch.zeros_like(out))


class VGSLoss(DistillationLoss):
    """The paper's distillation loss from the four logit sets (module form of `vgs_loss`).

    gamma, lam: γ and λ of Eq. 13-18. lp_quantile: LP counts Lang only on tokens with VDS strictly
    above this quantile of the valid tokens' VDS. adaptive: per-token γ_t (App. E) with the
    quantiles `adaptive_quantiles` (low, high): γ_t = 0 if VDS < low quantile, γ if VDS > high
    quantile, γ/2 in between. eta: fixed η scaling the total (None: 1); a float or a 0-dim tensor.
    reduction: "sequence" | "token" | "sum" | "none" (module docstring). temperature divides all
    four logit sets; detach_prior: no gradient from Vis into u (docs/ARCHITECTURE.md, "The method"). monolithic: the
    standard loss η·Std only (also selected by passing u = b = None), through the op's fast
    Std-only mode; then vis = lp = 0 and vds = None. backend: forces the op's backend.

    steer="language" is the paper's language-steering ablation (Sec. 7, Eq. 19-21), which steers
    towards the language gradient instead: total = η_Lang·[Std + γ_Lang·Lang + λ·VP], with
    Lang = KL(pu ‖ qb) on every token (not gated) and VP (Eq. 21) = 1[VDS > Q_lp_quantile]·
    KL(pu ‖ q*), q* = softmax(u + a − b) as in Eq. 10. Eq. 21 writes the *text-only* student pu in
    VP (the visual term of the text-only pass); it is implemented as written. VP is the op's Vis term
    of a second call with s = u, so q* is detached like Vis's prior (detach_prior=False: the full
    gradient through q* too). The components are std, lang, vp (out.vis = out.lp = 0, weights
    {"std": 1, "lang": γ_Lang, "vp": λ}): the hook's "vgs" policy, which weighs the second
    component against std, computes η_Lang = ‖∇Std‖ / ‖∇Std + γ_Lang ∇Lang‖ (Eq. 20).
    gamma_lang: γ_Lang (default: gamma).
    """

    def __init__(self, gamma: float = 2.0, lam: float = 0.01, lp_quantile: float = 0.7,
                 adaptive: bool = False, eta: Optional[Union[float, Tensor]] = None,
                 reduction: str = "sequence", *,
                 adaptive_quantiles: Tuple[float, float] = (0.4, 0.7), temperature: float = 1.0,
                 detach_prior: bool = True, monolithic: bool = False, backend: Optional[str] = None,
                 check_finite: bool = False, steer: str = "visual", gamma_lang: Optional[float] = None):
        super().__init__(reduction, temperature)
        if steer not in STEER:
            raise ValueError(f"steer must be one of {STEER}, got {steer!r}")
        if steer == "language" and (monolithic or adaptive):
            raise ValueError("steer='language' needs the four passes and has no adaptive gamma (App. E is "
                             "for Vis): drop monolithic= / adaptive=")
        gamma_lang = gamma if gamma_lang is None else gamma_lang
        if steer != "language" and gamma_lang != gamma:
            raise ValueError("gamma_lang is the weight of Lang under steer='language'; set steer='language'")
        for name, value in (("gamma", gamma), ("lam", lam), ("gamma_lang", gamma_lang)):
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        lo, hi = adaptive_quantiles
        for name, value in (("lp_quantile", lp_quantile), ("adaptive_quantiles", lo),
                            ("adaptive_quantiles", hi)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        if lo > hi:
            raise ValueError(f"adaptive_quantiles must be (low, high) with low <= high, got {(lo, hi)}")
        self.gamma, self.lam, self.lp_quantile = float(gamma), float(lam), float(lp_quantile)
        self.adaptive, self.adaptive_quantiles = adaptive, (float(lo), float(hi))
        self.eta, self.detach_prior = eta, detach_prior
        self.monolithic, self.backend, self.check_finite = monolithic, backend, check_finite
        self.steer, self.gamma_lang = steer, float(gamma_lang)

    def extra_repr(self) -> str:
        if self.monolithic:
            return f"monolithic, eta={self.eta}, reduction={self.reduction!r}"
        return (f"gamma={self.gamma}, lam={self.lam}, lp_quantile={self.lp_quantile}, "
                f"adaptive={self.adaptive}, eta={self.eta}, reduction={self.reduction!r}")

    def forward(self, s: Tensor, u: Optional[Tensor], a: Tensor, b: Optional[Tensor],
                mask: Optional[Tensor] = None, *,
                num_items_in_batch: Optional[Count] = None) -> VGSLossOutput:
        """s, u, a, b: logits [..., T, V] (student/teacher, with/without the image); mask: bool or
        0/1 of the leading shape (True = response token). num_items_in_batch: reduction "token"
        only. The VDS quantiles are taken over this call's valid tokens (under gradient
        accumulation the LP gate and γ_t follow each micro-batch, as in a per-batch quantile)."""
        mono = self.monolithic or (u is None and b is None)
        if mono and self.steer == "language":
            raise ValueError("steer='language' needs the text-only logits u and b (got None)")
        kl = functools.partial(decomposed_kl, mask=mask, temperature=self.temperature,
                               detach_prior=self.detach_prior, backend=self.backend, check_finite=self.check_finite)
        terms = kl(s, None if mono else u, a, None if mono else b)
        if self.steer == "language":  # VP = the Vis term with the text-only student in place of p (Eq. 21)
            return self.reduce_language(terms, kl(u, u, a, b).vis, mask, num_items_in_batch)
        return self.reduce(terms, mask, monolithic=mono, num_items_in_batch=num_items_in_batch)

    def reduce_language(self, terms: KLTerms, vp: Tensor, mask: Optional[Tensor],
                        num_items_in_batch: Optional[Count] = None) -> VGSLossOutput:
        """Language steering (Eq. 19-21) from per-position terms and KL(pu ‖ q*) per position."""
        valid = valid_mask(mask, terms.std.shape, terms.std.device)
        w = self.reduction_weights(valid, terms.std.dtype, num_items_in_batch)
        red = (lambda x: w * x) if self.reduction == "none" else (lambda x: (w * x).sum())
        vds = terms.vds.detach()
        _, gate = self.vds_factors(vds, valid)
        std, lang, vp = red(terms.std), red(terms.lang), red(gate * vp)
        total = std + self.gamma_lang * lang + self.lam * vp
        zero = torch.zeros_like(std)
        return VGSLossOutput(total if self.eta is None else self.eta * total, std, zero, zero.clone(), vds,
                             weights=self.weights(), eta=self.eta, extra={"lang": lang, "vp": vp})

    # ------------------------------------------------------------------ per-term cotangents

    def weights(self, monolithic: bool = False) -> Dict[str, float]:
        """The components' weights in total = η Σ weight · component (η excluded)."""
        if monolithic:
            return {"std": 1.0}
        if self.steer == "language":
            return {"std": 1.0, "lang": self.gamma_lang, "vp": self.lam}
        return {"std": 1.0, "vis": self.gamma, "lp": self.lam}

    def vds_factors(self, vds: Tensor, valid: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        """(f, g) from the detached VDS: the adaptive-γ factor f_t ∈ {0, 1/2, 1} (None when not
        adaptive, i.e. 1) and the LP gate g_t ∈ {0, 1}, both in vds.dtype."""
        vds = vds.detach()
        q = masked_quantile(vds, valid, (self.lp_quantile,) + self.adaptive_quantiles)
        gate = (vds > q[0]).to(vds.dtype)
        if not self.adaptive:
            return None, gate
        f = torch.where(vds < q[1], 0.0, torch.where(vds > q[2], 1.0, 0.5)).to(vds.dtype)
        return f, gate

    def combine(self, std: Tensor, vis: Tensor, lp: Tensor) -> Tensor:
        total = std + self.gamma * vis + self.lam * lp
        return total if self.eta is None else self.eta * total

    def reduce(self, terms: KLTerms, mask: Optional[Tensor], *, monolithic: bool = False,
               num_items_in_batch: Optional[Count] = None) -> VGSLossOutput:
        """The loss from per-position terms (e.g. of `decomposed_kl`, leading shape [..., T])."""
        valid = valid_mask(mask, terms.std.shape, terms.std.device)
        w = self.reduction_weights(valid, terms.std.dtype, num_items_in_batch)
        red = (lambda x: w * x) if self.reduction == "none" else (lambda x: (w * x).sum())
        std = red(terms.std)
        if monolithic:
            zero = torch.zeros_like(std)
            return VGSLossOutput(self.combine(std, zero, zero), std, zero, zero.clone(), None,
                                 weights=self.weights(True), eta=self.eta)
        vds = terms.vds.detach()
        f, gate = self.vds_factors(vds, valid)
        vis = red(terms.vis if f is None else f * terms.vis)
        lp = red(gate * terms.lang)
        return VGSLossOutput(self.combine(std, vis, lp), std, vis, lp, vds, weights=self.weights(),
                             eta=self.eta)


def vgs_loss(s: Tensor, u: Optional[Tensor], a: Tensor, b: Optional[Tensor],
             mask: Optional[Tensor] = None, *, gamma: float = 2.0, lam: float = 0.01,
             lp_quantile: float = 0.7, adaptive: bool = False,
             adaptive_quantiles: Tuple[float, float] = (0.4, 0.7),
             eta: Optional[Union[float, Tensor]] = None, reduction: str = "sequence",
             num_items_in_batch: Optional[Count] = None,
             temperature: float = 1.0, detach_prior: bool = True, monolithic: bool = False,
             backend: Optional[str] = None, check_finite: bool = False, steer: str = "visual",
             gamma_lang: Optional[float] = None) -> VGSLossOutput:
    """Functional form of `VGSLoss` (same arguments; see its docstring)."""
    return VGSLoss(gamma, lam, lp_quantile, adaptive, eta, reduction,
                   adaptive_quantiles=adaptive_quantiles, temperature=temperature,
                   detach_prior=detach_prior, monolithic=monolithic, backend=backend,
                   check_finite=check_finite, steer=steer, gamma_lang=gamma_lang)(s, u, a, b, mask, num_items_in_batch=num_items_in_batch)


class FusedLinearVGSLoss(VGSLoss):
    """`VGSLoss` from hidden states and LM-head weights, never materialising the [N, V] logits.

    Same configuration as VGSLoss (reductions "sequence", "token", "sum"), plus: logit_scale,
    softcap (number or (student, teacher) pair), vocab_size, chunk_size / memory_budget,
    fp32_weight_grad (see `fused_linear_decomposed_kl`) and
    components: True (default) keeps the gradients of std, vis and lp apart, so out.std, out.vis
      and out.lp are each differentiable (exact steering: one backward per component) and
      out.total too; False computes only the combined gradient (2 matmuls and one kl_backward
      pass per chunk fewer, one dW buffer instead of three); then only out.total is
      differentiable and out.std, out.vis, out.lp are detached values. With GradientSteering,
      pass the whole output, ``steer.backward(out)``: on steps with one combined backward
      (policy "fixed", auto's steps between measurements) False is enough, and a step that
      needs the components raises; ``loss_fn.components = steer.needs_components`` before each
      forward picks the cheaper mode whenever it is safe.
    The gradients are computed in forward (module docstring); backward only scales them, so
    calling backward on several outputs (retain_graph=True) costs no recomputation.
    """

    def __init__(self, gamma: float = 2.0, lam: float = 0.01, lp_quantile: float = 0.7,
                 adaptive: bool = False, eta=None, reduction: str = "sequence", *,
                 components: bool = True, logit_scale: Pair = 1.0, softcap: Optional[Pair] = None,
                 vocab_size: Optional[int] = None, chunk_size: Optional[int] = None,
                 memory_budget: Optional[int] = None, fp32_weight_grad: bool = True, **kwargs):
        super().__init__(gamma, lam, lp_quantile, adaptive, eta, reduction, **kwargs)
        if self.steer != "visual":
            raise ValueError(f"steer={self.steer!r} is implemented on logits only (VGSLoss); "
                             "FusedLinearVGSLoss computes the visual steering loss")
        if reduction == "none":
            raise ValueError("FusedLinearVGSLoss needs a scalar reduction ('sequence', 'token', "
                             "'sum'); use fused_linear_decomposed_kl for per-position terms")
        self.components, self.logit_scale, self.softcap = components, logit_scale, softcap
        self.vocab_size, self.chunk_size, self.memory_budget = vocab_size, chunk_size, memory_budget
        self.fp32_weight_grad = fp32_weight_grad

    def forward(self, h_s: Tensor, h_u: Optional[Tensor], w_student: Tensor, h_a: Tensor,
                h_b: Optional[Tensor], w_teacher: Tensor, mask: Optional[Tensor] = None, *,
                bias_student: Optional[Tensor] = None, bias_teacher: Optional[Tensor] = None,
                num_items_in_batch=None) -> VGSLossOutput:
        """Shapes as `fused_linear_decomposed_kl`; returns VGSLossOutput like VGSLoss.forward."""
        mono = self.monolithic or (h_u is None and h_b is None)
        h_u, h_b = (None, None) if mono else (h_u, h_b)
        w_student, w_teacher, bias_student, bias_teacher = vocab_heads(w_student, w_teacher, bias_student,
                                                                       bias_teacher, self.vocab_size)
        check_inputs(h_s, h_u, w_student, h_a, h_b, w_teacher, mask, bias_student, bias_teacher,
                     self.temperature, self.softcap, self.chunk_size)
        lead = h_s.shape[:-1]
        weights = self.reduction_weights(valid_mask(mask, lead, h_s.device), acc_dtype(h_s, h_a), num_items_in_batch)
        coeffs = ([(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)] if self.components
                  else [(1.0, self.gamma, self.lam)])
        cfg = FusedLinearConfig(self.temperature, self.logit_scale, self.softcap, self.detach_prior,
                                self.chunk_size, self.memory_budget, self.fp32_weight_grad, self.backend)
        values, comps, terms, _ = fused_linear_kl_loss(
            h_s, h_u, w_student, h_a, h_b, w_teacher, mask, weights, coeffs, cfg, bias_student=bias_student,
            bias_teacher=bias_teacher, gate=None if mono else Gate(self.vds_factors, self.adaptive))
        if self.check_finite and not bool(terms.isfinite().all()):
            raise ValueError("fused_linear VGS loss: non-finite KL terms (NaN/Inf in the hidden "
                             "states or LM-head weights?)")
        if self.components:
            std, vis, lp = values
            total = self.combine(std, vis, lp)
        else:
            std, vis, lp = comps.unbind(0)
            total = values[0] if self.eta is None else self.eta * values[0]
        vds = None if mono else terms[3].reshape(lead)
        return VGSLossOutput(total, std, vis, lp, vds, weights=self.weights(mono), eta=self.eta,
                             components=self.components)
