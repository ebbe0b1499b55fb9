"""Gradient-geometry probe (the paper's Fig. 3): angles between ∇Lang, ∇Vis and ∇Std per VDS decile.

For one batch of the four response logits, the valid tokens are ranked by their VDS (the teacher's
visual dependency KL(qa ‖ qb)) and split into ``bins`` equal-count bins. For each bin, the gradient of
each term restricted to the bin's tokens (weighted 1/|τ| per sequence, as in the loss) is taken w.r.t.
the given student parameters, and one Gram matrix of the three gradients (:func:`vgs_kernels.ops.gram`)
gives their norms and pairwise angles. The paper reports ∠(∇Lang, ∇Vis) rising from ≈ 60° on low-VDS
tokens to ≈ 92° on the top decile, with ∇Std ≈ 40–50° from both.

    rows = gradient_geometry(vgs.distill_logits(student, teacher, batch, response_mask),
                             student.parameters())
    plot_gradient_geometry(rows, "geometry.png")

Cost: 3 backward passes per bin (+3 for the whole batch), each keeping one gradient per term; pass a
subset of parameters (e.g. the last blocks) to bound the memory on large models.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch

from vgs_kernels.ops import decomposed_kl, gram
from vgs_kernels.steering import policies

TERMS = ("lang", "vis", "std")


@dataclass
class GeometryRow:
    """One VDS bin (``bin`` = -1: all valid tokens). Angles in degrees (NaN where a gradient is zero).

    eta is the exact VGS step-size factor ‖∇Std‖ / ‖∇Std + γ∇Vis‖ on the bin's tokens (Eq. 15).
    """

    bin: int
    tokens: int
    vds_lo: float
    vds_hi: float
    angle_lang_vis: float
    angle_lang_std: float
    angle_vis_std: float
    norm_lang: float
    norm_vis: float
    norm_std: float
    eta: float

    def as_dict(self) -> dict:
        return asdict(self)


def vds_bins(vds: torch.Tensor, mask: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-count VDS bins: [B, T] int64 in [0, bins) on valid tokens (by rank, ties by position), -1 elsewhere."""
    flat = torch.where(mask, vds.float(), torch.inf).flatten()
    n = int(mask.sum())
    rank = torch.empty_like(flat, dtype=torch.long)
    rank[flat.argsort(stable=True)] = torch.arange(flat.numel(), device=flat.device)
    out = torch.where(mask.flatten(), rank * bins // max(n, 1), -1)
    return out.view(mask.shape)


def gradient_geometry(logits: Sequence[torch.Tensor], params: Iterable[torch.nn.Parameter], bins: int = 10,
                      gamma: float = 2.0, temperature: float = 1.0, detach_prior: bool = True
                      ) -> list[GeometryRow]:
    """Per-VDS-bin angles between ∇Lang, ∇Vis and ∇Std w.r.t. ``params``.

    logits: (s, u, a, b, mask) — e.g. a :class:`vgs_kernels.vlm.DistillLogits` — with s, u [B, T, V]
    attached to the student's graph, a, b [B, T, V] and mask [B, T] bool. The graph is kept (retain_graph)
    so the caller may still backpropagate. Returns ``bins`` rows (low to high VDS; bins with no token are
    left out) followed by the row for all valid tokens (bin -1).
    """
    s, u, a, b, mask = logits
    if mask is None:
        mask = torch.ones(s.shape[:-1], dtype=torch.bool, device=s.device)
    mask = mask.bool()
    if not (s.requires_grad and u.requires_grad):
        raise ValueError("s and u must be attached to the student's graph (requires_grad) to take gradients")
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("params holds no parameter that requires grad")
    terms = decomposed_kl(s, u, a, b, mask=mask, temperature=temperature, detach_prior=detach_prior)
    vds = terms.vds.detach()
    # The loss's sequence weights: 1/|τ| per token (the overall mean over sequences only rescales).
    weight = mask.float() / mask.sum(-1, keepdim=True).clamp(min=1)
    which = vds_bins(vds, mask, bins)
    steer_w = torch.tensor([0.0, gamma, 1.0], dtype=torch.float64)  # weights of (lang, vis, std)
    rows = []
    for k in [*range(bins), -1]:
        sel = mask if k == -1 else which == k
        if not bool(sel.any()):
            continue
        w = weight * sel
        grads = [_grad((getattr(terms, t) * w).sum(), params) for t in TERMS]
        G = gram(grads).double().cpu()
        norm = G.diagonal().clamp(min=0).sqrt()

        def angle(i: int, j: int) -> float:
            if norm[i] == 0 or norm[j] == 0:
                return math.nan
            return math.degrees(math.acos(float((G[i, j] / (norm[i] * norm[j])).clamp(-1, 1))))

        eta = float(policies.vgs(G, steer_w, std=2, vis=1)[2])  # Eq. 15, as the hook computes it
        v = vds[sel]
        rows.append(GeometryRow(bin=k, tokens=int(sel.sum()), vds_lo=float(v.min()), vds_hi=float(v.max()),
                                angle_lang_vis=angle(0, 1), angle_lang_std=angle(0, 2), angle_vis_std=angle(1, 2),
                                norm_lang=float(norm[0]), norm_vis=float(norm[1]), norm_std=float(norm[2]),
                                eta=eta if math.isfinite(eta) else math.nan))
    return rows


def _grad(y: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    gs = torch.autograd.grad(y, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def plot_gradient_geometry(rows: Sequence[GeometryRow], path: str | None = None, title: str | None = None,
                           ax=None):
    """Angles per VDS decile, as in the paper's Fig. 3. Saves to ``path`` if given; returns the figure."""
    import matplotlib

    if ax is None and path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    binned = [r for r in rows if r.bin >= 0]
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    else:
        fig = ax.figure
    x = [r.bin + 1 for r in binned]
    for key, label, style in [("angle_lang_vis", "∠(∇Lang, ∇Vis)", "o-"), ("angle_lang_std", "∠(∇Lang, ∇Std)", "s--"),
                              ("angle_vis_std", "∠(∇Vis, ∇Std)", "^:")]:
        ax.plot(x, [getattr(r, key) for r in binned], style, label=label)
    ax.axhline(90, color="grey", lw=0.8)
    ax.set_xlabel("VDS decile (low → high visual dependency)" if len(binned) == 10 else "VDS bin (low → high)")
    ax.set_ylabel("angle (degrees)")
    ax.set_xticks(x)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
