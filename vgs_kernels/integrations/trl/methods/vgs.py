"""The "vgs" row: the paper's loss (four passes, FusedLinearVGSLoss), steered by the hook."""
from __future__ import annotations

import math

from vgs_kernels.integrations.trl.methods.row import Heads, LossResult, Method
from vgs_kernels.losses import FusedLinearVGSLoss


def build(args) -> FusedLinearVGSLoss:
    return FusedLinearVGSLoss(args.gamma, args.lam, args.lp_quantile, args.adaptive, reduction="token",
                              temperature=args.temperature, detach_prior=args.detach_prior)


def loss(trainer, inputs, hidden, heads: Heads, mask, num_items_in_batch) -> LossResult:
    fn = trainer.loss_fn
    fn.components = trainer._needs_components()
    fn.logit_scale, fn.softcap, fn.vocab_size = heads.logit_scale, heads.softcap, heads.vocab_size
    out = fn(hidden["student"], hidden["student_text"], heads.w_s, hidden["teacher"], hidden["teacher_text"],
             heads.w_t, mask.bool(), bias_student=heads.b_s, bias_teacher=heads.b_t,
             num_items_in_batch=num_items_in_batch)
    return out.total, None, out


def log(m: dict, out, loss_mask, num_items_in_batch) -> None:
    """Per-token means of this micro-batch's terms (out.* are sums / num_items_in_batch)."""
    valid = loss_mask.bool()
    n = valid.sum().clamp(min=1)
    scale = (num_items_in_batch if num_items_in_batch is not None else n) / n
    for name, value in (("std", out.std), ("vis", out.vis), ("lang", out.lp)):
        m[f"vgs/{name}"].append(float(value.detach() * scale))
    m["vgs/vds"].append(float(out.vds.reshape(valid.shape)[valid].mean()) if bool(valid.any()) else math.nan)


# VGS (docs/ARCHITECTURE.md, the paper's loss): four passes, FusedLinearVGSLoss, the steering hook
ROW = Method(("student", "student_text", "teacher", "teacher_text"), True, build, loss, log,
             reverse_kl_only="VGS splits the reverse KL into its visual and language terms (the paper's Eq. 9)")
