"""DDP's own gradient sync, switched off around the forwards of per-component steps
(vgs_kernels/distributed/process_group.py says why: DDP all-reduces only the first backward after
each forward, so the hook averages each component itself at the step)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Set

import torch
from torch import nn


class DDPSyncSwitch:
    """Sets ``require_backward_grad_sync = False`` (what ``model.no_sync()`` does) around each forward of
    the DDP modules in ``model`` while ``split()`` says the step is per component, restores the user's
    flag after, and remembers which modules synced a backward themselves (combined steps)."""

    def __init__(self, model: Optional[nn.Module], split: Callable[[], bool]):
        ddp = [m for m in (model.modules() if model is not None else ())
               if isinstance(m, nn.parallel.DistributedDataParallel)]
        self.process_group: Optional[Any] = ddp[0].process_group if ddp else None
        self._split = split
        self._params = {m: {id(p) for p in m.parameters()} for m in ddp}
        self._synced: Dict[nn.Module, bool] = {}  # DDP syncs the coming backward itself
        self._user_flag: Dict[nn.Module, bool] = {}
        self._handles = [h for m in ddp for h in (m.register_forward_pre_hook(self._pre_forward),
                                                  m.register_forward_hook(self._post_forward, always_call=True))]

    def synced(self) -> Set[int]:
        """ids of the parameters DDP averaged itself since the last call (then forgotten)."""
        ids = set().union(*(ids for m, ids in self._params.items() if self._synced.get(m)))
        self._synced.clear()
        return ids

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        self._user_flag[module] = module.require_backward_grad_sync
        if self._split():
            module.require_backward_grad_sync = False
        if torch.is_grad_enabled():
            self._synced[module] = module.require_backward_grad_sync

    def _post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        module.require_backward_grad_sync = self._user_flag.pop(module, module.require_backward_grad_sync)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
