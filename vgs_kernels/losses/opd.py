"""Plain on-policy distillation (OPD) on the fused-linear kernel: TRL's divergence loss, faster.

`trl.DistillationTrainer(beta=β)` trains the student on a per-token full-vocabulary divergence of its
own rollouts (β = 1 the reverse KL KL(softmax(s/T) ‖ softmax(a/T)), 0 the forward KL, between them the
generalised JSD), computed by
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

from typing import NamedTuple, Optional

from torch import Tensor

from vgs_kernels.losses.base import Count, DistillationLoss
from vgs_kernels.ops.decomposed_kl import acc_dtype, divergence, valid_mask
from vgs_kernels.ops.fused_linear import FusedLinearConfig, Pair, check_inputs, fused_linear_kl_loss, vocab_heads


class OPDOutput(NamedTuple):
    """loss: Σ_t w_t KL_t (a scalar, differentiable w.r.t. the student's hidden states, head weight
    and bias); entropy_sum: Σ_t H(p_t) over valid positions (detached, nats, at the temperature);
    n_valid: the number of valid positions (int64)."""

    loss: Tensor
    entropy_sum: Tensor
    n_valid: Tensor


class OPDLoss(DistillationLoss):
    """Plain OPD from hidden states: the per-token divergence of TRL's ``beta`` between p = softmax(s/T)
    and q = softmax(a/T) (1: the reverse KL(p ‖ q), 0: the forward KL(q ‖ p), between: the generalised
    JSD; vgs_kernels.ops.decomposed_kl.divergence), reduced (vgs_kernels/losses/base.py; default "token",
    TRL's), through the fused-linear kernel's monolithic mode with the gradients computed in forward.
    logit_scale, softcap: a number for both models or a (student, teacher) pair; vocab_size: both
    distributions over the first n ids (padded heads); chunk_size / memory_budget / backend as
    `fused_linear_decomposed_kl`."""

    reductions = ("token", "sequence", "sum")

    def __init__(self, temperature: float = 1.0, reduction: str = "token", *, beta: float = 1.0,
                 logit_scale: Pair = 1.0, softcap: Optional[Pair] = None, vocab_size: Optional[int] = None,
                 chunk_size: Optional[int] = None, memory_budget: Optional[int] = None,
                 backend: Optional[str] = None):
        super().__init__(reduction, temperature)
        divergence(beta)
        self.beta, self.vocab_size, self.logit_scale, self.softcap = beta, vocab_size, logit_scale, softcap
        self.chunk_size, self.memory_budget, self.backend = chunk_size, memory_budget, backend

    def forward(self, h_s: Tensor, h_t: Tensor, w_student: Tensor, w_teacher: Tensor, mask: Tensor, *,
                bias_student: Optional[Tensor] = None, bias_teacher: Optional[Tensor] = None,
                num_items_in_batch: Optional[Count] = None) -> OPDOutput:
        """h_s [..., H_s], h_t [..., H_t] (any float dtypes), heads [V, H_*], biases [V] or None; mask bool
        or 0/1 of the leading shape. All positions masked: loss 0, zero gradients."""
        if not isinstance(mask, Tensor) or mask.shape != h_s.shape[:-1]:
            raise ValueError(f"mask (completion_mask) must have the leading shape of the student hidden states "
                             f"{tuple(h_s.shape[:-1])}, got {tuple(mask.shape) if isinstance(mask, Tensor) else mask!r}")
        w_student, w_teacher, bias_student, bias_teacher = vocab_heads(w_student, w_teacher, bias_student,
                                                                       bias_teacher, self.vocab_size)
        check_inputs(h_s, None, w_student, h_t, None, w_teacher, mask, bias_student, bias_teacher,
                     self.temperature, self.softcap, self.chunk_size, self.beta)
        valid = valid_mask(mask, mask.shape, h_s.device)
        weights = self.reduction_weights(valid, acc_dtype(h_s, h_t), num_items_in_batch)
        cfg = FusedLinearConfig(self.temperature, self.logit_scale, self.softcap, True, self.chunk_size,
                                self.memory_budget, True, self.backend, self.beta)
        (value,), _, _, entropy = fused_linear_kl_loss(
            h_s, None, w_student, h_t, None, w_teacher, valid, weights, [(1.0, 0.0, 0.0)], cfg,
            bias_student=bias_student, bias_teacher=bias_teacher, entropy=True)
        return OPDOutput(value, entropy.sum(), valid.sum())


def fused_chunked_divergence_loss(
        student_hidden_states: Tensor, teacher_hidden_states: Tensor, student_lm_head_weight: Tensor,
        teacher_lm_head_weight: Tensor, completion_mask: Tensor, beta: float = 1.0,
        num_items_in_batch: Optional[Count] = None, student_lm_head_bias: Optional[Tensor] = None,
        teacher_lm_head_bias: Optional[Tensor] = None, student_logit_scale: float = 1.0,
        teacher_logit_scale: float = 1.0, student_final_logit_softcapping: Optional[float] = None,
        teacher_final_logit_softcapping: Optional[float] = None, temperature: float = 1.0, *,
        vocab_size: Optional[int] = None, chunk_size: Optional[int] = None, memory_budget: Optional[int] = None,
        backend: Optional[str] = None) -> OPDOutput:
    """Drop-in for TRL 1.16's ``_chunked_divergence_loss``, every beta in [0, 1]: `OPDLoss`.

    student_hidden_states [B, K, H_s], teacher_hidden_states [B, K, H_t] (any float dtypes, the
    heads run in each one's dtype); *_lm_head_weight [V, H_*], *_lm_head_bias [V] or None;
    completion_mask [B, K] bool or 0/1. Logits: softcap · tanh(scale · (h @ W^T + bias) / softcap),
    then / temperature. Returns, like TRL's: (loss, entropy_sum, n_valid) with loss = Σ_t KL_t /
    num_items_in_batch (the mean over the local valid tokens when None), entropy_sum = Σ_t H(p_t)
    (detached, nats, at the temperature) and n_valid = the number of valid positions (int64).
    Differentiable w.r.t. the student's hidden states, weight and bias; the teacher gets none.
    All positions masked: loss 0, zero gradients. beta: 1 the reverse KL, 0 the forward KL, between them
    the generalised JSD (TRL's definitions). Extra keyword-only arguments: vocab_size (both
    distributions over the first n ids: heads padded beyond the tokenizer, which TRL refuses);
    chunk_size / memory_budget / backend as `fused_linear_decomposed_kl`.
    """
    loss = OPDLoss(temperature, "token", beta=beta, vocab_size=vocab_size,
                   logit_scale=(student_logit_scale, teacher_logit_scale),
                   softcap=(student_final_logit_softcapping, teacher_final_logit_softcapping),
                   chunk_size=chunk_size, memory_budget=memory_budget, backend=backend)
    return loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight, teacher_lm_head_weight,
                completion_mask, bias_student=student_lm_head_bias, bias_teacher=teacher_lm_head_bias,
                num_items_in_batch=num_items_in_batch)
