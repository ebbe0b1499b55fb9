"""Does VGS's loss have the optimum the theory says? (issue 21)

For a fixed text-only prior pu, the per-token minimiser of Std + γ·Vis over the student's p is

    p* ∝ qa · (pu / qb)^{γ/(1+γ)}       (Std = KL(p‖qa), Vis = KL(p‖q*), q* ∝ pu·qa/qb)

which is the teacher qa only where the student's prior equals the teacher's (pu = qb). This script
trains the demo's start student on ONE frozen batch of its own rollouts (the teacher's logits and
the rollouts fixed) with η = 1, λ = 0, prior detached, and compares the p it reaches with p*
computed from the u it has at the end (``trained u``: as the demo trains), and, in a second run,
with u taken from a frozen copy of the start student (``frozen u``: the formula's assumption).
Reported per token (mean over the batch's response tokens): TV(p, p*), TV(p, qa), TV(p*, qa) and
KL(p*‖p), before and after. Writes ``<out>/optimum.json`` and prints a table.

    python python/optimum_check.py --regime aligned grounded --steps 400
    python python/optimum_check.py --quick          # smoke run: distill_demo's --quick models, 20 steps

Any other argument goes to distill_demo's settings of the pre-training (e.g. --teacher-steps 10).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
import distill_demo as demo  # noqa: E402  (its sys.path puts this checkout's vgs_kernels first)

vgs = demo.vgs


def optimum(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gamma: float) -> torch.Tensor:
    """log p* = log qa + γ/(1+γ) (log pu - log qb), normalised; [N, V] float32 logits in, log-probs out."""
    la, lb, lu = (x.float().log_softmax(-1) for x in (a, b, u))
    return (la + gamma / (1 + gamma) * (lu - lb)).log_softmax(-1)


def distances(s, p_star, a) -> dict:
    lp, la = s.float().log_softmax(-1), a.float().log_softmax(-1)

    def tv(x, y):
        return float(0.5 * (x.exp() - y.exp()).abs().sum(-1).mean())

    return {"tv_p_pstar": tv(lp, p_star), "tv_p_qa": tv(lp, la), "tv_pstar_qa": tv(p_star, la),
            "kl_pstar_p": float((p_star.exp() * (p_star - lp)).sum(-1).mean())}


def check(args, proc, teacher, student0, seed: int, regime: str, frozen_u: bool) -> dict:
    examples = demo.task.sample(args.batch, np.random.default_rng(60_000 + seed), **demo.REGIME_TASK[regime])
    batch, rmask = demo.rollout(student0, proc, examples, 70_000 + seed, demo.new_tokens(args, regime))
    student, anchor = copy.deepcopy(student0).train(), copy.deepcopy(student0).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    loss_fn = vgs.VGSLoss(gamma=args.gamma, lam=0.0, detach_prior=True)
    with torch.no_grad():
        u0 = vgs.distill_logits(anchor, teacher, batch, rmask)[1]

    def logits():
        s, u, a, b, mask = vgs.distill_logits(student, teacher, batch, rmask)
        return s, (u0 if frozen_u else u), a, b, mask

    def measure():
        with torch.no_grad():
            s, u, a, b, mask = logits()
            return distances(s[mask], optimum(u[mask], a[mask], b[mask], args.gamma), a[mask])

    before, losses = measure(), []
    for _ in tqdm(range(args.steps), desc=f"{regime} seed {seed} {'frozen' if frozen_u else 'trained'} u", leave=False,
                  disable=None):
        s, u, a, b, mask = logits()
        out = loss_fn(s, u, a, b, mask)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
        losses.append(float(out.total.detach()))
    return {"regime": regime, "seed": seed, "u": "frozen" if frozen_u else "trained", "before": before,
            "after": measure(), "loss_first": losses[0], "loss_last": losses[-1],
            "tokens": int(rmask.sum())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", nargs="+", default=["aligned", "grounded"], choices=demo.REGIMES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default 400; --quick: 20)")
    p.add_argument("--batch", type=int, default=None, help="rollouts in the frozen batch (default 16; --quick: 8)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--gamma", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(demo.ROOT, "results", "optimum"))
    p.add_argument("--cache", default=os.path.join(demo.ROOT, "results", "demo_cache"),
                   help="pre-trained teacher/student weights, shared with distill_demo.py ('' to disable)")
    p.add_argument("--quick", action="store_true", help="tiny pre-training (distill_demo --quick), 20 steps")
    own, rest = p.parse_known_args(argv)
    own.steps = own.steps or (20 if own.quick else 400)
    own.batch = own.batch or (8 if own.quick else 16)
    torch.set_num_threads(own.threads)
    print("| regime | seed | u | TV(p, p*) | KL(p*‖p) | TV(p, qa) | TV(p*, qa) | loss |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for seed in own.seeds:
        args = demo.parse_args(["--quick"] * own.quick + list(rest) + ["--regime", *own.regime, "--gamma",
                                                                       str(own.gamma), "--cache", own.cache])
        args.batch, args.lr, args.steps = own.batch, own.lr, own.steps
        proc, teachers, students = demo.build(args, seed)
        for regime in own.regime:
            for frozen in (True, False):
                rows.append(check(args, proc, teachers[regime], students[regime], seed, regime, frozen))
                r = rows[-1]
                print(f"| {regime} | {seed} | {r['u']} | " + " | ".join(
                    f"{r['before'][k]:.3f} → {r['after'][k]:.3f}" for k in
                    ("tv_p_pstar", "kl_pstar_p", "tv_p_qa", "tv_pstar_qa")) +
                    f" | {r['loss_first']:.3f} → {r['loss_last']:.3f} |", flush=True)
                os.makedirs(own.out, exist_ok=True)
                with open(os.path.join(own.out, "optimum.json"), "w") as f:
                    json.dump(rows, f, indent=1)
    print(f"wrote {os.path.join(own.out, 'optimum.json')}")
    return rows


if __name__ == "__main__":
    main()
