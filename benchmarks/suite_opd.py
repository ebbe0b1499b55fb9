"""Suite — plain OPD (trl.DistillationTrainer(beta): 1 the reverse KL, 0 the forward KL, 0.5 the JSD) against
TRL's own loss with the same beta.

The benchmark a TRL user looks at: forward + backward of the loss from hidden states and LM heads,
ending with the gradients of the student's hidden states and head weight, for

* ``vgs fused OPD``: `vgs_kernels.fused_chunked_divergence_loss` (the drop-in, gradients computed in
  forward while a chunk's logits are fresh: four [N, H] x [H, V]-sized products);
* ``trl chunked``: `trl.trainer.distillation_trainer._chunked_divergence_loss(beta)` (the
  reference of the agreement check; tiles recomputed in backward: six products; on a CPU it
  projects every position, padding included, as TRL does off Triton devices);
* ``4-matmul floor``: the four products an exact fused reverse KL cannot avoid (both heads forward,
  dh_s = dz @ W_s, dW_s = dz^T h_s), plain `torch.matmul` over the valid rows in chunks of
  FLOOR_CHUNK rows (no softmax, no KL), so "speedup vs floor" = floor time / loss time (<= 1).

Inputs are [B, K, H] with N valid completion tokens; ``pad`` > 0 adds that share of padding
positions (mask 0) to every row, as right-padded completions have.
"""
from __future__ import annotations

import math
from typing import List

import torch

from .harness import Case, Impl, tolerance

N_IMPLS = 3
FLOOR_CHUNK = 1024
ROWS = 4  # B: rollouts per micro-batch


BETAS = (1.0, 0.0, 0.5)


def cases(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, pad: float = 0.0,
          seed: int = 0, betas=BETAS) -> List[Case]:
    """One case per beta on the same inputs (the floor does not depend on it)."""
    import vgs_kernels as vgs
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    k_valid = math.ceil(n / ROWS)
    k = math.ceil(k_valid / (1 - pad)) if pad else k_valid
    mask = torch.zeros(ROWS, k, dtype=torch.long, device=device)
    mask[:, :k_valid] = 1  # right padding: N' = ROWS * k_valid valid tokens
    w_s = randn(v, h, scale=h ** -0.5).requires_grad_(True)
    w_t = w_s.detach() + randn(v, h, scale=0.5 * h ** -0.5)
    h_s = randn(ROWS, k, h, scale=2.0).requires_grad_(True)
    h_t = h_s.detach() + randn(ROWS, k, h)
    leaves = {"h_s": h_s, "w_s": w_s}

    def setup():
        for x in leaves.values():
            x.grad = None

    def timed(loss_fn, beta):
        def step(_):
            loss = loss_fn(h_s, h_t, w_s, w_t, mask, beta)[0]
            loss.backward()
            return {"loss": loss.detach(), **{"d" + name: x.grad for name, x in leaves.items()}}
        return step

    rows = mask.reshape(-1).nonzero().squeeze(1)

    def floor(_):
        hs, ht = h_s.detach().reshape(-1, h)[rows], h_t.reshape(-1, h)[rows]
        ws, wt = w_s.detach(), w_t
        dh = torch.empty_like(hs)
        dw = torch.zeros(ws.shape, dtype=torch.float32, device=device)
        for i in range(0, hs.shape[0], FLOOR_CHUNK):
            x = hs[i:i + FLOOR_CHUNK]
            z = x @ ws.T
            _ = ht[i:i + FLOOR_CHUNK] @ wt.T
            dh[i:i + FLOOR_CHUNK] = z @ ws
            dw.addmm_(z.T.to(dw.dtype), x.to(dw.dtype))
            del z, _
        return None

    params = {"N": int(mask.sum()), "H": h, "V": v, "dtype": str(dtype).replace("torch.", ""), "pad": pad}
    return [Case("opd", {**params, "beta": beta}, [
        Impl("vgs fused OPD", timed(vgs.fused_chunked_divergence_loss, beta), setup, reference="trl chunked"),
        Impl("trl chunked", timed(_chunked_divergence_loss, beta), setup),
        Impl("4-matmul floor", floor, setup),
    ], baselines=["trl chunked", "4-matmul floor"], tolerance=max(tolerance(dtype), 2e-3)) for beta in betas]
