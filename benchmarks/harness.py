"""Timing, peak-memory and bandwidth measurement shared by every suite.

A suite describes `Case`s: one input shape, several `Impl`s of the same computation, a reference
impl whose output the others must match, and the minimal number of bytes the computation must move.
`run_case` checks agreement first (a benchmark never times a wrong kernel), then times the impls
interleaved repeat by repeat, so that the ratios between them are measured side by side.

Peak memory is the peak *above what was live before the step* (inputs, parameters, saved
activations of an earlier forward), measured in one extra untimed call after the warm-up (so that
neither compilation nor the measurement itself is in the timed calls): on CUDA
`torch.cuda.max_memory_allocated`; on CPU the peak resident set size (Linux `VmHWM`, reset through
`/proc/self/clear_refs` right after `malloc_trim(0)` has returned glibc's free heap to the OS), which
follows the live tensors and whatever a C++ kernel allocates outside torch's allocator.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

MiB = 1 << 20


# ----------------------------------------------------------------------------------------- device

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> Dict[str, str]:
    """What the CSV records about the run: device, library versions, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------- memory

_STATUS = "/proc/self/status"


def _status_kib(key: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in {_STATUS}")


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except (OSError, RuntimeError):
        return False


def _malloc_trim() -> None:
    """Return glibc's free heap memory to the OS, so that the resident set is the live set."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak bytes allocated above the level at `__enter__`; `.peak` is None where unsupported."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: Optional[int] = None
        self._cpu = device.type == "cpu" and cpu_peak_supported()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self._cpu:
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._cpu:
            self.peak = max(0, _status_kib("VmHWM") * 1024 - self._base)


# ------------------------------------------------------------------------------------------ timing

class Timer:
    """Seconds spent in a region; CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "Timer":
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Measured copy bandwidth in bytes/s: `dst.copy_(src)` of `nbytes` reads and writes them;
    the fastest of `repeats` copies (after one that faults the pages in)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        with Timer(device) as t:
            dst.copy_(src)
        times.append(t.seconds)
    return 2 * src.numel() * 4 / min(times[1:])


def first_touch_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """CPU: bytes/s of filling freshly allocated memory (page faults included), the fastest of
    `repeats`. Next to the copy bandwidth it shows what every large temporary costs a CPU baseline:
    glibc gives blocks above 32 MiB back to the OS on free, so each one is faulted in again."""
    times = []
    for _ in range(repeats):
        with Timer(torch.device("cpu")) as t:
            torch.empty(nbytes // 4).fill_(1.0)
        times.append(t.seconds)
    return nbytes / min(times)


# ------------------------------------------------------------------------------------------- cases

@dataclass
class Impl:
    """One way of computing a case.

    `setup()` (untimed) returns a state; `step(state)` is the timed region and returns what the
    agreement check compares (any nesting of tensors, lists, tuples, dicts), or `finish(state,
    output)` (untimed) derives it. The same `setup` + `step` is used for the check, so the timed
    code is exactly the checked code.
    """

    name: str
    step: Callable[[Any], Any]
    setup: Callable[[], Any] = lambda: None
    reference: Optional[str] = None    # the impl whose output this one must match (None: itself a reference)
    bytes_moved: Optional[int] = None  # minimal bytes this computation must read + write
    finish: Optional[Callable[[Any, Any], Any]] = None  # (state, step output) -> what to check; untimed
    timed: bool = True                 # False: a reference used only by the check
    fallback_for: Optional[str] = None  # untimed stand-in (e.g. chunked) for a reference that failed
    strict: bool = True                # False (baselines): an error above tolerance is reported, not fatal


@dataclass
class Case:
    suite: str
    params: Dict[str, Any]           # shape / dtype / mode ... (CSV columns, table columns)
    impls: List[Impl]
    baselines: List[str]             # time and memory ratios are reported against each of these
    tolerance: float                 # max error vs the reference, relative to its largest magnitude
    ratio: str = "speedup"           # speedup: baseline time / impl time; slowdown: impl / baseline


@dataclass
class Result:
    suite: str
    params: Dict[str, Any]
    impl: str
    status: str = "ok"               # ok | mismatch: ... | OOM | error: ...
    times: List[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    error: Optional[float] = None    # max error vs its reference (relative to the reference's scale)
    bytes_moved: Optional[int] = None
    copy_bw: Optional[float] = None
    baselines: List[str] = field(default_factory=list)
    ratio_kind: str = "speedup"      # how `ratio` reads (see Case.ratio)
    ratio: Dict[str, float] = field(default_factory=dict)      # baseline -> time ratio
    mem_ratio: Dict[str, float] = field(default_factory=dict)  # baseline -> this peak / its peak

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None

    def quantile(self, q: float) -> Optional[float]:
        if not self.times:
            return None
        xs = sorted(self.times)
        return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]

    @property
    def bandwidth(self) -> Optional[float]:
        return self.bytes_moved / self.median if self.bytes_moved and self.median else None

    def row(self) -> Dict[str, Any]:
        bw = self.bandwidth
        row = {
            "suite": self.suite, **self.params, "impl": self.impl, "status": self.status,
            "median_ms": _r(self.median, 1e3), "p20_ms": _r(self.quantile(0.2), 1e3),
            "p80_ms": _r(self.quantile(0.8), 1e3), "min_ms": _r(min(self.times, default=None), 1e3),
            "repeats": len(self.times), "peak_mem_mib": _r(self.peak_bytes, 1 / MiB),
            "max_rel_err": _r(self.error),
            "bytes_moved": self.bytes_moved, "gbps": _r(bw, 1e-9), "copy_gbps": _r(self.copy_bw, 1e-9),
            "frac_copy_bw": _r(bw / self.copy_bw if bw and self.copy_bw else None),
        }
        for name, x in self.ratio.items():
            row[f"{self.ratio_kind}_vs[{name}]"] = _r(x)
        for name, x in self.mem_ratio.items():
            row[f"mem_vs[{name}]"] = _r(x)
        return row


def _r(x: Optional[float], scale: float = 1.0) -> Optional[float]:
    return None if x is None else float(f"{x * scale:.4g}")


def _failure(err: BaseException) -> str:
    oom = isinstance(err, torch.OutOfMemoryError) if hasattr(torch, "OutOfMemoryError") else False
    text = str(err).lower()
    if oom or isinstance(err, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return "OOM"
    return f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def run_case(case: Case, device: torch.device, repeats: int, warmup: int,
             copy_bw: Optional[float] = None, tick: Callable[[int], None] = lambda n: None,
             ) -> List[Result]:
    """Check every impl against its reference, then time them all interleaved (`repeats` rounds).

    An impl that fails (exception, out of memory) or disagrees with its reference is reported with
    that status and never timed. One more untimed call per impl measures its peak memory.
    `tick(n)` reports n finished calls (for a progress bar); a case makes
    len(impls) * (max(1, warmup) + 1 + repeats) of them (skipped calls count as made).
    Check-only references are not in the returned results.
    """
    results = {i.name: Result(case.suite, dict(case.params), i.name, bytes_moved=i.bytes_moved,
                              copy_bw=copy_bw, baselines=list(case.baselines), ratio_kind=case.ratio)
               for i in case.impls}
    untimed = {i.name for i in case.impls if not i.timed or i.fallback_for}

    def once(impl: Impl, measure: str = "") -> Any:
        """One call; measure: "" (warm-up / check), "time" or "memory"."""
        state = impl.setup()
        if measure == "memory":
            with PeakMemory(device) as mem:
                impl.step(state)
            results[impl.name].peak_bytes = mem.peak
            return None
        with Timer(device) as t:
            out = impl.step(state)
        if measure:
            results[impl.name].times.append(t.seconds)
            return None
        return impl.finish(state, out) if impl.finish else out

    def fail(impl: Impl, err: BaseException) -> None:
        results[impl.name].status = _failure(err)
        results[impl.name].times.clear()
        _free(device)

    # Warm-up; the first call's output is what the agreement check compares. References first,
    # each followed by its fallback, which runs only if the reference failed (e.g. out of memory).
    outputs: Dict[str, Any] = {}
    order = [i for i in case.impls if i.reference is None and i.fallback_for is None]
    order = [x for i in order for x in [i] + [f for f in case.impls if f.fallback_for == i.name]]
    order += [i for i in case.impls if i.reference is not None]
    for impl in order:
        if impl.fallback_for is not None:
            if impl.fallback_for in outputs:
                tick(max(1, warmup))
                continue
            try:
                outputs[impl.fallback_for] = _snapshot(once(impl))
            except Exception as err:
                fail(impl, err)
            tick(max(1, warmup))
            continue
        try:
            for w in range(max(1, warmup)):
                out = once(impl)
                if w == 0:
                    outputs[impl.name] = _snapshot(out)
                del out
                tick(1)
        except Exception as err:  # e.g. OOM, or a backend that cannot run here: report, go on
            fail(impl, err)
            continue
        if impl.reference is not None:
            want, r = outputs.get(impl.reference), results[impl.name]
            if want is None:
                r.status = f"mismatch: reference {impl.reference} failed"
            else:
                r.error = max_rel_error(outputs[impl.name], want)
                if r.error > case.tolerance and impl.strict:
                    r.status = f"mismatch: max error {r.error:.2e} of max |ref| > {case.tolerance:.0e}"
            del outputs[impl.name]
    outputs.clear()
    _free(device)
    for n in untimed:
        del results[n]

    for measure in ["memory"] + ["time"] * repeats:  # timed rounds interleave the impls
        for impl in case.impls:
            if impl.name not in untimed and results[impl.name].status == "ok":
                try:
                    once(impl, measure)
                except Exception as err:
                    fail(impl, err)
            tick(1)

    for r in results.values():
        for name in case.baselines:
            base = results.get(name)
            if base is None or base is r:
                continue
            if base.median and r.median:
                r.ratio[name] = (base.median / r.median if case.ratio == "speedup"
                                 else r.median / base.median)
            if base.peak_bytes and r.peak_bytes is not None:
                r.mem_ratio[name] = r.peak_bytes / base.peak_bytes
    return list(results.values())


def _snapshot(x: Any) -> Any:
    """A copy of an impl's outputs (impls may write into shared buffers, e.g. `.grad`)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return [_snapshot(v) for v in x]
    if isinstance(x, dict):
        return {k: _snapshot(v) for k, v in x.items()}
    return x


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------- agreement

def max_rel_error(got: Any, want: Any) -> float:
    """max |got - want| / max |want| per tensor, worst over nested lists / dicts (dicts: over the
    keys both have, e.g. a monolithic impl's terms against a decomposed reference's)."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return float("inf")
        err = scale = 0.0
        # fp64 in chunks: exact enough for any dtype, without a full-size fp64 temporary.
        for g, w in zip(got.reshape(-1).split(1 << 22), want.reshape(-1).split(1 << 22)):
            g, w = g.double(), w.double()
            if not bool(torch.isfinite(g).all()):
                return float("inf")
            err = max(err, (g - w).abs().max().item())
            scale = max(scale, w.abs().max().item())
        return err / scale if scale > 0 else err
    if isinstance(want, dict):
        common = [k for k in want if k in got]
        return max((max_rel_error(got[k], want[k]) for k in common), default=float("inf"))
    if isinstance(want, (list, tuple)):
        if len(got) != len(want):
            return float("inf")
        return max((max_rel_error(g, w) for g, w in zip(got, want)), default=0.0)
    return 0.0 if got == want else float("inf")


def tolerance(dtype: torch.dtype) -> float:
    """Agreement tolerance for outputs computed from inputs of `dtype` (fp32 accumulation inside)."""
    return {torch.float64: 1e-9, torch.float32: 2e-4}.get(dtype, 3e-2)


def spawn_two(worker: Callable, args: Any, tag: str) -> Any:
    """Runs ``worker(rank, port, args, out)`` on 2 spawned CPU processes (a free port for their process
    group); returns what they saved to the file ``out`` (the DeepSpeed benchmarks)."""
    import os
    import socket
    import tempfile

    import torch.multiprocessing as mp

    out = os.path.join(tempfile.gettempdir(), f"{tag}_{os.getpid()}.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(port, args, out), nprocs=2, start_method="spawn")
    try:
        return torch.load(out)
    finally:
        os.remove(out)
