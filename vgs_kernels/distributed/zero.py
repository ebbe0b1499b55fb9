"""DeepSpeed ZeRO 1/2/3 behind the distributed protocol (vgs_kernels/distributed/protocol.py).

``GradientSteering(optimizer, model=engine)``: ``ZeroSync`` runs every backward through
``engine.backward`` and steers inside ``engine.step()``; ``ZeroGrads`` keeps each component in
DeepSpeed's partitioned layout. The same partial Gram as torch's side, one all-reduce of k*k numbers.
deepspeed is never imported here unless a run already loaded it (sys.modules).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from vgs_kernels.distributed.process_group import ProcessGroupSync
from vgs_kernels.distributed.protocol import Rows


def deepspeed_engine(model: Any) -> Optional[Any]:
    """``model`` if it is a DeepSpeed engine (never imports deepspeed: a loaded one is in sys.modules)."""
    engine_mod = sys.modules.get("deepspeed.runtime.engine")
    return model if engine_mod is not None and isinstance(model, engine_mod.DeepSpeedEngine) else None


def is_zero_optimizer(optimizer: Any) -> bool:
    zero = sys.modules.get("deepspeed.runtime.base_optimizer")
    return zero is not None and isinstance(optimizer, zero.ZeROOptimizer)


def _zero_unsupported(engine: Any) -> Optional[str]:
    """Why this engine's configuration cannot be steered exactly (None: it can)."""
    if type(engine).__name__ == "PipelineEngine" or getattr(engine, "pipeline_parallelism", False):
        return "pipeline parallelism (PipelineModule / PipelineEngine): train_batch() runs its own backward"
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2, 3):
        return f"zero_optimization.stage={stage} (steering supports ZeRO stages 1, 2 and 3)"
    if engine.zero_quantized_gradients():
        return "zero_optimization.zero_quantized_gradients=true (ZeRO++ qgZ): the reduced gradients are quantised"
    for name, cfg in (("offload_optimizer", engine.zero_offload_optimizer()), ("offload_param", engine.zero_offload_param())):
        device = getattr(cfg, "device", None) or "none"
        device = getattr(device, "value", device)  # DeepSpeed's config keeps the enum's value (a str)
        if device != "none":
            return f"zero_optimization.{name} (device {device!r}): its partitions live in host buffers; drop it"
    if engine.fp16_enabled():
        return "fp16 (dynamic loss scaling); use bf16"
    if getattr(engine, "has_moe_layers", False):
        return "MoE layers (expert-parallel gradient groups)"
    if not engine.managed_gradient_accumulation():
        return "managed_gradient_accumulation=false"
    return None


class ZeroGrads:
    """Per-component gradients under DeepSpeed ZeRO, kept in its partitioned layout.

    Each component's backward runs through ``engine.backward`` as an accumulation boundary, so
    DeepSpeed reduces it (averaged over the data-parallel group) into its partition buffers; the hook
    adds the local partition into its own buffer for that component (k buffers of 1/world of the
    model) and zeroes DeepSpeed's, which at the step receives sum_i c_i g_i. A combined backward
    (``fixed``, ``auto`` between measurements) is component 0 alone, collected the same way, so every
    ``steer.backward`` between two ``engine.step()`` calls adds to the step, in every stage and policy,
    as ``.grad`` accumulates (ZeRO-1/2 would otherwise keep only the last backward that is an
    accumulation boundary, e.g. two calls at GA=1). Same interface as components.ComponentGrads.

    ZeRO-3 keeps each parameter's reduced partition in a persistent buffer that it overwrites or adds
    into only for the parameters that got a gradient in a backward, and never clears at the step.
    After a step that buffer still holds the steered gradient written into it, so a parameter that
    gets no gradient from component 0 (e.g. used only in a pass that only ``vis`` reaches) would count
    last step's update as this step's component 0: ``start`` zeroes the partitions first.

    DeepSpeed's state read or written (public where DeepSpeed has it):
    * ZeRO-3: deepspeed.utils.safe_get_local_grad / safe_set_local_grad.
    * ZeRO-1/2: no public local accessor exists (safe_get_full_grad all-reduces the full tensor);
      the tensor-fragment mapping it uses, ``param._hp_mapping.get_lp_grad_fragment(
      param._index_in_param_group)`` (private), is the partition of the reduced gradient.
    * ``engine._is_gradient_accumulation_boundary`` (private): the boundary override, restored after
      each forced boundary through the public set_gradient_accumulation_boundary.
    * ZeRO-3 only: its module counters ``applied_pre_backward_ref_cnt`` and ``ds_grads_remaining``
      (private) count one backward per forward; they are re-armed before each further component's
      backward over the same graph, so ZeRO-3 gathers the parameters again (else they are empty).
    """

    def __init__(self, engine: Any):
        self.engine, self.stage3 = engine, engine.zero_optimization_stage() == 3
        self.params: List[Tensor] = []
        self.k, self.sharded = 1, True
        self._acc: List[List[Optional[Tensor]]] = []
        self._armed: List[Tuple[nn.Module, Any, Any]] = []

    def start(self, k: int) -> None:
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]
        self.k = k
        self.clear()
        if self.stage3:  # last step's steered gradient is still in the partitions (class docstring)
            for p in self.params:
                self.local_grad(p).zero_()

    def clear(self) -> None:
        self._acc = []

    def local_grad(self, p: Tensor) -> Optional[Tensor]:
        """This rank's partition of p's reduced gradient (DeepSpeed's buffer), None if it has none."""
        if self.stage3:
            from deepspeed.utils import safe_get_local_grad
            return safe_get_local_grad(p)
        mapping = getattr(p, "_hp_mapping", None)
        return None if mapping is None else mapping.get_lp_grad_fragment(p._index_in_param_group)

    def set_local_grad(self, p: Tensor, value: Tensor) -> None:
        if self.stage3:  # safe_get_local_grad may return a copy (e.g. offload); write through the API
            from deepspeed.utils import safe_set_local_grad
            safe_set_local_grad(p, value)

    def run(self, i: int, backward: Callable[[], None]) -> None:
        """Component i's backward as a boundary; its local partitions are added to buffer i."""
        engine = self.engine
        if self.stage3:
            if i == 0:
                self._armed = [(m, m.__dict__.get("applied_pre_backward_ref_cnt"), m.__dict__.get("ds_grads_remaining"))
                               for m in engine.module.modules()]
            else:
                for m, refs, remaining in self._armed:
                    if refs is not None:
                        m.applied_pre_backward_ref_cnt = refs
                    if remaining is not None:
                        m.ds_grads_remaining = remaining
        before = engine._is_gradient_accumulation_boundary
        engine.set_gradient_accumulation_boundary(True)
        try:
            backward()
        finally:
            engine.set_gradient_accumulation_boundary(before)
        if not self._acc:
            self._acc = [[None] * len(self.params) for _ in range(self.k)]
        acc = self._acc[i]
        for j, p in enumerate(self.params):
            g = self.local_grad(p)
            if g is None:
                continue
            if acc[j] is None:
                acc[j] = g.clone()
            else:
                acc[j].add_(g)
            g.zero_()
            self.set_local_grad(p, g)

    def mark(self) -> None:
        """Nothing to record: .grad is DeepSpeed's (freed after each reduction)."""

    def intact(self) -> bool:
        return True

    def columns(self) -> List[List[Optional[Tensor]]]:
        if not self._acc:
            return [[None] * self.k for _ in self.params]
        return [list(col) for col in zip(*self._acc)]


class ZeroSync(ProcessGroupSync):
    """The distributed side of GradientSteering under DeepSpeed ZeRO (stages 1, 2, 3).

    Every backward goes through ``engine.backward`` (which divides by gradient_accumulation_steps);
    the hook steers when DeepSpeed's optimizer steps, inside ``engine.step()`` at the accumulation
    boundary, before DeepSpeed computes the gradient norm and clips (``gradient_clipping`` sees the
    steered gradient). The Gram is partial over the local partitions (disjoint across ranks, padding
    is zero), all-reduced once (k*k numbers). The hook's state travels in the ZeRO optimizer's
    state_dict, so engine.save_checkpoint / load_checkpoint carry it.
    """

    def __init__(self, engine: Any, zero_optimizer: Any, optimizer: torch.optim.Optimizer, process_group: Any,
                 split: Callable[[], bool]):
        why = _zero_unsupported(engine)
        if why is not None:
            raise NotImplementedError(f"GradientSteering with DeepSpeed: {why} is not supported")
        if zero_optimizer is not engine.optimizer:
            raise ValueError("GradientSteering: with model=<DeepSpeed engine>, pass the optimizer that "
                             "deepspeed.initialize returned (engine.optimizer)")
        group = engine.optimizer.dp_process_group
        if process_group is not None and process_group is not group:
            raise ValueError("GradientSteering: process_group= differs from the DeepSpeed engine's data-parallel "
                             "group; leave it None (the engine's group is used)")
        super().__init__(optimizer, group, None, split)
        self.engine, self.zero_optimizer = engine, zero_optimizer

    def backward_fn(self, given: Optional[Callable[..., Any]]) -> Callable[..., Any]:
        """engine.backward, or a given function that runs it (with extra kwargs, e.g. Trainer's)."""
        if hasattr(getattr(given, "__self__", None), "deepspeed_engine_wrapped"):
            raise ValueError("GradientSteering: backward_fn=accelerator.backward under DeepSpeed also calls "
                             "engine.step() after each component's backward; drop backward_fn= (the hook runs "
                             "engine.backward) and call engine.step() after steer.backward")
        return given or self.engine.backward

    def collector(self) -> ZeroGrads:
        self._collector_ref = ZeroGrads(self.engine)
        return self._collector_ref

    def patches(self, hook: Any) -> List[Tuple[Any, str, Callable]]:
        """Instance wrappers of the ZeRO optimizer: step steers first (and refuses gradients that
        bypassed the hook); state_dict / load_state_dict carry the hook's state."""
        zero, state_key = self.zero_optimizer, hook.STATE_KEY
        step, state_dict, load_state_dict = zero.step, zero.state_dict, zero.load_state_dict

        def steered_step(*args, **kwargs):
            if not hook._open and not hook._done:
                raise RuntimeError("GradientSteering: engine.step() with gradients that did not come through "
                                   "steer.backward() (a plain engine.backward()); they would be stepped unsteered. "
                                   "Call steer.backward(losses) instead, or steer.remove()")
            hook.apply()
            try:
                return step(*args, **kwargs)
            finally:
                hook._done = False

        def saving(*args, **kwargs):
            sd = state_dict(*args, **kwargs)
            sd[state_key] = hook.state_dict()
            return sd

        def loading(state_dict_list, *args, **kwargs):
            first = state_dict_list[0] if isinstance(state_dict_list, (list, tuple)) else state_dict_list
            if isinstance(first, dict) and first.get(state_key) is not None:
                hook.load_state_dict(first[state_key])
            return load_state_dict(state_dict_list, *args, **kwargs)

        def no_clip(*args, **kwargs):
            raise RuntimeError("GradientSteering: with DeepSpeed set gradient_clipping in its config (it clips "
                               "the steered gradient inside engine.step()); steer.clip_grad_norm_ would see "
                               "none of DeepSpeed's gradient partitions")

        patched = [(zero, "step", steered_step), (zero, "state_dict", saving), (zero, "load_state_dict", loading),
                   (hook, "clip_grad_norm_", no_clip)]
        if hasattr(zero, "process_gradients"):  # ZeRO-1/2
            process = zero.process_gradients

            def process_defined(param, i):
                # torch runs a parameter's post-accumulate-grad hook even when the backward gave it no gradient
                # (reached only through an autograd Function that returned None for it: the fused loss's text-only
                # side in the std component's backward); ZeRO-1/2's hook would reduce the None
                if param.grad is not None:
                    process(param, i)

            patched.append((zero, "process_gradients", process_defined))
        return patched

    def average(self, params: Sequence[Tensor], cols: Rows, names: Sequence[str]) -> None:
        """A combined step: DeepSpeed averaged every gradient in its reduction; the sum of the step's
        backward passes (ZeroGrads' component 0) goes back into its partitions."""
        grads = self._collector_ref
        for p, col in zip(grads.params, grads.columns()):
            if col[0] is not None:
                g = grads.local_grad(p)
                g.copy_(col[0])
                grads.set_local_grad(p, g)

    def prepare(self, params: Sequence[Tensor], cols: Rows, names: Sequence[str]) -> Tuple[List[Tensor], Rows, Rows]:
        grads, k = self._collector_ref, len(cols[0]) if cols else 1
        out, lcols, lists = [], [], [[] for _ in range(k)]
        self._written = []
        for p, col in zip(params, cols):
            if all(g is None for g in col):
                continue
            g = grads.local_grad(p)
            row = [t if t is not None else torch.zeros_like(g) for t in col]
            out.append(g)
            self._written.append(p)
            lcols.append(row)
            for i, t in enumerate(row):
                lists[i].append(t)
        return out, lcols, lists

    def combined(self, out: Sequence[Tensor]) -> None:
        """After combine() wrote into ``out``: hands each partition to DeepSpeed (ZeRO-3's API)."""
        for p, g in zip(self._written, out):
            self._collector_ref.set_local_grad(p, g)
        self._written = []
