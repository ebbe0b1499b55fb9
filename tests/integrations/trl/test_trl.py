"""VGSDistillationTrainer against an independent computation and against trl.DistillationTrainer.

Tiny Qwen2-VL student / teacher built from configs, greedy generation (rollouts depend only on the
parameters, so runs are comparable step by step), fp32 on CPU.
"""
import copy
import logging
import os
import sys

import numpy as np
import pytest
import torch
import transformers.trainer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import vgs_kernels as vgs  # noqa: E402
from vgs_kernels.integrations.trl import VGSDistillationConfig, VGSDistillationTrainer  # noqa: E402
from vgs_kernels.testing import tiny_processor, tiny_vlm  # noqa: E402
from vgs_kernels.vlm import VisionTokens  # noqa: E402

from helpers.trl import (applies_config_transform, component_grads, config, flat, recording, task,  # noqa: E402
                         text_only, tiny_qwen)
from helpers.va_opd import reference  # noqa: E402

GAMMA, LAM = 2.0, 0.01


@pytest.fixture(scope="module")
def setup():
    return tiny_qwen()


def expected_update(rec, teacher, proc, policy, eta=None, max_norm=None):
    """The steered (and clipped) gradient of each step, from torch.autograd.grad + the policy formula."""
    drop = set(VisionTokens.from_model(teacher, proc).ids().tolist())
    pad = proc.tokenizer.pad_token_id
    out, eta_ema = [], None
    for step, (model, micro) in enumerate(zip(rec.before, rec.micro)):
        g_std, g_vis, g_lp = (sum(x) for x in zip(*[component_grads(model, teacher, m, drop, pad) for m in micro]))
        exact = (g_std.norm() / (g_std + GAMMA * g_vis).norm())
        if policy == "vgs":
            e = exact
        elif policy == "sum":
            e = 1.0
        elif policy == "fixed":
            e = eta
        else:  # auto, measured at step 0, EMA used in between (every=16)
            eta_ema = exact if eta_ema is None else eta_ema
            e = exact if step == 0 else eta_ema
        g = e * (g_std + GAMMA * g_vis + LAM * g_lp)
        norm = g.norm()
        if max_norm is not None:
            g = g * min(1.0, max_norm / (float(norm) + 1e-6))
        out.append((g, float(norm), g_std))
    return out


@pytest.mark.parametrize("policy", ["vgs", "auto", "fixed", "sum", "pcgrad"])
def test_update_matches_independent_computation(setup, tmp_path, policy):
    """3 optimizer steps, gradient accumulation 2: the .grad the optimizer steps on (after Trainer's
    clipping) and the logged grad_norm equal the policy applied to torch.autograd.grad gradients."""
    proc, student, teacher, ds = setup
    max_norm = 0.1
    kw = dict(steering_policy=policy, gamma=GAMMA, lam=LAM, max_grad_norm=max_norm)
    if policy == "fixed":
        kw["eta"] = 0.41
    trainer = recording(VGSDistillationTrainer)(model=copy.deepcopy(student), teacher_model=teacher,
                                                args=config(tmp_path, **kw), train_dataset=ds, processing_class=proc)
    trainer.train()
    assert len(trainer.grads) == 3 and all(len(m) == 2 for m in trainer.micro)
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    if policy == "pcgrad":  # random projection order: check the Gram and the combination the hook used
        drop, pad = set(VisionTokens.from_model(teacher, proc).ids().tolist()), proc.tokenizer.pad_token_id
        for model, micro, got, stats, logged in zip(trainer.before, trainer.micro, trainer.grads, trainer.stats, norms):
            comps = torch.stack([sum(x) for x in zip(*[component_grads(model, teacher, m, drop, pad) for m in micro])])
            torch.testing.assert_close(stats["gram"], comps @ comps.T, rtol=1e-4, atol=1e-9)
            want = stats["coeffs"] @ comps
            assert logged == pytest.approx(float(want.norm()), rel=1e-4)
            want = want * min(1.0, max_norm / (float(want.norm()) + 1e-6))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.norm()) / want.numel() ** 0.5)
        return
    descent = [h.get("vgs/std_descent") for h in trainer.state.log_history if "loss" in h]
    for (want, want_norm, g_std), got, logged, cos in zip(
            expected_update(trainer, teacher, proc, policy, kw.get("eta"), max_norm), trainer.grads, norms, descent):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.norm()) / want.numel() ** 0.5)
        assert logged == pytest.approx(want_norm, rel=1e-4)
        if cos is not None:  # the health signal: cos(steered update, grad Std), clipping does not change it
            assert cos == pytest.approx(float(want @ g_std / (want.norm() * g_std.norm())), rel=1e-3, abs=1e-5)
    assert any(n > max_norm for n in norms), "clipping never engaged: the test would not see a wrong order"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    exact = {"vgs", "sum"}  # policies that measure the Gram on every step
    for step, h in enumerate(logs):  # TRL's metrics and ours, through Trainer's logging
        keys = ["vgs/eta", "vgs/std", "vgs/vis", "vgs/lang", "vgs/vds", "vgs/fallback", "grad_norm", "num_tokens",
                "completions/mean_length"]
        if policy in exact or (policy == "auto" and step == 0):
            keys += ["vgs/cos_std_vis", "vgs/cos_std_lp", "vgs/norm_std", "vgs/norm_vis", "vgs/norm_lp",
                     "vgs/std_descent"]
        for key in keys:
            assert key in h and h[key] is not None and np.isfinite(h[key]), key
        assert h["vgs/fallback"] == 0 and h["vgs/eta"] == pytest.approx(
            {"fixed": 0.41, "sum": 1.0}.get(policy, h["vgs/eta"]), rel=1e-6)
    if policy == "vgs":  # the hook's SteeringConflictWarning reaches the Trainer's logger
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        transformers.trainer.logger.addHandler(handler)
        try:
            with pytest.warns(vgs.SteeringConflictWarning):
                for step in range(3):
                    trainer.steer.health.measured(100 + step, torch.tensor(-0.25), torch.tensor([1.0, -2.0, 0.1]),
                                                  ("std", "vis", "lp"), ())
        finally:
            transformers.trainer.logger.removeHandler(handler)
        assert len(records) == 1 and "-0.250" in records[0].getMessage() and "'vis' opposes" in records[0].getMessage()


def test_sum_without_vgs_terms_equals_trl(setup, tmp_path):
    """policy 'sum' with gamma = lam = 0 is trl.DistillationTrainer's reverse KL (beta=1), step for step."""
    proc, student, teacher, ds = setup
    suppress = VisionTokens.from_model(student, proc).ids().tolist()  # the same rollouts on both sides
    gen = {"do_sample": False, "suppress_tokens": suppress}
    runs = []
    for cls, cfg_cls, kw in [(VGSDistillationTrainer, VGSDistillationConfig,
                              dict(steering_policy="sum", gamma=0.0, lam=0.0)),
                             (trl.DistillationTrainer, trl.DistillationConfig, dict(beta=1.0))]:
        args = config(tmp_path / cls.__name__, cfg_cls, generation_kwargs=gen, **kw)
        tr = cls(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=ds,
                 processing_class=proc)
        tr.train()
        runs.append((tr.model, [(h["loss"], h["grad_norm"]) for h in tr.state.log_history if "loss" in h]))
    (vgs_model, vgs_log), (trl_model, trl_log) = runs
    for (l1, n1), (l2, n2) in zip(vgs_log, trl_log):
        assert l1 == pytest.approx(l2, rel=1e-5) and n1 == pytest.approx(n2, rel=1e-5)
    for (name, p), q in zip(vgs_model.named_parameters(), trl_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not all(torch.equal(p, q) for p, q in zip(vgs_model.parameters(), student.parameters()))


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
def test_opd_equals_trl(setup, tmp_path, beta):
    """method='opd' is trl.DistillationTrainer(beta) step for step, for the reverse KL, the forward KL and the
    JSD: accumulation, clipping engaged
    (max_grad_norm below the measured norms), a logit_scale and a softcap that the forwards apply (TRL reads
    them from the configs, the trainer measures the forwards), temperature != 1; the loss, grad_norm and
    entropy TRL logs are equal too."""
    proc, student, teacher, ds = setup
    suppress = VisionTokens.from_model(student, proc).ids().tolist()
    gen = {"do_sample": False, "suppress_tokens": suppress}
    clip = 0.02 if beta == 0.5 else 0.05  # below the measured norms (the JSD's are smaller)
    s, t = applies_config_transform(copy.deepcopy(student)), applies_config_transform(copy.deepcopy(teacher))
    s.config.text_config.final_logit_softcapping, t.config.text_config.logit_scale = 3.0, 1.5
    runs = []
    for cls, cfg_cls, kw in [(VGSDistillationTrainer, VGSDistillationConfig, dict(method="opd", beta=beta)),
                             (trl.DistillationTrainer, trl.DistillationConfig, dict(beta=beta))]:
        args = config(tmp_path / cls.__name__, cfg_cls, generation_kwargs=gen, max_grad_norm=clip,
                      temperature=1.3, **kw)
        tr = cls(model=copy.deepcopy(s), teacher_model=t, args=args, train_dataset=ds, processing_class=proc)
        tr.train()
        runs.append((tr, [(h["loss"], h["grad_norm"], h["entropy"]) for h in tr.state.log_history if "loss" in h]))
    (ours, our_log), (ref, ref_log) = runs
    assert ours.steer is None and len(our_log) == 3
    for mine, theirs in zip(our_log, ref_log):
        assert mine == pytest.approx(theirs, rel=1e-5)
        assert mine[1] > clip  # clipping engaged
    for (name, p), q in zip(ours.model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not all(torch.equal(p, q) for p, q in zip(ours.model.parameters(), s.parameters()))
    for method in ("vgs", "va_opd"):  # rows of the reverse KL say why
        with pytest.raises(ValueError, match=f"method='{method}' trains on the reverse KL.*(Eq. 9|definition)"):
            config(tmp_path, method=method, beta=0.5, **({"num_generations": 2} if method == "va_opd" else {}))
    with pytest.raises(ValueError, match="method must be one of"):
        config(tmp_path, method="nope")


def test_va_opd_update_matches_the_definition(setup, tmp_path):
    """method='va_opd' (text-only weak view, 2 rollouts per prompt, sampled): the first step's gradient is
    the gradient of the definition's loss (tests/helpers/va_opd.reference) over the whole generation batch,
    although a prompt's rollouts land in different micro-batches; VA metrics are logged."""
    proc, student, teacher, ds = setup
    args = config(tmp_path, method="va_opd", num_generations=2, va_view="text", max_steps=1, max_grad_norm=1e9,
                  generation_kwargs={"do_sample": True})
    tr = recording(VGSDistillationTrainer)(model=copy.deepcopy(student), teacher_model=teacher, args=args,
                                           train_dataset=ds, processing_class=proc)
    tr.train()
    batch = {k: torch.cat([m[k] for m in tr.micro[0]]) for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                               "completion_mask", "va_group", "mm_token_type_ids")}
    batch["pixel_values"] = torch.cat([m["pixel_values"] for m in tr.micro[0]])
    batch["image_grid_thw"] = torch.cat([m["image_grid_thw"] for m in tr.micro[0]])
    assert sorted(torch.bincount(batch["va_group"]).tolist()) == [2, 2]
    model, K = tr.before[0], batch["completion_ids"].size(1)
    drop = set(VisionTokens.from_model(teacher, proc).ids().tolist())
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    vis_in = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
    tp, tm = text_only(batch["prompt_ids"], batch["prompt_mask"], drop, proc.tokenizer.pad_token_id)
    model.train()
    s = model(input_ids=ids, attention_mask=attn, **vis_in).logits[:, -K - 1:-1]
    with torch.no_grad():
        a = teacher(input_ids=ids, attention_mask=attn, **vis_in).logits[:, -K - 1:-1]
        b = teacher(input_ids=torch.cat([tp, batch["completion_ids"]], 1),
                    attention_mask=torch.cat([tm, batch["completion_mask"]], 1)).logits[:, -K - 1:-1]
    total, _, _ = reference(s, a, b, batch["completion_ids"], batch["completion_mask"].bool(), batch["va_group"])
    params = [p for p in model.parameters() if p.requires_grad]
    want = flat(torch.autograd.grad(total.float(), params))
    torch.testing.assert_close(tr.grads[0], want, rtol=1e-4, atol=1e-6)
    h = tr.state.log_history[0]
    assert h["loss"] == pytest.approx(float(total), rel=1e-4)
    assert 0 <= h["va/positive"] <= 1 and h["va/mean"] >= 0 and "entropy" not in h and tr.steer is None
    with pytest.raises(ValueError, match="num_generations"):
        config(tmp_path, method="va_opd", num_generations=3)
    with pytest.raises(ValueError, match="va_view"):
        config(tmp_path, method="va_opd", va_view="blur")


def test_resume_continues_bit_identically(setup, tmp_path):
    """auto (every=3) with AdamW: hook state (step count, eta EMA), optimizer and model restored mid-epoch;
    the resumed step is a combined one, made with the restored EMA."""
    proc, student, teacher, ds = setup
    kw = dict(steering_policy="auto", eta_every=3, optim="adamw_torch", learning_rate=1e-3, max_steps=3,
              save_strategy="steps", save_steps=2)
    full = VGSDistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher,
                                  args=config(tmp_path / "full", **kw), train_dataset=ds, processing_class=proc)
    full.train()
    resumed = VGSDistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher,
                                     args=config(tmp_path / "resumed", **kw), train_dataset=ds, processing_class=proc)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.steer.step_count == full.steer.step_count == 3
    assert torch.equal(resumed.steer.eta_ema, full.steer.eta_ema)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    full_last, resumed_last = ({k: v for k, v in t.state.log_history[-2].items() if k != "step_time"}
                               for t in (full, resumed))
    assert full_last == resumed_last and full_last["vgs/exact"] == 0  # loss, grad_norm, eta, terms


def test_student_that_samples_vision_tokens(setup, tmp_path):
    """A student whose greedy choice is a vision placeholder: suppressed in generation, the run goes on."""
    proc, student, teacher, ds = setup
    biased = copy.deepcopy(student)
    tokens = VisionTokens.from_model(biased, proc)
    with torch.no_grad():
        head = biased.get_output_embeddings().weight
        for i, t in enumerate(tokens.ids().tolist()):
            head[t] = 50.0 * biased.model.language_model.norm.weight / (i + 1)
    trainer = recording(VGSDistillationTrainer)(model=biased, teacher_model=teacher,
                                                args=config(tmp_path, max_steps=1), train_dataset=ds,
                                                processing_class=proc)
    trainer.train()
    completions = torch.cat([m["completion_ids"][m["completion_mask"].bool()] for m in trainer.micro[0]])
    assert not torch.isin(completions, tokens.ids()).any()
    assert np.isfinite(trainer.state.log_history[0]["loss"])


def test_bad_input_raises_at_construction(setup, tmp_path):
    proc, student, teacher, ds = setup
    with pytest.raises(ValueError, match="eta"):
        config(tmp_path, steering_policy="fixed")
    with pytest.raises(ValueError, match="steering_policy"):
        config(tmp_path, steering_policy="nope")
    args = config(tmp_path)
    with pytest.raises(ValueError, match="train_dataset.*image"):
        VGSDistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args,
                               train_dataset=ds.remove_columns("image"), processing_class=proc)
    smaller = tiny_processor("qwen2_vl", task.WORDS[:-3])  # another tokenizer: its head misses ids
    with pytest.raises(ValueError, match="teacher_model's [0-9]+, but the processor's tokenizer has"):
        VGSDistillationTrainer(model=copy.deepcopy(student), teacher_model=tiny_vlm("qwen2_vl", smaller), args=args,
                               train_dataset=ds, processing_class=proc)
    bigger = tiny_processor("qwen2_vl", task.WORDS + ["extra", "words", "here"])
    with pytest.raises(ValueError, match="processing_class"):
        VGSDistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=ds,
                               processing_class=bigger)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    text_model = Qwen2ForCausalLM(Qwen2Config(vocab_size=student.config.text_config.vocab_size, hidden_size=32,
                                              intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                              num_key_value_heads=1))
    with pytest.raises(ValueError, match="model"):
        VGSDistillationTrainer(model=text_model, teacher_model=teacher, args=args, train_dataset=ds,
                               processing_class=proc)


def test_importing_the_package_does_not_import_trl():
    import subprocess
    code = "import sys, vgs_kernels, vgs_kernels.integrations; assert 'trl' not in sys.modules, 'trl imported'"
    root = os.path.join(os.path.dirname(__file__), "..", "..", "..")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def padded(model, rows):
    """model with its vocabulary grown to `rows` (as Qwen2.5-VL-7B's 152,064 and 3B's 151,936 are past the
    tokenizer's 151,665 ids); the new head rows are large, so that reading one would show."""
    m = copy.deepcopy(model)
    n = m.get_output_embeddings().weight.shape[0]
    m.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        m.get_output_embeddings().weight[n:] = 50.0
    return m


def test_padded_heads_opd_equals_trl_on_the_vocabulary(setup, tmp_path):
    """Heads padded differently beyond the tokenizer (TRL refuses the pair): method='opd' on them is
    trl.DistillationTrainer on the unpadded models, step for step (the padded rows are never read and never
    sampled), with the forward KL; every other method trains on them too."""
    proc, student, teacher, ds = setup
    n = len(proc.tokenizer)
    assert student.get_output_embeddings().weight.shape[0] == n
    gen = {"do_sample": False, "suppress_tokens": VisionTokens.from_model(student, proc).ids().tolist()}
    s_pad, t_pad = padded(student, n + 5), padded(teacher, n + 13)
    runs = []
    for cls, cfg_cls, s, t, kw in [(VGSDistillationTrainer, VGSDistillationConfig, s_pad, t_pad, dict(method="opd")),
                                   (trl.DistillationTrainer, trl.DistillationConfig, student, teacher, {})]:
        args = config(tmp_path / cls.__name__, cfg_cls, generation_kwargs=gen, max_steps=2, beta=0.0, **kw)
        tr = cls(model=copy.deepcopy(s), teacher_model=t, args=args, train_dataset=ds, processing_class=proc)
        tr.train()
        runs.append((tr, [(h["loss"], h["grad_norm"]) for h in tr.state.log_history if "loss" in h]))
    (ours, our_log), (ref, ref_log) = runs
    assert set(range(n, n + 5)) <= set(ours.generation_kwargs["suppress_tokens"])
    for mine, theirs in zip(our_log, ref_log):
        assert mine == pytest.approx(theirs, rel=1e-5)
    for (name, p), q in zip(ours.model.named_parameters(), ref.model.parameters()):
        if p.shape != q.shape:  # the padded embedding / head: the first n rows as TRL's, the rest untouched
            assert torch.equal(p[n:], s_pad.get_parameter(name)[n:]), name
            p = p[:n]
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for method in ("vgs", "va_opd"):
        args = config(tmp_path / method, method=method, max_steps=1, generation_kwargs=gen,
                      **({"num_generations": 2} if method == "va_opd" else {}))
        tr = VGSDistillationTrainer(model=copy.deepcopy(s_pad), teacher_model=t_pad, args=args, train_dataset=ds,
                                    processing_class=proc)
        tr.train()
        assert np.isfinite(tr.state.log_history[0]["loss"]) and tr.state.log_history[0]["loss"] < 10, method
        assert torch.equal(tr.model.get_output_embeddings().weight[n:], s_pad.get_output_embeddings().weight[n:])


def test_heads_smaller_than_the_vocabulary_raise(setup, tmp_path):
    proc, student, teacher, ds = setup
    n = len(proc.tokenizer)
    with pytest.raises(ValueError, match=f"model's LM head has {n} rows and teacher_model's {n - 3}.*{n} ids"):
        VGSDistillationTrainer(model=student, teacher_model=padded(teacher, n - 3), args=config(tmp_path),
                               train_dataset=ds, processing_class=proc)
