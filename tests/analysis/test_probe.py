"""Gradient-geometry probe against an independent per-bin computation (the demo: tests/test_demo.py)."""
import math

import pytest
import torch

from vgs_kernels.analysis.probe import GeometryRow, gradient_geometry, plot_gradient_geometry, vds_bins

def _kl(x, y):  # KL(softmax(x) || softmax(y)) per row, plain log_softmax
    lx, ly = x.log_softmax(-1), y.log_softmax(-1)
    return (lx.exp() * (lx - ly)).sum(-1)


def _toy(B=3, T=7, V=11, H=5, seed=0):
    """A linear 'student' (two weight matrices) whose s and u share one of them."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    E = torch.randn(H, H, generator=g, dtype=torch.float64, requires_grad=True)
    xs, xu = torch.randn(B, T, H, generator=g, dtype=torch.float64), torch.randn(B, T, H, generator=g, dtype=torch.float64)
    s, u = (xs @ E) @ W.T, xu @ W.T
    a, b = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, torch.randn(B, T, V, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 3:] = False
    return (s, u, a, b, mask), [W, E]


def test_vds_bins_equal_counts_in_order():
    vds = torch.tensor([[0.5, 0.1, 0.9, 0.3], [0.7, 0.2, 0.0, 9.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    bins = vds_bins(vds, mask, 7)
    assert bins[1, 3] == -1 and bins[mask].sort().values.tolist() == list(range(7))
    order = vds[mask].argsort()
    assert bins[mask][order].tolist() == sorted(bins[mask].tolist())
    assert torch.bincount(vds_bins(vds, mask, 3)[mask]).tolist() == [3, 2, 2]


@pytest.mark.parametrize("bins", [1, 4])
def test_angles_match_direct_gradients(bins):
    logits, params = _toy()
    rows = gradient_geometry(logits, params, bins=bins, gamma=2.0)
    s, u, a, b, mask = logits
    std, vis = _kl(s, a), _kl(s, u.detach() + a - b)
    lang, vds = _kl(u, b), _kl(a, b)
    which = vds_bins(vds, mask, bins)
    w = mask.double() / mask.sum(1, keepdim=True)
    assert [r.bin for r in rows] == [*range(bins), -1]
    assert sum(r.tokens for r in rows[:-1]) == rows[-1].tokens == int(mask.sum())
    for r in rows:
        sel = mask if r.bin == -1 else which == r.bin
        g = [torch.cat([torch.zeros_like(p).flatten() if x is None else x.flatten() for p, x in zip(params, (
             torch.autograd.grad((t * w * sel).sum(), params, retain_graph=True, allow_unused=True)))])
             for t in (lang, vis, std)]

        def ang(x, y):
            return math.degrees(math.acos(float(torch.dot(x, y) / (x.norm() * y.norm()))))

        assert r.angle_lang_vis == pytest.approx(ang(g[0], g[1]), abs=0.05)
        assert r.angle_lang_std == pytest.approx(ang(g[0], g[2]), abs=0.05)
        assert r.angle_vis_std == pytest.approx(ang(g[1], g[2]), abs=0.05)
        assert r.norm_std == pytest.approx(float(g[2].norm()), rel=1e-4)
        assert r.eta == pytest.approx(float(g[2].norm() / (g[2] + 2.0 * g[1]).norm()), rel=1e-4)
        assert r.vds_lo == pytest.approx(float(vds[sel].min()), rel=1e-5)
    assert all(x.vds_hi <= y.vds_lo + 1e-6 for x, y in zip(rows[:bins - 1], rows[1:bins]))


def test_zero_gradient_gives_nan_angle_and_graph_survives():
    (s, u, a, b, mask), params = _toy()
    # The prior does not depend on E: Lang's gradient on E alone is zero.
    rows = gradient_geometry((s, u, a, b, mask), params[1:], bins=2)
    assert all(math.isnan(r.angle_lang_vis) and r.norm_lang == 0 for r in rows)
    assert all(0 <= r.angle_vis_std <= 180 for r in rows)
    _kl(s, a).sum().backward()  # the caller can still backpropagate
    assert params[0].grad is not None


def test_bad_input():
    (s, u, a, b, mask), params = _toy()
    with pytest.raises(ValueError, match="requires_grad"):
        gradient_geometry((s.detach(), u, a, b, mask), params)
    with pytest.raises(ValueError, match="bins"):
        gradient_geometry((s, u, a, b, mask), params, bins=0)
    with pytest.raises(ValueError, match="params"):
        gradient_geometry((s, u, a, b, mask), [])


def test_plot(tmp_path):
    logits, params = _toy()
    rows = gradient_geometry(logits, params, bins=3)
    fig = plot_gradient_geometry(rows, str(tmp_path / "g.png"), title="toy")
    assert (tmp_path / "g.png").stat().st_size > 1000
    assert len(fig.axes[0].lines) == 4  # three angle curves + the 90° line
    assert isinstance(rows[0], GeometryRow) and set(rows[0].as_dict()) >= {"angle_lang_vis", "eta"}
