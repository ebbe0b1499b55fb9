"""Gram: the k x k matrix of inner products of k gradient lists over the same parameters.

    G[a, b] = sum_j <g_a[j], g_b[j]>        (k = 1..4 components, j over parameters)

The gradients are never flattened or concatenated: one multi-tensor pass (apex
``multi_tensor_apply``) reads the k components of each parameter together, in one sweep, and
accumulates in fp32 (float32, bfloat16 and float16 gradients, mixed across parameters).

Inputs: ``grad_lists[i][j]`` is component i's gradient of parameter j; all components of a
parameter have its shape and dtype; ``None`` means "no gradient from that component" (zeros).
Contiguous tensors, and dense tensors whose components share the same strides (e.g. transposed),
take the fast path as flat views; any other layout is handled correctly by the reference.

Backends (vgs_kernels.ops.backend.resolve): C++ on CPU (csrc/multi_tensor.cpp: chunks over all
parameters, at::parallel_for, vectorised fp32 lanes summed in double), Triton on CUDA (this file:
one launch per dtype (and 16-byte alignment) over a device table of (pointers, numel) rows, built
by the C++ op vgs_kernels::pointer_table from the CPU kernels' own classification and cached by
content; persistent programs keep fp32 partials, a [programs, k, k] sum on the device; no host
synchronisation), and a plain-torch reference (float64). This file also holds the table helpers
that vgs_kernels/ops/combine.py shares. Minimal traffic: k reads per element.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from vgs_kernels.ops.backend import HAS_CPP, HAS_TRITON, resolve

GradList = Sequence[Optional[Tensor]]
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_K = 4
CHUNK = 1 << 16  # elements per Triton work item (the C++ kernel uses the same)
# Warps of the Gram kernel: with 4, ptxas spills 8 bytes at 80 registers in some aligned
# specialisations (sm_80 fp32 and sm_90 bf16 at KP = 2, sm_90 fp32 at KP = 4, STEPS >= 10);
# 8 warps halve the accumulator per thread (~60 registers, no spills: tests/ops/test_triton_compile.py).
NUM_WARPS = 8


# ----------------------------------------------------------------------------- input checks


def check_lists(grad_lists: Sequence[GradList], name: str = "grad_lists") -> Tuple[List[List[Optional[Tensor]]], torch.device]:
    """Validates k lists of T optional tensors; returns them as lists and their common device.

    Raises TypeError / ValueError naming the argument, the component and the parameter index.
    """
    if isinstance(grad_lists, Tensor) or not isinstance(grad_lists, Sequence):
        raise TypeError(f"{name} must be a sequence of k gradient lists, got {type(grad_lists).__name__}")
    lists = [list(g) for g in grad_lists]
    k = len(lists)
    if not 1 <= k <= MAX_K:
        raise ValueError(f"{name} must hold 1..{MAX_K} gradient lists (components), got {k}")
    n = len(lists[0])
    device = None
    for i, lst in enumerate(lists):
        if len(lst) != n:
            raise ValueError(f"{name}[{i}] has {len(lst)} tensors but {name}[0] has {n}: every "
                             "component must list the same parameters")
    for j in range(n):
        ref = None
        for i in range(k):
            g = lists[i][j]
            if g is None:
                continue
            if not isinstance(g, Tensor):
                raise TypeError(f"{name}[{i}][{j}] must be a Tensor or None, got {type(g).__name__}")
            if not g.is_floating_point():
                raise TypeError(f"{name}[{i}][{j}] must be a floating-point tensor, got dtype {g.dtype}")
            if ref is None:
                ref = g
            elif g.shape != ref.shape or g.dtype != ref.dtype:
                raise ValueError(f"{name}[{i}][{j}] has shape {tuple(g.shape)} and dtype {g.dtype}, but "
                                 f"the other components of parameter {j} have shape "
                                 f"{tuple(ref.shape)} and dtype {ref.dtype}")
            if device is None:
                device = g.device
            elif g.device != device:
                raise ValueError(f"{name}[{i}][{j}] is on {g.device} but other gradients are on {device}; "
                                 "all gradients must be on one device")
    return lists, device if device is not None else torch.device("cpu")


def quick_lists(grad_lists: Sequence[GradList]) -> Tuple[Optional[List[Optional[Tensor]]], int, Optional[torch.device]]:
    """(component-major flat list, k, device of the first present tensor) when grad_lists may go
    straight to the C++ ops (the kernels, or the Triton pointer table): k lists of one length
    whose first present tensor is a tensor (the op checks every tensor). Otherwise (None, k, None):
    the caller takes the checked Python path. O(k) Python work, not O(tensors)."""
    if isinstance(grad_lists, Tensor) or not isinstance(grad_lists, Sequence) or not HAS_CPP:
        return None, 0, None
    lists = [g if type(g) is list else list(g) for g in grad_lists]
    k = len(lists)
    if not 1 <= k <= MAX_K or any(len(lst) != len(lists[0]) for lst in lists):
        return None, k, None
    first = next((t for t in lists[0] if t is not None), None)  # usually the very first
    if not isinstance(first, Tensor):
        return None, k, None
    return [t for lst in lists for t in lst], k, first.device


def fast_backend(device: torch.device, backend: Optional[str]) -> Optional[str]:
    """"cpp" or "triton" when the call can take the C++-checked path on `device`, else None."""
    name = resolve(device, backend)
    return name if (name == "cpp" and device.type == "cpu") or (name == "triton" and HAS_CPP) else None


def _dense(t: Tensor) -> bool:
    """Whether t covers exactly numel consecutive elements in some dimension order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def flat_views(tensors: Sequence[Optional[Tensor]]) -> Optional[List[Optional[Tensor]]]:
    """1-D views of one parameter's tensors (None stays None) when all of them can be read as the
    same flat range of memory: dense, non-overlapping and with identical strides (contiguous is the
    common case; a shared permutation does not change inner products or elementwise sums).
    Returns None when any tensor needs the reference path, or when the dtype has no fast kernel."""
    present = [t for t in tensors if t is not None]
    if not present:
        return list(tensors)
    ref = present[0]
    if ref.dtype not in FAST_DTYPES:
        return None
    if all(t.is_contiguous() for t in present):  # the common case (shapes match): no stride analysis
        return [None if t is None else t.view(-1) for t in tensors]
    for t in present:
        if t.stride() != ref.stride() or not _dense(t):
            return None
    return [None if t is None else t.as_strided((t.numel(),), (1,)) for t in tensors]


def split_fast(columns: Sequence[Sequence[Optional[Tensor]]]) -> Tuple[List[int], List[List[Optional[Tensor]]], List[int]]:
    """Per-parameter columns -> (indices and flat views for the fast kernels, indices for the
    reference). Columns with no elements are in neither list."""
    fast_idx, fast, rest = [], [], []
    for j, col in enumerate(columns):
        if all(t is None or t.numel() == 0 for t in col):
            continue
        views = flat_views(col)
        if views is None:
            rest.append(j)
        else:
            fast_idx.append(j)
            fast.append(views)
    return fast_idx, fast, rest


# ----------------------------------------------------------------------------- reference


def gram_reference(grad_lists: Sequence[GradList]) -> Tensor:
    """Plain torch: flatten each gradient to float64, sum the dot products. [k, k] float32."""
    lists, device = check_lists(grad_lists)
    k = len(lists)
    G = torch.zeros(k, k, dtype=torch.float64, device=device)
    for j in range(len(lists[0])):
        flat = [None if lst[j] is None else lst[j].reshape(-1).double() for lst in lists]
        for a in range(k):
            for b in range(k):
                if flat[a] is not None and flat[b] is not None:
                    G[a, b] += torch.dot(flat[a], flat[b])
    return G.float()


# ----------------------------------------------------------------------------- Triton

# Device copies of the (pointer, numel) tables, keyed by their content: .grad buffers usually keep
# their addresses from step to step, so the table is built and copied once.
_TABLES: "OrderedDict[tuple, Tensor]" = OrderedDict()
_TABLES_MAX = 32


def device_table(table: Tensor, device: torch.device) -> Tensor:
    """`table` (int64, CPU) on `device`, cached by content (a non-blocking copy from pinned memory)."""
    key = (device, tuple(table.shape), table.numpy().tobytes())
    cached = _TABLES.get(key)
    if cached is None:
        cached = table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table
        _TABLES[key] = cached
        if len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return cached


def launch_tables(flat: List[Optional[Tensor]], k: int, out: List[Tensor], width: int, device: torch.device):
    """([(device table, rows, chunks, aligned, first parameter)] one per launch, rest indices).

    The C++ op vgs_kernels::pointer_table classifies the parameters as the C++ kernels do (flat
    ranges, fast dtypes, shapes and dtypes checked) and writes the rows [component pointers
    (0 = None) padded to `width`, out pointer (combine), numel, first chunk], grouped by dtype and
    16-byte alignment: no Python work per tensor. rest: parameters for the reference."""
    table, groups, rest = torch.ops.vgs_kernels.pointer_table(flat, k, out, width)
    launches = []
    for row0, n_rows, chunks, first in groups.tolist():
        rows = table[row0:row0 + n_rows]
        aligned = bool((rows[:, :-2] % 16 == 0).all())  # 0 (None) is aligned
        launches.append((device_table(rows, device), n_rows, chunks, aligned, first))
    return launches, rest


def n_programs(chunks: int, device: torch.device) -> int:
    """Persistent programs for `chunks` work items: enough to fill the GPU, never more than chunks."""
    if device.type == "cuda":
        slots = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another
        slots = 4
    return max(1, min(chunks, slots))


def search_steps(n_rows: int) -> int:
    """Binary-search steps that locate a chunk among n_rows rows."""
    return max(1, (n_rows - 1).bit_length())


if HAS_TRITON:
    import triton
    import triton.language as tl

    CHUNK_SIZE = tl.constexpr(CHUNK)

    @triton.jit
    def chunk_of(table, n_rows, c, ROW: tl.constexpr, STEPS: tl.constexpr):
        """(row, element start) of chunk c: binary search over the first-chunk column (STEPS >=
        log2(n_rows) unrolled steps, no data-dependent branches), so the table holds one row per
        tensor rather than one per chunk."""
        lo = 0
        hi = n_rows
        for _ in tl.static_range(STEPS):
            mid = (lo + hi) // 2
            right = tl.load(table + mid * ROW + ROW - 1) <= c
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        return lo, (c - tl.load(table + lo * ROW + ROW - 1)) * CHUNK_SIZE

    @triton.jit
    def chunk_rows(table, n_rows, c, dtype_ref, KP: tl.constexpr, ROW: tl.constexpr, STEPS: tl.constexpr,
                   ALIGNED: tl.constexpr):
        """Chunk c: its row, the row's KP pointers (null rows are absent components), which rows
        are present, and the element range [start, end). ALIGNED: every pointer is 16-byte aligned
        (checked on the host), which lets Triton vectorise the loads."""
        r, start = chunk_of(table, n_rows, c, ROW, STEPS)
        addr = tl.load(table + r * ROW + tl.arange(0, KP))
        ptrs = addr.to(dtype_ref.dtype, bitcast=True)
        if ALIGNED:  # (the hint must be on the pointers: int-to-pointer casts drop it)
            ptrs = tl.multiple_of(ptrs, 16)
        end = tl.minimum(start + CHUNK_SIZE, tl.load(table + r * ROW + ROW - 2))
        return r, ptrs, addr != 0, start, end

    @triton.jit
    def load_block(ptrs, present, s, end, offs, TAIL: tl.constexpr):
        """[KP, BLOCK] fp32 block at elements s + offs of the present rows (zeros elsewhere). Only
        the tail block masks the columns: full blocks stay vectorisable."""
        idx = s + offs
        if TAIL:
            mask = present[:, None] & (idx < end)[None, :]
        else:
            mask = present[:, None]
        return tl.load(ptrs[:, None] + idx[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _gram_kernel(table, n_rows, n_chunks, partial, dtype_ref, KP: tl.constexpr, ROW: tl.constexpr,
                     STEPS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        """Program p sums x x^T over chunks p, p + P, ... into partial[p] ([KP, KP] fp32)."""
        pid = tl.program_id(0)
        ks = tl.arange(0, KP)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([KP, KP, BLOCK], dtype=tl.float32)
        for c in range(pid, n_chunks, tl.num_programs(0)):
            _, ptrs, present, start, end = chunk_rows(table, n_rows, c, dtype_ref, KP, ROW, STEPS, ALIGNED)
            full = start + (end - start) // BLOCK * BLOCK
            for s in range(start, full, BLOCK):
                x = load_block(ptrs, present, tl.multiple_of(s, BLOCK), end, offs, False)
                acc += x[:, None, :] * x[None, :, :]
            for s in range(full, end, BLOCK):  # at most one
                x = load_block(ptrs, present, s, end, offs, True)
                acc += x[:, None, :] * x[None, :, :]
        tl.store(partial + pid * KP * KP + ks[:, None] * KP + ks[None, :], tl.sum(acc, axis=2))


def _pow2(k: int) -> int:
    return 1 << (k - 1).bit_length()


def on_device(device: torch.device):
    """Makes `device` current for Triton launches (they go to the current CUDA device and its
    stream, whatever device the pointers are on): gradients on cuda:1 while cuda:0 is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _gram_triton(flat: List[Optional[Tensor]], k: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """(G, rest) from the component-major flat list: one launch per (dtype, alignment) group."""
    G = torch.zeros(k, k, dtype=torch.float32, device=device)
    kp, n = _pow2(max(k, 2)), len(flat) // k
    launches, rest = launch_tables(flat, k, [], kp, device)
    for table, n_rows, chunks, is_aligned, first in launches:
        progs = n_programs(chunks, device)
        partial = torch.empty(progs, kp, kp, dtype=torch.float32, device=device)
        ref = next(flat[i * n + first] for i in range(k) if flat[i * n + first] is not None)
        with on_device(device):
            _gram_kernel[(progs,)](table, n_rows, chunks, partial, ref, KP=kp, ROW=kp + 2,
                                   STEPS=search_steps(n_rows), ALIGNED=is_aligned,
                                   BLOCK=4096 // (kp * kp), num_warps=NUM_WARPS)
        G += partial.sum(0)[:k, :k]
    return G, rest


# ----------------------------------------------------------------------------- public op


if HAS_CPP:
    @torch.library.register_fake("vgs_kernels::gram")
    def _(tensors, k):
        present = [t for t in tensors if t is not None]
        device = present[0].device if present else torch.device("cpu")
        return torch.empty(k, k, dtype=torch.float32, device=device)

    @torch.library.register_fake("vgs_kernels::gram_checked")
    def _(tensors, k):
        rest = torch.empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)
        return torch.empty(k, k, dtype=torch.float32), rest


def gram(grad_lists: Sequence[GradList], *, backend: Optional[str] = None) -> Tensor:
    """All pairwise inner products of k gradient lists.

    Args:
        grad_lists: k (1..4) sequences of T tensors or None; grad_lists[i][j] is component i's
            gradient of parameter j (float32 / bfloat16 / float16, any shape; the components of a
            parameter share shape and dtype; None reads as zeros).
        backend: None (global choice), "auto", "cpp", "triton" or "reference".

    Returns:
        G: [k, k] float32 on the gradients' device, G[a, b] = sum_j <g_a[j], g_b[j]>.
    """
    flat, k, device = quick_lists(grad_lists)
    name = flat is not None and fast_backend(device, backend)
    if not name:  # the checked Python path (odd inputs, the reference backend, no extension)
        lists, device = check_lists(grad_lists)
        name = resolve(device, backend)
        if name == "reference" or not HAS_CPP:
            return gram_reference(lists)
        flat = [t for lst in lists for t in lst]
        if all(t is None for t in flat):  # no tensor for the dispatcher to route by
            return torch.zeros(k, k, device=device)
    try:  # every check in C++: no Python work per tensor
        if name == "cpp":
            G, rest = torch.ops.vgs_kernels.gram_checked(flat, k)
        else:
            G, rest = _gram_triton(flat, k, device)
    except (RuntimeError, TypeError, ValueError):
        check_lists(grad_lists)  # raises the error that names the argument
        raise
    if rest.numel():
        n, rest = len(flat) // k, rest.tolist()
        G = G + gram_reference([[flat[i * n + j] for j in rest] for i in range(k)]).to(G.device)
    return G
