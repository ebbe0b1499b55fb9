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


# The README's families table is generated with the versions constraints.txt pins (what make install gives).
REGENERATE_TABLE = ".venv/bin/python -m vgs_kernels.testing README.md"
MOVE_PINS = f"make lock && make install && {REGENERATE_TABLE}"


def _repo_file(name):
    import os
    return os.path.join(os.path.dirname(__file__), "..", "..", name)


def _pins():
    """constraints.txt as {normalised name: version} ({} where there is none, e.g. an unpacked sdist)."""
    import os
    import re
    if not os.path.exists(_repo_file("constraints.txt")):
        return {}
    pins = {}
    for line in open(_repo_file("constraints.txt")):
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_readme_table_names_the_pinned_transformers():
    """The table's "Checked against transformers X" is the transformers of constraints.txt."""
    import re
    from vgs_kernels.testing import TABLE_START
    pinned = _pins().get("transformers")
    if pinned is None:
        pytest.skip("no constraints.txt pinning transformers")
    readme = open(_repo_file("README.md")).read()
    assert TABLE_START in readme
    said = re.search(r"Checked against transformers (\S+) ", readme.split(TABLE_START, 1)[1])
    assert said, "README's families table does not say which transformers it was checked against"
    assert said.group(1) == pinned, (
        f"README's families table was generated with transformers {said.group(1)} but constraints.txt pins "
        f"transformers {pinned}: make install && {REGENERATE_TABLE}")


def test_readme_families_table_is_generated():
    """README's table of supported families is families_table(), under the pinned transformers/tokenizers.

    Regenerate: python -m vgs_kernels.testing README.md. Under other versions (make test-latest) it xfails,
    naming them, instead of showing a diff that only says the version moved."""
    import tokenizers
    import transformers

    from vgs_kernels.testing import TABLE_END, TABLE_START, families_table
    pins = _pins()
    drift = [f"{mod.__name__} {mod.__version__} is installed, constraints.txt pins {pins[mod.__name__]}"
             for mod in (transformers, tokenizers) if mod.__name__ in pins and mod.__version__ != pins[mod.__name__]]
    if drift:
        pytest.xfail(f"README's families table is checked against the pinned versions, and {'; '.join(drift)}. "
                     f"To move the pins to these releases: {MOVE_PINS} (then make test); to test the pins: make install")
    readme = open(_repo_file("README.md")).read()
    assert TABLE_START in readme
    assert readme.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0] == families_table(), \
        f"README's families table is stale: {REGENERATE_TABLE}"


def test_every_spec_row_has_a_tested_case():
    from vgs_kernels.testing import CASES
    from vgs_kernels.vlm import FAMILY_SPECS
    assert set(FAMILY_SPECS) == {family for family, _ in CASES.values()}


def test_trl_prompts_render_like_trl():
    """Prompts as trl.DistillationTrainer holds them (string contents, or prepared with image entries) give the
    rows TRL's own rendering gives once the image entries are gone; LLaVA's template needs list contents."""
    from trl.data_utils import prepare_multimodal_messages

    llava = tiny_processor("llava", WORDS)
    raw = [[{"role": "user", "content": "what colour is the square ?"}], [{"role": "user", "content": "left or right"}]]
    prepared = [prepare_multimodal_messages(p, images=[object()] * n) for p, n in zip(raw, [1, 2])]
    resp = [torch.tensor([3, 4]), torch.tensor([5])]
    for proc in (llava, tiny_processor("qwen2_vl", WORDS)):
        from_raw = text_only_batch(proc, raw, resp)
        from_prepared = text_only_batch(proc, prepared, resp)
        trl_text = proc.apply_chat_template([prepare_multimodal_messages(p) for p in raw], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        for i in range(2):
            for batch, rmask in (from_raw, from_prepared):
                keep = batch["attention_mask"][i].bool() & ~rmask[i]
                assert batch["input_ids"][i][keep].tolist() == list(trl_text[i])


def test_coverage_command_lists_the_installed_families():
    import subprocess
    import sys

    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as names

    from vgs_kernels.testing import CASES, coverage
    cov = coverage()
    assert set(cov) == set(names) and {f for f, _ in CASES.values()} <= {m for m, s in cov.items() if s == "tested"}
    out = subprocess.run([sys.executable, "-m", "vgs_kernels.testing", "--coverage"], capture_output=True, text=True,
                         check=True).stdout
    assert f"{len(names)} image-text-to-text model types" in out
    for status in ("tested", "covered", "lacks"):
        listed = next(line for line in out.splitlines() if line.startswith(status)).split(": ", 1)[1].split()
        assert listed == [m for m, s in cov.items() if s == status]
