"""One VGSDistillationTrainer script for one process or many GPUs: launch it with Accelerate and a config of
python/accelerate_configs/ (README, "Multi-GPU with TRL"); the trainer needs no change between them.

    accelerate launch --config_file python/accelerate_configs/deepspeed_zero3.yaml python/trl_launch.py
    accelerate launch --config_file python/accelerate_configs/fsdp2.yaml python/trl_launch.py
    accelerate launch --config_file python/accelerate_configs/ddp.yaml python/trl_launch.py

The tiny Qwen2-VL student and teacher of vgs_kernels.testing (built from configs, no download), the synthetic
task's prompts, a few steps of exact VGS (--policy). Rank 0 prints the distributed setting, then vgs/eta and
grad_norm per step.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from datasets import Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic_task as task  # noqa: E402

from vgs_kernels.integrations.trl import POLICIES, VGSDistillationConfig, VGSDistillationTrainer  # noqa: E402
from vgs_kernels.testing import tiny_processor, tiny_vlm  # noqa: E402
from vgs_kernels.testing.cpu_deepspeed import deepspeed_on_cpu  # noqa: E402


def on_cpu() -> dict:
    """Nothing on GPUs. Without one (the tests run the launch lines on CPU processes): gloo, and for DeepSpeed,
    to which Accelerate gives no communication backend on a CPU, its state set up for the trainer to take."""
    if torch.cuda.is_available():
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true":
        return {"use_cpu": True, "ddp_backend": "gloo"}
    return deepspeed_on_cpu()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="vgs", choices=POLICIES)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="a smoke run: one step")
    p.add_argument("--out", default="results/trl_launch")
    args = p.parse_args(argv)
    args.steps = 1 if args.quick else args.steps
    extra = on_cpu()
    proc = tiny_processor("qwen2_vl", task.WORDS, tokenizer="whitespace")
    student, teacher = tiny_vlm("qwen2_vl", proc, seed=0), tiny_vlm("qwen2_vl", proc, hidden=96, seed=1)
    examples = task.sample(64, np.random.default_rng(0))
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": e.question}] for e in examples],
                            "image": [e.image for e in examples]})
    config = VGSDistillationConfig(
        output_dir=args.out, steering_policy=args.policy, max_steps=args.steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_completion_length=5, learning_rate=0.05, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", gradient_checkpointing=False, seed=0,
        bf16=torch.cuda.is_available(), **extra)
    trainer = VGSDistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=ds,
                                     processing_class=proc)
    trainer.train()
    if trainer.accelerator.is_main_process:
        acc = trainer.accelerator
        print(f"distributed: {acc.distributed_type.value}, processes: {acc.num_processes}, "
              f"student: {type(trainer.model_wrapped).__name__}")
        for h in trainer.state.log_history:
            if "vgs/eta" in h:
                print(f"step {h['step']}: vgs/eta {h['vgs/eta']:.4f} grad_norm {h['grad_norm']:.4f}")


if __name__ == "__main__":
    main()
