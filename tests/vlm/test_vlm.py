"""VLM plumbing on every supported family, with tiny models and processors built from configs (no downloads).

References: the text-only batch rendered from the conversation without its images by the processor's chat
template (text_only_batch); plain forwards of the models on the full batch and on that text-only batch;
for a few families also each sample alone, unpadded.
"""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from vgs_kernels.testing import BPE_ID_PATH_RAISES, CASES, TOKENIZER_KINDS, tiny_case
from vgs_kernels.vlm import (FAMILY_SPECS, VisionTokens, check_processor, distill_logits, register_family,
                             response_positions, rollout_batch, strip_images, text_only_batch)

WORDS = "what colour is the square left or right ? red green blue it a".split()
CONVS = [  # one image; no image; two images after some text
    [{"type": "image"}, {"type": "text", "text": "what colour is the square ?"}],
    [{"type": "text", "text": "what colour ?"}],
    [{"type": "text", "text": "left or right"}, {"type": "image"}, {"type": "image"}],
]
RESPONSES = ["it is red", "blue", "it is a green square"]


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(32, 32), (48, 32), (32, 48)]]


def _per_sample(images):  # images of CONVS[i], nested per sample (as Gemma3's processor requires)
    return [images[:1], [], images[1:]]


def _prompts():
    return [[{"role": "user", "content": c}] for c in CONVS]


SIZES = dict(hidden=32, layers=1, heads=4, vision_hidden=16)
# (case, tokenizer) pairs whose id-only path cannot reproduce the template, so it raises (naming the messages path);
# every other pair must be exact, token for token. PROBE_RAISES: those check_processor's probe already shows.
ID_PATH_RAISES = {(c, "bpe") for c in BPE_ID_PATH_RAISES}
PROBE_RAISES = {(c, "bpe") for c, (_, probed) in BPE_ID_PATH_RAISES.items() if probed}


@pytest.fixture(scope="module", params=[(c, k) for c in CASES for k in TOKENIZER_KINDS], ids="-".join)
def fam(request):
    """(case, processor, student, teacher, rollout batch + mask, offline batch + mask) of one test case."""
    case, kind = request.param
    proc, build = tiny_case(case, WORDS, tokenizer=kind)
    student = build(proc, seed=0, **SIZES)
    return (request.param, proc, student, build(proc, seed=1, **SIZES), _rollout(proc, student, _images()),
            _offline(proc, _images(1)))


def _rollout(proc, student, images, max_new_tokens=3):
    """Left-padded prompts with 1 / 0 / 2 images, sampled responses, vision tokens suppressed."""
    text = proc.apply_chat_template(_prompts(), add_generation_prompt=True)
    batch = proc(text=text, images=_per_sample(images), return_tensors="pt", padding=True)
    torch.manual_seed(0)
    seq = student.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True,
                           suppress_tokens=VisionTokens.from_model(student, proc).ids().tolist())
    return rollout_batch(batch, seq, proc.tokenizer.eos_token_id)


def _offline(proc, images):
    """Right-padded prompt + response batch (the responses' tokens appended to the rendered prompts)."""
    proc.tokenizer.padding_side = "right"
    try:
        prompts = proc.apply_chat_template(_prompts(), add_generation_prompt=True)
        batch = proc(text=prompts, images=_per_sample(images), return_tensors="pt", padding=True)
    finally:
        proc.tokenizer.padding_side = "left"
    tok = proc.tokenizer
    responses = [torch.tensor(tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for r in RESPONSES]
    attn = batch["attention_mask"]
    n = attn.sum(1)
    R = max(len(r) for r in responses)
    B, P = attn.shape
    out = {k: v for k, v in batch.items()}
    for key, val in batch.items():
        if isinstance(val, torch.Tensor) and val.shape == (B, P):
            out[key] = torch.cat([val, torch.zeros(B, R, dtype=val.dtype)], 1)
    rmask = torch.zeros(B, P + R, dtype=torch.bool)
    for i, r in enumerate(responses):
        out["input_ids"][i, n[i]:n[i] + len(r)] = r
        out["input_ids"][i, n[i] + len(r):] = proc.tokenizer.pad_token_id
        out["attention_mask"][i, :n[i] + len(r)] = 1
        rmask[i, n[i]:n[i] + len(r)] = True
    return out, rmask


def _responses(batch, rmask):
    return [batch["input_ids"][i][rmask[i]] for i in range(len(rmask))]


@pytest.mark.parametrize("layout", ["rollout_left", "offline_right"])
def test_id_path_equals_template_path(fam, layout):
    """strip_images (token ids + family spec) == text_only_batch (template without the images), token for token."""
    case, proc, student, _, rollout, offline = fam
    batch, rmask = rollout if layout == "rollout_left" else offline
    side = "left" if layout == "rollout_left" else "right"
    ref, ref_mask = text_only_batch(proc, _prompts(), _responses(batch, rmask), padding_side=side)
    if case in ID_PATH_RAISES:
        with pytest.raises(ValueError, match="text_only_batch"):
            strip_images(batch, rmask, VisionTokens.from_model(student, proc))
        return
    text, trmask = strip_images(batch, rmask, VisionTokens.from_model(student, proc))
    assert not set(text) & set(VisionTokens.from_model(student, proc).vision_keys)
    assert text["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(text["attention_mask"], ref["attention_mask"]) and torch.equal(trmask, ref_mask)
    for key in set(ref) - {"input_ids", "attention_mask"}:  # per-token side inputs: zeros on text
        assert not text[key].any() and not ref[key].any()


def test_four_passes_equal_plain_forwards(fam):
    """s, a: plain forward on the full batch at the response positions; u, b: on the template text-only batch."""
    case, proc, student, teacher, (batch, rmask), _ = fam
    text, trmask = text_only_batch(proc, _prompts(), _responses(batch, rmask))
    if case in ID_PATH_RAISES:  # the id-only path raises (above); the messages path serves every family
        with pytest.raises(ValueError, match="text_only_batch"):
            distill_logits(student, teacher, batch, rmask, processor=proc)
    d = distill_logits(student, teacher, batch, rmask, processor=proc, text_batch=text, text_response_mask=trmask)
    B, T = d.mask.shape
    assert [tuple(t.shape) for t in d[:4]] == [(B, T, student.get_output_embeddings().weight.shape[0])] * 4
    assert d.s.requires_grad and d.u.requires_grad and not d.a.requires_grad and not d.b.requires_grad
    pos, mask = response_positions(rmask)
    pos_u, mask_u = response_positions(trmask)
    assert torch.equal(mask, d.mask) and torch.equal(mask, mask_u)
    with torch.no_grad():
        for got, model, b, p in [(d.s, student, batch, pos), (d.a, teacher, batch, pos),
                                 (d.u, student, text, pos_u), (d.b, teacher, text, pos_u)]:
            full = model(**b).logits
            ref = full.gather(1, p[..., None].expand(-1, -1, full.shape[-1]))
            torch.testing.assert_close(got.detach()[mask], ref[mask], atol=2e-5, rtol=1e-4)
    # A sample without an image sees the same prompt in both passes.
    torch.testing.assert_close(d.s[1], d.u[1], atol=2e-5, rtol=1e-4)


def test_check_processor_and_vision_token_errors(fam, monkeypatch):
    case, proc, student, teacher, _, (batch, rmask) = fam
    check_processor(proc, student, id_path=False)  # a matching pair passes (Gemma3 compared the wrong field before)
    spec = FAMILY_SPECS[student.config.model_type]
    red = proc.tokenizer("red", add_special_tokens=False)["input_ids"][-1]  # a plain text token
    for field in spec.processor_ids.values() or [spec.placeholder]:
        with monkeypatch.context() as m:
            m.setattr(student.config, field, red)
            with pytest.raises(ValueError, match="disagree"):
                check_processor(proc, student, id_path=False)
    # The id-only path reproduces the template on check_processor's probe conversation (checked by default),
    # or check_processor says it does not and names the messages path.
    if case in PROBE_RAISES:
        with pytest.raises(ValueError, match="text_only_batch"):
            check_processor(proc, student, id_path=True)
    else:
        check_processor(proc, student, id_path=True)
    if case[0].startswith("qwen2"):  # "Picture 1: " labels stay in the id-only rows: the probe says so
        with pytest.raises(ValueError, match="(does not reproduce|merges the text).*text_only_batch"):
            check_processor(proc, student, add_vision_id=True)
        check_processor(proc, student, id_path=False, add_vision_id=True)
    # A response holding a vision token (sampled without suppress_tokens) is an error, not masked.
    tokens = VisionTokens.from_model(student, proc)
    for vid in tokens.ids().tolist():
        bad = dict(batch, input_ids=torch.where(rmask & (torch.arange(rmask.shape[1]) % 2 == 0), vid,
                                                batch["input_ids"]))
        with pytest.raises(ValueError, match="contain vision tokens"):
            distill_logits(student, teacher, bad, rmask, processor=proc)
    prompt = {"input_ids": batch["input_ids"][:, :2], "attention_mask": batch["attention_mask"][:, :2]}
    seq = torch.cat([prompt["input_ids"], torch.full((len(rmask), 2), tokens.ids()[-1].item())], 1)
    with pytest.raises(ValueError, match="contain vision tokens"):
        rollout_batch(prompt, seq, proc.tokenizer.eos_token_id, vision_tokens=tokens)
    # Families whose spec names token strings need the processor.
    if FAMILY_SPECS[student.config.model_type].strings():
        with pytest.raises(ValueError, match="pass processor="):
            distill_logits(student, teacher, batch, rmask)


def test_unknown_family_and_user_spec(fam, monkeypatch):
    case, proc, student, teacher, _, (batch, rmask) = fam
    model_type = student.config.model_type
    spec = FAMILY_SPECS[model_type]
    monkeypatch.delitem(FAMILY_SPECS, model_type)
    with pytest.raises(ValueError, match=r"has image token id \d+ but no marker spec; pass vision_tokens="):
        distill_logits(student, teacher, batch, rmask, processor=proc)
    # Without a spec, a text-only batch from the messages still works ...
    text, trmask = text_only_batch(proc, _prompts(), _responses(batch, rmask), padding_side="right")
    distill_logits(student, teacher, batch, rmask, text_batch=text, text_response_mask=trmask)
    # ... and a user can add the spec without editing the package.
    register_family(model_type, spec)
    if case not in ID_PATH_RAISES:
        stripped, smask = strip_images(batch, rmask, VisionTokens.from_model(student, proc))
        assert stripped["input_ids"].tolist() == text["input_ids"].tolist()


def test_bpe_merge_across_a_cut_raises_instead_of_a_different_batch():
    """LLaVA-OneVision's template puts "user " before the image and "\\n" after it: a byte-level BPE merges the
    two (" \\n" is one token) once the image is gone, so cutting the ids gives another batch than the template.
    The id-only path raises there; without the join check it would have returned that other batch."""
    proc, build = tiny_case("llava_onevision", WORDS, tokenizer="bpe")
    model = build(proc, **SIZES)
    batch, rmask = _offline(proc, _images())
    ref, _ = text_only_batch(proc, _prompts(), _responses(batch, rmask), padding_side="right")
    tokens = VisionTokens.from_model(model, proc)
    unchecked = dataclasses.replace(tokens, tokenizer=None, template_error=None)
    assert strip_images(batch, rmask, unchecked)[0]["input_ids"].tolist() != ref["input_ids"].tolist()
    with pytest.raises(ValueError, match="merges the text on both sides of an image span.*text_only_batch"):
        strip_images(batch, rmask, dataclasses.replace(tokens, template_error=None))
    with pytest.raises(ValueError, match="merges the text on both sides"):  # the probe found it too
        strip_images(batch, rmask, tokens)
    with pytest.raises(ValueError, match="text_only_batch"):
        distill_logits(model, model, batch, rmask, processor=proc)


def test_span_without_its_context_is_an_error():
    """A template that does not put the spec's newline after the image gives an error, not a wrong batch."""
    proc, build = tiny_case("llava", WORDS)
    model = build(proc, hidden=32, layers=1, vision_hidden=16)
    proc.chat_template = proc.chat_template.replace("'<image>\n'", "'<image>'")
    batch, rmask = _offline(proc, _images())
    with pytest.raises(ValueError, match="not preceded by .* and followed by"):
        strip_images(batch, rmask, VisionTokens.from_model(model, proc))


@pytest.mark.parametrize("case", ["qwen2_vl", "gemma3"])
def test_batched_logits_equal_each_sample_alone(case):
    """Padding (left for the rollout) and batching do not change any of the four logit sets."""
    proc, build = tiny_case(case, WORDS)
    student, teacher = build(proc, hidden=32, layers=1, vision_hidden=16), build(proc, hidden=32, layers=1,
                                                                                 vision_hidden=16, seed=1)
    images = _images()
    batch, rmask = _rollout(proc, student, images)
    d = distill_logits(student, teacher, batch, rmask, processor=proc)
    for i, resp in enumerate(_responses(batch, rmask)):
        for got, model, with_image in [(d.s, student, True), (d.u, student, False), (d.a, teacher, True),
                                       (d.b, teacher, False)]:
            content = CONVS[i] if with_image else [c for c in CONVS[i] if c["type"] != "image"]
            text = proc.apply_chat_template([[{"role": "user", "content": content}]], add_generation_prompt=True)
            one = dict(proc(text=text, images=[_per_sample(images)[i]] if with_image and i != 1 else None,
                            return_tensors="pt"))
            for key, val in one.items():
                if isinstance(val, torch.Tensor) and val.shape == one["input_ids"].shape and key != "input_ids":
                    one[key] = torch.cat([val, torch.ones_like(resp)[None] if key == "attention_mask" else
                                          torch.zeros_like(resp)[None]], 1)
            one["input_ids"] = torch.cat([one["input_ids"], resp[None]], 1)
            with torch.no_grad():
                ref = model(**one).logits[0, -len(resp) - 1:-1]
            torch.testing.assert_close(got[i, :len(resp)].detach(), ref, atol=2e-5, rtol=1e-4)


def test_gradients_reach_the_student_only():
    proc, build = tiny_case("qwen2_vl", WORDS)
    student, teacher = build(proc, hidden=32, layers=1), build(proc, hidden=32, layers=1, seed=1)
    batch, rmask = _rollout(proc, student, _images())
    d = distill_logits(student, teacher, batch, rmask)
    (d.s.float().logsumexp(-1) * d.mask).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters() if "visual" in n)
    assert all(p.grad is None for p in teacher.parameters())


def test_rollout_batch_stops_at_first_eos():
    prompt = {"input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
              "mm_token_type_ids": torch.zeros(2, 3, dtype=torch.long)}
    seq = torch.cat([prompt["input_ids"], torch.tensor([[4, 2, 2, 0], [4, 4, 4, 4]])], 1)
    batch, rmask = rollout_batch(prompt, seq, eos_token_id=2)
    assert rmask.tolist() == [[False] * 3 + [True, True, False, False], [False] * 3 + [True] * 4]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert batch["mm_token_type_ids"].shape == (2, 7)
    pos, mask = response_positions(rmask)
    assert pos.tolist() == [[2, 3, 0, 0], [2, 3, 4, 5]] and mask.sum().item() == 6
    with pytest.raises(ValueError, match="must start with"):
        rollout_batch(prompt, seq[:, 1:], eos_token_id=2)


def test_bad_input_errors():
    proc, build = tiny_case("qwen2_vl", WORDS)
    student, teacher = build(proc, **SIZES), build(proc, seed=1, **SIZES)
    images = _images()
    batch, rmask = _offline(proc, images)
    # A batch without any image placeholder.
    text, trmask = strip_images(batch, rmask, VisionTokens.from_model(student))
    with pytest.raises(ValueError, match="no image placeholder"):
        distill_logits(student, teacher, text, trmask)
    # Response tokens differing between the passes.
    bad = dict(text, input_ids=torch.where(trmask, (text["input_ids"] + 1) % len(proc.tokenizer), text["input_ids"]))
    with pytest.raises(ValueError, match="response tokens differ"):
        distill_logits(student, teacher, batch, rmask, text_batch=bad, text_response_mask=trmask)
    # Teacher with another vocabulary; processor with another vocabulary.
    other, _ = tiny_case("qwen2_vl", WORDS + ["extra", "words"])
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        distill_logits(student, build(other, **SIZES), batch, rmask)
    with pytest.raises(ValueError, match="vocabulary"):
        check_processor(other, student)
    # A processor with another patch size: the grids imply another number of placeholders.
    coarse, _ = tiny_case("qwen2_vl", WORDS, patch_size=16, pixels=64 * 64)
    big, big_mask = _offline(coarse, images)
    with pytest.raises(ValueError, match="mismatched processor and model"):
        distill_logits(student, teacher, big, big_mask)
    # A mask with padding inside a row; a response mask of the wrong shape.
    hole = dict(batch, attention_mask=batch["attention_mask"].clone())
    hole["attention_mask"][:, 2] = 0
    with pytest.raises(ValueError, match="padding inside"):
        distill_logits(student, teacher, hole, rmask)
    with pytest.raises(ValueError, match="response_mask"):
        distill_logits(student, teacher, batch, rmask[:, 1:])
