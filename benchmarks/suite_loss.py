"""Suite 1 — the loss: fused decomposed KL against eager and torch.compile'd decomposed (the
four-term loss in plain torch: the peer a user would write), eager / compiled / fused monolithic
(and Liger-Kernel's reverse-KL JSD on CUDA when installed).

Every impl computes, from [N, V] logits, the same scalar (masked token mean of Std + γ·Vis + λ·Lang
for the decomposed impls, of Std for the monolithic ones) and, in `bwd` / `fwdbwd` mode, the
gradients for the student rows. Modes: `fwd` (forward with autograd recording, as in training),
`bwd` (backward only; the forward runs untimed before it), `fwdbwd` (both).

Minimal bytes moved (the bandwidth column, `vgs_kernels.ops.decomposed_kl.min_bytes`): the forward
must read every logit row once; the backward must read them again and write each gradient once.
Decomposed: fwd 4·NV·e, bwd 4·NV·e + 2·NV·e; monolithic: fwd 2·NV·e, bwd 2·NV·e + NV·e (e =
element size of the logits' dtype), plus the per-row statistics (negligible).

`python -m benchmarks.suite_loss` (from the repository root) runs the goal case of issues 15 and 31
alone and prints the goal ratios with their spread: compiled four-term ÷ fused, fused ÷ its own
monolithic mode, fused ÷ fastest monolithic, fused peak ÷ compiled four-term peak (run it once with
THP_MEM_ALLOC_ENABLE=1 and once without).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from . import baselines as B
from .harness import Case, Impl, tolerance

MODES = ("fwd", "bwd", "fwdbwd")
N_IMPLS = 6  # per mode, without the optional compiled / Liger impls (4 timed + 2 chunked fallbacks)
N_COMPILED = 2  # compiled four-term and compiled monolithic (per mode, unless compile=False)
BASELINES = ["compiled decomposed", "eager decomposed", "eager mono", "compiled mono"]


def make_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Student / teacher logits with realistic structure (the teacher near the student; the
    text-only rows near the image rows), and an all-valid mask."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    s = 2 * randn(n, v)
    u = (s + randn(n, v)).to(dtype)
    a = s + randn(n, v)
    b = (a + randn(n, v)).to(dtype)
    s, a = s.to(dtype), a.to(dtype)
    s.requires_grad_(True)
    u.requires_grad_(True)
    return s, u, a, b, torch.ones(n, dtype=torch.bool, device=device)


def _autograd_impl(name: str, forward: Callable[[], Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
                   leaves: Dict[str, torch.Tensor], mode: str, reference: Optional[str],
                   bytes_fwd: int, bytes_bwd: int) -> Impl:
    """An impl from `forward() -> (loss, {term name: per-row values})`, timed in `mode`.

    Its step returns a dict of named outputs (loss, terms, gradients "d<leaf>") for the check.
    """

    def setup():
        for x in leaves.values():
            x.grad = None
        return forward()[0] if mode == "bwd" else None

    def step(loss):
        out: Dict[str, torch.Tensor] = {}
        if mode != "bwd":
            loss, terms = forward()
            out = {"loss": loss, **terms}
        if mode != "fwd":
            loss.backward()
            out.update({"d" + k: x.grad for k, x in leaves.items()})
        return out

    nbytes = {"fwd": bytes_fwd, "bwd": bytes_bwd, "fwdbwd": bytes_fwd + bytes_bwd}[mode]
    return Impl(name, step, setup, reference=reference, bytes_moved=nbytes)


def _chunked_impl(name: str, terms_fn: Callable, leaves: Dict[str, torch.Tensor], mask: torch.Tensor,
                  loss_fn: Callable, rows: int = 1024) -> Impl:
    """Check-only stand-in for an eager reference that ran out of memory: the same eager code on
    `rows` positions at a time, backward per chunk (loss weights of the whole batch)."""
    names = ("std", "vis", "lang", "vds")

    def step(_):
        for x in leaves.values():
            x.grad = None
        n, total, terms = mask.shape[0], 0.0, []
        weight = mask.float().sum().clamp_min(1.0)
        for i in range(0, n, rows):
            sl = slice(i, i + rows)
            t = terms_fn(sl)
            loss = loss_fn(t, sl) * (mask[sl].float().sum().clamp_min(1.0) / weight)
            loss.backward()
            total = total + loss.detach()
            terms.append([x.detach() for x in t])
        out = {k: torch.cat(v) for k, v in zip(names, zip(*terms))}
        return {"loss": total, **out, **{"d" + k: x.grad for k, x in leaves.items()}}

    return Impl(name, step, timed=False, fallback_for=name.split(" (")[0])


_compiled: Dict[str, Callable] = {}


def compiled_loss(name: str) -> Callable:
    """torch.compile of an eager loss of `baselines` ("eager_monolithic_loss" or
    "eager_decomposed_loss"); dynamic shapes: one compilation for the sweep."""
    if name not in _compiled:
        _compiled[name] = torch.compile(getattr(B, name), dynamic=True)
    return _compiled[name]


def liger_reverse_kl() -> Optional[Callable]:
    """Liger-Kernel's JSD with beta = 1 (= reverse KL(student ‖ teacher)), or None if absent."""
    try:
        from liger_kernel.transformers import LigerJSD
    except ImportError:
        return None
    jsd = LigerJSD(beta=1.0)

    def loss(s, a, mask):
        labels = torch.where(mask, 0, -100).long()  # masked rows: ignore_index
        return jsd(torch.log_softmax(s.float(), -1), torch.log_softmax(a.float(), -1), labels)

    return loss


def cases(shapes: List[Tuple[int, int, Tuple[str, ...]]], dtype: torch.dtype,
          device: torch.device, compile: bool = True) -> Iterator[Case]:
    """One Case per (N, V, mode); the inputs of a shape are shared by its modes and impls."""
    import vgs_kernels as vgs
    from vgs_kernels.ops.decomposed_kl import min_bytes

    liger = liger_reverse_kl() if device.type == "cuda" else None
    for n, v, modes in shapes:
        s, u, a, b, mask = make_inputs(n, v, dtype, device)
        dec_bytes, mono_bytes = (tuple(min_bytes(n, v, dtype, dtype, p, monolithic=mono)
                                       for p in ("forward", "backward")) for mono in (False, True))

        def fused():
            t = vgs.decomposed_kl(s, u, a, b, mask)
            return B.weighted_loss(t.std, t.vis, t.lang, mask), t._asdict()

        def eager():
            t = dict(zip(("std", "vis", "lang", "vds"), B.eager_decomposed_terms(s, u, a, b)))
            return B.weighted_loss(t["std"], t["vis"], t["lang"], mask), t

        def fused_mono():
            std = vgs.decomposed_kl(s, None, a, None, mask).std
            return B.monolithic_loss(std, mask), {"std": std}

        def eager_mono():
            std = B.eager_monolithic_std(s, a)
            return B.monolithic_loss(std, mask), {"std": std}

        def compiled_mono():
            return compiled_loss("eager_monolithic_loss")(s, a, mask), {}

        def compiled_dec():
            return compiled_loss("eager_decomposed_loss")(s, u, a, b, mask), {}

        def liger_mono():
            return liger(s, a, mask), {}

        su, s_only = {"s": s, "u": u}, {"s": s}
        spec = [("vgs fused", fused, su, "eager decomposed", dec_bytes),
                ("eager decomposed", eager, su, None, dec_bytes),
                ("eager mono", eager_mono, s_only, None, mono_bytes),
                ("vgs fused mono", fused_mono, s_only, "eager mono", mono_bytes)]
        if compile:
            spec.append(("compiled decomposed", compiled_dec, su, "eager decomposed", dec_bytes))
            spec.append(("compiled mono", compiled_mono, s_only, "eager mono", mono_bytes))
        if liger is not None:
            spec.append(("liger rev-KL", liger_mono, s_only, "eager mono", mono_bytes))
        fallbacks = [
            _chunked_impl("eager decomposed (chunked)",
                          lambda sl: B.eager_decomposed_terms(s[sl], u[sl], a[sl], b[sl]), su, mask,
                          lambda t, sl: B.weighted_loss(*t[:3], mask[sl])),
            _chunked_impl("eager mono (chunked)", lambda sl: (B.eager_monolithic_std(s[sl], a[sl]),), s_only,
                          mask, lambda t, sl: B.monolithic_loss(t[0], mask[sl]))]
        for mode in modes:
            impls = [_autograd_impl(name, f, leaves, mode, ref, *nb) for name, f, leaves, ref, nb in spec]
            impls += fallbacks
            params = {"N": n, "V": v, "dtype": str(dtype).replace("torch.", ""), "mode": mode}
            yield Case("loss", params, impls, baselines=list(BASELINES), tolerance=tolerance(dtype))


MONO = ("vgs fused mono", "compiled mono", "eager mono")


def goal_ratios(results) -> Dict[str, Tuple[float, float, float]]:
    """The goals of issues 15 and 31 from one case's results (every impl timed interleaved in one
    run): ratio of the medians, with the p20-p80 spread of the per-round ratios (impls of one round
    ran back to back, so a round's ratio sees the same machine load)."""
    by = {r.impl: r for r in results if r.status == "ok" and r.median}
    fused, own, peer = by["vgs fused"], by["vgs fused mono"], by["compiled decomposed"]
    mono = min((by[m] for m in MONO if m in by), key=lambda r: r.median)

    def ratio(num, den):
        rounds = sorted(x / y for x, y in zip(num.times, den.times))
        q = lambda f: rounds[round(f * (len(rounds) - 1))]  # noqa: E731
        return num.median / den.median, q(0.2), q(0.8)

    peak = fused.peak_bytes / peer.peak_bytes
    return {"peer ÷ fused (goal ≥ 2.5)": ratio(peer, fused),
            "fused ÷ own monolithic mode (vgs fused mono; issue 31 goal ≤ 2.3)": ratio(fused, own),
            f"fused ÷ fastest mono ({mono.impl}; issue 15 goal ≤ 2.0)": ratio(fused, mono),
            "fused peak ÷ peer peak (goal ≤ 0.667)": (peak, peak, peak)}


def main(argv=None) -> None:
    """The goal case of issues 15 and 31: fwd+bwd at N, V in each dtype, every impl interleaved."""
    import argparse
    import os

    from .harness import run_case

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("-N", type=int, default=2048)
    ap.add_argument("-V", type=int, default=32000)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')} "
          f"threads={torch.get_num_threads()} loadavg={os.getloadavg()}")
    for dt in args.dtypes.split(","):
        (case,) = cases([(args.N, args.V, ("fwdbwd",))], getattr(torch, dt), dev)
        results = run_case(case, dev, repeats=args.repeats, warmup=2)
        print(f"\n{dt} N={args.N} V={args.V} fwd+bwd, median of {args.repeats}:")
        for r in results:
            mib = None if r.peak_bytes is None else r.peak_bytes / 2**20
            print(f"  {r.impl:22s} {r.status if r.status != 'ok' else f'{r.median * 1e3:8.1f} ms'}"
                  f"  p20-p80 {r.quantile(.2) * 1e3:.0f}-{r.quantile(.8) * 1e3:.0f} ms"
                  f"  peak {mib:.0f} MiB" if r.median else f"  {r.impl}: {r.status}")
        for k, (v, lo, hi) in goal_ratios(results).items():
            print(f"  {k}: {v:.2f}  (per-round p20-p80 {lo:.2f}-{hi:.2f})")
    print(f"loadavg after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

