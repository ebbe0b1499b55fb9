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


# ----------------------------------------------------------------------------- per-tensor overhead


def overhead(n_tensors: int = 700, numel: int = 4096, k: int = K, repeats: int = 200,
             threads: int = 1) -> dict:
    """Per-tensor cost of a gram / combine call (issue 14): n_tensors tensors of `numel` fp32
    elements against one tensor of n_tensors * numel, calls interleaved; (many - one) / n_tensors,
    from the medians and from the minima of `repeats` calls each. "before" is the previous call
    path (Python checks and flat views per tensor, then the op), kept here for the comparison."""
    import time

    import vgs_kernels as vgs
    from vgs_kernels.ops.combine import _check
    from vgs_kernels.ops.gram import check_lists, split_fast

    def before_gram(lists):
        lists, _ = check_lists(lists)
        _, fast, _ = split_fast(list(zip(*lists)))
        return torch.ops.vgs_kernels.gram([col[i] for i in range(k) for col in fast], k)

    def before_combine(out, lists, c):
        out, lists, c, _ = _check(out, lists, c)
        _, fast, _ = split_fast([[lst[j] for lst in lists] + [out[j]] for j in range(len(out))])
        torch.ops.vgs_kernels.combine_([col[-1] for col in fast], [col[i] for i in range(k) for col in fast], c)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    many = [[torch.randn(numel, generator=g) for _ in range(n_tensors)] for _ in range(k)]
    one = [[torch.randn(numel * n_tensors, generator=g)] for _ in range(k)]
    out_many, out_one = list(many[0]), list(one[0])  # in place into component 0, as the hook does
    c = torch.tensor([1.0] + [0.0] * (k - 1))        # leaves the data unchanged call after call
    calls = {
        "gram": (lambda: vgs.gram(many), lambda: vgs.gram(one)),
        "combine": (lambda: vgs.combine(out_many, many, c), lambda: vgs.combine(out_one, one, c)),
        "gram (before)": (lambda: before_gram(many), lambda: before_gram(one)),
        "combine (before)": (lambda: before_combine(out_many, many, c), lambda: before_combine(out_one, one, c)),
    }
    times = {(name, which): [] for name in calls for which in (0, 1)}
    try:
        for r in range(repeats + 2):
            for name, fns in calls.items():
                for which in (0, 1):
                    t0 = time.perf_counter()
                    fns[which]()
                    if r >= 2:
                        times[(name, which)].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    out = {}
    for name in calls:
        many_t, one_t = sorted(times[(name, 0)]), sorted(times[(name, 1)])
        # per round: the two calls ran back to back, so their difference sees the same load
        rounds = sorted((m - o) / n_tensors * 1e6 for m, o in zip(times[(name, 0)], times[(name, 1)]))
        med = lambda xs: xs[len(xs) // 2]  # noqa: E731
        q = lambda xs, f: xs[round(f * (len(xs) - 1))]  # noqa: E731
        out[name] = dict(many_ms=med(many_t) * 1e3, one_ms=med(one_t) * 1e3,
                         us_per_tensor_median=(med(many_t) - med(one_t)) / n_tensors * 1e6,
                         us_per_tensor_min=(many_t[0] - one_t[0]) / n_tensors * 1e6,
                         us_per_tensor_p20=q(rounds, 0.2), us_per_tensor_p80=q(rounds, 0.8))
    return out


def main(argv=None) -> None:
    import argparse
    import os

    p = argparse.ArgumentParser(description="gram/combine per-tensor overhead (issues 14, 31)")
    p.add_argument("--tensors", type=int, default=700)
    p.add_argument("--numel", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    print(f"uptime: {os.popen('uptime').read().strip()}")
    res = overhead(args.tensors, args.numel, K, args.repeats, args.threads)
    print(f"{args.tensors} tensors x {args.numel} fp32 vs 1 x {args.tensors * args.numel}, k = {K}, "
          f"{args.threads} thread(s), {args.repeats} interleaved calls each\n")
    print("| call | median ms (many) | median ms (one) | µs / tensor (medians) | µs / tensor (minima) "
          "| µs / tensor per round, p20-p80 |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['many_ms']:.3f} | {r['one_ms']:.3f} | {r['us_per_tensor_median']:.2f} | "
              f"{r['us_per_tensor_min']:.2f} | {r['us_per_tensor_p20']:.2f}-{r['us_per_tensor_p80']:.2f} |")
    print(f"\nuptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
