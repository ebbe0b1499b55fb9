"""The id-only text-only path: from a generation's token ids to the text-only batch.

- :func:`rollout_batch`: the full batch (prompt + sampled response) and its response mask from ``generate``;
- :func:`strip_images`: the text-only batch from token ids only, cutting each image span as the model's
  family spec says (vgs_kernels/vlm/specs.py, resolved into ids by vgs_kernels/vlm/tokens.py);
  :func:`vgs_kernels.vlm.text_only_batch` builds it from the chat messages instead, exact by construction.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from vgs_kernels.vlm.specs import LAYOUT_KEYS

if TYPE_CHECKING:  # annotations only: tokens.py imports this module for its template probe
    from vgs_kernels.vlm.tokens import VisionTokens


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
        check_response_tokens(sequences, response_mask, vision_tokens)
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
    check_shape("response_mask", response_mask, (B, L))
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


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a [B, L] = {tuple(shape)} bool tensor like input_ids, got {got}")


def check_response_tokens(ids: torch.Tensor, response_mask: torch.Tensor, tokens: VisionTokens) -> None:
    bad = torch.isin(ids, tokens.ids(ids.device)) & response_mask.bool()
    if bool(bad.any()):
        raise ValueError(f"the responses of rows {bad.any(1).nonzero().flatten().tolist()} contain vision tokens "
                         f"{tokens.ids().tolist()} (placeholders or markers), which the text-only pass cannot score; "
                         "suppress them when sampling: generate(..., suppress_tokens=VisionTokens.from_model(model, "
                         "processor).ids().tolist())")
