"""Gradient steering: the optimizer hook (hook.py: lifecycle, backward routing), the pure step
(step.py: Gram -> coefficients -> stats), the components (components.py), the policies (policies.py,
the one list of names ``POLICIES``), health (health.py), AMP (amp.py) and the checkpoint state
(state.py). Distributed engines sit below, in vgs_kernels/distributed/."""
from vgs_kernels.steering import policies
from vgs_kernels.steering.health import SteeringConflictWarning, std_descent
from vgs_kernels.steering.hook import GradientSteering
from vgs_kernels.steering.policies import POLICIES
from vgs_kernels.steering.state import STATE_KEY
from vgs_kernels.steering.step import STAT_KEYS

__all__ = ["policies", "SteeringConflictWarning", "std_descent", "GradientSteering", "POLICIES", "STATE_KEY",
           "STAT_KEYS"]
