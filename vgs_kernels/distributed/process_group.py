"""Distributed steering: the Gram of the globally averaged component gradients, from local shards.

Data parallelism splits the batch over the ranks of a process group. The steered update must be
the one a single process computes on the concatenated batch, so the Gram is that of the *averaged*
component gradients, g_i = mean over ranks of g_i^r, and it is computed without gathering them:

    G = sum over ranks of the partial Gram over the elements that rank counts   (one all_reduce, k*k)

then every rank runs the same policy on the same G and combines its local tensors. Each gradient is
one of:

* a DTensor (FSDP2 ``fully_shard``, or any DTensor parameter): FSDP2's reduce-scatter has averaged
  it already and the rank holds its local shard. A Shard placement splits it, so each rank counts
  its shard; along a Replicate mesh dimension every coordinate holds the same values, so one
  coordinate (chosen per parameter to spread the work) counts it. Partial placements are refused
  (the local values are not the gradient). Nothing is all-gathered.
* a plain tensor (DDP, FSDP2 ``ignored_params``, any replicated module): a replica computed on this
  rank's data. Each component is averaged over the group (bucketed all_reduce, below); then every
  rank holds the same values and counts a 1/world slice, so the Gram counts the tensor once and the
  work is split evenly.

Tied or shared weights are one Parameter (autograd accumulates every use into its one .grad) and
the hook lists each Parameter once, so they count once per step too.

DDP. DDP all-reduces .grad only in the first backward after each forward, so it cannot average the
hook's per-component backward passes (the later components would stay local; with
``gradient_as_bucket_view`` two components would even share DDP's bucket). A DDP communication hook
has the same limit (it runs inside that one synced backward). So the per-component passes run
without DDP's sync and, at the step, each component's gradient is all-reduced once: buckets of
``BUCKET_BYTES``, at most ``IN_FLIGHT`` in flight. That is k all-reduces of the gradient per
optimizer step however many micro-batches were accumulated, the least the exact Gram needs (each
g_i must be averaged), and nothing is sent twice. Pass the DDP module as ``model=`` so the hook can
turn DDP's own sync off on those steps: around each forward of a per-component step it sets
``require_backward_grad_sync = False`` (what ``model.no_sync()`` does) and restores it after. On
steps with one combined backward (policy "fixed"; "auto" between measurements) DDP syncs as usual,
overlapped with the backward, and the hook sends nothing. Without ``model=`` the result is the
same, but DDP also all-reduces whatever the first backward produced (one redundant all-reduce per
step, averaging an average changes nothing) and, unless ``find_unused_parameters=True``, DDP needs
component 0 to reach every parameter. User ``no_sync()`` for gradient accumulation keeps working
either way.

FSDP2 reduce-scatters in every backward, so each component arrives averaged and sharded. Do not
turn FSDP2's gradient sync off (``set_requires_gradient_sync(False)``) on per-component steps: FSDP2
then accumulates the unsharded gradient of all components in one buffer (an error when the hook
can see the FSDP modules: ``model=``). HF Accelerate's ``accumulate()`` turns it off between
optimizer steps unless ``GradientAccumulationPlugin(..., sync_each_batch=True)``.

DeepSpeed ZeRO 1/2/3 (``model=`` the engine): ZeroSync and ZeroGrads (zero.py) keep each
component in DeepSpeed's partitioned layout; the same partial Gram, one all-reduce of k*k numbers.

Checks (a clear error on every rank instead of a hang or a silent mix): the component names and
the parameter layout are compared across ranks at the first ``steer.backward`` (before any backward
collective), and, when there are plain (replicated) gradients, once per step together with the step
count and which (parameter, component) gradients exist on any rank: a rank where a parameter got no
gradient takes part with zeros (as DDP's find_unused_parameters), one that got none on any rank
stays None. Every rank must call ``steer.backward`` and ``optimizer.step()`` in every step.
"""
from __future__ import annotations

import hashlib
from collections import deque
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vgs_kernels.distributed.ddp import DDPSyncSwitch
from vgs_kernels.distributed.protocol import Rows
from vgs_kernels.ops.gram import MAX_K

try:  # public since torch 2.4; absent from builds without torch.distributed
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # pragma: no cover
    DTensor = Partial = Replicate = None

BUCKET_BYTES = 25 * 2 ** 20  # DDP's default bucket size
IN_FLIGHT = 2                # all-reduce buckets in flight (bounds the extra memory to 2 buckets)


def is_dtensor(t: Optional[Tensor]) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The tensor the kernels read and write: a DTensor's local shard (same storage), else t."""
    return t.to_local() if is_dtensor(t) else t


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_group(process_group: Any) -> Optional[Any]:
    """The group to reduce over, or None for no communication.

    None: the world group when torch.distributed is initialised, else None. A ProcessGroup or a
    1-D DeviceMesh: that group. A group of one rank needs no communication (None).
    """
    if process_group is None:
        if not _initialised():
            return None
        process_group = dist.group.WORLD
    elif not _initialised():
        raise RuntimeError("GradientSteering: process_group was given but torch.distributed is not "
                           "initialised; call torch.distributed.init_process_group(...) first (or pass "
                           "process_group=None for single-process training)")
    if hasattr(process_group, "get_group") and hasattr(process_group, "ndim"):  # DeviceMesh
        if process_group.ndim != 1:
            raise ValueError(f"process_group: a DeviceMesh must be 1-D, got {process_group.ndim}-D; pass "
                             "the ProcessGroup spanning all its ranks (e.g. the world group)")
        process_group = process_group.get_group()
    if process_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("process_group: this rank is not a member of the given group")
    return process_group if dist.get_world_size(process_group) > 1 else None


def _fingerprint(*parts: Any) -> int:
    """A 62-bit hash, equal across processes (Python's hash() of str is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _layout(params: Sequence[Tensor]) -> Tuple:
    return tuple((tuple(p.shape), str(p.dtype), is_dtensor(p)) for p in params)


def agree(group: Any, device: torch.device, fp: int, steps: int, names: Sequence[str], params: Sequence[Tensor],
          when: str, extra: Optional[Tensor] = None) -> Optional[Tensor]:
    """One MAX all_reduce of [fp, -fp, steps, -steps, *extra]: raises on every rank when the
    fingerprints or step counts differ; returns the reduced `extra`."""
    head = torch.tensor([fp, -fp, steps, -steps], dtype=torch.int64)
    msg = head if extra is None else torch.cat([head, extra.to(torch.int64).cpu()])
    msg = msg.to(device)
    dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=group)
    got = msg[:4].tolist()
    if got[0] != -got[1] or got[2] != -got[3]:
        mine = {"components": tuple(names), "steps": steps, "parameters": len(params),
                "layout": _fingerprint(_layout(params))}
        every: List[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine, group=group)
        ranks = dist.get_process_group_ranks(group)
        lines = "\n".join(f"  rank {r}: {d}" for r, d in zip(ranks, every))
        raise RuntimeError(f"GradientSteering: ranks disagree at the {when} (every rank must pass the same "
                           f"components in the same order, steer the same parameters and step together):\n"
                           f"{lines}")
    return None if extra is None else msg[4:]


def counted(group: Any, world: int, rank: int, j: int, p: Tensor,
            col: List[Optional[Tensor]], row: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """What of parameter j's local gradients this rank adds to the Gram (empty: nothing)."""
    if group is None:
        return row
    g = next(t for t in col if t is not None)
    if is_dtensor(g):
        mesh, counted = g.device_mesh, True
        _check_mesh(group, mesh)
        coord = mesh.get_coordinate() or []
        for d, place in enumerate(g.placements):
            if isinstance(place, Partial):
                raise ValueError(f"GradientSteering: parameter {j}'s gradient is a DTensor with placements "
                                 f"{g.placements}; Partial gradients are not reduced yet (redistribute them "
                                 "to Shard or Replicate before the step)")
            if isinstance(place, Replicate):
                counted = counted and coord[d] == j % mesh.size(d)
        return row if counted else []
    if all(t is None or t.is_contiguous() for t in row):  # a 1/world slice of the replica
        n = p.numel()
        lo, hi = n * rank // world, n * (rank + 1) // world
        return [None if t is None else t.view(-1)[lo:hi] for t in row]
    return row if j % world == rank else []

def _check_mesh(group: Any, mesh: Any) -> None:
    ranks = set(mesh.mesh.flatten().tolist())
    if ranks != set(dist.get_process_group_ranks(group)):
        raise ValueError(f"GradientSteering: DTensor gradients live on the device mesh of ranks "
                         f"{sorted(ranks)} but the process group has ranks "
                         f"{sorted(dist.get_process_group_ranks(group))}; pass the group (or 1-D mesh) "
                         "spanning the mesh as process_group=")


class ProcessGroupSync:
    """The distributed side of GradientSteering (vgs_kernels/steering/hook.py); a no-op in one process.

    Args:
        optimizer: the steered optimizer (a step post-hook counts steps for the cross-rank check).
        process_group: see resolve_group; None with a DDP module in ``model``: DDP's group.
        model: optional module (DDP, FSDP2, or a module containing them): lets the hook turn DDP's
            own sync off on per-component steps, and check FSDP2's gradient sync.
        split: callable -> whether the next backward of this step is per component.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, process_group: Any = None,
                 model: Optional[nn.Module] = None, split: Callable[[], bool] = lambda: True):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the DDP- or FSDP2-wrapped model), got "
                            f"{type(model).__name__}")
        self.steps = 0
        self._ddp = DDPSyncSwitch(model, split)
        self.process_group = process_group if process_group is not None else self._ddp.process_group
        resolve_group(self.process_group)  # fails now if the group is not initialised
        self._fsdp = [m for m in (model.modules() if model is not None else ()) if hasattr(m, "_get_fsdp_state")]
        self._names_checked = False
        self._handles = [optimizer.register_step_post_hook(lambda *_: self._count())]

    def group(self) -> Optional[Any]:
        return resolve_group(self.process_group)

    def backward_fn(self, given: Optional[Callable[..., Any]]) -> Callable[..., Any]:
        """What runs every backward of the hook: the user's backward_fn, else torch's."""
        return given or torch.autograd.backward

    def collector(self) -> Optional[Any]:
        """What keeps the components' gradients apart; None: the hook's own (.grad swapping,
        vgs_kernels/steering/components.py)."""
        return None

    def patches(self, hook: Any) -> List[Tuple[Any, str, Callable]]:
        """Instance methods to wrap for the hook's lifetime (none: torch's optimizer hooks suffice)."""
        return []

    def combined(self, out: Sequence[Tensor]) -> None:
        """Called after combine() wrote the steered gradient into ``out`` (nothing to hand over)."""

    def _count(self) -> None:
        self.steps += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._ddp.remove()

    def before_backward(self, names: Sequence[str], params: Sequence[Tensor], split: bool) -> None:
        """Called by steer.backward before any backward pass runs."""
        group = self.group()
        if group is not None and not self._names_checked:
            agree(group, params[0].device if params else torch.device("cpu"), _fingerprint(tuple(names), _layout(params)),
                  self.steps, names, params, "first backward")
            self._names_checked = True
        if split:
            for m in self._fsdp:
                state = m._get_fsdp_state()
                groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
                if any(g is not None and not g.reduce_grads for g in groups):
                    raise RuntimeError(
                        "GradientSteering: FSDP2 gradient sync is off (set_requires_gradient_sync(False)) "
                        "during a per-component backward; FSDP2 would accumulate all components in one "
                        "unsharded buffer. Keep it on for steered micro-batches (each component is "
                        "reduce-scattered and accumulated in its own sharded buffer).")

    # ------------------------------------------------------------------ per step


    # ------------------------------------------------------------------ per step

    def reduce_gram(self, G: Tensor) -> Tensor:
        """Sums the local partial Gram over the group in place (k*k numbers, not gradients)."""
        group = self.group()
        if group is not None:
            dist.all_reduce(G, op=dist.ReduceOp.SUM, group=group)
        return G

    def prepare(self, params: Sequence[Tensor], cols: Rows, names: Sequence[str]) -> Tuple[List[Tensor], Rows, Rows]:
        """Brings the collected gradients to what the kernels need, on every rank alike.

        Args:
            params: every steered parameter, in the same order on every rank.
            cols: cols[j][i] = component i's gradient of params[j] (.grad first) or None; lists are
                updated in place (zeros where another rank has a gradient and this one has none).
        Returns:
            (out, cols, lists): for the parameters with any gradient, ``out`` the local tensors of
            their .grad (set to the first component present when .grad was None), ``cols`` the
            local tensors of their components, and ``lists`` the k lists the Gram reads (what this
            rank counts: shards, its slice of replicas).
        """
        self.average(params, cols, names)
        group, k = self.group(), len(cols[0]) if cols else 1
        world, rank = (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)
        out, lcols, lists = [], [], [[] for _ in range(k)]
        for j, (p, col) in enumerate(zip(params, cols)):
            if all(g is None for g in col):
                continue
            if p.grad is None:
                p.grad = next(g for g in col if g is not None)
            out.append(local(p.grad))
            row = [local(g) for g in col]
            lcols.append(row)
            for i, g in enumerate(counted(group, world, rank, j, p, col, row)):
                lists[i].append(g)
        return out, lcols, lists

    def average(self, params: Sequence[Tensor], cols: Rows, names: Sequence[str]) -> None:
        """Averages the plain (replicated) gradients over the group in place, once the ranks agree on
        which exist: where another rank has a gradient and this one has none, zeros take part (and
        become .grad for component 0). Nothing to do in one process, for DTensor (FSDP2) gradients
        (reduce-scattered already) and for what DDP synced itself (combined steps with model=)."""
        group = self.group()
        synced = self._ddp.synced()
        plain = [j for j, p in enumerate(params) if not is_dtensor(p)] if group is not None else []
        if not plain:
            return
        k = len(cols[0])
        if any(getattr(params[j], "_fsdp_flattened", False) for j in plain):
            raise ValueError("GradientSteering: FSDP1 (FullyShardedDataParallel) parameters are flat shards, not "
                             "replicas; use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP")
        present = torch.tensor([[g is not None for g in cols[j]] + [False] * (MAX_K - k) for j in plain])
        fp = _fingerprint(tuple(names), k, _layout(params))
        present = agree(group, params[plain[0]].device, fp, self.steps, names, params, "step", present.flatten())
        present = present.view(len(plain), MAX_K)[:, :k].cpu().tolist()
        todo = []
        for row, j in enumerate(plain):
            col, like = cols[j], next((g for g in cols[j] if g is not None), params[j])
            for i in range(k):
                if present[row][i] and col[i] is None:  # another rank has it: take part with zeros
                    col[i] = torch.zeros_like(like, memory_format=torch.contiguous_format)
                    if i == 0:
                        params[j].grad = col[0]
            if id(params[j]) not in synced:
                todo += [g for g in col if g is not None]
        all_reduce_mean(todo, group)


def all_reduce_mean(tensors: Sequence[Tensor], group: Any, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Averages every tensor over the group in place: consecutive tensors of one dtype and device are
    packed into buckets of about ``bucket_bytes``, each bucket is one all_reduce (divided first, as
    DDP does, so fp16 sums do not overflow), at most IN_FLIGHT buckets at a time."""
    world = dist.get_world_size(group)
    pending: deque = deque()

    def finish() -> None:
        work, flat, bucket = pending.popleft()
        work.wait()
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()

    def launch(bucket: List[Tensor]) -> None:
        if len(pending) == IN_FLIGHT:
            finish()
        flat = torch.cat([t.reshape(-1) for t in bucket]).div_(world)
        pending.append((dist.all_reduce(flat, group=group, async_op=True), flat, bucket))

    bucket: List[Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device
                       or size + t.numel() * t.element_size() > bucket_bytes):
            launch(bucket)
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        launch(bucket)
    while pending:
        finish()
