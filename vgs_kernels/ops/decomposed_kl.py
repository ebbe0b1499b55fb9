"""Decomposed KL: the four per-position KL terms of Visual Gradient Steering in one fused op.

With p = softmax(s/T), pu = softmax(u/T), qa = softmax(a/T), qb = softmax(b/T) and
q* = softmax((u + a - b)/T) (docs/ARCHITECTURE.md, "The method"):

    Std = KL(p ‖ qa)   Vis = KL(p ‖ q*)   Lang = KL(pu ‖ qb)   VDS = KL(qa ‖ qb)

Forward reads the four logit rows once and returns the terms plus per-row log-sum-exps; backward
takes one cotangent per term per row and writes ds, du in one more pass, so any weighting of the
terms (γ, per-token γ_t, the LP gate, masks) costs no extra kernel. Nothing of size [N, V] in fp32
is kept between the passes.

Backends (vgs_kernels.ops.backend.resolve): C++ on CPU (csrc/decomposed_kl.cpp), Triton on CUDA (this
file), and a plain-torch reference (this file). All accumulate in fp32 whatever the input dtypes;
cpp and reference switch to fp64 when an input is fp64 (for float64 gradcheck), Triton stays fp32.

Masked vocabulary: -inf is a token of probability 0, with the exact limits in every backend. It adds
nothing to a KL whose first distribution gives it probability 0 (the same token at -inf in all four
rows leaves every term finite); a token at -inf only in the second distribution makes that KL +inf.
q* = 0 where pu or qa is 0; where only qb is 0 (and pu qa > 0) q* is unbounded: Vis = +inf and its
LSE stat is +inf. u + a - b is formed as u + (a - b), so finfo.min in all four stays finite.
The backward gives exact zeros where p (pu) is 0 and drops a term whose cotangent is 0, so
gradients are finite wherever the differentiated loss is. NaN or +inf logits in a valid row still
give NaN terms for that row (they are not clamped away); a row entirely at -inf has no
distribution (NaN).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from vgs_kernels.ops.backend import HAS_CPP, resolve
from vgs_kernels.ops.targets import check_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the cpp and reference backends still work
    triton = None

# Rows of the `stats` tensor: natural-log log-sum-exps of s/T, u/T, a/T, b/T, (u+a-b)/T.
N_STATS = 5


class KLTerms(NamedTuple):
    """Per-position KL terms, each of the inputs' leading shape; float32 (float64 if any input is)."""

    std: Tensor
    vis: Tensor
    lang: Tensor
    vds: Tensor


# ----------------------------------------------------------------------------- input checks


def _check_inputs(s, u, a, b, mask, temperature: float = 1.0, beta: float = 1.0) -> None:
    """Raises TypeError / ValueError naming the offending argument."""
    divergence(beta, four_term=None if u is None else ("u", "b"))
    if (u is None) != (b is None):
        raise ValueError("u and b must be given together (decomposed mode) or both be None "
                         f"(monolithic mode); got u={'None' if u is None else 'tensor'}, "
                         f"b={'None' if b is None else 'tensor'}")
    named = [(n, t) for n, t in (("s", s), ("u", u), ("a", a), ("b", b)) if t is not None or n in "sa"]
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of logits, got dtype {t.dtype}")
        check_dtype(name, t)  # e.g. float8_e4m3fn on sm < 89: Triton cannot compile its loads
    if s.dim() < 1 or s.shape[-1] < 1:
        raise ValueError(f"s must have shape [..., V] with V >= 1, got {tuple(s.shape)}")
    for name, t in named[1:]:
        if t.shape[-1] != s.shape[-1]:
            raise ValueError(f"{name} has vocabulary size {t.shape[-1]} but s has {s.shape[-1]}: "
                             f"expected {name} of shape {tuple(s.shape)}")
        if t.shape != s.shape:
            raise ValueError(f"{name} must have the shape of s {tuple(s.shape)}, got {tuple(t.shape)}")
        if t.device != s.device:
            raise ValueError(f"{name} is on {t.device} but s is on {s.device}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.shape != s.shape[:-1]:
            raise ValueError(f"mask must have the leading shape of s {tuple(s.shape[:-1])}, "
                             f"got {tuple(mask.shape)}")
        if mask.device != s.device:
            raise ValueError(f"mask is on {mask.device} but s is on {s.device}")
        if mask.is_complex():
            raise TypeError(f"mask must be bool or 0/1 numbers, got dtype {mask.dtype}")
    if not isinstance(temperature, (int, float)) or not (0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _rows(x: Optional[Tensor], v: int) -> Optional[Tensor]:
    """[..., V] -> [N, V] with unit stride along V (a view when possible)."""
    if x is None:
        return None
    x = x.reshape(-1, v)
    return x if x.stride(-1) == 1 else x.contiguous()


def valid_mask(mask: Optional[Tensor], shape: Tuple[int, ...], device: torch.device) -> Tensor:
    """Leading-shape mask (bool, or numbers that are all 0 or 1; None = all valid) -> bool `shape`.

    A non-bool mask is checked (one host sync; pass a bool mask to skip it): a weight such as 0.5,
    a -1, a NaN or a labels tensor (-100 / token ids) raises instead of being silently binarised.
    """
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if mask.dtype == torch.bool:
        return mask
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(f"mask must be bool or hold only 0 and 1 (1 = response token), got the value "
                         f"{mask[bad].flatten()[0].item()!r} (dtype {mask.dtype}); masks are not per-token "
                         "weights. From labels, pass labels != -100; to weight tokens, scale the loss")
    return mask != 0


def _row_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """Leading-shape mask -> contiguous bool [N] (None stays None: no mask to read)."""
    if mask is None:
        return None
    return valid_mask(mask, (), mask.device).reshape(-1).contiguous()


# ----------------------------------------------------------------------------- reference


def acc_dtype(*xs: Optional[Tensor]) -> torch.dtype:
    """fp32 accumulation, or fp64 when any input is fp64 (so that float64 gradcheck is exact)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


# The divergence of the monolithic mode, TRL's beta (p = softmax(s/T), q = softmax(a/T)): 1 the reverse
# KL(p ‖ q) (the default, and the only one the four-term split takes), 0 the forward KL(q ‖ p), between
# them the generalised JSD beta KL(q ‖ m) + (1 - beta) KL(p ‖ m), log m = logaddexp(log p + log(1 - beta),
# log q + log beta). A kernel specialisation each (Triton constexpr DIV, C++ template parameter).
REVERSE, FORWARD, JSD = 0, 1, 2


def divergence(beta: float, four_term: Optional[Tuple[str, str]] = None) -> int:
    """The divergence mode of TRL's beta; ValueError outside [0, 1], and for beta != 1 when the four-term
    split's inputs (named ``four_term``) are given: it is of the reverse KL."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta <= 1:
        raise ValueError(f"beta must be a number in [0, 1] (1: reverse KL, 0: forward KL, between: the "
                         f"generalised JSD), got {beta!r}")
    if beta != 1 and four_term is not None:
        u, b = four_term
        raise ValueError(f"beta={beta}: the four-term split ({u}, {b} given) is of the reverse KL (the paper's "
                         f"VGS); forward KL and JSD are the monolithic mode's ({u} = {b} = None)")
    return REVERSE if beta == 1 else FORWARD if beta == 0 else JSD


def _jsd_parts(lp: Tensor, lq: Tensor, beta: float) -> Tuple[Tensor, Tensor]:
    """(KL(p ‖ m), KL(q ‖ m)) per row from log-probabilities [N, V] (0 < beta < 1)."""
    lm = _log_m(lp, lq, beta)
    return _kl_parts(lp, lp, lm).sum(-1), _kl_parts(lq, lq, lm).sum(-1)


def _log_m(lp: Tensor, lq: Tensor, beta: float) -> Tensor:
    """log((1 - beta) p + beta q); -inf where p = q = 0, without a NaN gradient there."""
    dead = (lp == -math.inf) & (lq == -math.inf)
    lm = torch.logaddexp(torch.where(dead, 0.0, lp) + math.log1p(-beta), torch.where(dead, 0.0, lq) + math.log(beta))
    return torch.where(dead, -math.inf, lm)


def _kl_parts(x: Tensor, lx: Tensor, y: Tensor) -> Tensor:
    """e^lx (x - y) per token with the masked-vocabulary limits: 0 where x = -inf, +inf where
    only y = -inf (lx = log-probabilities of x; x, y: logits or log-probabilities)."""
    dead = x == -math.inf
    d = torch.where(dead, 0.0, x) - torch.where(dead, 0.0, y)  # no inf - inf, no NaN gradient
    return torch.where(dead, 0.0, torch.where(d == math.inf, d, lx.exp() * d))


def _q_logits(xu: Tensor, xa: Tensor, xb: Tensor) -> Tuple[Tensor, Tensor]:
    """u + (a - b) with q* = 0 where pu qa = 0, and which rows have an unbounded q* (qb = 0 < pu qa)."""
    dead = (xu == -math.inf) | (xa == -math.inf)
    unbounded = ~dead & (xb == -math.inf)
    q = torch.where(dead | unbounded, 0.0, xu) + torch.where(dead | unbounded, 0.0, xa - xb)
    return torch.where(dead | unbounded, -math.inf, q), unbounded.any(-1)


def _forward_reference(s, u, a, b, inv_t: float, mask, beta: float = 1.0):
    """Plain-torch row forward with the same outputs as the kernels (terms [4, N], stats [5, N]; JSD keeps
    KL(p ‖ m) in the stats row of the unused u)."""
    mono = u is None
    n, acc = s.shape[0], acc_dtype(s, u, a, b)
    valid = torch.ones(n, dtype=torch.bool, device=s.device) if mask is None else mask
    # Masked rows are zeroed first so that garbage there cannot leak into anything.
    xs, xu, xa, xb = (None if x is None else torch.where(valid[:, None], x.to(acc) * inv_t, 0.0)
                      for x in (s, u, a, b))
    zero = torch.zeros(n, dtype=acc, device=s.device)

    def kl(x, lse_x, y, lse_y):
        return _kl_parts(x, x - lse_x[:, None], y).sum(-1) - lse_x + lse_y

    lse_s, lse_a = xs.logsumexp(-1), xa.logsumexp(-1)
    mode, aux = divergence(beta), zero
    if mode == REVERSE:
        std = kl(xs, lse_s, xa, lse_a)
    elif mode == FORWARD:
        std = kl(xa, lse_a, xs, lse_s)
    else:
        aux, kl_qm = _jsd_parts(xs - lse_s[:, None], xa - lse_a[:, None], beta)
        std = beta * kl_qm + (1 - beta) * aux
    if mono:
        terms = torch.stack([std, zero, zero, zero])
        stats = torch.stack([lse_s, aux, lse_a, zero, zero])
    else:
        xq, unbounded = _q_logits(xu, xa, xb)
        lse_u, lse_b = xu.logsumexp(-1), xb.logsumexp(-1)
        lse_q = torch.where(unbounded, math.inf, xq.logsumexp(-1))
        vis = torch.where(unbounded, math.inf, kl(xs, lse_s, xq, lse_q))
        terms = torch.stack([std, vis, kl(xu, lse_u, xb, lse_b), kl(xa, lse_a, xb, lse_b)])
        stats = torch.stack([lse_s, lse_u, lse_a, lse_b, lse_q])
    return terms * valid, stats * valid


def _backward_reference(s, u, a, b, stats, terms, grad_terms, inv_t: float, detach_prior: bool,
                        mask, out_dtype, beta: float = 1.0):
    """Plain-torch row backward from the closed-form gradients (docs/ARCHITECTURE.md, "The method"), with exact zeros
    where p (pu) = 0 and terms of zero cotangent dropped, as the kernels do."""
    n, acc = s.shape[0], acc_dtype(s, u, a, b)
    valid = torch.ones(n, dtype=torch.bool, device=s.device) if mask is None else mask
    xs, xu, xa, xb = (None if x is None else torch.where(valid[:, None], x.to(acc) * inv_t, 0.0)
                      for x in (s, u, a, b))
    # Per-row vectors [k, N] -> k columns [N, 1], zero on masked rows (whatever the caller put there).
    rows = lambda x, k: (r[:, None] for r in torch.where(valid, x[:k].to(acc), 0.0))  # noqa: E731
    lse_s, lse_u, lse_a, lse_b, lse_q = rows(stats, 5)
    g_std, g_vis, g_lang = rows(grad_terms, 3)
    std, vis, lang = rows(terms, 3)

    def weighted(g, x):  # a term of zero cotangent is dropped (no 0 * inf)
        return torch.where(g != 0, g * x, 0.0)

    p = (xs - lse_s).exp()
    mode = divergence(beta)
    if mode == FORWARD:  # d KL(q ‖ p) / ds = p - q
        return (weighted(g_std, p - (xa - lse_a).exp()) * inv_t).to(out_dtype or s.dtype), None
    if mode == JSD:  # (1 - beta) p (log p - log m - KL(p ‖ m)); lse_u's row holds KL(p ‖ m)
        lp, lq = xs - lse_s, xa - lse_a
        lm = _log_m(lp, lq, beta)
        ds = weighted(g_std, (1 - beta) * (torch.where(xs == -math.inf, 0.0, lp - lm) - lse_u))
        return (torch.where(xs == -math.inf, 0.0, p * ds) * inv_t).to(out_dtype or s.dtype), None
    d_sa = xs - xa
    ds = weighted(g_std, d_sa + lse_a - lse_s - std)
    if u is not None:
        d_ub = xu - xb
        ds = ds + weighted(g_vis, d_sa - d_ub + lse_q - lse_s - vis)
    ds = torch.where(xs == -math.inf, 0.0, p * ds)
    if u is None:
        return (ds * inv_t).to(out_dtype or s.dtype), None
    du = (xu - lse_u).exp() * weighted(g_lang, d_ub + lse_b - lse_u - lang)
    du = torch.where(xu == -math.inf, 0.0, du)
    if not detach_prior:
        q = torch.where((xu == -math.inf) | (xa == -math.inf), 0.0, (d_ub + xa - lse_q).exp())
        du = du + weighted(g_vis, q - p)
    return (ds * inv_t).to(out_dtype or s.dtype), (du * inv_t).to(out_dtype or u.dtype)


def decomposed_kl_reference(s: Tensor, u: Optional[Tensor], a: Tensor, b: Optional[Tensor],
                            mask: Optional[Tensor] = None, temperature: float = 1.0,
                            detach_prior: bool = True, beta: float = 1.0) -> KLTerms:
    """Plain-torch (log_softmax, autograd) version of `decomposed_kl`, for tests and as a spec."""
    _check_inputs(s, u, a, b, mask, temperature, beta)
    keep = None if mask is None else valid_mask(mask, (), mask.device)[..., None]
    acc = acc_dtype(s, u, a, b)

    def logp(x):  # masked positions are zeroed before anything so NaN there cannot leak
        x = x.to(acc) / temperature
        return (x if keep is None else torch.where(keep, x, 0.0)).log_softmax(-1)

    def kl(lp, lq):
        return _kl_parts(lp, lp, lq).sum(-1)

    ls, la = logp(s), logp(a.detach())
    mode = divergence(beta)
    if mode == JSD:
        kl_pm, kl_qm = _jsd_parts(ls, la, beta)
        std = beta * kl_qm + (1 - beta) * kl_pm
    else:
        std = kl(ls, la) if mode == REVERSE else kl(la, ls)
    if u is None:
        vis = lang = vds = torch.zeros_like(std)
    else:
        lu, lb = logp(u), logp(b.detach())
        lq, unbounded = _q_logits(lu.detach() if detach_prior else lu, la, lb)
        vis = torch.where(unbounded, math.inf, kl(ls, lq.log_softmax(-1)))
        lang, vds = kl(lu, lb), kl(la, lb)
    terms = (std, vis, lang, vds)
    if keep is not None:
        terms = tuple(t * keep[..., 0] for t in terms)
    return KLTerms(*terms)


# ----------------------------------------------------------------------------- Triton

if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)  # globals a kernel reads must be constexpr
    LN2 = tl.constexpr(0.6931471805599453)

    @triton.jit
    def _exp2(x, FTZ: tl.constexpr):
        """2^x; FTZ: one ex2.approx.ftz (no denormal fix-up around MUFU.EX2: results below 2^-126
        of a running max are dropped, far below fp32 accumulation error). CUDA only."""
        if FTZ:
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.exp2(x)

    @triton.jit
    def _load_row(ptr, stride, row, cols, c, lm, MASKED: tl.constexpr):
        """One block of one row as fp32 · c (c = log2(e)/T); -inf where not read."""
        if MASKED:
            x = tl.load(ptr + row * stride + cols, mask=lm, other=-float("inf"))
        else:
            x = tl.load(ptr + row * stride + cols)
        return x.to(tl.float32) * c

    @triton.jit
    def _load_rows(s_ptr, u_ptr, a_ptr, b_ptr, stride_s, stride_u, stride_a, stride_b, row, cols,
                   c, lm, MONO: tl.constexpr, MASKED: tl.constexpr):
        """One block of the four rows (_load_row); monolithic: u, b are placeholders, never used."""
        xs = _load_row(s_ptr, stride_s, row, cols, c, lm, MASKED)
        xa = _load_row(a_ptr, stride_a, row, cols, c, lm, MASKED)
        xu, xb = xs, xa
        if not MONO:
            xu = _load_row(u_ptr, stride_u, row, cols, c, lm, MASKED)
            xb = _load_row(b_ptr, stride_b, row, cols, c, lm, MASKED)
        return xs, xu, xa, xb

    @triton.jit
    def _lse_step(m, S, x, FTZ: tl.constexpr):
        """Online log-sum-exp (base 2) of a [R, K] tile, one running max per tile row (= per
        thread: K contiguous elements each, so the max is a thread-local reduction, no shuffle).
        Returns m', S', the rescale of the old sums [R] and the new terms' weights [R, K].
        m starts finite (-FLT_MAX), so x = -inf weighs exactly 0 and never makes NaN."""
        m_new = tl.maximum(m, tl.max(x, 1))
        old = _exp2(m - m_new, FTZ)
        w = _exp2(x - m_new[:, None], FTZ)
        return m_new, S * old + tl.sum(w, 1), old, w

    @triton.jit
    def _kl_part(w, x, y):
        """w (x - y) with the masked-vocabulary limits: 0 where x = -inf, +inf where only y is."""
        d = x - y
        return tl.where(x == -float("inf"), 0.0, tl.where(d == float("inf"), d, w * d))

    @triton.jit
    def _fwd_block(xs, xu, xa, xb, st, MONO: tl.constexpr, FTZ: tl.constexpr, DIV: tl.constexpr):
        """Adds one block into the per-lane state st (see _kl_forward_kernel). A_std: E_p[s - a] (reverse
        KL), E_q[a - s] (forward), nothing (JSD: its second pass)."""
        m_s, m_u, m_a, m_b, m_q, S_s, S_u, S_a, S_b, S_q, A_std, A_vis, A_lang, A_vds, n_unb = st
        m_s, S_s, old_s, w_s = _lse_step(m_s, S_s, xs, FTZ)
        m_a, S_a, old_a, w_a = _lse_step(m_a, S_a, xa, FTZ)
        if DIV == 0:
            A_std = A_std * old_s + tl.sum(_kl_part(w_s, xs, xa), 1)
        elif DIV == 1:
            A_std = A_std * old_a + tl.sum(_kl_part(w_a, xa, xs), 1)
        if not MONO:
            # q* = 0 where pu qa = 0; unbounded (counted, Vis = +inf) where only qb = 0.
            dead = (xu == -float("inf")) | (xa == -float("inf"))
            unb = (xb == -float("inf")) & ~dead
            xq = tl.where(dead | unb, -float("inf"), xu + (xa - xb))  # a - b first: finfo.min stays finite
            n_unb += tl.sum(unb.to(tl.int32), 1)
            m_u, S_u, old_u, w_u = _lse_step(m_u, S_u, xu, FTZ)
            m_b, S_b, _, _ = _lse_step(m_b, S_b, xb, FTZ)
            m_q, S_q, _, _ = _lse_step(m_q, S_q, xq, FTZ)
            A_vis = A_vis * old_s + tl.sum(_kl_part(w_s, xs, xq), 1)
            A_lang = A_lang * old_u + tl.sum(_kl_part(w_u, xu, xb), 1)
            A_vds = A_vds * old_a + tl.sum(_kl_part(w_a, xa, xb), 1)
        return m_s, m_u, m_a, m_b, m_q, S_s, S_u, S_a, S_b, S_q, A_std, A_vis, A_lang, A_vds, n_unb

    @triton.jit
    def _log2_m(ls, la, c_p, c_q):
        """log2((1 - beta) p + beta q) from base-2 log-probabilities (c_p = log2(1 - beta), c_q = log2(beta));
        -inf where p = q = 0."""
        x, y = ls + c_p, la + c_q
        hi = tl.maximum(x, y)
        safe = tl.where(hi == -float("inf"), 0.0, hi)
        return tl.where(hi == -float("inf"), hi, safe + tl.log2(tl.exp2(x - safe) + tl.exp2(y - safe)))

    @triton.jit
    def _jsd_block(xs, xa, l_s, l_a, c_p, c_q, P, Q):
        """Adds one block's p (log p - log m) and q (log q - log m) (base 2, [R, K] tiles) into P, Q [R]."""
        ls, la = xs - l_s, xa - l_a
        lm = _log2_m(ls, la, c_p, c_q)
        return P + tl.sum(_kl_part(tl.exp2(ls), ls, lm), 1), Q + tl.sum(_kl_part(tl.exp2(la), la, lm), 1)

    @triton.jit
    def _lane_scale(m):
        """Row maximum M of per-lane maxima m and each lane's rescale 2^(m - M) to it."""
        M = tl.max(m, 0)
        return M, tl.exp2(m - M)

    @triton.jit
    def _kl_forward_kernel(s_ptr, u_ptr, a_ptr, b_ptr, mask_ptr, terms_ptr, stats_ptr,
                           stride_s, stride_u, stride_a, stride_b, N, V, inv_t, beta,
                           HAS_MASK: tl.constexpr, MONO: tl.constexpr, BLOCK: tl.constexpr,
                           FTZ: tl.constexpr, K: tl.constexpr, DIV: tl.constexpr):
        """One row per program, one pass over V in [BLOCK // K, K] tiles: running maxima and sums
        (base 2) per tile row of K contiguous elements (one thread's), so the loop has no
        cross-thread reduction and costs 1 + 1/K exps per element per log-sum-exp. Full blocks
        load unmasked (vectorised); the tail block is masked, its missing columns read as -inf.
        DIV (monolithic mode): 0 reverse KL, 1 forward KL (one pass each), 2 JSD of ``beta`` (log m
        needs both LSEs: a second pass over s and a)."""
        row = tl.program_id(0).to(tl.int64)
        if HAS_MASK:
            valid = tl.load(mask_ptr + row) != 0
        else:
            valid = row >= 0
        c = inv_t * LOG2E  # log2(e) / T
        cols0 = tl.arange(0, BLOCK // K)[:, None] * K + tl.arange(0, K)[None, :]
        m0 = tl.full([BLOCK // K], -3.4028234663852886e38, tl.float32)
        z = tl.zeros([BLOCK // K], tl.float32)
        st = (m0, m0, m0, m0, m0, z, z, z, z, z, z, z, z, z, tl.zeros([BLOCK // K], tl.int32))
        n_full = tl.where(valid, V // BLOCK * BLOCK, 0)  # masked rows: nothing is read
        for start in range(0, n_full, BLOCK):
            xs, xu, xa, xb = _load_rows(s_ptr, u_ptr, a_ptr, b_ptr, stride_s, stride_u, stride_a,
                                        stride_b, row, start + cols0, c, None, MONO, False)
            st = _fwd_block(xs, xu, xa, xb, st, MONO, FTZ, DIV)
        cols = V // BLOCK * BLOCK + cols0
        tail = cols < tl.where(valid, V, 0)
        xs, xu, xa, xb = _load_rows(s_ptr, u_ptr, a_ptr, b_ptr, stride_s, stride_u, stride_a,
                                    stride_b, row, cols, c, tail, MONO, True)
        st = _fwd_block(xs, xu, xa, xb, st, MONO, FTZ, DIV)
        m_s, m_u, m_a, m_b, m_q, S_s, S_u, S_a, S_b, S_q, A_std, A_vis, A_lang, A_vds, n_unb = st
        # KL(softmax(x) || softmax(y)) = E_x[x - y] - LSE(x) + LSE(y), here in nats from base 2.
        M_s, r_s = _lane_scale(m_s)
        M_a, r_a = _lane_scale(m_a)
        ss, sa = tl.sum(S_s * r_s, 0), tl.sum(S_a * r_a, 0)
        lse_s, lse_a = (M_s + tl.log2(ss)) * LN2, (M_a + tl.log2(sa)) * LN2
        if DIV == 0:
            std = tl.sum(A_std * r_s, 0) / ss * LN2 - lse_s + lse_a
        elif DIV == 1:
            std = tl.sum(A_std * r_a, 0) / sa * LN2 - lse_a + lse_s
        else:  # JSD: beta KL(q || m) + (1 - beta) KL(p || m); KL(p || m) kept in the stats row of u
            l_s, l_a = lse_s * LOG2E, lse_a * LOG2E
            c_p, c_q = tl.log2(1.0 - beta), tl.log2(beta)
            P, Q = z, z
            for start in range(0, n_full, BLOCK):
                xs, _, xa, _ = _load_rows(s_ptr, u_ptr, a_ptr, b_ptr, stride_s, stride_u, stride_a, stride_b, row,
                                          start + cols0, c, None, True, False)
                P, Q = _jsd_block(xs, xa, l_s, l_a, c_p, c_q, P, Q)
            xs, _, xa, _ = _load_rows(s_ptr, u_ptr, a_ptr, b_ptr, stride_s, stride_u, stride_a, stride_b, row,
                                      cols, c, tail, True, True)
            P, Q = _jsd_block(xs, xa, l_s, l_a, c_p, c_q, P, Q)
            kl_pm, kl_qm = tl.sum(P, 0) * LN2, tl.sum(Q, 0) * LN2
            std = beta * kl_qm + (1.0 - beta) * kl_pm
            tl.store(stats_ptr + N + row, tl.where(valid, kl_pm, 0.0))
        tl.store(terms_ptr + row, tl.where(valid, std, 0.0))
        tl.store(stats_ptr + row, tl.where(valid, lse_s, 0.0))
        tl.store(stats_ptr + 2 * N + row, tl.where(valid, lse_a, 0.0))
        if not MONO:
            M_u, r_u = _lane_scale(m_u)
            M_b, r_b = _lane_scale(m_b)
            M_q, r_q = _lane_scale(m_q)
            su, sb, sq = tl.sum(S_u * r_u, 0), tl.sum(S_b * r_b, 0), tl.sum(S_q * r_q, 0)
            a_vis, a_lang = tl.sum(A_vis * r_s, 0), tl.sum(A_lang * r_u, 0)
            a_vds = tl.sum(A_vds * r_a, 0)
            unbounded = tl.sum(n_unb, 0) > 0
            lse_u, lse_b = (M_u + tl.log2(su)) * LN2, (M_b + tl.log2(sb)) * LN2
            lse_q = tl.where(unbounded, float("inf"), (M_q + tl.log2(sq)) * LN2)
            vis = tl.where(unbounded, float("inf"), a_vis / ss * LN2 - lse_s + lse_q)
            tl.store(terms_ptr + N + row, tl.where(valid, vis, 0.0))
            tl.store(terms_ptr + 2 * N + row, tl.where(valid, a_lang / su * LN2 - lse_u + lse_b, 0.0))
            tl.store(terms_ptr + 3 * N + row, tl.where(valid, a_vds / sa * LN2 - lse_a + lse_b, 0.0))
            tl.store(stats_ptr + N + row, tl.where(valid, lse_u, 0.0))
            tl.store(stats_ptr + 3 * N + row, tl.where(valid, lse_b, 0.0))
            tl.store(stats_ptr + 4 * N + row, tl.where(valid, lse_q, 0.0))

    @triton.jit
    def _weighted(g, x):
        """g x, dropped when g = 0 (an infinite term nobody differentiates must not give NaN)."""
        return tl.where(g != 0, g * x, 0.0)

    @triton.jit
    def _bwd_block(s_ptr, u_ptr, a_ptr, b_ptr, ds_ptr, du_ptr, stride_s, stride_u, stride_a,
                   stride_b, stride_ds, stride_du, row, cols, lm, sm, c, inv_t, k, MONO: tl.constexpr,
                   DETACH: tl.constexpr, MASKED: tl.constexpr, TAIL: tl.constexpr, FTZ: tl.constexpr,
                   DIV: tl.constexpr):
        """ds, du of one block; k = the row's constants (base-2 LSEs, cotangents, folded terms; the JSD
        puts beta, KL(p || m), log2(1 - beta), log2(beta) in the slots of g_vis, c_u, l_q, l_u). MASKED:
        loads under lm (-inf elsewhere); TAIL: stores under sm."""
        l_s, l_u, l_a, l_q, g_std, g_vis, g_lang, c_s, c_u = k
        xs, xu, xa, xb = _load_rows(s_ptr, u_ptr, a_ptr, b_ptr, stride_s, stride_u, stride_a,
                                    stride_b, row, cols, c, lm, MONO, MASKED)
        p = _exp2(xs - l_s, FTZ)
        d_sa = (xs - xa) * LN2  # nats
        if DIV == 1:  # forward KL: p - q
            ds = _weighted(g_std, p - _exp2(xa - l_a, FTZ))
        elif DIV == 2:  # JSD: (1 - beta) p (log p - log m - KL(p || m)), the p below
            ls = xs - l_s
            ds = _weighted(g_std, (1.0 - g_vis) * ((ls - _log2_m(ls, xa - l_a, l_q, l_u)) * LN2 - c_u))
        elif MONO:
            ds = _weighted(g_std, d_sa) + c_s
        else:
            d_ub = (xu - xb) * LN2
            # log p - log q* - (lse_q - lse_s) = s - (u + a - b)
            ds = _weighted(g_std, d_sa) + _weighted(g_vis, d_sa - d_ub) + c_s
            du = tl.where(xu == -float("inf"), 0.0,
                          _exp2(xu - l_u, FTZ) * (_weighted(g_lang, d_ub) + c_u))
            if not DETACH:
                dead = (xu == -float("inf")) | (xa == -float("inf"))  # q* = 0 where pu qa = 0
                q = tl.where(dead, 0.0, _exp2(xu + (xa - xb) - l_q, FTZ))
                du += _weighted(g_vis, q - p)
            du = (du * inv_t).to(du_ptr.dtype.element_ty)
            if TAIL:
                tl.store(du_ptr + row * stride_du + cols, du, mask=sm)
            else:
                tl.store(du_ptr + row * stride_du + cols, du)
        if DIV == 1:
            ds = (ds * inv_t).to(ds_ptr.dtype.element_ty)
        else:
            ds = tl.where(xs == -float("inf"), 0.0, p * ds * inv_t).to(ds_ptr.dtype.element_ty)
        if TAIL:
            tl.store(ds_ptr + row * stride_ds + cols, ds, mask=sm)
        else:
            tl.store(ds_ptr + row * stride_ds + cols, ds)

    @triton.jit
    def _kl_backward_kernel(s_ptr, u_ptr, a_ptr, b_ptr, mask_ptr, stats_ptr, terms_ptr, g_ptr,
                            ds_ptr, du_ptr, stride_s, stride_u, stride_a, stride_b, stride_ds,
                            stride_du, N, V, inv_t, beta, HAS_MASK: tl.constexpr, MONO: tl.constexpr,
                            DETACH: tl.constexpr, BLOCK: tl.constexpr, FTZ: tl.constexpr, DIV: tl.constexpr):
        """ds = p (g_std (log p - log qa - Std) + g_vis (log p - log q* - Vis)) / T and
        du = [g_lang pu (log pu - log qb - Lang) + (not DETACH) g_vis (q* - p)] / T, per-row
        constants folded in first; exact zeros where p (pu) = 0 and terms of zero cotangent
        dropped. Masked rows read nothing and get exact zeros."""
        row = tl.program_id(0).to(tl.int64)
        if HAS_MASK:
            valid = tl.load(mask_ptr + row) != 0
        else:
            valid = row >= 0
        c = inv_t * LOG2E
        lse_s = tl.where(valid, tl.load(stats_ptr + row).to(tl.float32), 0.0)
        lse_a = tl.where(valid, tl.load(stats_ptr + 2 * N + row).to(tl.float32), 0.0)
        g_std = tl.where(valid, tl.load(g_ptr + row).to(tl.float32), 0.0)
        std = tl.where(valid, tl.load(terms_ptr + row).to(tl.float32), 0.0)
        c_s = _weighted(g_std, lse_a - lse_s - std)
        lse_u, lse_q, g_vis, g_lang, c_u = lse_s, lse_s, g_std, g_std, c_s  # unused when MONO
        if not MONO:
            lse_u = tl.where(valid, tl.load(stats_ptr + N + row).to(tl.float32), 0.0)
            lse_b = tl.where(valid, tl.load(stats_ptr + 3 * N + row).to(tl.float32), 0.0)
            lse_q = tl.where(valid, tl.load(stats_ptr + 4 * N + row).to(tl.float32), 0.0)
            g_vis = tl.where(valid, tl.load(g_ptr + N + row).to(tl.float32), 0.0)
            g_lang = tl.where(valid, tl.load(g_ptr + 2 * N + row).to(tl.float32), 0.0)
            vis = tl.where(valid, tl.load(terms_ptr + N + row).to(tl.float32), 0.0)
            lang = tl.where(valid, tl.load(terms_ptr + 2 * N + row).to(tl.float32), 0.0)
            c_s += _weighted(g_vis, lse_q - lse_s - vis)
            c_u = _weighted(g_lang, lse_b - lse_u - lang)
        k = (lse_s * LOG2E, lse_u * LOG2E, lse_a * LOG2E, lse_q * LOG2E, g_std, g_vis, g_lang, c_s, c_u)
        if DIV == 2:  # the JSD's constants in the monolithic mode's unused slots (see _bwd_block)
            kl_pm = tl.where(valid, tl.load(stats_ptr + N + row).to(tl.float32), 0.0)
            k = (lse_s * LOG2E, tl.log2(beta), lse_a * LOG2E, tl.log2(1.0 - beta), g_std, beta, g_lang, c_s, kl_pm)
        cols0 = tl.arange(0, BLOCK)
        n_full = V // BLOCK * BLOCK
        if valid:
            for start in range(0, n_full, BLOCK):
                _bwd_block(s_ptr, u_ptr, a_ptr, b_ptr, ds_ptr, du_ptr, stride_s, stride_u, stride_a,
                           stride_b, stride_ds, stride_du, row, start + cols0, None, None, c, inv_t,
                           k, MONO, DETACH, False, False, FTZ, DIV)
            cols = n_full + cols0
            _bwd_block(s_ptr, u_ptr, a_ptr, b_ptr, ds_ptr, du_ptr, stride_s, stride_u, stride_a,
                       stride_b, stride_ds, stride_du, row, cols, cols < V, cols < V, c, inv_t, k,
                       MONO, DETACH, True, True, FTZ, DIV)
        else:  # masked row: exact zeros, nothing read
            for start in range(0, V, BLOCK):
                cols = start + cols0
                tl.store(ds_ptr + row * stride_ds + cols, tl.zeros([BLOCK], ds_ptr.dtype.element_ty),
                         mask=cols < V)
                if not MONO:
                    tl.store(du_ptr + row * stride_du + cols,
                             tl.zeros([BLOCK], du_ptr.dtype.element_ty), mask=cols < V)


def _ftz(x: Tensor) -> bool:
    """ex2.approx.ftz through inline PTX: NVIDIA only (HIP and the interpreter take tl.exp2)."""
    return x.is_cuda and torch.version.hip is None


def _triton_launch(x: Tensor, v: int, mono: bool, forward: bool, itemsize: int = 4):
    """(device context, BLOCK, num_warps, K) for one row per program over V. Forward: K elements
    per thread and per running max, K = 16 B of the *widest* input row (`itemsize`): a tile sized
    for 2-byte rows holding a 4-byte row (fp32 student, fp16 teacher, K 8) spills on sm_80; sized
    by the widest row, every dtype mix fits 128 registers at 8 warps on sm_80 / sm_90 / gfx942
    (tests/ops/test_triton_compile.py)."""
    ctx = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    if forward:
        k = 8 if itemsize <= 2 else 4
        return ctx, max(k, min(triton.next_power_of_2(v), 256 * k)), 8, k
    block = min(triton.next_power_of_2(v), 2048)
    return ctx, block, 8 if block >= 1024 else 4, 1


def _fake_forward(s, u, a, b, inv_temperature, mask, beta=1.0):
    acc = acc_dtype(s, u, a, b)
    return s.new_empty(4, s.shape[0], dtype=acc), s.new_empty(N_STATS, s.shape[0], dtype=acc)


def _fake_backward(s, u, a, b, stats, terms, grad_terms, inv_temperature, detach_prior, mask,
                   out_dtype, beta=1.0):
    ds = s.new_empty(s.shape, dtype=out_dtype or s.dtype)
    return ds, (s.new_empty(0) if u is None else u.new_empty(u.shape, dtype=out_dtype or u.dtype))


if triton is not None:

    @torch.library.custom_op("vgs_kernels::decomposed_kl_forward_triton", mutates_args=())
    def _forward_triton(s: Tensor, u: Optional[Tensor], a: Tensor, b: Optional[Tensor],
                        inv_temperature: float, mask: Optional[Tensor], beta: float = 1.0) -> Tuple[Tensor, Tensor]:
        mono, (n, v), acc = u is None, s.shape, acc_dtype(s, u, a, b)
        terms = s.new_zeros(4, n, dtype=acc)  # zeros: the kernel skips unused rows when mono
        stats = s.new_zeros(N_STATS, n, dtype=acc)
        if n == 0:
            return terms, stats
        u, b = (s, a) if mono else (u, b)  # unread placeholders in monolithic mode
        itemsize = max(x.element_size() for x in (s, u, a, b))
        ctx, block, warps, k = _triton_launch(s, v, mono, forward=True, itemsize=itemsize)
        with ctx:
            _kl_forward_kernel[(n,)](s, u, a, b, s if mask is None else mask, terms, stats,
                                     s.stride(0), u.stride(0), a.stride(0), b.stride(0), n, v,
                                     inv_temperature, beta, HAS_MASK=mask is not None, MONO=mono,
                                     BLOCK=block, FTZ=_ftz(s), K=k, DIV=divergence(beta), num_warps=warps)
        return terms, stats

    @torch.library.custom_op("vgs_kernels::decomposed_kl_backward_triton", mutates_args=())
    def _backward_triton(s: Tensor, u: Optional[Tensor], a: Tensor, b: Optional[Tensor],
                         stats: Tensor, terms: Tensor, grad_terms: Tensor, inv_temperature: float,
                         detach_prior: bool, mask: Optional[Tensor],
                         out_dtype: Optional[torch.dtype], beta: float = 1.0) -> Tuple[Tensor, Tensor]:
        mono, (n, v) = u is None, s.shape
        ds, du = _fake_backward(s, u, a, b, stats, terms, grad_terms, inv_temperature,
                                detach_prior, mask, out_dtype, beta)
        if n == 0:
            return ds, du
        u, b, du_rows = (s, a, ds) if mono else (u, b, du)
        ctx, block, warps, _ = _triton_launch(s, v, mono, forward=False)
        with ctx:
            _kl_backward_kernel[(n,)](s, u, a, b, s if mask is None else mask, stats.contiguous(),
                                      terms.contiguous(), grad_terms.contiguous(), ds, du_rows,
                                      s.stride(0), u.stride(0), a.stride(0), b.stride(0),
                                      ds.stride(0), du_rows.stride(0), n, v, inv_temperature, beta,
                                      HAS_MASK=mask is not None, MONO=mono, DETACH=detach_prior,
                                      BLOCK=block, FTZ=_ftz(s), DIV=divergence(beta), num_warps=warps)
        return ds, du

    _forward_triton.register_fake(_fake_forward)
    _backward_triton.register_fake(_fake_backward)

if HAS_CPP:  # the C++ ops (csrc/decomposed_kl.cpp) get the same shape functions for torch.compile
    torch.library.register_fake("vgs_kernels::decomposed_kl_forward")(_fake_forward)
    torch.library.register_fake("vgs_kernels::decomposed_kl_backward")(_fake_backward)


# ----------------------------------------------------------------------------- row API


def kl_forward(s: Tensor, u: Optional[Tensor], a: Tensor, b: Optional[Tensor], inv_temperature: float,
               mask: Optional[Tensor] = None, *, backend: Optional[str] = None,
               beta: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Row forward, no autograd.

    s, u, a, b: [N, V] logits, any float dtypes, unit stride along V (row stride free); u and b
    both None = monolithic mode (only Std, the divergence of ``beta``: `divergence`). mask: bool [N] or
    None (False rows are not read). Returns terms: [4, N] fp32 (rows std, vis, lang, vds; zero where
    masked, and vis/lang/vds zero in monolithic mode) and stats: [5, N] fp32 natural-log LSEs of s/T,
    u/T, a/T, b/T, (u+a-b)/T (the JSD keeps KL(p ‖ m) in the row of u) (the input of `kl_backward`;
    interchangeable between backends).
    """
    divergence(beta)
    name = resolve(s.device, backend)
    if name == "cpp":
        return torch.ops.vgs_kernels.decomposed_kl_forward(s, u, a, b, inv_temperature, mask, float(beta))
    if name == "triton":
        return torch.ops.vgs_kernels.decomposed_kl_forward_triton(s, u, a, b, inv_temperature, mask, float(beta))
    return _forward_reference(s, u, a, b, inv_temperature, mask, beta)


def kl_backward(s: Tensor, u: Optional[Tensor], a: Tensor, b: Optional[Tensor], stats: Tensor,
                terms: Tensor, grad_terms: Tensor, inv_temperature: float, detach_prior: bool,
                mask: Optional[Tensor] = None, *, backend: Optional[str] = None,
                out_dtype: Optional[torch.dtype] = None, beta: float = 1.0) -> Tuple[Tensor, Optional[Tensor]]:
    """Row backward, no autograd: ds, du from one cotangent per term per row.

    s, u, a, b, mask, inv_temperature, beta: as given to `kl_forward`; stats [5, N] and terms [4, N]:
    its outputs. grad_terms: [4, N] fp32 cotangents of std, vis, lang (the vds row is ignored:
    nothing flows into the teacher). Returns ds: [N, V] and du: [N, V] (None in monolithic mode),
    in s.dtype / u.dtype, or both in `out_dtype` when given; zero on masked rows.
    """
    divergence(beta)
    name = resolve(s.device, backend)
    grad_terms = grad_terms.to(acc_dtype(s, u, a, b)).contiguous()
    if name == "reference":
        return _backward_reference(s, u, a, b, stats, terms, grad_terms, inv_temperature,
                                   detach_prior, mask, out_dtype, beta)
    if name == "cpp":
        ds, du = torch.ops.vgs_kernels.decomposed_kl_backward(s, u, a, b, stats, terms, grad_terms, inv_temperature,
                                                               detach_prior, mask, out_dtype, float(beta))
    else:
        ds, du = torch.ops.vgs_kernels.decomposed_kl_backward_triton(s, u, a, b, stats, terms, grad_terms,
                                                                      inv_temperature, detach_prior, mask,
                                                                      out_dtype, float(beta))
    return ds, (None if u is None else du)


# ----------------------------------------------------------------------------- autograd


class DecomposedKLFunction(torch.autograd.Function):
    """Rows [N, V] -> the four term rows std, vis, lang, vds ([N] each, views of one [4, N]
    tensor); backward writes ds, du in one pass (any backend).

    The terms are separate outputs and absent cotangents arrive as None (no materialised
    zeros), so the backward knows, without looking at any value (no host sync), which side is
    live: ds needs a Std or Vis cotangent, du a Lang cotangent (or Vis when the prior is not
    detached). The other side is returned as None, and autograd does not push a zero tensor
    through that side's graph: an exact step's std and vis backwards never traverse the
    text-only graph, its lp backward never traverses the with-image one.
    """

    @staticmethod
    def forward(ctx, s, u, a, b, mask, inv_t: float, detach_prior: bool, backend: Optional[str], beta: float):
        terms, stats = kl_forward(s, u, a, b, inv_t, mask, backend=backend, beta=beta)
        ctx.save_for_backward(s, u, a, b, mask, stats, terms)
        ctx.inv_t, ctx.detach_prior, ctx.backend, ctx.beta = inv_t, detach_prior, backend, beta
        ctx.set_materialize_grads(False)
        std, vis, lang, vds = terms.unbind(0)
        ctx.mark_non_differentiable(vds)  # a statistic of the teacher: no gradient anywhere
        return std, vis, lang, vds

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_std, g_vis, g_lang, _g_vds):
        s, u, a, b, mask, stats, terms = ctx.saved_tensors
        live_s = g_std is not None or (u is not None and g_vis is not None)
        live_u = u is not None and (g_lang is not None or (g_vis is not None and not ctx.detach_prior))
        need_s, need_u = ctx.needs_input_grad[0] and live_s, ctx.needs_input_grad[1] and live_u
        if not (need_s or need_u):
            return (None,) * 9
        zero = terms.new_zeros(terms.shape[1:])
        grad_terms = torch.stack([zero if g is None else g for g in (g_std, g_vis, g_lang)] + [zero])
        ds, du = kl_backward(s, u, a, b, stats, terms, grad_terms, ctx.inv_t, ctx.detach_prior,
                             mask, backend=ctx.backend, beta=ctx.beta)
        return (ds if need_s else None), (du if need_u else None), None, None, None, None, None, None, None


def decomposed_kl(s: Tensor, u: Optional[Tensor], a: Tensor, b: Optional[Tensor],
                  mask: Optional[Tensor] = None, temperature: float = 1.0, detach_prior: bool = True,
                  *, backend: Optional[str] = None, check_finite: bool = False, beta: float = 1.0) -> KLTerms:
    """Std, Vis, Lang, VDS per position (docs/ARCHITECTURE.md, "The method"), differentiable w.r.t. s and u.

    s, u: student logits with / without the image, a, b: teacher logits with / without it; all
    [..., V], any float dtypes (student and teacher may differ), any strides. u = b = None is the
    monolithic mode: only Std is computed (u, b never read; vis, lang, vds are zeros).
    mask: bool or 0/1 of the leading shape; masked positions give 0 terms and 0 gradients and
    are never read (padding garbage there cannot leak). temperature divides all four rows.
    detach_prior: no gradient from Vis into u through q* (the default; docs/ARCHITECTURE.md).
    backend: force "cpp" | "triton" | "reference" (default: by device, see vgs_kernels.ops.backend).
    beta: the monolithic mode's divergence, TRL's (`divergence`): 1 the reverse KL KL(p ‖ qa) (default),
    0 the forward KL(qa ‖ p), between them the generalised JSD; the four-term split is the reverse KL.
    Non-finite logits in a valid row make that row's terms NaN; check_finite=True instead raises
    a ValueError naming the tensor (costs a host synchronisation, so off by default).

    Returns KLTerms of float32 tensors of the leading shape (float64 when any input is float64:
    every backend then accumulates in float64, which is what float64 gradcheck needs). Gradients arrive in s.dtype, u.dtype;
    the teacher rows a, b get none.
    """
    _check_inputs(s, u, a, b, mask, temperature, beta)
    lead, v = s.shape[:-1], s.shape[-1]
    rows = [_rows(x, v) for x in (s, u, a, b)]
    row_mask = _row_mask(mask)
    terms = DecomposedKLFunction.apply(*rows, row_mask, 1.0 / temperature, detach_prior, backend, beta)
    if check_finite:
        _raise_if_not_finite(torch.stack(terms), rows, row_mask)
    return KLTerms(*(t.reshape(lead) for t in terms))


def _raise_if_not_finite(terms: Tensor, rows, mask: Optional[Tensor]) -> None:
    if bool(terms.isfinite().all()):
        return
    for name, x in zip("suab", rows):
        if x is not None:
            bad = ~x.isfinite().all(-1) if mask is None else ~x.isfinite().all(-1) & mask
            if bool(bad.any()):
                raise ValueError(f"{name} has non-finite logits at (flattened) positions "
                                 f"{bad.nonzero().flatten()[:8].tolist()}")
    raise ValueError("decomposed_kl produced non-finite terms from finite logits (overflow?)")


def min_bytes(n_rows: int, vocab: int, student_dtype: torch.dtype, teacher_dtype: torch.dtype,
              pass_: str = "forward", monolithic: bool = False,
              grad_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes a kernel pass must move at least: the numerator of its achieved bandwidth.

    forward: read s, a (and u, b unless monolithic) once; write terms [4, N] and stats [5, N] fp32.
    backward: read the same rows, stats, terms and grad_terms [4, N] fp32; write ds (and du) in
    grad_dtype (default: the student's). Per-row vectors are negligible next to the [N, V] rows.
    """
    rows = 1 if monolithic else 2  # student rows read (teacher: the same number)
    es, et = student_dtype.itemsize, teacher_dtype.itemsize
    total = n_rows * vocab * rows * (es + et) + (4 + N_STATS) * n_rows * 4
    if pass_ == "backward":
        total += n_rows * vocab * rows * (grad_dtype or student_dtype).itemsize + 4 * n_rows * 4
    elif pass_ != "forward":
        raise ValueError(f"pass_ must be 'forward' or 'backward', got {pass_!r}")
    return total
