"""VGSDistillationTrainer on 2 gloo processes (Accelerate wraps the student in DDP): the same update as
one process on the concatenated batch, clipping engaged. (DDP's forward returns the loss through its
_DDPSink, a new tensor: the trainer's loss check once refused it, so multi-process DDP raised.)
DeepSpeed ZeRO-2/3 in both trainers: test_trl_deepspeed.py.

Greedy rollouts depend only on the parameters; Accelerate gives rank r the r-th of every 2 batches of
2 prompts, which together are the single process's batch of 4 (the same seeded sampler).
"""
from __future__ import annotations

import copy
import os

import pytest

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from helpers.spawn import assert_params_close, no_errors, spawn_ranks  # noqa: E402
from helpers.trl import config, tiny_qwen  # noqa: E402

WORLD, PER_RANK, STEPS, MAX_NORM = 2, 2, 2, 0.1

DEADLINE = 300


def train(path, batch, ddp=False):
    from vgs_kernels.integrations.trl import VGSDistillationTrainer
    proc, student, teacher, ds = tiny_qwen()
    args = config(path, per_device_train_batch_size=batch, max_steps=STEPS, steering_policy="vgs",
                  max_grad_norm=MAX_NORM, use_cpu=ddp, ddp_backend="gloo" if ddp else None)
    trainer = VGSDistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=ds,
                                     processing_class=proc)
    trainer.train()
    assert (type(trainer.model_wrapped).__name__ == "DistributedDataParallel") == ddp
    full = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    etas = [h["vgs/eta"] for h in trainer.state.log_history if "vgs/eta" in h]
    return {"params": full, "norms": norms, "etas": etas}


def tasks(rank, path):
    """What every rank runs (helpers.spawn): the trainer, Accelerate setting up gloo DDP on CPU."""
    return [("ddp", lambda: train(os.path.join(path, "out"), PER_RANK, ddp=True))]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(tasks, tmp_path_factory.mktemp("trlddp"), world=WORLD, deadline=DEADLINE,
                       env={"ACCELERATE_USE_CPU": "1"})  # Accelerate: gloo DDP on CPU


def test_trainer_same_update_as_one_process(ranks, tmp_path):
    ddp = no_errors(ranks, "ddp")
    want = train(str(tmp_path), WORLD * PER_RANK)
    assert any(n > MAX_NORM for n in want["norms"])  # clipping engaged
    for r, got in enumerate(ddp):
        assert got["norms"] == pytest.approx(want["norms"], rel=1e-4)
        assert got["etas"] == pytest.approx(want["etas"], rel=1e-4)
        assert_params_close(got["params"], want["params"], atol=2e-5, rtol=1e-4, rank=r)
