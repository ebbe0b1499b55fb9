"""The losses: small modules on one base (losses/base.py), each a choice of passes and per-token
weights over the ops. Import only public names of vgs_kernels.ops (docs/ARCHITECTURE.md)."""
from vgs_kernels.losses.base import REDUCTIONS, DistillationLoss
from vgs_kernels.losses.grpo_vgs import group_advantages, grpo_surrogate, grpo_vgs_loss
from vgs_kernels.losses.opd import OPDLoss, OPDOutput, fused_chunked_divergence_loss
from vgs_kernels.losses.va_opd import VAOPDLoss, VAOPDOutput, degrade_image, head_token_logprobs, token_logprobs
from vgs_kernels.losses.vgs import FusedLinearVGSLoss, VGSLoss, VGSLossOutput, vgs_loss

__all__ = ["REDUCTIONS", "DistillationLoss", "group_advantages", "grpo_surrogate", "grpo_vgs_loss", "OPDLoss",
           "OPDOutput", "fused_chunked_divergence_loss", "VAOPDLoss", "VAOPDOutput", "degrade_image",
           "head_token_logprobs", "token_logprobs", "FusedLinearVGSLoss", "VGSLoss",
           "VGSLossOutput", "vgs_loss"]
