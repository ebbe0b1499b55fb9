"""DeepSpeed ZeRO stages 1, 2 and 3 (issue 24): the steered update equals one process steering the
concatenated batch, with gradient accumulation 2 and gradient_clipping engaged, for every policy;
engine.save_checkpoint / load_checkpoint resume is bit-identical, hook state included.

Issue 28: ZeRO-3 once read last step's steered gradient as this step's first component for a parameter
that component does not reach ("routed_*": an expert only the text-only pass uses, with Vis flowing
into it, and a frozen layer; both component orders); ZeRO-1/2 at GA=1 kept only the last of two
steer.backward calls before engine.step() on combined steps ("twice_*"): every backward adds up.

Two gloo processes on CPU run every scenario in one spawn (importing torch, transformers and
DeepSpeed is most of the time); each writes what it got to a file, compared here with a single
process on the concatenated batch (no DeepSpeed: torch SGD, steer.clip_grad_norm_).
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
from torch import nn

import vgs_kernels as vgs

from helpers.spawn import assert_params_close, no_errors, one_thread, spawn_ranks
from helpers.student import PER_RANK, POLICY_KW, STEPS, VOCAB, WORLD, Student, batch, losses, rank_rows

deepspeed = pytest.importorskip("deepspeed")

GAS = 2            # gradient_accumulation_steps (micro-batches per optimizer step in every scenario)
CLIP = 0.05        # below every step's gradient norm here: clipping is engaged (checked)
LR = 0.5
STAGES = (1, 2, 3)
ORDERS = {"std-vis": ("std", "vis"), "vis-std": ("vis", "std")}
SCENARIOS = ([f"z{stage}_{policy}" for stage in STAGES for policy in POLICY_KW] + ["z2_bf16"]
             + [f"twice_z{stage}_{policy}" for stage in STAGES for policy in POLICY_KW]
             + [f"routed_z{stage}_{order}" for stage in STAGES for order in ORDERS])
TIMEOUT = datetime.timedelta(seconds=60)
DEADLINE = 300
ATOL, RTOL = 2e-5, 1e-4


class Routed(nn.Module):
    """The student, an expert only the text-only pass is routed to (no gradient from Std, one from Vis
    with the prior not detached) and a frozen layer (no gradient at all)."""

    def __init__(self, seed):
        super().__init__()
        self.student = Student(seed=seed)
        self.text_expert = nn.Linear(VOCAB, VOCAB, bias=False)
        self.student.lm.model.layers[0].mlp.requires_grad_(False)

    def forward(self, ids, extra=None, text=False):
        s = self.student(ids)
        return s + self.text_expert(s) if text else s


def routed_losses(model, data, order, scale=1.0):
    """Std from a graph without the text-only pass, Vis into both passes, in ``order``."""
    ids, ids_text, a, b, mask, _ = data
    s, u = model(ids), model(ids_text, text=True)
    loss_fn = vgs.VGSLoss(gamma=2.0, detach_prior=False)
    out = {"std": loss_fn(s, u.detach(), a, b, mask).std, "vis": loss_fn(s, u, a, b, mask).vis}
    return {n: out[n] * scale for n in ORDERS[order]}


def parse(name):
    """(kind, stage, policy, backward calls per engine.step(), DeepSpeed's gradient_accumulation_steps)."""
    kind = name.split("_")[0] if name.startswith(("twice", "routed")) else "plain"
    rest = name if kind == "plain" else name.split("_", 1)[1]
    stage, policy = int(rest[1]), rest.split("_", 1)[1]
    policy = "vgs" if kind == "routed" or policy == "bf16" else policy
    return kind, stage, policy, (GAS if kind == "twice" else 1), (1 if kind == "twice" else GAS)


def make_model(name):
    seed = SCENARIOS.index(name) if name in SCENARIOS else 0
    return Routed(seed) if name.startswith("routed") else Student(seed=seed)


def micro_losses(name, model, data, scale=1.0):
    if name.startswith("routed"):
        return routed_losses(model, data, name.split("_")[-1], scale)
    return {n: v * scale for n, v in losses(model, vgs.VGSLoss(gamma=2.0), data).items()}


def config(stage, bf16=False, gas=GAS):
    return {"train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": gas,
            "gradient_clipping": CLIP, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}


def engine_for(name, stage, bf16=False, gas=GAS):
    model = make_model(name)
    if bf16:
        model = model.to(torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=LR),
                                                   config=config(stage, bf16, gas))
    return engine, optimizer


def full_params(engine):
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().float().clone() for n, p in params}


def ds_train(engine, steer, name, rank, steps=range(STEPS), per_step=1):
    """The issue's call shape: steer.backward per micro-batch, engine.step() after every ``per_step``
    of them (GAS micro-batches per optimizer step)."""
    seed = SCENARIOS.index(name) if name in SCENARIOS else 99
    rows = rank_rows(rank)
    grams, norms = [], []
    for step in steps:
        for m in range(GAS):
            data = batch(seed, step, m, rows)
            if engine.bfloat16_enabled():
                data = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in data)
            steer.backward(micro_losses(name, engine, data))
            if (m + 1) % per_step == 0:
                engine.step()
        grams.append(steer.stats["gram"].clone() if steer.stats["mode"] == "exact" else None)
        norms.append(float(engine.get_global_grad_norm()))
    return grams, norms


def run_scenario(name, rank):
    _, stage, policy, per_step, gas = parse(name)
    engine, optimizer = engine_for(name, stage, name.endswith("bf16"), gas)
    steer = vgs.GradientSteering(optimizer, policy=policy, gamma=2.0, model=engine, **POLICY_KW[policy])
    grams, norms = ds_train(engine, steer, name, rank, per_step=per_step)
    return {"params": full_params(engine), "grams": grams, "norms": norms}


def resume(rank, path):
    """2 steps, save_checkpoint, 2 more (A); a fresh engine and hook load the checkpoint and run the
    same 2 steps (B). Policy auto (every=2) so the hook's EMA and step count matter."""
    out = {}
    for stage in (2, 3):
        engine, optimizer = engine_for("resume", stage)
        steer = vgs.GradientSteering(optimizer, policy="auto", every=2, model=engine)
        ds_train(engine, steer, "resume", rank, range(2))
        engine.save_checkpoint(os.path.join(path, f"ckpt{stage}"), tag="t")
        ds_train(engine, steer, "resume", rank, range(2, 4))
        a = full_params(engine), steer.step_count, float(steer.eta_ema)
        engine, optimizer = engine_for("resume", stage)
        torch.manual_seed(123)  # a different init: the checkpoint must restore everything
        steer = vgs.GradientSteering(optimizer, policy="auto", every=2, model=engine)
        engine.load_checkpoint(os.path.join(path, f"ckpt{stage}"), tag="t")
        loaded = steer.step_count, float(steer.eta_ema)
        ds_train(engine, steer, "resume", rank, range(2, 4))
        out[stage] = {"a": a, "b": (full_params(engine), steer.step_count, float(steer.eta_ema)), "loaded": loaded}
    return out


def misuse(rank):
    out = {}
    engine, optimizer = engine_for("misuse", 2)
    for case, kw in {"module": {"model": engine.module}, "none": {}}.items():
        try:
            vgs.GradientSteering(optimizer, **kw).remove()
            out[case] = "no error"
        except TypeError as e:
            out[case] = str(e)
    # a plain engine.backward, not through the hook: refused at the step
    steer = vgs.GradientSteering(optimizer, model=engine)
    ids, *_ = batch(5, 0, 0, rank_rows(rank))
    for _ in range(GAS):
        engine.backward(engine(ids).square().mean())
        try:
            engine.step()
            out.setdefault("plain", "no error")
        except RuntimeError as e:
            out["plain"] = str(e)
    return out


def tasks(rank, path):
    """What every rank runs (helpers.spawn): every scenario, then resume and misuse."""
    deepspeed.init_distributed(dist_backend="gloo", timeout=TIMEOUT)
    return [(n, lambda n=n: run_scenario(n, rank)) for n in SCENARIOS] + [
        ("resume", lambda: resume(rank, path)), ("misuse", lambda: misuse(rank))]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(tasks, tmp_path_factory.mktemp("ds"), world=WORLD, deadline=DEADLINE,
                       what="the DeepSpeed workers")


def reference(name):
    """One process, no DeepSpeed: the concatenated batch, GAS micro-batches (each divided by DeepSpeed's
    gradient_accumulation_steps, as engine.backward does), clipped at CLIP."""
    _, _, policy, _, gas = parse(name)
    seed = SCENARIOS.index(name)
    model = make_model(name)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    steer = vgs.GradientSteering(optimizer, policy=policy, gamma=2.0, **POLICY_KW[policy])
    grams, norms = [], []
    for step in range(STEPS):
        for m in range(GAS):
            steer.backward(micro_losses(name, model, batch(seed, step, m, slice(None)), 1 / gas))
        norms.append(float(steer.clip_grad_norm_(CLIP)))
        optimizer.step()
        optimizer.zero_grad()
        grams.append(steer.stats["gram"].clone() if steer.stats["mode"] == "exact" else None)
    return {n: p.detach() for n, p in model.named_parameters()}, grams, norms


@pytest.mark.parametrize("name", [n for n in SCENARIOS if "bf16" not in n])
def test_same_update_as_one_process(ranks, name):
    got = no_errors(ranks, name)
    with one_thread():
        want, want_grams, want_norms = reference(name)
    assert min(want_norms) > 2 * CLIP  # clipping engaged on every step
    for r, res in enumerate(got):
        assert_params_close(res["params"], want, atol=ATOL, rtol=RTOL, rank=r)
        # DeepSpeed's norm (what it clipped) is the norm of the steered gradient
        torch.testing.assert_close(torch.tensor(res["norms"]), torch.tensor(want_norms), atol=1e-6, rtol=1e-4)
        for step, (g, w) in enumerate(zip(res["grams"], want_grams)):
            assert (g is None) == (w is None), step
            if w is not None:
                torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_bf16(ranks):
    """bf16 (fp32 master weights in DeepSpeed): the same update as fp32 within bf16's precision."""
    no_errors(ranks, "z2_bf16")
    want, want_grams, _ = reference("z2_bf16")
    res = ranks[0]["z2_bf16"]
    moved = max((want[n] - make_model("z2_bf16").state_dict()[n]).abs().max() for n in want)
    err = max((res["params"][n] - want[n]).abs().max() for n in want)
    assert err < 0.1 * moved, (err, moved)
    torch.testing.assert_close(res["grams"][0], want_grams[0], atol=1e-4, rtol=5e-2)


def test_resume_bit_identical(ranks):
    for r in range(WORLD):
        res = ranks[r]["resume"]
        assert "error" not in res, res["error"]
        for stage in (2, 3):
            (pa, na, ea), (pb, nb, eb) = res[stage]["a"], res[stage]["b"]
            assert res[stage]["loaded"][0] == 2, res[stage]["loaded"]  # the hook's step count came back
            assert (na, ea) == (nb, eb)
            for n in pa:
                assert torch.equal(pa[n], pb[n]), (stage, n)


def test_misuse_raises(ranks):
    for r in range(WORLD):
        res = ranks[r]["misuse"]
        assert "error" not in res, res["error"]
        for case in ("module", "none"):
            assert "model= the DeepSpeed engine" in res[case], res[case]
        assert "plain engine.backward()" in res["plain"], res["plain"]


class _Cfg:
    def __init__(self, device="none"):
        self.device = device  # DeepSpeed's offload config keeps the device enum's value, a str


class FakeEngine:
    """The configuration queries _zero_unsupported reads, settable one at a time."""

    def __init__(self, **kw):
        self.kw = kw
        self.pipeline_parallelism = kw.get("pipe", False)
        self.has_moe_layers = False

    def zero_optimization_stage(self):
        return self.kw.get("stage", 2)

    def zero_quantized_gradients(self):
        return self.kw.get("qgz", False)

    def zero_offload_optimizer(self):
        return _Cfg(self.kw.get("offload", "none"))

    def zero_offload_param(self):
        return _Cfg("none")

    def fp16_enabled(self):
        return self.kw.get("fp16", False)

    def managed_gradient_accumulation(self):
        return True


@pytest.mark.parametrize("kw, setting", [({"qgz": True}, "zero_quantized_gradients"),
                                         ({"offload": "cpu"}, "offload_optimizer"),
                                         ({"pipe": True}, "pipeline parallelism"),
                                         ({"stage": 0}, "zero_optimization.stage=0"),
                                         ({"fp16": True}, "fp16")])
def test_unsupported_settings_are_named(kw, setting):
    from vgs_kernels.distributed.zero import _zero_unsupported
    assert _zero_unsupported(FakeEngine()) is None
    assert setting in _zero_unsupported(FakeEngine(**kw))
