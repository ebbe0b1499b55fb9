"""Suite 2 — gradient steering: Gram + combine (vgs.gram, vgs.combine) against the flatten/concat
approach of PCGrad / LibMTL and a torch._foreach_* composition.

Each impl takes k = 2 gradient lists (std, vis) over the same parameters and writes the exact VGS
combination η·(g_std + γ·g_vis) (Eq. 15) into an output list (`.grad` in training), returning the
Gram matrix. Parameter lists are the real parameter shapes of a Qwen3-VL-2B-like model (read from a
transformers config on the meta device: no weights, no download), scaled down by an integer factor
on CPU, or the issue-3 goal case: ~120 M parameters in 25 tensors.

Minimal bytes moved: the Gram pass reads the k lists once, the combine pass reads them again and
writes the output: (2k + 1)·P·e (P parameters of element size e).
"""
from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import torch

from . import baselines as B
from .harness import Case, Impl, tolerance

GAMMA = 2.0
K = 2


def qwen3_vl_2b_shapes(scale: int = 1) -> List[Tuple[int, ...]]:
    """Parameter shapes of Qwen3-VL-2B (2.13 B parameters, 625 tensors) with widths and depths
    divided by `scale` (head dims kept), from transformers' Qwen3VLForConditionalGeneration."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    depth = max(1, 24 // scale)
    cfg = Qwen3VLConfig(
        text_config=dict(hidden_size=2048 // scale, intermediate_size=6144 // scale,
                         num_hidden_layers=max(1, 28 // scale), num_attention_heads=max(1, 16 // scale),
                         num_key_value_heads=max(1, 8 // scale), head_dim=128,
                         vocab_size=151936 // scale, tie_word_embeddings=True),
        vision_config=dict(depth=depth, hidden_size=1024 // scale, intermediate_size=4096 // scale,
                           num_heads=max(1, 16 // scale), out_hidden_size=2048 // scale, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2,
                           deepstack_visual_indexes=sorted({depth * i // 24 for i in (5, 11, 17)})),
        tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(cfg)
    return [tuple(p.shape) for p in model.parameters()]


def goal_shapes() -> List[Tuple[int, ...]]:
    """The issue-3 goal case: ~120 M parameters in 25 tensors (24 odd-width matrices + a norm)."""
    return [(2048, 2441)] * 24 + [(2048,)]


def case(name: str, shapes: Sequence[Tuple[int, ...]], dtype: torch.dtype, device: torch.device,
         seed: int = 0) -> Case:
    import vgs_kernels as vgs

    g = torch.Generator(device=device).manual_seed(seed)
    grads = [[torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype) for s in shapes]
             for _ in range(K)]
    for x in grads[1]:  # the visual gradient partly aligned with the standard one, as in training
        x.mul_(0.5)
    for x, y in zip(grads[1], grads[0]):
        x.add_(y, alpha=0.5)
    out = [torch.empty(s, device=device, dtype=dtype) for s in shapes]
    numel = sum(x.numel() for x in out)
    nbytes = (2 * K + 1) * numel * out[0].element_size()

    weights = torch.tensor([1.0, GAMMA], device=device)

    def fused(_):
        G = vgs.gram(grads)
        vgs.combine(out, grads, vgs.policies.vgs(G, weights))
        return {"G": G, "out": out}

    def flatten(_):
        return {"G": B.flatten_gram_combine(out, grads, GAMMA), "out": out}

    def foreach(_):
        return {"G": B.foreach_gram_combine(out, grads, GAMMA), "out": out}

    def exact(_):
        """float64 per tensor: the reference everything is checked against (untimed)."""
        G = torch.tensor([[sum(float((x.double() * y.double()).sum()) for x, y in zip(gi, gj))
                           for gj in grads] for gi in grads], dtype=torch.float64, device=device)
        c = B.vgs_coefficients(G, GAMMA)
        return {"G": G, "out": [(c[0] * x.double() + c[1] * y.double()) for x, y in zip(*grads)]}

    ref = "float64 reference"
    impls = [Impl("vgs gram+combine", fused, reference=ref, bytes_moved=nbytes),
             Impl("flatten/concat", flatten, reference=ref, bytes_moved=nbytes, strict=False),
             Impl("foreach", foreach, reference=ref, bytes_moved=nbytes, strict=False),
             Impl(ref, exact, timed=False)]
    params = {"params": name, "P": numel, "tensors": len(out), "dtype": str(dtype).replace("torch.", "")}
    # The baselines are timed whatever their error: in fp32 a flattened matmul over 10^8 elements
    # is off by a few % (the max_rel_err column shows it); vgs.gram must stay within 2e-3.
    return Case("steering", params, impls, baselines=["flatten/concat", "foreach"],
                tolerance=max(tolerance(dtype), 2e-3))


def cases(sets: Sequence[Tuple[str, Sequence[Tuple[int, ...]]]], dtype: torch.dtype,
          device: torch.device) -> Iterator[Case]:
    for name, shapes in sets:
        yield case(name, shapes, dtype, device)
