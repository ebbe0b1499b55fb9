"""On-policy distillation of a tiny Qwen2-VL on CPU: monolithic OPD vs Visual Gradient Steering.

The task (python/synthetic_task.py) asks for the colour, the kind or the number of shapes drawn into a
32x32 image, so the answer needs the image. A teacher VLM is trained on it with the images (then given
a text-only prior and calibrated); the student, a smaller LM on the teacher's vision encoder, is trained
on the same questions with shuffled images and text-only, so it knows the answer format and the
language prior but not how to use what it sees (see ``build``). Then, from the same student and the
same prompts:

    opd        monolithic on-policy distillation: KL(student ‖ teacher), both with the image
    vgs-fixed  VGS loss η·[Std + γ·Vis + λ·LP] with a hand-fixed η (the paper's practice), one backward
    vgs-auto   VGS through vgs.GradientSteering(policy="auto"): exact η refreshed every few steps
    vgs-exact  VGS through vgs.GradientSteering(policy="vgs"): exact η every step (two backwards)

Responses are sampled from the current student at every step (on-policy). Reported: greedy accuracy
with the image and with a blank image (how much the student looks), the four loss terms, wall time per
step, and the gradient-geometry probe (angles between ∇Lang, ∇Vis, ∇Std per VDS decile).

    python python/distill_demo.py                 # defaults: < 10 min on 2 CPU cores, one seed
    python python/distill_demo.py --seeds 0 1 2   # the RESULTS.md runs
    python python/distill_demo.py --quick         # ~1 minute smoke run
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic_task as task  # noqa: E402
from tiny_vlm import tiny_processor, tiny_vlm  # noqa: E402

import vgs_kernels as vgs  # noqa: E402

METHODS = ("opd", "vgs-fixed", "vgs-auto", "vgs-exact")
PROBED = ("opd", "vgs-auto")  # the probe runs on the start student and after these (first seed)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=300, help="distillation steps per method and seed")
    p.add_argument("--batch", type=int, default=32, help="prompts per distillation step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--gamma", type=float, default=2.0)
    p.add_argument("--lam", type=float, default=0.01)
    p.add_argument("--eta", type=float, default=0.41, help="fixed η of vgs-fixed (the paper's value at γ=2)")
    p.add_argument("--attach-prior", action="store_true",
                   help="let Vis's gradient reach the text-only pass u too (default: the prior is detached)")
    p.add_argument("--auto-every", type=int, default=10, help="vgs-auto: steps between exact η refreshes")
    p.add_argument("--max-new-tokens", type=int, default=7)
    p.add_argument("--teacher-steps", type=int, default=2500, help="at most; stops at --teacher-target")
    p.add_argument("--teacher-target", type=float, default=0.95, help="teacher's held-out accuracy to reach")
    p.add_argument("--calibrate-steps", type=int, default=300, help="teacher's calibration phase")
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--eval-size", type=int, default=192)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--probe-size", type=int, default=64, help="prompts in the probe's batch (0: no probe)")
    p.add_argument("--probe-bins", type=int, default=10, help="VDS bins of the probe (10: deciles)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "demo"), help="results JSON and plots")
    p.add_argument("--cache", default=os.path.join(ROOT, "results", "demo_cache"),
                   help="pre-trained teacher/student weights ('' to disable)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a ~1 minute smoke run")
    args = p.parse_args(argv)
    if args.quick:  # explicit flags still win over these
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for k, v in dict(steps=6, batch=8, teacher_steps=40, teacher_target=0.0, calibrate_steps=10, student_steps=20,
                         eval_size=32, eval_every=3, probe_size=16, auto_every=3).items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- models


def build(args, seed: int):
    """Processor, teacher and the student's starting point (both cached under ``args.cache``).

    Teacher: trained on the task with the images (until ``--teacher-target`` held-out accuracy, checked
    every 250 steps, at most ``--teacher-steps``), then calibrated: a few hundred steps on the same data
    with and without the images, with label smoothing. The text-only half gives it a language prior (a
    real VLM answers text-only prompts; otherwise the text-only pass b is out of distribution); the
    smoothing keeps its log-probabilities of impossible tokens bounded (trained to zero loss they reach
    -20 or less with and without the image, and their difference a - b, the visual gain q* adds to the
    student's prior, becomes noise of several nats that drags q* onto garbage tokens).
    Student: a smaller language model with the teacher's vision encoder (as real students share a
    pre-trained ViT; frozen here), trained on shuffled images and text-only: it knows the answer format
    and the language prior, not how to use what it sees.
    """
    proc = tiny_processor(args.family, task.WORDS)
    sizes = {"teacher": dict(hidden=96, layers=3, vision_hidden=64, vision_depth=2),
             "student": dict(hidden=64, layers=2, vision_hidden=64, vision_depth=2)}
    phases = {"teacher": [dict(steps=args.teacher_steps, target=args.teacher_target),
                          dict(steps=args.calibrate_steps, lr=args.pretrain_lr / 4, text_only=True, smoothing=0.1)],
              "student": [dict(steps=args.student_steps, shuffle=True, text_only=True, smoothing=0.1)]}
    models = {}
    for role in ("teacher", "student"):
        model = tiny_vlm(args.family, proc, seed=seed * 2 + (role == "student"), **sizes[role])
        key = repr((_sources(), sizes[role], phases[role], args.pretrain_batch, args.pretrain_lr))
        path = args.cache and os.path.join(
            args.cache, f"{args.family}-{role}-s{seed}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt")
        if path and os.path.exists(path):
            model.load_state_dict(torch.load(path))
        else:
            if role == "student":  # the teacher's vision encoder, except the projection into the LM
                own = model.state_dict()
                model.load_state_dict({k: v for k, v in models["teacher"].state_dict().items()
                                       if "visual" in k and k in own and own[k].shape == v.shape}, strict=False)
            for i, phase in enumerate(phases[role]):
                pretrain(model, proc, **{"lr": args.pretrain_lr, **phase}, batch=args.pretrain_batch,
                         seed=seed * 10 + i, desc=f"{role} {i + 1}/{len(phases[role])}")
            if path:
                os.makedirs(args.cache, exist_ok=True)
                torch.save(model.state_dict(), path)
        models[role] = model.eval()
    return proc, models["teacher"], models["student"]


def _sources() -> str:
    """The task's, the models' and the pre-training code: a change invalidates the cached weights."""
    files = "".join(open(os.path.join(HERE, f)).read() for f in ("synthetic_task.py", "tiny_vlm.py"))
    return files + inspect.getsource(pretrain) + inspect.getsource(build)


def pretrain(model, proc, steps: int, batch: int, lr: float, seed: int, desc: str, target: float = 0.0,
             shuffle: bool = False, text_only: bool = False, smoothing: float = 0.0) -> None:
    """Cross-entropy on the gold answers (one-cycle learning rate).

    shuffle: every question gets another example's image and the vision encoder (but its projection)
    stays frozen. text_only: the loss adds the same batch without the images. target > 0: stop once
    the greedy accuracy with the image on held-out examples reaches it (checked every 250 steps).
    """
    rng = np.random.default_rng(10_000 + seed)
    held_out = task.sample(96, np.random.default_rng(20_000 + seed))
    params = [p for n, p in model.named_parameters() if not (shuffle and "visual" in n and "merger" not in n)]
    opt = torch.optim.AdamW(params, lr=lr)
    total = max(steps, 3)  # OneCycleLR needs >= 2 warm-up steps and one more
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total,
                                                   pct_start=min(0.5, max(0.05, 2 / total)))
    tokens = vgs.VisionTokens.from_model(model)
    model.train()
    for step in (bar := tqdm(range(1, steps + 1), desc=f"pre-train {desc}", leave=False, disable=None)):
        examples = task.sample(batch, rng)
        images = [examples[i].image for i in rng.permutation(batch)] if shuffle else None
        inputs, answer = task.supervised_batch(proc, examples, images)
        loss = 0.0
        for batch_, answer_ in [(inputs, answer)] + ([vgs.strip_images(inputs, answer, tokens)] if text_only else []):
            pos, mask = vgs.response_positions(answer_)
            logits = vgs.response_logits(model, batch_, pos)
            labels = batch_["input_ids"].gather(1, pos + 1)
            loss = loss + torch.nn.functional.cross_entropy(logits[mask], labels[mask], label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if target > 0 and (step % 250 == 0 or step == steps):
            model.eval()
            acc = task.accuracy(model, proc, held_out)["all"]
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


def evaluate(model, proc, examples) -> dict:
    blank = [task.blank()] * len(examples)
    return {"image": task.accuracy(model, proc, examples), "blank": task.accuracy(model, proc, examples, blank)}


def distill(method: str, args, proc, teacher, student0, seed: int, eval_set):
    """Distil a copy of ``student0`` with ``method``; returns (log, trained student)."""
    student = copy.deepcopy(student0).train()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    steer = None
    if method in ("vgs-auto", "vgs-exact"):
        kw = dict(policy="auto", every=args.auto_every) if method == "vgs-auto" else dict(policy="vgs")
        steer = vgs.GradientSteering(opt, gamma=args.gamma, lam=args.lam, **kw)
    loss_fn = vgs.VGSLoss(gamma=args.gamma, lam=args.lam, eta=args.eta if method == "vgs-fixed" else None,
                          detach_prior=not args.attach_prior)
    rng = np.random.default_rng(20_000 + seed)  # same prompts for every method
    log = {"step": [], "std": [], "vis": [], "lang": [], "vds": [], "eta": [], "t_train": [], "t_rollout": [],
           "eval_step": [], "acc_image": [], "acc_blank": [], "acc_image_kind": [], "acc_blank_kind": []}

    def record_eval(step):
        student.eval()
        acc = evaluate(student, proc, eval_set)
        student.train()
        log["eval_step"].append(step)
        for k in ("image", "blank"):
            log[f"acc_{k}"].append(acc[k]["all"])
            log[f"acc_{k}_kind"].append(acc[k])

    record_eval(0)
    bar = tqdm(range(1, args.steps + 1), desc=f"{method} seed {seed}", leave=False, disable=None)
    for step in bar:
        examples = task.sample(args.batch, rng)
        t0 = time.perf_counter()
        batch, rmask = rollout(student, proc, examples, 30_000 + 1000 * seed + step, args.max_new_tokens)
        t1 = time.perf_counter()
        if method == "opd":  # the monolithic loss needs the two passes with the image only
            with torch.no_grad():  # text-only logits for the log only: outside the timed step
                text, tmask = vgs.strip_images(batch, rmask, vgs.VisionTokens.from_model(student))
                tpos = vgs.response_positions(tmask)[0]
                u, b = (vgs.response_logits(m, text, tpos) for m in (student, teacher))
            t_log = time.perf_counter() - t1
            pos, mask = vgs.response_positions(rmask)
            s = vgs.response_logits(student, batch, pos)
            with torch.no_grad():
                a = vgs.response_logits(teacher, batch, pos)
            opt.zero_grad(set_to_none=True)
            vgs.VGSLoss(monolithic=True)(s, None, a, None, mask).total.backward()
        else:
            s, u, a, b, mask = vgs.distill_logits(student, teacher, batch, rmask)
            out = loss_fn(s, u, a, b, mask)
            opt.zero_grad(set_to_none=True)
            if steer is None:
                out.total.backward()
            else:
                steer.backward({"std": out.std, "vis": out.vis, "lp": out.lp})
        opt.step()
        t2 = time.perf_counter()
        terms = vgs.decomposed_kl(s.detach(), u.detach(), a, b, mask)  # this step's four terms, for the log
        log["step"].append(step)
        for k in ("std", "vis", "lang", "vds"):
            log[k].append(float(getattr(terms, k)[mask].mean()))
        log["eta"].append(float(steer.stats["eta"]) if steer is not None and steer.stats.get("eta") is not None
                          else (args.eta if method == "vgs-fixed" else 1.0))
        log["t_train"].append(t2 - t1 - (t_log if method == "opd" else 0.0))
        log["t_rollout"].append(t1 - t0)
        bar.set_postfix(std=f"{log['std'][-1]:.3f}", vis=f"{log['vis'][-1]:.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            record_eval(step)
    if steer is not None:
        steer.remove()
    return log, student.eval()


# ----------------------------------------------------------------------------- probe, plots, report


def probe(args, proc, teacher, student, seed: int) -> list:
    """Gradient-geometry rows of ``student`` on one batch of its own rollouts."""
    examples = task.sample(args.probe_size, np.random.default_rng(40_000 + seed))
    batch, rmask = rollout(student, proc, examples, 50_000 + seed, args.max_new_tokens)
    student = copy.deepcopy(student).train()
    return vgs.gradient_geometry(vgs.distill_logits(student, teacher, batch, rmask), student.parameters(),
                                 bins=args.probe_bins, gamma=args.gamma)


def mean_curve(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    vals = np.array([r[key] for r in runs], dtype=float)
    return vals.mean(0), vals.std(0)


def plot(results: dict, args) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colours = dict(zip(METHODS, ["tab:grey", "tab:blue", "tab:orange", "tab:green"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90, sharey=True)
    for ax, key, title in [(axes[0], "acc_image", "accuracy with the image"),
                           (axes[1], "acc_blank", "accuracy with a blank image")]:
        for m, runs in results["runs"].items():
            mu, sd = mean_curve(runs, key)
            x = runs[0]["eval_step"]
            ax.plot(x, mu, "-o", ms=3, color=colours[m], label=m)
            ax.fill_between(x, mu - sd, mu + sd, color=colours[m], alpha=0.15, lw=0)
        ax.axhline(np.mean([t[key.split("_")[1]]["all"] for t in results["teacher"]]), ls="--", color="k", lw=0.8,
                   label="teacher")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("distillation step")
    axes[0].set_ylabel(f"exact match (mean ± sd, {len(args.seeds)} seed{'s' * (len(args.seeds) > 1)})")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(args.out, "demo_accuracy.png"))
    fig.savefig(paths[-1])

    fig, axes = plt.subplots(1, 4, figsize=(12, 3), dpi=80)
    for ax, key in zip(axes, ("std", "vis", "lang", "vds")):
        for m, runs in results["runs"].items():
            mu, _ = mean_curve(runs, key)
            k = max(1, len(mu) // 20)  # moving average over ~5% of the run
            ax.plot(runs[0]["step"][k - 1:], np.convolve(mu, np.ones(k) / k, "valid"), color=colours[m], label=m)
        ax.set_title({"std": "Std = KL(p‖qa)", "vis": "Vis = KL(p‖q*)", "lang": "Lang = KL(pu‖qb)",
                      "vds": "VDS = KL(qa‖qb)"}[key], fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(args.out, "demo_losses.png"))
    fig.savefig(paths[-1])

    if results.get("probe"):
        fig, axes = plt.subplots(1, len(results["probe"]), figsize=(4.6 * len(results["probe"]), 3.4), dpi=80,
                                 sharey=True, squeeze=False)
        for ax, (name, rows) in zip(axes[0], results["probe"].items()):
            vgs.plot_gradient_geometry([vgs.GeometryRow(**r) for r in rows], ax=ax, title=name)
        fig.tight_layout()
        paths.append(os.path.join(args.out, "demo_probe.png"))
        fig.savefig(paths[-1])
    plt.close("all")
    return paths


def summary(results: dict, args) -> str:
    """A markdown table: final accuracies (mean ± sd over seeds) and time per step."""
    lines = ["| method | acc. with image | acc. blank image | look gap | Std (last 10%) | Vis (last 10%) | "
             "η (mean) | train s/step | rollout s/step |", "|---" * 9 + "|"]
    def ms(x):
        return f"{np.mean(x):.3f} ± {np.std(x):.3f}"

    for name, key in (("teacher", "teacher"), ("student (start)", "student_init")):
        img, blk = ([e[k]["all"] for e in results[key]] for k in ("image", "blank"))
        lines.append(f"| {name} | {ms(img)} | {ms(blk)} | {ms(np.subtract(img, blk))} | | | | | |")

    for m, runs in results["runs"].items():
        img = [r["acc_image"][-1] for r in runs]
        blk = [r["acc_blank"][-1] for r in runs]
        tail = max(1, len(runs[0]["std"]) // 10)
        lines.append(f"| {m} | {ms(img)} | {ms(blk)} | {ms(np.subtract(img, blk))} | "
                     f"{np.mean([np.mean(r['std'][-tail:]) for r in runs]):.4f} | "
                     f"{np.mean([np.mean(r['vis'][-tail:]) for r in runs]):.4f} | "
                     f"{np.mean([np.mean(r['eta']) for r in runs]):.3f} | "
                     f"{np.mean([np.median(r['t_train']) for r in runs]):.3f} | "
                     f"{np.mean([np.median(r['t_rollout']) for r in runs]):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> dict:
    os.makedirs(args.out, exist_ok=True)
    results = {"args": vars(args), "runs": {m: [] for m in args.methods}, "probe": {}, "teacher": [],
               "student_init": []}
    eval_set = task.sample(args.eval_size, np.random.default_rng(999))
    t_start = time.perf_counter()
    for seed in args.seeds:
        proc, teacher, student0 = build(args, seed)
        results["teacher"].append(evaluate(teacher, proc, eval_set))
        results["student_init"].append(evaluate(student0, proc, eval_set))
        if seed == args.seeds[0]:
            if args.probe_size:
                results["probe"]["student at start"] = [r.as_dict() for r in probe(args, proc, teacher, student0, seed)]
        for method in args.methods:
            log, student = distill(method, args, proc, teacher, student0, seed, eval_set)
            results["runs"][method].append(log)
            if args.probe_size and seed == args.seeds[0] and method in PROBED:
                results["probe"][f"after {method}"] = [r.as_dict() for r in probe(args, proc, teacher, student, seed)]
            print(f"seed {seed} {method:9s} acc image {log['acc_image'][0]:.3f} -> {log['acc_image'][-1]:.3f}, "
                  f"blank {log['acc_blank'][0]:.3f} -> {log['acc_blank'][-1]:.3f}, "
                  f"train {np.median(log['t_train']):.3f} s/step", flush=True)
    results["wall_s"] = time.perf_counter() - t_start
    with open(os.path.join(args.out, "demo_results.json"), "w") as f:
        json.dump(results, f)
    table = summary(results, args)
    paths = plot(results, args)
    print(table)
    print(f"wall time {results['wall_s']:.0f} s; wrote {', '.join(paths)}")
    return results


if __name__ == "__main__":
    main()
