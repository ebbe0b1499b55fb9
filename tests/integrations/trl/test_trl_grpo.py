"""VGSGRPOTrainer (Eq. 22) against trl.GRPOTrainer, VGSDistillationTrainer and an independent computation.

Tiny Qwen2-VL student / teacher from configs, fp32 on CPU, a correctness reward on the synthetic task.
Sampled rollouts (GRPO needs different completions in a group) from the same seed: two trainers with
the same parameters draw the same completions.
"""
import copy

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from vgs_kernels.integrations.trl import (VGSDistillationConfig, VGSDistillationTrainer, VGSGRPOConfig,  # noqa: E402
                                          VGSGRPOTrainer)
from vgs_kernels.testing import tiny_processor, tiny_vlm  # noqa: E402
from vgs_kernels.vlm import VisionTokens  # noqa: E402

from helpers.trl import component_grads, config, flat, recording, task, tiny_qwen  # noqa: E402

GAMMA, LAM = 2.0, 0.01


def reward(prompts, completions, answer, **kwargs):
    """Correctness with partial credit: the fraction of the gold answer's words in the completion."""
    out = []
    for c, gold in zip(completions, answer):
        words = (c[0]["content"] if isinstance(c, list) else c).split()
        out.append(sum(w in words for w in gold.split()) / len(gold.split()))
    return out


@pytest.fixture(scope="module")
def setup():
    proc, student, teacher, ds = tiny_qwen(answers=True)
    gen = {"do_sample": True, "suppress_tokens": VisionTokens.from_model(student, proc).ids().tolist()}
    return proc, student, teacher, ds, gen


def grpo_config(tmp_path, setup, cls=VGSGRPOConfig, **kw):
    base = dict(num_generations=2, generation_kwargs=setup[4], max_steps=3, beta=0.0, temperature=1.0)
    base.update(kw)
    return config(tmp_path, cls, **base)


def vgs_grpo(setup, args, model=None, cls=VGSGRPOTrainer):
    proc, student, teacher, ds, _ = setup
    return cls(model=copy.deepcopy(student) if model is None else model, reward_funcs=reward, teacher_model=teacher,
               args=args, train_dataset=ds, processing_class=proc)


def test_alpha_0_equals_trl_grpo(setup, tmp_path):
    """alpha = 0: TRL's GRPO step (beta = 0) unchanged, parameters equal after 3 steps of 2 micro-batches."""
    proc, student, teacher, ds, _ = setup
    ours = vgs_grpo(setup, grpo_config(tmp_path / "ours", setup, alpha=0.0, steering_policy="vgs"))
    ours.train()
    plain = trl.GRPOTrainer(model=copy.deepcopy(student), reward_funcs=reward, train_dataset=ds, processing_class=proc,
                            args=grpo_config(tmp_path / "trl", setup, cls=trl.GRPOConfig))
    plain.train()
    logs = [[(h["loss"], h["grad_norm"], h["reward"]) for h in t.state.log_history if "loss" in h] for t in (ours, plain)]
    assert len(logs[0]) == 3 and any(h[1] > 0 for h in logs[1]), "GRPO had no signal: the test would be empty"
    for a, b in zip(*logs):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    for (name, p), q in zip(ours.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not all(torch.equal(p, q) for p, q in zip(ours.model.parameters(), student.parameters()))


def test_alpha_1_standard_equals_distillation_sum(setup, tmp_path):
    """distill='standard', alpha = 1 is VGSDistillationTrainer(steering_policy='sum', gamma = lam = 0) (ours: the
    "opd" row of the method table; theirs: the "vgs" row with the Vis and LP weights at 0). One prompt
    repeated (GRPO and Distillation sample their datasets in different orders), greedy rollouts."""
    proc, student, teacher, ds, gen = setup
    one = ds.select([0] * 8)
    greedy = {**gen, "do_sample": False}
    ours = VGSGRPOTrainer(model=copy.deepcopy(student), reward_funcs=reward, teacher_model=teacher, train_dataset=one,
                          processing_class=proc, args=grpo_config(tmp_path / "g", setup, alpha=1.0, distill="standard",
                                                                   generation_kwargs=greedy))
    ours.train()
    ref = VGSDistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, train_dataset=one,
                                 processing_class=proc, args=config(tmp_path / "d", VGSDistillationConfig,
                                                                    steering_policy="sum", gamma=0.0, lam=0.0,
                                                                    generation_kwargs=greedy, temperature=1.0))
    ref.train()
    a = [(h["loss"], h["grad_norm"]) for h in ours.state.log_history if "loss" in h]
    b = [(h["loss"], h["grad_norm"]) for h in ref.state.log_history if "loss" in h]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5)
    for (name, p), q in zip(ours.model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def grpo_grad(model, inputs):
    """∇ of TRL's "dapo" loss with one update per rollout batch (ratio 1): −Σ_t A ∇log π(τ_t) / N."""
    params = [p for p in model.parameters() if p.requires_grad]
    K = inputs["completion_ids"].size(1)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    vis_in = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
    logits = model(input_ids=ids, attention_mask=attn, **vis_in).logits[:, -K - 1:-1]
    logp = logits.log_softmax(-1).gather(-1, inputs["completion_ids"][..., None])[..., 0]
    loss = -(inputs["advantages"][:, None] * logp * inputs["completion_mask"]).sum() / inputs["num_items_in_batch"]
    g = torch.autograd.grad(loss, params, allow_unused=True)
    return flat([torch.zeros_like(p) if x is None else x for x, p in zip(g, params)])


@pytest.mark.parametrize("distill", ["vgs", "standard"])
def test_update_matches_independent_computation(setup, tmp_path, distill):
    """alpha = 0.3, exact eta, clipping at 0.1: the .grad stepped on = clip((1 − α) g_GRPO + α η (g_std + γ g_vis +
    λ g_lp)) from torch.autograd.grad on the recorded micro-batches (the standard baseline: α g_std, η = 1)."""
    proc, student, teacher, ds, _ = setup
    alpha, max_norm = 0.3, 0.1
    tr = vgs_grpo(setup, grpo_config(tmp_path, setup, alpha=alpha, distill=distill, gamma=GAMMA, lam=LAM,
                                     max_grad_norm=max_norm), cls=recording(VGSGRPOTrainer))
    tr.train()
    drop, pad = set(VisionTokens.from_model(teacher, proc).ids().tolist()), proc.tokenizer.pad_token_id
    norms = [h["grad_norm"] for h in tr.state.log_history if "grad_norm" in h]
    assert len(tr.grads) == 3 and all(len(m) == 2 for m in tr.micro)
    for snapshot, micro, got, logged in zip(tr.before, tr.micro, tr.grads, norms):
        model = copy.deepcopy(student)  # a deepcopy of the trained model keeps forward hooks bound to the original
        model.load_state_dict(snapshot.state_dict())
        g_rl = sum(grpo_grad(model, m) for m in micro)
        g_std, g_vis, g_lp = (sum(x) for x in zip(*[component_grads(model, teacher, m, drop, pad) for m in micro]))
        if distill == "vgs":
            eta = g_std.norm() / (g_std + GAMMA * g_vis).norm()
            want = (1 - alpha) * g_rl + alpha * eta * (g_std + GAMMA * g_vis + LAM * g_lp)
        else:
            want = (1 - alpha) * g_rl + alpha * g_std
        assert logged == pytest.approx(float(want.norm()), rel=1e-4)
        want = want * min(1.0, max_norm / (float(want.norm()) + 1e-6))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.norm()) / want.numel() ** 0.5)
    assert float(g_rl.norm()) > 0 and any(n > max_norm for n in norms)
    last = [h for h in tr.state.log_history if "loss" in h][-1]
    keys = ("vgs/eta", "vgs/std", "vgs/vds", "vgs/norm_grpo", "vgs/cos_grpo_std") if distill == "vgs" else ()
    for key in ("reward", "grad_norm", "entropy") + keys:
        assert key in last and np.isfinite(last[key]), key
    assert (tr.steer is None) == (distill == "standard")


def test_resume_continues_bit_identically(setup, tmp_path):
    """auto (every=3), AdamW, sampled rollouts: model, optimizer, hook state (step count, EMA, weights,
    the fixed component) and RNG restored mid-run; the resumed step equals the uninterrupted one bit for bit."""
    kw = dict(steering_policy="auto", eta_every=3, optim="adamw_torch", learning_rate=1e-3, save_strategy="steps",
              save_steps=2)
    full = vgs_grpo(setup, grpo_config(tmp_path / "full", setup, **kw))
    full.train()
    resumed = vgs_grpo(setup, grpo_config(tmp_path / "resumed", setup, **kw))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.steer.step_count == full.steer.step_count == 3
    assert torch.equal(resumed.steer.eta_ema, full.steer.eta_ema)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    last = [{k: v for k, v in t.state.log_history[-2].items() if k != "step_time" and "time" not in k}
            for t in (full, resumed)]
    assert last[0] == last[1] and last[0]["vgs/exact"] == 0


def test_bad_input_raises(setup, tmp_path):
    proc, student, teacher, ds, _ = setup
    with pytest.raises(ValueError, match="beta"):
        grpo_config(tmp_path, setup, beta=0.04)
    for bad, match in ((dict(alpha=1.5), "alpha"), (dict(distill="kd"), "distill"),
                       (dict(steering_policy="nope"), "steering_policy"), (dict(steering_policy="fixed"), "eta"),
                       (dict(distill="standard", steering_policy="auto"), "distill='standard'")):
        with pytest.raises(ValueError, match=match):
            grpo_config(tmp_path, setup, **bad)
    args = grpo_config(tmp_path, setup)
    with pytest.raises(ValueError, match="reward_funcs"):
        VGSGRPOTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=ds,
                       processing_class=proc)
    smaller = tiny_processor("qwen2_vl", task.WORDS[:-3])  # another tokenizer: its head misses ids
    with pytest.raises(ValueError, match="teacher_model's [0-9]+, but the processor's tokenizer has"):
        vgs_grpo(setup, args, model=None, cls=lambda **k: VGSGRPOTrainer(**{**k, "teacher_model": tiny_vlm(
            "qwen2_vl", smaller)}))
    with pytest.raises(TypeError, match="teacher_model"):
        VGSGRPOTrainer(model=copy.deepcopy(student), reward_funcs=reward, args=args, train_dataset=ds,
                       processing_class=proc)
    with pytest.raises(TypeError, match="VGSGRPOConfig"):
        VGSGRPOTrainer(model=copy.deepcopy(student), reward_funcs=reward, teacher_model=teacher,
                       args=grpo_config(tmp_path, setup, cls=trl.GRPOConfig), train_dataset=ds, processing_class=proc)
