"""What both TRL trainers share (VGSDistillationTrainer, VGSGRPOTrainer), on top of their TRL parent.

* set-up: the models and processor checked with errors naming the argument, every vision-only id
  (placeholder and markers, not only TRL's image token) suppressed in generation, the method row and
  its loss;
* rollouts: the row's rollouts hook and, where the row needs it, the text-only batch of each rollout
  (the same chat prompt rendered without its image, identical response tokens);
* the loss: the row's hidden-state passes inside TRL's ``_forward_redirection`` (so DDP/FSDP see them);
* the optimizer and its GradientSteering hook (steered rows): every backward the hook runs is
  Accelerate's; Trainer's ``accelerator.backward(loss)`` is routed to the hook (one backward per
  component on exact steps, one combined backward on ``fixed`` and between ``auto`` measurements); the
  hook steers before Trainer clips and logs ``grad_norm``, so both see the steered gradient;
* DeepSpeed ZeRO (``TrainingArguments(deepspeed=...)`` or ``accelerate launch`` with a DeepSpeed config):
  the hook sits on the engine Accelerate builds (created when the engine exists, before a checkpoint is
  loaded into it); every backward it runs is ``engine.backward``, then one ``engine.step()`` per
  optimizer step, as Accelerate's own DeepSpeed backward does: the hook steers inside it, before
  DeepSpeed clips (``gradient_clipping``, from ``max_grad_norm``) and Trainer logs its norm. Under ZeRO-3
  the LM heads the losses read directly are gathered as TRL gathers them (``gathered_heads``);
* logs (``vgs/eta``, ``vgs/cos_*``, ...), the hook's SteeringConflictWarning into the Trainer's logger;
* checkpoints: the hook's state rides in the optimizer's state_dict; the model is saved in the format
  ``resume_from_checkpoint`` reloads (``save_original_format=False``).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Optional

import torch
import transformers.trainer

from vgs_kernels.integrations.trl.methods import FORWARD_KEYS, TEXT_KEYS, Heads, Method
from vgs_kernels.integrations.trl.zero3 import gathered_heads
from vgs_kernels.steering import GradientSteering
from vgs_kernels.vlm import LMHead, VisionTokens, check_processor, text_only_batch
from vgs_kernels.vlm.plumbing import vocab_size


class SteeredTrainerMixin:
    """Mixed in before a TRL trainer class; ``args`` carries SteeringArguments (config.py)."""

    def _setup_method(self, method: Method, teacher: Optional[torch.nn.Module]) -> None:
        """Checks the models (as loaded by TRL), suppresses the vision ids, builds the row's loss."""
        student = self.accelerator.unwrap_model(self.model)
        check_models(student, teacher, self.processing_class)
        self.vision = VisionTokens.from_model(student, self.processing_class)
        self._vocab = head_vocabulary(student, teacher, self.processing_class)
        # A sampled vision id (not only the image token TRL suppresses) would corrupt the rollout, and so would
        # an id beyond the vocabulary the losses compare (heads padded differently)
        beyond = range(self._vocab, vocab_size(student)) if self._vocab is not None else ()
        suppress = sorted(set(self.generation_kwargs.get("suppress_tokens") or []) | set(self.vision.ids().tolist())
                          | set(beyond))
        self.generation_kwargs["suppress_tokens"] = suppress
        self.generation_config.suppress_tokens = suppress
        self.method, self.loss_fn = method, method.build(self.args)
        self.steer: Optional[GradientSteering] = None
        self._pending = None  # the loss output of the micro-batch whose backward comes next
        self._backward_kwargs: dict = {}  # Trainer's kwargs of that backward (DeepSpeed, LOMO)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if not self.is_deepspeed_enabled:  # DeepSpeed: on the engine, once it exists (create_scheduler)
            self._attach_steering(getattr(optimizer, "optimizer", optimizer))
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        # Trainer calls this again right after accelerator.prepare built the engine ("the optimizer won't
        # change anymore") and before it loads a checkpoint into it, which restores the hook's state
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if self.is_deepspeed_enabled and wrapped is not None:
            self._attach_steering(wrapped.engine.optimizer, wrapped.engine)
        return scheduler

    def _attach_steering(self, optimizer, engine=None) -> None:
        """The hook on ``optimizer`` (the torch one, or with ``engine`` that DeepSpeed engine's ZeRO optimizer);
        gamma / lam come with the loss output; every backward it runs is Accelerate's, or the engine's."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if not self.method.steered or (self.steer is not None and self.steer.optimizer is inner):
            return
        a, acc = self.args, self.accelerator
        backward = engine.backward if engine is not None else functools.partial(type(acc).backward, acc)
        self.steer = GradientSteering(optimizer, policy=a.steering_policy, eta=a.eta, every=a.eta_every,
                                      patience=a.steering_patience, model=engine,
                                      backward_fn=lambda loss, **kw: backward(loss, **kw, **self._backward_kwargs))
        self.steer.health.listeners.append(transformers.trainer.logger.warning)  # SteeringConflictWarning

    def _needs_components(self) -> bool:
        """Whether the next backward runs per component (exact steps) or combined (and in evaluation)."""
        return self.steer is not None and self.model.training and self.steer.needs_components

    def _generate_and_score_completions(self, inputs):
        return add_rollout_inputs(self, inputs, super()._generate_and_score_completions(inputs))

    def _heads(self, student, teacher) -> Heads:
        return lm_heads(student, teacher, self._vocab)

    def _distill_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """The row's passes and loss on a micro-batch: (total, entropy_sum (NaN: not computed), n_valid)."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        keep = completion_ids.size(1)
        full = (torch.cat([inputs["prompt_ids"], completion_ids], 1),
                torch.cat([inputs["prompt_mask"], completion_mask], 1), keep)
        text = (inputs.get("text_input_ids"), inputs.get("text_attention_mask"), keep)
        vision = {k: inputs[k] for k in FORWARD_KEYS if k in inputs}
        text_side = {k: inputs[f"text_{k}"] for k in TEXT_KEYS if f"text_{k}" in inputs}
        views = {"student": (full, vision), "student_text": (text, text_side), "teacher": (full, vision),
                 "teacher_text": (text, text_side)}
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        dev = unwrapped_student.get_output_embeddings().weight.device
        hidden = {}
        for name in self.method.passes:
            args, kwargs = views[name]
            if name.startswith("student"):
                hidden[name] = self._get_last_hidden_state(unwrapped_student, *args, **kwargs).to(dev)
            else:
                with torch.no_grad():
                    hidden[name] = self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state,
                                                             teacher, *args, **kwargs).to(dev)
        loss_mask = loss_mask.to(dev)
        heads = self._heads(unwrapped_student, teacher)  # outside: a ZeRO-3 head forward would re-partition them
        with gathered_heads(unwrapped_student, teacher):
            total, entropy_sum, out = self.method.loss(self, inputs, hidden, heads, loss_mask, num_items_in_batch)
        self._pending = out
        self.method.log(self._metrics["train" if self.model.training else "eval"], out, loss_mask,
                        num_items_in_batch)
        entropy_sum = torch.full((), math.nan, device=dev) if entropy_sum is None else entropy_sum.detach()
        return total, entropy_sum, loss_mask.sum()

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
                raise RuntimeError(f"{type(self).__name__}: the loss reaching backward is not the steered loss of "
                                   "this micro-batch (was compute_loss overridden, or the loss rescaled?)")
            self._backward_kwargs = kwargs
            engine = getattr(getattr(acc, "deepspeed_engine_wrapped", None), "engine", None)
            try:
                if engine is not None:  # as Accelerate's DeepSpeed backward: the boundary, then one step
                    engine.set_gradient_accumulation_boundary(acc.sync_gradients)
                self.steer.backward(out)
                if engine is not None and acc.sync_gradients:
                    engine.step()  # the hook steers inside it, then DeepSpeed clips and steps
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


def check_models(student, teacher, processor) -> None:
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
    head_vocabulary(student, teacher, processor)
    if t_ids != ids:
        raise ValueError(f"teacher_model and model disagree on the vision token ids ({t_ids} vs {ids})")


def lm_heads(student, teacher, vocab: Optional[int] = None) -> Heads:
    """The two heads with the logit transform each forward applies (measured once per model, not read
    from its config: vgs_kernels.LMHead) and the vocabulary the losses compare (`head_vocabulary`)."""
    s, t = LMHead.from_model(student), LMHead.from_model(teacher)
    return Heads(s.weight, s.bias, t.weight, t.bias, (s.logit_scale, t.logit_scale), (s.softcap, t.softcap), vocab)


def head_vocabulary(student, teacher, processor) -> Optional[int]:
    """None when both LM heads have the same rows (TRL's case: the whole heads), else the processor's
    vocabulary len(tokenizer), which both heads must cover: heads padded differently beyond it (Qwen2.5-VL-7B:
    152,064 rows, 3B: 151,936, for 151,665 ids) are compared over those ids. ValueError naming the sizes
    when a head is smaller than the vocabulary (another tokenizer)."""
    n, v_s, v_t = len(processor.tokenizer), vocab_size(student), vocab_size(teacher)
    if min(v_s, v_t) < n:
        raise ValueError(f"model's LM head has {v_s} rows and teacher_model's {v_t}, but the processor's tokenizer "
                         f"has {n} ids: both heads must cover it (a smaller head is another tokenizer's)")
    return None if v_s == v_t else n


def add_rollout_inputs(trainer, inputs, out: dict) -> dict:
    """What a method row adds to a TRL generation batch ``out``: the row's rollouts hook, then, where the
    row needs it, the text-only batch as ``text_*`` keys."""
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

