"""text_only_batch: the text-only batch from chat messages (exact by construction), its layouts and errors."""
import pytest
import torch

from vgs_kernels.testing import tiny_processor
from vgs_kernels.vlm import text_only_batch, without_images

WORDS = "what colour is the square left or right ? red green blue it a".split()
PROMPTS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the square ?"}]}],
    [{"role": "user", "content": "what colour ?"}],
    [{"role": "system", "content": [{"type": "text", "text": "it"}]},
     {"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": "left or right"},
                                  {"type": "image"}]}],
]


@pytest.fixture(scope="module")
def proc():
    return tiny_processor("qwen2_vl", WORDS)


def _rendered(proc, i):
    text = proc.apply_chat_template([without_images(PROMPTS[i])], add_generation_prompt=True)[0]
    return proc.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("side", ["left", "right", "split"])
@pytest.mark.parametrize("padded", [False, True])
def test_rows_are_template_without_image_then_response(proc, side, padded):
    tok = proc.tokenizer
    responses = [tok.convert_tokens_to_ids(r.split()) for r in ["it is red <|im_end|>", "blue", "left <|im_end|>"]]
    if padded:  # TRL's layout: right-padded [B, C] with a 0/1 mask
        C = max(map(len, responses))
        ids = torch.tensor([r + [tok.pad_token_id] * (C - len(r)) for r in responses])
        mask = torch.tensor([[1] * len(r) + [0] * (C - len(r)) for r in responses])
        batch, rmask = text_only_batch(proc, PROMPTS, ids, mask, padding_side=side)
    else:
        batch, rmask = text_only_batch(proc, PROMPTS, [torch.tensor(r) for r in responses], padding_side=side)
    attn = batch["attention_mask"].bool()
    for i, resp in enumerate(responses):
        row = batch["input_ids"][i]
        assert row[attn[i] & ~rmask[i]].tolist() == _rendered(proc, i)
        assert row[rmask[i]].tolist() == resp
    assert not (rmask & ~attn).any()
    assert set(batch) == {"input_ids", "attention_mask", "mm_token_type_ids"} and not batch["mm_token_type_ids"].any()
    if side == "left":
        assert attn[:, -1].all()
    if side == "right":
        assert attn[:, 0].all()
    if side == "split" and padded:  # the completion block is exactly the given one
        C = ids.shape[1]
        assert torch.equal(batch["input_ids"][:, -C:], ids) and torch.equal(rmask[:, -C:], mask.bool())
        assert attn[:, -C - 1].all()  # prompts end right before the block


def test_input_errors(proc):
    r = [torch.tensor([1])] * 3
    with pytest.raises(ValueError, match="padding_side"):
        text_only_batch(proc, PROMPTS, r, padding_side="middle")
    with pytest.raises(ValueError, match="list of conversations"):
        text_only_batch(proc, PROMPTS[0], r)
    with pytest.raises(ValueError, match="rows"):
        text_only_batch(proc, PROMPTS, r[:2])
    with pytest.raises(ValueError, match="completion_mask"):
        text_only_batch(proc, PROMPTS, torch.ones(3, 2, dtype=torch.long), torch.ones(3, 3))
    # The caller's messages are not modified.
    assert PROMPTS[0][0]["content"][0] == {"type": "image"}
