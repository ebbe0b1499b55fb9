"""GPU validation of the Triton kernels (`make gpu-check` runs these with `pytest -m gpu`).

Every case the compile report (benchmarks/compile_report.py) compiles without a GPU is run here on
one against the float64 references: student x teacher dtypes (fp32 / bf16 / fp16, mixed), masks,
MONO / DETACH, V = 151,936 and odd V, misaligned row views, grad_output != 1; Gram + combine over
tables of thousands of tensors (k = 1..4, mixed dtypes, None components, misaligned views); the
float8 rule of vgs_kernels.ops.targets on the device at hand; and the multi-GPU device guard.
Skipped without CUDA.
"""
import pytest
import torch

import vgs_kernels as vgs
from vgs_kernels.ops.combine import combine_reference
from vgs_kernels.ops.decomposed_kl import decomposed_kl_reference
from vgs_kernels.ops.gram import gram_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda"  # one name, so the same checks can be dry-run under TRITON_INTERPRET=1 on "cpu"
N_TENSORS = 3000  # a table of thousands of parameters
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# Gradient tolerance by student dtype (relative to the largest reference entry): one rounding of
# the result to that dtype plus fp32 accumulation over V.
GRAD_TOL = {F32: 2e-5, F16: 2e-3, BF16: 1.6e-2}


def _rows(n, v, dtype, seed, misaligned=False):
    """[n, v] logits; misaligned: row views starting one element into a wider buffer."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    x = 3 * torch.randn(n, v + 1, generator=g, device=DEVICE, dtype=torch.float64)
    x = x[:, 1:] if misaligned else x[:, :v]
    return x.to(dtype)


def _terms_and_grads(fn, s, u, a, b, cot, **kw):
    s = s.detach().requires_grad_()
    u = None if u is None else u.detach().requires_grad_()
    t = fn(s, u, a, b, **kw)
    (torch.stack(tuple(t))[:3] * cot[:3]).sum().backward()
    return torch.stack(tuple(t)), s.grad, (None if u is None else u.grad)


KL_CASES = [  # (student, teacher, V, mono, mask, detach, misaligned)
    (BF16, BF16, 151_936, False, False, True, False),
    (BF16, BF16, 151_936, False, True, False, False),
    (F16, F16, 151_936, False, True, True, False),
    (F32, F32, 151_936, True, True, True, False),
    (BF16, F32, 151_936, False, False, True, False),
    (F16, BF16, 1001, False, True, False, False),
    (F32, F16, 1001, True, False, True, False),
    (BF16, BF16, 151_936, False, True, True, True),
    (F32, F32, 1000, False, False, False, True),
]


@pytest.mark.parametrize("ds, dt, v, mono, masked, detach, misaligned", KL_CASES)
def test_decomposed_kl_triton_vs_float64(ds, dt, v, mono, masked, detach, misaligned):
    n = 48
    s, u = _rows(n, v, ds, 1, misaligned), _rows(n, v, ds, 2, misaligned)
    a, b = _rows(n, v, dt, 3, misaligned), _rows(n, v, dt, 4, misaligned)
    if mono:
        u = b = None
    mask = (torch.arange(n, device=DEVICE) % 5 != 0) if masked else None
    cot = torch.randn(4, n, device=DEVICE, dtype=torch.float64)  # grad_output != 1, per term and row
    kw = dict(temperature=1.3, detach_prior=detach)
    out, gs, gu = _terms_and_grads(lambda *x, **k: vgs.decomposed_kl(*x, backend="triton", **k),
                                   s, u, a, b, cot.float(), mask=mask, **kw)
    as64 = [None if x is None else x.double() for x in (s, u, a, b)]
    ref, rs, ru = _terms_and_grads(decomposed_kl_reference, *as64, cot, mask=mask, **kw)
    torch.testing.assert_close(out.double(), ref, atol=2e-5 * max(1.0, float(ref.abs().max())), rtol=1e-4)
    for g, r in ((gs, rs), (gu, ru)):
        if r is not None:
            assert g.dtype == ds and torch.isfinite(g).all()
            tol = GRAD_TOL[ds] * float(r.abs().max())
            torch.testing.assert_close(g.double(), r, atol=tol, rtol=GRAD_TOL[ds])
    if mask is not None:
        assert (out[:, ~mask] == 0).all() and (gs[~mask] == 0).all()


def test_fp8_logits_follow_the_device_rule():
    """float8_e4m3fn logits: rejected with a TypeError naming the argument where Triton cannot
    compile them (sm < 89), and correct where it can."""
    from vgs_kernels.ops.targets import device_target, triton_type, unsupported_type

    s = _rows(8, 1001, BF16, 5)
    a = _rows(8, 1001, F32, 6).to(torch.float8_e4m3fn)
    if unsupported_type(triton_type(a.dtype), device_target(a.device)):
        with pytest.raises(TypeError, match=r"^a has dtype torch.float8_e4m3fn"):
            vgs.decomposed_kl(s, None, a, None)
        return
    out = vgs.decomposed_kl(s, None, a, None, backend="triton").std
    ref = decomposed_kl_reference(s.double(), None, a.double(), None).std
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def _grad_lists(k, n_tensors, seed):
    """k lists over n_tensors parameters of odd sizes and mixed dtypes, some None (for k = 1 some
    parameters have no gradient at all: combine writes zeros), a quarter of them views that start
    one element into a buffer (not 16-byte aligned); and an empty tensor like each parameter."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    dtypes = (F32, BF16, F16)
    sizes = [1 + (j * 7919) % 3001 for j in range(n_tensors)]
    lists = [[None] * n_tensors for _ in range(k)]
    like = [torch.empty(numel, dtype=dtypes[j % 3], device=DEVICE) for j, numel in enumerate(sizes)]
    for j, numel in enumerate(sizes):
        dt = dtypes[j % 3]
        for i in range(k):
            if (i + j) % 11 == 5:
                continue  # this component has no gradient for this parameter
            x = torch.randn(numel + (j % 4 == 1), generator=g, device=DEVICE).to(dt)
            lists[i][j] = x[1:] if j % 4 == 1 else x
    return lists, like


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_gram_combine_thousands_of_tensors(k):
    lists, like = _grad_lists(k, N_TENSORS, seed=k)
    G = vgs.gram(lists, backend="triton")
    ref = gram_reference(lists)
    torch.testing.assert_close(G.double(), ref.double(), rtol=2e-4, atol=1e-3 * float(ref.abs().max()))
    coeffs = torch.tensor([0.41, 0.82, -0.3, 0.004][:k], device=DEVICE)
    out, expected = [torch.empty_like(t) for t in like], [torch.empty_like(t) for t in like]
    vgs.combine(out, lists, coeffs, backend="triton")
    combine_reference(expected, lists, coeffs)
    for o, e in zip(out, expected):
        ulp = {F32: 1e-6, BF16: 8e-3, F16: 1e-3}[o.dtype]
        torch.testing.assert_close(o, e, rtol=ulp, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_their_tensors_device():
    """With cuda:0 current, tensors on cuda:1 must be computed on cuda:1 (the device guard)."""
    lists, like = _grad_lists(2, 50, seed=9)
    lists = [[t.to("cuda:1") if t is not None else None for t in lst] for lst in lists]
    with torch.cuda.device(0):
        G = vgs.gram(lists, backend="triton")
        out = [torch.empty_like(t, device="cuda:1") for t in like]
        vgs.combine(out, lists, torch.tensor([1.0, 2.0]), backend="triton")
        s, a = _rows(4, 1001, F32, 1).to("cuda:1"), _rows(4, 1001, F32, 2).to("cuda:1")
        std = vgs.decomposed_kl(s, None, a, None, backend="triton").std
    torch.testing.assert_close(G, gram_reference(lists), rtol=2e-4, atol=1e-3)
    expected = [torch.empty_like(o) for o in out]
    combine_reference(expected, lists, torch.tensor([1.0, 2.0]))
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(std.double(), decomposed_kl_reference(s.double(), None, a.double(), None).std,
                               atol=1e-4, rtol=1e-4)
