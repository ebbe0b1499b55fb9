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

import dataclasses
from typing import Any, Mapping, NamedTuple

import torch

from vgs_kernels.vlm.specs import FAMILY_SPECS, LAYOUT_KEYS, VisionTokens, _image_id, family_spec, hf_model

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
    if vision_tokens is None and spec is None and not id_path and _image_id(hf_model(model).config) is not None:
        vision_tokens = VisionTokens(image=_image_id(hf_model(model).config))
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
    n_tok, vocab = len(getattr(processor, "tokenizer", processor)), _vocab_size(model)
    if n_tok > vocab:
        raise ValueError(f"processor's tokenizer has {n_tok} tokens but {type(model).__name__} has a vocabulary "
                         f"of {vocab}: mismatched processor and model")
    if id_path:
        _probe_id_path(processor, tokens, template_kwargs)


def _probe_id_path(processor: Any, tokens: VisionTokens, template_kwargs: dict) -> None:
    """strip_images on a rendered probe conversation must equal the template rendered without its images."""
    from PIL import Image

    from vgs_kernels.vlm.messages import text_only_batch

    # Images first, then the text: the layout TRL gives VLM prompts. Text on both sides of an image can merge
    # across the cut (Qwen's template joins contents with no separator): only the messages path is exact there.
    conv = [[{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                          {"type": "text", "text": "Describe both images ."}]}]]
    image = Image.new("RGB", (64, 48), (120, 60, 30))
    text = processor.apply_chat_template(conv, add_generation_prompt=True, **template_kwargs)
    prompt = processor(text=text, images=[[image, image]], return_tensors="pt")
    tok = processor.tokenizer
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    full, rmask = rollout_batch(prompt, torch.cat([prompt["input_ids"], torch.tensor([[eos]])], 1), eos)
    got = strip_images(full, rmask, dataclasses.replace(tokens, template_error=None))[0]["input_ids"][0].tolist()
    want = text_only_batch(processor, conv, [torch.tensor([eos])], **template_kwargs)[0]["input_ids"][0].tolist()
    if got != want:
        raise ValueError(f"the id-only text-only path (strip_images) does not reproduce {type(processor).__name__}'s "
                         f"chat template without the images on a probe conversation: {tok.convert_ids_to_tokens(got)}"
                         f" vs {tok.convert_ids_to_tokens(want)}; build the text-only batch from the messages "
                         "(vgs_kernels.vlm.text_only_batch, then distill_logits(..., text_batch=...)) and pass "
                         "id_path=False here")


def rollout_batch(prompt_batch: Mapping[str, Any], sequences: torch.Tensor, eos_token_id: int | list[int],
                  vision_tokens: VisionTokens | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """The full batch (prompt + sampled response) and its response mask, from ``model.generate`` output.

    prompt_batch: the processor batch given to ``generate`` (input_ids [B, P], attention_mask, vision
    inputs). sequences: [B, P + R] as ``generate`` returns it. A response runs up to and including its
    first ``eos_token_id``; what follows is ``generate``'s padding. Returns (batch, response_mask [B, P + R] bool).
    Sample with ``suppress_tokens=vision_tokens.ids().tolist()``: a response holding a vision placeholder
    or marker cannot be scored text-only, so it is an error here (when ``vision_tokens`` is given) and in
    :func:`distill_logits`, never silently masked.
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
    if vision_tokens is not None:
        _check_response_tokens(sequences, response_mask, vision_tokens)
    return batch, response_mask


def strip_images(batch: Mapping[str, Any], response_mask: torch.Tensor, tokens: VisionTokens,
                 pad_token_id: int | None = None, padding_side: str | None = None
                 ) -> tuple[dict[str, Any], torch.Tensor]:
    """The text-only batch from token ids: same prompt and response, image spans and vision inputs removed.

    batch: a processor batch with input_ids [B, L] (+ attention_mask, mm_token_type_ids, token_type_ids, ...
    of the same shape, and vision inputs). response_mask: [B, L] bool, True on response tokens.
    tokens: the model's :class:`VisionTokens` (``VisionTokens.from_model(model, processor)``). In the
    prompt, every image span (``tokens.before``, vision ids with ``tokens.inner`` ids between them,
    ``tokens.after``) is dropped; the response is kept as it is. Rows shrink by their own count, lose
    their padding (also ``generate``'s padding after an early end of sequence) and are re-padded with ``pad_token_id`` (default: the batch's own pad id, else 0) on ``padding_side``
    (default: "left" when some row starts with padding, else "right"). Keys in ``tokens.vision_keys`` and
    layout keys (position_ids, rope_deltas) are dropped. Returns (text_batch, text_response_mask).

    For the published chat templates this is token for token what the template renders without the image
    (tested per family); a span missing its ``before`` / ``after`` text raises instead of guessing.
    """
    ids = batch["input_ids"]
    B, L = ids.shape
    if tokens.template_error is not None and bool(torch.isin(ids, tokens.ids(ids.device)).any()):
        raise ValueError(tokens.template_error)
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
    prompt = attn.bool() & ~response_mask.bool()
    keep = torch.tensor([_keep_row(row, p, tokens, i) for i, (row, p) in
                         enumerate(zip(ids.tolist(), prompt.tolist()))], dtype=torch.bool, device=ids.device)
    keep = keep.reshape(B, L) & attn.bool()  # padding goes too: rows are re-padded on one side
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
        if key in tokens.vision_keys or key in LAYOUT_KEYS:
            continue
        if isinstance(val, torch.Tensor) and val.shape == (B, L):
            fill = pad_token_id if key == "input_ids" else -100 if key == "labels" else 0
            text[key] = repack(val, fill)
        elif isinstance(val, torch.Tensor):
            raise ValueError(f"strip_images: don't know how to remove the image from batch[{key!r}] of shape "
                             f"{tuple(val.shape)}; expected [B, L] = {(B, L)} or one of the model's vision keys "
                             f"{tokens.vision_keys} (add it to the family spec's vision_keys)")
        else:
            text[key] = val
    text.setdefault("attention_mask", repack(attn, 0))
    return text, repack(response_mask.bool(), False)


def _keep_row(ids: list[int], prompt: list[bool], tokens: VisionTokens, row: int) -> list[bool]:
    """Which tokens of one row the text-only batch keeps: everything but the prompt's image spans."""
    vision, inner = set(tokens.ids().tolist()), set(tokens.inner)
    keep = [True] * len(ids)
    i = 0
    while i < len(ids):
        if not (prompt[i] and ids[i] in vision):
            i += 1
            continue
        end, k = i + 1, i + 1  # the span runs to its last vision id; inner ids may sit between them
        while k < len(ids) and prompt[k] and (ids[k] in vision or ids[k] in inner):
            end = k + 1 if ids[k] in vision else end
            k += 1
        start, stop = i - len(tokens.before), end + len(tokens.after)
        if start < 0 or ids[start:i] != list(tokens.before) or not all(prompt[start:i]) or not all(keep[start:i]) \
                or ids[end:stop] != list(tokens.after) or not all(prompt[end:stop]):
            raise ValueError(f"strip_images: the image span at row {row}, positions {i}..{end - 1}, is not "
                             f"preceded by {list(tokens.before)} and followed by {list(tokens.after)} as the "
                             "model's family spec says (its tokenizer merges them with the neighbouring text, or "
                             "the chat template differs from the published one): build the text-only batch "
                             "from messages with vgs_kernels.vlm.text_only_batch, or pass vision_tokens=...")
        keep[start:stop] = [False] * (stop - start)
        i = stop
    if tokens.tokenizer is not None:
        _check_joins(ids, keep, prompt, tokens.tokenizer, row)
    return keep


def _check_joins(ids: list[int], keep: list[bool], prompt: list[bool], tok: Any, row: int) -> None:
    """Raise where the prompt text joined across a cut would tokenize otherwise than the kept tokens.

    Added (special) tokens split a text before the tokenizer's model sees it, so only a run of plain tokens
    that a cut now joins can change: a BPE tokenizer merges ``"USER: " + "what"`` into ``"▁what"``, not the
    ``"▁", "what"`` left by the cut. Each such run is decoded with the added token before it and re-encoded.
    """
    added = set(tok.added_tokens_decoder)
    run, anchor, cut = [], [], False  # plain kept prompt tokens since the last added one; a cut inside them

    def check() -> None:
        if cut and run and tok.encode(tok.decode(anchor + run, skip_special_tokens=False,
                                                 clean_up_tokenization_spaces=False),
                                      add_special_tokens=False) != anchor + run:
            raise ValueError(f"strip_images: row {row}: the tokenizer merges the text on both sides of an image "
                             f"span ({tok.convert_ids_to_tokens(run)} re-tokenizes otherwise once the span is cut), "
                             "so the id-only text-only batch would not be what the chat template renders without "
                             "the image: build it from messages with vgs_kernels.vlm.text_only_batch (then "
                             "distill_logits(..., text_batch=...))")

    for i, t in enumerate(ids):
        if not prompt[i]:
            continue
        if not keep[i]:
            cut = bool(run)  # a cut right after an added token joins nothing to its left
            continue
        if t in added:
            check()
            run, anchor, cut = [], [t], False
        else:
            run.append(t)
    check()


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


def _vision_tokens(model: torch.nn.Module, processor: Any, have_text_batch: bool) -> VisionTokens:
    """The model's vision tokens; with a caller-built text batch, the placeholder alone serves the checks."""
    try:
        return VisionTokens.from_model(model, processor)
    except ValueError:
        if not have_text_batch or _image_id(hf_model(model).config) is None:
            raise
        return VisionTokens(image=_image_id(hf_model(model).config), vision_keys=())


def _vocab_size(model: torch.nn.Module) -> int:
    model = hf_model(model)
    head = model.get_output_embeddings()
    if head is None:
        return model.config.get_text_config().vocab_size
    return getattr(head.weight, "ds_shape", head.weight.shape)[0]  # ZeRO-3: the partitioned weight is empty


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
    _check_response_tokens(ids, response_mask, tokens)
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


def _check_response_tokens(ids: torch.Tensor, response_mask: torch.Tensor, tokens: VisionTokens) -> None:
    bad = torch.isin(ids, tokens.ids(ids.device)) & response_mask.bool()
    if bool(bad.any()):
        raise ValueError(f"the responses of rows {bad.any(1).nonzero().flatten().tolist()} contain vision tokens "
                         f"{tokens.ids().tolist()} (placeholders or markers), which the text-only pass cannot score; "
                         "suppress them when sampling: generate(..., suppress_tokens=VisionTokens.from_model(model, "
                         "processor).ids().tolist())")
