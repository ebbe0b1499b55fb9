"""Plain on-policy distillation (OPD) on the fused-linear kernel: TRL's reverse-KL loss, faster.

`trl.DistillationTrainer(beta=1)` trains the student on the per-token full-vocabulary reverse KL
KL(softmax(s/T) ‖ softmax(a/T)) of its own rollouts, computed by
``trl.trainer.distillation_trainer._chunked_divergence_loss`` (tiles, recomputed in backward: six
[N, H] x [H, V]-sized products per call). `fused_chunked_divergence_loss` takes the same arguments
and returns the same three values, through the monolithic mode of the fused-linear kernel: the
gradients are computed in forward while the chunk's logits are fresh (Liger-Kernel's approach), so
a call costs the four products an exact fused loss needs (both heads forward, dh_s, dW_s).

One-line switch for a TRL user (or any trainer that calls TRL's loss):

    import trl.trainer.distillation_trainer as td, vgs_kernels as vgs
    td._chunked_divergence_loss = vgs.fused_chunked_divergence_loss
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from vgs_kernels.decomposed_kl import valid_mask
from vgs_kernels.fused_linear import _check, _Config, _flat, _FusedLinearVGSFunction, _valid_rows, FusedLinearVGSLoss
from vgs_kernels.loss import _positive_count

Count = Union[int, float, Tensor]


def fused_chunked_divergence_loss(
        student_hidden_states: Tensor, teacher_hidden_states: Tensor, student_lm_head_weight: Tensor,
        teacher_lm_head_weight: Tensor, completion_mask: Tensor, beta: float = 1.0,
        num_items_in_batch: Optional[Count] = None, student_lm_head_bias: Optional[Tensor] = None,
        teacher_lm_head_bias: Optional[Tensor] = None, student_logit_scale: float = 1.0,
        teacher_logit_scale: float = 1.0, student_final_logit_softcapping: Optional[float] = None,
        teacher_final_logit_softcapping: Optional[float] = None, temperature: float = 1.0, *,
        chunk_size: Optional[int] = None, memory_budget: Optional[int] = None,
        backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Drop-in for TRL 1.16's ``_chunked_divergence_loss`` with ``beta=1`` (the reverse KL).

    student_hidden_states [B, K, H_s], teacher_hidden_states [B, K, H_t] (any float dtypes, the
    heads run in each one's dtype); *_lm_head_weight [V, H_*], *_lm_head_bias [V] or None;
    completion_mask [B, K] bool or 0/1. Logits: softcap · tanh(scale · (h @ W^T + bias) / softcap),
    then / temperature. Returns, like TRL's: (loss, entropy_sum, n_valid) with loss = Σ_t KL_t /
    num_items_in_batch (the mean over the local valid tokens when None), entropy_sum = Σ_t H(p_t)
    (detached, nats, at the temperature) and n_valid = the number of valid positions (int64).
    Differentiable w.r.t. the student's hidden states, weight and bias; the teacher gets none.
    All positions masked: loss 0, zero gradients. Only beta=1 (ValueError otherwise); extra
    keyword-only arguments: chunk_size / memory_budget / backend as `fused_linear_decomposed_kl`.
    """
    if beta != 1.0:
        raise ValueError(f"beta={beta}: fused_chunked_divergence_loss computes the reverse KL (beta=1.0) only; "
                         "forward KL / JSD are not in the kernel yet, use TRL's _chunked_divergence_loss")
    h_s, h_t, mask = student_hidden_states, teacher_hidden_states, completion_mask
    if not isinstance(mask, Tensor) or mask.shape != h_s.shape[:-1]:
        raise ValueError(f"completion_mask must have the leading shape of student_hidden_states "
                         f"{tuple(h_s.shape[:-1])}, got {tuple(mask.shape) if isinstance(mask, Tensor) else mask!r}")
    if num_items_in_batch is not None:
        _positive_count(num_items_in_batch)
    softcap = None if (student_final_logit_softcapping, teacher_final_logit_softcapping) == (None, None) else (
        student_final_logit_softcapping, teacher_final_logit_softcapping)
    _check(h_s, None, student_lm_head_weight, h_t, None, teacher_lm_head_weight, mask, student_lm_head_bias,
           teacher_lm_head_bias, temperature, softcap, chunk_size)
    loss = FusedLinearVGSLoss(monolithic=True, reduction="token", components=False, temperature=temperature,
                              backend=backend)
    valid = valid_mask(mask, mask.shape, h_s.device)
    acc = torch.float64 if torch.float64 in (h_s.dtype, h_t.dtype) else torch.float32
    weights = loss.reduction_weights(valid, acc, num_items_in_batch).reshape(-1)
    cfg = _Config(temperature, (student_logit_scale, teacher_logit_scale), softcap, True, chunk_size,
                  memory_budget, True, backend, student_entropy=True)
    value, _, terms = _FusedLinearVGSFunction.apply(
        _flat(h_s), None, student_lm_head_weight, student_lm_head_bias, _flat(h_t), None,
        teacher_lm_head_weight, teacher_lm_head_bias, _valid_rows(valid), valid.reshape(-1), weights, loss, cfg,
        [(1.0, 0.0, 0.0)], torch.is_grad_enabled())
    return value, terms[3].sum(), valid.sum()
