"""What the TRL trainer suites (test_trl*.py) share: the synthetic task (python/synthetic_task.py), its
prompts as a TRL conversational dataset, the tiny Qwen2-VL student / teacher, the base trainer config,
a trainer class that records each step, and the per-component gradients computed independently of the
library. Import it after ``pytest.importorskip("trl")`` and ``pytest.importorskip("datasets")``."""
import copy
import functools
import os
import sys
import types

import datasets
import numpy as np
import torch
from transformers import TrainerCallback

from vgs_kernels.integrations.trl import VGSDistillationConfig
from vgs_kernels.testing import tiny_processor, tiny_vlm

PYTHON_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "python"))
if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)
import synthetic_task as task  # noqa: E402


def prompts(examples, answers=False):
    """The synthetic task's examples as a TRL conversational dataset: the question as a user message and
    the image (and the gold answer, for a reward)."""
    cols = {"prompt": [[{"role": "user", "content": e.question}] for e in examples],
            "image": [e.image for e in examples]}
    if answers:
        cols["answer"] = [e.answer for e in examples]
    return datasets.Dataset.from_dict(cols)


def tiny_qwen(answers=False):
    """(processor, student, teacher, dataset): the tiny Qwen2-VL student (seed 0), a wider teacher (hidden
    96, seed 1) and 16 prompts of the synthetic task."""
    proc = tiny_processor("qwen2_vl", task.WORDS)
    student = tiny_vlm("qwen2_vl", proc, seed=0)
    teacher = tiny_vlm("qwen2_vl", proc, hidden=96, seed=1)
    return proc, student, teacher, prompts(task.sample(16, np.random.default_rng(0)), answers)


def config(tmp_path, cls=VGSDistillationConfig, **kw):
    """A CPU-test sized run: fp32, SGD, greedy rollouts, 3 steps of 2 micro-batches of 2; ``kw`` overrides."""
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_steps=3, max_completion_length=5, bf16=False, gradient_checkpointing=False,
                report_to="none", logging_steps=1, generation_kwargs={"do_sample": False},
                learning_rate=0.05, optim="sgd", save_strategy="no", seed=0, dataloader_num_workers=0)
    base.update(kw)
    return cls(**base)


def ds_config(stage, **zero):
    """A DeepSpeed config for TrainingArguments(deepspeed=...): Trainer fills the "auto" values (micro-batch,
    accumulation, clipping from max_grad_norm, bf16); under ZeRO-3 no parameter is kept whole for being small,
    so the LM heads really are partitioned. ``zero``: more zero_optimization settings."""
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10 ** 9, "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                                              **zero}}


def recording(cls):
    """cls that records each micro-batch, the student before each step and .grad right before it."""

    class Rec(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.micro, self.before, self.grads, self.stats = [], [], [], []
            rec = self

            class CB(TrainerCallback):
                def on_step_begin(self, args, state, control, **kw):
                    rec.before.append(copy.deepcopy(rec.model))
                    rec.micro.append([])

                def on_pre_optimizer_step(self, args, state, control, **kw):
                    rec.grads.append(flat([p.grad for p in rec.model.parameters() if p.requires_grad]))
                    steer = getattr(rec, "steer", None)  # trl.DistillationTrainer has none
                    rec.stats.append(dict(steer.stats) if steer is not None else {})

            self.add_callback(CB())

        def compute_loss(self, model, inputs, *a, **k):
            self.micro[-1].append({k2: v for k2, v in inputs.items()})
            return super().compute_loss(model, inputs, *a, **k)

    return Rec


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def kl(x, y):
    """KL(softmax(x) ‖ softmax(y)) per row, plain torch."""
    lx, ly = x.log_softmax(-1), y.log_softmax(-1)
    return (lx.exp() * (lx - ly)).sum(-1)


def text_only(prompt_ids, prompt_mask, drop, pad):
    """The prompt without its vision tokens, left-padded (written here independently of the library)."""
    rows = [[t for t, m in zip(r.tolist(), mr.tolist()) if m and t not in drop] for r, mr in zip(prompt_ids, prompt_mask)]
    n = max(map(len, rows))
    ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows])
    return ids, (torch.arange(n)[None] >= torch.tensor([n - len(r) for r in rows])[:, None]).long()


def component_grads(student, teacher, inputs, drop, pad):
    """Per-component gradients (std, vis, lp) of one micro-batch from the four full logit sets."""
    params = [p for p in student.parameters() if p.requires_grad]
    K = inputs["completion_ids"].size(1)
    mask = inputs["completion_mask"].bool()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    vis_in = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
    tp, tm = text_only(inputs["prompt_ids"], inputs["prompt_mask"], drop, pad)
    tids, tattn = torch.cat([tp, inputs["completion_ids"]], 1), torch.cat([tm, inputs["completion_mask"]], 1)
    student.train()
    s = student(input_ids=ids, attention_mask=attn, **vis_in).logits[:, -K - 1:-1]
    u = student(input_ids=tids, attention_mask=tattn).logits[:, -K - 1:-1]
    with torch.no_grad():
        a = teacher(input_ids=ids, attention_mask=attn, **vis_in).logits[:, -K - 1:-1]
        b = teacher(input_ids=tids, attention_mask=tattn).logits[:, -K - 1:-1]
    vds = kl(a, b)
    gate = vds > torch.quantile(vds[mask], 0.7)
    n = inputs["num_items_in_batch"]
    losses = [kl(s, a)[mask].sum() / n, kl(s, u.detach() + a - b)[mask].sum() / n,
              kl(u, b)[mask & gate].sum() / n]
    out = []
    for loss in losses:
        g = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        out.append(flat([torch.zeros_like(p) if x is None else x for x, p in zip(g, params)]))
    return out


def applies_config_transform(model):
    """Makes ``model``'s forward apply its text config's logit_scale, then final_logit_softcapping (as Aya
    Vision and PaliGemma over Gemma-2 do; Qwen's forward applies neither), so that TRL, which reads them
    from the config, and vgs.LMHead, which measures the forward, agree. Survives copy.deepcopy."""
    forward = type(model).forward

    @functools.wraps(forward)  # generate() checks its kwargs against forward's signature
    def transformed(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        cfg = self.config.get_text_config()
        z = out.logits * (getattr(cfg, "logit_scale", None) or 1.0)
        cap = getattr(cfg, "final_logit_softcapping", None)
        out.logits = z if cap is None else cap * torch.tanh(z / cap)
        return out

    model.forward = types.MethodType(transformed, model)
    return model
