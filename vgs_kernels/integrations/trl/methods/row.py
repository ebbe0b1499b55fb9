"""What a row of the method table is (vgs_kernels/integrations/trl/methods/__init__.py), and the names
the rows and the trainers share."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple

from torch import Tensor

# The hidden-state passes a row may ask for: "student" / "teacher" with the image, "student_text" /
# "teacher_text" on the text-only batch (built with the rollout only when a row asks for it).
PASSES = ("student", "student_text", "teacher", "teacher_text")
# The vision inputs of a TRL generation batch that go to the model's forward with the image (not
# vgs_kernels.vlm.VISION_KEYS, which lists what the id-only text-only path drops).
FORWARD_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                "token_type_ids", "mm_token_type_ids", "image_position_ids")
# The text-side inputs of the text-only batch (kept under ``text_<key>`` in the generation batch).
TEXT_KEYS = ("token_type_ids", "mm_token_type_ids")


class Heads(NamedTuple):
    """The two LM heads as the losses take them: weights [V_s, H_s], [V_t, H_t], biases or None, the
    (student, teacher) logit_scale and softcap pairs their forwards apply (vgs_kernels.LMHead), and
    vocab_size: None when both heads have the same rows, else the tokenizer's vocabulary (heads padded
    differently beyond it, as Qwen2.5-VL-7B's and 3B's: the losses compare the first vocab_size ids)."""

    w_s: Tensor
    b_s: Optional[Tensor]
    w_t: Tensor
    b_t: Optional[Tensor]
    logit_scale: Tuple[float, float]
    softcap: Tuple[Optional[float], Optional[float]]
    vocab_size: Optional[int] = None


LossResult = Tuple[Tensor, Optional[Tensor], Any]


class Method(NamedTuple):
    """A row of METHODS:

    * ``passes``: the hidden-state passes of the loss (with gradient for the student's), from PASSES;
    * ``steered``: whether Trainer's backward goes through the GradientSteering hook (created with the
      optimizer) or is Accelerate's plain one;
    * ``build(args) -> loss_fn``: the loss module, configured once (``trainer.loss_fn``);
    * ``loss(trainer, inputs, hidden, heads, mask, num_items_in_batch) -> (total, entropy_sum, out)``:
      inputs is the micro-batch (with the row's ``rollouts`` keys), hidden is {pass name: [B, C, H] on
      the heads' device}, heads a :class:`Heads`, mask the [B, C] loss mask; entropy_sum is the student
      entropy TRL logs (None: not computed, TRL's ``entropy`` metric is dropped), out what ``log`` and,
      for a steered row, the hook's ``backward`` get;
    * ``log(metrics, out, mask, num_items_in_batch)``: the row's own metrics into TRL's ``_metrics``;
    * ``rollouts(trainer, inputs, out)``: extra per-rollout tensors added to the generation batch ``out``
      (dict of [B_gen, ...] tensors, split and shuffled into micro-batches by TRL with the rest): what
      must see the whole generation batch or is computed once per rollout; None: nothing;
    * ``reverse_kl_only``: why the row trains on the reverse KL only (TRL's ``beta`` must be 1), or None
      when it takes every ``beta`` (the config checks it).
    """

    passes: Tuple[str, ...]
    steered: bool
    build: Callable[[Any], Any]
    loss: Callable[..., LossResult]
    log: Callable[[dict, Any, Tensor, Any], None]
    rollouts: Optional[Callable[[Any, list, dict], None]] = None
    reverse_kl_only: Optional[str] = None

    @property
    def text_only(self) -> bool:
        """Whether the row needs the text-only batch (and so an image in every prompt)."""
        return bool({"student_text", "teacher_text"} & set(self.passes))
