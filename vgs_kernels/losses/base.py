"""The base every loss of vgs_kernels/losses/ stands on: the temperature, the reduction and its weights.

Each loss is a small module that picks its passes and per-token weights on top of the ops
(vgs_kernels/ops/): every reduced term is Σ_t w_t · term_t with detached weights w_t, so one call
of an op's backward with per-position cotangents gives its gradient.

Reductions (w_t is zero on masked positions):
  "sequence"  the paper's: mean over each sequence's valid tokens, then mean over sequences (the
              last leading dimension is the sequence). Sequences without any valid token are left
              out of the mean over sequences (they would otherwise pull the loss towards 0 by an
              amount that depends on padding); an all-masked batch gives 0.
  "token"     Σ over valid tokens / num_items_in_batch (default: this call's valid-token count).
              Pass the whole batch's count to every micro-batch to make gradient accumulation
              exact (TRL's and transformers' convention).
  "sum"       Σ over valid tokens.
  "none"      per position (masked positions 0).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

REDUCTIONS = ("sequence", "token", "sum", "none")
Number = Union[int, float]
Count = Union[Number, Tensor]  # also numpy scalars (any numbers.Real) and tensors of any dtype, as TRL takes


def positive_count(n: Count) -> Count:
    """num_items_in_batch, checked > 0 (a tensor is read once: a 0 would give inf/NaN gradients)."""
    if isinstance(n, Tensor):
        ok = n.numel() == 1 and bool(n > 0)
    else:
        ok = isinstance(n, numbers.Real) and not isinstance(n, bool) and n > 0
    if not ok:
        raise ValueError(f"num_items_in_batch must be a count > 0 (the number of valid tokens of the whole "
                         f"accumulated batch), got {n!r}; a batch without valid tokens needs no call")
    return n


def reduction_weights(valid: Tensor, reduction: str, dtype: torch.dtype,
                      num_items_in_batch: Optional[Count] = None) -> Tensor:
    """w_t of the leading shape of ``valid`` (bool): every reduced term is Σ_t w_t · term_t."""
    if num_items_in_batch is not None and reduction != "token":
        raise ValueError(f"num_items_in_batch applies to reduction='token' only, but reduction={reduction!r}")
    w = valid.to(dtype)
    if reduction == "sequence":
        if valid.dim() < 1:
            raise ValueError("reduction='sequence' needs logits of shape [..., T, V] (the last "
                             f"leading dimension is the sequence), got leading shape {tuple(valid.shape)}")
        per_seq = w.sum(-1, keepdim=True)
        n_seq = (per_seq > 0).sum()
        return w / per_seq.clamp(min=1) / n_seq.clamp(min=1)
    if reduction == "token":
        if num_items_in_batch is None:
            return w / w.sum().clamp(min=1)
        n = positive_count(num_items_in_batch)  # in w's dtype: a float64 count must not make w float64
        return w / (n.to(w.device, dtype) if isinstance(n, Tensor) else float(n))
    return w


class DistillationLoss(nn.Module):
    """A distillation loss: the softmax temperature T (divides every logit set) and the reduction.

    reduction: one of ``reductions`` (the subclass's; module docstring for their meaning).
    """

    reductions: Sequence[str] = REDUCTIONS

    def __init__(self, reduction: str = "token", temperature: float = 1.0):
        super().__init__()
        if reduction not in self.reductions:
            raise ValueError(f"reduction must be one of {tuple(self.reductions)}, got {reduction!r}")
        if not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.reduction, self.temperature = reduction, temperature

    def reduction_weights(self, valid: Tensor, dtype: torch.dtype, num_items_in_batch: Optional[Count] = None) -> Tensor:
        """The reduction's w_t of the leading shape (see `reduction_weights`)."""
        return reduction_weights(valid, self.reduction, dtype, num_items_in_batch)
