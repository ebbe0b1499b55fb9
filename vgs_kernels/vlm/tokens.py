"""The vision token ids of a model: its family spec (vgs_kernels/vlm/specs.py) resolved against its config
and its processor's tokenizer, with the probe of the id-only path against the processor's chat template."""
from __future__ import annotations

import dataclasses
import fnmatch
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from vgs_kernels.vlm.ids import rollout_batch, strip_images
from vgs_kernels.vlm.messages import text_only_batch
from vgs_kernels.vlm.specs import FAMILY_SPECS, hf_model, image_id


@dataclass(frozen=True)
class VisionTokens:
    """A model's vision token ids, as the id-only text-only path and the batch checks use them.

    image: the placeholder id repeated once per visual feature. markers: other ids found only in image/video
    spans (dropped with them). inner: text-token ids allowed between pieces of one span (dropped there).
    before / after: the token ids every span is preceded / followed by (dropped with it; required). vision_keys: batch keys carrying the visual
    inputs. merge: spatial merge size mapping an ``image_grid_thw`` row to its token count
    (prod(thw) / merge**2), None without grids. patch_dim: values per flattened patch row of pixel_values
    (Qwen-style encoders), None otherwise.
    """

    image: int
    markers: tuple[int, ...] = ()
    inner: tuple[int, ...] = ()
    before: tuple[int, ...] = ()
    after: tuple[int, ...] = ()
    vision_keys: tuple[str, ...] = ("pixel_values",)
    merge: int | None = None
    patch_dim: int | None = None
    # The tokenizer the ids came from: strip_images checks with it that the text joined across each cut
    # tokenizes as the kept tokens (a BPE tokenizer may merge it), and raises where it does not.
    tokenizer: Any = field(default=None, compare=False, repr=False)
    # Why the id-only path cannot reproduce the processor's chat template (its probe failed), else None:
    # strip_images raises it instead of returning a batch the template would not render.
    template_error: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_model(cls, model: torch.nn.Module, processor: Any = None) -> "VisionTokens":
        """Resolve the spec of ``model.config.model_type`` against the config and ``processor``'s tokenizer.

        processor is needed by families whose spec names token strings (LLaVA's ``\\n``, Idefics3's tile
        tokens, InternVL's ``<img>``...); Qwen's and LLaVA-OneVision's specs are all config fields.
        """
        cfg = hf_model(model).config
        name = type(hf_model(model)).__name__
        spec = FAMILY_SPECS.get(getattr(cfg, "model_type", None))
        if spec is None:
            image = image_id(cfg)
            if image is None:
                raise ValueError(f"{name}: config has no image_token_id / image_token_index; is this a "
                                 "vision-language model?")
            raise ValueError(f"model {name} (model_type {cfg.model_type!r}) has image token id {image} but no "
                             "marker spec; pass vision_tokens=VisionTokens(...) (or "
                             "vgs_kernels.vlm.register_family(model_type, FamilySpec(...))) or build the "
                             "text-only batch from messages (vgs_kernels.vlm.text_only_batch)")
        tok = getattr(processor, "tokenizer", processor)
        if spec.strings() and tok is None:
            raise ValueError(f"{name}: its marker spec names tokens {spec.strings()} that only the tokenizer can "
                             "resolve; pass processor=<the model's processor> (or vision_tokens=...)")
        markers = [_field(cfg, f, name) for f in spec.marker_fields if getattr(cfg, f, None) is not None]
        markers += [i for pattern in spec.marker_tokens for i in _resolve(tok, pattern, name)]
        vision_cfg = getattr(cfg, "vision_config", None)
        merge = getattr(vision_cfg, "spatial_merge_size", None)
        dims = [getattr(vision_cfg, k, None) for k in ("in_channels", "temporal_patch_size", "patch_size")]
        patch_dim = dims[0] * dims[1] * dims[2] ** 2 if merge and all(isinstance(d, int) for d in dims) else None
        context = {k: tuple(_text_ids(tok, getattr(spec, k), name)) if getattr(spec, k) else ()
                   for k in ("before", "after")}
        inner = dict.fromkeys(i for t in spec.inner for i in _text_ids(tok, t, name))
        tokens = cls(image=_field(cfg, spec.placeholder, name), markers=tuple(markers), inner=tuple(inner),
                     vision_keys=spec.vision_keys, merge=merge, patch_dim=patch_dim, tokenizer=tok, **context)
        return dataclasses.replace(tokens, template_error=_template_error(processor, tokens))

    def ids(self, device: torch.device | None = None) -> torch.Tensor:
        """Every id that only occurs in vision spans (placeholder + markers), as a 1-D int64 tensor.

        These are the ids a response must never contain: pass ``ids().tolist()`` to
        ``generate(suppress_tokens=...)``.
        """
        return torch.tensor((self.image,) + self.markers, dtype=torch.long, device=device)


_PROBED: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _template_error(processor: Any, tokens: VisionTokens) -> str | None:
    """check_processor's probe of the id-only path against ``processor``'s chat template, once per template."""
    if not (getattr(processor, "chat_template", None) and hasattr(processor, "image_processor")):
        return None
    key = (processor.chat_template, tokens, len(processor.tokenizer))
    seen = _PROBED.setdefault(processor, {})
    if key not in seen:
        try:
            probe_id_path(processor, tokens, {})
            seen[key] = None
        except ValueError as err:
            seen[key] = str(err)
    return seen[key]


def probe_id_path(processor: Any, tokens: VisionTokens, template_kwargs: dict) -> None:
    """strip_images on a rendered probe conversation must equal the template rendered without its images."""
    from PIL import Image  # the vlm extra's dependency, needed by this probe only

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


def _field(cfg, name: str, model: str) -> int:
    val = getattr(cfg, name, None)
    if not isinstance(val, int):
        raise ValueError(f"{model}: its marker spec reads config.{name}, which is {val!r}; fix the config or pass "
                         "vision_tokens=...")
    return val


def _resolve(tok, pattern: str, model: str) -> list[int]:
    if not any(c in pattern for c in "*?["):
        return [_single(tok, pattern, model)]
    # Marker tokens are added tokens: search those first (the full vocabulary of a real tokenizer is large).
    for vocab in (tok.get_added_vocab(), tok.get_vocab()):
        ids = sorted(i for t, i in vocab.items() if fnmatch.fnmatchcase(t, pattern))
        if ids:
            return ids
    raise ValueError(f"{model}: the processor's tokenizer has no token matching {pattern!r} of the model's marker "
                     "spec: mismatched processor and model?")


def _text_ids(tok, text: str, model: str) -> list[int]:
    """The ids of a text piece inside a prompt (a newline: one token, or several where a tokenizer has none).

    Encoded after an added token, as it sits in a prompt: a SentencePiece-style tokenizer prepends "▁" only
    to the start of a text.
    """
    anchor = next(iter(tok.added_tokens_decoder.values()), None)
    if anchor is None:
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(anchor.content + text, add_special_tokens=False)[1:]
    if not ids or tok.unk_token_id in ids:
        raise ValueError(f"{model}: the processor's tokenizer cannot encode {text!r} of the model's marker spec "
                         f"(got {ids}): mismatched processor and model?")
    return ids


def _single(tok, token: str, model: str) -> int:
    known = tok.convert_tokens_to_ids(token)
    ids = [known] if known is not None and known != tok.unk_token_id else tok.encode(token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tok.unk_token_id:
        raise ValueError(f"{model}: the processor's tokenizer encodes {token!r} of the model's marker spec as "
                         f"{ids}, not one known token: mismatched processor and model, or a tokenizer whose "
                         "tokens cross the span boundary (build the text-only batch from messages instead)")
    return ids[0]
