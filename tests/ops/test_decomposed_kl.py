"""decomposed_kl: every backend against the plain-torch reference (autograd through log_softmax).

The reference is evaluated in float64 on the same (rounded) inputs, i.e. it is the exact answer.
Tolerances: terms are fp32 whatever the input dtype, so only fp32 accumulation error remains
(atol 1e-5, rtol 2e-5; the fp32 reference itself is ~1e-5 off at V = 151,936, the blocked kernels
~1e-6). Gradients are written in the input dtype: within one rounding of that dtype (rtol 1e-4
fp32, 2e-3 fp16, 1.6e-2 bf16; atol 1e-5).
Triton runs under TRITON_INTERPRET=1 (set by conftest without CUDA) on small shapes.
"""
import math

import pytest
import torch

import vgs_kernels as vgs
from vgs_kernels.ops.backend import HAS_CPP, HAS_TRITON, TRITON_INTERPRET
from vgs_kernels.ops.decomposed_kl import decomposed_kl_reference, kl_backward, kl_forward

CUDA = torch.cuda.is_available()
# Backends that run on CPU tensors here (Triton only under the interpreter; on a CUDA machine the
# gpu-marked tests below cover it).
CPU_TRITON = HAS_TRITON and TRITON_INTERPRET
BACKENDS = ["reference"] + (["cpp"] if HAS_CPP else []) + (["triton"] if CPU_TRITON else [])
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-9}
MODES = ["detached", "prior_grad", "monolithic", "forward_kl", "jsd"]
BETAS = {"forward_kl": 0.0, "jsd": 0.3}  # the monolithic mode's other divergences (TRL's beta)


def mode_kw(mode):
    """(monolithic, the keyword arguments of decomposed_kl and of its reference) of a test mode."""
    mono = mode in ("monolithic", *BETAS)
    return mono, dict(detach_prior=mode != "prior_grad", **({"beta": BETAS[mode]} if mode in BETAS else {}))


def logits(shape, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    g = torch.Generator(device).manual_seed(seed)
    s, u, a, b = (torch.randn(shape, generator=g, dtype=torch.float64, device=device) * scale
                  for _ in range(4))
    a = a + 0.5 * s  # correlated student/teacher, as in distillation
    b = b + 0.5 * u
    return [x.to(dtype) for x in (s, u, a, b)]


def run(fn, s, u, a, b, cot, **kw):
    """Terms and d(sum_k cot_k * term_k)/d(s, u) for a decomposed_kl-like function."""
    s, u = s.detach().requires_grad_(), None if u is None else u.detach().requires_grad_()
    terms = fn(s, u, a, b, **kw)
    inputs = (s,) if u is None else (s, u)
    grads = torch.autograd.grad(sum((t * c).sum() for t, c in zip(terms, cot)), inputs)
    return terms, grads


def check_against_reference(backend, shape, dtype, mode, mask=None, temperature=1.0, seed=0):
    s, u, a, b = logits(shape, dtype, seed=seed)
    mono, kw = mode_kw(mode)
    if mono:
        u = b = None
    cot = torch.randn((4, *shape[:-1]), generator=torch.Generator().manual_seed(seed + 1))
    kw = dict(mask=mask, temperature=temperature, **kw)
    exact = [None if x is None else x.double() for x in (s, u, a, b)]
    ref, ref_g = run(decomposed_kl_reference, *exact, cot.double(), **kw)
    out, out_g = run(vgs.decomposed_kl, s, u, a, b, cot, backend=backend, **kw)
    assert isinstance(out, vgs.KLTerms)
    for name, r, o in zip(out._fields, ref, out):
        assert o.dtype == torch.float32 and o.shape == shape[:-1]
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")
    for name, r, o, x in zip(("ds", "du"), ref_g, out_g, (s, u)):
        assert o.dtype == x.dtype, name
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=GRAD_RTOL[dtype],
                                   msg=lambda m: f"{name}: {m}")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(backend, mode, dtype):
    mask = torch.tensor([[True, False, True], [True, True, False]])
    out = check_against_reference(backend, (2, 3, 1423), dtype, mode, mask=mask, temperature=1.7)
    assert (out.std[mask] > 0).all() and (out.std[~mask] == 0).all()
    if not mode_kw(mode)[0]:
        assert all((t[mask] > 0).all() for t in out)
    else:
        assert all((t == 0).all() for t in out[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_qwen_vocab_row(backend):
    check_against_reference(backend, (1, 151_936), torch.float32, "prior_grad", temperature=0.8)


# "autograd" is decomposed_kl_reference itself (torch autograd through log_softmax).
@pytest.mark.parametrize("backend", ["autograd"] + [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(backend, mode):
    s, u, a, b = logits((3, 9), torch.float64, scale=2.0)
    mask = torch.tensor([True, False, True])
    mono, kw = mode_kw(mode)
    if mono:
        u = b = None

    def f(s, u):
        kw.update(temperature=1.3)
        if backend == "autograd":
            return decomposed_kl_reference(s, u, a, b, mask, **kw)
        return vgs.decomposed_kl(s, u, a, b, mask, backend=backend, **kw)

    s.requires_grad_()
    if mode == "prior_grad":
        assert torch.autograd.gradcheck(lambda s, u: tuple(f(s, u)), (s, u.requires_grad_()))
        return
    assert torch.autograd.gradcheck(lambda s: tuple(f(s, u)), (s,))
    if mode == "detached":  # only the Vis -> u path is cut (by design): check the others
        t = lambda u: f(s.detach(), u)
        assert torch.autograd.gradcheck(lambda u: (t(u).std, t(u).lang, t(u).vds), (u.requires_grad_(),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_never_read_and_all_masked(backend):
    s, u, a, b = logits((4, 257))
    mask = torch.tensor([1, 0, 1, 0])  # 0/1 ints work as a mask
    for x in (s, u, a, b):
        x[1] = float("nan")
        x[3, 5] = float("inf")
    check_against_reference(backend, (4, 257), torch.float32, "prior_grad", seed=0)  # sanity
    cot = torch.rand(4, 4) + 0.5
    out, (ds, du) = run(vgs.decomposed_kl, s, u, a, b, cot, mask=mask, backend=backend,
                        detach_prior=False)
    assert all(t.isfinite().all() and (t[1] == 0) and (t[3] == 0) for t in out)
    assert ds.isfinite().all() and du.isfinite().all()
    assert (ds[1::2] == 0).all() and (du[1::2] == 0).all() and (ds[0] != 0).any()

    none = torch.zeros(4, dtype=torch.bool)
    out, (ds, du) = run(vgs.decomposed_kl, s, u, a, b, cot, mask=none, backend=backend,
                        detach_prior=False)
    assert all((t == 0).all() for t in out) and (ds == 0).all() and (du == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", range(4))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_give_nan(backend, which, bad):
    rows = logits((3, 100))
    rows[which][1, 42] = bad
    out = vgs.decomposed_kl(*rows, backend=backend)
    # Every input row enters at least one term; the other positions stay exact.
    assert any(t[1].isnan() for t in out)
    assert all(t[[0, 2]].isfinite().all() for t in out)
    with pytest.raises(ValueError, match=f"^{'suab'[which]} has non-finite logits at .*\\[1\\]"):
        vgs.decomposed_kl(*rows, backend=backend, check_finite=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_mixed_dtypes(backend):
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 5, 300, generator=g)
    s = wide[..., :129]  # row stride 300: used as is
    u = torch.randn(2, 129, 5, generator=g).transpose(1, 2)  # stride 5 along V: copied
    a = torch.randn(5, 2, 129, generator=g, dtype=torch.float64).to(torch.bfloat16).transpose(0, 1)
    b = torch.randn(2, 5, 129, generator=g).half()  # teacher rows in other dtypes
    cot = torch.randn(4, 2, 5, generator=g)
    ref, ref_g = run(decomposed_kl_reference, s, u, a, b, cot, detach_prior=False)
    out, out_g = run(vgs.decomposed_kl, s, u, a, b, cot, detach_prior=False, backend=backend)
    torch.testing.assert_close(tuple(out), tuple(ref), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out_g, ref_g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_api_stats_interchangeable_and_out_dtype(backend):
    s, u, a, b = logits((6, 333))
    mask = torch.tensor([True, True, False, True, True, True])
    terms, stats = kl_forward(s, u, a, b, 0.5, mask, backend=backend)
    ref_terms, ref_stats = kl_forward(s, u, a, b, 0.5, mask, backend="reference")
    assert terms.shape == (4, 6) and stats.shape == (5, 6) and terms.dtype == torch.float32
    torch.testing.assert_close(stats, ref_stats, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(terms, ref_terms, atol=1e-4, rtol=1e-5)
    g = torch.randn(4, 6)
    g[:, 2] = float("nan")  # a caller's garbage on a masked row must not leak
    ds, du = kl_backward(s, u, a, b, ref_stats, ref_terms, g, 0.5, False, mask, backend=backend,
                         out_dtype=torch.bfloat16)
    assert (ds[2] == 0).all() and (du[2] == 0).all()
    ref_ds, ref_du = kl_backward(s, u, a, b, stats, terms, g, 0.5, False, mask, backend="reference")
    assert ds.dtype == du.dtype == torch.bfloat16
    torch.testing.assert_close(ds.float(), ref_ds, atol=1e-5, rtol=1.6e-2)
    torch.testing.assert_close(du.float(), ref_du, atol=1e-5, rtol=1.6e-2)
    ds, du = kl_backward(s, None, a, None, stats, terms, g, 0.5, True, mask, backend=backend)
    assert du is None and ds.dtype == torch.float32


def test_empty_batch():
    s, u, a, b = logits((0, 7))
    out = vgs.decomposed_kl(s.requires_grad_(), u, a, b)
    assert all(t.shape == (0,) for t in out)
    out.std.sum().backward()
    assert s.grad.shape == (0, 7)


@pytest.mark.parametrize("args, kwargs, exc, match", [
    (((2, 5), (2, 5), (2, 6), (2, 5)), {}, ValueError, r"a has vocabulary size 6 but s has 5: expected a of shape \(2, 5\)"),
    (((2, 5), (3, 5), (2, 5), (2, 5)), {}, ValueError, r"u must have the shape of s \(2, 5\), got \(3, 5\)"),
    (((2, 5), (2, 5), (2, 5), (2, 5)), {"mask": torch.ones(3, dtype=torch.bool)}, ValueError, r"mask must have the leading shape of s \(2,\)"),
    (((2, 5), (2, 5), (2, 5), (2, 5)), {"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    (((2, 5), (2, 5), (2, 5), (2, 5)), {"temperature": -1.0}, ValueError, "temperature"),
    (((2, 5), (2, 5), (2, 5), None), {}, ValueError, "u and b must be given together"),
    (((2, 5), None, (2, 5), (2, 5)), {}, ValueError, "u and b must be given together"),
    (((2, 5), (2, 5), "int", (2, 5)), {}, TypeError, "a must be a floating-point tensor"),
    (((2, 5), (2, 5), (2, 5), [1.0]), {}, TypeError, "b must be a torch.Tensor"),
    (((2, 0), (2, 0), (2, 0), (2, 0)), {}, ValueError, "V >= 1"),
])
def test_bad_input(args, kwargs, exc, match):
    def make(spec):
        if spec is None or isinstance(spec, list):
            return spec
        return torch.ones(2, 5, dtype=torch.int64) if spec == "int" else torch.randn(spec)

    with pytest.raises(exc, match=match):
        vgs.decomposed_kl(*map(make, args), **kwargs)


def test_bad_device():
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="b is on meta but s is on cpu"):
        vgs.decomposed_kl(s, s, s, torch.randn(2, 5, device="meta"))


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_opcheck_cpp_ops():
    s, u, a, b = logits((3, 70))
    mask = torch.tensor([True, False, True])
    for uu, bb in ((u, b), (None, None)):
        for m in (mask, None):
            torch.library.opcheck(torch.ops.vgs_kernels.decomposed_kl_forward, (s, uu, a, bb, 0.7, m))
            terms, stats = torch.ops.vgs_kernels.decomposed_kl_forward(s, uu, a, bb, 0.7, m)
            for detach, dt in ((True, None), (False, torch.bfloat16)):
                torch.library.opcheck(torch.ops.vgs_kernels.decomposed_kl_backward,
                                      (s, uu, a, bb, stats, terms, torch.randn(4, 3), 0.7, detach, m, dt))


@pytest.mark.skipif(not CPU_TRITON, reason="needs triton and TRITON_INTERPRET=1")
def test_opcheck_triton_ops():
    s, u, a, b = logits((2, 40))
    mask = torch.tensor([True, False])
    torch.library.opcheck(torch.ops.vgs_kernels.decomposed_kl_forward_triton, (s, u, a, b, 0.7, mask),
                          test_utils=("test_schema", "test_faketensor"))
    terms, stats = torch.ops.vgs_kernels.decomposed_kl_forward_triton(s, u, a, b, 0.7, mask)
    torch.library.opcheck(torch.ops.vgs_kernels.decomposed_kl_backward_triton,
                          (s, u, a, b, stats, terms, torch.randn(4, 2), 0.7, False, mask, None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_torch_compile_traces_the_op(backend, device="cpu", compiler="aot_eager"):
    s, u, a, b = logits((4, 50), device=device)
    mask = torch.tensor([True, True, False, True], device=device)

    def loss(s, u):
        t = vgs.decomposed_kl(s, u, a, b, mask, temperature=2.0, backend=backend)
        return (t.std + 2 * t.vis + 0.01 * t.lang).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend=compiler, fullgraph=True)
    s1, u1, s2, u2 = (x.clone().requires_grad_() for x in (s, u, s, u))
    loss(s1, u1).backward()
    compiled(s2, u2).backward()
    torch.testing.assert_close((s2.grad, u2.grad), (s1.grad, u1.grad))


# ----------------------------------------------------------------------------- masked vocabulary

# The token's -inf in which rows -> which terms are +inf by definition (p > 0 where the other
# distribution is 0; q* = 0 where pu or qa is, unbounded where only qb is). The others are finite
# and equal to the exact answer with the -inf replaced by -1e4 (e^-1e4 is 0 in float64).
MASKED_CASES = {"suab": "", "s": "", "u": "vis", "a": "std vis", "b": "vis lang vds",
                "ab": "std vis lang", "ub": "vis vds"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", list(MASKED_CASES))
def test_masked_vocabulary_exact(backend, where):
    shape, tokens, mode = (3, 67), [0, 5, 66], "prior_grad"
    rows = logits(shape, torch.float64, seed=4)
    for k in where:
        rows["suab".index(k)][1, tokens] = -float("inf")
    oracle = [x.clamp_min(-1e4) for x in rows]
    inf_terms = MASKED_CASES[where].split()
    # Cotangent 0 on the infinite terms of row 1: the loss stays finite, and so must the gradients.
    cot = torch.rand(4, 3, dtype=torch.float64) + 0.5
    for i, name in enumerate(vgs.KLTerms._fields):
        if name in inf_terms:
            cot[i, 1] = 0.0
    kw = dict(temperature=0.7, detach_prior=False)
    ref, ref_g = run(decomposed_kl_reference, *oracle, cot, **kw)
    dtype = torch.float32 if backend == "triton" else torch.float64  # Triton accumulates in fp32
    out, out_g = run(vgs.decomposed_kl, *(x.to(dtype) for x in rows), cot.to(dtype), backend=backend, **kw)
    for name, o, r in zip(vgs.KLTerms._fields, out, ref):
        if name in inf_terms:
            assert o[1] == float("inf"), (name, o)
            o, r = o[[0, 2]], r[[0, 2]]
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")
    for name, o, r in zip(("ds", "du"), out_g, ref_g):
        assert o.isfinite().all(), name
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    if "s" in where:
        assert (out_g[0][1, tokens] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_finfo_min_in_all_four_rows(backend, dtype, mode):
    """The other usual mask value: no NaN from u + a - b overflowing, the same answer as -inf."""
    rows = logits((2, 130), dtype, seed=5)
    for x in rows:
        x[0, [3, 64, 129]] = torch.finfo(dtype).min
    mono, kw = mode_kw(mode)
    if mono:
        rows[1] = rows[3] = None
    cot = torch.rand(4, 2) + 0.5
    out, out_g = run(vgs.decomposed_kl, *rows, cot, backend=backend, **kw)
    masked = [None if x is None else x.double().clamp_min(-1e4) for x in rows]
    ref, ref_g = run(decomposed_kl_reference, *masked, cot.double(), **kw)
    for name, o, r in zip(vgs.KLTerms._fields, out, ref):
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")
    for o, r in zip(out_g, ref_g):
        assert o.isfinite().all() and (o[0, [3, 64, 129]] == 0).all()
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=GRAD_RTOL[dtype])


# One row per case, over several of the C++ kernel's 512-wide chunks: clean chunks take its lean path
# (clamp-free exp, no masked-vocabulary selects, q*'s sum from the u, a, b exponentials), chunks with
# one of these take the general one, and a row mixes both.
CHUNK_EDGES = {
    "masked": lambda x, r: x[r, 600:610].fill_(-float("inf")),             # -inf in chunk 1 only
    "far_below": lambda x, r: x[r, 1100:1130].sub_(200.0),                  # beyond exp's -87 in chunk 2
    "zeros": lambda x, r: x[r, 1536:].zero_(),                             # the last chunks all 0
    "wide": lambda x, r: x[r].mul_(5.0),                                   # spans > 87 nats in every chunk
    "just_in": lambda x, r: x[r, 1100:1130].sub_(80.0),                    # within the lean range
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["s", "u", "a", "b", "suab"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_and_general_chunks_in_one_row(backend, which, dtype):
    rows = logits((len(CHUNK_EDGES) + 1, 4 * 512 + 37), torch.float64, seed=7)  # last row: untouched
    for r, edge in enumerate(CHUNK_EDGES.values()):
        for k in which:
            edge(rows["suab".index(k)], r)
    rows = [x.to(dtype) for x in rows]
    oracle = [x.double().clamp_min(-1e4) for x in rows]
    # Cotangent 0 on the terms that are +inf by definition (a live token masked in the second
    # distribution): the loss stays finite, and so must the gradients.
    inf_terms = {"s": "", "u": "vis", "a": "std vis", "b": "vis lang vds", "suab": ""}[which].split()
    cot = torch.rand(4, len(rows[0]), dtype=torch.float64) + 0.5
    for i, name in enumerate(vgs.KLTerms._fields):
        if name in inf_terms:
            cot[i, 0] = 0.0
    for detach in (True, False):
        ref, ref_g = run(decomposed_kl_reference, *oracle, cot, detach_prior=detach)
        out, out_g = run(vgs.decomposed_kl, *rows, cot.float(), backend=backend, detach_prior=detach)
        for name, o, r in zip(vgs.KLTerms._fields, out, ref):
            if name in inf_terms:
                assert o[0] == float("inf"), name
                o, r = o[1:], r[1:]
            torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")
        for name, o, r in zip(("ds", "du"), out_g, ref_g):
            assert o.isfinite().all(), name
            torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=GRAD_RTOL[dtype],
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spike", [30.0, 60.0])
def test_prior_and_teacher_peaking_apart(backend, spike):
    """u and a peak at different tokens: q's max lies far below mu + ma - mb, the reference the
    lean chunks take q*'s sum against (30: within their range; 60: past it, the general path)."""
    s, u, a, b = logits((2, 3 * 512), seed=8, scale=1.0)
    u[:, 5] += spike
    a[:, 700] += spike
    check_against_reference(backend, (2, 3 * 512), torch.float32, "prior_grad", seed=8)  # sanity
    cot = torch.rand(4, 2) + 0.5
    ref, ref_g = run(decomposed_kl_reference, *(x.double() for x in (s, u, a, b)), cot.double(),
                     detach_prior=False)
    out, out_g = run(vgs.decomposed_kl, s, u, a, b, cot, backend=backend, detach_prior=False)
    for name, o, r in zip(vgs.KLTerms._fields, out, ref):
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")
    for o, r in zip(out_g, ref_g):
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_lean_chunk(backend):
    """NaN passes the lean chunks' range checks (max and min ignore it): it must still make the
    row's terms NaN there, as in the general path, and leave the other rows exact."""
    rows = logits((3, 3 * 512), seed=9)
    for k in range(4):
        bad = [x.clone() for x in rows]
        bad[k][1, 700] = float("nan")
        out = vgs.decomposed_kl(*bad, backend=backend)
        ref = vgs.decomposed_kl(*rows, backend=backend)
        assert any(t[1].isnan() for t in out), "suab"[k]
        for o, r in zip(out, ref):
            assert torch.equal(o[[0, 2]], r[[0, 2]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_row_api(backend):
    """Teacher-only -inf: Std is +inf on the row API too, the stats say which LSE is unbounded,
    and a chunk that is entirely masked in one tensor (V > the kernels' chunk) is exact."""
    s, u, a, b = logits((2, 1100), seed=6)
    a[0, 7] = b[0, 7] = -float("inf")      # teacher bans a token the student likes
    b[1, 600:] = -float("inf")              # b's whole second half masked (q* unbounded there)
    terms, stats = kl_forward(s, u, a, b, 1.0, backend=backend)
    ref_terms, ref_stats = kl_forward(s, u, a, b, 1.0, backend="reference")
    assert terms[:3, 0].tolist() == [float("inf")] * 3 and terms[3, 0].isfinite()
    assert terms[1:, 1].tolist() == [float("inf")] * 3 and terms[0, 1].isfinite()
    assert stats[4, 1] == float("inf")
    torch.testing.assert_close(terms, ref_terms, atol=1e-5, rtol=2e-5)
    torch.testing.assert_close(stats, ref_stats, atol=1e-5, rtol=2e-6)
    g = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # Std only: finite on row 1
    ds, du = kl_backward(s, u, a, b, stats, terms, g, 1.0, False, backend=backend)
    assert ds[1].isfinite().all() and (du[1] == 0).all()


def test_fused_linear_masked_vocabulary_bias():
    """A -inf bias (padded / banned vocabulary rows) in both LM heads: finite terms and gradients,
    equal to the materialised reference, zero gradient on the masked tokens' bias."""
    from vgs_kernels.ops.fused_linear import fused_linear_decomposed_kl, fused_linear_decomposed_kl_reference

    g = torch.Generator().manual_seed(7)
    h_s, h_u, h_a, h_b = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(4))
    w_s, w_t = (torch.randn(40, 8, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.zeros(40, dtype=torch.float64)
    bias[[1, 38, 39]] = -float("inf")
    outs = []
    for fn, kw in ((fused_linear_decomposed_kl, dict(chunk_size=2)), (fused_linear_decomposed_kl_reference, {})):
        leaves = [x.clone().requires_grad_() for x in (h_s, h_u, w_s, bias)]
        t = fn(leaves[0], leaves[1], leaves[2], h_a, h_b, w_t, bias_student=leaves[3],
               bias_teacher=bias, detach_prior=False, **kw)
        (t.std + 2 * t.vis + 0.01 * t.lang).sum().backward()
        outs.append((torch.stack(tuple(t)), [x.grad for x in leaves]))
    (terms, grads), (ref_terms, ref_grads) = outs
    assert terms.isfinite().all() and all(x.isfinite().all() for x in grads)
    assert (grads[3][[1, 38, 39]] == 0).all()
    torch.testing.assert_close(terms, ref_terms.detach())
    torch.testing.assert_close(grads, ref_grads)


def test_min_bytes():
    from vgs_kernels.ops.decomposed_kl import min_bytes

    n, v = 8, 1000
    assert min_bytes(n, v, torch.bfloat16, torch.bfloat16, "forward") == 4 * n * v * 2 + 4 * n * 4 + 5 * n * 4
    assert min_bytes(n, v, torch.float32, torch.bfloat16, "backward", monolithic=True) == (
        n * v * (4 + 2 + 4) + 5 * n * 4 + 4 * n * 4 + 4 * n * 4)


# ----------------------------------------------------------------------------- GPU (Triton)


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("n, v", [(512, 32_000), (4096, 32_000), (512, 151_936), (2048, 151_936)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_triton_gpu_vs_reference(n, v, dtype, mode):
    s, u, a, b = logits((n, v), dtype, device="cuda", seed=n)
    mono, kw = mode_kw(mode)
    if mono:
        u = b = None
    mask = torch.rand(n, device="cuda") > 0.1
    cot = torch.randn(4, n, device="cuda")
    kw.update(temperature=1.3)
    out, out_g = run(vgs.decomposed_kl, s, u, a, b, cot, mask=mask, backend="triton", **kw)
    # Exact reference: float64, 256 rows at a time to bound its [rows, V] temporaries.
    for r in torch.arange(n, device="cuda").split(256):
        rows = [None if x is None else x[r].double() for x in (s, u, a, b)]
        ref, ref_g = run(decomposed_kl_reference, *rows, cot[:, r].double(), mask=mask[r], **kw)
        for o, e in zip(out, ref):
            torch.testing.assert_close(o[r].double(), e, atol=1e-5, rtol=2e-5)
        for o, e in zip(out_g, ref_g):
            torch.testing.assert_close(o[r].double(), e, atol=1e-5, rtol=GRAD_RTOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_triton_gpu_torch_compile_inductor():
    test_torch_compile_traces_the_op("triton", device="cuda", compiler="inductor")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(BETAS))
def test_divergences_masked_vocabulary(backend, mode):
    """-inf in both rows (a token neither model can produce) and in the teacher's only: the JSD stays finite
    (m >= (1 - beta) p), the forward KL too (q = 0 there), with exact zeros where p = q = 0."""
    s, _, a, _ = logits((3, 40), seed=7)
    s[:, 5] = a[:, 5] = -math.inf
    a[:, 9] = -math.inf
    _, kw = mode_kw(mode)
    cot = torch.rand(4, 3) + 0.5
    out, (ds,) = run(vgs.decomposed_kl, s, None, a, None, cot, backend=backend, temperature=0.9, **kw)
    ref, (ref_ds,) = run(decomposed_kl_reference, s.double(), None, a.double(), None, cot.double(), temperature=0.9,
                         **kw)
    assert out.std.isfinite().all() and ds.isfinite().all() and (ds[:, 5] == 0).all()
    torch.testing.assert_close(out.std.double(), ref.std, atol=1e-5, rtol=2e-5)
    torch.testing.assert_close(ds.double(), ref_ds, atol=1e-6, rtol=1e-4)


def test_divergence_arguments():
    s, u, a, b = logits((2, 11))
    with pytest.raises(ValueError, match="beta=0.5: the four-term split"):
        vgs.decomposed_kl(s, u, a, b, beta=0.5)
    for bad in (-0.1, 1.5, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="beta must be a number in"):
            vgs.decomposed_kl(s, None, a, None, beta=bad)
    # beta = 1 is the reverse KL, and the limits of the JSD are the two KLs
    rev = vgs.decomposed_kl(s, None, a, None, beta=1.0).std
    torch.testing.assert_close(rev, vgs.decomposed_kl(s, None, a, None).std)
    fwd = vgs.decomposed_kl(a, None, s, None).std  # KL(q || p) with the roles swapped
    torch.testing.assert_close(vgs.decomposed_kl(s, None, a, None, beta=0.0).std, fwd)
    s, a = s.double(), a.double()  # the JSD's limits, beta -> 0 and 1: beta KL(q || p), (1 - beta) KL(p || q)
    torch.testing.assert_close(vgs.decomposed_kl(s, None, a, None, beta=1e-7).std / 1e-7, fwd.double(), rtol=1e-3,
                               atol=1e-6)
    torch.testing.assert_close(vgs.decomposed_kl(s, None, a, None, beta=1 - 1e-7).std / 1e-7, rev.double(),
                               rtol=1e-3, atol=1e-6)
