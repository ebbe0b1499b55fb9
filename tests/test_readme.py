"""Every ```python block of README.md runs, verbatim, on a tiny Qwen2-VL student/teacher (CPU), so
the README cannot drift from the API. The names a block takes from "your" loop (student, teacher,
processor, optimizer, loader, micro_batches, log, ...) come from `namespace()` below."""
import contextlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vgs_kernels as vgs
from vgs_kernels.testing import tiny_processor, tiny_vlm

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
WORDS = "what colour is the square ? red green blue it a".split()


def _prompt_batch(processor, seed):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the square ?"}]}]
    text = processor.apply_chat_template([conv, conv], add_generation_prompt=True)
    return processor(text=text, images=images, return_tensors="pt", padding=True)


def namespace():
    """What a user's loop already has when it reaches the README's lines."""
    processor = tiny_processor("qwen2_vl", WORDS)
    student = tiny_vlm("qwen2_vl", processor, hidden=32, layers=1, heads=4, vision_hidden=16, seed=0)
    teacher = tiny_vlm("qwen2_vl", processor, hidden=32, layers=1, heads=4, vision_hidden=16, seed=1)
    loader = [_prompt_batch(processor, seed) for seed in range(2)]
    eos = processor.tokenizer.eos_token_id
    vision_ids = vgs.VisionTokens.from_model(student, processor).ids().tolist()
    micro_batches = []
    for prompts in loader:
        torch.manual_seed(0)
        seq = student.generate(**prompts, max_new_tokens=4, do_sample=True, suppress_tokens=vision_ids)
        micro_batches.append(vgs.rollout_batch(prompts, seq, eos))
    logged = []
    return {"torch": torch, "contextlib": contextlib, "vgs": vgs, "student": student, "teacher": teacher,
            "processor": processor, "loader": loader, "eos_token_id": eos, "micro_batches": micro_batches,
            "optimizer": torch.optim.AdamW(student.parameters(), lr=1e-4), "loss_fn": vgs.VGSLoss(),
            "log": lambda **kw: logged.append(kw), "logged": logged}


@contextlib.contextmanager
def fresh_accelerate():
    """Accelerate's state is a process-wide singleton (a Trainer run earlier fixes its precision)."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        yield
        return
    AcceleratorState._reset_state(True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)


@contextlib.contextmanager
def process_group(needed: bool):
    """A one-process gloo group for the distributed blocks."""
    if not needed:
        yield
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _dataset(seed=0, n=4):
    """A TRL conversational dataset: prompt messages and an image per row."""
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "what colour is the square ?"}]] * n,
        "image": [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]})


def _small_trl_runs(monkeypatch, tmp_path, name="VGSDistillationConfig", **extra):
    """The TRL block as written, with the run made CPU-test sized (2 steps, no bf16, no logging)."""
    trl_mod = pytest.importorskip("vgs_kernels.integrations.trl")
    full = getattr(trl_mod, name)

    class Small(full):
        def __init__(self, **kw):
            kw.update(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                      max_completion_length=4, bf16=False, report_to="none", save_strategy="no", logging_steps=1,
                      **extra)
            super().__init__(**kw)

    monkeypatch.setattr(trl_mod, name, Small)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(index, monkeypatch, tmp_path):
    code = BLOCKS[index]
    ns = namespace()
    if "VGSDistillationTrainer" in code:
        _small_trl_runs(monkeypatch, tmp_path)
        ns["ds"] = _dataset()
    if "VGSGRPOTrainer" in code:  # GRPO: 2 rollouts per prompt, a gold answer column for the reward
        _small_trl_runs(monkeypatch, tmp_path, "VGSGRPOConfig", num_generations=2)
        ns["ds"] = _dataset().add_column("answer", ["it is red"] * 4)
    if "_chunked_divergence_loss" in code:  # the block patches TRL: restored after the test
        td = pytest.importorskip("trl.trainer.distillation_trainer")
        monkeypatch.setattr(td, "_chunked_divergence_loss", td._chunked_divergence_loss)
    params = [p.detach().clone() for p in ns["student"].parameters()]
    with process_group("DDP(" in code), fresh_accelerate():
        exec(compile(code, f"README.md python block {index}", "exec"), ns)
    if "steer" in ns or "trainer" in ns or "run" in ns:  # a training block: it stepped
        assert any(not torch.equal(p, q) for p, q in zip(ns["student"].parameters(), params))
    if "steer" in ns:
        assert torch.isfinite(ns["steer"].stats["eta"])
    if "trainer" in ns:  # TRL's logs carry eta
        assert any("vgs/eta" in row for row in ns["trainer"].state.log_history)
    for kw in ns["logged"]:  # plain numbers every step (cos is NaN on steps that measured nothing)
        assert all(isinstance(v, float) for v in kw.values()) and np.isfinite(kw.get("eta", 0.0))


def test_every_block_is_collected():
    assert len(BLOCKS) >= 3 and any("GradientSteering" in b for b in BLOCKS)
