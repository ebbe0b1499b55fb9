"""vgs-kernels: fused kernels for Visual Gradient Steering (arXiv 2606.00564) and the on-policy
distillation methods around it.

The data path, one sub-package per layer (docs/ARCHITECTURE.md):
hidden states / logits -> ops (decomposed KL, fused-linear) -> losses (per-term cotangents) ->
steering.GradientSteering.backward (per-component gradients) -> ops.gram -> steering.policies
(coefficients) -> ops.combine -> optimizer.step(). distributed/ reduces across ranks, vlm/ builds the
passes from a transformers VLM batch, integrations/trl/ plugs it all into TRL's trainers.
"""
from vgs_kernels._version import __version__
from vgs_kernels.analysis import GeometryRow, gradient_geometry, plot_gradient_geometry
from vgs_kernels.losses import (FusedLinearVGSLoss, OPDLoss, VAOPDLoss, VAOPDOutput, VGSLoss, VGSLossOutput,
                                fused_chunked_divergence_loss, group_advantages, grpo_surrogate, grpo_vgs_loss,
                                vgs_loss)
from vgs_kernels.ops import (BACKENDS, KLTerms, backend_info, combine, decomposed_kl, decomposed_kl_reference,
                             fused_linear_decomposed_kl, get_backend, gram, set_backend, use_backend)
from vgs_kernels.steering import GradientSteering, SteeringConflictWarning, policies, std_descent
from vgs_kernels.vlm import (DistillLogits, FamilySpec, LMHead, VisionTokens, check_processor, distill_logits,
                             register_family, response_logits, response_positions, rollout_batch, strip_images,
                             text_only_batch)

__all__ = [
    "__version__",
    # ops
    "BACKENDS", "backend_info", "get_backend", "set_backend", "use_backend", "KLTerms", "decomposed_kl",
    "decomposed_kl_reference", "fused_linear_decomposed_kl", "gram", "combine",
    # losses
    "VGSLoss", "VGSLossOutput", "vgs_loss", "FusedLinearVGSLoss", "OPDLoss", "fused_chunked_divergence_loss",
    "VAOPDLoss", "VAOPDOutput", "group_advantages", "grpo_surrogate", "grpo_vgs_loss",
    # steering
    "GradientSteering", "policies", "SteeringConflictWarning", "std_descent",
    # vlm
    "DistillLogits", "LMHead", "VisionTokens", "FamilySpec", "check_processor", "distill_logits", "register_family",
    "response_logits", "response_positions", "rollout_batch", "strip_images", "text_only_batch",
    # analysis
    "GeometryRow", "gradient_geometry", "plot_gradient_geometry",
]
