"""The optimizer hook: keep the components' gradients apart, steer them right before the step.

    loss_fn = vgs.VGSLoss(gamma=2.0, lam=0.01)
    steer = vgs.GradientSteering(optimizer, policy="vgs")      # gamma/lam come with the loss output
    for micro_batch in batch:                                   # gradient accumulation is fine
        out = loss_fn(...)
        steer.backward(out)          # or a dict {"std": ..., "vis": ..., "lp": ...} of any losses
    steer.clip_grad_norm_(1.0)       # optional: clipping sees the steered gradient
    optimizer.step()                 # pre-hook: Gram -> policy -> combine into .grad, then the step
    optimizer.zero_grad()
    log(steer.stats)                 # the same keys every step (NaN where a step measured nothing)

``backward`` runs one backward per component (vgs_kernels/steering/components.py keeps them apart). On
``fixed`` steps, and on ``auto`` steps between two measurements, it runs a single backward of
eta * sum_i w_i L_i instead (``needs_components`` tells which is coming).

At ``apply()`` (called by the optimizer's step pre-hook, by ``GradScaler.unscale_`` when the hook
was given the scaler, by ``clip_grad_norm_``, or by you): G = gram(components) (all-reduced over the
process group), the policy turns G into coefficients, combine() writes sum_i c_i g_i into ``.grad``.
Anything that changes ``.grad`` before that on a per-component step raises (components.py);
``model.zero_grad()`` there discards the collected components like ``optimizer.zero_grad()``.

AMP: pass ``scaler=`` and unscaled losses; the hook scales each loss itself and steers *before* the
scaler unscales and checks ``.grad``, so an overflow in any component reaches ``.grad`` and the
scaler skips the step. The policies are invariant to the common loss scale; ``stats`` report the
unscaled Gram. A scaler not given to the hook works too when the losses are scaled by it: every
GradScaler steers a hooked optimizer before unscaling it.

Checkpoints: the hook's state (step count, auto's EMA) travels inside ``optimizer.state_dict()``
(in its first param group, which ``Optimizer.load_state_dict`` keeps), so it is restored whether
the optimizer's state is loaded before or after the hook is created.

Distributed (vgs_kernels/distributed/): each rank's Gram is a partial one over what it counts,
all-reduced over the process group (k*k numbers); replicated gradients (DDP) are averaged per
component first; the kernels read and write local tensors (a DTensor's local shard under FSDP2).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from vgs_kernels.distributed import make_sync
from vgs_kernels.losses.vgs import VGSLossOutput
from vgs_kernels.ops import combine, gram
from vgs_kernels.steering import amp, state, step
from vgs_kernels.steering.components import ComponentGrads, ComponentSpec, trainable
from vgs_kernels.steering.health import SteeringHealth
from vgs_kernels.steering.policies import POLICIES, AutoEta, Policy

Losses = Union[VGSLossOutput, Mapping[str, Tensor]]


class GradientSteering:
    """Gradient steering on an existing optimizer (registers itself; ``remove()`` undoes it).

    Args:
        optimizer: any torch.optim.Optimizer (or a wrapper with ``.optimizer``, e.g. Accelerate's);
            its trainable parameters (all groups) are steered.
        policy: "vgs" (exact Eq. 15), "project" (conflict-aware VGS), "pcgrad" (PCGrad as TorchJD),
            "sum" (monolithic), "fixed" (constant ``eta``, one combined backward), "auto" (exact
            every ``every`` steps, EMA of eta with one combined backward in between), or a callable
            (G [k, k] float32, names) -> [k] coefficients. vgs_kernels/steering/policies.py says what each
            guarantees.
        gamma, lam: weights of the ``vis`` component (the second one if none is named "vis") and
            of ``lp``. Default: taken from the loss output given to ``backward`` (2.0 and 0.01 for
            a dict of losses); given here and different from the loss's, ``backward`` raises.
        weights: weights of other components by name (default 1.0; may override std/vis/lp too).
        eta: the constant of policy "fixed". every, ema: policy "auto" measures the exact eta
            every ``every`` steps (and again right after a step that fell back) and uses
            eta_ema <- ema * eta_ema + (1 - ema) * eta in between.
        scaler: the torch.amp.GradScaler of an AMP loop: the hook scales each loss (pass unscaled
            ones). Without it, scale the losses yourself (scaler.scale(loss)) as in any AMP loop:
            every GradScaler steers a hooked optimizer before unscaling it.
        process_group: group over which the Gram is all-reduced; None: the world group when
            torch.distributed is initialised (DDP's group if ``model`` holds DDP), else none.
        model: optional, the (DDP/FSDP2-wrapped) model: lets the hook manage DDP's sync, check
            FSDP2's, and reject sparse embeddings up front.
        backend: forces the gram/combine backend ("auto", "cpp", "triton", "reference").
        backward_fn: runs every backward the hook runs, as ``backward_fn(loss, retain_graph=...)``
            (e.g. ``accelerator.backward``); default ``torch.autograd.backward``.
        patience: emit vgs.SteeringConflictWarning after this many consecutive measurements with
            std_descent < 0 (vgs_kernels/steering/health.py); None: never.
        fixed: names of fixed-coefficient components (e.g. ``("grpo",)``): coefficient = weight on
            every step, outside the policy's Gram (policies.with_fixed). A loss output can bring
            its own (GRPO + VGS does: vgs_kernels/losses/grpo_vgs.py).

    Attributes:
        stats: after each step, the keys STAT_KEYS, every step: "step", "mode" ("exact" or
            "combined"), "names", and device tensors "gram" [k, k] (unscaled), "norms" [k], "cos"
            [k, k], "coeffs" [k], "eta" (coeffs[std] / w[std]), "fallback" (bool: G or the policy's
            coefficients were not finite, the plain weighted sum was used), "eta_ema" (auto) and
            "eta_error" = |eta_ema - eta| / eta on auto's measurements, "std_descent" = cos(steered
            update, grad Std) from G and the coefficients; NaN where not measured.
        step_count, eta_ema: the state saved with optimizer.state_dict() (or self.state_dict()).
    """

    STATE_KEY = state.STATE_KEY  # where the hook's state rides in an optimizer state_dict (state.py)

    def __init__(self, optimizer: torch.optim.Optimizer, policy: Union[str, Policy] = "vgs",
                 gamma: Optional[float] = None, *, lam: Optional[float] = None,
                 weights: Optional[Mapping[str, float]] = None, eta: Optional[float] = None,
                 every: int = 16, ema: float = 0.7, scaler: Optional[Any] = None,
                 process_group: Optional[Any] = None, backend: Optional[str] = None,
                 model: Optional[torch.nn.Module] = None, backward_fn: Optional[Callable[..., Any]] = None,
                 patience: Optional[int] = 3, fixed: Sequence[str] = ()):
        given, optimizer = optimizer, _unwrap(optimizer)
        if getattr(optimizer, "_vgs_steering", None) is not None:
            raise RuntimeError("this optimizer already has a GradientSteering hook; remove() it first")
        if not callable(policy) and policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES} or a callable (G, names) -> coeffs, got {policy!r}")
        if policy == "fixed" and eta is None:
            raise ValueError("policy='fixed' needs eta= (e.g. 0.41, the paper's value at gamma=2)")
        _reject_sparse(model)
        amp.check_scaler(scaler, backward_fn)
        self.optimizer, self.policy, self.scaler, self.backend, self.eta = optimizer, policy, scaler, backend, eta
        self._spec, self._auto = ComponentSpec(gamma, lam, dict(weights or {}), fixed), AutoEta(every, ema)
        self.health = SteeringHealth(patience)
        self.step_count = 0
        self.stats: Dict[str, Any] = {}
        # torch (one process, DDP, FSDP2) or DeepSpeed ZeRO (model=engine): who keeps the components
        # apart, runs the backward and reduces (vgs_kernels/distributed/protocol.py)
        self._sync = make_sync(given, optimizer, process_group, model, self._wants_split)
        self._grads = self._sync.collector() or ComponentGrads(optimizer)
        self._backward_fn = self._sync.backward_fn(backward_fn)
        self._open = False   # gradients of a step are being collected
        self._split = True   # ... per component (else one combined backward)
        self._done = False   # this step's gradients were steered (or discarded)
        self._unscaling: Optional[Any] = None  # a GradScaler unscaling this optimizer right now
        self._handles = [optimizer.register_step_pre_hook(lambda *_: self._before_step()),
                         optimizer.register_state_dict_post_hook(lambda _, sd: state.put(sd, self.state_dict())),
                         optimizer.register_load_state_dict_post_hook(self._load)]
        self._patched = [(optimizer, "zero_grad", _before(optimizer.zero_grad, lambda *a, **k: self.reset())),
                         *self._sync.patches(self)]
        for obj, name, fn in self._patched:
            setattr(obj, name, fn)
        amp.guard_grad_scalers()
        optimizer._vgs_steering = self
        self._load(optimizer)  # the optimizer's state may have been loaded before the hook existed

    @property
    def names(self) -> Optional[tuple]:
        """The components' names, fixed by the first backward."""
        return self._spec.names

    @property
    def eta_ema(self) -> Optional[Tensor]:
        """Policy "auto"'s EMA of eta (NaN until its first successful measurement; None before)."""
        return self._auto.value

    @property
    def needs_components(self) -> bool:
        """Whether the coming backward runs per component (False: one combined backward)."""
        return self._wants_split()

    def backward(self, losses: Losses, *, retain_graph: bool = False) -> None:
        """Backward of each named scalar loss into its own gradient (or one combined backward).

        losses: a VGSLossOutput (its weights and component mode come with it) or a dict
        {name: scalar loss}. The names and their order are fixed by the first call (component 0's
        gradient lives in .grad). Every component must carry a gradient. Calls between steps add up.
        """
        out = losses if isinstance(losses, VGSLossOutput) else None
        total = self._spec.adopt(out) if out is not None else None
        comps = out.losses() if out is not None else losses
        names = self._spec.check(comps, out.weights if out is not None else None,
                                 differentiable=total is None or out.components)
        if self._open and not self._grads.intact():  # the loop dropped every .grad: a new step
            self._open = False
        if not self._open:
            self.health.check()  # earlier measurements that have reached the host (no wait)
            self._split = self._wants_split()
            self._grads.start(len(names))
            self._open, self._done = True, False
        self._sync.before_backward(names, self._grads.params, self._split)
        if not self._split:
            c, spec = self._fixed_coeffs(comps[names[0]].device), self._spec
            if total is not None:  # eta scales the steered part; fixed components keep their weight
                steered = out.steered if out.steered is not None else total
                loss = (c[spec.std] / spec.w[spec.std]) * steered
                for i in spec.fixed_idx:
                    loss = loss + c[i] * comps[names[i]]
            else:
                loss = sum(c[i] * comps[n] for i, n in enumerate(names))
            self._grads.run(0, lambda: self._run_backward(loss, retain_graph))
            return
        if out is not None and not out.components:
            raise ValueError(f"GradientSteering(policy={self.policy!r}): this step needs each component's "
                             "gradient (needs_components is True) but the loss output only carries the combined "
                             "one; use FusedLinearVGSLoss(components=True), or set loss_fn.components = "
                             "steer.needs_components before each forward")
        for i, n in enumerate(names):
            retain = retain_graph or i < len(names) - 1
            self._grads.run(i, lambda: self._run_backward(comps[n], retain))
        self._grads.mark()

    def _wants_split(self) -> bool:
        """Whether this step's backward (between steps: the next one's) runs per component."""
        if self._open:
            return self._split
        return self.policy != "fixed" and (self.policy != "auto" or self._auto.due(self.step_count))

    def _run_backward(self, loss: Tensor, retain_graph: bool) -> None:
        """The one place a backward runs (DDP's sync is switched by ProcessGroupSync.before_backward)."""
        self._backward_fn(loss if self.scaler is None else self.scaler.scale(loss), retain_graph=retain_graph)

    def _fixed_coeffs(self, device: torch.device) -> Tensor:
        eta = self.eta if self.policy == "fixed" else self._auto.value.to(device)
        return step.fixed_coefficients(self._spec, eta, device)

    def _before_step(self) -> None:
        """The optimizer's step pre-hook: steer, and refuse gradients that bypassed the hook."""
        if not self._open and not self._done and any(p.grad is not None for p in trainable(self.optimizer)):
            raise RuntimeError("GradientSteering: optimizer.step() with gradients that did not come through "
                               "steer.backward() (a plain loss.backward() or the framework's own backward); "
                               "they would be stepped unsteered. Call steer.backward(out) instead (with "
                               "TRL use vgs_kernels.integrations.trl.VGSDistillationTrainer), or "
                               "steer.remove() to train without steering")
        self.apply()

    def apply(self) -> None:
        """Steers the gradients collected since the last step into .grad (idempotent per step)."""
        if not self._open or (self._split and not self._grads.intact()):
            self._open = False
            return
        self._open, self._done = False, True
        try:
            params = self._grads.params
            device = params[0].device if params else torch.device("cpu")
            if self._split:
                self._steer(device)
            else:
                self._sync.average(params, [[p.grad] for p in params], self.names)  # replicas: mean .grad
                self._record(step.step_stats(self.step_count, "combined", self._spec, self._fixed_coeffs(device),
                                             device))
        finally:
            self._grads.clear()
            self.step_count += 1

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, **kwargs: Any) -> Tensor:
        """Steers (and, with ``scaler=``, unscales) first, then torch.nn.utils.clip_grad_norm_ over
        the steered parameters; returns the total norm of the steered gradient."""
        self.apply()
        if self.scaler is not None and amp.stage(self.scaler, self.optimizer) == "READY":
            self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(trainable(self.optimizer), max_norm, norm_type, **kwargs)

    def _steer(self, device: torch.device) -> None:
        """Gram (all-reduced) -> the policy's coefficients -> combine into .grad (steering/step.py)."""
        k = len(self.names)
        if self._sync.group() is None and not self._grads.sharded:  # one process: no per-parameter work
            out, lists = self._grads.lists()
            comps = lists
        else:
            out, cols, lists = self._sync.prepare(self._grads.params, self._grads.columns(), self.names)
            comps = [[col[i] for col in cols] for i in range(k)]
        device = out[0].device if out else device
        G = gram(lists, backend=self.backend) if lists[0] else torch.zeros(k, k, device=device)
        G = self._sync.reduce_gram(G.to(device))
        G = amp.unscaled_gram(G, self.scaler if self.scaler is not None else self._unscaling)
        coeffs, fell_back = step.coefficients(G, self._spec, self.policy)
        combine(out, comps, coeffs, backend=self.backend)
        self._sync.combined(out)
        self._record(step.step_stats(self.step_count, "exact", self._spec, coeffs, device, G, fell_back))

    def _record(self, stats: Dict[str, Any]) -> None:
        """Sets ``stats``, feeding a measurement to the health check and auto's EMA."""
        if stats["mode"] == "exact":
            parts = stats["coeffs"].to(stats["gram"]) * stats["gram"][:, self._spec.std]
            self.health.measured(self.step_count, stats["std_descent"], parts, self._spec.names, self._spec.fixed)
            if self.policy == "auto":
                stats["eta_error"] = self._auto.measured(stats["eta"], stats["fallback"])
        if self.policy == "auto" and self._auto.value is not None:
            stats["eta_ema"] = self._auto.value
        self.stats = stats

    def reset(self) -> None:
        """Drops the gradients collected since the last step (optimizer.zero_grad() calls this)."""
        self._grads.clear()
        self._open = self._done = False

    def state_dict(self) -> Dict[str, Any]:
        return state.save(self.step_count, self._auto, self._spec)

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.step_count = state.restore(saved, self._auto, self._spec)

    def _load(self, optimizer: torch.optim.Optimizer) -> None:
        if (saved := state.pop(optimizer)) is not None:
            self.load_state_dict(saved)

    def remove(self) -> None:
        """Unregisters the hooks and wrappers and drops the buffers (.grad is left as it is)."""
        for h in self._handles:
            h.remove()
        for obj, name, fn in self._patched:
            if obj.__dict__.get(name) is fn:
                delattr(obj, name)
        self._handles, self._patched = [], []
        self._sync.remove()
        self.reset()
        if getattr(self.optimizer, "_vgs_steering", None) is self:
            del self.optimizer._vgs_steering


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer (HF Accelerate's AcceleratedOptimizer subclasses Optimizer but wraps one)."""
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def _before(method: Callable, before: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        before(*args, **kwargs)
        return method(*args, **kwargs)
    return wrapped


def _reject_sparse(model: Optional[torch.nn.Module]) -> None:
    for m in model.modules() if isinstance(model, torch.nn.Module) else ():
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse:
            raise TypeError(f"GradientSteering: {type(m).__name__}(sparse=True) gives sparse gradients; "
                            "steering needs dense ones: build it with sparse=False")
