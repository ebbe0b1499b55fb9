"""VLM plumbing: from a transformers VLM batch to the four response-logit tensors of the decomposed loss.

On-policy distillation scores the student's response tokens four times: student and teacher, each with
the image and text-only (the same chat prompt with the image removed). This module

- builds the rollout batch from ``generate`` output (:func:`rollout_batch`),
- builds the text-only batch by dropping the vision placeholder span (``<|vision_start|>``, the
  ``<|image_pad|>`` run, ``<|vision_end|>``) and the vision inputs, re-padding on the batch's side
  (:func:`strip_images`) — for Qwen's chat templates this is token for token what the template renders
  for the same conversation without the image,
- runs the four forward passes, projecting only the response positions through the LM head
  (``logits_to_keep`` with a [B, T] position tensor), and checks that the two passes saw the same
  response tokens (:func:`distill_logits`).

Tested with Qwen2-VL, Qwen2.5-VL and Qwen3-VL; any transformers VLM whose config names its placeholder
ids (``image_token_id`` / ``image_token_index``) and whose forward accepts ``logits_to_keep`` fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch

# Inputs that carry the image (or video) itself; the text-only batch drops them.
VISION_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_values_videos", "video_grid_thw",
               "second_per_grid_ts", "position_ids", "rope_deltas")


@dataclass(frozen=True)
class VisionTokens:
    """Token ids of a VLM's vision placeholders.

    ``image``/``video`` are the placeholder ids repeated once per visual token; ``start``/``end`` the
    markers around each run (None where the model has none); ``merge`` the spatial merge size that maps
    an ``image_grid_thw`` row to its token count (prod(thw) / merge**2), None if the model has no grids.
    """

    image: int
    video: int | None = None
    start: int | None = None
    end: int | None = None
    merge: int | None = None
    patch_dim: int | None = None  # values per flattened patch row of pixel_values (Qwen-style encoders)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "VisionTokens":
        cfg = model.config
        image = getattr(cfg, "image_token_id", None)
        image = getattr(cfg, "image_token_index", None) if image is None else image
        if image is None:
            raise ValueError(f"{type(model).__name__}: config has no image_token_id / image_token_index; "
                             "is this a vision-language model?")
        vision_cfg = getattr(cfg, "vision_config", None)
        merge = getattr(vision_cfg, "spatial_merge_size", None)
        dims = [getattr(vision_cfg, k, None) for k in ("in_channels", "temporal_patch_size", "patch_size")]
        patch_dim = dims[0] * dims[1] * dims[2] ** 2 if merge and all(isinstance(d, int) for d in dims) else None
        return cls(image=image, video=getattr(cfg, "video_token_id", None),
                   start=getattr(cfg, "vision_start_token_id", None), end=getattr(cfg, "vision_end_token_id", None),
                   merge=merge, patch_dim=patch_dim)

    def ids(self, device: torch.device | None = None) -> torch.Tensor:
        """All ids the text-only batch drops, as a 1-D int64 tensor."""
        ids = [i for i in (self.image, self.video, self.start, self.end) if i is not None]
        return torch.tensor(ids, dtype=torch.long, device=device)


class DistillLogits(NamedTuple):
    """The inputs of the decomposed loss, aligned position by position over the response tokens.

    s, u: student logits with / without the image, [B, T, V], differentiable. a, b: teacher logits with /
    without the image, [B, T, V], no grad (teacher dtype). mask: [B, T] bool, True on response tokens
    (responses are left-aligned: row i holds its response tokens at 0 .. n_i - 1).
    ``vgs.VGSLoss()(*distill_logits(...))`` is the loss.
    """

    s: torch.Tensor
    u: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    mask: torch.Tensor


def check_processor(processor: Any, model: torch.nn.Module) -> None:
    """Raise ValueError when ``processor`` and ``model`` disagree on the image placeholder or vocabulary."""
    tokens = VisionTokens.from_model(model)
    proc_id = getattr(processor, "image_token_id", None)
    if proc_id is not None and proc_id != tokens.image:
        raise ValueError(f"processor and model disagree on the image placeholder: processor.image_token_id="
                         f"{proc_id}, {type(model).__name__}.config.image_token_id={tokens.image}")
    n_tok, vocab = len(getattr(processor, "tokenizer", processor)), _vocab_size(model)
    if n_tok > vocab:
        raise ValueError(f"processor's tokenizer has {n_tok} tokens but {type(model).__name__} has a vocabulary "
                         f"of {vocab}: mismatched processor and model")


def rollout_batch(prompt_batch: Mapping[str, Any], sequences: torch.Tensor, eos_token_id: int | list[int]
                  ) -> tuple[dict[str, Any], torch.Tensor]:
    """The full batch (prompt + sampled response) and its response mask, from ``model.generate`` output.

    prompt_batch: the processor batch given to ``generate`` (input_ids [B, P], attention_mask, vision
    inputs). sequences: [B, P + R] as ``generate`` returns it. A response runs up to and including its
    first ``eos_token_id``; what follows is ``generate``'s padding. Returns (batch, response_mask [B, P + R] bool).
    """
    ids = prompt_batch["input_ids"]
    B, P = ids.shape
    if sequences.shape[0] != B or sequences.shape[1] < P or not torch.equal(sequences[:, :P], ids):
        raise ValueError(f"sequences {tuple(sequences.shape)} must start with prompt_batch['input_ids'] "
                         f"{tuple(ids.shape)} (pass the output of generate on this prompt batch)")
    resp = sequences[:, P:]
    is_eos = torch.isin(resp, torch.tensor(eos_token_id, device=resp.device).reshape(-1))
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first eos
    valid = ~after_eos
    batch = dict(prompt_batch)
    for key, val in prompt_batch.items():
        if isinstance(val, torch.Tensor) and val.shape == ids.shape and key != "input_ids":
            batch[key] = torch.cat([val, valid.to(val.dtype) if key == "attention_mask" else
                                    torch.zeros_like(resp, dtype=val.dtype)], 1)
    batch["input_ids"] = sequences
    response_mask = torch.cat([torch.zeros_like(ids, dtype=torch.bool), valid], 1)
    return batch, response_mask


def strip_images(batch: Mapping[str, Any], response_mask: torch.Tensor, tokens: VisionTokens,
                 pad_token_id: int | None = None, padding_side: str | None = None
                 ) -> tuple[dict[str, Any], torch.Tensor]:
    """The text-only batch: same prompt and response, vision placeholders and vision inputs removed.

    batch: a processor batch with input_ids [B, L] (+ attention_mask, mm_token_type_ids, ... of the same
    shape, and vision inputs). response_mask: [B, L] bool, True on response tokens. Placeholder and
    marker tokens are dropped from the prompt only; rows shrink by their own count and are re-padded
    with ``pad_token_id`` (default: the batch's own pad id, else 0) on ``padding_side`` (default: "left"
    when some row starts with padding, else "right"). Returns (text_batch, text_response_mask).
    """
    ids = batch["input_ids"]
    B, L = ids.shape
    attn = batch.get("attention_mask")
    attn = torch.ones_like(ids) if attn is None else attn
    _check_shape("response_mask", response_mask, (B, L))
    if padding_side is None:
        padding_side = "left" if bool((attn[:, 0] == 0).any()) else "right"
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_token_id is None:
        pads = ids[attn == 0]
        pad_token_id = int(pads[0]) if pads.numel() else 0
    keep = ~(torch.isin(ids, tokens.ids(ids.device)) & ~response_mask.bool())
    n_keep = keep.sum(1)
    T = int(n_keep.max())
    # Destination column of every kept token: packed in order, shifted right by the row's new padding.
    dest = keep.long().cumsum(1) - 1 + ((T - n_keep)[:, None] if padding_side == "left" else 0)
    rows = torch.arange(B, device=ids.device)[:, None].expand(B, L)[keep]
    cols = dest[keep]

    def repack(val: torch.Tensor, fill: int) -> torch.Tensor:
        out = val.new_full((B, T), fill)
        out[rows, cols] = val[keep]
        return out

    text = {}
    for key, val in batch.items():
        if key in VISION_KEYS:
            continue
        if isinstance(val, torch.Tensor) and val.shape == (B, L):
            fill = pad_token_id if key == "input_ids" else -100 if key == "labels" else 0
            text[key] = repack(val, fill)
        elif isinstance(val, torch.Tensor):
            raise ValueError(f"strip_images: don't know how to remove the image from batch[{key!r}] of shape "
                             f"{tuple(val.shape)}; expected [B, L] = {(B, L)} or one of {VISION_KEYS}")
        else:
            text[key] = val
    text.setdefault("attention_mask", repack(attn, 0))
    return text, repack(response_mask.bool(), False)


def response_positions(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose logits predict the response tokens, left-aligned per row.

    response_mask: [B, L] bool. Returns (pos [B, T] int64, mask [B, T] bool) with T the longest response;
    pos[i, t] = (position of the t-th response token of row i) - 1; masked slots hold 0.
    """
    if bool(response_mask[:, 0].any()):
        raise ValueError("response_mask marks position 0: a response token needs a prompt token before it")
    n = response_mask.sum(1)
    T = max(int(n.max()), 1) if n.numel() else 1
    mask = torch.arange(T, device=response_mask.device) < n[:, None]
    # Stable sort puts the response positions first, in order.
    order = torch.sort((~response_mask).to(torch.int8), dim=1, stable=True).indices[:, :T]
    pos = torch.where(mask, order - 1, torch.zeros_like(order))
    return pos, mask


def response_logits(model: torch.nn.Module, batch: Mapping[str, Any], pos: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] at positions ``pos`` [B, T] only: hidden states are sliced before the LM head."""
    logits = model(**batch, logits_to_keep=pos, use_cache=False).logits
    if logits.shape[:2] != pos.shape:
        raise ValueError(f"{type(model).__name__} returned logits {tuple(logits.shape)} for logits_to_keep of "
                         f"shape {tuple(pos.shape)}: it needs a transformers version whose forward accepts a "
                         "[B, T] position tensor as logits_to_keep")
    return logits


def distill_logits(student: torch.nn.Module, teacher: torch.nn.Module, batch: Mapping[str, Any],
                   response_mask: torch.Tensor, text_batch: Mapping[str, Any] | None = None,
                   text_response_mask: torch.Tensor | None = None, expect_images: bool = True,
                   ) -> DistillLogits:
    """Run the four forward passes and return their response logits aligned with one mask.

    batch: processor batch of prompt + response (e.g. from :func:`rollout_batch`), with the images.
    response_mask: [B, L] bool, True on response tokens. text_batch / text_response_mask: the text-only
    batch; built with :func:`strip_images` when not given. expect_images: raise if the batch holds no
    image placeholder (a text-only batch makes Vis, Lang and VDS meaningless).
    Student passes keep the autograd graph (call in train mode as you like); teacher passes run under
    ``torch.no_grad``.
    """
    tokens = VisionTokens.from_model(student)
    t_tokens = VisionTokens.from_model(teacher)
    if t_tokens.ids().tolist() != tokens.ids().tolist():
        raise ValueError(f"teacher and student disagree on the vision placeholder ids: {t_tokens} vs {tokens}")
    vs, vt = _vocab_size(student), _vocab_size(teacher)
    if vs != vt:
        raise ValueError(f"vocabulary mismatch: student has {vs} output logits, teacher has {vt}; the decomposed "
                         "KL needs the same tokenizer and vocabulary on both sides")
    ids = batch["input_ids"]
    _check_batch(batch, response_mask, tokens, vs, expect_images)
    if text_batch is None:
        text_batch, text_response_mask = strip_images(batch, response_mask, tokens)
    elif text_response_mask is None:
        raise ValueError("text_response_mask is required when text_batch is given")
    _check_shape("text_response_mask", text_response_mask, tuple(text_batch["input_ids"].shape))

    pos, mask = response_positions(response_mask)
    pos_u, mask_u = response_positions(text_response_mask)
    tok = torch.where(mask, ids.gather(1, pos + 1), -1)
    tok_u = torch.where(mask_u, text_batch["input_ids"].gather(1, pos_u + 1), -1)
    if tok.shape != tok_u.shape or not torch.equal(tok, tok_u):
        bad = (tok != tok_u).any(1).nonzero().flatten().tolist() if tok.shape == tok_u.shape else "all"
        raise ValueError(f"response tokens differ between the image and text-only batches (rows {bad}); "
                         "both passes must score the same response")

    s = response_logits(student, batch, pos)
    u = response_logits(student, text_batch, pos_u)
    with torch.no_grad():
        a = response_logits(teacher, batch, pos)
        b = response_logits(teacher, text_batch, pos_u)
    return DistillLogits(s, u, a, b, mask)


def _vocab_size(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size


def _check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a [B, L] = {tuple(shape)} bool tensor like input_ids, got {got}")


def _check_batch(batch: Mapping[str, Any], response_mask: torch.Tensor, tokens: VisionTokens, vocab: int,
                 expect_images: bool) -> None:
    """Clear errors for batches the model would reject late or, worse, accept silently."""
    ids = batch["input_ids"]
    _check_shape("response_mask", response_mask, tuple(ids.shape))
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(f"input_ids hold ids outside the model's vocabulary [0, {vocab}): mismatched "
                         "processor and model?")
    attn = batch.get("attention_mask")
    if attn is not None:
        rises = (attn[:, 1:] > attn[:, :-1]).sum(1) + (attn[:, 0] > 0).long()
        if bool((rises > 1).any()):
            raise ValueError(f"attention_mask has padding inside rows {(rises > 1).nonzero().flatten().tolist()}: "
                             "pad on the left or the right only (left-pad prompts for generate)")
    if not bool(response_mask.any()):
        raise ValueError("response_mask marks no token: nothing to distil")
    vision = torch.isin(ids, tokens.ids(ids.device))
    if bool((vision & response_mask.bool()).any()):
        raise ValueError("a response contains vision placeholder tokens; suppress them when sampling "
                         "(generate(..., suppress_tokens=VisionTokens.from_model(model).ids().tolist()))")
    n_image = int((ids == tokens.image).sum())
    if n_image == 0 and (expect_images or batch.get("pixel_values") is not None):
        raise ValueError(f"the batch holds no image placeholder token (id {tokens.image}) "
                         + ("but has pixel_values: mismatched processor and model?" if batch.get("pixel_values")
                            is not None else "; pass expect_images=False for text-only batches"))
    grid = batch.get("image_grid_thw")
    if grid is not None and tokens.merge is not None:
        expected = int((grid.prod(-1) // tokens.merge ** 2).sum())
        if expected != n_image:
            raise ValueError(f"the batch has {n_image} image placeholder tokens but image_grid_thw implies "
                             f"{expected} (merge size {tokens.merge}): mismatched processor and model?")
    pixels = batch.get("pixel_values")
    if n_image and pixels is None:
        raise ValueError("the batch has image placeholder tokens but no pixel_values")
    if pixels is not None and pixels.ndim == 2 and tokens.patch_dim is not None and pixels.shape[1] != tokens.patch_dim:
        raise ValueError(f"pixel_values has {pixels.shape[1]} values per patch but the model's vision encoder "
                         f"takes {tokens.patch_dim}: mismatched processor and model (patch size?)")
