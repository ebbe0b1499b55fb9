"""The tiny Qwen2 student, its global batch split by rank and its (std, vis) losses: what the DDP/FSDP2
suite (test_distributed.py) and the DeepSpeed suite (test_deepspeed.py) steer, on WORLD ranks and in one
process on the concatenated batch."""
from __future__ import annotations

import torch
from torch import nn

WORLD = 2
PER_RANK = 2       # sequences per rank and micro-batch
PROMPT, LENGTH, RESPONSE, VOCAB = 3, 9, 4, 61
STEPS = 3
POLICY_KW = {"vgs": {}, "fixed": {"eta": 0.41}, "auto": {"every": 2}, "project": {}, "sum": {}}


class Student(nn.Module):
    """A tiny Qwen2 causal LM (from a config, no download); optionally an extra head that only
    sequences flagged `extra` use, and a parameter no sequence uses."""

    def __init__(self, tied: bool = False, heads: bool = False, seed: int = 0):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM
        torch.manual_seed(seed)
        self.lm = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied))
        self.extra = nn.Linear(VOCAB, VOCAB, bias=False) if heads else None
        self.never = nn.Linear(2, 2) if heads else None

    def forward(self, ids, extra=None):
        s = self.lm(input_ids=ids).logits[:, -RESPONSE:]
        if self.extra is not None and extra is not None and bool(extra.any()):
            s = s + self.extra(s) * extra[:, None, None]
        return s


def rank_rows(rank: int) -> slice:
    """Rank ``rank``'s rows of the global batch."""
    return slice(rank * PER_RANK, (rank + 1) * PER_RANK)


def batch(seed: int, step: int, micro: int, rows: slice):
    """One micro-batch of the global batch (WORLD * PER_RANK sequences); `rows` picks a rank's part.
    (ids, ids without the 'image' prompt, teacher logits a and b, mask, extra-head flags)"""
    g = torch.Generator().manual_seed(1000 * seed + 10 * step + micro)
    n = WORLD * PER_RANK
    ids = torch.randint(VOCAB, (n, LENGTH), generator=g)
    a, b = (2 * torch.randn(n, RESPONSE, VOCAB, generator=g) for _ in range(2))
    mask = torch.rand(n, RESPONSE, generator=g) > 0.25
    mask[:, 0] = True  # every sequence has a valid token: the per-sequence mean is well defined
    extra = (torch.arange(n) < PER_RANK).float()  # rank 0's sequences use the extra head
    return ids[rows], ids[rows, PROMPT:], a[rows], b[rows], mask[rows], extra[rows]


def losses(model, loss_fn, data, scale=1.0):
    ids, ids_text, a, b, mask, extra = data
    s = model(ids, extra)
    u = model(ids_text, extra)  # the text-only pass: a second forward of the same (DDP) model
    out = loss_fn(s, u, a, b, mask)
    return {"std": out.std * scale, "vis": out.vis * scale}
