"""On-policy distillation of a tiny Qwen2-VL on CPU: monolithic OPD vs Visual Gradient Steering.

The task (python/synthetic_task.py) asks for the colour, the kind or the number of shapes drawn into a
32x32 image, so the answer needs the image. A teacher VLM is trained on it with the images (then given
a text-only prior and calibrated). The student, a smaller LM on the teacher's vision encoder, starts
from one of two regimes (``--regime``, see ``build``):

    blind     trained with shuffled images and text-only: it knows the answer format and the language
              prior, not how to use what it sees (start = chance)
    grounded  the blind student, then trained with the real images until it answers about half of the
              held-out questions (``--student-target``): it already looks, as the paper's students do
    aligned   the paper's preconditions (issue 21): a text prior distilled from the teacher's (start
              Lang small), the vision encoder trained at the LM's learning rate, grounded with the real
              images until ``--aligned-target``, and answers behind a low-VDS preamble (its own teacher)

From the same student, the same prompts and the same sampling seeds, each method (``METHODS``) distils:

    opd           monolithic on-policy distillation: KL(student ‖ teacher), both with the image
    va-opd        VA-OPD (arXiv 2605.21924, vgs.VAOPDLoss): rollouts weighted by the teacher's visual
                  advantage over a degraded image, top-20% tokens by VA weighted λ = 0.5 (2 rollouts a prompt)
    vgs-fixed     VGS loss η·[Std + γ·Vis + λ·LP] with a hand-fixed η (the paper's practice), one backward
    vgs-auto      VGS through vgs.GradientSteering(policy="auto"): exact η refreshed every few steps
    vgs-exact     VGS through vgs.GradientSteering(policy="vgs"): exact η every step (two backwards)
    vgs-project   GradientSteering(policy="project"): PCGrad-style, g_std loses its part along g_vis
                  when they conflict, then exact η
    vgs-adaptive  vgs-fixed with the per-token γ_t of App. E
    vgs-lam0.1    vgs-fixed with λ = 0.1 (a stronger language-prior anchor)
    vgs-lam1      vgs-fixed with λ = 1
    vgs-pcgrad    GradientSteering(policy="pcgrad"): PCGrad (TorchJD's) of the three weighted terms
    vgs-attach    vgs-exact with the prior attached (Vis's gradient also reaches the text-only pass)
    lang-steer    the paper's language-steering ablation (Sec. 7, Eq. 19-21): η_Lang·[Std + γ·Lang + λ·VP],
                  exact η_Lang through GradientSteering(policy="vgs")
    grpo          GRPO alone (no teacher): the clipped surrogate on a correctness reward (1 for the exact
                  answer), ``--group`` rollouts per prompt, no KL penalty
    grpo+opd      Eq. 22 with standard distillation: (1 − α)·GRPO + α·KL(p ‖ qa), α = ``--alpha``
    grpo+vgs      Eq. 22: (1 − α)·GRPO + α·η·(Std + γ·Vis + λ·LP), exact η on the distillation part only
                  (the GRPO gradient is a fixed-coefficient component of the hook)

Responses are sampled from the current student at every step (on-policy). Reported: greedy accuracy
with the image and with a blank image (how much the student looks), the four loss terms and η over
training, wall time per step, and the gradient-geometry probe (angles between ∇Lang, ∇Vis, ∇Std per VDS
decile) at the start and the end of every run. Every run is written to ``--out`` as soon as it ends
(``runs/<regime>-s<seed>-<method>.json``); ``--resume`` skips runs already there, ``--report`` only
aggregates what is there (tables on stdout, plots in ``--out``).

    python python/distill_demo.py                   # defaults: < 10 min on 2 CPU cores, one seed
    python python/distill_demo.py --regime blind grounded --methods all --seeds 0 1 2 --resume  # the grid
    python python/distill_demo.py --quick           # a smoke run of a minute or less
"""
from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import inspect
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# This checkout's vgs_kernels, not whichever copy is installed (an editable install may point elsewhere).
sys.path[:0] = [HERE, ROOT]
import synthetic_task as task  # noqa: E402

import vgs_kernels as vgs  # noqa: E402
import vgs_kernels.testing.families as tiny  # noqa: E402  (the tiny VLMs: tiny_processor, tiny_vlm)
from vgs_kernels.losses.grpo_vgs import group_advantages, grpo_surrogate, grpo_vgs_loss  # noqa: E402
from vgs_kernels.losses.va_opd import degrade_image  # noqa: E402

# How each method takes its step. policy: a GradientSteering policy (None: no hook); fixed: η = --eta
# multiplies the VGS loss; lam: λ (None: --lam); adaptive: App. E's per-token γ_t; va: VA-OPD
# (vgs.VAOPDLoss, the degraded-image teacher pass, 2 rollouts per prompt of half the batch's prompts).
METHODS = {
    "opd": dict(monolithic=True),
    "va-opd": dict(monolithic=True, va=True),
    "vgs-fixed": dict(fixed=True),
    "vgs-auto": dict(policy="auto"),
    "vgs-exact": dict(policy="vgs"),
    "vgs-project": dict(policy="project"),
    "vgs-adaptive": dict(fixed=True, adaptive=True),
    "vgs-lam0.1": dict(fixed=True, lam=0.1),
    "vgs-lam1": dict(fixed=True, lam=1.0),
    "vgs-pcgrad": dict(policy="pcgrad"),
    "vgs-attach": dict(policy="vgs", attach_prior=True),
    "lang-steer": dict(policy="vgs", steer="language"),
    "grpo": dict(grpo=True, alpha=0.0),
    "grpo+opd": dict(grpo=True, monolithic=True),
    "grpo+vgs": dict(grpo=True, policy="vgs"),
}
DEFAULT_METHODS = ("opd", "vgs-fixed", "vgs-auto", "vgs-exact")
REGIMES = ("blind", "grounded", "aligned")
# The task variant of each regime (synthetic_task.sample's keywords); the aligned regime has its own teacher.
REGIME_TASK = {"blind": {}, "grounded": {}, "aligned": {"preamble": True}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    p.add_argument("--regime", nargs="+", default=["grounded"], choices=REGIMES,
                   help="the student's starting point(s): blind (chance), grounded (~--student-target) or "
                   "aligned (the paper's preconditions, ~--aligned-target)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=[*METHODS, "all"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=300, help="distillation steps per method and seed")
    p.add_argument("--batch", type=int, default=32, help="prompts per distillation step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--gamma", type=float, default=2.0)
    p.add_argument("--lam", type=float, default=0.01)
    p.add_argument("--eta", type=float, default=0.41, help="fixed η of the vgs-fixed family (the paper's at γ=2)")
    p.add_argument("--attach-prior", action="store_true",
                   help="let Vis's gradient reach the text-only pass u too (default: the prior is detached)")
    p.add_argument("--auto-every", type=int, default=10, help="vgs-auto: steps between exact η refreshes")
    p.add_argument("--max-new-tokens", type=int, default=7)
    p.add_argument("--group", type=int, default=4, help="grpo*: rollouts per prompt (--batch of them per step)")
    p.add_argument("--alpha", type=float, default=0.3, help="grpo+*: weight of the distillation loss (Eq. 22)")
    p.add_argument("--teacher-steps", type=int, default=2500, help="at most; stops at --teacher-target")
    p.add_argument("--teacher-target", type=float, default=0.95, help="teacher's held-out accuracy to reach")
    p.add_argument("--teacher-seed", type=int, default=0,
                   help="the one teacher every seed distils from (-1: a teacher per seed)")
    p.add_argument("--calibrate-steps", type=int, default=300, help="teacher's calibration phase")
    p.add_argument("--student-steps", type=int, default=300, help="the blind student's pre-training")
    p.add_argument("--ground-steps", type=int, default=1500, help="grounded regime: at most this many more "
                   "steps with the real images, stopping at --student-target")
    p.add_argument("--student-target", type=float, default=0.5, help="grounded regime: held-out accuracy to reach")
    p.add_argument("--aligned-target", type=float, default=0.55, help="aligned regime: held-out accuracy to reach")
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--eval-size", type=int, default=192)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--probe-size", type=int, default=64, help="prompts in the probe's batch (0: no probe)")
    p.add_argument("--probe-bins", type=int, default=10, help="VDS bins of the probe (10: deciles)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "demo"), help="runs (JSON), tables and plots")
    p.add_argument("--cache", default=os.path.join(ROOT, "results", "demo_cache"),
                   help="pre-trained teacher/student weights ('' to disable)")
    p.add_argument("--resume", action="store_true", help="skip runs whose JSON is already in --out")
    p.add_argument("--report", action="store_true", help="only aggregate the runs in --out (no training)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = p.parse_args(argv)
    if args.teacher_seed < 0:
        args.teacher_seed = None
    if "all" in args.methods:
        args.methods = list(METHODS)
    if args.quick:  # explicit flags still win over these
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for k, v in dict(steps=4, batch=8, teacher_steps=40, teacher_target=0.0, calibrate_steps=10, student_steps=20,
                         ground_steps=10, student_target=0.0, aligned_target=0.0, eval_size=24, eval_every=2, probe_size=8,
                         probe_bins=4, auto_every=2).items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- models


def build(args, seed: int):
    """Processor, teacher and the student's starting point in each regime (all cached under ``args.cache``).

    Teacher (one for every seed unless ``--teacher-seed -1``, as a distillation run has one teacher):
    trained on the task with the images (until ``--teacher-target`` held-out accuracy, checked
    every 250 steps, at most ``--teacher-steps``), then calibrated: a few hundred steps on the same data
    with and without the images, with label smoothing. The text-only half gives it a language prior (a
    real VLM answers text-only prompts; otherwise the text-only pass b is out of distribution); the
    smoothing keeps its log-probabilities of impossible tokens bounded (trained to zero loss they reach
    -20 or less with and without the image, and their difference a - b, the visual gain q* adds to the
    student's prior, becomes noise of several nats that drags q* onto garbage tokens).
    Blind student: a smaller language model with the teacher's vision encoder (as real students share a
    pre-trained ViT; frozen here but for its projection into the LM), trained on shuffled images and
    text-only: it knows the answer format and the language prior, not how to use what it sees.
    Grounded student: the blind one, trained further the same way but with the real images, until its
    held-out accuracy reaches ``--student-target`` (checked every 5 steps): it already looks, partially.

    Aligned student (``aligned_phases``) and its teacher: the same recipes on answers with the preamble.

    Returns (processor, {regime: teacher}, {regime: student}) for the regimes in ``args.regime``.
    """
    proc = processor(args.family)
    sizes = {"teacher": dict(hidden=96, layers=3, vision_hidden=64, vision_depth=2),
             "student": dict(hidden=64, layers=2, vision_hidden=64, vision_depth=2)}
    common = dict(lr=args.pretrain_lr, batch=args.pretrain_batch)
    t = seed if args.teacher_seed is None else args.teacher_seed
    variants = {r: REGIME_TASK[r] for r in args.regime}
    by_task = {repr(kw): pretrained(args, proc, "teacher", sizes["teacher"], t * 2, [
        dict(common, steps=args.teacher_steps, target=args.teacher_target, seed=t * 10, **kw),
        dict(common, steps=args.calibrate_steps, lr=args.pretrain_lr / 4, text_only=True, smoothing=0.1,
             seed=t * 10 + 1, **kw)]) for kw in variants.values()}
    teachers = {r: by_task[repr(kw)] for r, kw in variants.items()}
    frozen = dict(common, text_only=True, smoothing=0.1, freeze_vision=True)
    blind = dict(frozen, steps=args.student_steps, shuffle=True, seed=seed * 10 + 2)
    ground = dict(frozen, steps=args.ground_steps, target=args.student_target, check_every=5, seed=seed * 10 + 3)
    phases = {"blind": [blind], "grounded": [blind, ground], "aligned": aligned_phases(args, seed, common)}
    students = {regime: pretrained(args, proc, "student", sizes["student"], seed * 2 + 1, phases[regime],
                                   teachers[regime]) for regime in args.regime}
    return proc, teachers, students


def aligned_phases(args, seed: int, common: dict) -> list[dict]:
    """The aligned student's pre-training, built for the paper's preconditions (issue 21).

    1. prior: shuffled images (it learns the answer format, not to look) and, text-only, the
       teacher's own text-only distribution (KL(qb‖pu), ``prior_kl``) instead of the gold answer, so
       that its text prior pu starts close to the teacher's qb (the start Lang is reported).
    2. ground: the real images until ``--aligned-target`` held-out accuracy (checked every 5 steps),
       still distilling qb text-only, so it looks partially and keeps the aligned prior.
    The vision encoder trains in both, at the LM's learning rate (no freeze_vision); every answer
    carries the low-VDS preamble (``synthetic_task.PREAMBLE``).
    """
    prior = dict(common, steps=args.student_steps, shuffle=True, text_only=True, prior_kl=True, smoothing=0.1,
                 preamble=True, seed=seed * 10 + 4)
    ground = dict(prior, shuffle=False, steps=args.ground_steps, target=args.aligned_target, check_every=5,
                  seed=seed * 10 + 5)
    return [prior, ground]


def pretrained(args, proc, role: str, size: dict, seed: int, phases: list[dict], teacher=None):
    """A ``vgs_kernels.testing.tiny_vlm`` of ``size`` after the pre-training ``phases``, each one's weights
    cached by the code and settings that made it; a student starts from ``teacher``'s vision encoder (but its
    projection)."""
    model = tiny.tiny_vlm(args.family, proc, seed=seed, **size)
    if teacher is not None:
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in teacher.state_dict().items()
                               if "visual" in k and k in own and own[k].shape == v.shape}, strict=False)
    key = repr((_sources(), args.family, role, size, seed))
    for i, phase in enumerate(phases):
        key += repr(phase)
        path = args.cache and os.path.join(args.cache, f"{args.family}-{role}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")
        if path and os.path.exists(path):
            model.load_state_dict(torch.load(path))
            continue
        pretrain(model, proc, **phase, desc=f"{role} {i + 1}/{len(phases)}",
                 teacher=teacher if phase.get("prior_kl") else None)
        if path:
            os.makedirs(args.cache, exist_ok=True)
            torch.save(model.state_dict(), path)
    return model.eval()


def processor(family: str):
    """The task's processor: ``vgs_kernels.testing``'s tiny processor of ``family`` with the whitespace
    word-level tokenizer over the task's words and Qwen's one-line template (spaces for newlines)."""
    return tiny.tiny_processor(family, task.WORDS, tokenizer="whitespace")


def _sources() -> str:
    """The task's, the models' (vgs_kernels/testing/families.py builds them) and the pre-training code: a
    change invalidates the cached weights."""
    files = "".join(open(f).read() for f in (os.path.join(HERE, "synthetic_task.py"), tiny.__file__))
    return files + inspect.getsource(processor) + inspect.getsource(pretrain)


def pretrain(model, proc, steps: int, batch: int, lr: float, seed: int, desc: str, target: float = 0.0,
             check_every: int = 250, shuffle: bool = False, text_only: bool = False, smoothing: float = 0.0,
             freeze_vision: bool = False, preamble: bool = False, prior_kl: bool = False, teacher=None) -> None:
    """Cross-entropy on the gold answers (one-cycle learning rate).

    shuffle: every question gets another example's image. text_only: the loss adds the same batch
    without the images. freeze_vision: the vision encoder (but its projection into the LM) stays
    frozen. target > 0: stop once the greedy accuracy with the image on held-out examples reaches it
    (checked every ``check_every`` steps). preamble: answers with the preamble. prior_kl: the text-only
    loss is KL(qb‖pu) to ``teacher``'s text-only distribution instead of the gold answer's cross-entropy.
    """
    rng = np.random.default_rng(10_000 + seed)
    held_out = task.sample(96, np.random.default_rng(20_000 + seed), preamble)
    params = [p for n, p in model.named_parameters() if not (freeze_vision and "visual" in n and "merger" not in n)]
    opt = torch.optim.AdamW(params, lr=lr)
    total = max(steps, 3)  # OneCycleLR needs >= 2 warm-up steps and one more
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total,
                                                   pct_start=min(0.5, max(0.05, 2 / total)))
    tokens = vgs.VisionTokens.from_model(model)
    model.train()
    for step in (bar := tqdm(range(1, steps + 1), desc=f"pre-train {desc}", leave=False, disable=None)):
        examples = task.sample(batch, rng, preamble)
        images = [examples[i].image for i in rng.permutation(batch)] if shuffle else None
        inputs, answer = task.supervised_batch(proc, examples, images)
        loss = 0.0
        for i, (batch_, answer_) in enumerate([(inputs, answer)] + ([vgs.strip_images(inputs, answer, tokens)]
                                                                    if text_only else [])):
            pos, mask = vgs.response_positions(answer_)
            logits = vgs.response_logits(model, batch_, pos)
            if prior_kl and i == 1:  # the teacher's text-only distribution qb as the target of pu
                with torch.no_grad():
                    qb = vgs.response_logits(teacher, batch_, pos)[mask].log_softmax(-1)
                loss = loss + torch.nn.functional.kl_div(logits[mask].log_softmax(-1), qb, log_target=True,
                                                         reduction="batchmean")
                continue
            labels = batch_["input_ids"].gather(1, pos + 1)
            loss = loss + torch.nn.functional.cross_entropy(logits[mask], labels[mask], label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if target > 0 and (step % check_every == 0 or step == steps):
            model.eval()
            acc = task.accuracy(model, proc, held_out, max_new_tokens=7 + preamble * task.PREAMBLE_TOKENS)["all"]
            model.train()
            bar.set_postfix(acc=f"{acc:.2f}")
            if acc >= target or step == steps:
                print(f"pre-train {desc}: {step} steps, held-out accuracy {acc:.3f}", flush=True)
                break
    model.eval()


# ----------------------------------------------------------------------------- distillation


def rollout(student, proc, examples, seed: int, max_new_tokens: int):
    """Sample one response per prompt from the current student; returns (batch, response_mask)."""
    prompts = task.prompts(proc, examples)
    torch.manual_seed(seed)
    with torch.no_grad():
        seq = student.generate(**prompts, do_sample=True, temperature=1.0, max_new_tokens=max_new_tokens,
                               suppress_tokens=vgs.VisionTokens.from_model(student).ids().tolist(),
                               pad_token_id=proc.tokenizer.pad_token_id)
    return vgs.rollout_batch(prompts, seq, proc.tokenizer.eos_token_id)


def new_tokens(args, regime: str) -> int:
    """Rollout and evaluation length: --max-new-tokens, plus the preamble where the regime has one."""
    return args.max_new_tokens + (task.PREAMBLE_TOKENS if REGIME_TASK[regime].get("preamble") else 0)


def evaluate(model, proc, examples, max_new_tokens: int = 7) -> dict:
    blank, n = [task.blank()] * len(examples), max_new_tokens
    return {"image": task.accuracy(model, proc, examples, max_new_tokens=n),
            "blank": task.accuracy(model, proc, examples, blank, max_new_tokens=n)}


def start_lang(args, proc, teacher, student, seed: int, regime: str) -> float:
    """Lang = KL(pu‖qb) per token on a batch of the student's own rollouts (the prior gap at the start)."""
    examples = task.sample(max(args.probe_size, 16), np.random.default_rng(40_000 + seed), **REGIME_TASK[regime])
    batch, rmask = rollout(student, proc, examples, 50_000 + seed, new_tokens(args, regime))
    with torch.no_grad():
        s, u, a, b, mask = vgs.distill_logits(student, teacher, batch, rmask)
        return float(vgs.decomposed_kl(s, u, a, b, mask).lang[mask].mean())


def distill(method: str, args, proc, teacher, student0, seed: int, eval_set, start: dict | None = None,
            regime: str = "grounded"):
    """Distil a copy of ``student0`` with ``method``; returns (log, trained student). start: ``student0``'s
    evaluation on ``eval_set`` if already made (the same for every method); regime: its task variant."""
    spec = METHODS[method]
    lam = spec.get("lam", args.lam)
    grpo, alpha = spec.get("grpo", False), spec.get("alpha", args.alpha)
    whole = grpo or spec.get("steer")  # the hook takes the weights from the loss output (steer.backward(out))
    student = copy.deepcopy(student0).train()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    steer = (vgs.GradientSteering(opt, policy=spec["policy"], gamma=None if whole else args.gamma,
                                  lam=None if whole else lam, every=args.auto_every)
             if spec.get("policy") else None)
    loss_fn = vgs.VGSLoss(gamma=args.gamma, lam=lam, adaptive=spec.get("adaptive", False),
                          eta=args.eta if spec.get("fixed") else None,
                          detach_prior=not (args.attach_prior or spec.get("attach_prior", False)),
                          monolithic=spec.get("monolithic", False), steer=spec.get("steer", "visual"))
    va_fn = vgs.VAOPDLoss()
    rng = np.random.default_rng(20_000 + seed)  # same prompts for every method
    log = {"step": [], "std": [], "vis": [], "lang": [], "vds": [], "eta": [], "std_descent": [], "t_train": [],
           "t_rollout": [],
           "eval_step": [], "acc_image": [], "acc_blank": [], "acc_image_kind": [], "acc_blank_kind": [],
           "reward": []}

    def record_eval(step, acc=None):
        if acc is None:
            student.eval()
            acc = evaluate(student, proc, eval_set, new_tokens(args, regime))
            student.train()
        log["eval_step"].append(step)
        for k in ("image", "blank"):
            log[f"acc_{k}"].append(acc[k]["all"])
            log[f"acc_{k}_kind"].append(acc[k])

    record_eval(0, start)
    bar = tqdm(range(1, args.steps + 1), desc=f"{method} seed {seed}", leave=False, disable=None)
    for step in bar:
        if grpo:  # --batch rollouts: --group per prompt
            examples = [e for e in task.sample(max(1, args.batch // args.group), rng, **REGIME_TASK[regime])
                        for _ in range(args.group)]
        else:
            examples = task.sample(args.batch, rng, **REGIME_TASK[regime])
        if spec.get("va"):  # the same number of rollouts: half the prompts, two rollouts each
            examples = [e for e in examples[:max(1, args.batch // 2)] for _ in range(2)]
        t0 = time.perf_counter()
        batch, rmask = rollout(student, proc, examples, 30_000 + 1000 * seed + step, new_tokens(args, regime))
        t1 = time.perf_counter()
        t_log = 0.0
        if loss_fn.monolithic or alpha == 0.0:  # passes with the image only (GRPO alone: the student's)
            with torch.no_grad():  # text-only logits (and grpo's teacher) for the log only: outside the timed step
                text, tmask = vgs.strip_images(batch, rmask, vgs.VisionTokens.from_model(student))
                tpos = vgs.response_positions(tmask)[0]
                u, b = (vgs.response_logits(m, text, tpos) for m in (student, teacher))
                pos, mask = vgs.response_positions(rmask)
                a = vgs.response_logits(teacher, batch, pos) if alpha == 0.0 else None
            t_log = time.perf_counter() - t1
            s = vgs.response_logits(student, batch, pos)
            if a is None:
                with torch.no_grad():
                    a = vgs.response_logits(teacher, batch, pos)
        else:
            s, u, a, b, mask = vgs.distill_logits(student, teacher, batch, rmask)
        opt.zero_grad(set_to_none=True)
        if grpo:
            rl, reward = grpo_loss(s, batch, rmask, mask, examples, proc, args.group)
            log["reward"].append(reward)
            out = rl if alpha == 0.0 else grpo_vgs_loss(rl, loss_fn(s, u, a, b, mask), alpha)
        elif spec.get("va"):
            weak = task.prompts(proc, examples, images=[degrade_image(e.image) for e in examples])
            with torch.no_grad():
                a_weak = vgs.response_logits(teacher, {**batch, "pixel_values": weak["pixel_values"]}, pos)
            tokens = batch["input_ids"].gather(1, pos + 1)
            groups = torch.arange(len(examples)) // 2
            out = va_fn(s, a, a_weak, tokens, mask, groups)
        else:
            out = loss_fn(s, u, a, b, mask)
        if steer is not None:
            steer.backward(out if whole else {"std": out.std, "vis": out.vis, "lp": out.lp})
        else:
            (out if alpha == 0.0 and grpo else out.total).backward()
        opt.step()
        t2 = time.perf_counter()
        terms = vgs.decomposed_kl(s.detach(), u.detach(), a, b, mask)  # this step's four terms, for the log
        log["step"].append(step)
        for k in ("std", "vis", "lang", "vds"):
            log[k].append(float(getattr(terms, k)[mask].mean()))
        log["eta"].append(float(steer.stats["eta"]) if steer is not None and steer.stats.get("eta") is not None
                          else (args.eta if spec.get("fixed") else 1.0))
        log["std_descent"].append(float(steer.stats["std_descent"]) if steer is not None else float("nan"))
        log["t_train"].append(t2 - t1 - t_log)
        log["t_rollout"].append(t1 - t0)
        bar.set_postfix(std=f"{log['std'][-1]:.3f}", vis=f"{log['vis'][-1]:.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            record_eval(step)
    if steer is not None:
        steer.remove()
    return log, student.eval()


def grpo_loss(s, batch, rmask, mask, examples, proc, group: int):
    """−O_GRPO on a correctness reward (1 when the decoded response is the exact answer), group-normalised
    advantages, one update per rollout batch; returns (loss, mean reward)."""
    pos = vgs.response_positions(rmask)[0]
    tokens = batch["input_ids"].gather(1, pos + 1)  # the sampled response tokens
    texts = proc.batch_decode(torch.where(mask, tokens, proc.tokenizer.pad_token_id), skip_special_tokens=True)
    rewards = torch.tensor([float(" ".join(t.split()) == e.answer) for t, e in zip(texts, examples)])
    logps = s.float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    return grpo_surrogate(logps, None, group_advantages(rewards, group), mask), float(rewards.mean())


def probe(args, proc, teacher, student, seed: int, regime: str = "grounded") -> list:
    """Gradient-geometry rows (as dicts) of ``student`` on one batch of its own rollouts."""
    if not args.probe_size:
        return []
    examples = task.sample(args.probe_size, np.random.default_rng(40_000 + seed), **REGIME_TASK[regime])
    batch, rmask = rollout(student, proc, examples, 50_000 + seed, new_tokens(args, regime))
    student = copy.deepcopy(student).train()
    rows = vgs.gradient_geometry(vgs.distill_logits(student, teacher, batch, rmask), student.parameters(),
                                 bins=args.probe_bins, gamma=args.gamma)
    return [r.as_dict() for r in rows]


# ----------------------------------------------------------------------------- the run, written as it goes


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if not args.report:
            run(args)
        return report(args)
    finally:
        torch.set_num_threads(threads)


def _dump(path: str, obj) -> None:
    """Write JSON atomically (a killed run leaves no half-written file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def run(args) -> None:
    """Seed by seed (so a partial grid has every cell), regime by regime, method by method; each run's
    log and end probe go to ``<out>/runs/<regime>-s<seed>-<method>.json`` when it ends, each start
    (teacher and student accuracy, start probe) to ``<out>/runs/<regime>-s<seed>-start.json``."""
    eval_sets = {r: task.sample(args.eval_size, np.random.default_rng(999), **REGIME_TASK[r]) for r in args.regime}
    settings = {k: v for k, v in vars(args).items() if k not in ("regime", "methods", "seeds", "resume", "report",
                                                                    "threads", "out", "cache")}
    for seed in args.seeds:
        def path(regime, name):
            return os.path.join(args.out, "runs", f"{regime}-s{seed}-{name}.json")

        todo = [(r, m) for r in args.regime for m in ["start", *args.methods]
                if not (args.resume and os.path.exists(path(r, m)))]
        if not todo:
            continue
        t0 = time.perf_counter()
        proc, teachers, students = build(args, seed)
        print(f"seed {seed}: teacher and students ready in {time.perf_counter() - t0:.0f} s", flush=True)
        initial = {}  # the start student's evaluation per regime, shared by its methods
        for regime, name in todo:
            t0, c0, student0 = time.perf_counter(), time.process_time(), students[regime]
            teacher, eval_set, n = teachers[regime], eval_sets[regime], new_tokens(args, regime)
            if name == "start":
                initial[regime] = evaluate(student0, proc, eval_set, n)
                rec = {"teacher": evaluate(teacher, proc, eval_set, n), "student": initial[regime],
                       "probe": probe(args, proc, teacher, student0, seed, regime),
                       "lang": start_lang(args, proc, teacher, student0, seed, regime)}
                print(f"seed {seed} {regime}: teacher {rec['teacher']['image']['all']:.3f}, "
                      f"student {rec['student']['image']['all']:.3f} (blank {rec['student']['blank']['all']:.3f}), "
                      f"start Lang {rec['lang']:.3f}", flush=True)
            else:
                if regime not in initial:
                    initial[regime] = evaluate(student0, proc, eval_set, n)
                rec, student = distill(name, args, proc, teacher, student0, seed, eval_set, initial[regime], regime)
                rec["probe"] = probe(args, proc, teacher, student, seed, regime)
                print(f"seed {seed} {regime} {name:12s} acc image {rec['acc_image'][0]:.3f} -> "
                      f"{rec['acc_image'][-1]:.3f}, blank {rec['acc_blank'][0]:.3f} -> {rec['acc_blank'][-1]:.3f}, "
                      f"train {np.median(rec['t_train']):.3f} s/step", flush=True)
            rec.update(regime=regime, seed=seed, method=name, settings=settings, wall_s=time.perf_counter() - t0,
                       cpu_s=time.process_time() - c0)
            _dump(path(regime, name), rec)


# ----------------------------------------------------------------------------- report: tables and plots


def load_runs(out: str) -> dict:
    """{regime: {"start": [rec per seed], method: [rec per seed]}} from ``<out>/runs``, seeds in order."""
    runs: dict = {}
    for f in sorted(glob.glob(os.path.join(out, "runs", "*.json"))):
        with open(f) as fh:
            rec = json.load(fh)
        runs.setdefault(rec["regime"], {}).setdefault(rec["method"], []).append(rec)
    for cells in runs.values():
        for recs in cells.values():
            recs.sort(key=lambda r: r["seed"])
    settings = {json.dumps(r["settings"], sort_keys=True) for c in runs.values() for rs in c.values() for r in rs}
    if len(settings) > 1:
        raise ValueError(f"the runs in {out}/runs were made with different settings; use one --out per protocol")
    return {r: runs[r] for r in REGIMES if r in runs}


def _ms(x) -> str:
    return f"{np.mean(x):.3f} ± {np.std(x, ddof=1) if len(x) > 1 else 0.0:.3f}"


def _ordered(cells: dict) -> list[str]:
    return [m for m in METHODS if m in cells]


def _probe_mean(recs: list[dict], key: str) -> tuple[list, float]:
    """Mean over seeds of ``key`` per VDS bin, and over all tokens (bin -1)."""
    bins = np.array([[r[key] for r in rec["probe"] if r["bin"] >= 0] for rec in recs], dtype=float)
    whole = [r[key] for rec in recs for r in rec["probe"] if r["bin"] == -1]
    return list(np.nanmean(bins, 0)), float(np.nanmean(whole))


def summary(runs: dict) -> str:
    """Markdown: per regime, the final accuracies (mean ± sd over seeds, sd with ddof=1), the terms at the
    start and end of training, η, time per step; then every seed; then the probe's ∠(∇Lang, ∇Vis)."""
    out = []
    for regime, cells in runs.items():
        start = cells.get("start", [])
        out += [f"### Regime `{regime}`", "",
                "| method | seeds | acc. with image | acc. blank image | look gap | Std first → last 10% | "
                "Vis first → last | Lang first → last | η mean [min, max] | train s/step | Δ image acc. vs opd, "
                "paired | seeds above opd |", "|---" * 12 + "|"]
        for name, key in (("teacher", "teacher"), ("student (start)", "student")):
            if start:
                img, blk = ([r[key][k]["all"] for r in start] for k in ("image", "blank"))
                out.append(f"| {name} | {len(start)} | {_ms(img)} | {_ms(blk)} | {_ms(np.subtract(img, blk))} "
                           "| | | | | | | |")
        for m in _ordered(cells):
            recs = cells[m]
            img, blk = [r["acc_image"][-1] for r in recs], [r["acc_blank"][-1] for r in recs]
            tail = max(1, len(recs[0]["std"]) // 10)

            def drift(k):
                return (f"{np.mean([np.mean(r[k][:tail]) for r in recs]):.3f} → "
                        f"{np.mean([np.mean(r[k][-tail:]) for r in recs]):.3f}")

            etas = np.concatenate([r["eta"] for r in recs])
            opd = {r["seed"]: r["acc_image"][-1] for r in cells.get("opd", [])}
            paired = [r["acc_image"][-1] - opd[r["seed"]] for r in recs if r["seed"] in opd]
            versus = (f"{_ms(paired)} | {sum(d > 0 for d in paired)}/{len(paired)}" if paired and m != "opd"
                      else " | ")
            out.append(f"| {m} | {len(recs)} | {_ms(img)} | {_ms(blk)} | {_ms(np.subtract(img, blk))} | "
                       f"{drift('std')} | {drift('vis')} | {drift('lang')} | "
                       f"{etas.mean():.2f} [{etas.min():.2f}, {etas.max():.2f}] | "
                       f"{np.mean([np.median(r['t_train']) for r in recs]):.3f} | {versus} |")
        if start and all("lang" in r for r in start):  # runs made before issue 21 have no start Lang
            out += ["", "Start Lang = KL(pu‖qb) per token on the start student's own rollouts: " + ", ".join(
                f"seed {r['seed']} {r['lang']:.3f}" for r in start) + "."]
        uphill = {m: [c for r in cells[m] for c in r.get("std_descent", []) if c == c] for m in _ordered(cells)}
        if any(uphill.values()):  # the hook's health signal (issue 21), on its measured steps
            out += ["", "Steered update against ∇Std (std_descent < 0), share of the hook's measured steps, all seeds: "
                    + ", ".join(f"{m} {np.mean(np.array(c) < 0):.0%} of {len(c)} (median cos {np.median(c):+.2f})"
                                for m, c in uphill.items() if c) + "."]
        rewarded = [m for m in _ordered(cells) if cells[m][0].get("reward")]
        if rewarded:  # the GRPO rows: the mean correctness reward of each step's rollouts
            out += ["", "| method | reward, first → last 10% of steps (mean over seeds) |", "|---|---|"]
            for m in rewarded:
                recs, tail = cells[m], max(1, len(cells[m][0]["reward"]) // 10)
                out.append(f"| {m} | {np.mean([np.mean(r['reward'][:tail]) for r in recs]):.3f} → "
                           f"{np.mean([np.mean(r['reward'][-tail:]) for r in recs]):.3f} |")
        out += ["", "Every seed, accuracy with the image / blank image at the end:", "",
                "| method | " + " | ".join(f"seed {r['seed']}" for r in start) + " |", "|---" * (1 + len(start)) + "|"]
        if start:
            out.append("| student (start) | " + " | ".join(
                f"{r['student']['image']['all']:.3f} / {r['student']['blank']['all']:.3f}" for r in start) + " |")
        for m in _ordered(cells):
            by_seed = {r["seed"]: r for r in cells[m]}
            out.append(f"| {m} | " + " | ".join(
                f"{by_seed[r['seed']]['acc_image'][-1]:.3f} / {by_seed[r['seed']]['acc_blank'][-1]:.3f}"
                if r["seed"] in by_seed else "not run" for r in start) + " |")
        probed = [n for n in ["start", *_ordered(cells)] if cells.get(n) and cells[n][0].get("probe")]
        if probed:
            nbins = len([r for r in cells[probed[0]][0]["probe"] if r["bin"] >= 0])
            out += ["", f"Gradient geometry: ∠(∇Lang, ∇Vis) in degrees per VDS bin (low → high), mean over seeds; "
                    "`start` is the student before distillation, the others after it; last column: exact η "
                    "over all tokens.", "",
                    "| student | " + " | ".join(str(i + 1) for i in range(nbins)) + " | all | ∠(∇Vis, ∇Std) all | η |",
                    "|---" * (nbins + 4) + "|"]
            for n in probed:
                per_bin, whole = _probe_mean(cells[n], "angle_lang_vis")
                _, vs = _probe_mean(cells[n], "angle_vis_std")
                _, eta = _probe_mean(cells[n], "eta")
                out.append(f"| {n} | " + " | ".join(f"{a:.0f}" for a in per_bin) + f" | {whole:.0f} | {vs:.0f} | "
                           f"{eta:.2f} |")
        out.append("")
    return "\n".join(out)


def plot(runs: dict, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(METHODS, plt.get_cmap("tab20").colors))  # more methods than tab10 has colours
    paths, rows = [], list(runs)

    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.3 * len(rows)), dpi=80, sharey=True, squeeze=False)
    for row, regime in zip(axes, rows):
        cells = runs[regime]
        for ax, key in zip(row, ("image", "blank")):
            for m in _ordered(cells):
                vals = np.array([r[f"acc_{key}"] for r in cells[m]])
                x = cells[m][0]["eval_step"]
                ax.plot(x, vals.mean(0), "-o", ms=3, color=colours[m], label=m)
                ax.fill_between(x, vals.min(0), vals.max(0), color=colours[m], alpha=0.12, lw=0)
            if cells.get("start"):
                ax.axhline(np.mean([r["teacher"][key]["all"] for r in cells["start"]]), ls="--", color="k", lw=0.8,
                           label="teacher")
            ax.set_title(f"{regime}: accuracy with {'the' if key == 'image' else 'a blank'} image", fontsize=10)
            ax.set_xlabel("distillation step")
        row[0].set_ylabel("exact match (mean; band: min–max over seeds)", fontsize=8)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(os.path.join(out, "demo_accuracy.png"))
    fig.savefig(paths[-1])

    keys = ("std", "vis", "lang", "vds", "eta")
    titles = {"std": "Std = KL(p‖qa)", "vis": "Vis = KL(p‖q*)", "lang": "Lang = KL(pu‖qb)", "vds": "VDS = KL(qa‖qb)",
              "eta": "η (steering factor)"}
    fig, axes = plt.subplots(len(rows), len(keys), figsize=(15, 3 * len(rows)), dpi=80, squeeze=False)
    for row, regime in zip(axes, rows):
        cells = runs[regime]
        for ax, key in zip(row, keys):
            for m in _ordered(cells):
                mu = np.array([r[key] for r in cells[m]]).mean(0)
                k = max(1, len(mu) // 20)  # moving average over ~5% of the run
                ax.plot(cells[m][0]["step"][k - 1:], np.convolve(mu, np.ones(k) / k, "valid"), color=colours[m],
                        label=m)
            ax.set_title(f"{regime}: {titles[key]}", fontsize=9)
            ax.set_xlabel("step")
        row[4].set_yscale("log")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(out, "demo_losses.png"))
    fig.savefig(paths[-1])

    angles = (("angle_lang_vis", "∠(∇Lang, ∇Vis)"), ("angle_lang_std", "∠(∇Lang, ∇Std)"),
              ("angle_vis_std", "∠(∇Vis, ∇Std)"))
    if any(c.get("start") and c["start"][0]["probe"] for c in runs.values()):
        fig, axes = plt.subplots(len(rows), 3, figsize=(13, 3.3 * len(rows)), dpi=80, sharey=True, squeeze=False)
        for row, regime in zip(axes, rows):
            cells = runs[regime]
            for ax, (key, title) in zip(row, angles):
                for n in ["start", *_ordered(cells)]:
                    if cells.get(n) and cells[n][0].get("probe"):
                        per_bin, _ = _probe_mean(cells[n], key)
                        ax.plot(range(1, len(per_bin) + 1), per_bin, "-o" if n == "start" else "-", ms=3,
                                color="k" if n == "start" else colours[n], lw=2 if n == "start" else 1,
                                label="start" if n == "start" else f"after {n}")
                ax.axhline(90, color="grey", lw=0.6)
                ax.set_title(f"{regime}: {title}", fontsize=10)
                ax.set_xlabel("VDS bin (low → high)")
            row[0].set_ylabel("degrees (mean over seeds)")
        axes[0][0].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        paths.append(os.path.join(out, "demo_probe.png"))
        fig.savefig(paths[-1])
    plt.close("all")
    return paths


def report(args) -> dict:
    """Tables (stdout and ``<out>/summary.md``) and plots from every run in ``args.out``; returns the runs."""
    runs = load_runs(args.out)
    if not runs:
        raise FileNotFoundError(f"no runs in {args.out}/runs: run without --report first")
    table = summary(runs)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table)
    paths = plot(runs, args.out)
    print(table)
    print(f"wrote {os.path.join(args.out, 'summary.md')}, {', '.join(paths)}")
    return runs


if __name__ == "__main__":
    main()
