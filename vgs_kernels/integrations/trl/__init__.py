"""TRL integration (``pip install vgs-kernels[trl]``): one file per trainer with its config beside it
(distillation.py, grpo.py), what they share in base.py and config.py, and the method table in methods/
(one file per row).

    from vgs_kernels.integrations.trl import VGSDistillationConfig, VGSDistillationTrainer
    from vgs_kernels.integrations.trl import VGSGRPOConfig, VGSGRPOTrainer
"""
from vgs_kernels.integrations.trl.distillation import VGSDistillationConfig, VGSDistillationTrainer
from vgs_kernels.integrations.trl.grpo import VGSGRPOConfig, VGSGRPOTrainer
from vgs_kernels.integrations.trl.methods import METHODS, PASSES, Heads, Method
from vgs_kernels.steering.policies import POLICIES

__all__ = ["VGSDistillationConfig", "VGSDistillationTrainer", "VGSGRPOConfig", "VGSGRPOTrainer", "METHODS",
           "PASSES", "POLICIES", "Heads", "Method"]
