"""TRL integration, GRPO with VGS as its regulariser (Eq. 22): ``trl.GRPOTrainer``'s datasets, reward
functions and arguments, plus a teacher. Import it from ``vgs_kernels.integrations.trl``:

    from vgs_kernels.integrations.trl import VGSGRPOConfig, VGSGRPOTrainer
    args = VGSGRPOConfig(output_dir="out", alpha=0.3, gamma=2.0, lam=0.01, steering_policy="vgs")
    VGSGRPOTrainer(model=student, reward_funcs=reward, teacher_model=teacher, args=args,
                   train_dataset=ds, processing_class=processor).train()

Each micro-batch's loss is (1 − α)·L_GRPO + α·η·(Std + γ·Vis + λ·LP) (vgs_kernels/losses/grpo_vgs.py):

* L_GRPO is TRL's own loss (``GRPOTrainer._compute_loss``: its loss_type, clipping, importance
  sampling, metrics) with ``beta = 0``: Eq. 22 has no KL penalty, another beta raises;
* the distillation part is a row of VGSDistillationTrainer's method table (trl.py ``METHODS``), run
  by VGSDistillationTrainer's own ``_compute_loss`` on the completions GRPO sampled, reduced per token
  over the accumulation window's completion tokens (as TRL's "dapo" loss): ``distill="vgs"`` is the
  "vgs" row (text-only batch, four hidden-state passes, FusedLinearVGSLoss), ``distill="standard"``
  the "opd" row, KL(p ‖ qa) alone (the paper's "GRPO + Standard-KD" baseline);
* "vgs" is steered: the hook sees grpo (fixed coefficient 1 − α, never rescaled) and std, vis, lp
  weighted α, α·γ, α·λ, so the policy steers the distillation part only (policies.py,
  "Fixed-coefficient components"), before Trainer clips and logs ``grad_norm``; "standard" is one
  loss, (1 − α)·L_GRPO + α·KL, through Accelerate's plain backward (no policy applies).

Costs: GRPO's own student pass (TRL computes its log-probabilities from logits) comes on top of
the four hidden-state passes; the teacher is not GRPO's reference model (beta = 0 loads none).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch
from trl import DistillationTrainer, GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import _ForwardRedirection

from vgs_kernels.losses.grpo_vgs import grpo_vgs_loss
from vgs_kernels.integrations.trl import (METHODS, POLICIES, VGSDistillationConfig, VGSDistillationTrainer, _check_models,
                                        add_rollout_inputs)
from vgs_kernels.steering.hook import GradientSteering
from vgs_kernels.vlm import VisionTokens

DISTILL = {"vgs": "vgs", "standard": "opd"}  # distill= -> the row of trl.METHODS


def _like(name: str):
    """VGSDistillationConfig's field `name` (default and help), so the two configs cannot drift apart."""
    f = VGSDistillationConfig.__dataclass_fields__[name]
    return field(default=f.default, metadata=f.metadata)


@dataclass
class VGSGRPOConfig(GRPOConfig):
    """A ``trl.GRPOConfig`` with Eq. 22's fields: alpha (weight of the distillation loss, the paper's
    0.3), distill ("vgs": ℓ_VGS-LP, "standard": KL(p ‖ qa)) and the VGS settings of
    VGSDistillationConfig (gamma, lam, lp_quantile, adaptive, steering_policy, eta, eta_every,
    detach_prior). ``beta`` (GRPO's KL penalty) must be 0. alpha = 0 is plain GRPO (the distillation
    passes still run; η is then 0/0 and the hook logs vgs/fallback = 1, the update being the GRPO one)."""

    alpha: float = field(default=0.3, metadata={"help": "Weight of the distillation loss (Eq. 22)."})
    distill: str = field(default="vgs", metadata={"help": f"One of {tuple(DISTILL)}."})
    gamma: float = _like("gamma")
    lam: float = _like("lam")
    lp_quantile: float = _like("lp_quantile")
    adaptive: bool = _like("adaptive")
    steering_policy: str = _like("steering_policy")
    eta: Optional[float] = _like("eta")
    eta_every: int = _like("eta_every")
    detach_prior: bool = _like("detach_prior")

    def __post_init__(self):
        super().__post_init__()
        if self.beta != 0.0:
            raise ValueError(f"beta={self.beta}: Eq. 22 has no KL penalty (the teacher regularises); set beta=0.0")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.distill not in DISTILL:
            raise ValueError(f"distill must be one of {tuple(DISTILL)}, got {self.distill!r}")
        if self.distill == "standard" and (self.steering_policy not in ("vgs", "sum") or self.eta is not None):
            raise ValueError(f"steering_policy={self.steering_policy!r} / eta= do not apply to distill='standard' (one "
                             "loss, no steering): drop them, or use distill='vgs'")
        if self.steering_policy not in POLICIES:
            raise ValueError(f"steering_policy must be one of {POLICIES}, got {self.steering_policy!r}")
        if (self.steering_policy == "fixed") != (self.eta is not None):
            raise ValueError("eta= is the constant of steering_policy='fixed' and that policy needs it (e.g. 0.41)")
        if not (isinstance(self.eta_every, int) and self.eta_every >= 1):
            raise ValueError(f"eta_every must be an int >= 1, got {self.eta_every!r}")
        if self.fp16:
            raise ValueError("fp16=True (a GradScaler) is not supported by VGSGRPOTrainer; use bf16=True")


class VGSGRPOTrainer(GRPOTrainer):
    """A ``trl.GRPOTrainer`` regularised by VGS distillation from ``teacher_model`` (module docstring).

    Arguments as the parent's (``reward_funcs`` required), plus ``teacher_model`` (a VLM of the
    student's family: same vocabulary and vision ids); ``args`` is a :class:`VGSGRPOConfig`,
    ``processing_class`` the VLM's processor, every prompt has an image. Attributes: ``method`` (the
    row of trl.METHODS), ``loss_fn`` (its loss), ``steer`` (the hook; None for distill="standard").
    """

    _tag_names = ["trl", "grpo", "vgs"]

    def __init__(self, model, reward_funcs=None, args: Optional[VGSGRPOConfig] = None, train_dataset=None,
                 *rest, teacher_model=None, **kwargs):
        if not isinstance(args, VGSGRPOConfig):
            raise TypeError(f"args must be a VGSGRPOConfig, got {type(args).__name__}")
        if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
            raise ValueError("reward_funcs is required: GRPO's part of Eq. 22 needs a reward per completion")
        if not isinstance(teacher_model, torch.nn.Module):
            raise TypeError(f"teacher_model must be the teacher VLM (a torch.nn.Module of the student's family), got "
                            f"{type(teacher_model).__name__}")
        processor = kwargs.get("processing_class", rest[1] if len(rest) > 1 else None)
        if isinstance(model, torch.nn.Module):
            _check_models(model, teacher_model, processor)  # before TRL's own, less specific, checks
        super().__init__(model, reward_funcs, args, train_dataset, *rest, **kwargs)
        student = self.accelerator.unwrap_model(self.model)
        _check_models(student, teacher_model, self.processing_class)  # a model TRL loaded from its name
        self.model_kwarg_keys = inspect.signature(student.forward).parameters.keys()  # for _hidden_state
        self._forward_redirection = _ForwardRedirection()
        self.teacher_model = (prepare_deepspeed(teacher_model, self.accelerator) if self.is_deepspeed_enabled
                              else self.accelerator.prepare_model(teacher_model, evaluation_mode=True))
        self.vision = VisionTokens.from_model(student, self.processing_class)
        suppress = sorted(set(self.generation_kwargs.get("suppress_tokens") or []) | set(self.vision.ids().tolist()))
        self.generation_kwargs["suppress_tokens"] = suppress
        self.generation_config.suppress_tokens = suppress
        self.method = METHODS[DISTILL[args.distill]]
        self.loss_fn = self.method.build(args)
        self.steer: Optional[GradientSteering] = None
        self._pending = None
        self._backward_kwargs: dict = {}

    # VGSDistillationTrainer's pieces (none of them calls super()): the row's passes and loss, the
    # routed backward, the steering logs; TRL's backbone pass of DistillationTrainer.
    _get_last_hidden_state = DistillationTrainer._get_last_hidden_state
    _distill_loss = VGSDistillationTrainer._compute_loss
    _heads = staticmethod(VGSDistillationTrainer._heads)
    _needs_components = VGSDistillationTrainer._needs_components
    _steered_backward = VGSDistillationTrainer._steered_backward
    _log_steering = VGSDistillationTrainer._log_steering

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        inner = getattr(optimizer, "optimizer", optimizer)
        if self.method.steered and (self.steer is None or self.steer.optimizer is not inner):
            a, acc = self.args, self.accelerator
            backward = functools.partial(type(acc).backward, acc)
            self.steer = GradientSteering(inner, policy=a.steering_policy, eta=a.eta, every=a.eta_every,
                                          backward_fn=lambda loss, **kw: backward(loss, **kw, **self._backward_kwargs))
        return optimizer

    def _generate_and_score_completions(self, inputs):
        return add_rollout_inputs(self, inputs, super()._generate_and_score_completions(inputs))

    def _compute_loss(self, model, inputs):
        rl = super()._compute_loss(model, inputs)  # TRL's GRPO loss (beta = 0) and its metrics
        # the distillation part over the accumulation window's tokens, as TRL's "dapo" normaliser
        n = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if self.model.training:
            n = n * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        unwrapped = self.accelerator.unwrap_model(model)
        distill, _, _ = self._forward_redirection(model, unwrapped, self._distill_loss, unwrapped, inputs, n)
        if not self.method.steered:
            self._pending = None
            return (1.0 - self.args.alpha) * rl + self.args.alpha * distill
        self._pending = out = grpo_vgs_loss(rl, self._pending, self.args.alpha)
        return out.total

    def training_step(self, model, inputs, num_items_in_batch):
        if not self.method.steered:
            return super().training_step(model, inputs, num_items_in_batch)
        with self._steered_backward():
            return super().training_step(model, inputs, num_items_in_batch)

    def _clip_grad_norm(self, model):
        if self.steer is not None:
            self.steer.apply()  # clipping must see the steered gradient
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if self.steer is not None:
            self.steer.apply()
            self._log_steering()
        return super()._get_grad_norm(model, grad_norm)

    def _save_checkpoint(self, model, trial):
        # the format resume_from_checkpoint reloads (VGSDistillationTrainer._save_checkpoint says why)
        unwrapped = self.accelerator.unwrap_model(self.model)
        save = type(unwrapped).save_pretrained
        unwrapped.save_pretrained = lambda *a, **k: save(unwrapped, *a, **{"save_original_format": False, **k})
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del unwrapped.save_pretrained
