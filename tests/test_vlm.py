"""VLM plumbing on tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models built from configs (no downloads).

The reference for every batched logit is the same model run on one sample alone, unpadded, with the
prompt rendered by the chat template (with the image, or from the conversation without the image).
"""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from tiny_vlm import FAMILIES, tiny_processor, tiny_vlm  # noqa: E402

from vgs_kernels.vlm import (  # noqa: E402
    VisionTokens, check_processor, distill_logits, response_positions, rollout_batch, strip_images)

WORDS = "what colour is the square left right ? red green blue it a".split()
CONVS = [  # one image; no image; two images (the second at the end of the turn)
    [{"type": "image"}, {"type": "text", "text": "what colour is the square ?"}],
    [{"type": "text", "text": "what colour ?"}],
    [{"type": "image"}, {"type": "text", "text": "left or right"}, {"type": "image"}],
]


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(32, 32), (48, 32), (32, 48)]]


def _images_of(i, images):  # images of CONVS[i]
    return [images[:1], None, images[1:]][i]


def _msgs(content, response=None):
    m = [{"role": "user", "content": content}]
    return m + ([{"role": "assistant", "content": response}] if response else [])


@pytest.fixture(scope="module", params=FAMILIES)
def models(request):
    proc = tiny_processor(request.param, WORDS)
    return proc, tiny_vlm(request.param, proc, seed=0), tiny_vlm(request.param, proc, hidden=96, seed=1)


def _rollout(proc, student, images, max_new_tokens=5):
    text = proc.apply_chat_template([_msgs(c) for c in CONVS], add_generation_prompt=True)
    batch = proc(text=text, images=images, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    seq = student.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True,
                           suppress_tokens=VisionTokens.from_model(student).ids().tolist())
    return rollout_batch(batch, seq, proc.tokenizer.eos_token_id)


def _reference(model, proc, i, images, response, with_image):
    """Logits predicting ``response`` for conversation i, alone and unpadded."""
    content = CONVS[i] if with_image else [c for c in CONVS[i] if c["type"] != "image"]
    text = proc.apply_chat_template([_msgs(content)], add_generation_prompt=True)
    b = dict(proc(text=text, images=_images_of(i, images) if with_image else None, return_tensors="pt"))
    b["input_ids"] = torch.cat([b["input_ids"], response[None]], 1)
    b["attention_mask"] = torch.ones_like(b["input_ids"])
    b["mm_token_type_ids"] = torch.cat([b["mm_token_type_ids"], torch.zeros_like(response)[None]], 1)
    with torch.no_grad():
        return model(**b).logits[0, -len(response) - 1:-1]


def _assert_matches_reference(d, batch, rmask, proc, student, teacher, images):
    pos, mask = response_positions(rmask)
    assert torch.equal(mask, d.mask)
    for i in range(len(CONVS)):
        resp = batch["input_ids"][i][rmask[i]]
        n = len(resp)
        assert n > 0 and int(d.mask[i].sum()) == n
        for got, model, with_image in [(d.s, student, True), (d.u, student, False),
                                       (d.a, teacher, True), (d.b, teacher, False)]:
            ref = _reference(model, proc, i, images, resp, with_image)
            torch.testing.assert_close(got[i, :n].detach(), ref, atol=2e-5, rtol=1e-4)


def test_four_passes_left_padded_rollout(models):
    """Rollouts from generate (left-padded prompts, 0/1/2 images per sample) match per-sample references."""
    proc, student, teacher = models
    images = _images()
    batch, rmask = _rollout(proc, student, images)
    d = distill_logits(student, teacher, batch, rmask)
    B, T = d.mask.shape
    assert [tuple(t.shape) for t in d[:4]] == [(B, T, len(proc.tokenizer))] * 4
    assert d.s.requires_grad and d.u.requires_grad and not d.a.requires_grad and not d.b.requires_grad
    _assert_matches_reference(d, batch, rmask, proc, student, teacher, images)
    # Samples without an image see the same prompt in both passes.
    torch.testing.assert_close(d.s[1], d.u[1], atol=2e-5, rtol=1e-4)


def test_four_passes_right_padded_full_conversations(models):
    """An offline batch (conversation + response rendered by the template, right-padded) aligns too."""
    proc, student, teacher = models
    proc.tokenizer.padding_side = "right"
    try:
        images = _images(1)
        responses = ["it is red", "blue", "it is a green square"]
        prompts = proc.apply_chat_template([_msgs(c) for c in CONVS], add_generation_prompt=True)
        batch = proc(text=[p + r + " <|im_end|>" for p, r in zip(prompts, responses)], images=images,
                     return_tensors="pt", padding=True)
        plen = [len(proc(text=[p], images=_images_of(i, images))["input_ids"][0]) for i, p in enumerate(prompts)]
        ids = batch["input_ids"]
        rmask = (torch.arange(ids.shape[1]) >= torch.tensor(plen)[:, None]) & batch["attention_mask"].bool()
        d = distill_logits(student, teacher, batch, rmask)
        assert d.mask.sum(1).tolist() == [len(r.split()) + 1 for r in responses]
        _assert_matches_reference(d, batch, rmask, proc, student, teacher, images)
    finally:
        proc.tokenizer.padding_side = "left"


def test_strip_images_equals_template_without_image(models):
    proc, student, _ = models
    images = _images()
    batch, rmask = _rollout(proc, student, images)
    text, trmask = strip_images(batch, rmask, VisionTokens.from_model(student))
    assert not any(k in text for k in ("pixel_values", "image_grid_thw"))
    prompts = proc.apply_chat_template([_msgs([c for c in cv if c["type"] != "image"]) for cv in CONVS],
                                       add_generation_prompt=True)
    ref = proc(text=prompts, return_tensors="pt", padding=True)
    for i in range(len(CONVS)):
        keep = text["attention_mask"][i].bool() & ~trmask[i]
        assert text["input_ids"][i][keep].tolist() == ref["input_ids"][i][ref["attention_mask"][i].bool()].tolist()
        assert text["input_ids"][i][trmask[i]].tolist() == batch["input_ids"][i][rmask[i]].tolist()
    assert not text["mm_token_type_ids"].any()
    # Left padding kept: every row ends at the last column, like the input.
    assert bool(text["attention_mask"][:, -1].all() | ~batch["attention_mask"][:, -1].bool().all())


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


def test_gradients_reach_the_student_only(models):
    proc, student, teacher = models
    batch, rmask = _rollout(proc, student, _images())
    d = distill_logits(student, teacher, batch, rmask)
    (d.s.float().logsumexp(-1) * d.mask).sum().backward()
    vis_grad = [p.grad for n, p in student.named_parameters() if "visual" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in vis_grad)  # the image pass reaches the encoder
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)


def test_bad_input_errors(models):
    proc, student, teacher = models
    images = _images()
    batch, rmask = _rollout(proc, student, images)
    # A batch without any image placeholder.
    text, trmask = strip_images(batch, rmask, VisionTokens.from_model(student))
    with pytest.raises(ValueError, match="no image placeholder"):
        distill_logits(student, teacher, text, trmask)
    distill_logits(student, teacher, text, trmask, expect_images=False)  # allowed when asked for
    # Response tokens differing between the passes.
    bad = dict(text)
    bad["input_ids"] = torch.where(trmask, (text["input_ids"] + 1) % len(proc.tokenizer), text["input_ids"])
    with pytest.raises(ValueError, match="response tokens differ"):
        distill_logits(student, teacher, batch, rmask, text_batch=bad, text_response_mask=trmask)
    # Teacher with another vocabulary.
    other = tiny_processor(student.config.model_type, WORDS + ["extra", "words"])
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        distill_logits(student, tiny_vlm(student.config.model_type, other), batch, rmask)
    # Processor and model that disagree on the placeholder id / vocabulary.
    moved = tiny_vlm(student.config.model_type, proc)
    moved.config.image_token_id = proc.tokenizer.convert_tokens_to_ids("red")
    with pytest.raises(ValueError, match="image placeholder"):
        check_processor(proc, moved)
    with pytest.raises(ValueError, match="disagree on the vision placeholder"):
        distill_logits(moved, teacher, batch, rmask)
    coarse = tiny_processor(student.config.model_type, WORDS, patch_size=16, pixels=64 * 64)
    prompts = coarse(text=coarse.apply_chat_template([_msgs(c) for c in CONVS], add_generation_prompt=True),
                     images=images, return_tensors="pt", padding=True)
    big, big_mask = rollout_batch(prompts, torch.cat([prompts["input_ids"], batch["input_ids"][:, -2:]], 1), -1)
    with pytest.raises(ValueError, match="mismatched processor and model"):
        distill_logits(student, teacher, big, big_mask)
    with pytest.raises(ValueError, match="vocabulary"):
        check_processor(other, student)
    check_processor(proc, student)
    # A sampled response holding a vision placeholder; a mask with padding inside a row.
    hole = dict(batch)
    hole["attention_mask"] = batch["attention_mask"].clone()
    hole["attention_mask"][:, -3] = 0
    hole["attention_mask"][:, -1] = 1
    with pytest.raises(ValueError, match="padding inside"):
        distill_logits(student, teacher, hole, rmask)
    placeholder = dict(batch)
    placeholder["input_ids"] = torch.where(rmask, VisionTokens.from_model(student).image, batch["input_ids"])
    with pytest.raises(ValueError, match="placeholder"):
        distill_logits(student, teacher, placeholder, rmask)
    with pytest.raises(ValueError, match="response_mask"):
        distill_logits(student, teacher, batch, rmask[:, 1:])
