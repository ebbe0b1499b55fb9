"""The optimizer hook: keep the components' gradients apart, steer them right before the step.

    steer = vgs.GradientSteering(optimizer, policy="vgs", gamma=2.0)
    for micro_batch in batch:                                   # gradient accumulation is fine
        out = loss_fn(...)
        steer.backward({"std": out.std, "vis": out.vis, "lp": out.lp})
    optimizer.step()          # pre-hook: Gram -> policy -> combine into .grad, then the step
    optimizer.zero_grad()
    log(steer.stats)          # Gram, norms, cosines, coefficients, eta, fallback flag

``backward`` runs one backward per component (the graph is retained in between). Component 0's
gradient accumulates in ``.grad`` as usual; every other component has one buffer per parameter,
swapped into ``.grad`` while its backward runs, so autograd accumulates it in place (micro-batches
add up per component, no extra copy). On ``fixed`` steps, and on ``auto`` steps between two
measurements, it runs a single backward of eta * sum_i w_i L_i instead (no buffers).

At ``apply()`` (called by the optimizer's step pre-hook, by ``GradScaler.unscale_`` when the hook
was given the scaler, or by you): G = gram(components) (all-reduced over the process group), the
policy turns G into coefficients, combine() writes sum_i c_i g_i into ``.grad`` and the buffers are
released. Anything that reads ``.grad`` before the step (clip_grad_norm_, logging) must come after
``steer.apply()``.

AMP: pass ``scaler=`` and unscaled losses; the hook scales each loss itself, and steers *before*
the scaler unscales and checks ``.grad``, so an overflow in any component (inf/NaN in its buffer)
reaches ``.grad`` and the scaler skips the step. The policies are invariant to the common loss
scale; ``stats`` report the unscaled Gram.

zero_grad: the buffers are dropped at every apply(); ``optimizer.zero_grad()`` (wrapped by the
hook) also drops buffers collected since the last step and forgets that step, like ``.grad``.

Distributed (vgs_kernels/distributed.py): each rank's Gram is a partial one over what it counts
(its shards, its slice of replicated tensors), all-reduced over the process group (k*k numbers);
replicated gradients (DDP) are averaged per component first; the kernels read and write local
tensors (a DTensor's local shard under FSDP2).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor

from vgs_kernels import policies
from vgs_kernels.combine import combine
from vgs_kernels.distributed import ProcessGroupSync
from vgs_kernels.gram import gram

POLICIES = ("vgs", "project", "sum", "fixed", "auto")
STATE_KEY = "vgs_kernels.GradientSteering"


class GradientSteering:
    """Gradient steering on an existing optimizer (registers itself; ``remove()`` undoes it).

    Args:
        optimizer: any torch.optim.Optimizer; its parameters (all groups) are steered.
        policy: "vgs" (exact Eq. 15), "project" (PCGrad-style), "sum" (monolithic), "fixed"
            (constant ``eta``, one combined backward), "auto" (exact every ``every`` steps, EMA of
            eta with one combined backward in between), or a callable (G [k, k], names) -> [k]
            coefficients (device tensor).
        gamma: weight of the ``vis`` component (the second one if none is named "vis").
        lam: weight of a component named ``lp`` (VGSLoss's out.lp is not multiplied by lambda).
        weights: weights of other components by name (default 1.0; may override std/vis/lp too).
        eta: the constant of policy "fixed".
        every: K of policy "auto" (steps between exact measurements).
        ema: EMA decay of policy "auto": eta_ema <- ema * eta_ema + (1 - ema) * eta_exact.
        scaler: the torch.amp.GradScaler of an AMP loop (then pass unscaled losses).
        process_group: group over which the Gram is all-reduced; None: the world group when
            torch.distributed is initialised (DDP's group if ``model`` holds DDP), else no reduction.
        model: optional, the DDP- or FSDP2-wrapped model: lets the hook turn DDP's own gradient
            sync off on per-component steps (it averages each component once at the step instead)
            and check FSDP2's (vgs_kernels/distributed.py).
        backend: forces the gram/combine backend ("auto", "cpp", "triton", "reference").

    Attributes:
        stats: after each step, device tensors (call .item() when logging): "gram" [k, k] (unscaled),
            "norms" [k], "cos" [k, k], "coeffs" [k], "eta" (coeffs[std] / w[std]), "fallback" (bool:
            the Gram or the policy's coefficients were not finite, the plain weighted sum was used),
            and "step", "mode" ("exact" or "combined": then only coeffs, eta, fallback), "names";
            policy "auto" adds "eta_ema" and, on exact steps, "eta_error" = |eta_ema - eta| / eta
            (how far the EMA used on the combined steps was from the exact value).
        step_count, eta_ema: the state saved with optimizer.state_dict() (or self.state_dict()).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, policy: Union[str, policies.Policy] = "vgs",
                 gamma: float = 2.0, *, lam: float = 0.01, weights: Optional[Mapping[str, float]] = None,
                 eta: Optional[float] = None, every: int = 16, ema: float = 0.7,
                 scaler: Optional[Any] = None, process_group: Optional[Any] = None,
                 backend: Optional[str] = None, model: Optional[torch.nn.Module] = None):
        inner = getattr(optimizer, "optimizer", None)  # HF Accelerate's AcceleratedOptimizer wraps one
        if not isinstance(optimizer, torch.optim.Optimizer) and isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if getattr(optimizer, "_vgs_steering", None) is not None:
            raise RuntimeError("this optimizer already has a GradientSteering hook; remove() it first")
        if not callable(policy) and policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES} or a callable (G, names) -> coeffs, got {policy!r}")
        if policy == "fixed" and eta is None:
            raise ValueError("policy='fixed' needs eta= (e.g. 0.41, the paper's value at gamma=2)")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        self.optimizer, self.policy, self.scaler, self.backend = optimizer, policy, scaler, backend
        self.gamma, self.lam, self.eta, self.every, self.ema = float(gamma), float(lam), eta, every, ema
        self.weights = dict(weights or {})
        self.process_group = process_group
        self.names: Optional[tuple] = None
        self.step_count = 0
        self.eta_ema: Optional[Tensor] = None
        self.stats: Dict[str, Any] = {}
        self._buffers: Dict[Tensor, List[Optional[Tensor]]] = {}  # param -> grads of components 1..k-1
        self._open = False   # gradients of a step are being collected
        self._split = True   # ... per component (else one combined backward)
        self._sync = ProcessGroupSync(optimizer, process_group, model, self._wants_split)
        self._handles = [optimizer.register_step_pre_hook(lambda *_: self.apply()),
                         optimizer.register_state_dict_post_hook(self._save),
                         optimizer.register_load_state_dict_pre_hook(self._load)]
        self._patched = [(optimizer, "zero_grad", self._wrap(optimizer.zero_grad, lambda *a, **k: self.reset()))]
        if scaler is not None:  # steer before the scaler unscales and checks .grad for inf/NaN
            self._patched.append((scaler, "unscale_", self._wrap(
                scaler.unscale_, lambda opt: self.apply() if opt is self.optimizer else None)))
        for obj, name, fn in self._patched:
            setattr(obj, name, fn)
        optimizer._vgs_steering = self

    @staticmethod
    def _wrap(method: Callable, before: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            before(*args, **kwargs)
            return method(*args, **kwargs)
        return wrapped

    # ------------------------------------------------------------------ collecting gradients

    def backward(self, losses: Mapping[str, Tensor], *, retain_graph: bool = False) -> None:
        """Backward of each named scalar loss into its own gradient (or one combined backward).

        The names and their order are fixed by the first call (component 0 is the one whose
        gradient lives in .grad). A loss that does not require grad contributes zero.
        """
        names = self._check(losses)
        if not self._open:
            self._split = self._wants_split()
            self._open = True
        params = self._params()
        self._sync.before_backward(names, params, self._split)
        live = [i for i, n in enumerate(names) if losses[n].requires_grad]
        if not live:
            return
        if not self._split:
            c = self._fixed_coeffs(losses[names[live[0]]].device)
            total = sum(c[i] * losses[names[i]] for i in live)
            self._run_backward(self._scale(total), retain_graph)
            return
        for pos, i in enumerate(live):
            retain = retain_graph or pos < len(live) - 1
            loss = self._scale(losses[names[i]])
            if i == 0:
                self._run_backward(loss, retain)
                continue
            stash = [p.grad for p in params]  # .grad holds component 0; swap component i in
            for p in params:
                p.grad = self._buffers.get(p, (None,) * len(names))[i - 1]
            try:
                self._run_backward(loss, retain)
            finally:
                for p, g in zip(params, stash):
                    if p.grad is not None or p in self._buffers:
                        self._buffers.setdefault(p, [None] * (len(names) - 1))[i - 1] = p.grad
                    p.grad = g

    def _check(self, losses: Mapping[str, Tensor]) -> tuple:
        if not isinstance(losses, Mapping) or not losses:
            raise TypeError("losses must be a non-empty dict {name: scalar loss tensor}")
        names = tuple(losses)
        for n, loss in losses.items():
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"losses[{n!r}] must be a scalar tensor, got "
                                 f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
        if self.names is None:
            self._set_names(names)
        elif names != self.names:
            raise ValueError(f"losses must have the components {self.names} (in that order) as in the "
                             f"first call, got {names}")
        return names

    def _set_names(self, names: tuple) -> None:
        if not 1 <= len(names) <= 4:
            raise ValueError(f"1 to 4 components can be steered, got {len(names)}: {names}")
        self._w_dev = None
        self._w, self._std, self._vis = policies.base_weights(
            names, self.gamma, {**({"lp": self.lam} if "lp" in names else {}), **self.weights})
        self.names = names

    def _wants_split(self) -> bool:
        """Whether this step's backward (between steps: the next one's) runs per component."""
        if self._open:
            return self._split
        return self.policy != "fixed" and not (
            self.policy == "auto" and self.eta_ema is not None and self.step_count % self.every != 0)

    def _run_backward(self, loss: Tensor, retain_graph: bool) -> None:
        """The one place a backward runs (DDP's sync is switched by ProcessGroupSync.before_backward)."""
        torch.autograd.backward(loss, retain_graph=retain_graph)

    def _scale(self, loss: Tensor) -> Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def _params(self) -> List[Tensor]:
        """The optimizer's trainable parameters, each once (a tied weight is one Parameter)."""
        seen, out = set(), []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    # ------------------------------------------------------------------ steering

    def _device(self) -> torch.device:
        params = self._params()
        return params[0].device if params else torch.device("cpu")

    def _weights(self, device: torch.device) -> Tensor:
        """w as a [k] float32 tensor on `device`, built once (a blocking host-to-device copy)."""
        if self._w_dev is None or self._w_dev.device != device:
            self._w_dev = torch.tensor(self._w, dtype=torch.float32).to(device)
        return self._w_dev

    def _fixed_coeffs(self, device: torch.device) -> Tensor:
        if self.policy != "fixed":
            self.eta_ema = self.eta_ema.to(device)  # once, after loading a checkpoint
        return policies.fixed(self._weights(device), self.eta if self.policy == "fixed" else self.eta_ema)

    def apply(self) -> None:
        """Steers the gradients collected since the last step into .grad (idempotent per step)."""
        if not self._open:
            return
        self._open = False
        try:
            if self._split:
                self._steer()
            else:
                params = self._params()
                self._sync.average(params, [[p.grad] for p in params], self.names)  # replicas: mean .grad
                device = self._device()
                c = self._fixed_coeffs(device)
                self.stats = {"step": self.step_count, "mode": "combined", "names": self.names,
                              "coeffs": c, "eta": c[self._std] / self._w[self._std],
                              "fallback": torch.zeros((), dtype=torch.bool, device=device)}
        finally:
            self._buffers.clear()
            self.step_count += 1

    def _steer(self) -> None:
        k = len(self.names)
        params = self._params()
        cols = [[p.grad, *self._buffers.get(p, (None,) * (k - 1))] for p in params]
        out, cols, lists = self._sync.prepare(params, cols, self.names)  # local tensors; Gram's share
        device = out[0].device if out else self._device()
        G = gram(lists, backend=self.backend) if lists[0] else torch.zeros(k, k, device=device)
        G = self._sync.reduce_gram(G.to(device))
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
        if scale is not None:  # the Gram of the unscaled gradients (the policies do not care)
            G = G / scale.to(G).square()
        w = self._weights(device)
        policy = "vgs" if self.policy == "auto" else self.policy
        raw = (policy(G, self.names) if callable(policy)
               else policies.BUILTIN[policy](G, w, self._std, self._vis))
        coeffs, fell_back = policies.guard(G, raw.to(device=device, dtype=torch.float32), w)
        combine(out, [[col[i] for col in cols] for i in range(k)], coeffs, backend=self.backend)
        norms = G.diagonal().clamp_min(0).sqrt()
        denom = norms[:, None] * norms[None, :]
        eta = coeffs[self._std] / w[self._std]
        self.stats = {"step": self.step_count, "mode": "exact", "names": self.names, "gram": G,
                      "norms": norms, "cos": torch.where(denom > 0, G / denom, torch.zeros_like(G)),
                      "coeffs": coeffs, "eta": eta, "fallback": fell_back}
        if self.policy == "auto":
            if self.eta_ema is not None:  # how far the EMA (used in between) is from the exact eta
                previous = self.eta_ema.to(device)
                self.stats["eta_error"] = (previous - eta).abs() / eta.abs()
                new = self.ema * previous + (1 - self.ema) * eta
                self.eta_ema = torch.where(fell_back, previous, new)
            else:
                self.eta_ema = torch.where(fell_back, torch.ones_like(eta), eta)
            self.stats["eta_ema"] = self.eta_ema

    # ------------------------------------------------------------------ bookkeeping

    def reset(self) -> None:
        """Drops the gradients collected since the last step (optimizer.zero_grad() calls this)."""
        self._buffers.clear()
        self._open = False

    def state_dict(self) -> Dict[str, Any]:
        return {"step_count": self.step_count, "eta_ema": self.eta_ema, "names": self.names}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.eta_ema = state["eta_ema"]
        if state.get("names") is not None and self.names is None:
            self._set_names(tuple(state["names"]))
        elif state.get("names") is not None and tuple(state["names"]) != self.names:
            raise ValueError(f"saved components {tuple(state['names'])} differ from {self.names}")

    def _save(self, optimizer, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        state_dict[STATE_KEY] = self.state_dict()
        return state_dict

    def _load(self, optimizer, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        state_dict = dict(state_dict)
        mine = state_dict.pop(STATE_KEY, None)
        if mine is not None:
            self.load_state_dict(mine)
        return state_dict

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
