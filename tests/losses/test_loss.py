"""VGSLoss / vgs_loss against a direct implementation of the paper's equations (Eq. 13-18, App. E)."""
import math

import pytest
import torch
import torch.nn.functional as F

import vgs_kernels as vgs
from vgs_kernels.losses.vgs import masked_quantile

B, T, V = 3, 7, 37


def make(dtype=torch.float64, seed=0, b=B, t=T, v=V):
    g = torch.Generator().manual_seed(seed)
    s, u, a, bb = (torch.randn(b, t, v, generator=g, dtype=torch.float64).mul(2).to(dtype) for _ in range(4))
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[0, :2] = True
    mask[-1] = False  # a sequence with no response token
    return s.requires_grad_(), u.requires_grad_(), a, bb, mask


def direct(s, u, a, b, mask, *, gamma=2.0, lam=0.01, lp_quantile=0.7, adaptive=False,
           quantiles=(0.4, 0.7), eta=None, reduction="sequence", temperature=1.0, num_items=None):
    """Eq. 3, 6, 11, 12 with log_softmax; Eq. 13-18 and App. E written out per token."""
    ls, lu, la, lb = (F.log_softmax(x.double() / temperature, -1) for x in (s, u, a.detach(), b.detach()))
    lq = F.log_softmax(lu.detach() + la - lb, -1)
    kl = lambda lp, lq_: (lp.exp() * (lp - lq_)).sum(-1)  # noqa: E731
    std, vis, lang, vds = kl(ls, la), kl(ls, lq), kl(lu, lb), kl(la, lb)
    valid = mask.bool()
    v = vds.detach()[valid]
    gate = vds.detach() > torch.quantile(v, lp_quantile)
    f = torch.ones_like(vds)
    if adaptive:
        lo, hi = torch.quantile(v, torch.tensor(quantiles, dtype=v.dtype))
        f = torch.where(vds < lo, 0.0, torch.where(vds > hi, 1.0, 0.5))
    parts = {"std": std, "vis": f * vis, "lp": gate * lang}
    out = {}
    for name, x in parts.items():
        x = torch.where(valid, x, 0.0)
        if reduction == "sequence":
            means = [x[i][valid[i]].mean() for i in range(x.shape[0]) if valid[i].any()]
            out[name] = torch.stack(means).mean()
        elif reduction == "token":
            out[name] = x.sum() / (valid.sum() if num_items is None else num_items)
        elif reduction == "sum":
            out[name] = x.sum()
        else:
            out[name] = x
    total = out["std"] + gamma * out["vis"] + lam * out["lp"]
    out["total"] = total if eta is None else eta * total
    out["vds"] = torch.where(valid, vds, 0.0)
    return out


def grads(y, *xs):
    """Gradients of y.sum() (zeros where y does not depend on x)."""
    gs = torch.autograd.grad(y.sum(), xs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, xs)]


@pytest.mark.parametrize("reduction", ["sequence", "token", "sum", "none"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_equations(reduction, adaptive):
    s, u, a, b, mask = make()
    kw = dict(gamma=1.5, lam=0.3, lp_quantile=0.6, adaptive=adaptive, eta=0.41, reduction=reduction)
    out = vgs.VGSLoss(**kw, adaptive_quantiles=(0.3, 0.8), temperature=1.7)(s, u, a, b, mask)
    ref = direct(s, u, a, b, mask, **kw, quantiles=(0.3, 0.8), temperature=1.7)
    assert isinstance(out, vgs.VGSLossOutput)
    for name in ("total", "std", "vis", "lp", "vds"):
        torch.testing.assert_close(getattr(out, name), ref[name], msg=name)
    # every component backpropagates (the steering hook differentiates them one by one)
    for name in ("total", "std", "vis", "lp"):
        for g, r in zip(grads(getattr(out, name), s, u), grads(ref[name], s, u)):
            torch.testing.assert_close(g, r, msg=name)


def test_total_is_eta_times_weighted_components_and_grads_add_up():
    s, u, a, b, mask = make(seed=1)
    eta = torch.tensor(0.36, dtype=torch.float64)
    out = vgs.vgs_loss(s, u, a, b, mask, adaptive=True, eta=eta)
    torch.testing.assert_close(out.total, eta * (out.std + 2.0 * out.vis + 0.01 * out.lp))
    g_total = grads(out.total, s, u)
    g_parts = [grads(c, s, u) for c in (out.std, out.vis, out.lp)]
    for i in range(2):
        comb = sum(w * gp[i] for w, gp in zip((1, 2.0, 0.01), g_parts))
        torch.testing.assert_close(g_total[i], eta * comb)


def test_lp_gate_selects_the_top_vds_tokens():
    s, u, a, b, mask = make(seed=2, b=4, t=25)
    out = vgs.vgs_loss(s, u, a, b, mask, lam=1.0)
    du = grads(out.lp, u)[0]
    v = out.vds[mask]
    top = out.vds > torch.quantile(v, 0.7)
    assert top.sum() == v.numel() - 1 - math.floor(0.7 * (v.numel() - 1))  # strictly above it
    assert (du.abs().sum(-1) > 0).eq(top & mask).all()   # Lang gradient only on the gated tokens
    assert (grads(out.std, u)[0] == 0).all()             # Std does not touch u


def test_adaptive_gamma_classes():
    s, u, a, b, mask = make(seed=3, b=2, t=40)
    plain = vgs.vgs_loss(s, u, a, b, mask, reduction="none")
    adapt = vgs.vgs_loss(s, u, a, b, mask, reduction="none", adaptive=True)
    v = plain.vds[mask]
    lo, hi = torch.quantile(v, 0.4), torch.quantile(v, 0.7)
    ratio = torch.where(plain.vis != 0, adapt.vis / plain.vis, torch.nan)[mask]
    torch.testing.assert_close(ratio[v < lo], torch.zeros_like(ratio[v < lo]))
    torch.testing.assert_close(ratio[v > hi], torch.ones_like(ratio[v > hi]))
    mid = (v >= lo) & (v <= hi)
    assert mid.any()
    torch.testing.assert_close(ratio[mid], torch.full_like(ratio[mid], 0.5))


def test_token_reduction_gradient_accumulation_is_exact():
    s, u, a, b, mask = make(seed=4, b=4)
    mask[-1, 0] = True
    n = mask.sum()
    loss = vgs.VGSLoss(lam=0.0, reduction="token")
    full = grads(loss(s, u, a, b, mask).total, s, u)
    acc = [torch.zeros_like(s), torch.zeros_like(u)]
    for sl in (slice(0, 1), slice(1, 4)):
        out = loss(s[sl], u[sl], a[sl], b[sl], mask[sl], num_items_in_batch=n)
        for x, g in zip(acc, grads(out.total, s, u)):
            x += g
    for f, g in zip(full, acc):
        torch.testing.assert_close(f, g)


def test_monolithic_is_std_only():
    s, u, a, b, mask = make(seed=5)
    ref = direct(s, u, a, b, mask, eta=0.5)
    for out in (vgs.vgs_loss(s, None, a, None, mask, eta=0.5),
                vgs.VGSLoss(eta=0.5, monolithic=True)(s, u, a, b, mask)):
        torch.testing.assert_close(out.total, 0.5 * ref["std"])
        torch.testing.assert_close(out.std, ref["std"])
        assert out.vis.item() == 0 and out.lp.item() == 0 and out.vds is None
        torch.testing.assert_close(grads(out.total, s)[0], 0.5 * grads(ref["std"], s)[0])


@pytest.mark.parametrize("reduction", ["sequence", "token", "sum", "none"])
@pytest.mark.parametrize("monolithic", [False, True])
def test_all_masked_gives_zero_loss_and_zero_grads(reduction, monolithic):
    s, u, a, b, _ = make(seed=6, dtype=torch.float32)
    mask = torch.zeros(B, T, dtype=torch.bool)
    out = vgs.vgs_loss(s, u, a, b, mask, reduction=reduction, monolithic=monolithic, adaptive=True)
    for name in ("total", "std", "vis", "lp"):
        assert (getattr(out, name) == 0).all(), name
    gs, gu = grads(out.total, s, u)
    assert (gs == 0).all() and (gu == 0).all()


def test_bf16_close_to_fp32():
    s, u, a, b, mask = make(dtype=torch.float32, seed=7)
    lo = vgs.vgs_loss(*(x.detach().bfloat16() for x in (s, u, a, b)), mask)
    hi = vgs.vgs_loss(s, u, a, b, mask)
    assert lo.total.dtype == torch.float32
    torch.testing.assert_close(lo.total, hi.total, rtol=2e-2, atol=2e-2)


def test_masked_quantile_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 13, generator=g)
    valid = torch.rand(5, 13, generator=g) < 0.5
    q = (0.0, 0.3, 0.5, 0.7, 1.0)
    torch.testing.assert_close(masked_quantile(x, valid, q), torch.quantile(x[valid], torch.tensor(q)))
    assert masked_quantile(x, torch.zeros_like(valid), q).eq(0).all()


def test_bad_input():
    s, u, a, b, mask = make(dtype=torch.float32)
    with pytest.raises(ValueError, match="mask"):
        vgs.vgs_loss(s, u, a, b, mask[:, :-1])
    with pytest.raises(ValueError, match="reduction"):
        vgs.VGSLoss(reduction="mean")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        vgs.vgs_loss(s, u, a, b, mask, num_items_in_batch=10)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        vgs.vgs_loss(s, u, a, b, mask, reduction="token", num_items_in_batch=0)
    with pytest.raises(ValueError, match="gamma"):
        vgs.VGSLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="lp_quantile"):
        vgs.VGSLoss(lp_quantile=1.5)
    with pytest.raises(ValueError, match="adaptive_quantiles"):
        vgs.VGSLoss(adaptive_quantiles=(0.7, 0.4))
    with pytest.raises(ValueError, match="sequence"):
        vgs.vgs_loss(s[0, 0], u[0, 0], a[0, 0], b[0, 0])
    with pytest.raises(ValueError, match="u and b"):
        vgs.vgs_loss(s, u, a, None, mask)
