"""Per-family vision marker specs: where an image sits in a prompt's token ids, as data.

A :class:`FamilySpec` names config fields and token strings; :meth:`VisionTokens.from_model` (tokens.py) resolves them
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

from dataclasses import dataclass, field

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
# Every row is tested against the chat template (tests/vlm/test_vlm.py builds each family from vgs_kernels.testing).
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


def image_id(cfg) -> int | None:
    image = getattr(cfg, "image_token_id", None)
    return getattr(cfg, "image_token_index", None) if image is None else image


