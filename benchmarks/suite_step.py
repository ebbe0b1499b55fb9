"""Suite 3 — on-policy distillation training steps of a tiny VLM: monolithic OPD, the plain
fixed-η loss, and the steering hook with policies fixed, auto and exact (vgs).

Student and teacher are randomly initialised Qwen3-VL models built from transformers configs (no
download); the batch is an image + prompt + a sampled response (random tokens: sampling is the same
for every method, so it is not timed). A step is what the training loop does after sampling:

  monolithic   2 forward passes (student, teacher; with the image), Std loss, 1 backward, SGD step
  fixed loss   4 forward passes (vgs_kernels.vlm.distill_logits), VGSLoss(eta=0.41).total, 1 backward
  hook fixed   4 passes, GradientSteering(policy="fixed", eta=0.41).backward(std, vis, lp): the
               hook's single combined backward
  hook auto    4 passes, GradientSteering(policy="auto", every=16): exact every 16th step, one
               combined backward with the EMA of η in between
  hook exact   4 passes, GradientSteering(policy="vgs"): one backward per component (std, vis,
               lp), Gram + combine

Every method has its own student copy, optimizer and **one persistent hook** (created once, as in
training), so `auto` is charged its real amortised cost: a timed call is `PERIOD` = 16 steps, i.e.
exactly one exact step of auto's. vgs-bench (``case``) interleaves the methods call by call;
``measure`` (``python -m benchmarks.suite_step``) interleaves them step by step, reports per-step
times (median over 16-step periods of the period's mean), ratios to the fixed-η loss and to
monolithic, peak memory per policy (auto: on a combined and on an exact step) and a summary of
auto's ``eta_error`` (how far the EMA was from the next exact η), for a teacher about the
student's size and one about 4× its size.

The agreement check (the first, untimed call of each method) runs a single step and compares the
gradient that `optimizer.step()` receives (after the steering hook) with the same method computed
independently: plain-torch reference KL backend, and for the steered methods torch.autograd.grad
per component + flatten + Eq. 15.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from .harness import Case, Impl, PeakMemory

PERIOD = 16    # optimizer steps per timed call = auto-η's refresh interval (GradientSteering's default)
GAMMA, LAM, ETA, LR = 2.0, 0.01, 0.41, 0.05
N_IMPLS = 8    # 5 timed + 3 check-only references

SIZES = {  # vocab, student hidden, teacher hidden, layers, batch, prompt, response, image grid
    "tiny": dict(vocab=1000, hidden=64, teacher_hidden=96, layers=1, batch=2, prompt=8, response=8, grid=4),
    "small": dict(vocab=8192, hidden=128, teacher_hidden=192, layers=2, batch=2, prompt=24, response=64,
                  grid=8),
}
# Teachers for `measure`: about the student's size, and about 4x it (the paper's 8B -> 2B ratio).
TEACHERS = {"same": dict(teacher_hidden=128, teacher_layers=2), "4x": dict(teacher_hidden=256, teacher_layers=10)}


def tiny_qwen3_vl(vocab: int, hidden: int, layers: int, seed: int) -> torch.nn.Module:
    """A randomly initialised Qwen3-VL with the last four ids as its vision tokens."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    head_dim = 32
    section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # M-RoPE t/h/w
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=hidden // head_dim, num_key_value_heads=max(1, hidden // head_dim // 2),
                head_dim=head_dim, max_position_embeddings=1024, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                  patch_size=8, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 4,
                        video_token_id=vocab - 3, vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(cfg)


def make_batch(vocab: int, batch: int, prompt: int, response: int, grid: int, device: torch.device, seed: int = 0):
    """<vision_start> image tokens <vision_end> prompt response, with Qwen's vision inputs."""
    g = torch.Generator().manual_seed(seed)
    n_img = grid * grid // 4  # spatial merge 2
    ids = torch.cat([torch.full((batch, 1), vocab - 2), torch.full((batch, n_img), vocab - 4),
                     torch.full((batch, 1), vocab - 1),
                     torch.randint(1, vocab - 4, (batch, prompt + response), generator=g)], 1)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == vocab - 4).long(),
                  pixel_values=torch.randn(batch * grid * grid, 3 * 2 * 8 * 8, generator=g),
                  image_grid_thw=torch.tensor([[1, grid, grid]] * batch))
    response_mask = torch.zeros_like(ids, dtype=torch.bool)
    response_mask[:, -response:] = True
    return {k: v.to(device) for k, v in inputs.items()}, response_mask.to(device)


class Setup:
    """Student (trainable), teacher (frozen), one batch and its text-only twin."""

    def __init__(self, size: str, device: torch.device, teacher_hidden: Optional[int] = None,
                 teacher_layers: Optional[int] = None):
        from vgs_kernels import vlm

        cfg = SIZES[size]
        self.cfg, self.device = cfg, device
        self.student = tiny_qwen3_vl(cfg["vocab"], cfg["hidden"], cfg["layers"], seed=0).to(device).train()
        self.teacher = tiny_qwen3_vl(cfg["vocab"], teacher_hidden or cfg["teacher_hidden"],
                                     teacher_layers or cfg["layers"], seed=1).to(device).eval()
        self.teacher.requires_grad_(False)
        self.batch, self.rmask = make_batch(cfg["vocab"], cfg["batch"], cfg["prompt"], cfg["response"],
                                            cfg["grid"], device)
        self.text_batch, self.text_rmask = vlm.strip_images(self.batch, self.rmask,
                                                            vlm.VisionTokens.from_model(self.student))
        self.pos, self.mask = vlm.response_positions(self.rmask)
        self.initial = copy.deepcopy(self.student.state_dict())

    def n_params(self, model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    def four_passes(self, student: torch.nn.Module):
        from vgs_kernels import vlm

        return vlm.distill_logits(student, self.teacher, self.batch, self.rmask, self.text_batch, self.text_rmask)


class Method:
    """One training loop: its own student copy, SGD optimizer and (for hook methods) one
    persistent GradientSteering hook. ``step()`` is one optimizer step."""

    def __init__(self, setup: Setup, kind: str, policy: Optional[str] = None):
        import vgs_kernels as vgs

        self.setup, self.kind, self.policy = setup, kind, policy
        self.student = copy.deepcopy(setup.student)
        self.student.load_state_dict(setup.initial)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=LR)
        self.steer = None
        if policy is not None:
            kw = dict(eta=ETA) if policy == "fixed" else dict(every=PERIOD) if policy == "auto" else {}
            self.steer = vgs.GradientSteering(self.opt, policy=policy, gamma=GAMMA, lam=LAM, **kw)
        self.eta_errors: List[float] = []

    def step(self) -> None:
        import vgs_kernels as vgs
        from vgs_kernels import vlm

        st = self.setup
        self.opt.zero_grad(set_to_none=True)
        if self.kind == "monolithic":
            s = vlm.response_logits(self.student, st.batch, st.pos)
            with torch.no_grad():
                a = vlm.response_logits(st.teacher, st.batch, st.pos)
            vgs.VGSLoss()(s, None, a, None, st.mask).total.backward()
        elif self.kind == "fixed loss":
            vgs.VGSLoss(gamma=GAMMA, lam=LAM, eta=ETA)(*st.four_passes(self.student)).total.backward()
        elif self.kind == "exact reference":
            self._exact_reference()
        else:
            out = vgs.VGSLoss(gamma=GAMMA, lam=LAM)(*st.four_passes(self.student))
            self.steer.backward({"std": out.std, "vis": out.vis, "lp": out.lp})
        self.opt.step()
        if self.steer is not None and self.steer.stats.get("mode") == "exact":  # NaN on combined steps
            err = float(self.steer.stats["eta_error"])
            if err == err:  # not the first measurement (no EMA yet) nor a fallback
                self.eta_errors.append(err)

    def next_is_exact(self) -> bool:
        return self.steer is not None and self.steer._wants_split()

    def _exact_reference(self) -> None:
        """autograd.grad per component, flatten, Eq. 15: η·(g_std + γ·g_vis + λ·g_lp)."""
        import vgs_kernels as vgs

        out = vgs.VGSLoss(gamma=GAMMA, lam=LAM)(*self.setup.four_passes(self.student))
        std, vis, lp = (torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(
            self.params, torch.autograd.grad(c, self.params, retain_graph=True, allow_unused=True))])
            for c in (out.std, out.vis, out.lp))
        eta = std.norm() / (std + GAMMA * vis).norm()
        for p, g in zip(self.params, (eta * (std + GAMMA * vis + LAM * lp)).split([p.numel() for p in self.params])):
            p.grad = g.view_as(p)

    def close(self) -> None:
        if self.steer is not None:
            self.steer.remove()


TIMED = [("monolithic", "monolithic", None), ("vgs fixed η (loss)", "fixed loss", None),
         ("hook fixed", "hook", "fixed"), ("hook auto-η", "hook", "auto"), ("hook exact", "hook", "vgs")]


def case(size: str, device: torch.device) -> Case:
    """The vgs-bench case: each timed call runs PERIOD steps of one method (its hook persists
    across calls); the first call of each is a single checked step."""
    from vgs_kernels.ops.backend import use_backend

    st = Setup(size, device)

    def impl(name: str, kind: str, policy: Optional[str] = None, reference: Optional[str] = None,
             backend: Optional[str] = None, timed: bool = True) -> Impl:
        method: List[Method] = []

        def setup():
            seen: list = []
            if not method:  # the checked call: a fresh method, one step; keep the gradient step() receives
                method.append(Method(st, kind, policy))
                handle = method[0].opt.register_step_pre_hook(lambda *_: seen.extend(
                    p.grad.detach().clone() for p in method[0].params if p.grad is not None))
                return method[0], 1, seen, handle
            return method[0], PERIOD, seen, None

        def step(state):
            m, n, _, _ = state
            with use_backend(backend) if backend else contextlib.nullcontext():
                for _ in range(n):
                    m.step()

        def finish(state, _):
            if state[3] is not None:
                state[3].remove()
            return state[2]

        return Impl(name, step, setup, reference=reference, finish=finish, timed=timed)

    ref_exact = "exact (autograd.grad + flatten)"
    impls = [impl("monolithic", "monolithic", reference="monolithic (reference KL)"),
             impl("monolithic (reference KL)", "monolithic", backend="reference", timed=False),
             impl("vgs fixed η (loss)", "fixed loss", reference="fixed η (reference KL)"),
             impl("fixed η (reference KL)", "fixed loss", backend="reference", timed=False),
             impl("hook fixed", "hook", "fixed", reference="fixed η (reference KL)"),
             impl("hook exact", "hook", "vgs", reference=ref_exact),
             impl(ref_exact, "exact reference", backend="reference", timed=False),
             impl("hook auto-η", "hook", "auto", reference=ref_exact)]
    params_desc = {"model": f"qwen3-vl h={st.cfg['hidden']} V={st.cfg['vocab']}",
                   "N": int(st.mask.sum()), "steps/call": PERIOD}
    return Case("step", params_desc, impls, baselines=["monolithic", "vgs fixed η (loss)"], tolerance=2e-3,
                ratio="slowdown")


# ----------------------------------------------------------------------------- step-interleaved runner


def measure(size: str = "small", teacher: str = "same", periods: int = 4, device: str = "cpu",
            log: Callable[[str], None] = print) -> Dict[str, dict]:
    """Steps of all methods interleaved one by one (the order rotates every step), `periods` x
    PERIOD timed steps per method after one untimed period. Returns per method: per-step time
    (median over periods of the period's mean), its spread, ratios, peak memory."""
    dev = torch.device(device)
    st = Setup(size, dev, **TEACHERS[teacher])
    methods = {name: Method(st, kind, policy) for name, kind, policy in TIMED}
    names = list(methods)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for period in range(periods + 1):
        for i in range(PERIOD):
            order = names[(period * PERIOD + i) % len(names):] + names[:(period * PERIOD + i) % len(names)]
            for n in order:
                t0 = time.perf_counter()
                methods[n].step()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if period > 0:
                    times[n].append(time.perf_counter() - t0)
    per_period = {n: [statistics.fmean(t[j:j + PERIOD]) for j in range(0, len(t), PERIOD)] for n, t in times.items()}
    peaks: Dict[str, Optional[int]] = {}
    for n in names:  # one more step each (auto: a combined one, then an exact one)
        m = methods[n]
        if n == "hook auto-η":
            while m.next_is_exact():
                m.step()
            with PeakMemory(dev) as mem:
                m.step()
            peaks[n] = mem.peak
            while not m.next_is_exact():
                m.step()
            with PeakMemory(dev) as mem:
                m.step()
            peaks["hook auto-η (exact step)"] = mem.peak
        else:
            with PeakMemory(dev) as mem:
                m.step()
            peaks[n] = mem.peak
    med = {n: statistics.median(v) for n, v in per_period.items()}
    out = {}
    for n in names:
        # ratio per period (paired: the same stretch of machine load), then the median
        r_fixed = statistics.median(a / b for a, b in zip(per_period[n], per_period["vgs fixed η (loss)"]))
        r_mono = statistics.median(a / b for a, b in zip(per_period[n], per_period["monolithic"]))
        out[n] = dict(ms=med[n] * 1e3, lo=min(per_period[n]) * 1e3, hi=max(per_period[n]) * 1e3,
                      vs_fixed=r_fixed, vs_mono=r_mono, peak_mib=None if peaks[n] is None else peaks[n] / 2**20)
    errs = methods["hook auto-η"].eta_errors
    out["_info"] = dict(student_params=st.n_params(st.student), teacher_params=st.n_params(st.teacher),
                        tensors=len(methods["hook exact"].params), N=int(st.mask.sum()),
                        steps=periods * PERIOD,
                        auto_exact_peak_mib=None if peaks["hook auto-η (exact step)"] is None
                        else peaks["hook auto-η (exact step)"] / 2**20,
                        eta_error=dict(n=len(errs), median=statistics.median(errs) if errs else None,
                                       max=max(errs) if errs else None))
    for m in methods.values():
        m.close()
    return out


def table(results: Dict[str, dict], title: str) -> str:
    info = results["_info"]
    e = info["eta_error"]
    lines = [f"{title}: student {info['student_params'] / 1e6:.2f} M params ({info['tensors']} tensors), "
             f"teacher {info['teacher_params'] / 1e6:.2f} M ({info['teacher_params'] / info['student_params']:.1f}x), "
             f"N = {info['N']}, {info['steps']} timed steps per method",
             "", "| method | ms / step (median of 16-step means) | min–max | ÷ fixed-η loss | ÷ monolithic "
                 "| peak MiB |", "|---|---|---|---|---|---|"]
    for n, r in results.items():
        if n == "_info":
            continue
        peak = "–" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        if n == "hook auto-η" and info["auto_exact_peak_mib"] is not None:
            peak += f" (exact step: {info['auto_exact_peak_mib']:.1f})"
        lines.append(f"| {n} | {r['ms']:.1f} | {r['lo']:.1f}–{r['hi']:.1f} | {r['vs_fixed']:.3f} | "
                     f"{r['vs_mono']:.3f} | {peak} |")
    if e["n"]:
        lines.append(f"\nauto-η eta_error (|EMA − exact η| / exact η at each exact step after the first): "
                     f"{e['n']} samples, median {e['median']:.3g}, max {e['max']:.3g}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="step-interleaved training-step benchmark (issue 14)")
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--teacher", default="same,4x", help="comma-separated from " + ",".join(TEACHERS))
    p.add_argument("--periods", type=int, default=4, help="timed 16-step periods per method (>= 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; 1 is steadier on a loaded machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"uptime: {os.popen('uptime').read().strip()}; torch threads {torch.get_num_threads()}")
    for t in args.teacher.split(","):
        print(table(measure(args.size, t, args.periods, args.device), f"teacher {t}"), "\n", flush=True)
    print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
