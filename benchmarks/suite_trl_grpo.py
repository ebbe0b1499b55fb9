"""Suite "trl-grpo" — per-step time and peak memory of VGSGRPOTrainer against trl.GRPOTrainer (Eq. 22).

suite_trl's tiny Qwen2-VL student / teacher, the synthetic task with a correctness reward, 2
rollouts per prompt (per-device batch `size["batch"]`, gradient accumulation 2), fp32, greedy
rollouts generated once in setup and reused (the training step alone: GRPO's generation is the
same code in all four). One timed call runs `STEPS` optimizer steps through the trainer's own code,
as suite_trl does:

  grpo            trl.GRPOTrainer, beta=0 (its log-prob pass and loss)
  grpo+opd        VGSGRPOTrainer(distill="standard", steering_policy="sum"): + KL(p ‖ qa)
  grpo+vgs fixed  VGSGRPOTrainer(distill="vgs", steering_policy="fixed", eta=0.41): one combined backward
  grpo+vgs exact  VGSGRPOTrainer(distill="vgs", steering_policy="vgs"): a backward per component
                  (grpo, std, vis, lp) and the Gram every step

Ratios are slowdowns against grpo. What they cost on top of GRPO: the teacher's passes, the
student's hidden-state passes (VGSDistillationTrainer's four, next to GRPO's own log-prob pass, which
is not shared) and, for exact steering, the per-component backwards. Each trainer is its own
reference (tests/integrations/trl/test_trl_grpo.py checks them).
"""
from __future__ import annotations

import copy

from .harness import Case, Impl
from .suite_trl import STEPS, _builders, _prepare, _steps

IMPLS = ("grpo", "grpo+opd", "grpo+vgs fixed", "grpo+vgs exact")
N_IMPLS = len(IMPLS)


def _reward(prompts, completions, answer, **kwargs):
    return [float(" ".join((c[0]["content"] if isinstance(c, list) else c).split()) == a)
            for c, a in zip(completions, answer)]


def _trainer(name: str, size: dict, models, out: str):
    import numpy as np
    import trl
    from datasets import Dataset

    from vgs_kernels.integrations.trl import VGSGRPOConfig, VGSGRPOTrainer

    task, _ = _builders()
    proc, student, teacher = models
    ex = task.sample(size["batch"] * (STEPS + 1), np.random.default_rng(0))
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": e.question}] for e in ex],
                            "image": [e.image for e in ex], "answer": [e.answer for e in ex]})
    common = dict(output_dir=out, per_device_train_batch_size=size["batch"], gradient_accumulation_steps=2,
                  num_generations=2, max_steps=1, max_completion_length=size["tokens"], bf16=False, beta=0.0,
                  gradient_checkpointing=False, report_to="none", save_strategy="no", learning_rate=1e-4,
                  disable_tqdm=True, generation_kwargs={"do_sample": False, "min_new_tokens": size["tokens"]})
    kw = dict(model=copy.deepcopy(student), reward_funcs=_reward, args=None, train_dataset=ds, processing_class=proc)
    if name == "grpo":
        kw["args"], cls = trl.GRPOConfig(**common), trl.GRPOTrainer
    else:
        distill, policy = {"grpo+opd": ("standard", "sum"), "grpo+vgs fixed": ("vgs", "fixed"),
                           "grpo+vgs exact": ("vgs", "vgs")}[name]
        kw["args"] = VGSGRPOConfig(distill=distill, steering_policy=policy, eta=0.41 if policy == "fixed" else None,
                                   **common)
        kw["teacher_model"], cls = teacher, VGSGRPOTrainer
    tr = cls(**kw)
    tr.train()  # creates the optimizer (and the hook), warms everything up; untimed
    return tr


def cases(size_name: str, device):
    size, models, out = _prepare("trl-grpo", size_name, device)
    impls = []
    for name in IMPLS:
        def setup(name=name):
            tr = _trainer(name, size, models, out)
            batch = next(iter(tr.get_train_dataloader()))
            cached = tr._generate_and_score_completions(batch)
            tr._step, tr._buffered_inputs = 0, None
            return tr, batch, cached
        impls.append(Impl(name, step=lambda state: _steps(*state), setup=setup))
    yield Case("trl-grpo", {"mode": "step", "size": size_name, "steps": STEPS}, impls, baselines=["grpo"],
               tolerance=float("inf"), ratio="slowdown")
