"""A student close to its teacher, in low precision: the case that shows rounding.

A large KL hides rounding errors of the logits (an unrelated student and teacher differ by far more
than bf16's 2^-8), so the exactness tests and `python -m benchmarks.accuracy` use this one: hidden
states and heads rounded to `dtype`, logits with standard deviation `scale` (|z| up to ~5·scale), the
teacher's differing from the student's by ~N(0, d²) per token with d set so that KL ≈ `kl` per token.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
from torch import Tensor


def close_pair(n: int = 64, hidden: int = 256, vocab: int = 32_000, kl: float = 0.0125, scale: float = 3.0,
               dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Dict[str, Tensor]:
    """Tensors of a distillation step (no grad flags set), rounded to `dtype`:

    h_s, h_u [n, hidden]: the student's last hidden states with and without the image; h_a, h_b: the
    teacher's; w_s, w_t [vocab, hidden]: the LM heads. Std = KL(p ‖ qa), Vis, Lang and VDS are all
    ~`kl` per token (the text-only rows differ from the image rows as much as the models do);
    tokens [n]: ids sampled from the teacher with the image (VA-OPD's y_t)."""
    g = torch.Generator().manual_seed(seed)
    # KL ≈ Var_p(δz) / 2 for a small logit difference δz; the head and the hidden states each add half of it
    d = kl ** 0.5 / scale

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    h_s = randn(n, hidden)
    w_s = randn(vocab, hidden) * (scale / hidden ** 0.5)
    w_t = w_s + randn(vocab, hidden) * (d * scale / hidden ** 0.5)
    h_a = h_s + randn(n, hidden) * d
    h_u, h_b = h_s + randn(n, hidden) * d, h_a + randn(n, hidden) * d
    probs = torch.softmax(h_a @ w_t.T, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=g).squeeze(1)
    out = {k: v.to(dtype) for k, v in dict(h_s=h_s, h_u=h_u, h_a=h_a, h_b=h_b, w_s=w_s, w_t=w_t).items()}
    return {**out, "tokens": tokens}


def opd_errors(fns: Sequence[Callable], seed: int = 0, autocast: bool = False, **kw) -> List[List[float]]:
    """For each fn with `trl.trainer.distillation_trainer._chunked_divergence_loss`'s call shape (beta=1):
    the relative errors (loss, grad h_s, grad W_s) against fp64 on `close_pair(seed=seed)`'s bf16-rounded
    tensors, given as bf16 (or fp32 under bf16 autocast, as Trainer(bf16=True) runs). kw: the
    transform arguments (temperature, *_logit_scale, *_final_logit_softcapping)."""
    from vgs_kernels.losses.opd import fused_chunked_divergence_loss  # the fp64 reference

    x = close_pair(seed=seed)
    mask = torch.ones(1, x["h_s"].shape[0], dtype=torch.long)

    def step(f: Callable, dt: torch.dtype, amp: bool) -> List[Tensor]:
        hs, ws = x["h_s"].to(dt).requires_grad_(), x["w_s"].to(dt).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = f(hs[None], x["h_a"].to(dt)[None], ws, x["w_t"].to(dt), mask, 1.0, **kw)[0]
        return [loss.detach().double(), *(g.double() for g in torch.autograd.grad(loss, [hs, ws]))]

    ref = step(fused_chunked_divergence_loss, torch.float64, False)
    dt = torch.float32 if autocast else torch.bfloat16
    return [[float((g - r).norm() / r.norm()) for g, r in zip(step(fn, dt, autocast), ref)] for fn in fns]
