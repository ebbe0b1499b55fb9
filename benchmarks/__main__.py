"""vgs-bench / python -m vgs_kernels.benchmarks: microbenchmarks against the monolithic loss.

    vgs-bench                                   # CPU default: < 2 min on 2 cores
    vgs-bench --device cuda                     # GPU default: bf16, N up to 8192, V up to 151,936
    vgs-bench --suite steering --goal           # + the issue-3 case (~120 M params, 25 tensors)
    vgs-bench --suite fused-linear --goal       # the issue-7 case (N=2048, H=1024, V=151,936)
    vgs-bench --suite trl                       # VGSDistillationTrainer vs trl.DistillationTrainer (needs trl)
    vgs-bench --suite trl-grpo                  # VGSGRPOTrainer (Eq. 22) vs trl.GRPOTrainer (needs trl)
    vgs-bench --suite opd --goal                # plain OPD loss vs TRL's _chunked_divergence_loss, beta 1, 0,
                                                # 0.5, + the four-matmul floor, + N=4096 H=1024 V=151,936 fp32
                                                # (needs trl; --beta 1 for the reverse KL only)
    vgs-bench --suite loss -N 512,2048 -V 32000,151936 --modes fwd,bwd,fwdbwd --repeats 10

Prints one markdown table per suite, writes results.csv, results.md and PNG plots to --out.
Exit status 1 if any fast path disagreed with its baseline or failed (it is then not timed).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from . import harness, report

SUITES = ("loss", "steering", "step", "fused-linear", "trl", "trl-grpo", "opd")
MICRO = SUITES[:4]  # "all": the microbenchmarks; "trl", "trl-grpo" and "opd" (need trl) are asked for by name
DEFAULT_SUITES = ("loss", "steering", "step")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Job:
    """A unit of the run: builds its cases (allocating inputs) only when it is its turn."""

    label: str
    n_impls: int                      # impls over all the cases it builds (for the progress bar)
    build: Callable[[], Sequence[harness.Case]]


@dataclass
class Preset:
    loss_shapes: List[tuple]          # (N, V, modes)
    steering_scale: int               # Qwen3-VL-2B widths / depths divided by this
    step_size: str                    # tiny | small (suite_step.SIZES)
    fused_linear: List[tuple]         # (N, H, V)
    repeats: int
    warmup: int
    opd: List[tuple] = ()             # (N, H, V, dtype, padding share)


ALL_MODES = ("fwd", "bwd", "fwdbwd")
PRESETS = {
    # CPU default: the issue-2 goal case (N=2048, V=32000) + a small sweep over N and V.
    ("cpu", "default"): Preset([(128, 8192, ALL_MODES), (128, 32000, ("fwdbwd",)),
                                (128, 151936, ("fwdbwd",)), (2048, 32000, ("fwdbwd",))],
                               steering_scale=8, step_size="small", fused_linear=[(512, 512, 151936)],
                               repeats=3, warmup=1,
                               opd=[(1024, 512, 151936, torch.float32, 0.0), (1024, 512, 151936, torch.float32, 0.3),
                                    (1024, 512, 151936, torch.bfloat16, 0.0), (1024, 1024, 151936, torch.float32, 0.0)]),
    ("cpu", "tiny"): Preset([(16, 1000, ALL_MODES), (32, 1000, ("fwdbwd",)), (16, 3001, ("fwdbwd",))],
                            steering_scale=64, step_size="tiny", fused_linear=[(16, 32, 1000)],
                            repeats=1, warmup=1, opd=[(16, 32, 1000, torch.float32, 0.3)]),
    ("cuda", "default"): Preset([(n, v, ALL_MODES) for n, v in ((2048, 32000), (8192, 32000),
                                                                  (1024, 151936), (4096, 151936),
                                                                  (8192, 151936))],
                                steering_scale=2, step_size="small", fused_linear=[(4096, 2048, 151936)],
                                repeats=20, warmup=3,
                                opd=[(n, h, 151936, dt, pad) for n in (1024, 4096) for h in (512, 1024)
                                     for dt in (torch.float32, torch.bfloat16) for pad in (0.0, 0.3)]),
}
PRESETS[("cuda", "tiny")] = PRESETS[("cpu", "tiny")]
GOAL_FUSED_LINEAR = {"cpu": (2048, 1024, 151936), "cuda": (8192, 2048, 151936)}
GOAL_OPD = (4096, 1024, 151936, torch.float32, 0.0)  # the issue-19 goal case (CUDA's preset has it)


def _ints(text: str) -> List[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vgs-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=",".join(DEFAULT_SUITES),
                   help=f"comma-separated suites from {SUITES} or 'all' = {MICRO} (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="logit dtype of the loss suites (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--steering-dtype", choices=sorted(DTYPES), default="float32",
                   help="gradient dtype of the steering suite (default: %(default)s)")
    p.add_argument("--sizes", choices=("default", "tiny"), default="default",
                   help="size preset (tiny: seconds, for smoke tests)")
    p.add_argument("-N", type=_ints, default=None, help="loss suite: comma-separated N (positions)")
    p.add_argument("-V", type=_ints, default=None, help="loss suite: comma-separated V (vocabulary)")
    p.add_argument("-H", type=_ints, default=None,
                   help="opd suite: comma-separated hidden sizes (with -N: replaces the preset's cases, --dtype, "
                        "--pad; default H 1024)")
    p.add_argument("--pad", type=float, default=0.0, help="opd suite with -N: share of padding positions")
    p.add_argument("--beta", type=lambda x: tuple(float(b) for b in x.split(",")), default=None,
                   help="opd suite: TRL's beta values, comma-separated (default: 1,0,0.5: reverse KL, forward KL, JSD)")
    p.add_argument("--modes", default=None, help="loss suite: comma-separated from fwd,bwd,fwdbwd")
    p.add_argument("--steering-scale", type=int, default=None,
                   help="steering suite: divide Qwen3-VL-2B widths and depths by this (1 = full 2.1 B)")
    p.add_argument("--goal", action="store_true",
                   help="add the issue goal cases: steering ~120 M params / 25 tensors; fused-linear "
                        "N=2048 H=1024 V=151,936 on CPU (N=8192 H=2048 on CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per impl")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per impl (>= 1: the check)")
    p.add_argument("--backend", default=None, choices=("auto", "cpp", "triton", "reference"),
                   help="force the vgs_kernels backend of the fast paths (default: by device)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd baseline")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="bench_out", help="output directory (default: %(default)s)")
    args = p.parse_args(argv)
    args.suites = list(MICRO) if args.suite == "all" else [s for s in args.suite.split(",") if s]
    bad = [s for s in args.suites if s not in SUITES]
    if bad:
        p.error(f"unknown suite(s) {bad}; choose from {SUITES} or 'all'")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    args.dtype = DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if args.device.type == "cuda" else torch.float32)
    args.steering_dtype = DTYPES[args.steering_dtype]
    args.preset = PRESETS[(args.device.type, args.sizes)]
    args.repeats = args.preset.repeats if args.repeats is None else args.repeats
    args.warmup = args.preset.warmup if args.warmup is None else args.warmup
    modes = tuple(args.modes.split(",")) if args.modes else None
    if modes and any(m not in ALL_MODES for m in modes):
        p.error(f"--modes must be from {ALL_MODES}")
    shapes = args.preset.loss_shapes
    if args.N or args.V or modes:
        ns = args.N or sorted({n for n, _, _ in shapes})
        vs = args.V or sorted({v for _, v, _ in shapes})
        shapes = [(n, v, modes or ("fwdbwd",)) for n in ns for v in vs]
    args.loss_shapes = shapes
    return args


def jobs(args: argparse.Namespace) -> List[Job]:
    from . import suite_fused_linear, suite_loss, suite_steering, suite_step

    out: List[Job] = []
    dev = args.device
    if "loss" in args.suites:
        n_impls = suite_loss.N_IMPLS + suite_loss.N_COMPILED * (not args.no_compile) + (
            dev.type == "cuda" and suite_loss.liger_reverse_kl() is not None)
        for shape in args.loss_shapes:
            out.append(Job(f"loss N={shape[0]} V={shape[1]}", n_impls * len(shape[2]),
                           lambda shape=shape: list(suite_loss.cases([shape], args.dtype, dev,
                                                                     compile=not args.no_compile))))
    if "steering" in args.suites:
        scale = args.steering_scale or args.preset.steering_scale
        sets = [(f"qwen3-vl-2b/{scale}" if scale > 1 else "qwen3-vl-2b",
                 lambda: suite_steering.qwen3_vl_2b_shapes(scale))]
        if args.goal:
            sets.append(("goal 120M", suite_steering.goal_shapes))
        for name, shapes in sets:
            out.append(Job(f"steering {name}", 3, lambda name=name, shapes=shapes: [
                suite_steering.case(name, shapes(), args.steering_dtype, dev)]))
    if "step" in args.suites:
        out.append(Job("training step", suite_step.N_IMPLS,
                       lambda: [suite_step.case(args.preset.step_size, dev)]))
    if "fused-linear" in args.suites:
        sizes = list(args.preset.fused_linear)
        if args.goal:
            sizes.append(GOAL_FUSED_LINEAR[dev.type])
        for size in sizes:
            out.append(Job(f"fused-linear N={size[0]} H={size[1]} V={size[2]}", suite_fused_linear.N_IMPLS,
                           lambda size=size: suite_fused_linear.cases(*size, args.dtype, dev)))
    if "trl" in args.suites:
        from . import suite_trl

        out.append(Job("trl trainers", suite_trl.N_IMPLS, lambda: list(suite_trl.cases(args.preset.step_size, dev))))
    if "trl-grpo" in args.suites:
        from . import suite_trl_grpo

        out.append(Job("trl grpo trainers", suite_trl_grpo.N_IMPLS,
                       lambda: list(suite_trl_grpo.cases(args.preset.step_size, dev))))
    if "opd" in args.suites:
        from . import suite_opd

        sizes = ([(n, h, (args.V or [151936])[0], args.dtype, args.pad) for n in args.N for h in args.H or [1024]]
                 if args.N else list(args.preset.opd))
        sizes += [GOAL_OPD] if args.goal and GOAL_OPD not in sizes else []
        for n, h, v, dt, pad in sizes:
            betas = args.beta or suite_opd.BETAS
            out.append(Job(f"opd N={n} H={h} V={v} {dt} pad={pad}", suite_opd.N_IMPLS * len(betas),
                           lambda c=(n, h, v, dt, dev, pad): suite_opd.cases(*c, betas=betas)))
    return out


def run(args: argparse.Namespace) -> List[harness.Result]:
    from tqdm.auto import tqdm

    dev = args.device
    env = harness.environment(dev)
    copy_bw = harness.copy_bandwidth(dev, (1 << 30) if dev.type == "cuda" else (256 << 20))
    touch = ""
    if dev.type == "cpu":
        env["first_touch_gbps"] = f"{harness.first_touch_bandwidth(256 << 20) / 1e9:.3g}"
        touch = f", first-touch bandwidth of fresh memory {env['first_touch_gbps']} GB/s"
    todo = jobs(args)
    calls = sum(j.n_impls * (max(1, args.warmup) + 1 + args.repeats) for j in todo)
    results: List[harness.Result] = []
    t0 = time.perf_counter()
    with tqdm(total=calls, disable=args.no_progress, unit="call", dynamic_ncols=True) as bar:
        for job in todo:
            bar.set_description(job.label)
            for case in job.build():
                results += harness.run_case(case, dev, args.repeats, args.warmup, copy_bw, bar.update)
                del case
    elapsed = time.perf_counter() - t0
    title = f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}"
    header = (f"# vgs-bench — {title}\n\nmeasured copy bandwidth {copy_bw / 1e9:.1f} GB/s{touch}; "
              f"{args.repeats} timed repeats after {max(1, args.warmup)} warm-up call(s) per impl "
              f"(the first one checked against the baseline) and 1 memory-measuring call, "
              f"interleaved; times are medians (p20–p80 spread); speedup vs X = X's time / this time; "
              f"memory: peak above what was live before the timed step (method: BENCHMARKS.md); "
              f"run took {elapsed:.0f} s.\n")
    table = header + "\n### headline\n\n" + report.headline(results) + "\n\n" + report.markdown(results)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    report.write_csv(os.path.join(args.out, "results.csv"), results, env)
    written = [] if args.no_plots else report.plots(args.out, results, title)
    print(f"\nwrote {args.out}/results.csv, results.md" + "".join(f", {os.path.basename(w)}" for w in written),
          file=sys.stderr)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from vgs_kernels.ops.backend import use_backend

    with use_backend(args.backend) if args.backend else contextlib.nullcontext():
        results = run(args)
    bad = [r for r in results if r.status != "ok" and r.status != "OOM"]
    for r in bad:
        print(f"FAILED {r.suite} {r.params} {r.impl}: {r.status}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
