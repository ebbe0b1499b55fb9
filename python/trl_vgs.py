"""On-policy distillation with TRL: the method table of VGSDistillationTrainer on a tiny Qwen2-VL (CPU).

A `trl.DistillationTrainer` user switches by changing the trainer and config classes; `--method` picks a
row of `vgs_kernels.integrations.trl.METHODS`, the one setting that changes between them:

    vgs      Visual Gradient Steering: the four hidden-state passes, η·[Std + γ·Vis + λ·LP] through the
             steering hook (--policy); logs vgs/eta, vgs/std, vgs/vis, vgs/lang, vgs/vds, vgs/cos_*, ...
    opd      plain on-policy distillation, the update of trl.DistillationTrainer(beta=1) on our kernel;
             logs TRL's loss and entropy
    va_opd   VA-OPD: num_generations=2 rollouts per prompt, weighted by the teacher's visual advantage
             over a degraded image (--va-view); logs va/mean, va/positive, va/weight_max, va/kl, va/kl_high

The teacher and the student are python/distill_demo.py's (`--regime`: blind, the student knowing the
answer format but not how to look; grounded, already answering about half the questions; aligned), pre-
trained on the synthetic task (python/synthetic_task.py) on the first run and cached (--cache). The
dataset is TRL's conversational format: a "prompt" and an "image" column.

    python python/trl_vgs.py                          # vgs, 60 steps (the first run also pre-trains the models)
    python python/trl_vgs.py --quick --method opd     # smoke run: tiny pre-training, 6 steps (< 3 min, CPU)
    python python/trl_vgs.py --method va_opd
    python python/trl_vgs.py --policy fixed --eta 0.41

Any other argument goes to distill_demo's settings of the pre-training (e.g. --teacher-steps 10).
Prints the student's greedy accuracy with the image and with a blank image before and after, the
method's logged metrics, and where the outputs went: <out> (the trained student, log_history.json)
and the cache of pre-trained weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from datasets import Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distill_demo  # noqa: E402  (its sys.path puts this checkout's vgs_kernels first)
import synthetic_task as task  # noqa: E402

from vgs_kernels.integrations.trl import METHODS, POLICIES, VGSDistillationConfig, VGSDistillationTrainer  # noqa: E402
from vgs_kernels.integrations.trl.methods.va_opd import VIEWS as VA_VIEWS  # noqa: E402

# What each method logs (the columns printed), besides TRL's usual ones.
METRICS = {"vgs": ("vgs/eta", "vgs/std", "vgs/vis", "vgs/lang", "vgs/vds", "vgs/cos_std_vis", "grad_norm"),
           "opd": ("loss", "entropy", "grad_norm"),
           "va_opd": ("loss", "va/mean", "va/positive", "va/weight_max", "va/kl", "va/kl_high")}
# Each method's settings of VGSDistillationConfig beyond the shared ones.
SETTINGS = {"vgs": lambda a: dict(steering_policy=a.policy, eta=a.eta, gamma=2.0, lam=0.01, eta_every=10),
            "opd": lambda a: {},
            "va_opd": lambda a: dict(num_generations=2, va_view=a.va_view)}


def dataset(n: int, seed: int, regime: str) -> Dataset:
    """The task as TRL reads it: a conversational "prompt" and an "image" per row."""
    examples = task.sample(n, np.random.default_rng(seed), **distill_demo.REGIME_TASK[regime])
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": e.question}] for e in examples],
                              "image": [e.image for e in examples]})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="vgs", choices=list(METHODS))
    p.add_argument("--policy", default="auto", choices=POLICIES,
                   help="--method vgs: the steering policy")
    p.add_argument("--eta", type=float, default=None, help="the constant of --policy fixed")
    p.add_argument("--va-view", default="degraded", choices=VA_VIEWS, help="--method va_opd: the weak view")
    p.add_argument("--regime", default="blind", choices=distill_demo.REGIMES, help="the student's starting point")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 60; --quick: 6)")
    p.add_argument("--batch", type=int, default=8, help="rollouts per micro-batch (2 micro-batches a step)")
    p.add_argument("--eval-size", type=int, default=None, help="held-out questions (default 64; --quick: 24)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny pre-training (distill_demo --quick) and 6 steps")
    p.add_argument("--out", default=None, help="output_dir (default results/trl_vgs/<method>)")
    p.add_argument("--cache", default=os.path.join(distill_demo.ROOT, "results", "demo_cache"),
                   help="pre-trained teacher/student weights, shared with distill_demo.py ('' to disable)")
    args, rest = p.parse_known_args(argv)
    args.steps = args.steps or (6 if args.quick else 60)
    args.eval_size = args.eval_size or (24 if args.quick else 64)
    args.out = args.out or os.path.join(distill_demo.ROOT, "results", "trl_vgs", args.method)
    args.demo = distill_demo.parse_args(["--quick"] * args.quick + list(rest) +
                                        ["--regime", args.regime, "--cache", args.cache])
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> dict:
    t0 = time.perf_counter()
    proc, teachers, students = distill_demo.build(args.demo, seed=0)  # progress bars: distill_demo.pretrain
    print(f"teacher and student ready in {time.perf_counter() - t0:.0f} s", flush=True)
    teacher, student = teachers[args.regime], students[args.regime]
    tokens = distill_demo.new_tokens(args.demo, args.regime)
    eval_set = task.sample(args.eval_size, np.random.default_rng(999), **distill_demo.REGIME_TASK[args.regime])
    before = distill_demo.evaluate(student, proc, eval_set, tokens)

    config = VGSDistillationConfig(
        output_dir=args.out, method=args.method, **SETTINGS[args.method](args), max_steps=args.steps,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=2, learning_rate=2e-3,
        max_completion_length=tokens, bf16=False, gradient_checkpointing=False, logging_steps=2,
        save_strategy="no", report_to="none", seed=0)
    trainer = VGSDistillationTrainer(model=student, teacher_model=teacher, args=config,
                                     train_dataset=dataset(512, seed=1, regime=args.regime), processing_class=proc)
    trainer.train()  # TRL's progress bar; the logged rows below
    trainer.save_model(args.out)
    with open(os.path.join(args.out, "log_history.json"), "w") as f:
        json.dump(trainer.state.log_history, f, indent=1)

    after = distill_demo.evaluate(trainer.model.eval(), proc, eval_set, tokens)
    print(f"method {args.method}" + (f" (policy {args.policy})" if args.method == "vgs" else "") +
          f", regime {args.regime}, {args.steps} steps, {len(eval_set)} held-out questions")
    for name, acc in (("before", before), ("after", after)):
        print(f"{name}: greedy accuracy with the image {acc['image']['all']:.3f}, blank image {acc['blank']['all']:.3f}")
    keys = METRICS[args.method]
    logs = [h for h in trainer.state.log_history if keys[0] in h]
    print("step " + " ".join(f"{k:>15}" for k in keys))
    for h in logs:
        print(f"{h['step']:4d} " + " ".join(f"{h.get(k, float('nan')):15.4g}" for k in keys))
    print(f"outputs: {os.path.abspath(args.out)} (the trained student, log_history.json)")
    cache = os.path.abspath(args.cache) if args.cache else "none (--cache '')"
    print(f"cache: {cache} (pre-trained teacher and student)")
    return {"before": before, "after": after, "logs": logs, "out": args.out, "cache": args.cache}


if __name__ == "__main__":
    main()
