"""Distributed steering behind one protocol (protocol.py): torch's process groups (one process, DDP,
FSDP2: process_group.py, ddp.py) and DeepSpeed ZeRO 1/2/3 (zero.py). ``make_sync`` picks the engine."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from vgs_kernels.distributed.process_group import (ProcessGroupSync, all_reduce_mean, is_dtensor, local,
                                                   resolve_group)
from vgs_kernels.distributed.protocol import Sync
from vgs_kernels.distributed.zero import ZeroGrads, ZeroSync, deepspeed_engine, is_zero_optimizer

__all__ = ["Sync", "make_sync", "ProcessGroupSync", "ZeroSync", "ZeroGrads", "all_reduce_mean", "is_dtensor",
           "local", "resolve_group", "deepspeed_engine"]


def make_sync(given: Any, optimizer: torch.optim.Optimizer, process_group: Any, model: Any,
              split: Callable[[], bool]) -> Sync:
    """The distributed side for the optimizer the user gave (``given``, before unwrapping): DeepSpeed
    ZeRO's when ``model`` is the engine, else torch's (DDP / FSDP2 / one process)."""
    engine = deepspeed_engine(model)
    if engine is not None:
        return ZeroSync(engine, given, optimizer, process_group, split)
    if is_zero_optimizer(given) or (
            isinstance(model, nn.Module) and any(hasattr(p, "ds_id") for p in model.parameters())):
        raise TypeError(f"GradientSteering: a DeepSpeed ZeRO optimizer needs model= the DeepSpeed engine "
                        f"(the first value deepspeed.initialize returns), got model={type(model).__name__}; "
                        "the hook runs every backward through engine.backward and steers at engine.step()")
    return ProcessGroupSync(optimizer, process_group, model, split)
