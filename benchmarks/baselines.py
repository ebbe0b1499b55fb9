"""The baselines the fast paths are measured against: what a user would write without this library.

Loss: the eager plain-torch four-term loss (four log_softmax, the KLs as sums of products, autograd
keeps every [N, V] intermediate) and the eager monolithic (Std-only) loss; both as one function
each too (`eager_decomposed_loss`, `eager_monolithic_loss`), which is what a user hands to
torch.compile: the compiled four-term loss is the peer the fused op must beat (issue 15). Steering: the flatten/concatenate approach of PCGrad / LibMTL (copy every gradient into one
[k, P] matrix, matmul for the Gram matrix, matmul + split to write back) and a composition of
torch._foreach_* multi-tensor ops (norms, adds, scales; no flattening, but temporaries of size P).

All of them take the same arguments as the fast paths they are compared with.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Weights of the per-term cotangents in the loss benchmarks: Std + γ·Vis + λ·Lang (VDS: none).
TERM_WEIGHTS = (1.0, 2.0, 0.01)


def _logp(x: Tensor, temperature: float) -> Tensor:
    x = x.float()
    return F.log_softmax(x if temperature == 1.0 else x / temperature, dim=-1)


def _kl(lp: Tensor, lq: Tensor) -> Tensor:
    return (lp.exp() * (lp - lq)).sum(-1)


def eager_decomposed_terms(s: Tensor, u: Tensor, a: Tensor, b: Tensor, temperature: float = 1.0,
                           detach_prior: bool = True):
    """(std, vis, lang, vds) per row, [N] fp32 each, from [N, V] logits, in plain torch."""
    ls, lu, la, lb = (_logp(x, temperature) for x in (s, u, a, b))
    lq = F.log_softmax((lu.detach() if detach_prior else lu) + la - lb, dim=-1)
    return _kl(ls, la), _kl(ls, lq), _kl(lu, lb), _kl(la, lb)


def eager_monolithic_std(s: Tensor, a: Tensor, temperature: float = 1.0) -> Tensor:
    """Std = KL(softmax(s) ‖ softmax(a)) per row, [N] fp32, in plain torch."""
    return _kl(_logp(s, temperature), _logp(a, temperature))


def weighted_loss(std: Tensor, vis: Tensor, lang: Tensor, mask: Tensor) -> Tensor:
    """The scalar every loss benchmark differentiates: masked token mean of Std + γ·Vis + λ·Lang."""
    ws, wv, wl = TERM_WEIGHTS
    m = mask.float()
    return ((ws * std + wv * vis + wl * lang) * m).sum() / m.sum().clamp_min(1.0)


def monolithic_loss(std: Tensor, mask: Tensor) -> Tensor:
    m = mask.float()
    return (std * m).sum() / m.sum().clamp_min(1.0)


def eager_decomposed_loss(s: Tensor, u: Tensor, a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """The whole four-term loss as one function (what torch.compile gets): weighted_loss of
    eager_decomposed_terms."""
    std, vis, lang, _ = eager_decomposed_terms(s, u, a, b)
    return weighted_loss(std, vis, lang, mask)


def eager_monolithic_loss(s: Tensor, a: Tensor, mask: Tensor) -> Tensor:
    """The whole monolithic loss as one function (what torch.compile gets)."""
    return monolithic_loss(eager_monolithic_std(s, a), mask)


# ------------------------------------------------------------------------------------ steering


def vgs_coefficients(G: Tensor, gamma: float) -> Tensor:
    """Eq. 15 on device (no host sync): η = ‖g0‖ / ‖g0 + γ g1‖, coefficients [η, η·γ] (k = 2)."""
    combined = G[0, 0] + 2 * gamma * G[0, 1] + gamma * gamma * G[1, 1]
    eta = G[0, 0].sqrt() / combined.clamp_min(1e-30).sqrt()
    return torch.stack([eta, eta * gamma])


def flatten_gram_combine(out: Sequence[Tensor], grads: Sequence[Sequence[Tensor]], gamma: float
                         ) -> Tensor:
    """PCGrad / LibMTL style: one [k, P] fp32 matrix of flattened gradients, two matmuls, a split."""
    flat = torch.stack([torch.cat([g.reshape(-1).float() for g in gs]) for gs in grads])
    G = flat @ flat.T
    new = vgs_coefficients(G, gamma) @ flat
    for o, piece in zip(out, new.split([o.numel() for o in out])):
        o.copy_(piece.view_as(o))
    return G


def foreach_gram_combine(out: List[Tensor], grads: Sequence[List[Tensor]], gamma: float) -> Tensor:
    """torch._foreach_* composition: squared norms for G_ii, polarisation ‖g_i+g_j‖² for G_ij."""
    k = len(grads)

    def sq_norm(ts: List[Tensor]) -> Tensor:
        return torch.stack(torch._foreach_norm(ts)).float().square().sum()

    diag = [sq_norm(list(g)) for g in grads]
    rows = [[diag[i] if i == j else None for j in range(k)] for i in range(k)]
    for i in range(k):
        for j in range(i + 1, k):
            both = torch._foreach_add(list(grads[i]), list(grads[j]))
            rows[i][j] = rows[j][i] = (sq_norm(both) - diag[i] - diag[j]) / 2
    G = torch.stack([torch.stack(r) for r in rows])
    c = vgs_coefficients(G, gamma)
    torch._foreach_copy_(out, list(grads[0]))
    torch._foreach_mul_(out, c[0])
    for i in range(1, k):
        torch._foreach_add_(out, torch._foreach_mul(list(grads[i]), c[i]))
    return G
