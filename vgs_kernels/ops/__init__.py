"""The kernels: for each op its plain-torch reference, C++ op (csrc/), Triton kernels, launcher and
autograd.Function, one file per op. Imports nothing above it (docs/ARCHITECTURE.md)."""
from vgs_kernels.ops.backend import BACKENDS, backend_info, get_backend, set_backend, use_backend
from vgs_kernels.ops.combine import combine, combine_reference
from vgs_kernels.ops.decomposed_kl import KLTerms, decomposed_kl, decomposed_kl_reference
from vgs_kernels.ops.fused_linear import (fused_linear_decomposed_kl, fused_linear_decomposed_kl_reference,
                                          fused_linear_kl_loss)
from vgs_kernels.ops.gram import gram, gram_reference

__all__ = ["BACKENDS", "backend_info", "get_backend", "set_backend", "use_backend", "combine", "combine_reference",
           "KLTerms", "decomposed_kl", "decomposed_kl_reference", "fused_linear_decomposed_kl",
           "fused_linear_decomposed_kl_reference", "fused_linear_kl_loss", "gram", "gram_reference"]
