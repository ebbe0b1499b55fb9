"""VLM plumbing on every supported family, with tiny models and processors built from configs (no downloads).

References: the text-only batch rendered from the conversation without its images by the processor's chat
template (text_only_batch); plain forwards of the models on the full batch and on that text-only batch;
for a few families also each sample alone, unpadded.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from vgs_kernels.testing import CASES, tiny_case
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


def _per_sample(images):  # images of CONVS[i]
    return [images[:1], None, images[1:]]


def _prompts():
    return [[{"role": "user", "content": c}] for c in CONVS]


@pytest.fixture(scope="module", params=CASES)
def fam(request):
    proc, build = tiny_case(request.param, WORDS)
    sizes = dict(hidden=32, layers=1, heads=4, vision_hidden=16)
    return request.param, proc, build(proc, seed=0, **sizes), build(proc, seed=1, **sizes)


def _rollout(proc, student, images, max_new_tokens=4):
    """Left-padded prompts with 1 / 0 / 2 images, sampled responses, vision tokens suppressed."""
    text = proc.apply_chat_template(_prompts(), add_generation_prompt=True)
    batch = proc(text=text, images=images, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    seq = student.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True,
                           suppress_tokens=VisionTokens.from_model(student, proc).ids().tolist())
    return rollout_batch(batch, seq, proc.tokenizer.eos_token_id)


def _offline(proc, images):
    """Right-padded prompt + response batch (the responses' tokens appended to the rendered prompts)."""
    proc.tokenizer.padding_side = "right"
    try:
        prompts = proc.apply_chat_template(_prompts(), add_generation_prompt=True)
        batch = proc(text=prompts, images=images, return_tensors="pt", padding=True)
    finally:
        proc.tokenizer.padding_side = "left"
    responses = [torch.tensor(proc.tokenizer.convert_tokens_to_ids(r.split() + [proc.tokenizer.eos_token]))
                 for r in RESPONSES]
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
    case, proc, student, _ = fam
    images = _images()
    batch, rmask = _rollout(proc, student, images) if layout == "rollout_left" else _offline(proc, images)
    side = "left" if layout == "rollout_left" else "right"
    text, trmask = strip_images(batch, rmask, VisionTokens.from_model(student, proc))
    ref, ref_mask = text_only_batch(proc, _prompts(), _responses(batch, rmask), padding_side=side)
    assert not set(text) & set(VisionTokens.from_model(student, proc).vision_keys)
    assert text["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(text["attention_mask"], ref["attention_mask"]) and torch.equal(trmask, ref_mask)
    for key in set(ref) - {"input_ids", "attention_mask"}:  # per-token side inputs: zeros on text
        assert not text[key].any() and not ref[key].any()


def test_four_passes_equal_plain_forwards(fam):
    """s, a: plain forward on the full batch at the response positions; u, b: on the template text-only batch."""
    case, proc, student, teacher = fam
    batch, rmask = _rollout(proc, student, _images())
    text, trmask = text_only_batch(proc, _prompts(), _responses(batch, rmask))
    d = distill_logits(student, teacher, batch, rmask, processor=proc)
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
    # The messages path gives the same four tensors.
    d2 = distill_logits(student, teacher, batch, rmask, text_batch=text, text_response_mask=trmask)
    for x, y in zip(d, d2):
        torch.testing.assert_close(x.detach(), y.detach(), atol=2e-5, rtol=1e-4)
    # A sample without an image sees the same prompt in both passes.
    torch.testing.assert_close(d.s[1], d.u[1], atol=2e-5, rtol=1e-4)


def test_check_processor_and_vision_token_errors(fam):
    case, proc, student, teacher = fam
    check_processor(proc, student)  # a matching pair passes (Gemma3 compared the wrong config field before)
    moved = type(student)(student.config.__class__.from_dict(student.config.to_dict()))
    spec = FAMILY_SPECS[student.config.model_type]
    setattr(moved.config, spec.placeholder, proc.tokenizer.convert_tokens_to_ids("red"))
    with pytest.raises(ValueError, match="disagree"):
        check_processor(proc, moved)
    # A response holding a vision token (sampled without suppress_tokens) is an error, not masked.
    batch, rmask = _offline(proc, _images())
    tokens = VisionTokens.from_model(student, proc)
    for vid in tokens.ids().tolist():
        bad = dict(batch, input_ids=torch.where(rmask & (torch.arange(rmask.shape[1]) % 2 == 0), vid,
                                                batch["input_ids"]))
        with pytest.raises(ValueError, match="contain vision tokens"):
            distill_logits(student, teacher, bad, rmask, processor=proc)
    # Families whose spec names token strings need the processor.
    if FAMILY_SPECS[student.config.model_type].strings():
        with pytest.raises(ValueError, match="pass processor="):
            distill_logits(student, teacher, batch, rmask)


def test_unknown_family_and_user_spec(fam, monkeypatch):
    case, proc, student, teacher = fam
    batch, rmask = _offline(proc, _images())
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
    stripped, smask = strip_images(batch, rmask, VisionTokens.from_model(student, proc))
    assert stripped["input_ids"].tolist() == text["input_ids"].tolist()


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
            one = dict(proc(text=text, images=_per_sample(images)[i] if with_image else None, return_tensors="pt"))
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
