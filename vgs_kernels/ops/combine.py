"""Combine: out[j] = sum_i coeffs[i] * g_i[j] for every parameter j, in one pass, in place.

The last step before the optimizer: the policy's k coefficients (a device tensor, so no host
synchronisation) weight the k component gradients, and the result is written into ``out``
(usually each parameter's ``.grad``, which may also hold g_0: every element is read before it is
written). The arithmetic is fp32; the result is stored in the parameter's dtype. A parameter with
no gradient from any component gets zeros.

Backends as for vgs_kernels/ops/gram.py (C++ on CPU, Triton on CUDA, plain-torch reference), with the
same fast path (contiguous, or dense with the strides shared by out and inputs) and the reference
for any other layout. Minimal traffic: k reads + 1 write per element.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from vgs_kernels.ops.backend import HAS_CPP, HAS_TRITON, resolve
from vgs_kernels.ops.gram import (GradList, check_lists, fast_backend, launch_tables, n_programs, on_device,
                              quick_lists, search_steps, _pow2)


def _check(out_tensors: Sequence[Tensor], grad_lists: Sequence[GradList],
           coeffs: Union[Tensor, Sequence[float]]):
    lists, device = check_lists(grad_lists)
    out = list(out_tensors)
    if len(out) != len(lists[0]):
        raise ValueError(f"out_tensors has {len(out)} tensors but grad_lists has {len(lists[0])} per component")
    for j, o in enumerate(out):
        if not isinstance(o, Tensor):
            raise TypeError(f"out_tensors[{j}] must be a Tensor, got {type(o).__name__}")
        g = next((lst[j] for lst in lists if lst[j] is not None), None)
        if g is not None and (g.shape != o.shape or g.dtype != o.dtype or g.device != o.device):
            raise ValueError(f"out_tensors[{j}] has shape {tuple(o.shape)}, dtype {o.dtype}, device {o.device}; "
                             f"expected {tuple(g.shape)}, {g.dtype}, {g.device} like its gradients")
    if out and all(all(lst[j] is None for lst in lists) for j in range(len(out))):
        device = out[0].device
    k = len(lists)
    c = torch.as_tensor(coeffs)
    if c.shape != (k,) or not (c.is_floating_point()):
        raise ValueError(f"coeffs must be a float tensor of shape [{k}] (one per component), got "
                         f"{c.dtype} {tuple(c.shape)}")
    return out, lists, c.to(device=device, dtype=torch.float32), device


def combine_reference(out_tensors: Sequence[Tensor], grad_lists: Sequence[GradList],
                      coeffs: Union[Tensor, Sequence[float]]) -> None:
    """Plain torch: the fp32 sum per parameter, then one copy into out (safe when out aliases)."""
    out, lists, c, _ = _check(out_tensors, grad_lists, coeffs)
    for j, o in enumerate(out):
        acc = torch.zeros(o.shape, dtype=torch.float32, device=o.device)
        for i, lst in enumerate(lists):
            if lst[j] is not None:
                acc += c[i] * lst[j].float()
        o.copy_(acc)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from vgs_kernels.ops.gram import chunk_rows, load_block

    @triton.jit
    def _combine_kernel(table, n_rows, n_chunks, coeffs, dtype_ref, K: tl.constexpr, KP: tl.constexpr,
                        ROW: tl.constexpr, STEPS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        """Program p writes chunks p, p + P, ...: out = sum_i c_i x_i (rows: KP inputs, out, numel)."""
        ks = tl.arange(0, KP)
        offs = tl.arange(0, BLOCK)
        c = tl.load(coeffs + ks, mask=ks < K, other=0.0)
        for ch in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
            r, ptrs, present, start, end = chunk_rows(table, n_rows, ch, dtype_ref, KP, ROW, STEPS, ALIGNED)
            out = tl.load(table + r * ROW + KP).to(dtype_ref.dtype, bitcast=True)
            if ALIGNED:
                out = tl.multiple_of(out, 16)
            full = start + (end - start) // BLOCK * BLOCK
            for s in range(start, full, BLOCK):
                s = tl.multiple_of(s, BLOCK)
                y = tl.sum(load_block(ptrs, present, s, end, offs, False) * c[:, None], axis=0)
                tl.store(out + s + offs, y.to(dtype_ref.dtype.element_ty))
            for s in range(full, end, BLOCK):  # at most one
                y = tl.sum(load_block(ptrs, present, s, end, offs, True) * c[:, None], axis=0)
                tl.store(out + s + offs, y.to(dtype_ref.dtype.element_ty), mask=s + offs < end)


def _combine_triton(out: List[Tensor], flat: List[Optional[Tensor]], k: int, c: Tensor,
                    device: torch.device) -> Tensor:
    """out[j] = sum_i c_i flat[i * T + j] over the parameters the kernel reads as flat ranges, one
    launch per (dtype, alignment) group; returns the indices left for the reference."""
    kp = _pow2(max(k, 2))
    launches, rest = launch_tables(flat, k, out, kp, device)  # rows: [KP inputs, out, numel, first chunk]
    for table, n_rows, chunks, is_aligned, first in launches:
        with on_device(device):
            _combine_kernel[(n_programs(chunks, device),)](
                table, n_rows, chunks, c, out[first], K=k, KP=kp, ROW=kp + 3, STEPS=search_steps(n_rows),
                ALIGNED=is_aligned, BLOCK=2048 // kp, num_warps=4)
    return rest


if HAS_CPP:
    @torch.library.register_fake("vgs_kernels::combine_")
    def _(out, tensors, coeffs):
        return None

    @torch.library.register_fake("vgs_kernels::combine_checked_")
    def _(out, tensors, coeffs):
        return torch.empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)


def combine(out_tensors: Sequence[Tensor], grad_lists: Sequence[GradList],
            coeffs: Union[Tensor, Sequence[float]], *, backend: Optional[str] = None) -> None:
    """out[j] = sum_i coeffs[i] * grad_lists[i][j], written in place.

    Args:
        out_tensors: T tensors, out_tensors[j] of parameter j's shape and dtype (may be the same
            tensor as one of its gradients, e.g. the .grad that holds g_0).
        grad_lists: k (1..4) sequences of T tensors or None (None reads as zeros), as for gram().
        coeffs: [k] float tensor (any device; moved to the gradients' device without a host sync),
            or k numbers.
        backend: None (global choice), "auto", "cpp", "triton" or "reference".
    """
    flat, k, device = quick_lists(grad_lists)
    name = flat is not None and fast_backend(device, backend)
    out = out_tensors if type(out_tensors) is list else list(out_tensors)
    c = coeffs if isinstance(coeffs, Tensor) else torch.as_tensor(coeffs)
    if name and c.shape == (k,) and c.is_floating_point() and len(out) * k == len(flat):
        c = c.to(device=device, dtype=torch.float32)
    else:  # the checked Python path (odd inputs, the reference backend, no extension)
        out, lists, c, device = _check(out_tensors, grad_lists, coeffs)
        name = resolve(device, backend)
        if name == "reference" or not HAS_CPP:
            return combine_reference(out, lists, c)
        flat = [t for lst in lists for t in lst]
        if not out:  # no parameters: nothing to write (and no tensor for the dispatcher)
            return
    try:  # every check in C++: no Python work per tensor
        if name == "cpp":
            rest = torch.ops.vgs_kernels.combine_checked_(out, flat, c)
        else:
            rest = _combine_triton(out, flat, k, c, device)
    except (RuntimeError, TypeError, ValueError):
        _check(out_tensors, grad_lists, coeffs)  # raises the error that names the argument
        raise
    if rest.numel():
        n, rest = len(out), rest.tolist()
        combine_reference([out[j] for j in rest], [[flat[i * n + j] for j in rest] for i in range(k)], c)
