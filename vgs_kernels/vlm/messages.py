"""The text-only batch from chat messages: exact by construction, for every processor.

The text-only prompt is what the processor's own chat template renders for the same conversation with
the image entries left out; the rollout's response tokens are appended unchanged. No family knowledge is
involved, so this is the reference the id-only path (:func:`vgs_kernels.vlm.strip_images`) is tested
against.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

# Content entries that carry a visual input (HF / TRL message format).
VISUAL_TYPES = ("image", "video", "image_url", "video_url")
PADDING_SIDES = ("left", "right", "split")


def without_images(conversation: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``conversation`` (a list of ``{"role", "content"}`` messages) with its image/video entries removed.

    List contents lose their entries whose ``type`` is one of :data:`VISUAL_TYPES`; string contents become
    ``[{"type": "text", "text": ...}]``, as TRL's ``prepare_multimodal_messages`` turns them before rendering
    VLM prompts (VLM templates such as LLaVA's iterate over content entries). The input is not modified.
    """
    out = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if isinstance(content, list):
            message = {**message, "content": [c for c in content if c.get("type") not in VISUAL_TYPES]}
        out.append(message)
    return out


def text_only_batch(processor: Any, prompts: Sequence[Sequence[dict[str, Any]]],
                    completion_ids: torch.Tensor | Sequence[torch.Tensor | Sequence[int]],
                    completion_mask: torch.Tensor | None = None, *, padding_side: str = "left",
                    pad_token_id: int | None = None, **template_kwargs: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The text-only batch of a rollout: each prompt rendered without its images, then the same response.

    processor: the transformers processor (or tokenizer) whose chat template rendered the image prompts.
    prompts: B conversations in the HF/TRL message format (``[{"role": "user", "content": [{"type":
    "image"}, {"type": "text", "text": ...}]}, ...]``); image/video entries are removed here
    (:func:`without_images`). Each is rendered with ``add_generation_prompt=True`` and tokenized by
    ``processor.apply_chat_template`` (as TRL renders its prompts); ``template_kwargs`` (``chat_template``,
    ``tools``, ...) are passed through.
    completion_ids: the response tokens, either a list of B 1-D int tensors / lists, or a [B, C] int
    tensor with ``completion_mask`` [B, C] (bool or 0/1, True on response tokens; default: all True).
    padding_side: "left" (rows end at the last column, like ``generate`` output), "right", or "split":
    prompts left-padded to the longest prompt P, then the [B, C] completion block exactly as given, so
    that ``input_ids[:, P:] == completion_ids`` and ``response_mask[:, P:] == completion_mask`` (TRL's
    ``cat([prompt_ids, completion_ids], 1)`` layout; ``logits_to_keep=C`` works as for the image batch).
    pad_token_id: default ``processor.tokenizer.pad_token_id``, else 0.

    Returns (batch, response_mask): batch has ``input_ids`` and ``attention_mask`` [B, L] int64 (plus any
    per-token key the processor returns for a text prompt, e.g. ``mm_token_type_ids``, zero on the
    response and padding), response_mask [B, L] bool. Pass them to
    :func:`vgs_kernels.vlm.distill_logits` as ``text_batch`` / ``text_response_mask``; it checks that
    both batches score the same response tokens.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if isinstance(prompts, (str, dict)) or (len(prompts) and isinstance(prompts[0], dict)):
        raise ValueError("prompts must be a list of conversations (a list of lists of messages), one per row")
    responses, block = _responses(completion_ids, completion_mask, len(prompts))
    if padding_side == "split" and block is None:
        block = _right_pad(responses)
    rendered = processor.apply_chat_template([without_images(p) for p in prompts], add_generation_prompt=True,
                                             tokenize=True, return_dict=True, **template_kwargs)
    prompt_ids = [list(map(int, ids)) for ids in rendered["input_ids"]]
    # Per-token side inputs of a text prompt (mm_token_type_ids, token_type_ids): zero on the response.
    extra = [k for k, v in rendered.items() if k not in ("input_ids", "attention_mask") and _per_token(v, prompt_ids)]
    if pad_token_id is None:
        pad_token_id = getattr(getattr(processor, "tokenizer", processor), "pad_token_id", None)
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    device = responses[0].device if responses else None

    def row(vals: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(map(int, vals)), dtype=torch.long, device=device)

    cols: dict[str, list[torch.Tensor]] = {"input_ids": [], "attention_mask": [], "response_mask": []}
    cols.update({k: [] for k in extra})
    for i, ids in enumerate(prompt_ids):
        n = len(ids)
        if padding_side == "split":
            cols["input_ids"].append(row(ids))
            cols["attention_mask"].append(row([1] * n))
            cols["response_mask"].append(row([0] * n))
        else:
            r = responses[i]
            cols["input_ids"].append(torch.cat([row(ids), r]))
            cols["attention_mask"].append(row([1] * (n + len(r))))
            cols["response_mask"].append(row([0] * n + [1] * len(r)))
        for k in extra:
            cols[k].append(row(list(rendered[k][i]) + ([] if padding_side == "split" else [0] * len(responses[i]))))
    side = "left" if padding_side == "split" else padding_side
    fills = {"input_ids": pad_token_id}
    out = {k: _pad(v, fills.get(k, 0), side) for k, v in cols.items()}
    if padding_side == "split":
        c_ids, c_mask = block
        out["input_ids"] = torch.cat([out["input_ids"], c_ids.long()], 1)
        out["attention_mask"] = torch.cat([out["attention_mask"], c_mask.long()], 1)
        out["response_mask"] = torch.cat([out["response_mask"], c_mask.long()], 1)
        for k in extra:
            out[k] = torch.cat([out[k], torch.zeros_like(c_ids, dtype=torch.long)], 1)
    response_mask = out.pop("response_mask").bool()
    return out, response_mask


def _responses(completion_ids, completion_mask, B: int):
    """Per-row 1-D response tensors, and the padded (ids, mask) block when one was given."""
    if isinstance(completion_ids, torch.Tensor):
        if completion_ids.ndim != 2 or completion_ids.shape[0] != B:
            raise ValueError(f"completion_ids must be a [B, C] tensor with B = {B} rows (one per prompt) or a list "
                             f"of B 1-D tensors, got shape {tuple(completion_ids.shape)}")
        if completion_mask is None:
            completion_mask = torch.ones_like(completion_ids, dtype=torch.bool)
        if not isinstance(completion_mask, torch.Tensor) or completion_mask.shape != completion_ids.shape:
            got = tuple(completion_mask.shape) if isinstance(completion_mask, torch.Tensor) else type(completion_mask)
            raise ValueError(f"completion_mask must be a tensor shaped like completion_ids "
                             f"{tuple(completion_ids.shape)}, got {got}")
        mask = completion_mask.bool()
        return [completion_ids[i][mask[i]].long() for i in range(B)], (completion_ids, mask)
    if completion_mask is not None:
        raise ValueError("completion_mask goes with a padded [B, C] completion_ids tensor, not with a list of rows")
    if len(completion_ids) != B:
        raise ValueError(f"completion_ids has {len(completion_ids)} rows but there are {B} prompts")
    rows = [torch.as_tensor(r).long().reshape(-1) if not isinstance(r, torch.Tensor) else r.long() for r in completion_ids]
    if any(r.ndim != 1 for r in rows):
        raise ValueError("each row of completion_ids must be a 1-D sequence of token ids")
    return rows, None


def _right_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = _pad(rows, 0, "right")
    return ids, _pad([torch.ones_like(r, dtype=torch.bool) for r in rows], False, "right")


def _pad(rows: list[torch.Tensor], fill, side: str) -> torch.Tensor:
    L = max(len(r) for r in rows)
    out = rows[0].new_full((len(rows), L), fill)
    for i, r in enumerate(rows):
        if side == "left":
            out[i, L - len(r):] = r
        else:
            out[i, :len(r)] = r
    return out


def _per_token(val: Any, prompt_ids: list[list[int]]) -> bool:
    try:
        return len(val) == len(prompt_ids) and all(len(v) == len(p) for v, p in zip(val, prompt_ids))
    except TypeError:
        return False
