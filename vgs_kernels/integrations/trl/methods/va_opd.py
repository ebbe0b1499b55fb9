"""The "va_opd" row (VA-OPD, arXiv 2605.21924): rollout weights from the whole generation batch,
VAOPDLoss, Accelerate's plain backward."""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from vgs_kernels.integrations.trl.methods.row import FORWARD_KEYS, TEXT_KEYS, Heads, LossResult, Method
from vgs_kernels.integrations.trl.zero3 import gathered_heads
from vgs_kernels.losses import VAOPDLoss, degrade_image, head_token_logprobs
from vgs_kernels.ops import fused_linear_decomposed_kl
from vgs_kernels.vlm import text_only_batch

VIEWS = ("degraded", "text")  # va_view: the teacher's weak view


def build(args) -> VAOPDLoss:
    return VAOPDLoss(args.va_top_frac, args.va_lam, args.va_tau, args.temperature)


def teacher_hidden(trainer, args, kwargs) -> Tuple[Tensor, Heads]:
    """The teacher's last hidden states [B, C, H_t] (no grad) for (input_ids, attention_mask, keep)."""
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    trainer.teacher_model.eval()
    with torch.no_grad():
        h = trainer._forward_redirection(trainer.teacher_model, teacher, trainer._get_last_hidden_state, teacher,
                                         *args, **kwargs)
    return h, trainer._heads(trainer.accelerator.unwrap_model(trainer.model), teacher)


def degraded_pixels(trainer, inputs: list, pixel_values: Tensor) -> Tensor:
    """pixel_values of the generation batch's images, each degraded (`degrade_image`)."""
    images = [img for x in inputs for img in (x.get("images") or [x.get("image")]) if img is not None]
    weak = trainer.processing_class.image_processor(images=[degrade_image(i) for i in images],
                                                    return_tensors="pt")["pixel_values"]
    if weak.shape != pixel_values.shape:
        raise ValueError(f"va_view='degraded': the degraded images give pixel_values {tuple(weak.shape)}, the "
                         f"rollouts' are {tuple(pixel_values.shape)}; use va_view='text'")
    return weak.to(pixel_values.device, pixel_values.dtype)


def rollouts(trainer, inputs: list, out: dict) -> None:
    """VA_t and the rollout weights over the whole generation batch (a prompt's rollouts may land in
    different micro-batches): two no-grad teacher passes, with the image and with the weak view."""
    args, fn = trainer.args, trainer.loss_fn
    ids, mask = out["completion_ids"], out["completion_mask"]
    valid = (mask if "tool_mask" not in out else mask * out["tool_mask"]).bool()
    full = (torch.cat([out["prompt_ids"], ids], 1), torch.cat([out["prompt_mask"], mask], 1), ids.size(1))
    vision = {k: out[k] for k in FORWARD_KEYS if k in out}
    if args.va_view == "degraded":
        weak = (full, {**vision, "pixel_values": degraded_pixels(trainer, inputs, out["pixel_values"])})
    else:
        text, _ = text_only_batch(trainer.processing_class, [x["prompt"] for x in inputs], ids, mask,
                                  padding_side="split", chat_template=trainer.chat_template,
                                  **trainer.chat_template_kwargs)
        text = {k: v.to(ids.device) for k, v in text.items()}
        weak = ((text["input_ids"], text["attention_mask"], ids.size(1)), {k: text[k] for k in TEXT_KEYS if k in text})
    gap = []
    for view_args, view_kwargs in ((full, vision), weak):
        h, heads = teacher_hidden(trainer, view_args, view_kwargs)
        with gathered_heads(trainer.accelerator.unwrap_model(trainer.teacher_model)):
            gap.append(head_token_logprobs(h, heads.w_t, ids.to(h.device), heads.b_t, args.temperature,
                                           heads.logit_scale[1], heads.softcap[1],
                                           vocab_size=heads.vocab_size).to(ids.device))
    va = fn.visual_advantage(gap[0] - gap[1], valid)
    group_ids = torch.arange(ids.shape[0], device=ids.device) // args.num_generations
    weights, n_prompts = fn.rollout_weights(va, valid, group_ids)
    out["va"], out["va_weight"], out["va_group"] = va, weights / max(n_prompts, 1), group_ids
    m = trainer._metrics["train" if trainer.model.training else "eval"]
    n = valid.sum().clamp(min=1)
    m["va/mean"].append(float(va.sum() / n))
    m["va/positive"].append(float(((va > 0) & valid).sum() / n))
    m["va/weight_max"].append(float(weights.max()) if weights.numel() else math.nan)


def loss(trainer, inputs, hidden, heads: Heads, mask, num_items_in_batch) -> LossResult:
    valid = mask.bool()
    kl = fused_linear_decomposed_kl(hidden["student"], None, heads.w_s, hidden["teacher"], None, heads.w_t, valid,
                                    bias_student=heads.b_s, bias_teacher=heads.b_t,
                                    temperature=trainer.args.temperature, logit_scale=heads.logit_scale,
                                    softcap=heads.softcap, vocab_size=heads.vocab_size).std
    loss_k, high = trainer.loss_fn.rollout_losses(kl, inputs["va"].to(kl.device), valid)
    return (inputs["va_weight"].to(loss_k.device) * loss_k).sum(), None, (kl.detach(), high, valid)


def log(m: dict, out, loss_mask, num_items_in_batch) -> None:
    kl, high, valid = out
    m["va/kl"].append(float(kl[valid].mean()) if bool(valid.any()) else math.nan)
    m["va/kl_high"].append(float(kl[high].mean()) if bool(high.any()) else math.nan)


ROW = Method(("student", "teacher"), False, build, loss, log, rollouts,
             reverse_kl_only="VA-OPD weighs the per-token reverse KL (its definition, losses/va_opd.py)")
