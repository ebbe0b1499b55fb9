"""VGSDistillationTrainer end to end on non-Qwen families, with BPE tokenizers like the published ones."""
import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from vgs_kernels.integrations.trl import VGSDistillationTrainer  # noqa: E402
from vgs_kernels.integrations.trl.base import lm_heads  # noqa: E402
from vgs_kernels.testing import tiny_processor, tiny_vlm  # noqa: E402
from vgs_kernels.vlm import VisionTokens  # noqa: E402

from helpers.trl import config, prompts, task  # noqa: E402

SIZES = dict(hidden=32, layers=1, heads=4, vision_hidden=16)


@pytest.mark.parametrize("family", ["llava_next", "gemma3", "idefics3"])
def test_trainer_runs_with_vision_ids_suppressed(family, tmp_path):
    """One optimizer step of exact VGS; the student prefers every vision id (a logit bias in generation) and
    still samples none of them; the student moves, the teacher does not."""
    proc = tiny_processor(family, task.WORDS, tokenizer="bpe")
    student, teacher = tiny_vlm(family, proc, seed=0, **SIZES), tiny_vlm(family, proc, seed=1, **SIZES)
    vision = VisionTokens.from_model(student, proc).ids()
    bias = torch.zeros(student.get_output_embeddings().weight.shape[0])
    bias[vision] = 100.0  # generation goes through the LM head's forward; TRL's loss reads its weight
    student.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)
    ex = task.sample(4, np.random.default_rng(0))
    ds = prompts(ex)
    args = config(tmp_path, gradient_accumulation_steps=1, max_steps=1, max_completion_length=4, steering_policy="vgs")
    trainer = VGSDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                     processing_class=proc)
    assert set(vision.tolist()) <= set(trainer.generation_kwargs["suppress_tokens"])
    completions = []
    orig = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: completions.append(out := orig(inputs)) or out
    before = [p.detach().clone() for p in student.parameters()]
    t_before = [p.detach().clone() for p in teacher.parameters()]
    trainer.train()
    ids = torch.cat([c["completion_ids"][c["completion_mask"].bool()] for c in completions])
    assert ids.numel() and not torch.isin(ids, vision).any()
    log = trainer.state.log_history[0]
    assert np.isfinite(log["loss"]) and np.isfinite(log["vgs/eta"]) and log["vgs/exact"] == 1
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), before))
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), t_before))


def test_heads_take_the_transform_the_forward_applies():
    """Gemma-3 with final_logit_softcapping in its text config: Gemma3ForConditionalGeneration never applies it,
    so neither do the trainers' losses (they read the config before: a softcap the model does not have)."""
    proc = tiny_processor("gemma3", task.WORDS, tokenizer="bpe")
    student, teacher = (tiny_vlm("gemma3", proc, seed=i, **SIZES) for i in (0, 1))
    for m in (student, teacher):
        m.config.get_text_config().final_logit_softcapping = 7.0
    heads = lm_heads(student, teacher)
    assert heads.softcap == (None, None) and heads.logit_scale == (1.0, 1.0)
    assert heads.w_s is student.get_output_embeddings().weight and heads.w_t is teacher.get_output_embeddings().weight
