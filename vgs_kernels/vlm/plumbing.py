"""The data path from a transformers VLM batch to the four response-logit tensors of the decomposed loss.

- :func:`rollout_batch`: the full batch (prompt + sampled response) and its response mask from ``generate``;
- :func:`strip_images`: the text-only batch from token ids only, cutting each image span as the model's
  family spec says (:mod:`vgs_kernels.vlm.specs`); :func:`vgs_kernels.vlm.text_only_batch` builds it from the
  chat messages instead, exact by construction;
- :func:`distill_logits`: the four forward passes, projecting only the response positions through the LM
  head (``logits_to_keep`` with a [B, T] position tensor), after checking that the image and text-only
  batches score the same response tokens.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch

from vgs_kernels.vlm.ids import check_response_tokens, check_shape, strip_images
from vgs_kernels.vlm.specs import FAMILY_SPECS, LAYOUT_KEYS, family_spec, hf_model, image_id
from vgs_kernels.vlm.tokens import VisionTokens, probe_id_path

# Every family's vision-input keys (for messages naming what strip_images drops).
VISION_KEYS = tuple(dict.fromkeys(k for spec in FAMILY_SPECS.values() for k in spec.vision_keys)) + LAYOUT_KEYS


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


def check_processor(processor: Any, model: torch.nn.Module, vision_tokens: VisionTokens | None = None, *,
                    id_path: bool = True, **template_kwargs: Any) -> None:
    """Raise ValueError when ``processor`` and ``model`` disagree, or when the id-only path would be inexact.

    Compares the processor attribute the family spec pairs with a config field (``processor.image_token_id``
    with ``config.image_token_id`` for most families; Gemma3's processor names its ``<start_of_image>`` id
    ``image_token_id``: ``config.boi_token_index``), resolves the spec's token strings with the processor's
    tokenizer, and checks the tokenizer against the model's vocabulary. With ``id_path`` it also renders a
    probe conversation (two images, then text) with the processor's chat template (``template_kwargs``
    passed on, e.g. ``add_vision_id=True``) and checks that :func:`strip_images` gives, token for token,
    what the template renders without the images. Pass ``id_path=False`` when the text-only batch comes from
    the messages (:func:`vgs_kernels.vlm.text_only_batch`): that path needs no family spec.
    """
    spec = family_spec(model)
    if vision_tokens is None and spec is None and not id_path and image_id(hf_model(model).config) is not None:
        vision_tokens = VisionTokens(image=image_id(hf_model(model).config))
    tokens = vision_tokens or VisionTokens.from_model(model, processor)
    proc_id = getattr(processor, "image_token_id", None)
    if spec is not None and vision_tokens is None:  # the pairing the family's processor uses
        for attr, cfg_field in (spec.processor_ids or {"image_token_id": spec.placeholder}).items():
            proc_id, model_id = getattr(processor, attr, None), getattr(hf_model(model).config, cfg_field, None)
            if proc_id is not None and proc_id != model_id:
                raise ValueError(f"processor and model disagree on the image placeholder: processor.{attr}="
                                 f"{proc_id}, {type(model).__name__}.config.{cfg_field}={model_id}")
    elif proc_id is not None and proc_id not in tokens.ids().tolist():
        raise ValueError(f"processor and model disagree on the image placeholder: processor.image_token_id={proc_id} "
                         f"is none of the model's vision ids {tokens.ids().tolist()}")
    n_tok, vocab = len(getattr(processor, "tokenizer", processor)), vocab_size(model)
    if n_tok > vocab:
        raise ValueError(f"processor's tokenizer has {n_tok} tokens but {type(model).__name__} has a vocabulary "
                         f"of {vocab}: mismatched processor and model")
    if id_path:
        probe_id_path(processor, tokens, template_kwargs)


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
                   text_response_mask: torch.Tensor | None = None, expect_images: bool = True, *,
                   processor: Any = None, vision_tokens: VisionTokens | None = None) -> DistillLogits:
    """Run the four forward passes and return their response logits aligned with one mask.

    batch: processor batch of prompt + response (e.g. from :func:`rollout_batch`), with the images.
    response_mask: [B, L] bool, True on response tokens. text_batch / text_response_mask: the text-only
    batch, e.g. from :func:`vgs_kernels.vlm.text_only_batch` (exact for every family); built with
    :func:`strip_images` when not given. expect_images: raise if the batch holds no image placeholder (a
    text-only batch makes Vis, Lang and VDS meaningless). processor / vision_tokens: how the model's vision
    tokens are found (``VisionTokens.from_model(student, processor)`` by default; families whose spec names
    token strings need the processor; a model without a spec needs ``vision_tokens`` unless ``text_batch``
    is given).
    Student passes keep the autograd graph (call in train mode as you like); teacher passes run under
    ``torch.no_grad``.
    """
    tokens = vision_tokens or _vision_tokens(student, processor, text_batch is not None)
    t_tokens = vision_tokens or _vision_tokens(teacher, processor, text_batch is not None)
    if t_tokens.ids().tolist() != tokens.ids().tolist():
        raise ValueError(f"teacher and student disagree on the vision placeholder ids: {t_tokens} vs {tokens}")
    vs, vt = vocab_size(student), vocab_size(teacher)
    if vs != vt:
        raise ValueError(f"vocabulary mismatch: student has {vs} output logits, teacher has {vt}; the decomposed "
                         "KL needs the same tokenizer and vocabulary on both sides")
    ids = batch["input_ids"]
    _check_batch(batch, response_mask, tokens, vs, expect_images)
    if text_batch is None:
        text_batch, text_response_mask = strip_images(batch, response_mask, tokens)
    elif text_response_mask is None:
        raise ValueError("text_response_mask is required when text_batch is given")
    check_shape("text_response_mask", text_response_mask, tuple(text_batch["input_ids"].shape))

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


def _vision_tokens(model: torch.nn.Module, processor: Any, have_text_batch: bool) -> VisionTokens:
    """The model's vision tokens; with a caller-built text batch, the placeholder alone serves the checks."""
    try:
        return VisionTokens.from_model(model, processor)
    except ValueError:
        if not have_text_batch or image_id(hf_model(model).config) is None:
            raise
        return VisionTokens(image=image_id(hf_model(model).config), vision_keys=())


def vocab_size(model: torch.nn.Module) -> int:
    model = hf_model(model)
    head = model.get_output_embeddings()
    if head is None:
        return model.config.get_text_config().vocab_size
    return getattr(head.weight, "ds_shape", head.weight.shape)[0]  # ZeRO-3: the partitioned weight is empty


def _check_batch(batch: Mapping[str, Any], response_mask: torch.Tensor, tokens: VisionTokens, vocab: int,
                 expect_images: bool) -> None:
    """Clear errors for batches the model would reject late or, worse, accept silently."""
    ids = batch["input_ids"]
    check_shape("response_mask", response_mask, tuple(ids.shape))
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
    check_response_tokens(ids, response_mask, tokens)
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


