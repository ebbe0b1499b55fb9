"""Every Triton kernel specialisation the wrappers launch compiles for real GPUs (sm_80, sm_90,
gfx942) without spilling, checked on a CPU-only machine (benchmarks/compile_report.py).

The compile itself runs in a subprocess: the suite sets TRITON_INTERPRET=1 (conftest.py), under
which @triton.jit gives interpreter functions that cannot be compiled. Default set: every dtype mix of
student and teacher (fp32 / bf16 / fp16), masks of every dtype, every flag, fp8, odd V and misaligned
rows (WALL s on the 2-core VM); VGS_COMPILE_FULL=1 compiles the whole matrix (minutes). The report goes to
bench_out/compile/ (or $VGS_COMPILE_OUT) so its figures are visible next to the benchmarks.
"""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:  # installed: vgs_kernels.benchmarks; from a source checkout: the top-level benchmarks/ package
    cr = importlib.import_module("vgs_kernels.benchmarks.compile_report")
except ImportError:
    cr = importlib.import_module("benchmarks.compile_report")

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"_kl_forward_kernel", "_kl_backward_kernel", "_gram_kernel", "_combine_kernel"}

triton = pytest.importorskip("triton")


@pytest.mark.slow
def test_every_launched_specialisation_compiles_for_sm80_sm90_gfx942_without_spills():
    out = Path(os.environ.get("VGS_COMPILE_OUT", ROOT / "bench_out" / "compile"))
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", cr.__name__, "--out", str(out), "--jobs", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    failures = [ln for ln in proc.stderr.splitlines() if ln.startswith("FAILED")]
    assert proc.returncode == 0, "\n".join(failures) or proc.stderr[-3000:]
    report = json.loads((out / "compile_report.json").read_text())
    results = report["results"]
    # Every kernel the wrappers have was launched, bound and compiled for every target.
    assert {(r["kernel"], r["target"]) for r in results} == {(k, t) for k in KERNELS for t in cr.TARGET_SPECS}
    for r in results:
        assert r["status"] in ("ok", "rejected"), r
        if r["status"] == "ok":
            assert r["registers"] > 0 and r["spill_bytes"] == 0 and r["loads_total"] > 0, r
    # Every student x teacher dtype mix, four-term with and without a mask (monolithic per dtype), was
    # compiled for every target (the spill check above covers them: an fp32 student with an fp16
    # teacher once spilled on sm_80 with a tile sized for 2-byte rows).
    names = ("float32", "bfloat16", "float16")
    for kern in ("_kl_forward_kernel", "_kl_backward_kernel"):
        for tgt in cr.TARGET_SPECS:
            cases = {c for r in results if r["kernel"] == kern and r["target"] == tgt for c in r["cases"]}
            for s in names:
                for te in names:
                    base = f"decomposed_kl s={s} t={te} V={cr.V_EST}"
                    assert {base, base + " mask"} | ({base + " mono"} if s == te else set()) <= cases, (kern, tgt, base)
    # The monolithic mode's forward KL and JSD (DIV 1, 2) compiled for every dtype, with and without a mask.
    for kern in ("_kl_forward_kernel", "_kl_backward_kernel"):
        for tgt in cr.TARGET_SPECS:
            cases = {c for r in results if r["kernel"] == kern and r["target"] == tgt for c in r["cases"]}
            for d in names:
                for beta in ("0.0", "0.5"):
                    base = f"decomposed_kl s={d} t={d} V={cr.V_EST} mono"
                    assert {f"{base} beta={beta}", f"{base} mask beta={beta}"} <= cases, (kern, tgt, base, beta)
    # Masks of every dtype reach the kernels as the bool row mask: one specialisation for all.
    mask_case = f"decomposed_kl s=bfloat16 t=bfloat16 V={cr.V_EST} mask"
    for r in results:
        if mask_case in r["cases"]:
            assert {f"{mask_case}={str(d).replace('torch.', '')}" for d in cr.MASK_DTYPES} <= set(r["cases"]), r
    # The fp8 rule of vgs_kernels.ops.targets agrees with the compiler: float8_e4m3fn logits fail
    # to compile for sm_80 (and decomposed_kl rejects them there) but compile for sm_90 and gfx942.
    fp8 = [r for r in results if "fp8e4nv" in r["specialisation"]]
    assert {r["target"] for r in fp8 if r["status"] == "rejected"} == {"sm_80"}
    assert {r["target"] for r in fp8 if r["status"] == "ok"} == {"sm_90", "gfx942"}
    # The issue's estimates are in the report for every target.
    assert {(e["workload"].split()[0], e["workload"].split(": ")[-1], e["target"]) for e in report["estimates"]} == {
        (w, p, t) for w, passes in (("decomposed_kl", ("forward", "backward", "total")),
                                    ("gram+combine", ("gram", "combine", "total")))
        for p in passes for t in cr.TARGET_SPECS}
    assert "issue-bound time vs memory-traffic floor" in (out / "compile_report.md").read_text()


# ----------------------------------------------------------------------------- the readers, on listings


PTX = """
$L__BB0_1:
\tld.global.b32 { %r1 }, [ %rd1 + 0 ];
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
\t@%p2 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd2 + 0 ];
\t@%p3 ld.global.b16 { %rs1 }, [ %rd3 + 0 ];
\tld.global.nc.v2.b32 { %r6, %r7 }, [ %rd4 + 0 ];
\t@%p4 bra $L__BB0_2;
\t@%p5 bra $L__BB0_1;
$L__BB0_3:
\tret;
"""


def test_ptx_hot_loop_loads_counts_vectorised_loads_of_the_innermost_loop():
    assert cr.ptx_loop_loads(PTX) == (2, 3)
    assert cr.ptx_loop_loads("\tld.global.b32 { %r1 }, [ %rd1 + 0 ];\n\tret;") == (0, 0)  # no loop


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0020*/                   FADD R3, R2, R2 ;
        /*0030*/              @!P0 LDG.E.128 R4, desc[UR4][R6.64] ;
        /*0040*/                   FMUL R5, R4, R4 ;
        /*0050*/              @!P0 BRA 0x30 ;
        /*0060*/              @P2 LDG.E R8, desc[UR4][R6.64] ;
        /*0070*/              @P2 LDG.E R9, desc[UR4][R6.64+0x4] ;
        /*0080*/              @P3 LDG.E R10, desc[UR4][R6.64+0x8] ;
        /*0090*/              @P3 LDG.E R11, desc[UR4][R6.64+0xc] ;
        /*00a0*/                   FMUL R5, R8, R9 ;
        /*00b0*/              @!P0 BRA 0x60 ;
        /*00c0*/              @!P1 BRA 0x10 ;
        /*00d0*/                   EXIT ;
        /*00e0*/                   BRA 0xe0;
"""


def test_sass_hot_loop_is_the_cheapest_innermost_loop_loading_the_most_bytes():
    # 0x30..0x50 (one 16-byte load, 3 instructions) beats its masked tail 0x60..0xb0 (four 4-byte
    # loads, 6 instructions); the outer loop 0x10..0xc0 is not innermost; 0xe0 loads nothing.
    assert cr.sass_loop_instructions(SASS) == 3


AMDGCN = """
.LBB0_1:                                ; =>This Loop Header: Depth=1
\tglobal_load_dwordx4 v[0:3], v[4:5], off
\tglobal_load_ushort v6, v[4:5], off
\tv_add_f32_e32 v7, v0, v1
.LBB0_2:                                ; waterfall loop, no loads
\tv_readfirstlane_b32 s4, v8
\ts_cbranch_execnz .LBB0_2
\ts_cbranch_scc1 .LBB0_1
\t.p2align 6
\ts_endpgm
"""


def test_amdgcn_hot_loop_includes_a_nested_loop_without_loads():
    assert cr.amdgcn_loop(AMDGCN) == (1, 2, 6)


# ----------------------------------------------------------------------------- estimates, arguments


def test_estimates_put_issue_time_next_to_the_memory_floor():
    kl = f"decomposed_kl s=bfloat16 t=bfloat16 V={cr.V_EST}"
    st = "gram+combine k=2 float32 625 tensors"
    res = [cr.Result(k, "sm_90", "", [case], "ok", loop_instructions=n, elems_per_iteration=8.0)
           for k, case, n in (("_kl_forward_kernel", kl, 800), ("_kl_backward_kernel", kl, 400),
                              ("_gram_kernel", st, 80), ("_combine_kernel", st, 80))]
    rows = {r["workload"].split()[0] + " " + r["workload"].split(": ")[-1]: r for r in cr.estimates(res, 625, 10 ** 9)}
    h100 = cr.DEVICES["sm_90"]
    issue_rate = h100.lanes_per_clk * h100.units * h100.clock_hz
    fwd, total = rows["decomposed_kl forward"], rows["decomposed_kl total"]
    assert fwd["instr_per_elem"] == 100.0 and total["instr_per_elem"] == 150.0
    assert fwd["issue_ms"] == pytest.approx(cr.N_EST * cr.V_EST * 100 / issue_rate * 1e3)
    assert total["issue_ms"] == pytest.approx(cr.N_EST * cr.V_EST * 150 / issue_rate * 1e3)
    assert fwd["bound"] == "issue" and fwd["max_bw_fraction"] < 1  # 100 instructions per element: too many
    gram, both = rows["gram+combine gram"], rows["gram+combine total"]
    assert gram["memory_floor_ms"] == pytest.approx(2 * 4 * 1e9 / h100.mem_bw * 1e3)
    assert both["memory_floor_ms"] == pytest.approx(5 * 4 * 1e9 / h100.mem_bw * 1e3)
    assert both["bound"] == "memory" and both["max_bw_fraction"] == 1.0


def test_parse_args_rejects_unknown_targets_and_reads_the_full_flag(monkeypatch):
    with pytest.raises(SystemExit):
        cr.parse_args(["--targets", "sm_75"])
    assert not cr.parse_args([]).full
    monkeypatch.setenv("VGS_COMPILE_FULL", "1")
    assert cr.parse_args(["--targets", "sm_90"]).full and cr.parse_args(["--targets", "sm_90"]).targets == ["sm_90"]


# ----------------------------------------------------------------------------- the dtype rule


def test_fp8_rule_follows_triton_per_target():
    from vgs_kernels.ops.targets import triton_type, unsupported_type

    sm80, sm90, gfx942 = (cr.target(t) for t in ("sm_80", "sm_90", "gfx942"))
    assert triton_type(torch.float8_e4m3fn) == "fp8e4nv" and triton_type(torch.bfloat16) == "bf16"
    assert "sm_80" in unsupported_type("fp8e4nv", sm80)
    assert unsupported_type("fp8e4nv", sm90) is None and unsupported_type("fp8e4nv", gfx942) is None
    assert unsupported_type("fp8e5", sm80) is None
    assert all(unsupported_type(t, sm80) is None for t in ("fp32", "bf16", "fp16"))


def test_cpu_fp8_logits_are_not_rejected_by_the_gpu_rule():
    import vgs_kernels as vgs

    s = torch.randn(3, 40)
    a = torch.randn(3, 40).to(torch.float8_e4m3fn)  # the CPU backends read it
    terms = vgs.decomposed_kl(s, None, a, None, backend="reference")
    assert torch.isfinite(terms.std).all()


def test_check_dtype_names_the_argument_and_the_fix(monkeypatch):
    """The device check decomposed_kl runs on CUDA inputs, with the device's target faked."""
    from vgs_kernels.ops import targets as tt

    class Fp8OnCuda:  # the attributes check_dtype reads from a CUDA tensor
        is_cuda, dtype, device = True, torch.float8_e4m3fn, torch.device("cuda", 0)

        def element_size(self):
            return 1

    monkeypatch.setattr(tt, "device_target", lambda device: cr.target("sm_80"))
    with pytest.raises(TypeError, match=r"^b has dtype torch.float8_e4m3fn.*sm_80.*b\.to\(torch\.bfloat16\)"):
        tt.check_dtype("b", Fp8OnCuda())
    monkeypatch.setattr(tt, "device_target", lambda device: cr.target("sm_90"))
    tt.check_dtype("b", Fp8OnCuda())  # sm_90 compiles fp8e4nv: accepted
