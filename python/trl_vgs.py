"""VGS on-policy distillation with TRL: a trl.DistillationTrainer user switches with one import and a config.

The tiny Qwen2-VL teacher and student of the demo (python/distill_demo.py: the teacher trained on the
synthetic task, the student knowing the answer format but not how to look; cached after the first
run), a `datasets.Dataset` of conversational prompts with images, and the trainer:

    python python/trl_vgs.py                      # 60 steps; the first run also pre-trains the demo's models
                                                  # (as distill_demo.py does, cached in results/demo_cache)
    python python/trl_vgs.py --quick              # smoke run: tiny pre-training, 6 steps
    python python/trl_vgs.py --policy fixed --eta 0.41

Prints the student's greedy accuracy with the image and with a blank image before and after, and the
logged VGS metrics (η, the four terms, the components' cosines).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from datasets import Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distill_demo  # noqa: E402
import synthetic_task as task  # noqa: E402

from vgs_kernels.integrations.trl import VGSDistillationConfig, VGSDistillationTrainer  # noqa: E402


def dataset(n: int, seed: int) -> Dataset:
    """The task as TRL reads it: a conversational "prompt" and an "image" per row."""
    examples = task.sample(n, np.random.default_rng(seed))
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": e.question}] for e in examples],
                              "image": [e.image for e in examples]})


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="auto", choices=["vgs", "fixed", "auto", "pcgrad", "sum"])
    p.add_argument("--eta", type=float, default=None, help="the constant of --policy fixed")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(distill_demo.ROOT, "results", "trl_vgs"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    demo = distill_demo.parse_args(["--quick"] if args.quick else [])
    proc, teacher, student = distill_demo.build(demo, seed=0)
    eval_set = task.sample(64, np.random.default_rng(999))
    before = distill_demo.evaluate(student, proc, eval_set)

    config = VGSDistillationConfig(
        output_dir=args.out, steering_policy=args.policy, eta=args.eta, gamma=2.0, lam=0.01,
        eta_every=10, max_steps=6 if args.quick else args.steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=2e-3, max_completion_length=7,
        bf16=False, gradient_checkpointing=False, logging_steps=2, save_strategy="no", report_to="none")
    trainer = VGSDistillationTrainer(model=student, teacher_model=teacher, args=config,
                                     train_dataset=dataset(512, seed=1), processing_class=proc)
    trainer.train()

    after = distill_demo.evaluate(trainer.model.eval(), proc, eval_set)
    for name, acc in (("before", before), ("after", after)):
        print(f"{name}: greedy accuracy with the image {acc['image']['all']:.3f}, blank image {acc['blank']['all']:.3f}")
    logs = [h for h in trainer.state.log_history if "vgs/eta" in h]
    keys = ("vgs/eta", "vgs/std", "vgs/vis", "vgs/lang", "vgs/vds", "vgs/cos_std_vis", "grad_norm")
    print("step " + " ".join(f"{k:>15}" for k in keys))
    for h in logs:
        print(f"{h['step']:4d} " + " ".join(f"{h.get(k, float('nan')):15.4g}" for k in keys))
    return logs


if __name__ == "__main__":
    main()
