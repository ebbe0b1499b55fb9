"""TRL integration, GRPO with VGS as its regulariser (Eq. 22): ``trl.GRPOTrainer``'s datasets, reward
functions and arguments, plus a teacher. Import it from ``vgs_kernels.integrations.trl``:

    from vgs_kernels.integrations.trl import VGSGRPOConfig, VGSGRPOTrainer
    args = VGSGRPOConfig(output_dir="out", alpha=0.3, gamma=2.0, lam=0.01, steering_policy="vgs")
    VGSGRPOTrainer(model=student, reward_funcs=reward, teacher_model=teacher, args=args,
                   train_dataset=ds, processing_class=processor).train()

Each micro-batch's loss is (1 − α)·L_GRPO + α·η·(Std + γ·Vis + λ·LP) (vgs_kernels/losses/grpo_vgs.py):

* L_GRPO is TRL's own loss (``GRPOTrainer._compute_loss``: its loss_type, clipping, importance
  sampling, metrics) with ``beta = 0``: Eq. 22 has no KL penalty, another beta raises;
* the distillation part is a row of the method table (methods/ ``METHODS``), run by the shared
  ``_distill_loss`` (base.py) on the completions GRPO sampled, reduced per token
  over the accumulation window's completion tokens (as TRL's "dapo" loss): ``distill="vgs"`` is the
  "vgs" row (text-only batch, four hidden-state passes, FusedLinearVGSLoss), ``distill="standard"``
  the "opd" row, KL(p ‖ qa) alone (the paper's "GRPO + Standard-KD" baseline);
* "vgs" is steered: the hook sees grpo (fixed coefficient 1 − α, never rescaled) and std, vis, lp
  weighted α, α·γ, α·λ, so the policy steers the distillation part only (vgs_kernels/steering/policies.py,
  "Fixed-coefficient components"), before Trainer clips and logs ``grad_norm``; "standard" is one
  loss, (1 − α)·L_GRPO + α·KL, through Accelerate's plain backward (no policy applies).

Costs: GRPO's own student pass (TRL computes its log-probabilities from logits) comes on top of
the four hidden-state passes; the teacher is not GRPO's reference model (beta = 0 loads none).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch
from trl import DistillationTrainer, GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import _ForwardRedirection

from vgs_kernels.integrations.trl.base import SteeredTrainerMixin, check_models
from vgs_kernels.integrations.trl.config import SteeringArguments
from vgs_kernels.integrations.trl.methods import METHODS
from vgs_kernels.losses import grpo_vgs_loss

DISTILL = {"vgs": "vgs", "standard": "opd"}  # distill= -> the row of METHODS


@dataclass
class VGSGRPOConfig(SteeringArguments, GRPOConfig):
    """A ``trl.GRPOConfig`` with Eq. 22's fields: alpha (weight of the distillation loss, the paper's
    0.3), distill ("vgs": ℓ_VGS-LP, "standard": KL(p ‖ qa)) and the steering fields (config.py) that
    VGSDistillationConfig has. ``beta`` (GRPO's KL penalty) must be 0. alpha = 0 is plain GRPO (the
    distillation passes still run; η is then 0/0 and the hook logs vgs/fallback = 1, the update being
    the GRPO one)."""

    alpha: float = field(default=0.3, metadata={"help": "Weight of the distillation loss (Eq. 22)."})
    distill: str = field(default="vgs", metadata={"help": f"One of {tuple(DISTILL)}."})

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
        self.check_steering("VGSGRPOTrainer", METHODS[DISTILL[self.distill]].steered)


class VGSGRPOTrainer(SteeredTrainerMixin, GRPOTrainer):
    """A ``trl.GRPOTrainer`` regularised by VGS distillation from ``teacher_model`` (module docstring).

    Arguments as the parent's (``reward_funcs`` required), plus ``teacher_model`` (a VLM of the
    student's family: same vocabulary and vision ids); ``args`` is a :class:`VGSGRPOConfig`,
    ``processing_class`` the VLM's processor, every prompt has an image. Attributes: ``method`` (the
    row of METHODS), ``loss_fn`` (its loss), ``steer`` (the hook; None for distill="standard").
    """

    _tag_names = ["trl", "grpo", "vgs"]
    _get_last_hidden_state = DistillationTrainer._get_last_hidden_state  # TRL's backbone pass

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
            check_models(model, teacher_model, processor)  # before TRL's own, less specific, checks
        super().__init__(model, reward_funcs, args, train_dataset, *rest, **kwargs)
        self._setup_method(METHODS[DISTILL[args.distill]], teacher_model)  # a model TRL loaded from its name
        student = self.accelerator.unwrap_model(self.model)
        self.model_kwarg_keys = inspect.signature(student.forward).parameters.keys()  # for _get_last_hidden_state
        self._forward_redirection = _ForwardRedirection()
        self.teacher_model = (prepare_deepspeed(teacher_model, self.accelerator) if self.is_deepspeed_enabled
                              else self.accelerator.prepare_model(teacher_model, evaluation_mode=True))

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
