"""Tiny VLMs and matching processors of every supported family, built from configs with no downloads.

For tests, demos and users who want to try the VLM plumbing on a CPU. Each processor is the family's real
transformers processor class (placeholder expansion, markers, image grids / tiles) around

- a word-level tokenizer (``tokenizers``) that keeps ``"\\n"`` as a token of its own and splits
  punctuation, so that a text-only batch keeping a stray newline or marker shows up as a token diff;
- a chat template laid out like the family's published one (same markers and newlines around images,
  same role headers), written out below;
- the family's PIL image processor, sized for images of a few patches.

    processor = tiny_processor("qwen2_vl", words=["red", "green"])
    model = tiny_vlm("qwen2_vl", processor)

Sizes are CPU-test sized (hidden 16-64, 1-2 layers); weights are random (``seed``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


ROLES = ["system", "user", "assistant"]


@dataclass(frozen=True)
class TinyFamily:
    """How to build one family: tokenizer specials, chat template, processor and model factories."""

    specials: tuple[str, ...]          # special tokens; the first is the pad token
    eos: str
    template: str                      # Jinja chat template, laid out like the published one
    processor: Callable[..., Any]      # (tokenizer, template, **options) -> processor
    model: Callable[..., torch.nn.Module]  # (processor, hidden, layers, heads, vision_hidden) -> model
    bos: str | None = None
    extra_special: dict[str, str] = field(default_factory=dict)  # named specials (tokenizer.image_token, ...)


def _tokenizer(fam: TinyFamily, words: list[str], padding_side: str) -> PreTrainedTokenizerFast:
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                   pre_tokenizers.Split(Regex(r"[ \t]+"), "removed"),
                                   pre_tokenizers.Punctuation("isolated")])
    pieces = {p for w in words + ROLES + _template_words(fam.template) for p, _ in pre.pre_tokenize_str(w)}
    vocab = list(fam.specials) + ["<unk>", "\n"] + sorted(pieces - set(fam.specials) - {"<unk>", "\n"})
    raw = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token=fam.specials[0],
                                  eos_token=fam.eos, bos_token=fam.bos, padding_side=padding_side,
                                  extra_special_tokens=fam.extra_special or None)
    tok.add_special_tokens({"additional_special_tokens": [t for t in fam.specials if t not in (fam.specials[0],)]})
    return tok


def _template_words(template: str) -> list[str]:
    """Literal words of a template (outside ``{{ }}`` / ``{% %}``, plus quoted strings inside them)."""
    import re
    outside = re.sub(r"\{[{%#].*?[}%#]\}", " ", template, flags=re.S)
    quoted = re.findall(r"'([^']*)'", "".join(re.findall(r"\{[{%].*?[}%]\}", template, flags=re.S)))
    return [w for w in outside.split() + " ".join(quoted).split() if not w.startswith("<")]


def tiny_processor(family: str, words: list[str], padding_side: str = "left", **options: Any):
    """A processor of ``family`` whose tokenizer knows ``words`` (plus the template's words and specials).

    options are family-specific (e.g. ``patch_size``, ``pixels`` for the Qwen families,
    ``image_splitting`` for Idefics3); see :data:`FAMILIES`.
    """
    fam = _family(family)
    return fam.processor(_tokenizer(fam, list(words), padding_side), fam.template, **options)


def tiny_vlm(family: str, processor, hidden: int = 64, layers: int = 2, heads: int = 4, vision_hidden: int = 32,
             vision_depth: int = 1, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``family`` VLM sized for a CPU, with ``processor``'s token ids (eval mode)."""
    torch.manual_seed(seed)
    model = _family(family).model(processor, hidden=hidden, layers=layers, heads=heads,
                                  vision_hidden=vision_hidden, vision_depth=vision_depth)
    return model.eval()


def _family(family: str) -> TinyFamily:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    return FAMILIES[family]


def _images_only(base: type) -> type:
    """``base`` without its video processor (transformers' video processors need torchvision)."""
    return type(base.__name__, (base,), {"get_attributes": classmethod(
        lambda cls: [a for a in base.get_attributes() if a != "video_processor"])})


def _text_config(processor, hidden: int, layers: int, heads: int, **extra) -> dict:
    tok = processor.tokenizer
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), head_dim=hidden // heads,
                max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, **extra)


def _ids(processor, **tokens: str) -> dict[str, int]:
    return {k: processor.tokenizer.convert_tokens_to_ids(t) for k, t in tokens.items()}


def _build(cls_name: str, cfg_name: str, **config) -> torch.nn.Module:
    cfg = getattr(transformers, cfg_name)(**config)
    cfg._attn_implementation = "sdpa"
    return getattr(transformers, cls_name)(cfg)


# ---------------------------------------------------------------------------------------------- Qwen
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL / Qwen2.5-VL's published template (default system prompt; images inline in the user turn).
QWEN2_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen3-VL's: no default system prompt, otherwise the same layout.
QWEN3_TEMPLATE = QWEN2_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}", "")


def _qwen_processor(cls_name: str):
    def build(tok, template, patch_size: int = 8, pixels: int = 32 * 32):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        factor = 2 * patch_size
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=patch_size, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": factor * factor, "longest_edge": max(pixels, factor * factor)})
        return _images_only(getattr(transformers, cls_name))(image_processor=image_processor, tokenizer=tok,
                                                             chat_template=template)
    return build


def _qwen_model(family: str):
    def build(processor, hidden, layers, heads, vision_hidden, vision_depth):
        patch = processor.image_processor.patch_size
        head_dim = hidden // heads
        sec = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # M-RoPE t/h/w split
        text = _text_config(processor, hidden, layers, heads, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": sec})
        vision = dict(depth=vision_depth, num_heads=2, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
        if family == "qwen2_vl":
            vision.update(embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2)
        else:
            vision.update(hidden_size=vision_hidden, out_hidden_size=hidden, intermediate_size=2 * vision_hidden)
        if family == "qwen2_5_vl":
            vision.update(window_size=4 * patch, fullatt_block_indexes=[vision_depth - 1])
        if family == "qwen3_vl":
            text["rope_parameters"]["mrope_interleaved"] = True
            vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
        names = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}[family]
        return _build(f"{names}ForConditionalGeneration", f"{names}Config", text_config=text, vision_config=vision,
                      **_ids(processor, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                             vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>"))
    return build


FAMILIES: dict[str, TinyFamily] = {
    "qwen2_vl": TinyFamily(QWEN_SPECIALS, "<|im_end|>", QWEN2_TEMPLATE, _qwen_processor("Qwen2VLProcessor"),
                           _qwen_model("qwen2_vl")),
    "qwen2_5_vl": TinyFamily(QWEN_SPECIALS, "<|im_end|>", QWEN2_TEMPLATE, _qwen_processor("Qwen2_5_VLProcessor"),
                             _qwen_model("qwen2_5_vl")),
    "qwen3_vl": TinyFamily(QWEN_SPECIALS, "<|im_end|>", QWEN3_TEMPLATE, _qwen_processor("Qwen3VLProcessor"),
                           _qwen_model("qwen3_vl")),
}
