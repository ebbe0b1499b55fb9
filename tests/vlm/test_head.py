"""LMHead.from_model: the logit transform each family's forward applies, measured, against model(...).logits."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import vgs_kernels as vgs  # noqa: E402
from vgs_kernels.testing import tiny_processor, tiny_vlm  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, vocab_size=300, image_size=32, patch_size=8, projection_dim=32, max_position_embeddings=256)


def tiny(model_type, text=None, **kw):
    """A tiny randomly initialised model of a transformers image-text-to-text family (fp32, eval)."""
    cfg = transformers.AutoConfig.for_model(model_type, **({"text_config": text.to_dict()} if text else {}), **kw)
    for sub in (cfg, cfg.get_text_config(), getattr(cfg, "vision_config", None)):
        for k, v in SMALL.items():
            if getattr(sub, k, None) is not None:
                setattr(sub, k, v)
        if getattr(sub, "layer_types", None) is not None:
            sub.layer_types = sub.layer_types[:1]
    if getattr(cfg.get_text_config(), "pad_token_id", None) is not None:
        cfg.get_text_config().pad_token_id = 0
    return cfg


def with_text(cfg, **attrs):
    for k, v in attrs.items():
        setattr(cfg.get_text_config(), k, v)
    torch.manual_seed(0)
    return transformers.AutoModelForImageTextToText.from_config(cfg).eval()


# family: (model, the transform its forward applies). The config alone misleads for cohere2_vision (a
# logit_scale it ignores) and gemma3 (a softcap it never applies); TRL's attribute list reads both.
FAMILIES = {
    "aya_vision": (lambda: with_text(tiny("aya_vision"), logit_scale=0.0625), (0.0625, None)),
    "cohere2_vision": (lambda: with_text(tiny("cohere2_vision"), logit_scale=0.0625), (1.0, None)),
    "granite_docling": (lambda: with_text(tiny("granite_docling"), logits_scaling=8.0), (0.125, None)),
    "granite4_vision": (lambda: with_text(tiny("granite4_vision", deepstack_layer_map=[(0, 0)],
                                               spatial_target_layers=[0] * 4, downsample_rate="1/4"),
                                          logits_scaling=4.0), (0.25, None)),
    "gemma3_softcap_in_config": (lambda: with_text(tiny("gemma3"), final_logit_softcapping=7.0), (1.0, None)),
    "paligemma_gemma2": (lambda: with_text(tiny("paligemma", transformers.Gemma2Config()), final_logit_softcapping=5.0),
                         (1.0, 5.0)),
    "llava": (lambda: with_text(tiny("llava")), (1.0, None)),
}


def own_logits_match(model, head, ids=None):
    """head applied to the forward's last hidden state gives model(...).logits (a text-only input)."""
    ids = torch.randint(1, 200, (2, 5), generator=torch.Generator().manual_seed(0)) if ids is None else ids
    with torch.no_grad():
        h = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        logits = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(head.logits(h), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transform_is_the_forwards(family):
    build, (scale, cap) = FAMILIES[family]
    model = build()
    head = vgs.LMHead.from_model(model)
    assert head.weight is model.get_output_embeddings().weight
    assert head.logit_scale == pytest.approx(scale, rel=1e-6)
    assert head.softcap == (None if cap is None else pytest.approx(cap, rel=1e-6))
    own_logits_match(model, head)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "idefics3", "internvl"])
def test_supported_families_identity(family):
    proc = tiny_processor(family, ["a", "b"])
    model = tiny_vlm(family, proc, hidden=32, layers=1, heads=4, vision_hidden=16)
    head = vgs.LMHead.from_model(model)
    assert (head.logit_scale, head.softcap) == (1.0, None)
    own_logits_match(model, head, proc.tokenizer(["a b a b", "b a b a"], return_tensors="pt").input_ids)


def test_other_transform_raises_naming_the_class():
    model = FAMILIES["llava"][0]()
    model.register_forward_hook(lambda m, i, out: out.__setitem__("logits", out.logits.square()) or out)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration.*not a logit scale followed by a softcap"):
        vgs.LMHead.from_model(model)
