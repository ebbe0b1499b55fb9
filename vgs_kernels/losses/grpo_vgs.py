"""GRPO with VGS as its regulariser (the paper's Sec. 8, Table 2, Eq. 22).

    J_total = E_groups [ 1/G Σ_i ( (1 − α)·O_GRPO(τ_i) − α·ℓ_VGS-LP(τ_i) ) ]     (maximised)

as a loss to minimise: (1 − α)·L_GRPO + α·η·(Std + γ·Vis + λ·LP), with L_GRPO = −O_GRPO the clipped
surrogate *without* a KL penalty and ℓ_VGS-LP the VGS loss (Eq. 17) of the same rollouts. The
"GRPO + Standard-KD" baseline replaces ℓ_VGS-LP by KL(p ‖ qa) (a monolithic VGSLoss output).

For the steering hook the output has the components grpo (a *fixed* coefficient, 1 − α: the
policy never rescales it) and std, vis, lp with weights α, α·γ, α·λ; the policy (e.g. exact η)
applies to the distillation components only and the GRPO gradient is added unchanged
(vgs_kernels/steering/policies.py, "Fixed-coefficient components").

`grpo_surrogate` is a short plain-torch form of TRL's default GRPO loss (loss_type "dapo": token
sum over the accumulated batch's tokens) for raw loops; `VGSGRPOTrainer` uses TRL's own loss.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from vgs_kernels.losses.vgs import VGSLossOutput

NAME = "grpo"


def grpo_vgs_loss(rl_loss: Tensor, distill: VGSLossOutput, alpha: float = 0.3) -> VGSLossOutput:
    """(1 − α)·rl_loss + α·distill (Eq. 22) as a VGSLossOutput the hook steers (module docstring).

    rl_loss: scalar, differentiable (the GRPO loss, i.e. −O_GRPO, already reduced). distill: the
    output of VGSLoss / FusedLinearVGSLoss on the same rollouts (any reduction but "none"; its own
    eta must be None: the hook's policy sets η). Returns total = (1 − α)·rl_loss + α·distill.total,
    steered = α·distill.total, std/vis/lp/vds of ``distill`` and ``out.grpo`` = rl_loss.
    """
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1] (the weight of the distillation loss), got {alpha!r}")
    if not isinstance(distill, VGSLossOutput) or distill.weights is None or distill.fixed:
        raise TypeError("distill must be the VGSLossOutput of VGSLoss / FusedLinearVGSLoss (with its weights)")
    if distill.eta is not None:
        raise ValueError("distill was scaled by the loss's own eta; leave eta=None: the hook's policy sets eta")
    if not isinstance(rl_loss, Tensor) or rl_loss.numel() != 1 or distill.total.numel() != 1:
        raise ValueError("rl_loss and distill.total must be scalars (a reduction other than 'none')")
    a = float(alpha)
    steered = a * distill.total
    weights = {NAME: 1.0 - a, **{n: a * w for n, w in distill.weights.items()}}
    extra = {NAME: rl_loss.reshape(()), **distill.extra}
    return VGSLossOutput((1.0 - a) * rl_loss.reshape(()) + steered, distill.std, distill.vis, distill.lp, distill.vds,
                         weights=weights, components=distill.components, extra=extra, fixed=(NAME,),
                         steered=steered)


def grpo_surrogate(logps: Tensor, old_logps: Optional[Tensor], advantages: Tensor, mask: Tensor,
                   epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                   num_items_in_batch: Optional[Union[int, Tensor]] = None) -> Tensor:
    """−O_GRPO: the clipped-advantage surrogate without KL, TRL's loss_type "dapo" (token-level).

    logps, old_logps: [B, T] log-probabilities of the sampled tokens under the current / sampling
    policy (old None: logps.detach(), one update per rollout batch). advantages: [B] (group-
    normalised rewards). mask: [B, T] response tokens. Returns Σ_t −min(r·A, clip(r)·A) over valid
    tokens / num_items_in_batch (default: this call's valid-token count), float32 scalar.
    """
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    adv = advantages.reshape(-1, 1).to(ratio.dtype)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)
    m = mask.to(per_token.dtype)
    n = m.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return (per_token * m).sum().float() / n


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True) -> Tensor:
    """GRPO's advantages: reward minus its group's mean (divided by the group's std + 1e-4 when
    ``scale``, as TRL's scale_rewards="group"). rewards: [B] with B a multiple of group_size, groups
    contiguous. Returns [B] float32."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().reshape(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)
    return adv.reshape(-1)
