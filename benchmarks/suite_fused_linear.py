"""Suite 4 — fused-linear against the materialised path at large V.

Both start from hidden states [N, H] and LM-head weights [V, H] and end with the gradients for
h_s, h_u and the student head weight. Two cases per size:

* ``loss step`` (the issue-7 figure of merit: peak memory <= 25 % of the materialised path, time
  <= 1.2x): `FusedLinearVGSLoss(components=False)` (gradients computed during the forward, a chunk
  of logits at a time) vs the four [N, V] logit tensors (F.linear) + `VGSLoss`, one backward of
  ``out.total`` each. This is the path of a fixed- / auto-η training step.
* ``terms op``: `fused_linear_decomposed_kl` (per-position KLTerms, any cotangents, so its backward
  recomputes the chunks' logits) vs F.linear + `decomposed_kl`, differentiating the masked token
  mean of Std + γ·Vis + λ·Lang.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from . import baselines as B
from .harness import Case, Impl, tolerance

N_IMPLS = 4


def cases(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> List[Case]:
    import vgs_kernels as vgs

    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    w_s = randn(v, h, scale=h ** -0.5).requires_grad_(True)
    w_t = w_s.detach() + randn(v, h, scale=0.5 * h ** -0.5)
    h_s = randn(n, h, scale=2.0).requires_grad_(True)
    h_u = (h_s.detach() + randn(n, h)).requires_grad_(True)
    h_a = h_s.detach() + randn(n, h)
    h_b = h_a + randn(n, h)
    mask = torch.ones(n, dtype=torch.bool, device=device)
    leaves = {"h_s": h_s, "h_u": h_u, "w_s": w_s}

    def setup():
        for x in leaves.values():
            x.grad = None

    def timed(loss_fn):
        """A step: the scalar from loss_fn, its backward, and every gradient (checked, then timed)."""
        def step(_):
            loss, extra = loss_fn()
            loss.backward()
            return {"loss": loss.detach(), **extra, **{"d" + k: x.grad for k, x in leaves.items()}}
        return step

    def logits():
        return F.linear(h_s, w_s), F.linear(h_u, w_s), F.linear(h_a, w_t), F.linear(h_b, w_t)

    materialised_loss, fused_loss = vgs.VGSLoss(reduction="token"), vgs.FusedLinearVGSLoss(
        reduction="token", components=False)

    def loss_step(out):
        return out.total, {"vds": out.vds}

    def terms_step(t):
        return B.weighted_loss(t.std, t.vis, t.lang, mask), t._asdict()

    params = {"N": n, "H": h, "V": v, "dtype": str(dtype).replace("torch.", "")}
    # The two paths round the logits differently (chunked matmuls), hence a looser fp32 tolerance.
    tol = max(tolerance(dtype), 2e-3)
    return [
        Case("fused-linear", {**params, "path": "loss step"}, [
            Impl("vgs fused-linear", timed(lambda: loss_step(
                fused_loss(h_s, h_u, w_s, h_a, h_b, w_t, mask))), setup, reference="materialised"),
            Impl("materialised", timed(lambda: loss_step(materialised_loss(*logits(), mask))), setup),
        ], baselines=["materialised"], tolerance=tol),
        Case("fused-linear", {**params, "path": "terms op"}, [
            Impl("vgs fused-linear", timed(lambda: terms_step(
                vgs.fused_linear_decomposed_kl(h_s, h_u, w_s, h_a, h_b, w_t, mask))), setup,
                reference="materialised"),
            Impl("materialised", timed(lambda: terms_step(vgs.decomposed_kl(*logits(), mask))), setup),
        ], baselines=["materialised"], tolerance=tol),
    ]
