"""VGSDistillationTrainer: on-policy distillation with ``trl.DistillationTrainer``'s datasets and arguments,
trained with Visual Gradient Steering or another row of the method table (methods/).

    from vgs_kernels.integrations.trl import VGSDistillationConfig, VGSDistillationTrainer
    args = VGSDistillationConfig(output_dir="out", gamma=2.0, lam=0.01, steering_policy="auto")
    VGSDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                           processing_class=processor).train()

What changes against the parent (everything else: generation, VLM inputs, gradient accumulation,
Accelerate, checkpoints, TRL's metrics, is the parent's) is the shared part in base.py, plus the loss:
the row's hidden-state passes and loss (e.g. the "vgs" row: four passes, FusedLinearVGSLoss, no [N, V]
logits), reduced per token over Trainer's ``num_items_in_batch`` (gradient accumulation exact, like
TRL's loss). Logs: ``vgs/std``, ``vgs/vis``, ``vgs/lang``, ``vgs/vds`` (per-token means) and the hook's
stats next to TRL's metrics; the student entropy TRL logs is dropped for rows that do not compute it.

A plain ``transformers.Trainer`` user has no on-policy rollouts, no teacher and no text-only batch
to build: serving one means writing those three parts, so there is no mixin for it (the raw-loop
way in the README is the route).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from trl import DistillationConfig, DistillationTrainer
from trl.trainer.utils import RepeatSampler

from vgs_kernels.integrations.trl.base import SteeredTrainerMixin, check_models
from vgs_kernels.integrations.trl.config import SteeringArguments
from vgs_kernels.integrations.trl.methods import METHODS
from vgs_kernels.integrations.trl.methods.va_opd import VIEWS as VA_VIEWS


@dataclass
class VGSDistillationConfig(SteeringArguments, DistillationConfig):
    """A ``trl.DistillationConfig`` with the steering fields (config.py) and the method table's.

    method: the row of METHODS. num_generations: rollouts per prompt (va_opd groups them). va_*: VA-OPD's
    settings. ``beta``: TRL's divergence (1 reverse KL, 0 forward KL, between: JSD); "opd" takes every
    beta, "vgs" and "va_opd" are of the reverse KL (their rows say why).
    """

    method: str = field(default="vgs", metadata={"help": f"Distillation method, one of {tuple(METHODS)}."})
    num_generations: int = field(default=1, metadata={"help": "Rollouts per prompt (va_opd groups them)."})
    va_view: str = field(default="degraded", metadata={"help": f"va_opd's weak teacher view, one of {VA_VIEWS}."})
    va_top_frac: float = field(default=0.2, metadata={"help": "va_opd: share of each rollout's tokens in H."})
    va_lam: float = field(default=0.5, metadata={"help": "va_opd: weight of H's mean KL (lambda)."})
    va_tau: float = field(default=1.0, metadata={"help": "va_opd: temperature of the rollout softmax (tau)."})

    @property
    def divergence_beta(self) -> float:
        return self.beta

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
        why = METHODS[self.method].reverse_kl_only
        if self.beta != 1.0 and why:
            raise ValueError(f"beta={self.beta}: method={self.method!r} trains on the reverse KL (beta=1.0): {why}; "
                             "method='opd' takes every beta")
        self.check_steering("VGSDistillationTrainer", METHODS[self.method].steered)


@contextlib.contextmanager
def _config_vocab(model: torch.nn.Module, vocab: int):
    """model's text config says ``vocab`` inside (for TRL's same-vocabulary check), its own value after."""
    cfg = model.config.get_text_config()
    own, cfg.vocab_size = cfg.vocab_size, vocab
    try:
        yield
    finally:
        cfg.vocab_size = own


class VGSDistillationTrainer(SteeredTrainerMixin, DistillationTrainer):
    """A ``trl.DistillationTrainer`` that trains with Visual Gradient Steering, or another row of
    ``METHODS`` (``args.method``; module docstring).

    Same arguments and datasets as the parent; ``args`` is a :class:`VGSDistillationConfig`, the
    model and teacher are VLMs of one family (same vocabulary and vision placeholder ids),
    ``processing_class`` is their processor and every training example has an image
    (``image`` / ``images`` column). Attributes: ``steer`` (the GradientSteering hook, created with the
    optimizer; None for a method that is not steered), ``method`` (the row of METHODS), ``loss_fn`` (the
    row's loss, e.g. the FusedLinearVGSLoss).
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
        same_vocab = contextlib.nullcontext()
        if processor is not None and all(isinstance(m, torch.nn.Module) for m in (model, teacher_model)):
            check_models(model, teacher_model, processor)  # before TRL's own, less specific, checks
            same_vocab = _config_vocab(teacher_model, model.config.get_text_config().vocab_size)
        with same_vocab:  # TRL refuses heads padded differently; the losses compare the tokenizer's ids
            super().__init__(model, teacher_model, args, train_dataset, *rest, **kwargs)
        teacher = self.accelerator.unwrap_model(self.teacher_model) if self.teacher_model is not None else None
        self._setup_method(METHODS[args.method], teacher)  # models loaded from names by TRL checked too

    def _get_train_sampler(self, dataset=None):
        sampler, g = super()._get_train_sampler(dataset), self.args.num_generations
        if g == 1:
            return sampler
        # each prompt num_generations times in a row: rollouts of one prompt are consecutive (group = index // g)
        return RepeatSampler(data_source=sampler.data_source, mini_repeat_count=g, batch_size=sampler.batch_size // g,
                             repeat_count=sampler.repeat_count, shuffle=sampler.shuffle, seed=sampler.seed)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        return self._distill_loss(unwrapped_student, inputs, num_items_in_batch)

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        m = self._metrics["train" if self.model.training else "eval"]
        if any(math.isnan(x) for x in m.get("entropy", ())):  # a method whose loss does not compute it
            m.pop("entropy")
        super().log(logs, start_time)
