"""VGSDistillationTrainer on 2 gloo processes (Accelerate wraps the student in DDP): the same update as
one process on the concatenated batch, clipping engaged. (DDP's forward returns the loss through its
_DDPSink, a new tensor: the trainer's loss check once refused it, so multi-process DDP raised.)
DeepSpeed in this trainer raises NotImplementedError (issue 24; GradientSteering on an engine is
tested in tests/test_deepspeed.py).

Greedy rollouts depend only on the parameters; Accelerate gives rank r the r-th of every 2 batches of
2 prompts, which together are the single process's batch of 4 (the same seeded sampler).
"""
from __future__ import annotations

import copy
import os
import socket
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WORLD, PER_RANK, STEPS, MAX_NORM = 2, 2, 2, 0.1

DEADLINE = 300


def setup():
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
    import synthetic_task as task
    from vgs_kernels.testing import tiny_processor, tiny_vlm
    proc = tiny_processor("qwen2_vl", task.WORDS)
    student = tiny_vlm("qwen2_vl", proc, seed=0)
    teacher = tiny_vlm("qwen2_vl", proc, hidden=96, seed=1)
    ex = task.sample(16, np.random.default_rng(0))
    ds = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": e.question}] for e in ex],
                                     "image": [e.image for e in ex]})
    return proc, student, teacher, ds


def train(path, batch, ddp=False):
    from vgs_kernels.integrations.trl import VGSDistillationConfig, VGSDistillationTrainer
    proc, student, teacher, ds = setup()
    args = VGSDistillationConfig(
        output_dir=path, per_device_train_batch_size=batch, gradient_accumulation_steps=2, max_steps=STEPS,
        max_completion_length=5, bf16=False, gradient_checkpointing=False, report_to="none", logging_steps=1,
        learning_rate=0.05, optim="sgd", save_strategy="no", seed=0, dataloader_num_workers=0, generation_kwargs={"do_sample": False},
        steering_policy="vgs", max_grad_norm=MAX_NORM, use_cpu=ddp, ddp_backend="gloo" if ddp else None)
    trainer = VGSDistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=ds,
                                     processing_class=proc)
    trainer.train()
    assert (type(trainer.model_wrapped).__name__ == "DistributedDataParallel") == ddp
    full = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    etas = [h["vgs/eta"] for h in trainer.state.log_history if "vgs/eta" in h]
    return {"params": full, "norms": norms, "etas": etas}


def worker(rank, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), ACCELERATE_USE_CPU="1")  # Accelerate: gloo DDP on CPU
    torch.set_num_threads(1)
    results = {}
    try:
        try:
            results["ddp"] = train(os.path.join(path, "out"), PER_RANK, ddp=True)
        except Exception:
            results["ddp"] = {"error": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(path, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("trlddp"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(worker, args=(port, path), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the workers did not finish within {DEADLINE} s")
    return [torch.load(os.path.join(path, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def test_trainer_same_update_as_one_process(ranks, tmp_path):
    stage = "ddp"
    for r in range(WORLD):
        assert "error" not in ranks[r][stage], f"rank {r}:\n{ranks[r][stage]['error']}"
    want = train(str(tmp_path), WORLD * PER_RANK)
    assert any(n > MAX_NORM for n in want["norms"])  # clipping engaged
    for r in range(WORLD):
        got = ranks[r][stage]
        assert got["norms"] == pytest.approx(want["norms"], rel=1e-4)
        assert got["etas"] == pytest.approx(want["etas"], rel=1e-4)
        for n, p in want["params"].items():
            torch.testing.assert_close(got["params"][n], p, atol=2e-5, rtol=1e-4, msg=lambda m: f"rank {r} {n}: {m}")
