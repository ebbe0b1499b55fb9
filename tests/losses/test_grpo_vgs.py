"""Language steering (Eq. 19-21) and GRPO + VGS (Eq. 22) through the hook, against plain torch.

A tiny shared-weight "student" (s = x_img @ W, u = x_txt @ W) so that every component's gradient
lives on the same parameters, fixed teacher logits a, b; the expected update is computed from
torch.autograd.grad per component and the paper's formulas written out here.
"""
import pytest
import torch

import vgs_kernels as vgs
from vgs_kernels.losses.grpo_vgs import group_advantages, grpo_surrogate, grpo_vgs_loss

B, T, H, V = 3, 5, 8, 11
GAMMA, LAM, ALPHA = 2.0, 0.01, 0.3


def kl(x, y):
    lx, ly = x.log_softmax(-1), y.log_softmax(-1)
    return (lx.exp() * (lx - ly)).sum(-1)


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(H, V, generator=g, dtype=torch.float64))
    x_img, x_txt = torch.randn(B, T, H, generator=g, dtype=torch.float64), torch.randn(B, T, H, generator=g,
                                                                                       dtype=torch.float64)
    a, b = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64), 2 * torch.randn(B, T, V, generator=g,
                                                                                       dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    return W, x_img, x_txt, a, b, mask


def seq_mean(x, mask):
    """The paper's reduction: 1/|τ| Σ_t per sequence, then mean over sequences."""
    m = mask.to(x.dtype)
    return ((x * m).sum(-1) / m.sum(-1)).mean()


def grads(losses, W):
    return [torch.autograd.grad(l, W, retain_graph=True)[0] for l in losses]


def test_language_steering_matches_eq_19_to_21(problem):
    """VGSLoss(steer="language") + the "vgs" policy: the loss values and the update equal
    η_Lang·(∇Std + γ_Lang ∇Lang + λ ∇VP), η_Lang = ‖∇Std‖/‖∇Std + γ_Lang ∇Lang‖ (Eq. 20)."""
    W, x_img, x_txt, a, b, mask = problem
    gamma_lang = 1.5
    s, u = x_img @ W, x_txt @ W
    vds = kl(a, b)
    gate = (vds > torch.quantile(vds[mask], 0.7)).to(vds.dtype)
    std, lang = seq_mean(kl(s, a), mask), seq_mean(kl(u, b), mask)
    vp = seq_mean(gate * kl(u, u.detach() + a - b), mask)  # Eq. 21: the text-only student, q* of Eq. 10
    g_std, g_lang, g_vp = grads([std, lang, vp], W)
    eta = g_std.norm() / (g_std + gamma_lang * g_lang).norm()
    want = eta * (g_std + gamma_lang * g_lang + LAM * g_vp)

    out = vgs.VGSLoss(lam=LAM, steer="language", gamma_lang=gamma_lang)(x_img @ W, x_txt @ W, a, b, mask)
    assert set(out.losses()) == {"std", "lang", "vp"} and out.weights == {"std": 1.0, "lang": gamma_lang, "vp": LAM}
    for got, ref in ((out.std, std), (out.lang, lang), (out.vp, vp)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.total, std + gamma_lang * lang + LAM * vp)
    assert float(vp.detach()) > 0 and float(out.vis.detach()) == 0.0
    opt = torch.optim.SGD([W], lr=0.0)
    steer = vgs.GradientSteering(opt, policy="vgs")
    steer.backward(out)
    steer.apply()
    torch.testing.assert_close(W.grad, want, rtol=1e-5, atol=1e-9)  # coefficients in fp32
    torch.testing.assert_close(steer.stats["eta"].double(), eta, rtol=1e-6, atol=0)


def test_language_steering_bad_input():
    with pytest.raises(ValueError, match="steer"):
        vgs.VGSLoss(steer="lang")
    with pytest.raises(ValueError, match="gamma_lang"):
        vgs.VGSLoss(gamma_lang=1.0)
    with pytest.raises(ValueError, match="adaptive"):
        vgs.VGSLoss(steer="language", adaptive=True)
    with pytest.raises(ValueError, match="steer"):
        vgs.FusedLinearVGSLoss(steer="language")
    x = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="text-only"):
        vgs.VGSLoss(steer="language")(x, None, x, None)


def rl_loss(W, x_img, mask, tokens, adv):
    """A GRPO surrogate on the shared-weight student's own 'sampled' tokens."""
    logps = (x_img @ W).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    return grpo_surrogate(logps, None, adv, mask)


@pytest.mark.parametrize("policy", ["vgs", "sum", "fixed", "auto", "pcgrad"])
@pytest.mark.parametrize("distill", ["vgs", "standard"])
def test_grpo_vgs_update_matches_eq_22(problem, policy, distill):
    """(1 − α)·∇L_GRPO added unchanged, α times the policy's combination of the VGS components."""
    W, x_img, x_txt, a, b, mask = problem
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5]), 3)
    loss_fn = vgs.VGSLoss(GAMMA, LAM, monolithic=distill == "standard")
    out = grpo_vgs_loss(rl_loss(W, x_img, mask, tokens, adv), loss_fn(x_img @ W, x_txt @ W, a, b, mask), ALPHA)
    s, u = x_img @ W, x_txt @ W
    g_rl, g_std = grads([rl_loss(W, x_img, mask, tokens, adv), seq_mean(kl(s, a), mask)], W)
    if distill == "vgs":
        vds = kl(a, b)
        gate = (vds > torch.quantile(vds[mask], 0.7)).to(vds.dtype)
        g_vis, g_lp = grads([seq_mean(kl(s, u.detach() + a - b), mask), seq_mean(gate * kl(u, b), mask)], W)
        steered = g_std + GAMMA * g_vis + LAM * g_lp
        exact = g_std.norm() / (g_std + GAMMA * g_vis).norm()
        assert out.weights == {"grpo": 1 - ALPHA, "std": ALPHA, "vis": ALPHA * GAMMA, "lp": ALPHA * LAM}
    else:
        steered, exact = g_std, torch.tensor(1.0, dtype=torch.float64)
    eta = {"vgs": exact, "auto": exact, "sum": 1.0, "fixed": 0.41, "pcgrad": None}[policy]
    opt = torch.optim.SGD([W], lr=0.0)
    steer = vgs.GradientSteering(opt, policy=policy, eta=0.41 if policy == "fixed" else None)
    steer.backward(out)
    steer.apply()
    c = steer.stats["coeffs"]
    assert float(c[0]) == pytest.approx(1 - ALPHA)  # the fixed component, whatever the policy
    if policy == "pcgrad":  # random order: the coefficients are checked against the hook's Gram instead
        comps = [g_rl, g_std] + ([g_vis, g_lp] if distill == "vgs" else [])
        want = sum(float(ci) * g for ci, g in zip(c, comps))
    else:
        want = (1 - ALPHA) * g_rl + ALPHA * eta * steered
    torch.testing.assert_close(W.grad, want, rtol=1e-5, atol=1e-7)  # coefficients in fp32
    torch.testing.assert_close(out.total, (1 - ALPHA) * out.grpo + ALPHA * loss_fn(s, u, a, b, mask).total)


def test_grpo_vgs_combined_backward_keeps_the_fixed_weight(problem):
    """policy 'fixed': one combined backward of η·α·VGS + (1 − α)·GRPO (GRPO not scaled by η)."""
    W, x_img, x_txt, a, b, mask = problem
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    out = grpo_vgs_loss(rl_loss(W, x_img, mask, tokens, adv), vgs.VGSLoss(GAMMA, LAM)(x_img @ W, x_txt @ W, a, b, mask),
                        ALPHA)
    g_rl, g_vgs = grads([out.grpo, out.steered / ALPHA], W)
    steer = vgs.GradientSteering(torch.optim.SGD([W], lr=0.0), policy="fixed", eta=0.41)
    assert not steer.needs_components
    steer.backward(out)
    steer.apply()
    torch.testing.assert_close(W.grad, (1 - ALPHA) * g_rl + 0.41 * ALPHA * g_vgs, rtol=1e-5, atol=1e-7)


def test_fixed_components_from_a_dict_and_a_user_policy(problem):
    """fixed= on the hook with dict losses: the user policy sees the steered components only."""
    W, x_img, x_txt, a, b, mask = problem
    s = x_img @ W
    losses = {"extra": (s ** 2).mean(), "std": seq_mean(kl(s, a), mask), "vis": seq_mean(kl(s, b), mask)}
    g_x, g_s, g_v = grads(list(losses.values()), W)
    seen = []

    def policy(G, names):
        seen.append((tuple(G.shape), names))
        return torch.tensor([0.5, 0.25])

    steer = vgs.GradientSteering(torch.optim.SGD([W], lr=0.0), policy=policy, weights={"extra": 3.0},
                                 fixed=("extra",))
    steer.backward(losses)
    steer.apply()
    assert seen == [((2, 2), ("std", "vis"))]
    torch.testing.assert_close(W.grad, 3.0 * g_x + 0.5 * g_s + 0.25 * g_v, rtol=1e-5, atol=1e-7)


def test_grpo_vgs_bad_input(problem):
    W, x_img, x_txt, a, b, mask = problem
    out = vgs.VGSLoss()(x_img @ W, x_txt @ W, a, b, mask)
    rl = (W ** 2).sum()
    for alpha in (-0.1, 1.5, "0.3"):
        with pytest.raises(ValueError, match="alpha"):
            grpo_vgs_loss(rl, out, alpha)
    with pytest.raises(ValueError, match="eta"):
        grpo_vgs_loss(rl, vgs.VGSLoss(eta=0.4)(x_img @ W, x_txt @ W, a, b, mask))
    with pytest.raises(ValueError, match="std"):
        vgs.GradientSteering(torch.optim.SGD([W], lr=0.0), fixed=("std",)).backward({"std": rl, "vis": rl})
    with pytest.raises(ValueError, match="group"):
        group_advantages(torch.ones(5), 2)


def test_grpo_surrogate_gradient_is_the_policy_gradient():
    """One update per rollout batch (ratio 1): ∇(−O) = −Σ_t A·∇log π / N, as REINFORCE with advantages."""
    logps = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    adv, mask = torch.tensor([1.0, -2.0]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    grpo_surrogate(logps, None, adv, mask).backward()
    torch.testing.assert_close(logps.grad, -(adv[:, None] * mask).double() / 5)


def test_hook_state_keeps_weights_and_fixed_components(problem):
    """A hook restored from a checkpoint takes GRPO + VGS's weights (α-scaled) and fixed component back:
    the next backward of the same loss is accepted and steered as before (it used to be checked against
    the default weights and rejected)."""
    W, x_img, x_txt, a, b, mask = problem
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)

    def out():
        return grpo_vgs_loss(rl_loss(W, x_img, mask, tokens, adv),
                             vgs.VGSLoss(1.0, LAM)(x_img @ W, x_txt @ W, a, b, mask), ALPHA)

    opt = torch.optim.SGD([W], lr=0.0)
    steer = vgs.GradientSteering(opt, policy="vgs")
    steer.backward(out())
    opt.step()
    want = W.grad.clone()
    state = opt.state_dict()
    steer.remove()
    opt2 = torch.optim.SGD([W], lr=0.0)
    opt2.load_state_dict(state)
    steer2 = vgs.GradientSteering(opt2, policy="vgs")
    assert steer2.names == ("grpo", "std", "vis", "lp") and steer2.step_count == 1
    opt2.zero_grad()
    steer2.backward(out())
    steer2.apply()
    torch.testing.assert_close(W.grad, want, rtol=0, atol=0)
    assert float(steer2.stats["coeffs"][0]) == pytest.approx(1 - ALPHA)
