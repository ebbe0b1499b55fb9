"""Per-family vision marker specs: where an image sits in a prompt's token ids, as data.

A :class:`FamilySpec` names config fields and token strings; :meth:`VisionTokens.from_model` resolves them
against a model's config and a processor's tokenizer into ids. The id-only text-only path
(:func:`vgs_kernels.vlm.strip_images`) reads nothing else, so supporting a family means adding a row to
:data:`FAMILY_SPECS` (or calling :func:`register_family`), never a branch in the code.

An image span, as the chat template and the processor lay it out, is
``before + (ids of the span: placeholders, markers, tile tokens, with inner tokens between them) + after``:

====================  ==========================================================================  ===========
family                span (processor expansion of the template's image entry)                    before/after
====================  ==========================================================================  ===========
Qwen2/2.5/3-VL, 3.5   ``<|vision_start|> <|image_pad|>*N <|vision_end|>``                          -
GLM-4.1V / 4.5V       ``<|begin_of_image|> <|image|>*N <|end_of_image|>``                          -
LLaVA, VipLLaVA       ``<image>*N``  (template: ``<image>\\n``)                                    after ``\\n``
LLaVA-NeXT            ``<image>*N``  (anyres tiles and image_newline rows, all counted in N)       after ``\\n``
LLaVA-OneVision       ``<image>*N``  (image_newline is an embedding, counted in N)                 -
Idefics2              ``<fake_token_around_image> <image>*N <fake_token_around_image>``            -
Idefics3, SmolVLM     ``<fake_token_around_image> <row_i_col_j> <image>*N ... \\n ...``            inner ``\\n``
                      ``\\n\\n <fake_token_around_image> <global-img> <image>*N <fake_token_...>``    (and ``\\n\\n``)
Gemma3                ``\\n\\n <start_of_image> <image_soft_token>*N <end_of_image> \\n\\n``       ``\\n\\n`` each
InternVL              ``<img> <IMG_CONTEXT>*N </img>``  (template: ``<IMG_CONTEXT>\\n``)           after ``\\n``
====================  ==========================================================================  ===========
"""
from __future__ import annotations

import dataclasses
import fnmatch
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

# Inputs that are computed from the image layout and are dropped with it, whatever the family.
LAYOUT_KEYS = ("position_ids", "rope_deltas", "cache_position")


@dataclass(frozen=True)
class FamilySpec:
    """One row of the family table: config fields and token strings, resolved per model by VisionTokens.

    placeholder: config field of the id repeated once per visual feature (counted against the image).
    marker_fields: config fields of other ids that only occur inside image/video spans (video placeholder,
    start/end markers). marker_tokens: token strings of such ids that the config does not name (tile and
    row/column tokens); ``fnmatch`` patterns are matched against the tokenizer's vocabulary.
    inner: text tokens (strings) that the processor puts between the pieces of one span (Idefics3's newline
    between tile rows). before / after: the text the template or processor always puts right before /
    right after each span (encoded with the tokenizer); the text-only prompt has none of it, and a span
    without it is an error, not a guess.
    vision_keys: batch keys that carry the visual inputs (any shape); dropped from the text-only batch.
    processor_ids: ``processor`` attribute -> config field that must hold the same id (check_processor).
    """

    placeholder: str
    marker_fields: tuple[str, ...] = ()
    marker_tokens: tuple[str, ...] = ()
    inner: tuple[str, ...] = ()
    before: str = ""
    after: str = ""
    vision_keys: tuple[str, ...] = ("pixel_values",)
    processor_ids: dict[str, str] = field(default_factory=dict)

    def strings(self) -> list[str]:
        """The token strings / text this spec needs a tokenizer to resolve."""
        return [s for s in self.marker_tokens + self.inner + (self.before, self.after) if s]


_QWEN = FamilySpec("image_token_id", ("video_token_id", "vision_start_token_id", "vision_end_token_id"),
                   vision_keys=("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                "second_per_grid_ts"))
_GLM4V = FamilySpec("image_token_id", ("video_token_id", "image_start_token_id", "image_end_token_id"),
                    vision_keys=_QWEN.vision_keys)
_LLAVA = FamilySpec("image_token_index", after="\n", vision_keys=("pixel_values", "image_sizes"))
# Idefics3 / SmolVLM put "\n" between tile rows and "\n\n" before the global image: one or two tokens.
_IDEFICS3 = FamilySpec("image_token_id", marker_tokens=("<fake_token_around_image>", "<global-img>", "<row_*_col_*>"),
                       inner=("\n", "\n\n"), vision_keys=("pixel_values", "pixel_attention_mask"))
# Every row is tested against the chat template (tests/test_vlm.py builds each family from vgs_kernels.testing).
FAMILY_SPECS: dict[str, FamilySpec] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN,
    "qwen3_vl_moe": _QWEN,
    "qwen3_5": _QWEN,
    "glm4v": _GLM4V,
    "glm4v_moe": _GLM4V,
    "llava": _LLAVA,
    "vipllava": _LLAVA,
    "llava_next": _LLAVA,  # image_newline and the anyres tiles are features of the one <image> run
    "llava_onevision": FamilySpec("image_token_index", ("video_token_index",),
                                  vision_keys=("pixel_values", "image_sizes", "batch_num_images",
                                               "pixel_values_videos", "image_sizes_videos")),
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    "idefics2": FamilySpec("image_token_id", marker_tokens=("<fake_token_around_image>",),
                           vision_keys=("pixel_values", "pixel_attention_mask")),
    "gemma3": FamilySpec("image_token_index", ("boi_token_index", "eoi_token_index"), before="\n\n",
                         after="\n\n", processor_ids={"image_token_id": "boi_token_index"}),
    "internvl": FamilySpec("image_token_id", marker_tokens=("<img>", "</img>"), after="\n"),
}


def register_family(model_type: str, spec: FamilySpec) -> None:
    """Add (or replace) the spec of ``model_type`` (``model.config.model_type``) without editing the package."""
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"spec must be a FamilySpec, got {type(spec).__name__}")
    FAMILY_SPECS[model_type] = spec


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
            image = _image_id(cfg)
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
    from vgs_kernels.vlm.plumbing import _probe_id_path

    key = (processor.chat_template, tokens, len(processor.tokenizer))
    seen = _PROBED.setdefault(processor, {})
    if key not in seen:
        try:
            _probe_id_path(processor, tokens, {})
            seen[key] = None
        except ValueError as err:
            seen[key] = str(err)
    return seen[key]


def family_spec(model: torch.nn.Module) -> FamilySpec | None:
    """The table row of ``model`` (None for an unknown family)."""
    return FAMILY_SPECS.get(getattr(hf_model(model).config, "model_type", None))


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / DataParallel / DeepSpeed engine wrappers, for its config and
    LM head (the forward passes still go through the wrapper, so DDP sees them). A DeepSpeed engine's
    ``config`` is its own (a dict without model_type), not the model's."""
    while not hasattr(getattr(model, "config", None), "model_type") and isinstance(getattr(model, "module", None),
                                                                                   torch.nn.Module):
        model = model.module
    return model


def _image_id(cfg) -> int | None:
    image = getattr(cfg, "image_token_id", None)
    return getattr(cfg, "image_token_index", None) if image is None else image


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
