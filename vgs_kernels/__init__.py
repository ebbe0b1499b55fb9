"""vgs-kernels: fused kernels for Visual Gradient Steering (arXiv 2606.00564).

The data path, one module per step:
logits -> decomposed_kl (KL split) -> loss (per-term cotangents) -> steering.backward (per-term
gradients) -> gram -> policies (coefficients) -> combine -> optimizer.step().
"""
from vgs_kernels._backend import BACKENDS, backend_info, get_backend, set_backend, use_backend

__version__ = "0.1.0"

# Public API (each module adds its names below).
from vgs_kernels.decomposed_kl import KLTerms, decomposed_kl, decomposed_kl_reference
from vgs_kernels.loss import VGSLoss, VGSLossOutput, vgs_loss
from vgs_kernels.vlm import (DistillLogits, VisionTokens, check_processor, distill_logits, response_logits,
                             response_positions, rollout_batch, strip_images)
from vgs_kernels.probe import GeometryRow, gradient_geometry, plot_gradient_geometry
from vgs_kernels.fused_linear import FusedLinearVGSLoss, fused_linear_decomposed_kl
from vgs_kernels.gram import gram
from vgs_kernels.combine import combine
from vgs_kernels import policies
from vgs_kernels.steering import GradientSteering
from vgs_kernels.health import SteeringConflictWarning, std_descent
from vgs_kernels.vlm import FamilySpec, register_family, text_only_batch
from vgs_kernels.grpo_vgs import group_advantages, grpo_surrogate, grpo_vgs_loss
from vgs_kernels.opd import fused_chunked_divergence_loss
from vgs_kernels.va_opd import VAOPDLoss, VAOPDOutput
