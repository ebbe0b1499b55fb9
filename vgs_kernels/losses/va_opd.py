"""VA-OPD: Visual-Advantage on-policy distillation (arXiv 2605.21924), on our KL kernels.

The paper's code is not public; this is its definition as this library implements it:

* passes: student with the image (logits s), teacher with the image (a), teacher with a weakened
  view (ã): the image shrunk to 10 % of its size (bilinear) and enlarged back (nearest), so the
  number of visual tokens is unchanged, or, cheaper, the text-only prompt (b);
* per token t of rollout k, on the sampled token y_t:
  VA_t = max(log softmax(a/T)[y_t] − log softmax(ã/T)[y_t], 0) (0 on padding);
* rollout weight: the rollout's mean VA over its valid tokens (0 without any), z-scored among the
  rollouts of its prompt (population std, z = (m − μ) / (σ + 1e-6)), then w_k = softmax over the
  prompt's rollouts of z_k / τ; no gradient through the weights;
* token groups: in each rollout the top ⌊top_frac · n⌋ of its n valid tokens by VA (at least one;
  ties to the earlier position) form H, the rest L; loss_k = λ · mean_H KL_t + (1 − λ) · mean_L KL_t
  with KL_t = KL(softmax(s/T) ‖ softmax(a/T)) over the full vocabulary (the Std term); an empty L
  contributes 0, a rollout without a valid token has loss 0;
* loss = Σ_k w_k · loss_k within each prompt, averaged over the prompts.

`VAOPDLoss.forward` takes logits; `VAOPDLoss.fused_linear` takes hidden states and LM heads (KL_t
through `fused_linear_decomposed_kl`, no [N, V] logits; VA from the teachers' LSE per chunk).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from vgs_kernels.ops.decomposed_kl import acc_dtype, decomposed_kl, kl_forward, valid_mask
from vgs_kernels.losses.base import DistillationLoss
from vgs_kernels.ops.fused_linear import (HeadPair, Pair, as_pair, chunk_rows, compute_dtype,
                                         fused_linear_decomposed_kl, vocab_heads)


class VAOPDOutput(NamedTuple):
    """total: scalar loss; va [B, T] float32 (0 on padding); weights [B] rollout weights (detached);
    kl [B, T] per-token reverse KL (differentiable); high [B, T] bool, the H group."""

    total: Tensor
    va: Tensor
    weights: Tensor
    kl: Tensor
    high: Tensor


def degrade_image(image, factor: float = 0.1):
    """VA-OPD's weak view of a PIL image: shrunk to `factor` of its size (bilinear), enlarged back
    (nearest), so its size and the number of visual tokens are unchanged."""
    from PIL import Image

    w, h = image.size
    small = image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BILINEAR)
    return small.resize((w, h), Image.NEAREST)


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T)[tokens]: [..., V], [...] -> [...] float32, no gradient (LSE by our kernel)."""
    rows = logits.detach().reshape(-1, logits.shape[-1])
    lse = kl_forward(rows, None, rows, None, 1.0 / temperature)[1][0]
    picked = rows.gather(1, tokens.reshape(-1, 1).clamp(0, rows.shape[1] - 1))  # padding ids may be anything
    picked = picked.squeeze(1).to(lse.dtype) / temperature
    return (picked - lse).reshape(tokens.shape)


@torch.no_grad()
def head_token_logprobs(h: Tensor, w: Tensor, tokens: Tensor, bias: Optional[Tensor] = None,
                        temperature: float = 1.0, logit_scale: float = 1.0, softcap: Optional[float] = None,
                        chunk_size: Optional[int] = None, vocab_size: Optional[int] = None) -> Tensor:
    """`token_logprobs` of the head's logits (h [..., H], w [V, H], tokens [...]), a chunk of rows at a time;
    vocab_size: over the first n ids (`vocab_heads`)."""
    out, (w, _, bias, _) = acc_dtype(h), vocab_heads(w, w, bias, bias, vocab_size)
    heads = HeadPair(w, bias, w, bias, (compute_dtype(h),) * 2, out, logit_scale, softcap)
    n, flat_tok, rows = tokens.numel(), tokens.reshape(-1), h.reshape(-1, h.shape[-1])
    chunk = chunk_size or chunk_rows(n, w.shape[0], torch.finfo(out).bits // 8, device=h.device)
    out = torch.zeros(n, device=h.device)
    for i in range(0, n, chunk):
        out[i:i + chunk] = token_logprobs(heads.logits(rows[i:i + chunk], 0), flat_tok[i:i + chunk], temperature)
    return out.reshape(tokens.shape)


def log_gap(lp_a: Tensor, lp_weak: Tensor) -> Tensor:
    """log p_a(y) - log p_weak(y), 0 where both are -inf (neither view can produce the token)."""
    both = (lp_a == -math.inf) & (lp_weak == -math.inf)
    return torch.where(both, 0.0, lp_a - lp_weak)


class VAOPDLoss(DistillationLoss):
    """VA-OPD (module docstring). top_frac: share of each rollout's tokens in H; lam: λ, the weight of
    H's mean KL; tau: τ of the rollout softmax; temperature: T of every softmax. Its one reduction,
    "rollout": Σ_k w_k loss_k per prompt, averaged over prompts (module docstring)."""

    reductions = ("rollout",)

    def __init__(self, top_frac: float = 0.2, lam: float = 0.5, tau: float = 1.0, temperature: float = 1.0,
                 eps: float = 1e-6):
        super().__init__("rollout", temperature)
        if not 0 < top_frac <= 1:
            raise ValueError(f"top_frac must be in (0, 1], got {top_frac!r}")
        if not 0 <= lam <= 1:
            raise ValueError(f"lam must be in [0, 1], got {lam!r}")
        if not 0 < tau < math.inf:
            raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
        self.top_frac, self.lam, self.tau, self.eps = top_frac, lam, tau, eps

    def forward(self, s: Tensor, a: Tensor, a_weak: Tensor, tokens: Tensor, mask: Optional[Tensor],
                group_ids: Tensor) -> VAOPDOutput:
        """s, a, a_weak: [B, T, V] logits (student, teacher, teacher on the weak view); tokens [B, T]
        sampled ids; mask [B, T] bool or 0/1 (None: all valid); group_ids [B], one id per prompt."""
        if s.dim() != 3 or a.shape != s.shape or a_weak.shape != s.shape:
            raise ValueError(f"s, a and a_weak must be [B, T, V] logits of one shape, got {tuple(s.shape)}, "
                             f"{tuple(a.shape)}, {tuple(a_weak.shape)}")
        valid = self._check(tokens, mask, group_ids, s.shape[:2], s.shape[2], s.device)
        kl = decomposed_kl(s, None, a, None, valid, self.temperature).std
        va = log_gap(token_logprobs(a, tokens, self.temperature), token_logprobs(a_weak, tokens, self.temperature))
        return self.combine(kl, va, valid, group_ids)

    def fused_linear(self, h_s: Tensor, w_student: Tensor, h_a: Tensor, h_weak: Tensor, w_teacher: Tensor,
                     tokens: Tensor, mask: Optional[Tensor], group_ids: Tensor, *,
                     bias_student: Optional[Tensor] = None, bias_teacher: Optional[Tensor] = None,
                     logit_scale: Pair = 1.0, softcap: Optional[Pair] = None,
                     chunk_size: Optional[int] = None, vocab_size: Optional[int] = None) -> VAOPDOutput:
        """The same from hidden states: h_s [B, T, H_s], h_a / h_weak [B, T, H_t], heads [V, H_*] (the
        logit transforms of `fused_linear_decomposed_kl`). Differentiable w.r.t. h_s, w_student,
        bias_student. vocab_size: over the first n ids (padded heads, `fused_linear_decomposed_kl`). Cost: the
        OPD loss's four head products plus two teacher ones (a's LSE, ã)."""
        w_student, w_teacher, bias_student, bias_teacher = vocab_heads(w_student, w_teacher, bias_student,
                                                                       bias_teacher, vocab_size)
        if h_weak.shape != h_a.shape:
            raise ValueError(f"h_weak must match h_a {tuple(h_a.shape)}, got {tuple(h_weak.shape)}")
        valid = self._check(tokens, mask, group_ids, h_s.shape[:2], w_student.shape[0], h_s.device)
        kl = fused_linear_decomposed_kl(h_s, None, w_student, h_a, None, w_teacher, valid,
                                        bias_student=bias_student, bias_teacher=bias_teacher,
                                        temperature=self.temperature, logit_scale=logit_scale, softcap=softcap,
                                        chunk_size=chunk_size).std
        gap = [head_token_logprobs(h, w_teacher, tokens, bias_teacher, self.temperature,
                                   as_pair(logit_scale, "logit_scale")[1], as_pair(softcap, "softcap")[1], chunk_size)
                   for h in (h_a, h_weak)]
        return self.combine(kl, log_gap(*gap), valid, group_ids)

    def combine(self, kl: Tensor, va_raw: Tensor, valid: Tensor, group_ids: Tensor) -> VAOPDOutput:
        """From per-token KL [B, T] (differentiable) and log-prob gaps [B, T] to the loss (definition).
        ValueError where a valid token's KL is infinite (its gradient would be NaN)."""
        bad = valid & torch.isinf(kl.detach())
        if bool(bad.any()):
            raise ValueError("VAOPDLoss: the teacher gives probability 0 (a logit of -inf) to tokens the student "
                             f"gives probability > 0, at positions {bad.nonzero().tolist()[:4]}: the reverse KL is "
                             "infinite; mask the same vocabulary entries in the student's logits")
        va = self.visual_advantage(va_raw, valid)
        weights, n_groups = self.rollout_weights(va, valid, group_ids)
        loss_k, high = self.rollout_losses(kl, va, valid)
        return VAOPDOutput((weights * loss_k).sum() / max(n_groups, 1), va, weights, torch.where(valid, kl, 0.0), high)

    @staticmethod
    def visual_advantage(gap: Tensor, valid: Tensor) -> Tensor:
        """VA_t = max(gap_t, 0), 0 on padding: [B, T] float32, detached. ValueError where it is infinite
        (the weak view gives a sampled token probability 0): no finite weighting of the rollouts."""
        va = torch.where(valid, gap.detach().float().clamp(min=0), 0.0)
        if bool(torch.isinf(va).any()):
            raise ValueError("VAOPDLoss: the teacher on the weak view gives sampled tokens probability 0 (a logit "
                             f"of -inf at positions {torch.isinf(va).nonzero().tolist()[:4]}): their visual "
                             "advantage is infinite; mask those positions or keep the weak view's vocabulary open")
        return va

    def rollout_weights(self, va: Tensor, valid: Tensor, group_ids: Tensor) -> Tuple[Tensor, int]:
        """(w [B], number of prompts): softmax over each prompt's rollouts of the z-scored mean VA / τ."""
        mean_va = va.sum(1) / valid.sum(1).clamp(min=1)
        _, g = torch.unique(group_ids, return_inverse=True)
        n_groups = int(g.max()) + 1 if g.numel() else 0
        size = torch.zeros(n_groups, device=va.device).index_add_(0, g, torch.ones_like(mean_va))
        mu = torch.zeros_like(size).index_add_(0, g, mean_va) / size
        var = torch.zeros_like(size).index_add_(0, g, (mean_va - mu[g]).square()) / size
        z = (mean_va - mu[g]) / (var.sqrt()[g] + self.eps)
        # the max out before dividing by tau: z / tau overflows for a tiny tau (-> the one-hot argmax)
        e = ((z - torch.full_like(size, -math.inf).scatter_reduce(0, g, z, "amax")[g]) / self.tau).exp()
        return e / torch.zeros_like(size).index_add_(0, g, e)[g], n_groups

    def rollout_losses(self, kl: Tensor, va: Tensor, valid: Tensor) -> Tuple[Tensor, Tensor]:
        """(loss_k [B], H [B, T] bool): λ · mean_H KL + (1 − λ) · mean_L KL per rollout."""
        count = valid.sum(1)
        # H: the top ⌊top_frac·n⌋ (>= 1) valid tokens by VA; a stable descending sort keeps ties in position order
        order = torch.where(valid, va, -math.inf).sort(dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(va.shape[1], device=va.device).expand_as(order))
        high = valid & (rank < (count.double() * self.top_frac).floor().long().clamp(min=1)[:, None])
        low = valid & ~high
        kl = torch.where(valid, kl, 0.0)

        def group_mean(sel: Tensor) -> Tensor:
            return (kl * sel).sum(1) / sel.sum(1).clamp(min=1)

        return self.lam * group_mean(high) + (1 - self.lam) * group_mean(low), high

    @staticmethod
    def _check(tokens, mask, group_ids, lead, vocab, device) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.shape != lead or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be integer ids of shape {tuple(lead)}, got "
                             f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else tokens!r}")
        valid = valid_mask(mask, tuple(lead), device)
        if valid.shape != lead:
            raise ValueError(f"mask must have shape {tuple(lead)}, got {tuple(valid.shape)}")
        if bool(((tokens < 0) | (tokens >= vocab))[valid].any()):
            raise ValueError(f"tokens must be ids in [0, {vocab}) at the valid positions")
        if not isinstance(group_ids, Tensor) or group_ids.shape != lead[:1]:
            raise ValueError(f"group_ids must have shape ({lead[0]},) (one prompt id per rollout), got "
                             f"{tuple(group_ids.shape) if isinstance(group_ids, Tensor) else group_ids!r}")
        return valid
