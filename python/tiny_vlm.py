"""Tiny Qwen-family VLMs and a matching processor, built from configs with no downloads.

Used by the demo and the tests. The processor is the real transformers processor class of the family
(placeholder expansion, image grids, ``mm_token_type_ids``) around a word-level tokenizer from the
``tokenizers`` library and the family's image processor constructed from arguments.

    processor = tiny_processor("qwen2_vl", words=["red", "green"])
    model = tiny_vlm("qwen2_vl", processor)
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
# Qwen's template, with spaces instead of newlines (the word-level tokenizer splits on whitespace).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
PATCH = {"qwen2_vl": 8, "qwen2_5_vl": 8, "qwen3_vl": 8}


def tiny_processor(family: str, words: list[str], patch_size: int = 8, pixels: int = 32 * 32,
                   padding_side: str = "left"):
    """A processor of ``family`` whose tokenizer knows ``words`` (+ Qwen's special tokens, ``<unk>``).

    Images are resized to about ``pixels`` pixels (a multiple of 2 * patch_size per side).
    """
    words = sorted(set(words) - set(SPECIAL) | {"user", "assistant", "system"})
    vocab = {t: i for i, t in enumerate(SPECIAL + ["<unk>"] + words)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", padding_side=padding_side)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    factor = 2 * patch_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": factor * factor, "longest_edge": max(pixels, factor * factor)})
    base = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}[family]
    return _images_only(base)(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def _images_only(base: type) -> type:
    """``base`` without its video processor (transformers' video processors need torchvision)."""
    return type(base.__name__, (base,), {"get_attributes": classmethod(
        lambda cls: [a for a in base.get_attributes() if a != "video_processor"])})


def tiny_vlm(family: str, processor, hidden: int = 64, layers: int = 2, heads: int = 4,
             vision_hidden: int = 32, vision_depth: int = 1, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``family`` VLM sized for a CPU, with the processor's token ids."""
    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    patch = processor.image_processor.patch_size
    head_dim = hidden // heads
    sec = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # M-RoPE t/h/w split
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sec})
    vision = dict(depth=vision_depth, num_heads=2, patch_size=patch, spatial_merge_size=2,
                  temporal_patch_size=2)
    if family == "qwen2_vl":
        vision.update(embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2)
        cfg, cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        vision.update(hidden_size=vision_hidden, out_hidden_size=hidden, intermediate_size=2 * vision_hidden,
                      window_size=4 * patch, fullatt_block_indexes=[vision_depth - 1])
        cfg, cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    elif family == "qwen3_vl":
        text.update(head_dim=head_dim)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(hidden_size=vision_hidden, out_hidden_size=hidden, intermediate_size=2 * vision_hidden,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
        cfg, cls = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    torch.manual_seed(seed)
    config = cfg(text_config=text, vision_config=vision, **ids)
    config._attn_implementation = "sdpa"
    return cls(config).eval()
