"""The steered components: their names and weights, and their gradients over one optimizer step,
kept apart and checked at every seam of the loop.

Component 0's gradient accumulates in ``.grad`` as usual; every other component has one buffer per
parameter, swapped into ``.grad`` while its backward runs, so autograd accumulates it in place
(micro-batches add up per component, no extra copy).

While components are held apart, ``.grad`` holds only component 0, so anything that reads or writes
it before the steering runs would act on a part of the step. After every backward the hook records
which tensor each ``.grad`` is and its version counter (torch bumps it on every in-place write: no
host synchronisation, no values read); before the next backward and before steering it compares:

- every ``.grad`` dropped (``model.zero_grad()``): the loop discarded the batch, the buffers go too;
- a ``.grad`` written in place or replaced (``clip_grad_norm_``, ``model.zero_grad(set_to_none=False)``,
  ...): RuntimeError naming the fix, instead of a step that silently mixes a changed component 0
  with unchanged others.

``GradScaler.unscale_`` rescales without a version bump, so it is handled where it happens instead:
every GradScaler steers a hooked optimizer before unscaling it (amp.py).
"""
from __future__ import annotations

import math
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from vgs_kernels.steering import policies
from vgs_kernels.distributed.process_group import is_dtensor
from vgs_kernels.losses.vgs import VGSLossOutput

MODIFIED = (
    "GradientSteering: .grad of {n} parameter(s) was changed after steer.backward() and before the "
    "steering ran, while the other components' gradients were held apart (.grad holds only the first "
    "component until the step); the step would mix them. Usual causes and fixes: clip_grad_norm_ "
    "before optimizer.step() -> use steer.clip_grad_norm_(max_norm) (or call steer.apply() first); "
    "discarding a batch -> optimizer.zero_grad() or steer.reset() (model.zero_grad() "
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
        self.sharded = False
        self._buffers: List[List[Optional[Tensor]]] = []  # components 1..k-1, aligned with params
        self._marks: Optional[List[Optional[tuple]]] = None  # (.grad, its version) after the last backward

    def start(self, k: int) -> None:
        """A new step with k components: lists the parameters (once per step), no buffers yet."""
        self.params, self.k = trainable(self.optimizer), k
        self.sharded = any(is_dtensor(p) for p in self.params)  # FSDP2: local shards, even on one rank
        self.clear()

    def clear(self) -> None:
        self._buffers = []
        self._marks = None

    def run(self, i: int, backward: Callable[[], None]) -> None:
        """Runs ``backward()`` with component i's gradients in .grad (component 0 lives there)."""
        if i == 0:
            backward()
            return
        params = self.params
        if not self._buffers:
            self._buffers = [[None] * len(params) for _ in range(self.k - 1)]
        stash = [p.grad for p in params]
        for p, g in zip(params, self._buffers[i - 1]):
            p.grad = g
        try:
            backward()
        finally:
            self._buffers[i - 1] = [p.grad for p in params]
            for p, g in zip(params, stash):
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
        grads = [p.grad for p in self.params]
        if not self._buffers:
            return [[g] + [None] * (self.k - 1) for g in grads]
        return [list(col) for col in zip(grads, *self._buffers)]

    def lists(self) -> Tuple[List[Tensor], List[List[Optional[Tensor]]]]:
        """(out, lists) for one process and plain tensors, without per-parameter work beyond list
        building: lists[i][j] = component i's gradient of the j-th parameter that has any, out[j]
        its .grad (set to a component's buffer where component 0 had none: combine reads every
        element before writing it)."""
        grads = [p.grad for p in self.params]
        lists = [grads, *(self._buffers or [[None] * len(grads) for _ in range(self.k - 1)])]
        out = list(grads)
        drop = []
        for j in [j for j, g in enumerate(grads) if g is None]:
            first = next((col[j] for col in lists[1:] if col[j] is not None), None)
            if first is None:
                drop.append(j)
            else:
                self.params[j].grad = out[j] = first
        if drop:
            dropped = set(drop)
            keep = [j for j in range(len(grads)) if j not in dropped]
            out, lists = [out[j] for j in keep], [[col[j] for j in keep] for col in lists]
        return out, lists


class ComponentSpec:
    """The components' names (fixed by the first backward) and weights w (vgs_kernels/steering/policies.py).

    gamma, lam, weights: what the hook was given (None: not given). A loss output brings its own
    weights; one given to the hook as well must agree, so gamma and lambda are set in one place.
    fixed: names of fixed-coefficient components (policies.with_fixed), from the hook or the output.
    """

    def __init__(self, gamma: Optional[float], lam: Optional[float], weights: Mapping[str, float],
                 fixed: Sequence[str] = ()):
        self.fixed = tuple(fixed)
        self.explicit = {**({"vis": float(gamma)} if gamma is not None else {}),
                         **({"lp": float(lam)} if lam is not None else {}), **weights}
        self.gamma = 2.0 if gamma is None else float(gamma)
        self.lam = 0.01 if lam is None else float(lam)
        self.weights = dict(weights)
        self.names: Optional[tuple] = None
        self.fixed_idx: List[int] = []
        self._device_mask: Optional[Tensor] = None
        self.w: List[float] = []
        self.std = self.vis = 0
        self._device_w: Optional[Tensor] = None

    def adopt(self, out: VGSLossOutput) -> Optional[Tensor]:
        """A loss output's total, once its eta and weights are checked against the hook's (None when
        the output does not say its weights: then the hook's weights combine its components)."""
        if out.eta is not None:
            raise ValueError("the loss output was scaled by the loss's own eta (VGSLoss(eta=...)); with "
                             "GradientSteering leave the loss's eta=None: the policy sets eta "
                             "(policy='fixed', eta=...)")
        if out.fixed and tuple(out.fixed) != self.fixed:
            if self.fixed or self.names is not None:
                raise ValueError(f"the loss output fixes the components {tuple(out.fixed)} but the hook fixes "
                                 f"{self.fixed}; give fixed= to one of them only")
            self.fixed = tuple(out.fixed)
        if out.weights is None:
            return None
        adopted = dict(zip(self.names, self.w)) if self.names is not None else {}
        for name, have in out.weights.items():
            for given, what in ((self.explicit.get(name), "GradientSteering's"), (adopted.get(name), "the first call's")):
                if given is not None and not math.isclose(given, have):
                    raise ValueError(f"the loss output weighs {name!r} by {have} but {what} weight is {given}; "
                                     "give gamma / lam to the loss only (the hook takes them from its output)")
        return out.total

    def check(self, losses: Mapping[str, Tensor], weights: Optional[Mapping[str, float]] = None,
              differentiable: bool = True) -> tuple:
        """The names of `losses` (scalar tensors), checked against the first call's."""
        if not isinstance(losses, Mapping) or not losses:
            raise TypeError("losses must be a VGSLossOutput or a non-empty dict {name: scalar loss tensor}")
        names = tuple(losses)
        for n, loss in losses.items():
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"losses[{n!r}] must be a scalar tensor, got "
                                 f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
            if differentiable and not loss.requires_grad:
                raise ValueError(f"losses[{n!r}] does not require grad, so it would add nothing to the step: "
                                 "it was detached, computed under torch.no_grad(), or only its gradient "
                                 "was kept elsewhere (FusedLinearVGSLoss(components=False): pass the whole "
                                 "output, steer.backward(out)); drop a component that is constant")
        if self.names is None:
            self.set(names, weights)
        elif names != self.names:
            raise ValueError(f"losses must have the components {self.names} (in that order) as in the "
                             f"first call, got {names}")
        return names

    def set(self, names: tuple, weights: Optional[Mapping[str, float]] = None) -> None:
        if not 1 <= len(names) <= 4:
            raise ValueError(f"1 to 4 components can be steered, got {len(names)}: {names}")
        unknown = set(self.fixed) - set(names)
        if unknown:
            raise ValueError(f"fixed names components {sorted(unknown)} that are not among {names}")
        self._device_w = self._device_mask = None
        self.w, self.std, self.vis = policies.base_weights(
            names, self.gamma, {**({"lp": self.lam} if "lp" in names else {}), **(weights or {}), **self.weights},
            fixed=self.fixed)
        self.names = names
        self.fixed_idx = [names.index(n) for n in self.fixed]

    def tensor(self, device: torch.device) -> Tensor:
        """w as a [k] float32 tensor on `device`, built once (a blocking host-to-device copy)."""
        if self._device_w is None or self._device_w.device != device:
            self._device_w = torch.tensor(self.w, dtype=torch.float32).to(device)
        return self._device_w

    def fixed_mask(self, device: torch.device) -> Optional[Tensor]:
        """[k] bool, True at the fixed components (None when there are none), built once."""
        if not self.fixed_idx:
            return None
        if self._device_mask is None or self._device_mask.device != device:
            mask = torch.zeros(len(self.names), dtype=torch.bool)
            mask[self.fixed_idx] = True
            self._device_mask = mask.to(device)
        return self._device_mask
