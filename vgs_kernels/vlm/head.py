"""The LM head as the model's forward applies it: weight, bias, and the logit transform after it.

Families differ in what their forward does after ``lm_head``, and the config does not say: Aya Vision
multiplies by ``text_config.logit_scale`` while Cohere2-Vision, with the same attribute, does not;
Granite-Docling and Granite-4-Vision divide by ``text_config.logits_scaling``; Gemma-3's
conditional-generation model never applies a ``final_logit_softcapping`` set in its config, PaliGemma
over Gemma-2 does. So the transform is measured, not read: one forward on a two-token text input with
the head's output replaced by known values z (a forward hook), and the logits it returns fitted as
``softcap · tanh(logit_scale · z / softcap)``. A transform that is not of that form raises.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from vgs_kernels.vlm.specs import hf_model

# |z| of the probe: wide enough to saturate any softcap (up to ~1e3 / logit_scale), with a second row
# of small values where tanh is linear, for the scale.
_WIDE, _NARROW = 1e4, 1e-2
_TRANSFORMS: "weakref.WeakKeyDictionary[torch.nn.Module, Tuple[float, Optional[float]]]" = weakref.WeakKeyDictionary()


class LMHead(NamedTuple):
    """weight [V, H], bias [V] or None (the head's parameters, not copies); logits of a last hidden
    state h: ``(h @ weight.T + bias) * logit_scale``, then ``softcap * tanh(z / softcap)`` when softcap
    is set (``logits``)."""

    weight: Tensor
    bias: Optional[Tensor]
    logit_scale: float = 1.0
    softcap: Optional[float] = None

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "LMHead":
        """The head of a transformers causal LM / VLM (or DDP, DeepSpeed wrappers of one). The transform
        is probed with one forward the first time a model is seen (`logit_transform`)."""
        model = hf_model(model)
        head = model.get_output_embeddings()
        if head is None or not isinstance(getattr(head, "weight", None), Tensor):
            raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is "
                             f"{type(head).__name__}): not a causal LM")
        if model not in _TRANSFORMS:
            _TRANSFORMS[model] = logit_transform(model)
        return cls(head.weight, head.bias, *_TRANSFORMS[model])

    def logits(self, h: Tensor) -> Tensor:
        """[..., H] -> [..., V] in h's dtype (plain torch; the losses take the fields instead)."""
        z = torch.nn.functional.linear(h, self.weight, self.bias) * self.logit_scale
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)


@torch.no_grad()
def logit_transform(model: torch.nn.Module) -> Tuple[float, Optional[float]]:
    """(logit_scale, softcap) such that the forward's logits are softcap · tanh(logit_scale · z / softcap)
    (softcap None: logit_scale · z) of the LM head's output z. One forward of the model on two text
    tokens. ValueError naming the class when the forward does something else to z."""
    model = hf_model(model)
    head = model.get_output_embeddings()
    vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
    ramp = torch.linspace(-1, 1, vocab, dtype=torch.float64)
    z = torch.stack([ramp * _WIDE, ramp * _NARROW]).float()

    def replace(mod, args, out: Tensor) -> Tensor:
        if out.shape[-2:] != z.shape:
            raise ValueError(f"{type(model).__name__}: its LM head computed logits of shape {tuple(out.shape)} for "
                             f"a two-token input; expected [..., 2, {vocab}] (cannot probe its logit transform)")
        return z.to(out.device).expand_as(out)

    handle = head.register_forward_hook(replace)
    try:
        ids = torch.full((1, 2), _text_id(model.config), dtype=torch.long, device=head.weight.device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    finally:
        handle.remove()
    got, z = logits[0, -2:].double().cpu(), z.double()
    eps = 8 * torch.finfo(logits.dtype).eps
    scale = float((got[1] * z[1]).sum() / z[1].square().sum())
    big = float(got[0].abs().max())
    cap = None if (got[0] - scale * z[0]).abs().max() <= eps * max(big, 1.0) else big
    if cap is not None:  # the narrow row through atanh: tanh's own curvature out of the scale
        scale = float(((cap * torch.atanh(got[1] / cap)) * z[1]).sum() / z[1].square().sum())
    fit = scale * z if cap is None else cap * torch.tanh(scale * z / cap)
    if not scale or (fit - got).abs().max() > eps * max(big, 1.0):
        raise ValueError(f"{type(model).__name__}'s forward transforms its LM head's output in a way that is not a "
                         "logit scale followed by a softcap (the form the fused losses take): measured "
                         f"logit_scale={scale:.6g}, softcap={cap}")
    return scale, cap


def _text_id(config) -> int:
    """A token id that is not a special image / video / audio placeholder (which would need pixel inputs)."""
    special = set()
    for cfg in (config, *(getattr(config, k, None) for k in ("text_config", "vision_config"))):
        for key, value in (vars(cfg) if cfg is not None else {}).items():
            if key.endswith(("token_id", "token_index", "token_ids")) and not key.startswith(("bos", "eos", "pad")):
                special.update(value if isinstance(value, (list, tuple)) else [value])
    return next(i for i in range(len(special) + 1) if i not in special)
