"""The backward does no work for a side that no live cotangent reaches (issue 14): a Std-only
backward never traverses the text-only student graph, a Lang/LP-only backward never traverses the
with-image one (hooks on the logits / hidden states there must not fire), and the gradients that
are computed are bit-identical to those of the same backward with explicit zero cotangents."""
import pytest
import torch

import vgs_kernels as vgs

N, V = 7, 33


def leaves(dtype=torch.float64, seed=0, v=V, n=N):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(2, n, v, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    s0, u0 = r().requires_grad_(), r().requires_grad_()
    a, b = r(), r()
    mask = torch.rand(2, n, generator=g) < 0.8
    return s0, u0, a, b, mask


def traced(x, fired, name):
    """x * 1, with a hook recording that a gradient reached it (autograd still visits the nodes
    below a None gradient, with None, and computes nothing there)."""
    y = x * 1
    y.register_hook(lambda g: None if g is None else fired.append(name))
    return y


def grads_of(loss, xs):
    gs = torch.autograd.grad(loss, xs, retain_graph=True, allow_unused=True)
    return [None if g is None else g.clone() for g in gs]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("detach_prior", [True, False])
def test_decomposed_kl_skips_dead_side(backend, detach_prior):
    s0, u0, a, b, mask = leaves()
    fired = []
    s, u = traced(s0, fired, "s"), traced(u0, fired, "u")
    t = vgs.decomposed_kl(s, u, a, b, mask, detach_prior=detach_prior, backend=backend)
    w = torch.rand(2, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert not t.vds.requires_grad  # a statistic: no gradient
    zero = 0 * (t.std.sum() + t.vis.sum() + t.lang.sum())  # explicit (materialised) zero cotangents

    cases = {"std": ((w * t.std).sum(), {"s"}),
             "vis": ((w * t.vis).sum(), {"s"} if detach_prior else {"s", "u"}),
             "lang": ((w * t.lang).sum(), {"u"})}
    for name, (loss, reached) in cases.items():
        fired.clear()
        got = grads_of(loss, [s0, u0])
        assert set(fired) == reached, (name, fired)
        want = grads_of(loss + zero, [s0, u0])  # the old behaviour: both sides, zeros on the dead one
        for x, g, g0 in zip("su", got, want):
            if x in reached:
                assert torch.equal(g, g0), (name, x)
            else:
                assert g is None and not g0.any(), (name, x)


def test_loss_components_and_total():
    """VGSLoss: std and vis backwards stay on the with-image graph, lp on the text-only one; the
    total still reaches both and equals the sum of the parts."""
    s0, u0, a, b, mask = leaves(torch.float32, v=50)
    fired = []
    s, u = traced(s0, fired, "s"), traced(u0, fired, "u")
    out = vgs.VGSLoss(gamma=2.0, lam=0.01)(s, u, a, b, mask)
    parts = {}
    for name, reached in (("std", {"s"}), ("vis", {"s"}), ("lp", {"u"})):
        fired.clear()
        parts[name] = grads_of(getattr(out, name), [s0, u0])
        assert set(fired) == reached, (name, fired)
    fired.clear()
    total = grads_of(out.total, [s0, u0])
    assert set(fired) == {"s", "u"}
    zero = torch.zeros_like(s0)
    z = lambda g: zero if g is None else g  # noqa: E731
    torch.testing.assert_close(total[0], z(parts["std"][0]) + 2.0 * z(parts["vis"][0]), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(total[1], 0.01 * z(parts["lp"][1]), rtol=1e-5, atol=1e-9)


def test_exact_step_traverses_text_graph_once():
    """GradientSteering(policy='vgs'): of the three component backwards only lp reaches u."""
    s0, u0, a, b, mask = leaves(torch.float32, v=40)
    params = [s0, u0]
    opt = torch.optim.SGD(params, lr=0.1)
    steer = vgs.GradientSteering(opt, policy="vgs", gamma=2.0, lam=0.01)
    fired = []
    s, u = traced(s0, fired, "s"), traced(u0, fired, "u")
    out = vgs.VGSLoss(gamma=2.0, lam=0.01)(s, u, a, b, mask)
    steer.backward({"std": out.std, "vis": out.vis, "lp": out.lp})
    assert sorted(fired) == ["s", "s", "u"]
    steer.remove()


def test_fused_linear_skips_dead_side():
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    h_s0, h_u0, w_s = r(N, 12).requires_grad_(), r(N, 12).requires_grad_(), (r(V, 12) / 2).requires_grad_()
    h_a, h_b, w_t = r(N, 10), r(N, 10), r(V, 10) / 2
    fired = []
    h_s, h_u = traced(h_s0, fired, "s"), traced(h_u0, fired, "u")
    t = vgs.fused_linear_decomposed_kl(h_s, h_u, w_s, h_a, h_b, w_t, chunk_size=3)
    zero = 0 * (t.std.sum() + t.vis.sum() + t.lang.sum())
    for name, loss, reached in (("std", t.std.sum(), {"s"}), ("vis", t.vis.sum(), {"s"}),
                                ("lang", t.lang.sum(), {"u"})):
        fired.clear()
        got = grads_of(loss, [h_s0, h_u0, w_s])
        assert set(fired) == reached, (name, fired)
        want = grads_of(loss + zero, [h_s0, h_u0, w_s])
        for x, gg, g0 in zip("su", got, want):
            if x in reached:
                assert torch.equal(gg, g0), (name, x)
            else:
                assert gg is None and not g0.any(), (name, x)
        torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-14)

    # The loss with kept-apart components: std reaches h_s only, lp h_u only.
    loss = vgs.FusedLinearVGSLoss(gamma=2.0, lam=0.01, chunk_size=4)
    out = loss(h_s, h_u, w_s, h_a, h_b, w_t)
    for name, reached in (("std", {"s"}), ("vis", {"s"}), ("lp", {"u"})):
        fired.clear()
        grads_of(getattr(out, name), [h_s0, h_u0, w_s])
        assert set(fired) == reached, (name, fired)
