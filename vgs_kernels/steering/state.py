"""The hook's checkpoint state: it travels inside ``optimizer.state_dict()``, in the first param group
(which ``Optimizer.load_state_dict`` keeps), so it is restored whether the optimizer's state is loaded
before or after the hook is created. DeepSpeed's ZeRO optimizer carries it at the top level
(vgs_kernels/distributed/zero.py)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from vgs_kernels.steering.components import ComponentSpec
from vgs_kernels.steering.policies import AutoEta

STATE_KEY = "vgs_kernels.GradientSteering"


def save(step_count: int, auto: AutoEta, spec: ComponentSpec) -> Dict[str, Any]:
    """The hook's state: step count, auto's EMA, the components' names, weights and fixed ones."""
    return {"step_count": step_count, "eta_ema": auto.value, "names": spec.names, "retry": bool(auto.retry),
            "weights": list(spec.w) if spec.names else None, "fixed": spec.fixed}


def restore(state: Mapping[str, Any], auto: AutoEta, spec: ComponentSpec) -> int:
    """Loads ``state`` into ``auto`` and ``spec``; returns the step count."""
    auto.value, auto.retry = state["eta_ema"], bool(state.get("retry", False))
    saved = tuple(state["names"]) if state.get("names") is not None else None
    if saved is not None and spec.names is None:
        # the weights and fixed components come back with the names: a resumed run checks the loss
        # output's weights against the saved ones (not against defaults, e.g. gamma=2)
        spec.fixed = tuple(state.get("fixed") or spec.fixed)
        weights = state.get("weights")
        spec.set(saved, dict(zip(saved, weights)) if weights is not None else None)
    elif saved is not None and saved != spec.names:
        raise ValueError(f"saved components {saved} differ from {spec.names}")
    return int(state["step_count"])


def put(optimizer_state: Dict[str, Any], hook_state: Dict[str, Any]) -> Dict[str, Any]:
    """Adds the hook's state to an ``optimizer.state_dict()``."""
    optimizer_state["param_groups"][0][STATE_KEY] = hook_state
    return optimizer_state


def pop(optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
    """The hook's state a loaded optimizer state brought (removed from the param group), or None."""
    return optimizer.param_groups[0].pop(STATE_KEY, None) if optimizer.param_groups else None
