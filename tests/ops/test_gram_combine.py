"""gram / combine kernels (C++, Triton under the interpreter, GPU at realistic sizes) against the
plain-torch references: many tensors of odd sizes, mixed dtypes, empty, non-contiguous, None."""
import re

import pytest
import torch

from vgs_kernels.ops.backend import HAS_CPP, HAS_TRITON
from vgs_kernels.ops.combine import combine, combine_reference
from vgs_kernels.ops.gram import gram, gram_reference

CUDA = torch.cuda.is_available()
BACKENDS = [pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")),
            pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]
# Relative tolerance of combine's output per dtype: the fp32 sum may differ from the reference's
# in the last fp32 bit, which can flip one rounding of the stored value (1 ulp of the dtype).
ULP = {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def make_lists(k, specs, seed=0, none=(), device="cpu", scale=1.0):
    """k lists over parameters given as (shape, dtype, layout); layout: "c" contiguous, "o" a
    contiguous view at an odd element offset (fast path, not 16-byte aligned), "t" a transposed
    dense view (fast path), "s" a strided slice (reference path), "mix" components with different
    strides (reference path). `none`: (component, parameter) pairs set to None."""
    g = torch.Generator().manual_seed(seed)
    lists = [[] for _ in range(k)]
    for j, (shape, dtype, layout) in enumerate(specs):
        for i in range(k):
            if layout in ("c", "o") or (layout == "mix" and i % 2 == 0):
                t = torch.randn(shape, generator=g)
            elif layout in ("t", "mix"):
                t = torch.randn(shape[::-1], generator=g).t()
            elif layout == "s":
                t = torch.randn(shape[0], 2 * shape[1], generator=g)[:, ::2]
            if layout == "o":
                n = torch.Size(shape).numel()
                t = (scale * torch.randn(n + 1, generator=g)).to(device=device, dtype=dtype)[1:].view(shape)
            else:
                t = (scale * t).to(device=device, dtype=dtype)
            lists[i].append(None if (i, j) in none else t)
    return lists


ODD = [((3, 5), torch.float32, "c"), ((0,), torch.float32, "c"), ((1,), torch.bfloat16, "c"),
       ((257,), torch.float16, "c"), ((31, 17), torch.float32, "t"), ((9, 4), torch.float32, "s"),
       ((6, 10), torch.bfloat16, "mix"), ((1023,), torch.bfloat16, "c"), ((2, 0, 3), torch.float16, "c"),
       ((77,), torch.float32, "c"), ((5, 5), torch.float64, "c"), ((3, 11), torch.bfloat16, "o")]


def assert_gram_close(G, ref, rtol=1e-5):
    scale = ref.diagonal().clamp_min(1e-30).sqrt()
    err = (G - ref).abs() / scale.outer(scale)  # error relative to |g_a| |g_b|
    assert G.dtype == torch.float32 and G.shape == ref.shape
    assert err.max() <= rtol, f"max relative error {err.max():.3g}\n{G}\n{ref}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_gram_matches_reference(backend, k):
    lists = make_lists(k, ODD, seed=k, none={(k - 1, 0), (0, 3), (k - 1, 7)})
    ref = gram_reference(lists)
    assert_gram_close(gram(lists, backend=backend), ref)
    assert torch.equal(ref, ref.T)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_combine_matches_reference(backend, k):
    lists = make_lists(k, ODD, seed=10 + k, none={(0, 0), (k - 1, 3)} | {(i, 9) for i in range(k)})
    coeffs = torch.tensor([0.7, -1.3, 2.1, 0.01][:k])
    spec_out = make_lists(1, ODD, seed=99)[0]  # garbage initial values, own layouts
    out, expected = [t.clone() for t in spec_out], [t.clone() for t in spec_out]
    combine(out, lists, coeffs, backend=backend)
    combine_reference(expected, lists, coeffs)
    for o, e, (_, dtype, _) in zip(out, expected, ODD):
        torch.testing.assert_close(o, e, rtol=ULP.get(dtype, 1e-12), atol=1e-6)
    assert torch.count_nonzero(out[9]) == 0  # no component: zeros


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_in_place_into_first_component(backend):
    """out is g_0 itself (the .grad that holds the first component)."""
    specs = [((4, 3), torch.float32, "c"), ((300,), torch.bfloat16, "c"), ((5, 6), torch.float32, "t")]
    lists = make_lists(3, specs, seed=3)
    coeffs = torch.tensor([0.5, 2.0, -0.25])
    expected = [t.clone() for t in lists[0]]
    combine_reference(expected, lists, coeffs)
    combine(lists[0], lists, coeffs, backend=backend)
    for o, e, (_, dtype, _) in zip(lists[0], expected, specs):
        torch.testing.assert_close(o, e, rtol=ULP[dtype], atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_chunk_tensor(backend):
    """A tensor larger than one work item (65536 elements) next to small ones."""
    specs = [((70_001,), torch.float32, "c"), ((3,), torch.float32, "c"), ((300, 230), torch.bfloat16, "c")]
    lists = make_lists(2, specs, seed=5, none={(1, 1)})
    assert_gram_close(gram(lists, backend=backend), gram_reference(lists))
    coeffs = torch.tensor([0.3, -1.5])
    out, expected = [torch.empty_like(t) for t in lists[0]], [torch.empty_like(t) for t in lists[0]]
    combine(out, lists, coeffs, backend=backend)
    combine_reference(expected, lists, coeffs)
    for o, e, (_, dtype, _) in zip(out, expected, specs):
        torch.testing.assert_close(o, e, rtol=ULP[dtype], atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_empty_inputs(backend):
    assert torch.equal(gram([[], []], backend=backend), torch.zeros(2, 2))
    assert torch.equal(gram([[torch.zeros(0)], [None]], backend=backend), torch.zeros(2, 2))
    combine([], [[], []], torch.tensor([1.0, 2.0]), backend=backend)  # no parameters: a no-op


def test_gram_inf_propagates():
    """An overflowed component makes the Gram non-finite (the hook relies on it)."""
    lists = make_lists(2, [((10,), torch.float16, "c"), ((4,), torch.float32, "c")], seed=1)
    lists[1][0][3] = float("inf")
    for backend in ("cpp", "reference") if HAS_CPP else ("reference",):
        G = gram(lists, backend=backend)
        assert torch.isinf(G[1, 1]) and torch.isfinite(G[0, 0])


def test_bad_input_errors():
    a = [torch.randn(3), torch.randn(2, 2)]
    with pytest.raises(ValueError, match="1..4 gradient lists"):
        gram([a] * 5)
    with pytest.raises(ValueError, match=r"grad_lists\[1\] has 1 tensors"):
        gram([a, a[:1]])
    with pytest.raises(ValueError, match=r"grad_lists\[1\]\[1\] has shape \(4,\)"):
        gram([a, [torch.randn(3), torch.randn(4)]])
    with pytest.raises(TypeError, match="floating-point"):
        gram([[torch.ones(3, dtype=torch.int64)], [None]])
    with pytest.raises(TypeError, match="sequence of k gradient lists"):
        gram(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"coeffs must be a float tensor of shape \[2\]"):
        combine([torch.empty(3), torch.empty(2, 2)], [a, a], torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"out_tensors\[1\] has shape \(4,\)"):
        combine([torch.empty(3), torch.empty(4)], [a, a], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="backend"):
        gram([a, a], backend="cuda")


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_opcheck_cpp_ops():
    lists = make_lists(2, [((3, 5), torch.float32, "c"), ((7,), torch.bfloat16, "c"), ((2,), torch.float16, "c")],
                       seed=2, none={(1, 1)})
    flat = lists[0] + lists[1]
    torch.library.opcheck(torch.ops.vgs_kernels.gram.default, (flat, 2))
    out = [torch.empty_like(t) for t in lists[0]]
    torch.library.opcheck(torch.ops.vgs_kernels.combine_.default, (out, flat, torch.tensor([0.5, 1.5])))


# ----------------------------------------------------------------------------- GPU (Triton)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_gpu_realistic(k, dtype):
    """~30 M parameters in 25 tensors of odd sizes (a Qwen-like layer mix), one dtype or mixed."""
    shapes = [(151_936 // 8, 256), (1536,), (1536, 1536), (1536, 257), (8960, 1536 // 4)] * 5
    specs = [(s, dtype if j % 5 else torch.float32, "o" if j == 7 else "c") for j, s in enumerate(shapes)]
    lists = make_lists(k, specs, seed=k, none={(k - 1, 3)}, device="cuda", scale=1e-3)
    assert_gram_close(gram(lists, backend="triton"), gram_reference(lists))
    coeffs = torch.tensor([0.41, 0.82, 0.004, -0.1][:k], device="cuda")
    out = [torch.empty_like(t) for t in lists[0]]
    combine(out, lists, coeffs, backend="triton")
    expected = [torch.empty_like(t) for t in lists[0]]
    combine_reference(expected, lists, coeffs)
    for o, e, (_, dt, _) in zip(out, expected, specs):
        torch.testing.assert_close(o, e, rtol=ULP[dt], atol=1e-9)
    combine(lists[0], lists, coeffs, backend="triton")  # in place into g_0
    for o, e in zip(lists[0], expected):
        torch.testing.assert_close(o, e, rtol=ULP[dtype], atol=1e-9)


# ----------------------------------------------------------------------------- per-call overhead path


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_checked_ops_route_odd_layouts_to_reference():
    """The C++ *_checked ops take the caller's lists as they are and hand back what they cannot
    read as one flat range (float64, strided, strides differing between components)."""
    x = lambda *s: torch.randn(*s)  # noqa: E731
    lists = [[x(3, 5), x(4, 6).t(), x(9, 8)[:, ::2], x(6, 10), x(5, 5).double(), None, x(7)],
             [x(3, 5), x(4, 6).t(), x(9, 8)[:, ::2], x(10, 6).t(), x(5, 5).double(), x(2), x(7)]]
    flat = lists[0] + lists[1]
    G, rest = torch.ops.vgs_kernels.gram_checked(flat, 2)
    assert rest.tolist() == [2, 3, 4]  # strided, mixed strides, float64
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.vgs_kernels.gram_checked.default, (flat, 2), test_utils=checks)
    assert_gram_close(gram(lists), gram_reference(lists))
    out = [torch.empty_like(t) for t in lists[1]]  # (keeps the transposed layout)
    rest = torch.ops.vgs_kernels.combine_checked_(out, flat, torch.tensor([0.5, 2.0]))
    assert rest.tolist() == [2, 3, 4]
    combine(out, lists, torch.tensor([0.5, 2.0]))
    want = [torch.empty_like(o) for o in out]
    combine_reference(want, lists, torch.tensor([0.5, 2.0]))
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_nothing_is_cached_across_replaced_or_reallocated_grads():
    """Nothing about the tensors outlives a call: a .grad replaced by a new tensor, reallocated
    in place (set_ / resize_), or re-laid-out between calls is read as it is now."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((4, 6), (9,), (3, 3))]
    comps = [[torch.randn(p.shape) for p in params] for _ in range(2)]
    coeffs = torch.tensor([0.25, 1.5])

    def check():
        lists = [[p.grad for p in params], comps[1]]
        assert_gram_close(gram(lists), gram_reference(lists))
        want = [0.25 * g + 1.5 * v for g, v in zip(lists[0], lists[1])]
        combine([p.grad for p in params], lists, coeffs)
        for p, w in zip(params, want):
            torch.testing.assert_close(p.grad, w)

    for p, g in zip(params, comps[0]):
        p.grad = g.clone()
    check()
    params[0].grad = torch.randn(4, 6)                     # replaced
    check()
    params[1].grad.set_(torch.randn(9))                    # same object, new storage
    check()
    params[2].grad.resize_(9).normal_()                    # same object and storage, new shape
    comps[1][2] = torch.randn(9)
    check()
    params[0].grad = torch.randn(6, 4).t()                 # now transposed: not the same layout as comps
    check()


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_fast_path_errors_name_the_argument():
    a = [torch.randn(3), torch.randn(2, 2)]
    with pytest.raises(ValueError, match=r"grad_lists\[1\]\[1\] has shape \(4,\)"):
        gram([a, [torch.randn(3), torch.randn(4)]])
    with pytest.raises(ValueError, match=r"out_tensors\[1\] has shape \(4,\)"):
        combine([torch.empty(3), torch.empty(4)], [a, a], torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"grad_lists\[0\]\[1\] must be a Tensor or None"):
        gram([[torch.randn(3), "x"], a])
    with pytest.raises(TypeError, match="floating-point"):
        gram([[torch.ones(3, dtype=torch.int64)], [torch.ones(3, dtype=torch.int64)]])


SPILL_CHECK = """
import importlib, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
gram_mod = importlib.import_module("vgs_kernels.ops.gram")  # (vgs_kernels.ops.gram is also the function)
for spec in sys.argv[1:]:
    arch, dtype, kp, steps = spec.split(",")
    arch, kp, steps = int(arch), int(kp), int(steps)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "ptxas-blackwell" if arch >= 90 else "ptxas")
    if not os.access(ptxas, os.X_OK):
        print("SKIP", ptxas)
        continue
    consts = dict(KP=kp, ROW=kp + 2, STEPS=steps, ALIGNED=True, BLOCK=4096 // (kp * kp))
    sig = {"table": "*i64", "n_rows": "i32", "n_chunks": "i32", "partial": "*fp32", "dtype_ref": dtype,
           **{name: "constexpr" for name in consts}}
    kernel = triton.compile(ASTSource(gram_mod._gram_kernel, sig, consts), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": gram_mod.NUM_WARPS})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    report = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    os.remove(f.name)
    print("SPILLS", spec, max(int(x) for x in re.findall(r"(\\d+) bytes spill stores", report)))
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_gram_kernel_does_not_spill():
    """The aligned Gram specialisations that spilled 8 bytes with 4 warps (sm_80 fp32 and sm_90
    bf16 at KP = 2, sm_90 fp32 at KP = 4), compiled for the GPU without one (Triton's ASTSource +
    ptxas -v from the wheel; sm_90 PTX needs ptxas-blackwell), in a subprocess: this one runs
    Triton under the interpreter, which cannot compile."""
    import os
    import subprocess
    import sys

    specs = ["80,*fp32,2,10", "90,*bf16,2,10", "90,*fp32,4,20"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SPILL_CHECK, *specs], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))).stdout
    found = dict(re.findall(r"SPILLS (\S+) (\d+)", out))
    if not found:
        pytest.skip(out)
    assert all(v == "0" for v in found.values()), out


@pytest.mark.skipif(not (HAS_CPP and HAS_TRITON), reason="needs the C++ extension and triton")
def test_triton_pointer_table_comes_from_the_cpp_classification():
    """vgs_kernels::pointer_table (the Triton path's table) classifies as the C++ kernels do: rows
    grouped by dtype and 16-byte alignment, odd layouts handed back, None as a 0 pointer."""
    x = lambda *s, d=torch.float32: torch.randn(*s).to(d)  # noqa: E731
    odd = x(9)[1:]  # 4-byte aligned only
    a = [x(3, 5), x(4, 6).t(), x(9, 8)[:, ::2], x(7, d=torch.bfloat16), None, odd, x(5).double()]
    b = [x(3, 5), x(4, 6).t(), x(9, 8)[:, ::2], x(7, d=torch.bfloat16), x(2), x(9)[1:], x(5).double()]
    table, groups, rest = torch.ops.vgs_kernels.pointer_table(a + b, 2, [], 2)
    assert rest.tolist() == [2, 6]  # strided, float64
    assert groups.tolist() == [[0, 3, 3, 0], [3, 1, 1, 3], [4, 1, 1, 5]]  # fp32 aligned, bf16, fp32 misaligned
    rows = table.tolist()
    assert rows[0] == [a[0].data_ptr(), b[0].data_ptr(), 15, 0]
    assert rows[1] == [a[1].data_ptr(), b[1].data_ptr(), 24, 1]
    assert rows[2] == [0, b[4].data_ptr(), 2, 2]
    assert rows[4] == [a[5].data_ptr(), b[5].data_ptr(), 8, 0]
    out = [torch.empty_like(t) for t in b]
    table, groups, rest = torch.ops.vgs_kernels.pointer_table(a + b, 2, out, 2)  # combine: + out pointer
    assert rest.tolist() == [2, 6] and table.shape == (5, 5) and table[0, 2] == out[0].data_ptr()


@pytest.mark.skipif(not (HAS_CPP and HAS_TRITON), reason="needs the C++ extension and triton")
def test_triton_path_does_no_python_work_per_tensor(monkeypatch):
    """gram / combine on the Triton path read no tensor's pointer from Python: the count of
    Python-level data_ptr calls (the interpreter's own, for the kernel arguments) does not grow
    with the number of tensors."""
    calls = []
    real = torch.Tensor.data_ptr
    monkeypatch.setattr(torch.Tensor, "data_ptr", lambda self: calls.append(1) or real(self))

    def count(n):
        lists = make_lists(2, [((5,), torch.float32, "c")] * n, seed=n)
        calls.clear()
        G = gram(lists, backend="triton")
        out = [torch.empty_like(t) for t in lists[0]]
        combine(out, lists, torch.tensor([0.5, 2.0]), backend="triton")
        assert_gram_close(G, gram_reference(lists))
        for o, g0, g1 in zip(out, *lists):
            torch.testing.assert_close(o, 0.5 * g0 + 2.0 * g1)
        return len(calls)

    assert count(3) == count(40)
