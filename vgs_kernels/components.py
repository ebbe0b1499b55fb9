"""The component gradients of one optimizer step, kept apart and checked at every seam of the loop.

Component 0's gradient accumulates in ``.grad`` as usual; every other component has one buffer per
parameter, swapped into ``.grad`` while its backward runs, so autograd accumulates it in place
(micro-batches add up per component, no extra copy).

While components are held apart, ``.grad`` holds only component 0, so anything that reads or writes
it before the steering runs would act on a part of the step. After every backward the hook records
which tensor each ``.grad`` is and its version counter (torch bumps it on every in-place write: no
host synchronisation, no values read); before the next backward and before steering it compares:

- every ``.grad`` dropped (``model.zero_grad()``): the loop discarded the batch, the buffers go too;
- a ``.grad`` written in place or replaced (``clip_grad_norm_``, ``GradScaler.unscale_`` without
  ``scaler=``, ``model.zero_grad(set_to_none=False)``, ...): RuntimeError naming the fix, instead of
  a step that silently mixes a changed component 0 with unchanged others.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

MODIFIED = (
    "GradientSteering: .grad of {n} parameter(s) was changed after steer.backward() and before the "
    "steering ran, while the other components' gradients were held apart (.grad holds only the first "
    "component until the step); the step would mix them. Usual causes and fixes: clip_grad_norm_ "
    "before optimizer.step() -> use steer.clip_grad_norm_(max_norm) (or call steer.apply() first); a "
    "torch.amp.GradScaler -> pass it as GradientSteering(..., scaler=scaler) and give steer.backward "
    "unscaled losses; discarding a batch -> optimizer.zero_grad() or steer.reset() (model.zero_grad() "
    "with set_to_none=True works too).")


def trainable(optimizer: torch.optim.Optimizer) -> List[Tensor]:
    """The optimizer's trainable parameters, each once (a tied weight is one Parameter)."""
    seen, out = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class ComponentGrads:
    """Per-component gradients of the parameters of one optimizer over one step.

    ``params`` is listed once per step (``start``); ``columns()`` gives, per parameter, the k
    gradients [.grad, buffer_1, ..., buffer_{k-1}] (None where a component has none).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params: List[Tensor] = []
        self.k = 1
        self._buffers: Dict[Tensor, List[Optional[Tensor]]] = {}
        self._marks: Optional[List[Optional[tuple]]] = None  # (.grad, its version) after the last backward

    def start(self, k: int) -> None:
        """A new step with k components: lists the parameters (once per step), no buffers yet."""
        self.params, self.k = trainable(self.optimizer), k
        self.clear()

    def clear(self) -> None:
        self._buffers.clear()
        self._marks = None

    def run(self, i: int, backward: Callable[[], None]) -> None:
        """Runs ``backward()`` with component i's gradients in .grad (component 0 lives there)."""
        if i == 0:
            backward()
            return
        params, k = self.params, self.k
        stash = [p.grad for p in params]
        for p in params:
            p.grad = self._buffers.get(p, (None,) * (k - 1))[i - 1]
        try:
            backward()
        finally:
            for p, g in zip(params, stash):
                if p.grad is not None or p in self._buffers:
                    self._buffers.setdefault(p, [None] * (k - 1))[i - 1] = p.grad
                p.grad = g

    def mark(self) -> None:
        """Records each .grad and its version after a backward (and rejects sparse gradients)."""
        marks = []
        for p in self.params:
            g = p.grad
            if g is not None and g.layout != torch.strided:
                raise TypeError(f"GradientSteering: a parameter of shape {tuple(p.shape)} has a {g.layout} "
                                "gradient (nn.Embedding(sparse=True)?); steering needs dense gradients: "
                                "build the module with sparse=False")
            marks.append(None if g is None else (g, g._version))
        self._marks = marks

    def intact(self) -> bool:
        """True when .grad is as the last backward left it, False when the loop dropped every .grad
        (the batch was discarded: the buffers are dropped too); raises when it changed otherwise."""
        if self._marks is None:
            return True
        changed = dropped = held = 0
        for p, m in zip(self.params, self._marks):
            g = p.grad
            if m is None:
                changed += g is not None
                continue
            held += 1
            if g is None:
                dropped += 1
            elif g is not m[0] or g._version != m[1]:
                changed += 1
        if changed == 0 and dropped == 0:
            return True
        if changed == 0 and dropped == held:
            self.clear()
            return False
        raise RuntimeError(MODIFIED.format(n=changed + dropped))

    def columns(self) -> List[List[Optional[Tensor]]]:
        """cols[j] = [params[j].grad, component 1's gradient, ...] (None where absent)."""
        empty = (None,) * (self.k - 1)
        return [[p.grad, *self._buffers.get(p, empty)] for p in self.params]
