"""VLM plumbing: from a transformers VLM batch to the four response-logit tensors of the decomposed loss.

On-policy distillation scores the student's response tokens four times: student and teacher, each with
the image and text-only (the same chat prompt with the image removed). Two ways to get the text-only batch:

- from the chat messages (:func:`text_only_batch`, ``messages.py``): the processor's own chat template
  renders the prompt without its image entries and the response tokens are appended — exact by
  construction, for every processor;
- from token ids only (:func:`strip_images`, ``ids.py``), for loops that kept only ``input_ids``:
  the vision span is cut out as the family's marker spec says (``specs.py``, resolved into ids by ``tokens.py``).

:func:`distill_logits` runs the four passes (response positions only) and checks that the image and
text-only batches score the same response tokens.
"""
from vgs_kernels.vlm.head import LMHead, logit_transform
from vgs_kernels.vlm.messages import text_only_batch, without_images
from vgs_kernels.vlm.ids import rollout_batch, strip_images
from vgs_kernels.vlm.plumbing import (VISION_KEYS, DistillLogits, check_processor, distill_logits, response_logits,
                                      response_positions)
from vgs_kernels.vlm.specs import FAMILY_SPECS, FamilySpec, family_spec, register_family
from vgs_kernels.vlm.tokens import VisionTokens

__all__ = ["DistillLogits", "FAMILY_SPECS", "FamilySpec", "LMHead", "logit_transform", "VISION_KEYS", "VisionTokens", "check_processor",
           "distill_logits", "family_spec", "register_family", "response_logits", "response_positions",
           "rollout_batch", "strip_images", "text_only_batch", "without_images"]
