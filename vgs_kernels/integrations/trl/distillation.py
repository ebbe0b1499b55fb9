"""TRL integration: VGS on-policy distillation with ``trl.DistillationTrainer``'s datasets and arguments.

    from vgs_kernels.integrations.trl import VGSDistillationConfig, VGSDistillationTrainer
    args = VGSDistillationConfig(output_dir="out", gamma=2.0, lam=0.01, steering_policy="auto")
    VGSDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                           processing_class=processor).train()

What changes against the parent (everything else — generation, VLM inputs, gradient accumulation,
Accelerate, checkpoints, TRL's metrics — is the parent's):

* rollouts: the text-only batch of each rollout (the same chat prompt rendered without its image,
  identical response tokens) is built with the rollout (:func:`vgs_kernels.vlm.text_only_batch`), and
  every vision-only id (placeholder and markers, not only the image token) is suppressed in generation;
* loss: four hidden-state passes (student / teacher, with / without the image) inside TRL's
  ``_forward_redirection``, then :class:`vgs_kernels.FusedLinearVGSLoss` (no [N, V] logits) reduced
  per token over Trainer's ``num_items_in_batch`` (gradient accumulation exact, like TRL's loss);
* backward: Trainer's ``accelerator.backward(loss)`` is routed to the steering hook (one backward
  per component on exact steps, one combined backward on ``fixed`` and between ``auto``
  measurements), whose every backward is Accelerate's (``backward_fn``); the hook steers before
  Trainer clips and logs ``grad_norm``, so both see the steered gradient;
* logs: ``vgs/std``, ``vgs/vis``, ``vgs/lang``, ``vgs/vds`` (per-token means), ``vgs/eta``,
  ``vgs/fallback``, ``vgs/cos_std_vis``, ``vgs/std_descent`` ... (the hook's stats) next to TRL's
  metrics; the hook's SteeringConflictWarning also goes to the Trainer's logger. The student
  entropy TRL logs is not computed by the fused loss and is left out.
* checkpoints: the hook's state rides in the optimizer's state_dict; the model is saved in the
  format ``resume_from_checkpoint`` reloads (``save_original_format=False``).

GRPO with VGS as its regulariser (Eq. 22), ``VGSGRPOTrainer`` / ``VGSGRPOConfig`` on ``trl.GRPOTrainer``,
is importable from here too (it lives in trl_grpo.py and reuses this module's pieces).

A plain ``transformers.Trainer`` user has no on-policy rollouts, no teacher and no text-only batch
to build: serving one means writing those three parts, so there is no mixin here (the raw-loop
way in the README is the route).

Methods are rows of one table, ``METHODS`` (``VGSDistillationConfig(method=...)``), each with its loss
in its own module; a new method (GRPO + VGS, ...) adds a row, not branches. A row (:class:`Method`)
provides:

* ``passes``: the hidden-state passes of the loss (with gradient for the student's), named from
  :data:`PASSES` ("student" / "teacher": with the image; "student_text" / "teacher_text": the
  text-only batch, built with the rollout only when a row asks for it);
* ``rollouts(trainer, inputs, out)``: extra per-rollout tensors added to the generation batch
  ``out`` (dict of [B_gen, ...] tensors, split and shuffled into micro-batches by TRL with the rest):
  what must see the whole generation batch (VA-OPD's rollout weights over a prompt's rollouts) or
  is computed once per rollout (rewards); None: nothing;
* ``steered``: whether Trainer's backward goes through the :class:`GradientSteering` hook (created
  with the optimizer) or is Accelerate's plain one;
* ``build(args) -> loss_fn``: the loss module, configured once (``trainer.loss_fn``);
* ``loss(trainer, inputs, hidden, heads, mask, num_items_in_batch) -> (total, entropy_sum, out)``:
  inputs is the micro-batch (with the row's ``rollouts`` keys), hidden
  is {pass name: [B, C, H] on the heads' device}, heads a :class:`Heads` (weights, biases,
  logit scales, softcaps of student and teacher), mask the [B, C] loss mask; entropy_sum is the
  student entropy TRL logs (None: not computed, TRL's ``entropy`` metric is dropped), out what
  ``log`` and, for a steered row, the hook's ``backward`` get;
* ``log(metrics, out, mask, num_items_in_batch)``: the row's own metrics into TRL's ``_metrics``.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch
import transformers.trainer
from torch import Tensor
from trl import DistillationConfig, DistillationTrainer
from trl.trainer.utils import RepeatSampler

from vgs_kernels.ops.fused_linear import FusedLinearVGSLoss, fused_linear_decomposed_kl
from vgs_kernels.losses.opd import fused_chunked_divergence_loss
from vgs_kernels.losses.va_opd import VAOPDLoss, degrade_image, head_token_logprobs
from vgs_kernels.steering.hook import GradientSteering
from vgs_kernels.vlm import VisionTokens, check_processor, text_only_batch
from vgs_kernels.vlm.plumbing import _vocab_size

POLICIES = ("vgs", "fixed", "auto", "pcgrad", "sum")
PASSES = ("student", "student_text", "teacher", "teacher_text")
VA_VIEWS = ("degraded", "text")


class Heads(NamedTuple):
    """The two LM heads as the losses take them: weights [V, H], biases [V] or None, and the
    (student, teacher) logit_scale and final_logit_softcapping pairs of the model configs."""

    w_s: Tensor
    b_s: Optional[Tensor]
    w_t: Tensor
    b_t: Optional[Tensor]
    logit_scale: Tuple[float, float]
    softcap: Tuple[Optional[float], Optional[float]]


LossResult = Tuple[Tensor, Optional[Tensor], Any]


class Method(NamedTuple):
    """A row of METHODS (module docstring)."""

    passes: Tuple[str, ...]
    steered: bool
    build: Callable[["VGSDistillationConfig"], Any]
    loss: Callable[..., LossResult]
    log: Callable[[dict, Any, Tensor, Any], None]
    rollouts: Optional[Callable[[Any, list, dict], None]] = None

    @property
    def text_only(self) -> bool:
        """Whether the row needs the text-only batch (and so an image in every prompt)."""
        return bool({"student_text", "teacher_text"} & set(self.passes))


def _vgs_build(args) -> FusedLinearVGSLoss:
    return FusedLinearVGSLoss(args.gamma, args.lam, args.lp_quantile, args.adaptive, reduction="token",
                              temperature=args.temperature, detach_prior=args.detach_prior)


def _vgs_loss(trainer, inputs, hidden, heads: Heads, mask, num_items_in_batch) -> LossResult:
    fn = trainer.loss_fn
    fn.components = trainer._needs_components()
    fn.logit_scale = heads.logit_scale
    fn.softcap = None if heads.softcap == (None, None) else heads.softcap
    out = fn(hidden["student"], hidden["student_text"], heads.w_s, hidden["teacher"], hidden["teacher_text"],
             heads.w_t, mask.bool(), bias_student=heads.b_s, bias_teacher=heads.b_t,
             num_items_in_batch=num_items_in_batch)
    return out.total, None, out


def _vgs_log(m: dict, out, loss_mask, num_items_in_batch) -> None:
    """Per-token means of this micro-batch's terms (out.* are sums / num_items_in_batch)."""
    valid = loss_mask.bool()
    n = valid.sum().clamp(min=1)
    scale = (num_items_in_batch if num_items_in_batch is not None else n) / n
    for name, value in (("std", out.std), ("vis", out.vis), ("lang", out.lp)):
        m[f"vgs/{name}"].append(float(value.detach() * scale))
    m["vgs/vds"].append(float(out.vds.reshape(valid.shape)[valid].mean()) if bool(valid.any()) else math.nan)


def _opd_build(args) -> Callable[..., Tuple[Tensor, Tensor, Tensor]]:
    return functools.partial(fused_chunked_divergence_loss, temperature=args.temperature)


def _opd_loss(trainer, inputs, hidden, heads: Heads, mask, num_items_in_batch) -> LossResult:
    loss, entropy_sum, _ = trainer.loss_fn(
        hidden["student"], hidden["teacher"], heads.w_s, heads.w_t, mask, 1.0, num_items_in_batch,
        student_lm_head_bias=heads.b_s, teacher_lm_head_bias=heads.b_t, student_logit_scale=heads.logit_scale[0],
        teacher_logit_scale=heads.logit_scale[1], student_final_logit_softcapping=heads.softcap[0],
        teacher_final_logit_softcapping=heads.softcap[1])
    return loss, entropy_sum, None


def _va_build(args) -> VAOPDLoss:
    return VAOPDLoss(args.va_top_frac, args.va_lam, args.va_tau, args.temperature)


def _va_rollouts(trainer, inputs: list, out: dict) -> None:
    """VA_t and the rollout weights over the whole generation batch (a prompt's rollouts may land in
    different micro-batches): two no-grad teacher passes, with the image and with the weak view."""
    args, fn = trainer.args, trainer.loss_fn
    ids, mask = out["completion_ids"], out["completion_mask"]
    valid = (mask if "tool_mask" not in out else mask * out["tool_mask"]).bool()
    full = (torch.cat([out["prompt_ids"], ids], 1), torch.cat([out["prompt_mask"], mask], 1), ids.size(1))
    vision = {k: out[k] for k in _VISION_KEYS if k in out}
    if args.va_view == "degraded":
        weak = (full, {**vision, "pixel_values": trainer._degraded_pixels(inputs, out["pixel_values"])})
    else:
        text, _ = text_only_batch(trainer.processing_class, [x["prompt"] for x in inputs], ids, mask,
                                  padding_side="split", chat_template=trainer.chat_template,
                                  **trainer.chat_template_kwargs)
        text = {k: v.to(ids.device) for k, v in text.items()}
        weak = ((text["input_ids"], text["attention_mask"], ids.size(1)),
                {k: text[k] for k in ("token_type_ids", "mm_token_type_ids") if k in text})
    gap = []
    for view_args, view_kwargs in ((full, vision), weak):
        h, heads = trainer._teacher_hidden(view_args, view_kwargs)
        gap.append(head_token_logprobs(h, heads.w_t, ids.to(h.device), heads.b_t, args.temperature,
                                       heads.logit_scale[1], heads.softcap[1]).to(ids.device))
    va = fn.visual_advantage(gap[0] - gap[1], valid)
    group_ids = torch.arange(ids.shape[0], device=ids.device) // args.num_generations
    weights, n_prompts = fn.rollout_weights(va, valid, group_ids)
    out["va"], out["va_weight"], out["va_group"] = va, weights / max(n_prompts, 1), group_ids
    m = trainer._metrics["train" if trainer.model.training else "eval"]
    n = valid.sum().clamp(min=1)
    m["va/mean"].append(float(va.sum() / n))
    m["va/positive"].append(float(((va > 0) & valid).sum() / n))
    m["va/weight_max"].append(float(weights.max()) if weights.numel() else math.nan)


def _va_loss(trainer, inputs, hidden, heads: Heads, mask, num_items_in_batch) -> LossResult:
    valid = mask.bool()
    kl = fused_linear_decomposed_kl(hidden["student"], None, heads.w_s, hidden["teacher"], None, heads.w_t, valid,
                                    bias_student=heads.b_s, bias_teacher=heads.b_t,
                                    temperature=trainer.args.temperature, logit_scale=heads.logit_scale,
                                    softcap=None if heads.softcap == (None, None) else heads.softcap).std
    loss_k, high = trainer.loss_fn.rollout_losses(kl, inputs["va"].to(kl.device), valid)
    return (inputs["va_weight"].to(loss_k.device) * loss_k).sum(), None, (kl.detach(), high, valid)


def _va_log(m: dict, out, loss_mask, num_items_in_batch) -> None:
    kl, high, valid = out
    m["va/kl"].append(float(kl[valid].mean()) if bool(valid.any()) else math.nan)
    m["va/kl_high"].append(float(kl[high].mean()) if bool(high.any()) else math.nan)


METHODS: Dict[str, Method] = {
    # VGS (DESIGN.md §1): four passes, FusedLinearVGSLoss, the steering hook
    "vgs": Method(("student", "student_text", "teacher", "teacher_text"), True, _vgs_build, _vgs_loss, _vgs_log),
    # plain OPD = trl.DistillationTrainer(beta=1): two passes, vgs_kernels.losses.opd, Accelerate's backward
    "opd": Method(("student", "teacher"), False, _opd_build, _opd_loss, lambda *_: None),
    # VA-OPD (arXiv 2605.21924): weights from the generation batch, vgs_kernels.losses.va_opd, plain backward
    "va_opd": Method(("student", "teacher"), False, _va_build, _va_loss, _va_log, _va_rollouts),
}
_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class VGSDistillationConfig(DistillationConfig):
    """A ``trl.DistillationConfig`` with the VGS fields (DESIGN.md §1).

    gamma, lam: γ and λ of L = η(Std + γ·Vis + λ·LP). lp_quantile: LP counts Lang on tokens whose
    VDS is above this quantile. adaptive: per-token γ_t (App. E). steering_policy: "vgs" (exact η
    every step), "fixed" (constant ``eta``, one backward), "auto" (exact η every ``eta_every``
    steps, EMA in between), "pcgrad", "sum" (no steering). detach_prior: no Vis gradient into the
    text-only student pass. steering_patience: the hook's ``patience`` (vgs_kernels/steering/health.py). ``beta`` (TRL's divergence) must stay 1.0: VGS splits the reverse KL.
    """

    gamma: float = field(default=2.0, metadata={"help": "Weight of the visual term Vis."})
    lam: float = field(default=0.01, metadata={"help": "Weight of the language-prior term LP."})
    lp_quantile: float = field(default=0.7, metadata={"help": "LP counts Lang above this VDS quantile."})
    adaptive: bool = field(default=False, metadata={"help": "Per-token gamma from VDS quantiles (App. E)."})
    steering_policy: str = field(default="vgs", metadata={"help": f"One of {POLICIES}."})
    eta: Optional[float] = field(default=None, metadata={"help": "The constant eta of steering_policy='fixed'."})
    eta_every: int = field(default=16, metadata={"help": "Steps between exact eta measurements ('auto')."})
    detach_prior: bool = field(default=True, metadata={"help": "No gradient from Vis into the text-only pass."})
    steering_patience: Optional[int] = field(default=3, metadata={
        "help": "SteeringConflictWarning after this many uphill measurements in a row (None: never)."})
    method: str = field(default="vgs", metadata={"help": f"Distillation method, one of {tuple(METHODS)}."})
    num_generations: int = field(default=1, metadata={"help": "Rollouts per prompt (va_opd groups them)."})
    va_view: str = field(default="degraded", metadata={"help": f"va_opd's weak teacher view, one of {VA_VIEWS}."})
    va_top_frac: float = field(default=0.2, metadata={"help": "va_opd: share of each rollout's tokens in H."})
    va_lam: float = field(default=0.5, metadata={"help": "va_opd: weight of H's mean KL (lambda)."})
    va_tau: float = field(default=1.0, metadata={"help": "va_opd: temperature of the rollout softmax (tau)."})

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {self.method!r}")
        if self.va_view not in VA_VIEWS:
            raise ValueError(f"va_view must be one of {VA_VIEWS}, got {self.va_view!r}")
        per_process = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if not (isinstance(self.num_generations, int) and self.num_generations >= 1
                and per_process % self.num_generations == 0):
            raise ValueError(f"num_generations must be an int >= 1 dividing per_device_train_batch_size * "
                             f"gradient_accumulation_steps = {per_process} (a prompt's rollouts on one process), "
                             f"got {self.num_generations!r}")
        if self.num_generations > 1 and self.method != "va_opd":
            raise ValueError(f"num_generations={self.num_generations} groups rollouts for method='va_opd'; "
                             f"method={self.method!r} would train on repeated prompts: drop it")
        if self.steering_policy not in POLICIES:
            raise ValueError(f"steering_policy must be one of {POLICIES}, got {self.steering_policy!r}")
        if self.steering_policy == "fixed" and self.eta is None:
            raise ValueError("steering_policy='fixed' needs eta= (e.g. 0.41, the paper's value at gamma=2)")
        if self.eta is not None and self.steering_policy != "fixed":
            raise ValueError(f"eta= is the constant of steering_policy='fixed'; with {self.steering_policy!r} "
                             "it would be ignored: drop it or use steering_policy='fixed'")
        if self.beta != 1.0:
            raise ValueError(f"beta={self.beta}: method={self.method!r} trains on the reverse KL (beta=1.0; VGS "
                             "decomposes it, 'opd' is it); forward KL / JSD are not in the kernel yet: set beta=1.0")
        if not (isinstance(self.eta_every, int) and self.eta_every >= 1):
            raise ValueError(f"eta_every must be an int >= 1, got {self.eta_every!r}")
        if self.fp16 and METHODS[self.method].steered:
            raise ValueError("fp16=True (a GradScaler) is not supported by VGSDistillationTrainer; use bf16=True")


class VGSDistillationTrainer(DistillationTrainer):
    """A ``trl.DistillationTrainer`` that trains with Visual Gradient Steering, or another row of
    ``METHODS`` (``args.method``; module docstring).

    Same arguments and datasets as the parent; ``args`` is a :class:`VGSDistillationConfig`, the
    model and teacher are VLMs of one family (same vocabulary and vision placeholder ids),
    ``processing_class`` is their processor and every training example has an image
    (``image`` / ``images`` column). Attributes: ``steer`` (the :class:`GradientSteering` hook,
    created with the optimizer; None for a method that is not steered), ``method`` (the row of
    METHODS), ``loss_fn`` (the row's loss, e.g. the :class:`FusedLinearVGSLoss`).
    """

    _tag_names = ["trl", "distillation", "vgs"]

    def __init__(self, model, teacher_model=None, args: Optional[VGSDistillationConfig] = None,
                 train_dataset=None, *rest, **kwargs):
        if not isinstance(args, VGSDistillationConfig):
            raise TypeError(f"args must be a VGSDistillationConfig, got {type(args).__name__}")
        columns = getattr(train_dataset, "column_names", None)
        if (METHODS[args.method].text_only and train_dataset is not None and columns is not None
                and not {"image", "images"} & set(columns)):
            raise ValueError(f"train_dataset has columns {columns} but no 'image' or 'images' column: VGS "
                             "splits the visual from the language part of the loss and needs an image per prompt")
        processor = kwargs.get("processing_class", rest[1] if len(rest) > 1 else None)
        if processor is not None and all(isinstance(m, torch.nn.Module) for m in (model, teacher_model)):
            _check_models(model, teacher_model, processor)  # before TRL's own, less specific, checks
        super().__init__(model, teacher_model, args, train_dataset, *rest, **kwargs)
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher_model) if self.teacher_model is not None else None
        _check_models(student, teacher, self.processing_class)  # models loaded from names by TRL
        self.vision = VisionTokens.from_model(student, self.processing_class)
        # A sampled vision id (not only the image token TRL suppresses) would corrupt the rollout.
        suppress = sorted(set(self.generation_kwargs.get("suppress_tokens") or []) | set(self.vision.ids().tolist()))
        self.generation_kwargs["suppress_tokens"] = suppress
        self.generation_config.suppress_tokens = suppress
        self.method = METHODS[args.method]
        self.loss_fn = self.method.build(args)
        self.steer: Optional[GradientSteering] = None
        self._pending = None  # the VGSLossOutput of the micro-batch whose backward comes next
        self._backward_kwargs: dict = {}  # Trainer's kwargs of that backward (DeepSpeed, LOMO)

    # ------------------------------------------------------------------ the optimizer and its hook

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        inner = getattr(optimizer, "optimizer", optimizer)
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                "VGSDistillationTrainer with DeepSpeed is not supported yet (the per-component backward of the "
                "student fails inside ZeRO's gradient hooks in this trainer); train with FSDP2 or DDP, or steer a "
                "DeepSpeed engine directly: vgs.GradientSteering(optimizer, model=engine) (README, DeepSpeed)")
        if self.method.steered and (self.steer is None or self.steer.optimizer is not inner):
            a, acc = self.args, self.accelerator
            # gamma / lam come with the loss output; every backward the hook runs is Accelerate's
            backward = functools.partial(type(acc).backward, acc)
            self.steer = GradientSteering(inner, policy=a.steering_policy, eta=a.eta, every=a.eta_every,
                                          patience=a.steering_patience,
                                          backward_fn=lambda loss, **kw: backward(loss, **kw, **self._backward_kwargs))
            self.steer.health.listeners.append(transformers.trainer.logger.warning)  # SteeringConflictWarning
        return optimizer

    def _needs_components(self) -> bool:
        """Whether the next backward runs per component (exact steps) or combined (and in evaluation)."""
        return self.steer is not None and self.model.training and self.steer.needs_components

    # ------------------------------------------------------------------ rollouts

    def _generate_and_score_completions(self, inputs):
        return add_rollout_inputs(self, inputs, super()._generate_and_score_completions(inputs))

    def _get_train_sampler(self, dataset=None):
        sampler, g = super()._get_train_sampler(dataset), self.args.num_generations
        if g == 1:
            return sampler
        # each prompt num_generations times in a row: rollouts of one prompt are consecutive (group = index // g)
        return RepeatSampler(data_source=sampler.data_source, mini_repeat_count=g, batch_size=sampler.batch_size // g,
                             repeat_count=sampler.repeat_count, shuffle=sampler.shuffle, seed=sampler.seed)

    def _teacher_hidden(self, args, kwargs) -> Tuple[Tensor, Heads]:
        """The teacher's last hidden states [B, C, H_t] (no grad) for (input_ids, attention_mask, keep)."""
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        self.teacher_model.eval()
        with torch.no_grad():
            h = self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state, teacher,
                                          *args, **kwargs)
        student = self.accelerator.unwrap_model(self.model)
        return h, self._heads(student, teacher)

    def _degraded_pixels(self, inputs: list, pixel_values: Tensor) -> Tensor:
        """pixel_values of the generation batch's images, each degraded (`degrade_image`)."""
        images = [img for x in inputs for img in (x.get("images") or [x.get("image")]) if img is not None]
        weak = self.processing_class.image_processor(images=[degrade_image(i) for i in images],
                                                     return_tensors="pt")["pixel_values"]
        if weak.shape != pixel_values.shape:
            raise ValueError(f"va_view='degraded': the degraded images give pixel_values {tuple(weak.shape)}, the "
                             f"rollouts' are {tuple(pixel_values.shape)}; use va_view='text'")
        return weak.to(pixel_values.device, pixel_values.dtype)

    @staticmethod
    def _heads(student, teacher) -> Heads:
        head_s, head_t = student.get_output_embeddings(), teacher.get_output_embeddings()
        cfg_s, cfg_t = student.config.get_text_config(), teacher.config.get_text_config()
        return Heads(head_s.weight, head_s.bias, head_t.weight, head_t.bias,
                     (_attr(cfg_s, "logit_scale", 1.0), _attr(cfg_t, "logit_scale", 1.0)),
                     (_attr(cfg_s, "final_logit_softcapping"), _attr(cfg_t, "final_logit_softcapping")))

    # ------------------------------------------------------------------ the loss

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        keep = completion_ids.size(1)
        full = (torch.cat([inputs["prompt_ids"], completion_ids], 1),
                torch.cat([inputs["prompt_mask"], completion_mask], 1), keep)
        text = (inputs.get("text_input_ids"), inputs.get("text_attention_mask"), keep)
        vision = {k: inputs[k] for k in _VISION_KEYS if k in inputs}
        text_side = {k: inputs[f"text_{k}"] for k in ("token_type_ids", "mm_token_type_ids") if f"text_{k}" in inputs}
        views = {"student": (full, vision), "student_text": (text, text_side), "teacher": (full, vision),
                 "teacher_text": (text, text_side)}
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        head_s, head_t = unwrapped_student.get_output_embeddings(), teacher.get_output_embeddings()
        dev = head_s.weight.device
        hidden = {}
        for name in self.method.passes:
            args, kwargs = views[name]
            if name.startswith("student"):
                hidden[name] = self._get_last_hidden_state(unwrapped_student, *args, **kwargs).to(dev)
            else:
                with torch.no_grad():
                    hidden[name] = self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state,
                                                             teacher, *args, **kwargs).to(dev)
        heads = self._heads(unwrapped_student, teacher)
        loss_mask = loss_mask.to(dev)
        total, entropy_sum, out = self.method.loss(self, inputs, hidden, heads, loss_mask, num_items_in_batch)
        self._pending = out
        self.method.log(self._metrics["train" if self.model.training else "eval"], out, loss_mask,
                        num_items_in_batch)
        entropy_sum = torch.full((), math.nan, device=dev) if entropy_sum is None else entropy_sum.detach()
        return total, entropy_sum, loss_mask.sum()

    # ------------------------------------------------------------------ backward, clipping, logging

    def training_step(self, model, inputs, num_items_in_batch):
        if not self.method.steered:
            return super().training_step(model, inputs, num_items_in_batch)
        with self._steered_backward():
            return super().training_step(model, inputs, num_items_in_batch)

    @contextlib.contextmanager
    def _steered_backward(self):
        """Routes Trainer's ``accelerator.backward(loss)`` of this micro-batch to the steering hook."""
        acc = self.accelerator

        def backward(loss, **kwargs):
            out, self._pending = self._pending, None
            # DDP's forward (TRL's _forward_redirection) returns it through its _DDPSink: a new tensor
            # of the same value
            same = out is not None and (loss is out.total or torch.equal(loss.detach(), out.total.detach()))
            if not same:
                raise RuntimeError("VGSDistillationTrainer: the loss reaching backward is not the VGS loss of "
                                   "this micro-batch (was compute_loss overridden, or the loss rescaled?)")
            self._backward_kwargs = kwargs
            try:
                self.steer.backward(out)
            finally:
                self._backward_kwargs = {}

        acc.backward = backward
        try:
            yield
        finally:
            del acc.backward

    def _clip_grad_norm(self, model):
        if self.steer is not None:
            self.steer.apply()  # clipping must see the steered gradient
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if self.steer is not None:
            self.steer.apply()
            self._log_steering()
        return super()._get_grad_norm(model, grad_norm)

    def _log_steering(self) -> None:
        stats, m = self.steer.stats, self._metrics["train"]
        if not stats:
            return
        names, exact = list(stats["names"]), stats["mode"] == "exact"
        m["vgs/eta"].append(float(stats["eta"]))
        m["vgs/fallback"].append(float(stats["fallback"]))
        m["vgs/exact"].append(float(exact))
        if self.args.steering_policy == "auto":
            m["vgs/eta_ema"].append(float(stats["eta_ema"]))
        if exact:  # norms and cosines are measured on exact steps only (NaN otherwise)
            m["vgs/std_descent"].append(float(stats["std_descent"]))
            norms, cos = stats["norms"].tolist(), stats["cos"].tolist()
            for i, a in enumerate(names):
                m[f"vgs/norm_{a}"].append(norms[i])
                for j in range(i + 1, len(names)):
                    m[f"vgs/cos_{a}_{names[j]}"].append(cos[i][j])

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        m = self._metrics["train" if self.model.training else "eval"]
        if any(math.isnan(x) for x in m.get("entropy", ())):  # a method whose loss does not compute it
            m.pop("entropy")
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model, trial):
        # transformers' resume reloads with a plain load_state_dict: the checkpoint must hold the
        # model's own key names, not the "original format" save_pretrained writes by default.
        unwrapped = self.accelerator.unwrap_model(self.model)
        save = type(unwrapped).save_pretrained
        unwrapped.save_pretrained = lambda *a, **k: save(unwrapped, *a, **{"save_original_format": False, **k})
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del unwrapped.save_pretrained


def _check_models(student, teacher, processor) -> None:
    """Clear errors, naming the trainer's argument, for models and processor VGS cannot train with."""
    if processor is None or not hasattr(processor, "image_processor"):
        raise ValueError(f"processing_class must be the VLM's processor (with an image processor), got "
                         f"{type(processor).__name__}")
    try:
        ids = VisionTokens.from_model(student, processor).ids().tolist()
    except ValueError as err:
        raise ValueError(f"model: {err}") from None
    try:
        check_processor(processor, student, id_path=False)  # the trainer builds the text-only batch from messages
    except ValueError as err:
        raise ValueError(f"processing_class does not fit model: {err}") from None
    if teacher is None:
        raise ValueError("teacher_model is required: VGS scores every rollout with the teacher")
    try:
        t_ids = VisionTokens.from_model(teacher, processor).ids().tolist()
    except ValueError as err:
        raise ValueError(f"teacher_model: {err}") from None
    if _vocab_size(teacher) != _vocab_size(student):
        raise ValueError(f"teacher_model has a vocabulary of {_vocab_size(teacher)} but model has "
                         f"{_vocab_size(student)}: VGS needs one tokenizer and vocabulary")
    if t_ids != ids:
        raise ValueError(f"teacher_model and model disagree on the vision token ids ({t_ids} vs {ids})")
    for name, m in (("model", student), ("teacher_model", teacher)):
        cfg = m.config.get_text_config()
        for attr in ("output_multiplier", "lm_head_multiplier", "logits_scaling"):
            if getattr(cfg, attr, None) is not None:
                raise ValueError(f"{name}: config.{attr} is not supported by VGSDistillationTrainer")


def _attr(cfg: Any, name: str, default: Any = None) -> Any:
    value = getattr(cfg, name, None)
    return default if value is None else value


def __getattr__(name: str):
    """VGSGRPOTrainer / VGSGRPOConfig (Eq. 22) live in trl_grpo.py, which builds on this module's pieces."""
    if name in ("VGSGRPOTrainer", "VGSGRPOConfig"):
        from vgs_kernels.integrations import trl_grpo
        return getattr(trl_grpo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_rollout_inputs(trainer, inputs, out: dict) -> dict:
    """What a method row adds to a TRL generation batch ``out`` (VGSDistillationTrainer and VGSGRPOTrainer):
    the row's rollouts hook, then, where the row needs it, the text-only batch as ``text_*`` keys."""
    if "tool_mask" in out:
        raise NotImplementedError(f"{type(trainer).__name__} does not support tools (multi-turn rollouts) yet")
    if trainer.method.rollouts is not None:
        trainer.method.rollouts(trainer, inputs, out)
    if not trainer.method.text_only:
        return out
    if out.get("pixel_values") is None:
        raise ValueError("a generation batch has no image: VGS needs an image in every prompt")
    # [text prompt | the same completion block]: the last C positions align with the image batch's; GRPO
    # repeats each prompt num_generations times in `inputs`, in the order of the completions
    text, _ = text_only_batch(trainer.processing_class, [x["prompt"] for x in inputs], out["completion_ids"],
                              out["completion_mask"], padding_side="split", chat_template=trainer.chat_template,
                              **trainer.chat_template_kwargs)
    for key, value in text.items():
        out[f"text_{key}"] = value.to(out["completion_ids"].device)
    return out
