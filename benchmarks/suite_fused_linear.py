"""Suite 4 — fused-linear decomposed KL against the materialised path at large V.

Both compute, from hidden states [N, H] and LM-head weights [V, H], the masked token mean of
Std + γ·Vis + λ·Lang and its gradients for h_s, h_u and the student head weight, forward +
backward. Materialised: the four [N, V] logit tensors (F.linear), then the fused `decomposed_kl`
op on them. Fused: `fused_linear_decomposed_kl`, chunked over positions, never holding [N, V].
Peak memory is the issue-7 figure of merit (goal: <= 25% of the materialised path, time <= 1.2x).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import baselines as B
from .harness import Case, Impl, tolerance

N_IMPLS = 2


def case(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Case:
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

    def run(terms_fn):
        def setup():
            for x in leaves.values():
                x.grad = None

        def step(_):
            t = terms_fn()
            loss = B.weighted_loss(t.std, t.vis, t.lang, mask)
            loss.backward()
            return {"loss": loss.detach(), **t._asdict(), **{"d" + k: x.grad for k, x in leaves.items()}}
        return setup, step

    def fused():
        return vgs.fused_linear_decomposed_kl(h_s, h_u, w_s, h_a, h_b, w_t, mask)

    def materialised():
        s, u = F.linear(h_s, w_s), F.linear(h_u, w_s)
        a, b = F.linear(h_a, w_t), F.linear(h_b, w_t)
        return vgs.decomposed_kl(s, u, a, b, mask)

    (setup_f, step_f), (setup_m, step_m) = run(fused), run(materialised)
    impls = [Impl("vgs fused-linear", step_f, setup_f, reference="materialised"),
             Impl("materialised", step_m, setup_m)]
    params = {"N": n, "H": h, "V": v, "dtype": str(dtype).replace("torch.", "")}
    # The two paths round the logits differently (chunked matmuls), hence a looser fp32 tolerance.
    return Case("fused-linear", params, impls, baselines=["materialised"],
                tolerance=max(tolerance(dtype), 2e-3))
