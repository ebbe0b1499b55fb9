"""The steering-health signal: stats["std_descent"] = cos(steered update, grad Std) from the Gram and
the coefficients; SteeringConflictWarning after `patience` uphill measurements in a row; no host
read on steps that measure nothing."""

import contextlib
import warnings

import pytest
import torch

import vgs_kernels as vgs

from helpers.steering import GAMMA, Net, flat_grads, losses, make_batch, steered_grad


def uphill_losses(model, x, y):  # vis = -std: the steered update is eta * (1 - gamma) * grad Std + ...
    L = losses(model, x, y)
    return {"std": L["std"], "vis": -L["std"], "lp": L["lp"]}


def benign_losses(model, x, y):
    L = losses(model, x, y)
    return {"std": L["std"], "vis": 0.5 * L["std"] + 0.1 * L["vis"], "lp": L["lp"]}


def run(make, policy="vgs", steps=3, patience=3, **kw):
    model, (x, y) = Net(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    steer = vgs.GradientSteering(opt, policy=policy, gamma=GAMMA, patience=patience, **kw)
    seen = []
    for _ in range(steps):
        steer.backward(make(model, x, y))
        opt.step()
        opt.zero_grad()
        seen.append(float(steer.stats["std_descent"]))
    return steer, seen


@pytest.mark.parametrize("policy", ["vgs", "project", "pcgrad", "sum"])
def test_std_descent_is_the_cosine_of_the_steered_update(policy):
    model, (x, y) = Net(), make_batch()
    g_std = flat_grads(model, x, y)["std"]
    steer = vgs.GradientSteering(torch.optim.SGD(model.parameters(), lr=1.0), policy=policy, gamma=GAMMA)
    steer.backward(losses(model, x, y))
    steer.apply()
    d = steered_grad(model)
    want = (d @ g_std) / (d.norm() * g_std.norm())
    torch.testing.assert_close(steer.stats["std_descent"], want, rtol=1e-4, atol=1e-5)


def test_uphill_warns_after_patience_with_cosines_and_remedies():
    with pytest.warns(vgs.SteeringConflictWarning) as caught:
        steer, seen = run(uphill_losses, steps=3)
    assert all(c < -0.9 for c in seen)
    assert len(caught) == 1  # on the third measurement, not before
    msg = str(caught[0].message)
    for part in (f"{seen[0]:+.3f}", "3 consecutive", "larger lam", "smaller gamma", '"project"', "plain OPD"):
        assert part in msg
    with warnings.catch_warnings():  # two uphill steps of a new run: not yet
        warnings.simplefilter("error", vgs.SteeringConflictWarning)
        run(uphill_losses, steps=2)
        run(uphill_losses, steps=5, patience=None)  # switched off


def test_project_policy_or_benign_losses_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", vgs.SteeringConflictWarning)
        _, seen = run(benign_losses, steps=6)
        assert all(c > 0 for c in seen)
        _, seen = run(uphill_losses, policy="pcgrad", steps=4)  # PCGrad never points against g_std (k=2+lp)
        assert all(c > -1e-3 for c in seen)


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Any tensor -> Python number conversion raises (the CPU stand-in for a host sync)."""
    def boom(*_a, **_k):
        raise AssertionError("a host read on a step that measures nothing")
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
            m.setattr(torch.Tensor, name, boom)
        yield


@pytest.mark.parametrize("policy", ["fixed", "auto"])
def test_combined_steps_read_nothing(policy, monkeypatch):
    model, (x, y) = Net(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    steer = vgs.GradientSteering(opt, policy=policy, gamma=GAMMA, eta=0.41, every=4)
    for step in range(8):
        quiet = policy == "fixed" or step % 4 in (2, 3)  # auto: measures at 0, 4; reads its retry flag at 1, 5
        with no_host_reads(monkeypatch) if quiet else contextlib.nullcontext():
            steer.backward(uphill_losses(model, x, y))
            opt.step()
            opt.zero_grad()
        assert (steer.stats["mode"] == "exact") == (policy == "auto" and step % 4 == 0)
        assert steer.stats["std_descent"].isnan().item() != (steer.stats["mode"] == "exact")


def test_warning_names_the_component_that_opposes_std():
    """GRPO + VGS: the fixed GRPO component opposes Std while Vis agrees with it (cos(std, vis) > 0). The
    warning names 'grpo' and what to change for it, not gamma, lam or project (which do not touch it)."""
    def grpo_against_std(model, x, y):
        L = losses(model, x, y)
        return {"grpo": -20.0 * L["std"], "std": L["std"], "vis": 0.5 * L["std"] + 0.1 * L["vis"]}

    with pytest.warns(vgs.SteeringConflictWarning) as caught:
        _, seen = run(grpo_against_std, steps=3, fixed=("grpo",))
    assert all(c < 0 for c in seen)
    msg = str(caught[0].message)
    assert "'grpo' opposes Std most" in msg and "fixed-coefficient" in msg and "alpha" in msg
    assert "smaller gamma" not in msg and "project" not in msg
