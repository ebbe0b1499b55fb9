"""What DeepSpeed ZeRO-3 asks of the trainers' losses: the LM heads they read directly, gathered.

The losses take the heads' weights as tensors and never call the head modules, so ZeRO-3's module
hooks, which gather a module's parameters for its forward and its backward, do not run for them.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def gathered_heads(*models: torch.nn.Module) -> Iterator[None]:
    """Under ZeRO-3, the models' LM-head weights and biases gathered while a loss reads them, as TRL
    gathers its own (``trl.trainer.utils.maybe_gather_lm_head_ctx``; nothing to do otherwise, or when they
    are already whole). Run the loss inside the student's forward (``_forward_redirection``) so that
    ZeRO-3 reduces the head's gradient. A loss whose backward recomputes from a head
    (``fused_linear_decomposed_kl``) saves a copy of it: ZeRO-3 empties the gathered tensor on exit."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    heads = [m.get_output_embeddings() for m in models]
    params = [p for h in heads for p in (h.weight, h.bias) if p is not None]
    gather = maybe_gather_lm_head_ctx(*params)
    if isinstance(gather, contextlib.nullcontext):
        yield
        return
    for p in params:
        if p.requires_grad:
            _gather_when_grad_arrives(p)
    ids = {id(p) for p in params}
    with gather, torch.autograd.graph.saved_tensors_hooks(
            lambda t: t.detach().clone() if id(t) in ids else t, lambda t: t):
        yield


def _gather_when_grad_arrives(param: torch.nn.Parameter) -> None:
    """Autograd accumulates a gradient into a tensor of the parameter's current shape, empty for a
    partitioned one: the parameter is gathered again when its gradient arrives and partitioned once
    DeepSpeed's own post-accumulate hook (registered first, so run first) has reduced it. Once per
    parameter."""
    if getattr(param, "_vgs_gather_for_grad", False):
        return
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    held = []

    def gather(grad):
        ctx = maybe_gather_lm_head_ctx(param)
        ctx.__enter__()
        held.append(ctx)
        return grad

    def release(_):
        while held:
            held.pop().__exit__(None, None, None)

    param.register_hook(gather)
    param.register_post_accumulate_grad_hook(release)
    param._vgs_gather_for_grad = True
