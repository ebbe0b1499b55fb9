"""Steering health: does the steered update still descend the standard loss?

On every measured step the hook has the Gram matrix G ([k, k], all-reduced over the process group
in distributed runs) and the coefficients c, so the cosine between the steered update
d = sum_i c_i g_i and grad Std costs k*k flops and no pass over the gradients:

    std_descent = <d, g_std> / (|d| |g_std|) = (G c)[std] / sqrt(c^T G c * G[std, std])

A negative value means a step along -d goes uphill on Std to first order. d is the gradient the
optimizer receives: SGD steps along it, Adam-family optimizers rescale it per coordinate first, so
under Adam a positive value does not guarantee that Adam's step descends Std (the demo's VGS runs
collapse with mostly positive values, python/RESULTS.md). After
``patience`` consecutive uphill measurements :class:`SteeringConflictWarning` is emitted.

Host syncs: ``apply()`` never waits for the device. A measurement's cosine is copied to the host
asynchronously and read at a later ``backward`` once it has landed (on CPU: at once), so on
a GPU the warning can arrive a step or two late; steps that measure nothing (policy "fixed", "auto" between
measurements) queue nothing and read nothing.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


class SteeringConflictWarning(UserWarning):
    """The steered update pointed uphill on the standard loss for ``patience`` measurements in a row."""


REMEDIES = ("a larger lam (a stronger language prior LP)", "a smaller gamma",
            'policy="project" (conflict-aware)', "plain OPD")  # when "vis" opposes Std


def remedies(name: str, fixed: bool) -> str:
    """What to change when component ``name`` is the one pulling the update against Std."""
    if fixed:
        return (f"'{name}' is a fixed-coefficient component (not steered: gamma, lam and the policy do not "
                f"change it); give it a smaller weight (GRPO + VGS: a larger alpha) or check that its objective "
                f"agrees with the teacher's")
    if name == "vis":
        return "; ".join(REMEDIES)
    return f"a smaller weight for '{name}'" + (" (lam)" if name == "lp" else "") + '; policy="pcgrad"'


def std_descent(G: Tensor, coeffs: Tensor, std: int) -> Tensor:
    """cos(sum_i c_i g_i, g_std) from G [k, k] float32 and c [k]; 0 where either norm is 0."""
    Gc = G @ coeffs.to(G)
    den = ((coeffs.to(G) @ Gc).clamp_min(0) * G[std, std].clamp_min(0)).sqrt()
    return torch.where(den > 0, Gc[std] / torch.where(den > 0, den, 1.0), torch.zeros_like(den))


class SteeringHealth:
    """Counts consecutive uphill measurements (cosine < 0) and warns after ``patience`` of them.

    patience: int >= 1, or None to switch the check off (the stat is still recorded).
    listeners: callables given each warning's message (e.g. a Trainer's logger.warning).
    """

    def __init__(self, patience: Optional[int] = 3):
        if patience is not None and not (isinstance(patience, int) and patience >= 1):
            raise ValueError(f"patience must be an int >= 1 (or None: no warning), got {patience!r}")
        self.patience = patience
        self.listeners: List[Callable[[str], None]] = []
        self._pending: List[Tuple[int, Tensor, Optional[torch.cuda.Event]]] = []
        self._streak: List[Tuple[int, float]] = []  # (step, cosine) of the current uphill run

    def measured(self, step: int, cos: Tensor, parts: Tensor, names: Sequence[str], fixed: Sequence[str]) -> None:
        """Queues a measurement without waiting for it: the cosine (a device scalar) and each component's
        part c_i <g_i, g_std> of <update, g_std> ([k]), to name the component that opposes Std."""
        if self.patience is None:
            return
        self._names, self._fixed = tuple(names), tuple(fixed)
        cos = torch.cat([cos.reshape(1), parts.to(cos)])
        if cos.is_cuda:
            host = cos.detach().to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((step, host, event))
        else:  # reading a CPU tensor waits for nothing
            self._pending.append((step, cos.detach(), None))
            self.check()

    def check(self) -> None:
        """Reads the measurements that have landed on the host, in order; warns on a long uphill run."""
        while self._pending and (self._pending[0][2] is None or self._pending[0][2].query()):
            step, cos, _ = self._pending.pop(0)
            value = float(cos[0])
            self._streak = self._streak + [(step, value)] if value < 0 else []
            self._parts = cos[1:]
            if len(self._streak) >= self.patience:
                self._warn()
                self._streak = []

    def _warn(self) -> None:
        cosines = ", ".join(f"step {s}: {c:+.3f}" for s, c in self._streak)
        others = [i for i, n in enumerate(self._names) if n != "std"] or [0]
        worst = min(others, key=lambda i: float(self._parts[i]))
        name = self._names[worst]
        msg = (f"GradientSteering: the steered update went uphill on the standard loss (cos(update, grad Std) "
               f"< 0) on {len(self._streak)} consecutive measurements ({cosines}); the Std loss rises to "
               f"first order. '{name}' opposes Std most (c <g_{name}, g_std> = {float(self._parts[worst]):+.3g}). "
               f"Remedies: {remedies(name, name in self._fixed)}.")
        warnings.warn(msg, SteeringConflictWarning, stacklevel=4)
        for listener in self.listeners:
            listener(msg)
