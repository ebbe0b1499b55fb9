"""A synthetic visual question-answering task whose answers need the image.

Each 32x32 image holds one to three copies of a shape (square, ring or cross) of one of four
colours, each in its own quadrant, on a noisy dark background. Three question types:

    what colour is it ?      ->  it is red
    what shape is it ?       ->  it is a ring
    how many are there ?     ->  there is one | there are two | there are three

"it is", "a", "there" are predictable from the question (low visual dependency); the colour, shape
and count words (and is/are) need the image (high visual dependency). Chance accuracy: 1/4, 1/3, 1/3.
``sample(..., preamble=True)`` prefixes every answer with a fixed stand-in for a reasoning preamble,
the question's first two words (``what colour it is red``): more low-VDS tokens per answer, as in
the long responses of the paper's setting.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "ring", "cross")
COUNTS = ("one", "two", "three")
QUESTIONS = {"colour": "what colour is it ?", "shape": "what shape is it ?", "count": "how many are there ?"}
SIZE = 32
PREAMBLE = {kind: " ".join(q.split()[:2]) for kind, q in QUESTIONS.items()}
PREAMBLE_TOKENS = 2
WORDS = sorted({w for q in QUESTIONS.values() for w in q.split()} | set(COLOURS) | set(SHAPES) | set(COUNTS)
               | {"it", "is", "a", "there", "are"})


@dataclass
class Example:
    image: Image.Image
    kind: str  # question type: colour | shape | count
    question: str
    answer: str


def draw(colour: str, shape: str, count: int, rng: np.random.Generator) -> Image.Image:
    """A SIZE x SIZE RGB image with ``count`` copies of ``shape`` in ``colour``, in distinct quadrants."""
    img = Image.fromarray(rng.integers(0, 40, (SIZE, SIZE, 3), dtype=np.uint8))
    pen, half, fill = ImageDraw.Draw(img), SIZE // 2, COLOURS[colour]
    for q in rng.permutation(4)[:count]:
        r = int(rng.integers(5, 7))  # half-width of the shape
        cy = half * (q // 2) + int(rng.integers(r, half - r + 1))
        cx = half * (q % 2) + int(rng.integers(r, half - r + 1))
        if shape == "square":
            pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "ring":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=2)
        else:
            pen.rectangle([cx - r, cy - 1, cx + r, cy + 1], fill=fill)
            pen.rectangle([cx - 1, cy - r, cx + 1, cy + r], fill=fill)
    return img


def blank() -> Image.Image:
    """The image with nothing in it: what a student that ignores the image effectively sees."""
    return Image.new("RGB", (SIZE, SIZE), (20, 20, 20))


def sample(n: int, rng: np.random.Generator, preamble: bool = False) -> list[Example]:
    out = []
    for _ in range(n):
        colour, shape, count = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), int(rng.integers(1, 4))
        kind = str(rng.choice(list(QUESTIONS)))
        answer = {"colour": f"it is {colour}", "shape": f"it is a {shape}",
                  "count": f"there {'is' if count == 1 else 'are'} {COUNTS[count - 1]}"}[kind]
        answer = f"{PREAMBLE[kind]} {answer}" if preamble else answer
        out.append(Example(draw(colour, shape, count, rng), kind, QUESTIONS[kind], answer))
    return out


def prompts(processor, examples: list[Example], images: list[Image.Image] | None = None) -> dict:
    """Left-padded generation prompts (chat template, one image per example)."""
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": e.question}]}]
            for e in examples]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return processor(text=text, images=images or [e.image for e in examples], return_tensors="pt", padding=True)


def supervised_batch(processor, examples: list[Example], images: list[Image.Image] | None = None
                     ) -> tuple[dict, torch.Tensor]:
    """Prompt + gold answer + end of turn, and the mask of the answer tokens (for cross-entropy)."""
    batch = prompts(processor, examples, images)
    answers = processor.tokenizer([e.answer + " <|im_end|>" for e in examples], add_special_tokens=False,
                                  return_tensors="pt", padding=True, padding_side="right")
    batch = dict(batch)
    pad = answers["attention_mask"]
    batch["input_ids"] = torch.cat([batch["input_ids"], answers["input_ids"]], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], pad], 1)
    batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(pad)], 1)
    mask = torch.cat([torch.zeros_like(batch["attention_mask"][:, :-pad.shape[1]]), pad], 1).bool()
    return batch, mask


@torch.no_grad()
def accuracy(model, processor, examples: list[Example], images: list[Image.Image] | None = None,
             batch_size: int = 64, max_new_tokens: int = 7) -> dict[str, float]:
    """Greedy-decoding exact-match accuracy, overall and per question type."""
    from vgs_kernels.vlm import VisionTokens

    suppress = VisionTokens.from_model(model).ids().tolist()
    hits = {k: [] for k in QUESTIONS}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = prompts(processor, chunk, None if images is None else images[i:i + batch_size])
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=suppress,
                             pad_token_id=processor.tokenizer.pad_token_id)
        texts = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for e, t in zip(chunk, texts):
            hits[e.kind].append(" ".join(t.split()) == e.answer)
    acc = {k: float(np.mean(v)) for k, v in hits.items() if v}
    acc["all"] = float(np.mean([h for v in hits.values() for h in v]))
    return acc
