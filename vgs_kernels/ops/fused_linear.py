"""Fused-linear decomposed KL: LM heads + KL split + backward, chunked over tokens.

At Qwen3-VL's vocabulary (V = 151,936) the four [N, V] logit tensors dominate memory. Here the
student's hidden states h_s, h_u ([N, H_s]) and the teacher's h_a, h_b ([N, H_t]) go through the
LM heads a chunk of rows at a time, so at most [chunk, V] logits exist at once; the row kernels of
`decomposed_kl` (kl_forward / kl_backward) run on each chunk while its logits are fresh, and the
chunk's logit gradients go straight into dh = dz @ W and dW += dz^T h (torch matmuls: cuBLAS on
CUDA, MKL/oneDNN on CPU). Logits are z = logit_scale · (h @ W^T + bias), optionally soft-capped
to cap · tanh(z / cap) (Gemma-2 style), then divided by the temperature inside the KL kernels.

Two entry points. Costs below count head matmuls in units of one N x H x V product; the
materialised path (full logits + decomposed_kl + VGSLoss) does 4 forward + dh_s, dh_u, dW_s, dW_u
= 8 (dW over both inputs counted once: 7).

* `fused_linear_decomposed_kl` -> KLTerms per position, for any per-term cotangents. The
  cotangents are unknown in forward, so backward recomputes the four chunk logits: 4 + 4 + 4 = 12
  (10 when no gradient reaches u).

* `fused_linear_kl_loss` -> reduced losses, k weighted sums of (std, vis, lp), the op under
  vgs_kernels/losses/ (`FusedLinearVGSLoss`, the paper's loss; `OPDLoss`, its monolithic mode with
  the student entropy). Here every cotangent is known once the VDS quantiles are (the `Gate` the
  loss passes), so the gradients are computed during forward (Liger-Kernel's approach) and
  backward only scales them:
    phase 1  adaptive γ only: VDS = KL(qa ‖ qb) from the teacher rows alone (2) -> γ_t
    phase 2  s, u, a, b logits (4), all four terms, Std + Vis gradient into h_s and W (2)
    phase 3  LP: the batch's VDS quantile gates Lang to ~30% of the tokens; only those rows
             recompute u, b (2 x 0.3) and get the Lang gradient into h_u and W (2 x 0.3).
  Default loss: 7.2 against 8, so the fused step is not slower in arithmetic; adaptive: 9.2.
  Rejected: a VDS-only first pass for every configuration (8.6 - 9.2: it pays 2 teacher
  matmuls to save 0.6 of recompute) and recompute-in-backward (11 - 12). A detached prior is the
  default; without it Vis also reaches u (+2, as in the materialised path). Component-wise
  gradients (FusedLinearVGSLoss(components=True), for exact steering) keep the Std, Vis and LP gradients apart:
  +2 (dh_s and dW for Vis separately) and one more kl_backward pass per chunk, no more logits.
  Each chunk adds dz^T h into the [V, H] weight gradient, a read-modify-write of V·H floats per
  chunk: chunks should not be tiny (see `chunk_rows`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from vgs_kernels.ops.decomposed_kl import (N_STATS, KLTerms, acc_dtype, decomposed_kl_reference,
                                           divergence, kl_backward, kl_forward, valid_mask)

Pair = Union[float, Tuple[float, float]]
Rows = Union[slice, Tensor]

# Bytes of chunk workspace (a chunk's logits, their gradients, one temporary). Larger on CUDA:
# every chunk re-reads and re-writes the [V, H] weight-gradient accumulator, which costs little
# next to the chunk's matmuls on a CPU but a lot on a GPU unless chunks have ~1000 rows.
DEFAULT_MEMORY_BUDGET = {"cpu": 768 << 20, "cuda": 2 << 30}


def chunk_rows(n: int, vocab: int, itemsize: int, memory_budget: Optional[int] = None,
               device: Union[str, torch.device] = "cpu") -> int:
    """Rows per chunk so that the chunk's four logit rows, ds, du and one fp32 temporary fit in
    `memory_budget` bytes (default: DEFAULT_MEMORY_BUDGET of the device type). itemsize: the
    logits' (4: they are fp32 whatever the inputs, 8 for fp64)."""
    per_row = vocab * (6 * itemsize + 4)
    budget = memory_budget or DEFAULT_MEMORY_BUDGET.get(torch.device(device).type, 512 << 20)
    return max(1, min(n, budget // per_row))


def as_pair(x: Optional[Pair], name: str) -> Tuple[Optional[float], Optional[float]]:
    """One value for both models, or (student, teacher)."""
    pair = tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    if len(pair) != 2:
        raise ValueError(f"{name} must be a number or a (student, teacher) pair, got {x!r}")
    return pair


# ----------------------------------------------------------------------------- wide products
# A model's lm_head multiplies in its compute dtype (the hidden states', or autocast's). Rounding
# its product to bf16 before the softmax costs the KL of a close student ~100x its error (the
# logits of two close models differ by little more than bf16's 2^-8), so the products here take
# operands in the compute dtype and accumulate and return them in fp32 (fp64 for fp64 inputs)
# with no rounding in between, as TRL's _chunked_divergence_loss does. CUDA does it in one matmul
# (out_dtype); ATen's CPU matmul has no mixed output, so there a low-precision head is widened a
# block of VOCAB_BLOCK rows at a time (bounded memory), and bf16 values go through oneDNN's bf16 dot
# products with fp32 accumulation: exact for bf16 values, at about twice an fp32 matmul's speed.
VOCAB_BLOCK = 1024  # 1024 x H x 4 bytes; larger blocks were slower on the CPU measured (cache)


def compute_dtype(h: Tensor) -> torch.dtype:
    """The dtype a model's lm_head multiplies h in: autocast's when it is on (fp64 is never cast)."""
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and h.dtype != torch.float64 else h.dtype


@contextlib.contextmanager
def _bf16_products(compute: torch.dtype) -> Iterator[None]:
    """fp32 CPU matmuls of bf16 values as oneDNN bf16 dot products (restored on exit)."""
    if compute != torch.bfloat16 or not _ONEDNN_BF16:
        yield
        return
    mm = torch.backends.mkldnn.matmul
    old, mm.fp32_precision = mm.fp32_precision, "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = old


_ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def vocab_blocks(vocab: int, compute: torch.dtype, out: torch.dtype, device: torch.device) -> List[slice]:
    """Slices of the vocabulary a product through a head is split into (one unless widened on CPU)."""
    if compute == out or device.type == "cuda":
        return [slice(None)]
    return [slice(i, i + VOCAB_BLOCK) for i in range(0, vocab, VOCAB_BLOCK)]


def addmm_wide(acc: Tensor, a: Tensor, b: Tensor, compute: torch.dtype) -> Tensor:
    """acc += a @ b: operands rounded to `compute` (a no-op for operands already in it), products
    accumulated in acc's dtype (fp32 / fp64), in place; returns acc."""
    if compute == acc.dtype or acc.dtype == torch.float64:
        return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    if acc.is_cuda:
        return torch.addmm(acc, a.to(compute), b.to(compute), out_dtype=acc.dtype, out=acc)
    with _bf16_products(compute):  # oneDNN rounds an fp32 operand (the logit gradient) to bf16 itself
        return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class HeadPair:
    """Student (0) and teacher (1) LM heads with their logit transforms. compute: each model's
    compute dtype (`compute_dtype`); out: the logits' dtype (fp32, fp64 for fp64 inputs)."""

    def __init__(self, w_s, b_s, w_t, b_t, compute: Sequence[torch.dtype], out: torch.dtype, logit_scale: Pair,
                 softcap: Optional[Pair]):
        self.compute, self.out = tuple(compute), out
        self.w = [w.detach().to(dt) for w, dt in zip((w_s, w_t), compute)]
        self.bias = [None if bb is None else bb.detach().to(out) for bb in (b_s, b_t)]
        self.scale, self.cap = as_pair(logit_scale, "logit_scale"), as_pair(softcap, "softcap")

    def blocks(self, k: int) -> List[slice]:
        return vocab_blocks(self.w[k].shape[0], self.compute[k], self.out, self.w[k].device)

    def logits(self, h: Tensor, k: int) -> Tensor:
        """cap · tanh(scale · (h @ W^T + bias) / cap): [rows, V] in `out`, all of it in `out`."""
        w, bias, scale, cap = self.w[k], self.bias[k], self.scale[k], self.cap[k]
        z = h.new_zeros((h.shape[0], w.shape[0]), dtype=self.out) if bias is None else \
            bias.expand(h.shape[0], -1).contiguous()
        h = h.to(self.compute[k])
        for blk in self.blocks(k):
            addmm_wide(z[:, blk], h, w[blk].T, self.compute[k])
        if scale != 1:
            z.mul_(scale)
        if cap is not None:
            z.div_(cap).tanh_().mul_(cap)
        return z

    def pair(self, x: Tensor, y: Optional[Tensor], k: int) -> Tuple[Tensor, Optional[Tensor]]:
        """Logits of x and y (or None) through head k in one matmul: [V, H] is streamed once."""
        if y is None:
            return self.logits(x, k), None
        z = self.logits(torch.cat([x, y]), k)
        return z[:x.shape[0]], z[x.shape[0]:]

    def grad_input(self, dz: Tensor) -> Tensor:
        """dz @ W_student: [rows, V] -> [rows, H] in `out`."""
        dh = dz.new_zeros((dz.shape[0], self.w[0].shape[1]))
        for blk in self.blocks(0):
            addmm_wide(dh, dz[:, blk], self.w[0][blk], self.compute[0])
        return dh

    def add_grad_weight(self, acc: Tensor, dz: Tensor, h: Tensor) -> None:
        """acc += dz^T @ h ([V, H]; one rounding per call when acc is narrower than `out`)."""
        for blk in self.blocks(0):
            if acc.dtype == self.out:
                addmm_wide(acc[blk], dz[:, blk].T, h, self.compute[0])
            else:
                acc[blk] += addmm_wide(acc.new_zeros(acc[blk].shape, dtype=self.out), dz[:, blk].T, h, self.compute[0])

    def to_preactivation(self, dl: Tensor, logits: Tensor) -> Tensor:
        """Student logit gradient -> gradient of h @ W^T + bias (in place on dl)."""
        scale, cap = self.scale[0], self.cap[0]
        if cap is not None:  # d cap·tanh(z/cap) / dz = 1 - tanh² = 1 - (logits/cap)²
            dl.mul_(torch.div(logits, cap).square_().neg_().add_(1))
        if scale != 1:
            dl.mul_(scale)
        return dl


class _Grads:
    """Gradients of one loss component w.r.t. h_s, h_u, the student weight and bias (None when
    not wanted, or never reached for h_s / h_u). The weight gradient is accumulated over chunks
    in `acc_dtype`."""

    def __init__(self, h_s, h_u, w, bias, want: Sequence[bool], acc_dtype: torch.dtype):
        self.inputs, self.h = (h_s, h_u), [None, None]
        self.want_h = [h is not None and ok for h, ok in zip((h_s, h_u), want)]
        self.w = torch.zeros(w.shape, dtype=acc_dtype, device=w.device) if want[2] else None
        self.bias = (torch.zeros(w.shape[0], dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
                     if bias is not None and want[3] else None)
        self.active = any(self.want_h) or self.w is not None or self.bias is not None

    def add(self, k: int, rows: Rows, dz: Tensor, h: Tensor, heads: HeadPair) -> None:
        """Rows `rows` of input k (0: h_s, 1: h_u) had pre-activation gradient dz [rows, V]."""
        if self.want_h[k]:
            if self.h[k] is None:
                self.h[k] = torch.zeros_like(self.inputs[k])
            self.h[k][rows] += heads.grad_input(dz)
        if self.w is not None:
            heads.add_grad_weight(self.w, dz, h)
        if self.bias is not None:
            self.bias += dz.sum(0, dtype=self.bias.dtype)

    def outputs(self) -> List[Optional[Tensor]]:
        return [self.h[0], self.h[1], self.w, self.bias]


def _chunks(n: int, rows: Optional[Tensor], size: int) -> Iterator[Rows]:
    """Consecutive slices of range(n), or pieces of the index tensor `rows`."""
    if rows is None:
        yield from (slice(i, min(n, i + size)) for i in range(0, n, size))
    else:
        yield from (rows[i:i + size] for i in range(0, rows.numel(), size))


class FusedLinearConfig:
    """Everything but the tensors: the heads' transforms, temperature, chunking, backend."""

    def __init__(self, temperature, logit_scale, softcap, detach_prior, chunk_size, memory_budget,
                 fp32_weight_grad, backend, beta: float = 1.0):
        self.inv_t, self.logit_scale, self.softcap, self.beta = 1.0 / temperature, logit_scale, softcap, beta
        self.detach_prior, self.chunk_size, self.memory_budget = detach_prior, chunk_size, memory_budget
        self.fp32_weight_grad, self.backend = fp32_weight_grad, backend
        self.compute: Optional[Tuple[torch.dtype, torch.dtype]] = None

    def setup(self, h_s, h_u, w_s, b_s, h_a, h_b, w_t, b_t):
        """(heads, chunk rows, logits for rows r) for these tensors."""
        if self.compute is None:  # resolved in forward, under the caller's autocast; kept for backward
            self.compute = (compute_dtype(h_s), compute_dtype(h_a))
        out = acc_dtype(h_s, h_a)
        heads = HeadPair(w_s, b_s, w_t, b_t, self.compute, out, self.logit_scale, self.softcap)
        chunk = self.chunk_size or chunk_rows(h_s.shape[0], w_s.shape[0], torch.finfo(out).bits // 8,
                                              self.memory_budget, h_s.device)

        def logits(r: Rows) -> Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
            return (*heads.pair(h_s[r], None if h_u is None else h_u[r], 0),
                    *heads.pair(h_a[r], None if h_b is None else h_b[r], 1))

        return heads, chunk, logits

    def grads(self, h_s, h_u, w_s, b_s, want) -> _Grads:
        acc = torch.promote_types(w_s.dtype, torch.float32) if self.fp32_weight_grad else w_s.dtype
        return _Grads(h_s, h_u, w_s, b_s, want, acc)


# ----------------------------------------------------------------------------- KLTerms op


class FusedLinearKLFunction(torch.autograd.Function):
    """Hidden rows [N, H] -> the term rows std, vis, lang, vds ([N] each); backward recomputes the
    chunk logits. As DecomposedKLFunction: absent cotangents arrive as None, and the side (h_s
    or h_u) that no live cotangent reaches gets no gradient and no work (no host sync)."""

    @staticmethod
    def forward(ctx, h_s, h_u, w_s, b_s, h_a, h_b, w_t, b_t, rows: Optional[Tensor], cfg: FusedLinearConfig):
        _, chunk, logits = cfg.setup(h_s, h_u, w_s, b_s, h_a, h_b, w_t, b_t)
        n, acc = h_s.shape[0], acc_dtype(h_s, h_u, h_a, h_b)
        terms = torch.zeros(4, n, dtype=acc, device=h_s.device)
        stats = torch.zeros(N_STATS, n, dtype=acc, device=h_s.device)
        for r in _chunks(n, rows, chunk):
            terms[:, r], stats[:, r] = kl_forward(*logits(r), cfg.inv_t, backend=cfg.backend, beta=cfg.beta)
        ctx.save_for_backward(h_s, h_u, w_s, b_s, h_a, h_b, w_t, b_t, rows, stats, terms)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        std, vis, lang, vds = terms.unbind(0)
        ctx.mark_non_differentiable(vds)
        return std, vis, lang, vds

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_std, g_vis, g_lang, _g_vds):
        h_s, h_u, w_s, b_s, h_a, h_b, w_t, b_t, rows, stats, terms = ctx.saved_tensors
        cfg = ctx.cfg
        # s gets a gradient from Std and Vis; u only from Lang, or from Vis when the prior is not detached.
        live_s = g_std is not None or (h_u is not None and g_vis is not None)
        live_u = h_u is not None and (g_lang is not None or (not cfg.detach_prior and g_vis is not None))
        if not (live_s or live_u):
            return (None,) * 10
        want = list(ctx.needs_input_grad[:4])
        want[0], want[1] = want[0] and live_s, want[1] and live_u
        heads, chunk, logits = cfg.setup(h_s, h_u, w_s, b_s, h_a, h_b, w_t, b_t)
        grads = cfg.grads(h_s, h_u, w_s, b_s, want)
        zero = terms.new_zeros(terms.shape[1:])
        grad_terms = torch.stack([zero if g is None else g for g in (g_std, g_vis, g_lang)] + [zero])

        def chunk_step(r: Rows) -> None:  # the chunk's logits die on return, before the next chunk's
            s, u, a, b = logits(r)
            ds, du = kl_backward(s, u, a, b, stats[:, r], terms[:, r], grad_terms[:, r], cfg.inv_t,
                                 cfg.detach_prior, backend=cfg.backend, beta=cfg.beta)
            if live_s:
                grads.add(0, r, heads.to_preactivation(ds, s), h_s[r], heads)
            if live_u:
                grads.add(1, r, heads.to_preactivation(du, u), h_u[r], heads)

        for r in _chunks(h_s.shape[0], rows, chunk):
            chunk_step(r)
        return (*grads.outputs(), None, None, None, None, None, None)


def check_inputs(h_s, h_u, w_s, h_a, h_b, w_t, mask, b_s, b_t, temperature, softcap, chunk_size,
                 beta: float = 1.0) -> None:
    """Raises TypeError / ValueError naming the offending argument."""
    divergence(beta, four_term=None if h_u is None else ("h_u", "h_b"))
    if (h_u is None) != (h_b is None):
        raise ValueError("h_u and h_b must be given together (decomposed) or both be None (monolithic)")
    named = [(n, t) for n, t in (("h_s", h_s), ("h_u", h_u), ("w_student", w_s), ("h_a", h_a),
                                  ("h_b", h_b), ("w_teacher", w_t), ("bias_student", b_s),
                                  ("bias_teacher", b_t)) if t is not None]
    for name, t in named:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if t.device != h_s.device:
            raise ValueError(f"{name} is on {t.device} but h_s is on {h_s.device}")
    for name, w in (("w_student", w_s), ("w_teacher", w_t)):
        if w.dim() != 2:
            raise ValueError(f"{name} must be an LM-head weight [V, H], got shape {tuple(w.shape)}")
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: w_student has V={w_s.shape[0]}, "
                         f"w_teacher has V={w_t.shape[0]} (the KL needs the same vocabulary); heads padded beyond "
                         "the tokenizer's ids: pass vocab_size=len(tokenizer)")
    if h_s.dim() < 1 or h_s.shape[-1] != w_s.shape[1]:
        raise ValueError(f"h_s must be [..., {w_s.shape[1]}] (the hidden size of w_student), "
                         f"got {tuple(h_s.shape)}")
    if h_a.shape != h_s.shape[:-1] + (w_t.shape[1],):
        raise ValueError(f"h_a must be {tuple(h_s.shape[:-1]) + (w_t.shape[1],)} (the positions of h_s, "
                         f"the hidden size of w_teacher), got {tuple(h_a.shape)}")
    for name, h, ref in (("h_u", h_u, h_s), ("h_b", h_b, h_a)):
        if h is not None and (h.shape != ref.shape or h.dtype != ref.dtype):
            raise ValueError(f"{name} must match {'h_s' if ref is h_s else 'h_a'} "
                             f"({tuple(ref.shape)}, {ref.dtype}), got ({tuple(h.shape)}, {h.dtype})")
    for name, bias in (("bias_student", b_s), ("bias_teacher", b_t)):
        if bias is not None and bias.shape != (w_s.shape[0],):
            raise ValueError(f"{name} must have shape ({w_s.shape[0]},), got {tuple(bias.shape)}")
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != h_s.shape[:-1]):
        raise ValueError(f"mask must have the leading shape of h_s {tuple(h_s.shape[:-1])}, got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    if not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    for cap in as_pair(softcap, "softcap"):
        if cap is not None and not 0 < cap < math.inf:
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def valid_rows(mask: Optional[Tensor]) -> Optional[Tensor]:
    """Indices of the valid positions (None: all). One host sync; masked rows are never computed."""
    if mask is None:
        return None
    return valid_mask(mask, (), mask.device).reshape(-1).nonzero().squeeze(1)


def full_tensor(t: Optional[Tensor]) -> Optional[Tensor]:
    """An FSDP2 LM head (a DTensor) as one plain tensor, as TRL takes it: one all-gather, and the
    gradient goes back to the shards through full_tensor's backward."""
    if t is not None and torch.distributed.is_available():
        from torch.distributed.tensor import DTensor
        if isinstance(t, DTensor):
            return t.full_tensor()
    return t


def vocab_heads(w_s: Tensor, w_t: Tensor, b_s: Optional[Tensor], b_t: Optional[Tensor],
                vocab_size: Optional[int]) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """The heads as the kernels take them: DTensors gathered (`full_tensor`), and with ``vocab_size`` = n
    their first n rows (views: the rows beyond n are never read and get a zero gradient), for heads
    padded beyond the tokenizer's ids (Qwen2.5-VL-7B: 152,064 rows, 3B: 151,936, for 151,665 ids)."""
    w_s, w_t, b_s, b_t = map(full_tensor, (w_s, w_t, b_s, b_t))
    if vocab_size is None:
        return w_s, w_t, b_s, b_t
    sizes = (w_s.shape[0] if w_s.dim() == 2 else None, w_t.shape[0] if w_t.dim() == 2 else None)
    if (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1
            or any(v is not None and vocab_size > v for v in sizes)):
        raise ValueError(f"vocab_size must be an int in [1, the smaller head's rows]: w_student has "
                         f"{sizes[0]} rows, w_teacher {sizes[1]}, got vocab_size={vocab_size!r}")
    cut = lambda x: None if x is None else x[:vocab_size]  # noqa: E731
    return cut(w_s), cut(w_t), cut(b_s), cut(b_t)


def flatten(h: Optional[Tensor]) -> Optional[Tensor]:
    return None if h is None else h.reshape(-1, h.shape[-1])


def fused_linear_decomposed_kl(h_s: Tensor, h_u: Optional[Tensor], w_student: Tensor, h_a: Tensor,
                               h_b: Optional[Tensor], w_teacher: Tensor, mask: Optional[Tensor] = None,
                               *, bias_student: Optional[Tensor] = None,
                               bias_teacher: Optional[Tensor] = None, temperature: float = 1.0,
                               logit_scale: Pair = 1.0, softcap: Optional[Pair] = None,
                               detach_prior: bool = True, chunk_size: Optional[int] = None,
                               memory_budget: Optional[int] = None, fp32_weight_grad: bool = True,
                               backend: Optional[str] = None, beta: float = 1.0,
                               vocab_size: Optional[int] = None) -> KLTerms:
    """`decomposed_kl` of the LM heads' logits without materialising them.

    h_s, h_u: student hidden states with / without the image [..., H_s]; w_student: [V, H_s] (may
    be the tied input embedding); h_a, h_b: teacher hidden states [..., H_t]; w_teacher: [V, H_t].
    h_u = h_b = None: monolithic mode (Std only). Logits are logit_scale · (h @ W^T + bias),
    soft-capped to softcap · tanh(z / softcap) when softcap is set (a number for both models or a
    (student, teacher) pair, also for logit_scale). mask: bool or 0/1 of the leading shape; masked
    positions are skipped (0 terms, 0 gradients). chunk_size: positions per chunk (default: from
    `memory_budget` bytes, see `chunk_rows`). fp32_weight_grad: accumulate dW over chunks in fp32.
    beta: the monolithic mode's divergence (`decomposed_kl`). vocab_size: both distributions over the
    first n ids (`vocab_heads`: padded heads of different sizes). Returns KLTerms of the leading shape,
    float32 (float64 for float64 inputs), differentiable w.r.t. h_s, h_u, w_student and bias_student;
    the teacher gets no gradient.
    """
    w_student, w_teacher, bias_student, bias_teacher = vocab_heads(w_student, w_teacher, bias_student,
                                                                   bias_teacher, vocab_size)
    check_inputs(h_s, h_u, w_student, h_a, h_b, w_teacher, mask, bias_student, bias_teacher, temperature,
                 softcap, chunk_size, beta)
    cfg = FusedLinearConfig(temperature, logit_scale, softcap, detach_prior, chunk_size, memory_budget,
                            fp32_weight_grad, backend, beta)
    terms = FusedLinearKLFunction.apply(flatten(h_s), flatten(h_u), w_student, bias_student, flatten(h_a),
                                        flatten(h_b), w_teacher, bias_teacher, valid_rows(mask), cfg)
    return KLTerms(*(t.reshape(h_s.shape[:-1]) for t in terms))


def head_logits(h: Tensor, w: Tensor, bias: Optional[Tensor] = None, logit_scale: float = 1.0,
                softcap: Optional[float] = None) -> Tensor:
    """The materialised logits [..., V] (plain torch, differentiable): the reference's first step.
    Operands rounded to h's compute dtype, the product and the transform in fp32 (fp64 for fp64 h),
    as the fused path computes them (`HeadPair`)."""
    cd, out = compute_dtype(h), acc_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        z = torch.nn.functional.linear(h.to(cd).to(out), w.to(cd).to(out), None if bias is None else bias.to(out))
    z = z * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def fused_linear_decomposed_kl_reference(h_s, h_u, w_student, h_a, h_b, w_teacher, mask=None, *,
                                         bias_student=None, bias_teacher=None, temperature=1.0,
                                         logit_scale: Pair = 1.0, softcap: Optional[Pair] = None,
                                         detach_prior=True, beta: float = 1.0,
                                         vocab_size: Optional[int] = None) -> KLTerms:
    """Materialise the four logit tensors, then `decomposed_kl_reference` (tests, spec)."""
    (sc_s, sc_t), (cap_s, cap_t) = as_pair(logit_scale, "logit_scale"), as_pair(softcap, "softcap")
    if vocab_size is not None:
        w_student, w_teacher = w_student[:vocab_size], w_teacher[:vocab_size]
        bias_student, bias_teacher = (None if x is None else x[:vocab_size] for x in (bias_student, bias_teacher))
    stu = [None if h is None else head_logits(h, w_student, bias_student, sc_s, cap_s) for h in (h_s, h_u)]
    tea = [None if h is None else head_logits(h, w_teacher, bias_teacher, sc_t, cap_t) for h in (h_a, h_b)]
    return decomposed_kl_reference(stu[0], stu[1], tea[0], tea[1], mask, temperature, detach_prior, beta)


# ----------------------------------------------------------------------------- the loss


class _FusedLinearLossFunction(torch.autograd.Function):
    """(h_s, h_u, w_student, bias) -> (k values (scalars), components [3], terms [4, N], entropy [N]).

    The gradients of the k values (rows of `coeffs` applied to the std, vis, lp components) are
    computed in forward; backward scales them by the incoming cotangents. Each value is its own
    output, so a value with no cotangent arrives as None and adds nothing (e.g. the std backward
    of an exact step leaves h_u without a gradient: the text-only graph is not traversed).
    """

    @staticmethod
    def forward(ctx, h_s, h_u, w_s, b_s, h_a, h_b, w_t, b_t, rows, valid, weights, gate: "Gate",
                cfg: FusedLinearConfig, coeffs: List[Tuple[float, float, float]], want_entropy: bool,
                grad_enabled: bool):
        want = [need and grad_enabled for need in ctx.needs_input_grad[:4]]  # no work under no_grad
        grads = [cfg.grads(h_s, h_u, w_s, b_s, want) for _ in coeffs]
        comps, terms, entropy = _fused_loss(h_s, h_u, w_s, b_s, h_a, h_b, w_t, b_t, rows, valid, weights, gate,
                                            cfg, coeffs, grads, want_entropy)
        ctx.grads = [g.outputs() for g in grads]
        values = [sum(c * x for c, x in zip(cs, comps)) for cs in coeffs]
        ctx.mark_non_differentiable(comps, terms, entropy)
        ctx.set_materialize_grads(False)
        return (*values, comps, terms, entropy)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        out = [None] * 4
        for i in range(4):  # h_s, h_u, w_s, b_s: Σ_k grad_k · G_k, one new tensor (G_k stay
            for g, grads in zip(grad_outputs, ctx.grads):  # intact for another backward pass)
                if g is not None and grads[i] is not None:
                    out[i] = grads[i] * g if out[i] is None else out[i].addcmul_(grads[i], g)
        return (*out,) + (None,) * 12


class Gate(NamedTuple):
    """How the decomposed loss weighs Vis and Lang per token from the detached VDS: ``factors(vds [N],
    valid [N]) -> (f [N] or None, g [N])``, the adaptive-γ factor (None: 1) and the LP gate
    (vgs_kernels/losses/vgs.py, ``VGSLoss.vds_factors``); ``adaptive``: f needs VDS before phase 2."""

    factors: Callable[[Tensor, Tensor], Tuple[Optional[Tensor], Tensor]]
    adaptive: bool = False


def fused_linear_kl_loss(h_s: Tensor, h_u: Optional[Tensor], w_student: Tensor, h_a: Tensor, h_b: Optional[Tensor],
                         w_teacher: Tensor, mask: Optional[Tensor], weights: Tensor,
                         coeffs: Sequence[Tuple[float, float, float]],
                         config: FusedLinearConfig, *, bias_student: Optional[Tensor] = None,
                         bias_teacher: Optional[Tensor] = None, gate: Optional[Gate] = None,
                         entropy: bool = False) -> Tuple[List[Tensor], Tensor, Tensor, Optional[Tensor]]:
    """Reduced fused-linear KL losses, their gradients computed in forward (module docstring).

    h_s, h_u [..., H_s], h_a, h_b [..., H_t] (h_u = h_b = None: monolithic, Std only), heads [V, H_*]
    as `fused_linear_decomposed_kl` (inputs checked by `check_inputs`); mask: bool or 0/1 of the leading
    shape (None: all valid; masked rows are never computed); weights: the reduction weights of the
    leading shape (float32, float64 for float64 inputs), zero where masked; coeffs: k rows (c_std, c_vis, c_lp); gate: the decomposed mode's VDS
    weighting (required there). Returns (values, comps, terms, entropy): k scalars value_i =
    coeffs[i] · comps, each differentiable w.r.t. h_s, h_u, w_student and bias_student; comps [3] the
    reduced (std, vis, lp), detached; terms [4, N] the per-row KL terms (vis, lang, vds 0 in
    monolithic mode), detached; entropy [N] (``entropy=True``, monolithic only) the student entropy
    H(softmax(s/T)) per row in nats, else None.
    """
    mono = h_u is None
    if mono == (gate is not None) or (entropy and not mono):
        raise ValueError("fused_linear_kl_loss: gate= goes with the decomposed mode (h_u, h_b given) and "
                         "entropy=True with the monolithic one")
    valid = valid_mask(mask, h_s.shape[:-1], h_s.device).reshape(-1)
    w_student, w_teacher, bias_student, bias_teacher = map(full_tensor, (w_student, w_teacher, bias_student,
                                                                         bias_teacher))
    *values, comps, terms, ent = _FusedLinearLossFunction.apply(
        flatten(h_s), flatten(h_u), w_student, bias_student, flatten(h_a), flatten(h_b), w_teacher, bias_teacher,
        valid_rows(mask), valid, weights.reshape(-1), gate, config, list(coeffs), entropy, torch.is_grad_enabled())
    return values, comps, terms, ent if entropy else None


def _fused_loss(h_s, h_u, w_s, b_s, h_a, h_b, w_t, b_t, rows, valid, weights, gate, cfg, coeffs, grads,
                want_entropy):
    """The three phases of the module docstring; fills `grads` (one _Grads per row of coeffs).
    valid: bool [N]; rows: its indices (None: all); weights: the reduction weights [N].
    Returns (components std, vis, lp [3], terms [4, N], student entropy [N] (want_entropy; else [0]))."""
    heads, chunk, logits = cfg.setup(h_s, h_u, w_s, b_s, h_a, h_b, w_t, b_t)
    n, mono, inv_t, be = h_s.shape[0], h_u is None, cfg.inv_t, cfg.backend
    terms = torch.zeros(4, n, dtype=weights.dtype, device=h_s.device)
    entropy = torch.zeros(n if want_entropy else 0, dtype=weights.dtype, device=h_s.device)
    w_vis = weights
    adaptive = gate is not None and gate.adaptive
    if adaptive:  # phase 1: VDS = KL(qa ‖ qb) is the monolithic KL of (a, b)
        for r in _chunks(n, rows, chunk):
            a, b = heads.pair(h_a[r], h_b[r], 1)
            terms[3, r] = kl_forward(a, None, b, None, inv_t, backend=be)[0][0]
            del a, b
        w_vis = weights * gate.factors(terms[3], valid)[0]
    n_terms = 3 if adaptive else 4  # adaptive: keep phase 1's VDS, which set γ_t

    def main_step(r: Rows) -> None:  # phase 2 on rows r: the Std and Vis gradients
        s, u, a, b = logits(r)
        t, st = kl_forward(s, u, a, b, inv_t, backend=be, beta=cfg.beta)
        terms[:n_terms, r] = t[:n_terms]
        if want_entropy:  # H(p) = log V - KL(p ‖ uniform): one more read of s
            flat = s.new_zeros(1, s.shape[1]).expand_as(s)
            entropy[r] = math.log(s.shape[1]) - kl_forward(s, None, flat, None, inv_t, backend=be)[0][0]
        for (c_std, c_vis, _), g in zip(coeffs, grads):  # one kl_backward per component
            if not g.active or (c_std == 0 and (c_vis == 0 or mono)):
                continue
            cot = torch.zeros_like(t)
            cot[0], cot[1] = c_std * weights[r], c_vis * w_vis[r]
            ds, du = kl_backward(s, u, a, b, st, t, cot, inv_t, cfg.detach_prior, backend=be, beta=cfg.beta)
            g.add(0, r, heads.to_preactivation(ds, s), h_s[r], heads)
            if not mono and not cfg.detach_prior and c_vis != 0:
                g.add(1, r, heads.to_preactivation(du, u), h_u[r], heads)
            del ds, du  # before the next component's

    for r in _chunks(n, rows, chunk):
        main_step(r)
    if mono:
        return torch.stack([(weights * terms[0]).sum(), weights.new_zeros(()), weights.new_zeros(())]), terms, entropy
    # phase 3: LP, Lang = KL(pu ‖ qb) on the tokens above the VDS quantile only
    w_lang = weights * gate.factors(terms[3], valid)[1]
    lp = [(c_lang, g) for (_, _, c_lang), g in zip(coeffs, grads) if c_lang != 0 and g.active]

    def lp_step(r: Rows) -> None:  # phase 3 on gated rows r: the Lang gradient
        u, b = heads.logits(h_u[r], 0), heads.logits(h_b[r], 1)
        t, st = kl_forward(u, None, b, None, inv_t, backend=be)
        for c_lang, g in lp:
            cot = torch.zeros_like(t)
            cot[0] = c_lang * w_lang[r]
            du = kl_backward(u, None, b, None, st, t, cot, inv_t, True, backend=be)[0]
            g.add(1, r, heads.to_preactivation(du, u), h_u[r], heads)
            del du

    if lp:
        for r in _chunks(n, w_lang.nonzero().squeeze(1), chunk):
            lp_step(r)
    comps = torch.stack([(weights * terms[0]).sum(), (w_vis * terms[1]).sum(), (w_lang * terms[2]).sum()])
    return comps, terms, entropy
