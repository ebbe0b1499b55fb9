"""Per-step time and peak memory of VGSDistillationTrainer (fixed η, exact η) against trl.DistillationTrainer
(beta=1) under the same DeepSpeed ZeRO-2 / ZeRO-3 config (TrainingArguments(deepspeed=...)), 2 gloo processes (CPU).

    python -m benchmarks.trl_deepspeed [--rounds 3] [--steps 4] [--size tiny|small]

Suite trl's tiny Qwen2-VL student and teacher (--size), greedy rollouts, 2 micro-batches of --batch prompts
per rank and step, fp32, SGD, gradient_clipping 1.0. Interleaved: every round trains each (stage, trainer)
once, a fresh trainer for --steps optimizer steps, so the machine's drift hits all alike. Time: TRL's own
`step_time` log (the micro-batches' training_step: generation, passes, loss, backward, DeepSpeed's step), the
first step of each run dropped as warm-up, rank 0; median and p20-p80 over rounds x steps. Memory: rank 0's
peak resident set above its level before train() (benchmarks/harness.py PeakMemory, VmHWM), median over rounds.
ZeRO-3 keeps no parameter whole for being small (stage3_param_persistence_threshold 0), so the LM heads are
partitioned as they are at real sizes; one untimed trl run first takes the first-use costs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

from .harness import spawn_two

IMPLS = ("trl", "vgs fixed", "vgs exact")
STAGES = (2, 3)


def run(impl: str, stage: int, args, models, out: str):
    """(step times in s after the first, peak bytes) of one fresh trainer."""
    import copy

    import numpy as np
    import trl
    from datasets import Dataset

    from vgs_kernels.integrations.trl import VGSDistillationConfig, VGSDistillationTrainer
    from vgs_kernels.testing.cpu_deepspeed import deepspeed_on_cpu

    from .harness import PeakMemory
    from .suite_trl import _builders

    task, _ = _builders()
    proc, student, teacher = models
    ex = task.sample(args.batch * 4 * (args.steps + 1), np.random.default_rng(0))
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": e.question}] for e in ex],
                            "image": [e.image for e in ex]})
    zero = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}  # heads partitioned, as at real sizes
    common = dict(output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=2,
                  max_steps=args.steps, max_completion_length=args.tokens, bf16=False, gradient_checkpointing=False,
                  report_to="none", save_strategy="no", learning_rate=1e-4, optim="sgd", max_grad_norm=1.0,
                  logging_steps=1, disable_tqdm=True, deepspeed=zero, **deepspeed_on_cpu(),
                  generation_kwargs={"do_sample": False, "min_new_tokens": args.tokens})
    if impl == "trl":
        cls, config = trl.DistillationTrainer, trl.DistillationConfig(beta=1.0, **common)
    else:
        fixed = impl == "vgs fixed"
        cls, config = VGSDistillationTrainer, VGSDistillationConfig(
            steering_policy="fixed" if fixed else "vgs", eta=0.41 if fixed else None, **common)
    tr = cls(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=config, train_dataset=ds,
             processing_class=proc)
    with PeakMemory(torch.device("cpu")) as mem:
        tr.train()
    times = [h["step_time"] for h in tr.state.log_history if "step_time" in h]
    return times[1:], mem.peak


def worker(rank, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from .suite_trl import SIZES, _models
    size = {**SIZES[args.size], "batch": args.batch, "tokens": args.tokens}
    models = _models(size, torch.device("cpu"))
    res = {(s, i): ([], []) for s in STAGES for i in IMPLS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run("trl", 2, args, models, os.path.join(tmp, "warm-up"))  # first-use costs (imports, JIT builds)
            for r in range(args.rounds):
                for stage in STAGES:
                    for impl in IMPLS:
                        times, peak = run(impl, stage, args, models, os.path.join(tmp, f"{r}{stage}{impl}"))
                        res[stage, impl][0].extend(times)
                        res[stage, impl][1].append(peak)
        if rank == 0:
            torch.save(res, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", default="tiny", choices=("tiny", "small"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8)
    args = p.parse_args()
    res = spawn_two(worker, args, "vgs_trl_ds_bench")
    print(f"2 gloo processes (CPU, 1 thread each), suite trl's {args.size} Qwen2-VL, {args.batch} prompts x 2 "
          f"micro-batches per rank and step, {args.tokens} greedy tokens; {args.rounds} rounds x {args.steps - 1} "
          f"timed steps\n")
    print("| ZeRO | trainer | ms / step (median) | p20-p80 | time / trl | peak MiB | mem / trl |\n"
          "|---|---|---|---|---|---|---|")
    for stage in STAGES:
        base_t = statistics.median(res[stage, "trl"][0])
        base_m = statistics.median(res[stage, "trl"][1])
        for impl in IMPLS:
            times, peaks = res[stage, impl]
            med, peak = statistics.median(times), statistics.median(peaks)
            print(f"| {stage} | {impl} | {1e3 * med:.0f} | {1e3 * quantile(times, 0.2):.0f}-"
                  f"{1e3 * quantile(times, 0.8):.0f} | {med / base_t:.2f}x | {peak / 2 ** 20:.1f} | "
                  f"{peak / base_m:.2f}x |")


if __name__ == "__main__":
    main()
