"""The "opd" row: plain OPD = trl.DistillationTrainer(beta=β) for every β, two passes, OPDLoss, Accelerate's
backward."""
from __future__ import annotations

from vgs_kernels.integrations.trl.methods.row import Heads, LossResult, Method
from vgs_kernels.losses import OPDLoss


def build(args) -> OPDLoss:
    return OPDLoss(args.temperature, "token", beta=args.divergence_beta)


def loss(trainer, inputs, hidden, heads: Heads, mask, num_items_in_batch) -> LossResult:
    fn = trainer.loss_fn
    fn.logit_scale, fn.softcap, fn.vocab_size = heads.logit_scale, heads.softcap, heads.vocab_size
    out = fn(hidden["student"], hidden["teacher"], heads.w_s, heads.w_t, mask, bias_student=heads.b_s,
             bias_teacher=heads.b_t, num_items_in_batch=num_items_in_batch)
    return out.loss, out.entropy_sum, None


ROW = Method(("student", "teacher"), False, build, loss, lambda *_: None)
