"""The one small protocol every distributed engine implements for the steering hook.

The hook (vgs_kernels/steering/hook.py) talks to torch's side (one process, DDP, FSDP2:
process_group.py) or DeepSpeed ZeRO's (zero.py) through these methods only; a new engine is a
new class here, chosen by ``make_sync`` (__init__.py).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Protocol, Sequence, Tuple

from torch import Tensor

Rows = List[List[Optional[Tensor]]]


class Sync(Protocol):
    """What the hook needs from an engine; every call is made on every rank alike."""

    def group(self) -> Optional[Any]:
        """The process group the Gram is all-reduced over (None: no communication)."""

    def backward_fn(self, given: Optional[Callable[..., Any]]) -> Callable[..., Any]:
        """What runs each backward of the hook (``given``: the user's backward_fn)."""

    def collector(self) -> Optional[Any]:
        """What keeps the components' gradients apart (None: the hook's .grad swapping)."""

    def patches(self, hook: Any) -> List[Tuple[Any, str, Callable]]:
        """(object, attribute, replacement) to install for the hook's lifetime."""

    def before_backward(self, names: Sequence[str], params: Sequence[Tensor], split: bool) -> None:
        """Checks before any backward of a step runs (ranks agree; sync settings)."""

    def average(self, params: Sequence[Tensor], cols: Rows, names: Sequence[str]) -> None:
        """Averages replicated gradients over the group in place (combined steps too)."""

    def prepare(self, params: Sequence[Tensor], cols: Rows, names: Sequence[str]) -> Tuple[List[Tensor], Rows, Rows]:
        """(out, cols, lists): the local tensors combine writes and reads, and what the Gram counts."""

    def reduce_gram(self, G: Tensor) -> Tensor:
        """Sums the local partial Gram [k, k] over the group."""

    def combined(self, out: Sequence[Tensor]) -> None:
        """Called after combine() wrote the steered gradient into ``out``."""

    def remove(self) -> None:
        """Unregisters whatever the engine registered."""
