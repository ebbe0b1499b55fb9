"""Policies as pure functions of the Gram matrix, checked against formulas on explicit vectors."""
import pytest
import torch

from vgs_kernels.steering import policies

GAMMA, LAM = 2.0, 0.01


def vectors(seed=0, n=50, conflict=None):
    g = torch.Generator().manual_seed(seed)
    s, v, lp = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3))
    if conflict is not None:  # force the sign of <s, v>
        v = v - (s @ v) / (s @ s) * s + conflict * 0.5 * s
    return s, v, lp


def gram_of(*vs):
    m = torch.stack(vs)
    return (m @ m.T).float()


W = torch.tensor([1.0, GAMMA, LAM])


def test_vgs_is_eq15():
    s, v, lp = vectors()
    c = policies.vgs(gram_of(s, v, lp), W, std=0, vis=1)
    eta = s.norm() / (s + GAMMA * v).norm()
    torch.testing.assert_close(c.double(), eta * W.double(), rtol=1e-5, atol=0)
    # the steered std/vis part keeps the standard gradient's norm
    torch.testing.assert_close((c[0] * s + c[1] * v).norm(), s.norm(), rtol=1e-5, atol=0, check_dtype=False)


@pytest.mark.parametrize("conflict", [-1.0, 1.0])
def test_project_is_pcgrad_then_renormalised(conflict):
    s, v, lp = vectors(1, conflict=conflict)
    c = policies.project(gram_of(s, v, lp), W, std=0, vis=1)
    d = s @ v
    s_proj = s - d / (v @ v) * v if d < 0 else s
    eta = s.norm() / (s_proj + GAMMA * v).norm()
    expected = eta * (s_proj + GAMMA * v + LAM * lp)
    got = c[0].double() * s + c[1].double() * v + c[2].double() * lp
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if conflict > 0:
        torch.testing.assert_close(c, policies.vgs(gram_of(s, v, lp), W), rtol=1e-6, atol=0)
    else:
        # the std part after projection is orthogonal to v
        assert abs((s_proj @ v).item()) < 1e-9 * s.norm() * v.norm()


def test_sum_and_fixed():
    G = gram_of(*vectors(2))
    assert torch.equal(policies.plain_sum(G, W), W)
    torch.testing.assert_close(policies.fixed(W, 0.41), 0.41 * W)
    torch.testing.assert_close(policies.fixed(W, torch.tensor(0.5)), 0.5 * W)


@pytest.mark.parametrize("name", ["vgs", "project", "pcgrad", "sum"])
def test_scale_invariant(name):
    """GradScaler multiplies every component by S: G by S^2; the coefficients must not change."""
    s, v, lp = vectors(3, conflict=-1.0)
    G = gram_of(s, v, lp)
    fn = policies.BUILTIN[name]
    torch.manual_seed(0)
    scaled = fn(G * 4096.0 ** 2, W)
    torch.manual_seed(0)
    torch.testing.assert_close(scaled, fn(G, W), rtol=1e-5, atol=0)


def test_component_order_and_weights():
    w, std, vis = policies.base_weights(("vis", "lp", "std"), gamma=3.0, weights={"lp": 0.5})
    assert (w, std, vis) == ([3.0, 0.5, 1.0], 2, 0)
    assert policies.base_weights(("a", "b"), gamma=2.0) == ([1.0, 2.0], 0, 1)
    assert policies.base_weights(("std",)) == ([1.0], 0, -1)
    with pytest.raises(ValueError, match="not among"):
        policies.base_weights(("std", "vis"), weights={"lp": 0.1})
    # std/vis found by name, not position
    s, v, lp = vectors(4)
    c = policies.vgs(gram_of(v, lp, s), torch.tensor([GAMMA, LAM, 1.0]), std=2, vis=0)
    torch.testing.assert_close(c[[2, 0, 1]], policies.vgs(gram_of(s, v, lp), W), rtol=1e-5, atol=0)


def test_single_component_is_identity():
    s, _, _ = vectors(5)
    torch.testing.assert_close(policies.vgs(gram_of(s), torch.tensor([1.0]), 0, -1), torch.tensor([1.0]))


@pytest.mark.parametrize("name", ["vgs", "project"])
def test_zero_std_falls_back_to_the_weighted_sum(name):
    """g_std = 0 (a student equal to its teacher with the image): Eq. 15's eta = 0 would drop Vis and LP
    silently; the rule gives NaN and guard the plain weighted sum, flagged."""
    _, v, lp = vectors(6)
    G = gram_of(torch.zeros_like(v), v, lp)
    c, fell_back = policies.guard(G, policies.BUILTIN[name](G, W), W)
    assert torch.equal(c, W) and fell_back.item() is True


@pytest.mark.parametrize("name, case", [(n, c) for n in ("vgs", "project") for c in ("zero", "inf", "nan")]
                         + [("vgs", "cancel")])  # project turns the cancelling pair into -s: finite
def test_guard_falls_back_without_nan(name, case):
    s, v, lp = vectors(7)
    if case == "zero":
        G = torch.zeros(3, 3)
    elif case == "cancel":  # s + gamma v = 0 with s != 0: eta = |s| / 0
        G = gram_of(s, -s / GAMMA, lp)
    else:
        G = gram_of(s, v, lp)
        G[1, 1] = float(case)
    c, fell_back = policies.guard(G, policies.BUILTIN[name](G, W), W)
    assert torch.equal(c, W) and fell_back.item() is True
    G = gram_of(s, v, lp)
    c, fell_back = policies.guard(G, policies.BUILTIN[name](G, W), W)
    assert torch.isfinite(c).all() and fell_back.item() is False


# ----------------------------------------------------------------------------- guarantees (docstring of policies.py)


def jacobians(k, n=40, trials=60):
    """Random Jacobians [k, n], float64, a third of them with forced conflicts."""
    g = torch.Generator().manual_seed(k)
    for t in range(trials):
        J = torch.randn(k, n, generator=g, dtype=torch.float64)
        if t % 3 == 0:
            J[1] = -J[0] * 0.7 + 0.3 * J[1]
        yield J


@pytest.mark.parametrize("k", [2, 3, 4])
def test_pcgrad_equals_torchjd(k):
    torchjd = pytest.importorskip("torchjd.aggregation")
    w = torch.ones(k)
    for i, J in enumerate(jacobians(k)):
        torch.manual_seed(i)
        ours = policies.pcgrad((J @ J.T).float(), w).double() @ J
        torch.manual_seed(i)  # the same random projection orders
        theirs = torchjd.PCGrad()(J)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_pcgrad_two_components_never_conflict():
    for J in jacobians(2):
        w = torch.tensor([1.0, GAMMA])
        d = policies.pcgrad((J @ J.T).float(), w).double() @ J
        assert (J @ d >= -1e-6 * J.norm(dim=1) * d.norm()).all()


def test_vgs_keeps_the_standard_step_size():
    for J in jacobians(2):
        d = policies.vgs((J @ J.T).float(), W[:2]).double() @ J
        torch.testing.assert_close(d.norm(), J[0].norm(), rtol=1e-4, atol=0)
        u = J[0] + GAMMA * J[1]  # the direction of Eq. 15
        torch.testing.assert_close(d / d.norm(), u / u.norm(), rtol=1e-4, atol=1e-5)


def test_project_never_pulls_against_vis():
    for J in jacobians(2):
        c = policies.project((J @ J.T).float(), W[:2]).double()
        d = c @ J
        assert J[1] @ d >= -1e-6 * J[1].norm() * d.norm()
        torch.testing.assert_close(d.norm(), J[0].norm(), rtol=1e-4, atol=0)  # the size eta keeps
