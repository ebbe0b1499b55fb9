"""The steering fields both TRL configs carry (VGSDistillationConfig, VGSGRPOConfig), defined once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vgs_kernels.steering.policies import POLICIES


@dataclass
class SteeringArguments:
    """γ, λ of L = η(Std + γ·Vis + λ·LP) and the steering hook's settings (vgs_kernels/steering/).

    gamma, lam: the weights of Vis and LP. lp_quantile: LP counts Lang on tokens whose VDS is above this
    quantile. adaptive: per-token γ_t (App. E). steering_policy: one of POLICIES ("vgs": exact η every
    step, "fixed": constant ``eta``, one backward, "auto": exact η every ``eta_every`` steps, EMA in
    between, "project", "pcgrad", "sum": no steering). detach_prior: no Vis gradient into the text-only
    student pass. steering_patience: the hook's ``patience`` (vgs_kernels/steering/health.py).
    """

    gamma: float = field(default=2.0, metadata={"help": "Weight of the visual term Vis."})
    lam: float = field(default=0.01, metadata={"help": "Weight of the language-prior term LP."})
    lp_quantile: float = field(default=0.7, metadata={"help": "LP counts Lang above this VDS quantile."})
    adaptive: bool = field(default=False, metadata={"help": "Per-token gamma from VDS quantiles (App. E)."})
    steering_policy: str = field(default="vgs", metadata={"help": f"One of {POLICIES}."})
    eta: Optional[float] = field(default=None, metadata={"help": "The constant eta of steering_policy='fixed'."})
    eta_every: int = field(default=16, metadata={"help": "Steps between exact eta measurements ('auto')."})
    detach_prior: bool = field(default=True, metadata={"help": "No gradient from Vis into the text-only pass."})
    steering_patience: Optional[int] = field(default=3, metadata={
        "help": "SteeringConflictWarning after this many uphill measurements in a row (None: never)."})

    @property
    def divergence_beta(self) -> float:
        """The distillation divergence (TRL's DistillationConfig.beta): the reverse KL (1.0) unless the
        config says otherwise (VGSDistillationConfig's beta; GRPO's beta is its KL penalty, not this)."""
        return 1.0

    def check_steering(self, trainer: str, steered: bool = True) -> None:
        """Raises ValueError naming the field for settings the hook or ``trainer`` would refuse later
        (``steered``: the method's backward goes through the hook)."""
        if self.steering_policy not in POLICIES:
            raise ValueError(f"steering_policy must be one of {POLICIES}, got {self.steering_policy!r}")
        if self.steering_policy == "fixed" and self.eta is None:
            raise ValueError("steering_policy='fixed' needs eta= (e.g. 0.41, the paper's value at gamma=2)")
        if self.eta is not None and self.steering_policy != "fixed":
            raise ValueError(f"eta= is the constant of steering_policy='fixed'; with {self.steering_policy!r} "
                             "it would be ignored: drop it or use steering_policy='fixed'")
        if not (isinstance(self.eta_every, int) and self.eta_every >= 1):
            raise ValueError(f"eta_every must be an int >= 1, got {self.eta_every!r}")
        if self.steering_patience is not None and not (isinstance(self.steering_patience, int)
                                                       and self.steering_patience >= 1):
            raise ValueError(f"steering_patience must be an int >= 1 (or None: no warning), got "
                             f"{self.steering_patience!r}")
        if steered and getattr(self, "fp16", False):
            raise ValueError(f"fp16=True (a GradScaler) is not supported by {trainer}; use bf16=True")
