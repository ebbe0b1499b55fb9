"""Low-precision exactness against TRL: python -m benchmarks.accuracy [--seeds 8]

The case where rounding shows (vgs_kernels/testing/close.py): a student close to its teacher (KL ~0.013
per token), N=64, H=256, V=32,000, |logits| up to ~15, bf16 hidden states and heads (or fp32 under bf16
autocast, as Trainer(bf16=True) runs). Prints the RMS over seeds of the relative errors against fp64 on
the same rounded inputs: the loss and the gradients of h_s and W_s, ours (`fused_chunked_divergence_loss`)
and TRL's `_chunked_divergence_loss`; then the fused VGS terms' worst relative error (seed 0).
"""
from __future__ import annotations

import argparse

import torch

import vgs_kernels as vgs
from vgs_kernels.ops.fused_linear import fused_linear_decomposed_kl_reference
from vgs_kernels.testing.close import close_pair, opd_errors

CASES = {"plain": {}, "scale 2 + softcap 30": dict(student_logit_scale=2.0, teacher_logit_scale=2.0,
                                                   student_final_logit_softcapping=30.0,
                                                   teacher_final_logit_softcapping=30.0)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=8)
    args = p.parse_args(argv)
    from trl.trainer.distillation_trainer import _chunked_divergence_loss as trl_loss

    print("| case | inputs | TRL: loss / grad h / grad W | ours: loss / grad h / grad W |\n|---|---|---|---|")
    for name, kw in CASES.items():
        for autocast in (False, True):
            errs = torch.tensor([opd_errors((trl_loss, vgs.fused_chunked_divergence_loss), s, autocast, **kw)
                                 for s in range(args.seeds)]).square().mean(0).sqrt()
            cells = [" / ".join(f"{e:.2g}" for e in row.tolist()) for row in errs]
            print(f"| {name} | {'fp32 + bf16 autocast' if autocast else 'bf16'} | {cells[0]} | {cells[1]} |")
    x = close_pair()
    args6 = lambda dt: [x[k].to(dt) for k in ("h_s", "h_u", "w_s", "h_a", "h_b", "w_t")]  # noqa: E731
    ref = fused_linear_decomposed_kl_reference(*args6(torch.float64))
    got = vgs.fused_linear_decomposed_kl(*args6(torch.bfloat16))
    errs = {n: float((g.double() - r).norm() / r.norm()) for n, g, r in zip(got._fields, got, ref)}
    print("\nfused VGS terms, bf16, relative error against fp64: "
          + ", ".join(f"{n} {e:.2g}" for n, e in errs.items()))


if __name__ == "__main__":
    main()
