"""Per-step cost of steering under DeepSpeed ZeRO-2 / ZeRO-3 against plain ZeRO, 2 gloo processes (CPU).

    python -m benchmarks.deepspeed_steering [--steps 8] [--hidden 256] [--layers 4] [--vocab 8192]

One spawn; per stage, the variants are interleaved step by step on their own engines (same model,
same data): "plain" = engine.backward(std + gamma * vis) + engine.step() (what a user without
steering runs), "vgs" = steer.backward({"std", "vis"}) + engine.step() (two backward passes, each
reduced by DeepSpeed, Gram + all-reduce of 2x2 + combine), "fixed" = steer.backward through the hook
with one combined backward. Median wall time per optimizer step (gradient_accumulation_steps 1)
over --steps timed steps after 2 warm-up steps, rank 0's clock; prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from .harness import spawn_two

VARIANTS = ("plain", "vgs", "fixed")


def model_for(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False))


def worker(rank, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed
    import vgs_kernels as vgs
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        rows = []
        for stage in (2, 3):
            runs = {}
            for v in VARIANTS:
                model = model_for(args)
                cfg = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
                       "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
                       "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
                engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
                steer = None if v == "plain" else vgs.GradientSteering(
                    opt, policy=v, model=engine, **({"eta": 0.41} if v == "fixed" else {}))
                runs[v] = (engine, steer, [])
            loss_fn = vgs.VGSLoss(gamma=2.0)
            g = torch.Generator().manual_seed(rank)
            for step in range(args.steps + 2):
                ids = torch.randint(args.vocab, (args.batch, args.length), generator=g)
                a, b = (torch.randn(args.batch, args.response, args.vocab, generator=g) for _ in range(2))
                for v in VARIANTS:  # interleaved: the machine's drift hits every variant alike
                    engine, steer, times = runs[v]
                    dist.barrier()
                    t0 = time.perf_counter()
                    s = engine(input_ids=ids).logits[:, -args.response:]
                    u = engine(input_ids=ids[:, args.length // 2:]).logits[:, -args.response:]
                    o = loss_fn(s, u, a, b)
                    if steer is None:
                        engine.backward(o.std + 2.0 * o.vis)
                    else:
                        steer.backward({"std": o.std, "vis": o.vis})
                    engine.step()
                    dist.barrier()
                    if step >= 2:
                        times.append(time.perf_counter() - t0)
            n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in runs["plain"][0].module.parameters())
            base = statistics.median(runs["plain"][2])
            for v in VARIANTS:
                med = statistics.median(runs[v][2])
                rows.append((stage, v, n, med, med / base))
        if rank == 0:
            torch.save(rows, out)
        del runs, engine, steer
        dist.barrier()
    finally:
        import gc
        gc.collect()
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--response", type=int, default=32)
    args = p.parse_args()
    rows = spawn_two(worker, args, "vgs_ds_bench")
    print(f"2 gloo processes (CPU, 1 thread each), Qwen2 {rows[0][2] / 1e6:.1f} M params, batch {args.batch}/rank, "
          f"length {args.length}, response {args.response}, V {args.vocab}; median of {args.steps} steps\n")
    print("| ZeRO stage | variant | ms / step | vs plain |\n|---|---|---|---|")
    for stage, v, _, med, ratio in rows:
        print(f"| {stage} | {v} | {1e3 * med:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
