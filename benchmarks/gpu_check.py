"""make gpu-check: validate a CUDA machine in one command (torch + Triton preinstalled, no network).

    python -m benchmarks.gpu_check --out bench_out/gpu_check          # from a source checkout
    python -m benchmarks.gpu_check --dry-run                            # print the steps only

Steps, each a subprocess with its own log and time limit, all inside one overall budget (default
540 s, so the whole check stays under 10 minutes on one H100), in order of importance; a failing
step does not stop the next:

1. build      the C++ extension in place (setup.py build_ext --inplace)
2. tests      the `gpu`-marked tests (every Triton kernel vs the float64 references at V = 151,936,
              bf16/fp16/fp32, masks, odd shapes, tables of thousands of tensors)
3. loss       vgs-bench loss suite at the goal shape N = 8192, V = 151,936 bf16: fused vs eager and
              torch.compile'd monolithic, Liger-Kernel when importable
4. steering   Gram + combine over the Qwen3-VL-2B parameter list (2.13 B parameters, fp32), the
              fused-linear goal case (N = 8192, H = 2048, V = 151,936) and the training step
5. the summary: device, driver, versions; the measured copy bandwidth; achieved bandwidth of
   decomposed_kl forward + backward (goal >= 75 % of copy) and Gram + combine (goal >= 80 %);
   test counts; written to <out>/gpu_check.md (paste into BENCHMARKS.md) and gpu_check.json.

Exit status 1 when a step failed or ran out of time (goals not reached are reported, not failed:
timings are measurements, not tests).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

GOALS = {"decomposed_kl fwd+bwd": 0.75, "gram+combine": 0.80}
KL_SHAPE = {"N": "8192", "V": "151936"}


@dataclass
class Step:
    name: str
    argv: List[str]
    limit_s: int                       # its own time limit (the overall budget may cut it shorter)
    needs: Tuple[str, ...] = ()        # modules it imports beyond torch / triton (no network to install them)
    status: str = "not run"            # ok | failed (rc) | timeout | skipped: why
    seconds: float = 0.0
    log: str = ""


def steps(out: str, py: str = sys.executable, bench: str = "benchmarks") -> List[Step]:
    """The steps of the check, in order of importance (the budget runs out at the end first)."""
    b = [py, "-m", bench, "--device", "cuda", "--no-progress", "--no-plots"]
    return [
        Step("build", [py, "setup.py", "-q", "build_ext", "--inplace"], 240),
        Step("tests", [py, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider",
                       f"--junitxml={os.path.join(out, 'gpu_tests.xml')}"], 240, ("pytest",)),
        Step("loss", b + ["--suite", "loss", "-N", KL_SHAPE["N"], "-V", KL_SHAPE["V"], "--dtype", "bfloat16",
                          "--modes", "fwd,bwd,fwdbwd", "--repeats", "10", "--out", os.path.join(out, "bench_loss")], 180,
             ("tqdm",)),
        Step("steering", b + ["--suite", "steering,fused-linear,step", "--goal", "--steering-scale", "1",
                              "--repeats", "10", "--out", os.path.join(out, "bench_steering")], 180,
             ("tqdm", "transformers")),
        Step("opd", b + ["--suite", "opd", "--repeats", "10", "--out", os.path.join(out, "bench_opd")], 180,
             ("tqdm", "trl")),
    ]


def run_steps(todo: Sequence[Step], out: str, budget_s: float, cwd: str) -> None:
    """Runs each step with its log in <out>/logs/<name>.log, within `budget_s` seconds in all."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    deadline = time.monotonic() + budget_s
    for step in todo:
        step.log = os.path.join(out, "logs", f"{step.name}.log")
        left = deadline - time.monotonic()
        missing = [m for m in step.needs if importlib.util.find_spec(m) is None]
        if missing:
            step.status = f"skipped: needs {', '.join(missing)} (not installed)"
            continue
        if left < 10:
            step.status = "skipped: overall time budget spent"
            continue
        t0 = time.monotonic()
        print(f"[gpu-check] {step.name}: {shlex.join(step.argv)}", file=sys.stderr, flush=True)
        with open(step.log, "w") as log:
            try:
                rc = subprocess.run(step.argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=min(step.limit_s, left)).returncode
                step.status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                step.status = f"timeout after {min(step.limit_s, left):.0f} s"
            except OSError as e:
                step.status = f"failed ({e})"
        step.seconds = time.monotonic() - t0
        print(f"[gpu-check] {step.name}: {step.status} ({step.seconds:.0f} s)", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- reading results


def environment() -> Dict[str, str]:
    """Device, driver and library versions (whatever of them this machine has)."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "host": platform.machine()}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        if q.returncode == 0 and q.stdout.strip():
            name, driver, mem, clock, power = [x.strip() for x in q.stdout.splitlines()[0].split(",")]
            env.update(gpu=name, driver=driver, gpu_memory=mem, max_sm_clock=clock, power_limit=power)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    try:
        import torch

        env.update(torch=torch.__version__, cuda=str(torch.version.cuda), gpus=str(torch.cuda.device_count()))
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.setdefault("gpu", p.name)
            env.update(capability=f"sm_{p.major}{p.minor}", sms=str(p.multi_processor_count))
    except ImportError:
        env["torch"] = "not installed"
    for mod in ("triton", "liger_kernel", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: say so
            env[mod] = "not importable"
    return env


def read_csv(path: str) -> List[Dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_counts(path: str) -> Optional[Dict[str, int]]:
    """passed / failed / errors / skipped from a pytest junit XML file."""
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"],
            "errors": n["errors"], "skipped": n["skipped"]}


def goal_rows(loss_rows: Sequence[Dict[str, str]], steering_rows: Sequence[Dict[str, str]]) -> List[Dict]:
    """Achieved bandwidth / measured copy bandwidth of the two goal workloads (None when absent)."""
    def frac(r):
        return float(r["frac_copy_bw"]) if r and r.get("frac_copy_bw") not in (None, "") else None

    kl = next((r for r in loss_rows if r.get("suite") == "loss" and r.get("impl") == "vgs fused"
               and r.get("mode") == "fwdbwd" and r.get("N") == KL_SHAPE["N"] and r.get("V") == KL_SHAPE["V"]
               and r.get("status") == "ok"), None)
    st = [r for r in steering_rows if r.get("suite") == "steering" and r.get("impl") == "vgs gram+combine"
          and r.get("params", "").startswith("qwen3-vl-2b") and r.get("status") == "ok"]
    st_best = max(st, key=lambda r: float(r.get("P") or 0), default=None)  # the largest list measured
    out = []
    for name, r, what in (("decomposed_kl fwd+bwd", kl, f"N={KL_SHAPE['N']} V={KL_SHAPE['V']} bf16"),
                          ("gram+combine", st_best, f"{st_best['params']}, {st_best['P']} params, "
                                                    f"{st_best['dtype']}" if st_best else "Qwen3-VL-2B")):
        f = frac(r)
        out.append({"workload": name, "case": what, "median_ms": r.get("median_ms") if r else None,
                    "gbps": r.get("gbps") if r else None, "copy_gbps": r.get("copy_gbps") if r else None,
                    "fraction": f, "goal": GOALS[name],
                    "reached": None if f is None else f >= GOALS[name]})
    return out


def summary(out: str, todo: Sequence[Step], env: Dict[str, str], command: str) -> Dict:
    loss = read_csv(os.path.join(out, "bench_loss", "results.csv"))
    steering = read_csv(os.path.join(out, "bench_steering", "results.csv"))
    return {"environment": env, "command": command, "steps": [asdict(s) for s in todo],
            "tests": test_counts(os.path.join(out, "gpu_tests.xml")), "goals": goal_rows(loss, steering)}


def markdown(s: Dict, out: str) -> str:
    env = s["environment"]
    dev = ", ".join(f"{k} {env[k]}" for k in ("gpu", "capability", "sms", "gpu_memory", "driver", "max_sm_clock",
                                             "power_limit") if k in env)
    libs = ", ".join(f"{k} {env.get(k, '?')}" for k in ("torch", "cuda", "triton", "liger_kernel", "transformers",
                                                         "python"))
    lines = [f"### GPU check — {env.get('gpu', 'no GPU')}, {env['date']}", "",
             f"Command: `{s['command']}`  ", f"Device: {dev or 'none found'}  ", f"Software: {libs}", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {st['name']} | {st['status']} | {st['seconds']:.0f} |" for st in s["steps"]]
    t = s["tests"]
    lines += ["", "gpu-marked tests: " + (", ".join(f"{v} {k}" for k, v in t.items()) if t else "no results"), "",
              "| goal workload | case | median ms | GB/s | copy GB/s | fraction of copy | goal | reached |",
              "|---|---|---|---|---|---|---|---|"]
    for g in s["goals"]:
        fr = "–" if g["fraction"] is None else f"{g['fraction']:.0%}"
        reached = {None: "not measured", True: "yes", False: "**no**"}[g["reached"]]
        lines.append(f"| {g['workload']} | {g['case']} | {g['median_ms'] or '–'} | {g['gbps'] or '–'} | "
                     f"{g['copy_gbps'] or '–'} | {fr} | {g['goal']:.0%} | {reached} |")
    for sub in ("bench_loss", "bench_steering", "bench_opd"):
        path = os.path.join(out, sub, "results.md")
        if os.path.exists(path):
            lines += ["", f"#### {sub}/results.md", "", open(path).read().strip()]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("bench_out", "gpu_check"), help="output directory (default: %(default)s)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all steps (default: %(default)s)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out (build,tests,loss,steering)")
    p.add_argument("--dry-run", action="store_true", help="print the steps and write nothing")
    p.add_argument("--allow-no-cuda", action="store_true", help=argparse.SUPPRESS)  # for the CPU-side tests
    args = p.parse_args(argv)
    args.skip = [s for s in args.skip.split(",") if s]
    known = {s.name for s in steps(args.out)}
    if set(args.skip) - known:
        p.error(f"--skip: unknown step(s) {sorted(set(args.skip) - known)}; choose from {sorted(known)}")
    return args


def main(argv: Optional[Sequence[str]] = None, cwd: Optional[str] = None) -> int:
    args = parse_args(argv)
    cwd = cwd or os.getcwd()
    todo = steps(args.out)
    for st in todo:
        if st.name in args.skip:
            st.status = "skipped: --skip"
    if args.dry_run:
        for st in todo:
            print(f"{st.name}: {shlex.join(st.argv)}  [{st.status}]")
        return 0
    env = environment()
    if env.get("gpus", "0") == "0" and not args.allow_no_cuda:
        print("gpu-check needs a CUDA device (torch.cuda.device_count() == 0)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    run_steps([st for st in todo if st.status == "not run"], args.out, args.budget, cwd)
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get("VGS_GPU_CHECK_COMMAND"):  # set by `make gpu-check`
        command = os.environ["VGS_GPU_CHECK_COMMAND"] + (f" GPU_CHECK_ARGS={shlex.quote(shlex.join(argv))}" if argv else "")
    else:
        command = shlex.join(["python", "-m", "benchmarks.gpu_check", *argv])
    s = summary(args.out, todo, env, command)
    text = markdown(s, args.out)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(s, f, indent=1)
    print(text)
    print(f"wrote {args.out}/gpu_check.md (paste into BENCHMARKS.md), gpu_check.json, logs/", file=sys.stderr)
    return 0 if all(st.status in ("ok", "skipped: --skip") for st in todo) else 1


if __name__ == "__main__":
    sys.exit(main())
