"""Compile report: every Triton kernel specialisation the wrappers launch, compiled for real GPUs
on a machine without one.

    python -m vgs_kernels.benchmarks.compile_report            # installed package
    python -m benchmarks.compile_report                        # from a source checkout
    ... --full                                                 # the whole matrix (VGS_COMPILE_FULL=1)
    ... --targets sm_90 --kernels gram,combine --jobs 4 --out bench_out/compile

1. Record: the public wrappers (`decomposed_kl` forward + backward, `gram`, `combine`) are called on
   small CPU tensors with `JITFunction.run` replaced by a recorder, so every launch they would make
   on a GPU (kernel, arguments, constexprs, num_warps) is captured without running anything. The
   calls cover dtypes, masks, MONO / DETACH, odd and aligned V, misaligned row views, k = 1..4 and
   tables of 1 to thousands of tensors; which kernels and specialisations exist is whatever the
   wrappers launch, not a list kept here.
2. Bind: Triton's own binder (the one `JITFunction.run` uses) turns each launch into the signature,
   constexprs and alignment attributes a GPU would compile, per target; duplicates are compiled once.
3. Compile for sm_80, sm_90 (ptxas / ptxas-blackwell from the Triton wheel) and gfx942, and read:
   registers, spills (ptxas log; AMD: VGPR/SGPR spill counts and scratch), shared memory, whether
   the global loads of the hot loop are vectorised (PTX / AMDGCN), and the machine instructions of
   the hot loop per element (SASS via cuobjdump / AMDGCN).
4. Report per kernel, plus the issue-bound time those instruction counts imply next to the
   memory-traffic floor for decomposed_kl at N = 8192, V = 151,936 bf16 and for gram + combine over
   the Qwen3-VL-2B parameter list (datasheet clocks and bandwidths, see DEVICES).

Exit status 1 on a compile error, or on any spill, unless the error is a dtype that
`vgs_kernels.ops.targets` declares unsupported on that target (then `decomposed_kl` rejects it
before launching, and the rule is checked both ways: a rejected dtype that compiles fails too).
Must run with TRITON_INTERPRET=0 (the default; the test suite sets 1, so it runs this in a subprocess).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

N_EST, V_EST = 8192, 151936  # the decomposed_kl estimate of the issue


@dataclass(frozen=True)
class Device:
    """Datasheet figures of the part a target is estimated on (not measurements)."""

    name: str
    units: int          # SMs / CUs
    lanes_per_clk: int  # thread-instructions issued per clock per SM / CU
    clock_hz: float     # boost clock
    mem_bw: float       # peak DRAM bandwidth, bytes/s


DEVICES = {
    "sm_80": Device("A100-SXM4-80GB", 108, 4 * 32, 1.41e9, 2.039e12),
    "sm_90": Device("H100-SXM5-80GB", 132, 4 * 32, 1.98e9, 3.35e12),
    "gfx942": Device("MI300X", 304, 4 * 16, 2.1e9, 5.3e12),  # 4 SIMD16 per CU: a wave64 VALU op takes 4 clocks
}
TARGET_SPECS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64)}


def target(name: str):
    from triton.backends.compiler import GPUTarget

    return GPUTarget(*TARGET_SPECS[name])


# ----------------------------------------------------------------------------- 1. recording


@dataclass
class Launch:
    kernel: object      # triton JITFunction
    args: tuple
    kwargs: dict
    case: str           # label of the wrapper call that made it


class _NotCompiled:
    """What the recorder returns for a kernel: a wrapper that keeps the compiled kernel (warmup, or
    a cached launch plan) and launches it later launches nothing."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None

    run = __call__


@contextlib.contextmanager
def recording(into: List[Launch], case: Callable[[], str]) -> Iterator[None]:
    """Replace JITFunction.run (what `kernel[grid](...)` calls) with a recorder; the wrappers'
    backend check is told that Triton may take CPU tensors. Nothing is launched."""
    from triton.runtime.jit import JITFunction

    from vgs_kernels.ops import backend as _backend

    def run(self, *args, grid, warmup, **kwargs):
        into.append(Launch(self, args, dict(kwargs), case()))
        return _NotCompiled()

    saved_run, saved_interp = JITFunction.run, _backend.TRITON_INTERPRET
    JITFunction.run, _backend.TRITON_INTERPRET = run, True
    try:
        yield
    finally:
        JITFunction.run, _backend.TRITON_INTERPRET = saved_run, saved_interp


def _kl_call(dtype_s, dtype_t, v, mono, mask, detach, misaligned=False, beta=1.0, n=16):
    """One decomposed_kl forward + backward. `mask`: False (none), True (bool) or a mask dtype (0/1
    numbers: the wrapper turns every mask into a bool row mask, so they share its launches); beta: the
    monolithic mode's divergence (DIV)."""
    import vgs_kernels as vgs

    def rows(dtype, grad):
        x = torch.zeros(n, v + misaligned, dtype=dtype)[:, int(misaligned):]  # row views off by one
        return x.requires_grad_(True) if grad else x

    s, a = rows(dtype_s, True), rows(dtype_t, False)
    u, b = (None, None) if mono else (rows(dtype_s, True), rows(dtype_t, False))
    m = None if mask is False else (torch.arange(n) % 3 != 0).to(torch.bool if mask is True else mask)
    t = vgs.decomposed_kl(s, u, a, b, m, detach_prior=detach, backend="triton", beta=beta)
    (t.std.sum() + t.vis.sum() + t.lang.sum()).backward()


def _steering_call(k, dtype, numels, aligned):
    import vgs_kernels as vgs

    def grads():
        if aligned:
            return [torch.zeros(n, dtype=dtype) for n in numels]
        buf = torch.zeros(sum(numels) + 1, dtype=dtype)[1:]  # views of a flat buffer, off by one element
        return list(buf.split(list(numels)))

    lists = [grads() for _ in range(k)]
    vgs.gram(lists, backend="triton")
    vgs.combine(grads(), lists, torch.ones(k), backend="triton")


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _kl_label(ds, dt, v, mono, mask, detach, misaligned, beta=1.0) -> str:
    mask_word = "" if mask is False else " mask" if mask is True else f" mask={_dtype_name(mask)}"
    return (f"decomposed_kl s={_dtype_name(ds)} t={_dtype_name(dt)} V={v}{' mono' if mono else ''}"
            f"{mask_word}{'' if detach else ' detach_prior=False'}{' misaligned' if misaligned else ''}"
            f"{'' if beta == 1.0 else f' beta={beta}'}")


MASK_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.float32, torch.bfloat16, torch.float16)


def calls(full: bool, n_params: int) -> Iterator[Tuple[str, Callable[[], None]]]:
    """(label, call) pairs: the wrapper calls whose launches are compiled. The default set has every
    kernel, each flag both ways, every student x teacher dtype mix (fp32 / bf16 / fp16 each) at the
    largest tile, masks of every dtype, fp8, odd V, misaligned rows, KP = 2 and 4, every k of
    combine and the estimates' cases; `full` is the whole matrix (dtype pairs x V x flags x
    alignment; k x dtype x table size x alignment)."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    if full:
        pairs = [(s, t) for s in (f32, bf16, f16) for t in (f32, bf16, f16)] + [
            (bf16, e4), (bf16, e5), (e4, bf16), (e5, e5)]
        flags = [(mono, mask, detach) for mono in (True, False) for mask in (False, True)
                 for detach in ((True,) if mono else (True, False))]
        kl = [(ds, dt, v, *f, mis) for ds, dt in pairs for v in (V_EST, 1000, 1001, 32000) for f in flags
              for mis in (False, True)]
        kl += [(ds, dt, v, True, mask, True, False, beta) for ds, dt in pairs for v in (V_EST, 1001)
               for mask in (False, True) for beta in (0.0, 0.5)]
    else:  # every student x teacher dtype mix the wrappers accept, at the widest tile (V_EST), four-term
        # (4 rows: the register-heavy case) with and without a mask; monolithic per dtype; masks of every dtype (they share the bool launches)
        mixes = [(s, t) for s in (f32, bf16, f16) for t in (f32, bf16, f16)]
        kl = [(ds, dt, V_EST, mono, mask, True, False) for ds, dt in mixes
              for mono, mask in ((False, False), (False, True), (True, False)) if ds == dt or not mono]
        kl += [(bf16, bf16, V_EST, False, m, True, False) for m in MASK_DTYPES]
        kl += [(f16, f32, 1001, True, True, True, False), (bf16, e4, V_EST, False, True, False, False),
               (f32, f32, 1000, False, False, True, True)]
        # the monolithic mode's other divergences (forward KL, JSD: a second pass), every dtype, one mixed pair
        kl += [(d, d, V_EST, True, mask, True, False, beta) for d in (f32, bf16, f16) for beta in (0.0, 0.5)
               for mask in (False, True)] + [(f32, f16, 1001, True, True, True, False, 0.5)]
    for a in kl:
        yield _kl_label(*a), (lambda a=a: _kl_call(*a))
    # Tables: one tensor, a few, the Qwen3-VL-2B list (n_params tensors), thousands.
    sizes = {1: [4097], 7: [3, 5, 4096, 1, 17, 65536, 9], n_params: [3 + j % 61 for j in range(n_params)]}
    if full:
        sizes[4096] = [1 + j % 13 for j in range(4096)]
        combos = [(k, d, n, al) for k in (1, 2, 3, 4) for d in (f32, bf16, f16) for n in sizes for al in (True, False)]
    else:
        combos = [(2, f32, n_params, True), (3, bf16, n_params, True), (4, f16, 7, False), (1, f32, 1, True)]
    for k, d, n, al in combos:
        yield (f"gram+combine k={k} {_dtype_name(d)} {n} tensors{'' if al else ' misaligned'}",
               lambda a=(k, d, sizes[n], al): _steering_call(*a))


def record(full: bool, n_params: int, target_names: Sequence[str]) -> Tuple[int, List["Spec"]]:
    """(launches recorded, their specialisations per target). Each call's launches are bound right
    away, so no call's tensors outlive it (the full matrix would otherwise hold tens of GB)."""
    launches: List[Launch] = []
    specs: Dict[tuple, Spec] = {}
    label, n = [""], 0
    with recording(launches, lambda: label[0]):
        for label[0], call in calls(full, n_params):
            call()
            n += len(launches)
            bind(launches, target_names, specs)
            launches.clear()
    return n, list(specs.values())


# ----------------------------------------------------------------------------- 2. binding


@dataclass
class Spec:
    """One specialisation to compile for one target (duplicates merged: `cases` lists every call)."""

    kernel: str
    target: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    fn: object
    cases: List[str] = field(default_factory=list)

    def describe(self) -> str:
        """Constexpr flags and pointer dtypes: what distinguishes this specialisation."""
        names = [p.name for p in self.fn.params]
        consts = {names[k[0]]: v for k, v in self.constexprs.items() if len(k) == 1}
        ptrs = sorted({t.lstrip("*") for t in self.signature.values() if t.startswith("*")})
        div16 = sum(1 for v in self.attrs.values() if any(a[0] == "tt.divisibility" for a in v))
        n_args = sum(1 for t in self.signature.values() if t != "constexpr")
        flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in consts.items()
                         if isinstance(v, (bool, int)))
        return f"{flags} ptrs={'/'.join(ptrs)} div16-args={div16}/{n_args} warps={self.options.num_warps}"


@functools.lru_cache(maxsize=None)
def _binder(fn, tname: str):
    """(backend, binder) of a kernel for a target: what JITFunction.create_binder makes for the
    current device, made for the named target instead."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target(tname))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def bind(launches: Sequence[Launch], target_names: Sequence[str], specs: Dict[tuple, Spec]) -> None:
    """Triton's binder and argument packing for each launch and target (what JITFunction.run does
    before it compiles), added to `specs` under the key its kernel cache uses (duplicates merge)."""
    from triton import knobs
    from triton.runtime.jit import compute_cache_key

    for tname in target_names:
        for ln in launches:
            fn = ln.kernel
            kwargs = dict(ln.kwargs)
            kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
            backend, binder = _binder(fn, tname)
            bound, specialization, options = binder(*ln.args, **kwargs)
            key = (tname, fn.__name__, compute_cache_key({}, specialization, options))
            if key not in specs:
                options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
                specs[key] = Spec(fn.__name__, tname, signature, constexprs, attrs, options, fn)
            if ln.case not in specs[key].cases:
                specs[key].cases.append(ln.case)


# ----------------------------------------------------------------------------- 3. compile + read


@dataclass
class Result:
    kernel: str
    target: str
    specialisation: str
    cases: List[str]
    status: str                      # ok | spill | error | rejected (unsupported dtype, as expected)
    error: str = ""
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    loads_vector: Optional[int] = None   # global loads in the hot loop that are vectorised ...
    loads_total: Optional[int] = None    # ... out of all of them
    loop_instructions: Optional[int] = None
    elems_per_iteration: Optional[float] = None  # per thread: BLOCK / (warps x warp size)
    seconds: float = 0.0

    @property
    def instr_per_elem(self) -> Optional[float]:
        if self.loop_instructions is None or not self.elems_per_iteration:
            return None
        return self.loop_instructions / self.elems_per_iteration

    @property
    def vectorised(self) -> str:
        if not self.loads_total:
            return "–"
        return "yes" if self.loads_vector == self.loads_total else ("partly" if self.loads_vector else "no")


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name.replace("-", "_")).path


def _innermost_loops(spans: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Loops (first, last line/address of the body) that contain no other loop."""
    return [(a, b) for a, b in spans if not any((a, b) != (c, d) and a <= c and d <= b for c, d in spans)]


def _hot_loop(spans: List[Tuple[int, int]], loads: List[Tuple[int, int]],
              n_instr: Callable[[int, int], int]) -> Optional[Tuple[int, int]]:
    """The steady-state loop: among the loops with global loads (`loads`: (position, bytes)), the
    innermost ones (a loop without loads nested inside, e.g. an AMD waterfall loop, counts as part
    of its parent); of those, the one loading the most bytes per iteration, and of equals (a body
    and its masked tail handle the same BLOCK) the one with the fewest instructions."""
    nbytes = lambda a, b: sum(n for pos, n in loads if a <= pos <= b)  # noqa: E731
    inner = _innermost_loops([s for s in spans if nbytes(*s) > 0])
    return max(inner, key=lambda s: (nbytes(*s), -n_instr(*s))) if inner else None


_PTX_LOAD = re.compile(r"\bld\.global(\S*)")


def _ptx_bytes(suffix: str) -> int:
    lanes = re.search(r"\.v([248])\b", suffix)
    bits = re.findall(r"\.[bfsu](\d+)", suffix)
    return (int(lanes.group(1)) if lanes else 1) * (int(bits[-1]) if bits else 32) // 8


def ptx_loop_loads(ptx: str) -> Tuple[int, int]:
    """(vectorised, total) global loads in the hot loop of a PTX listing (a load is vectorised when
    it moves >= 8 bytes per thread: .v2/.v4, or a 64/128-bit scalar)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\$L__\w+):", ln))}
    spans = [(labels[m.group(1)], i) for i, ln in enumerate(lines)
             if (m := re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", ln)) and labels.get(m.group(1), i + 1) <= i]
    loads = [(i, _ptx_bytes(m.group(1))) for i, ln in enumerate(lines) if (m := _PTX_LOAD.search(ln))]
    is_instr = [bool(ln.strip()) and not ln.lstrip().startswith(("$", "//", ".", "{", "}")) for ln in lines]
    hot = _hot_loop(spans, loads, lambda a, b: sum(is_instr[a:b + 1]))
    if hot is None:
        return 0, 0
    inside = [n for i, n in loads if hot[0] <= i <= hot[1]]
    return sum(n >= 8 for n in inside), len(inside)


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_SASS_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def sass_loop_instructions(sass: str) -> Optional[int]:
    """Instructions in the hot loop of a cuobjdump -sass listing (backward branches are loops)."""
    ins = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _SASS.finditer(sass)]
    spans = []
    for addr, op, operands in ins:
        t = re.match(r"\s*`?\(?(?:\.L_x_\d+|0x([0-9a-f]+))", operands) if op.startswith("BRA") else None
        if t and t.group(1) and int(t.group(1), 16) <= addr:
            spans.append((int(t.group(1), 16), addr))
    loads = [(x, next((n for k, n in _SASS_BYTES.items() if k in op.split(".")), 4))
             for x, op, _ in ins if op.startswith("LDG")]
    count = lambda a, b: sum(1 for x, _, _ in ins if a <= x <= b)  # noqa: E731
    hot = _hot_loop(spans, loads, count)
    return None if hot is None else count(*hot)


_AMD_LOAD = re.compile(r"^\s*(?:global|buffer)_load_(\w+)")
_AMD_INSTR = re.compile(r"^\s+[a-z][a-z0-9_]+(?:\s|$)")
_AMD_BYTES = {"dwordx4": 16, "b128": 16, "dwordx3": 12, "b96": 12, "dwordx2": 8, "b64": 8, "dword": 4, "b32": 4,
              "ushort": 2, "sshort": 2, "short_d16": 2, "short_d16_hi": 2, "u16": 2, "i16": 2, "ubyte": 1, "sbyte": 1,
              "u8": 1, "i8": 1}


def amdgcn_loop(asm: str) -> Tuple[int, int, Optional[int]]:
    """(vectorised loads, loads, instructions) of the hot loop of an AMDGCN listing."""
    lines = asm.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\.LBB\w+):", ln))}
    spans = [(labels[m.group(1)], i) for i, ln in enumerate(lines)
             if (m := re.search(r"\bs_(?:cbranch_\w+|branch)\s+(\.LBB\w+)", ln)) and labels.get(m.group(1), i + 1) <= i]
    loads = [(i, _AMD_BYTES.get(m.group(1), 4)) for i, ln in enumerate(lines) if (m := _AMD_LOAD.match(ln))]
    is_instr = [bool(_AMD_INSTR.match(ln)) and not ln.strip().startswith(".") for ln in lines]
    count = lambda a, b: sum(is_instr[a:b + 1])  # noqa: E731
    hot = _hot_loop(spans, loads, count)
    if hot is None:
        return 0, 0, None
    inside = [n for i, n in loads if hot[0] <= i <= hot[1]]
    return sum(n >= 8 for n in inside), len(inside), count(*hot)


def _elems_per_iteration(spec: Spec) -> Optional[float]:
    """Columns one thread handles per hot-loop iteration: BLOCK / (warps x warp size)."""
    names = [p.name for p in spec.fn.params]
    block = next((v for k, v in spec.constexprs.items() if len(k) == 1 and names[k[0]] == "BLOCK"), None)
    if block is None:
        return None
    return block / (spec.options.num_warps * TARGET_SPECS[spec.target][2])


def compile_spec(spec: Spec) -> Result:
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    from vgs_kernels.ops.targets import unsupported_type

    res = Result(spec.kernel, spec.target, spec.describe(), spec.cases, "ok")
    tgt = target(spec.target)
    rejected = [r for t in spec.signature.values() if t.startswith("*")
                if (r := unsupported_type(t.lstrip("*"), tgt))]
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            k = triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs), target=tgt,
                               options=spec.options.__dict__)
    except Exception as e:  # noqa: BLE001 - every compiler failure is reported, not raised
        res.seconds = time.perf_counter() - t0
        res.status = "rejected" if rejected else "error"
        res.error = rejected[0] if rejected else f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        return res
    res.seconds = time.perf_counter() - t0
    if rejected:
        res.status, res.error = "error", (f"compiled, but vgs_kernels.ops.targets rejects it: {rejected[0]}")
    res.shared_bytes = k.metadata.shared
    res.elems_per_iteration = _elems_per_iteration(spec)
    if tgt.backend == "cuda":
        text = log.getvalue()
        if (m := re.search(r"Used (\d+) registers", text)):
            res.registers = int(m.group(1))
        res.spill_bytes = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
        res.loads_vector, res.loads_total = ptx_loop_loads(k.asm["ptx"])
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
        res.loop_instructions = sass_loop_instructions(sass)
    else:
        asm = k.asm["amdgcn"]
        num = lambda pat: int(m.group(1)) if (m := re.search(pat, asm)) else 0  # noqa: E731
        res.registers = num(r"; NumVgprs: (\d+)")
        res.spill_bytes = 4 * (num(r"\.vgpr_spill_count:\s+(\d+)") + num(r"\.sgpr_spill_count:\s+(\d+)")) + num(
            r"; ScratchSize: (\d+)")
        res.loads_vector, res.loads_total, res.loop_instructions = amdgcn_loop(asm)
    if res.status == "ok" and res.spill_bytes:
        res.status = "spill"
    return res


# ----------------------------------------------------------------------------- 4. estimates + report


_SPECS: List[Spec] = []  # what forked workers compile (by index: specs hold JITFunctions)


def _compile_index(i: int) -> Result:
    return compile_spec(_SPECS[i])


def compile_all(specs: Sequence[Spec], jobs: int) -> List[Result]:
    """compile_spec over `specs`, in `jobs` forked processes (ptxas and the MLIR passes are
    CPU-bound), printing progress to stderr."""
    _SPECS[:] = specs
    results: List[Result] = []
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(jobs))
            it = pool.imap(_compile_index, range(len(specs)))
        else:
            it = map(_compile_index, range(len(specs)))
        for spec, res in zip(specs, it):
            results.append(res)
            print(f"\r[{len(results)}/{len(specs)}] {spec.target} {spec.kernel:24s}", end="", file=sys.stderr,
                  flush=True)
    print(file=sys.stderr)
    return results


def _qwen_params() -> Tuple[int, int]:
    """(tensors, parameters) of Qwen3-VL-2B (meta device: no weights)."""
    try:
        from .suite_steering import qwen3_vl_2b_shapes
    except ImportError:  # run as a file
        from suite_steering import qwen3_vl_2b_shapes
    shapes = qwen3_vl_2b_shapes(1)
    return len(shapes), sum(math.prod(s) for s in shapes)


def estimates(results: Sequence[Result], n_params: int, n_elems: int) -> List[dict]:
    """Per pass and in total, for the issue's two workloads: the issue-bound time (hot-loop
    instructions per element x elements / issue rate) next to the memory-traffic floor (minimal
    bytes / datasheet bandwidth); max_bw_fraction = floor / max(issue, floor) is the largest
    fraction of peak bandwidth the instruction count allows."""
    from vgs_kernels.ops.decomposed_kl import min_bytes

    bf16, kl_elems = torch.bfloat16, N_EST * V_EST
    kl_case = f"decomposed_kl s=bfloat16 t=bfloat16 V={V_EST}"
    st_case = f"gram+combine k=2 float32 {n_params} tensors"
    work = [  # (workload, [(pass, kernel, case, elements, minimal bytes)])
        (f"decomposed_kl N={N_EST} V={V_EST} bf16", [
            ("forward", "_kl_forward_kernel", kl_case, kl_elems, min_bytes(N_EST, V_EST, bf16, bf16, "forward")),
            ("backward", "_kl_backward_kernel", kl_case, kl_elems, min_bytes(N_EST, V_EST, bf16, bf16, "backward"))]),
        (f"gram+combine k=2 fp32 Qwen3-VL-2B ({n_params} tensors, {n_elems / 1e9:.2f} B params)", [
            ("gram", "_gram_kernel", st_case, n_elems, 2 * 4 * n_elems),
            ("combine", "_combine_kernel", st_case, n_elems, 3 * 4 * n_elems)]),
    ]
    rows = []
    for name, parts in work:
        for tname, dev in DEVICES.items():
            picked = [next((r for r in results if r.target == tname and r.kernel == kern and case in r.cases), None)
                      for _, kern, case, _, _ in parts]
            if any(r is None or r.instr_per_elem is None for r in picked):
                continue
            total = {"issue_ms": 0.0, "memory_floor_ms": 0.0, "bound_ms": 0.0, "instr_per_elem": 0.0}
            for (pass_, _, _, elems, nbytes), r in zip(parts, picked):
                issue = elems * r.instr_per_elem / (dev.lanes_per_clk * dev.units * dev.clock_hz) * 1e3
                floor = nbytes / dev.mem_bw * 1e3
                row = {"instr_per_elem": r.instr_per_elem, "issue_ms": issue, "memory_floor_ms": floor,
                       "bound_ms": max(issue, floor)}
                for k in total:
                    total[k] += row[k]
                rows.append({"workload": f"{name}: {pass_}", "target": tname, "device": dev.name, **row})
            rows.append({"workload": f"{name}: total", "target": tname, "device": dev.name, **total})
    for r in rows:
        r["instr_per_elem"] = round(r["instr_per_elem"], 2)
        r["max_bw_fraction"] = round(r["memory_floor_ms"] / r["bound_ms"], 3)
        r["bound"] = "issue" if r["issue_ms"] > r["memory_floor_ms"] else "memory"
    return rows


def summarise(results: Sequence[Result]) -> List[dict]:
    """Per kernel and target: the worst specialisation of each figure."""
    out = []
    kernels, targets = list(dict.fromkeys(r.kernel for r in results)), list(TARGET_SPECS)
    for key in sorted(dict.fromkeys((r.kernel, r.target) for r in results),
                      key=lambda kt: (targets.index(kt[1]), kernels.index(kt[0]))):
        rs = [r for r in results if (r.kernel, r.target) == key]
        ok = [r for r in rs if r.registers is not None]
        ipe = [r.instr_per_elem for r in ok if r.instr_per_elem is not None]
        out.append({
            "kernel": key[0], "target": key[1], "specialisations": len(rs),
            "failed": sum(r.status in ("error", "spill") for r in rs),
            "rejected": sum(r.status == "rejected" for r in rs),
            "registers": f"{min(r.registers for r in ok)}–{max(r.registers for r in ok)}" if ok else "–",
            "spill_bytes": max((r.spill_bytes or 0 for r in ok), default=0),
            "shared_bytes": max((r.shared_bytes or 0 for r in ok), default=0),
            "vectorised": f"{sum(r.vectorised == 'yes' for r in ok)}/{sum(bool(r.loads_total) for r in ok)}",
            "instr_per_elem": f"{min(ipe):.1f}–{max(ipe):.1f}" if ipe else "–",
        })
    return out


def _table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown(results: Sequence[Result], est: Sequence[dict], header: str) -> str:
    parts = [header, "### per kernel (worst specialisation; vectorised = specs whose hot-loop loads are all "
             "vectorised / specs with loads)\n",
             _table(summarise(results), ["kernel", "target", "specialisations", "failed", "rejected", "registers",
                                          "spill_bytes", "shared_bytes", "vectorised", "instr_per_elem"])]
    if est:
        parts += ["\n### issue-bound time vs memory-traffic floor (datasheet clocks and bandwidths)\n",
                  _table(est, ["workload", "target", "device", "instr_per_elem", "issue_ms", "memory_floor_ms",
                               "max_bw_fraction", "bound"])]
    parts += ["\n### every specialisation\n",
              _table([{**asdict(r), "instr_per_elem": r.instr_per_elem, "vectorised": r.vectorised,
                       "loads": f"{r.loads_vector}/{r.loads_total}" if r.loads_total is not None else "–",
                       "cases": len(r.cases), "error": r.error[:120]} for r in results],
                     ["kernel", "target", "specialisation", "status", "registers", "spill_bytes", "shared_bytes",
                      "loads", "vectorised", "instr_per_elem", "cases", "error"])]
    return "\n".join(parts) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compile_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", default=os.environ.get("VGS_COMPILE_FULL", "0") == "1",
                   help="the whole matrix (default: the representative subset; env VGS_COMPILE_FULL=1)")
    p.add_argument("--targets", default=",".join(TARGET_SPECS),
                   help="comma-separated from %s (default: all)" % ",".join(TARGET_SPECS))
    p.add_argument("--out", default=os.path.join("bench_out", "compile"), help="output directory (default: %(default)s)")
    p.add_argument("--kernels", default="", help="compile only kernels whose name contains one of these "
                   "comma-separated words (e.g. gram,combine); default: all")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="compiler processes (default: %(default)s)")
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    bad = [t for t in args.targets if t not in TARGET_SPECS]
    if bad:
        p.error(f"unknown target(s) {bad}; choose from {list(TARGET_SPECS)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import triton
    from triton import knobs
    from triton.runtime.jit import JITFunction

    kl_module = importlib.import_module("vgs_kernels.ops.decomposed_kl")
    if not isinstance(kl_module._kl_forward_kernel, JITFunction):
        print("compile_report needs TRITON_INTERPRET=0 (the kernels are interpreter functions)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    n_params_tensors, n_elems = _qwen_params()
    n_launches, specs = record(args.full, n_params_tensors, args.targets)
    words = [w for w in args.kernels.split(",") if w]
    specs = [sp for sp in specs if not words or any(w in sp.kernel for w in words)]
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: ptxas runs (and logs) for every spec
        with knobs.cache.scope():
            knobs.cache.dir = cache
            results = compile_all(specs, args.jobs)
    est = estimates(results, n_params_tensors, n_elems)
    header = (f"# Triton compile report — triton {triton.__version__}, torch {torch.__version__}, "
              f"{'full matrix' if args.full else 'representative subset'}\n\n"
              f"{n_launches} launches recorded from the wrappers -> {len(specs)} specialisations "
              f"compiled for {', '.join(args.targets)} in {time.perf_counter() - t0:.0f} s. "
              f"Estimates use datasheet figures: "
              + "; ".join(f"{t}: {d.name} {d.units} units x {d.lanes_per_clk} lanes/clk at {d.clock_hz / 1e9:.2f} GHz, "
                          f"{d.mem_bw / 1e12:.2f} TB/s" for t, d in DEVICES.items() if t in args.targets) + ".\n")
    text = markdown(results, est, header)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compile_report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "compile_report.json"), "w") as f:
        json.dump({"results": [{**asdict(r), "instr_per_elem": r.instr_per_elem, "vectorised": r.vectorised}
                               for r in results], "estimates": est, "targets": args.targets, "full": args.full},
                  f, indent=1)
    bad = [r for r in results if r.status in ("error", "spill")]
    for r in bad:
        print(f"FAILED {r.target} {r.kernel} [{r.specialisation}] {r.status}: "
              f"{r.error or f'{r.spill_bytes} bytes spilled'} (e.g. {r.cases[0]})", file=sys.stderr)
    print(f"wrote {args.out}/compile_report.md, compile_report.json", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
