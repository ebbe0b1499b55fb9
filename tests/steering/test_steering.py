"""The optimizer hook on a small MLP and a small transformer: the steered gradient equals one built
independently (torch.autograd.grad per component, flatten, the formula) for every policy; gradient
accumulation, AMP with GradScaler, frozen / unused parameters, several param groups, state_dict."""

import pytest
import torch
import torch.distributed as dist

import vgs_kernels as vgs

from helpers.steering import ETA, GAMMA, Net, expected, flat_grads, losses, make_batch, steered_grad, user_policy


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
@pytest.mark.parametrize("policy", ["vgs", "project", "sum", "fixed", user_policy])
def test_steered_gradient_matches_independent(kind, policy):
    model, (x, y) = Net(kind), make_batch(kind=kind)
    ref = expected(policy, flat_grads(model, x, y))
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    steer = vgs.GradientSteering(opt, policy=policy, gamma=GAMMA, eta=ETA if policy == "fixed" else None)
    steer.backward(losses(model, x, y))
    opt.step()  # the pre-hook steers .grad, SGD(lr=1) subtracts it
    torch.testing.assert_close(steered_grad(model), ref, rtol=1e-5, atol=1e-7)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.detach(), params0[n] - p.grad, rtol=0, atol=1e-6)
    # frozen and unreached parameters: no gradient, untouched
    assert model.frozen.weight.grad is None and model.unused.grad is None
    assert torch.equal(model.frozen.weight, params0["frozen.weight"]) and torch.equal(model.unused, params0["unused"])
    assert model.vis_only.grad is not None  # only "vis" reaches it: its buffer became .grad
    st = steer.stats
    assert st["names"] == ("std", "vis", "lp") and st["step"] == 0 and not st["fallback"]
    if policy != "fixed":
        g = flat_grads(model.__class__(kind), x, y)  # same seed: the initial parameters
        G = torch.stack(list(g.values())) @ torch.stack(list(g.values())).T
        torch.testing.assert_close(st["gram"], G, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(st["cos"][0, 1], G[0, 1] / (G[0, 0] * G[1, 1]).sqrt(), rtol=1e-5, atol=1e-7)
        if policy in ("vgs", "project"):  # eta keeps the standard gradient's size
            c = st["coeffs"]
            torch.testing.assert_close((c[0] * g["std"] + c[1] * g["vis"]).norm(), g["std"].norm(), rtol=1e-5, atol=0)
    steer.remove()


def test_auto_refreshes_every_k_and_uses_ema_in_between():
    model, (x, y) = Net(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    steer = vgs.GradientSteering(opt, policy="auto", gamma=GAMMA, every=2, ema=0.5)
    ema = None
    for step in range(5):
        g = flat_grads(model, x, y)
        eta_exact = g["std"].norm() / (g["std"] + GAMMA * g["vis"]).norm()
        opt.zero_grad()
        steer.backward(losses(model, x, y))
        steer.apply()
        got = steered_grad(model)
        if step % 2 == 0:  # exact step: separate backward passes, EMA updated
            assert steer.stats["mode"] == "exact"
            torch.testing.assert_close(got, expected("vgs", g), rtol=1e-5, atol=1e-7)
            if ema is not None:
                torch.testing.assert_close(steer.stats["eta_error"], (ema - eta_exact).abs() / eta_exact, rtol=1e-4, atol=1e-7)
            ema = eta_exact if ema is None else 0.5 * ema + 0.5 * eta_exact
        else:  # one combined backward with the EMA
            assert steer.stats["mode"] == "combined"
            torch.testing.assert_close(got, expected("fixed", g, eta_fixed=ema), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(steer.eta_ema, ema, rtol=1e-5, atol=0)
        opt.step()
    assert steer.step_count == 5


@pytest.mark.parametrize("policy", ["vgs", "project"])
def test_accumulation_equals_big_batch(policy):
    x, y = make_batch(12, kind="transformer")
    big = Net("transformer")
    opt = torch.optim.SGD(big.parameters(), lr=1.0)
    steer = vgs.GradientSteering(opt, policy=policy, gamma=GAMMA)
    steer.backward(losses(big, x, y))
    steer.apply()
    small = Net("transformer")
    opt2 = torch.optim.SGD(small.parameters(), lr=1.0)
    steer2 = vgs.GradientSteering(opt2, policy=policy, gamma=GAMMA)
    for xs, ys in zip(x.chunk(3), y.chunk(3)):
        steer2.backward(losses(small, xs, ys, scale=1 / 3))
    steer2.apply()
    torch.testing.assert_close(steered_grad(small), steered_grad(big), rtol=1e-5, atol=1e-7)


def test_param_groups_share_one_gram():
    model, (x, y) = Net(), make_batch()
    ref = expected("vgs", flat_grads(model, x, y))
    groups = [{"params": list(model.body.parameters()), "lr": 1.0},
              {"params": [model.vis_only, model.unused, model.frozen.weight], "lr": 0.5}]
    opt = torch.optim.SGD(groups, lr=1.0)
    steer = vgs.GradientSteering(opt, gamma=GAMMA)
    steer.backward(losses(model, x, y))
    before = model.vis_only.detach().clone()
    opt.step()
    torch.testing.assert_close(steered_grad(model), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.vis_only.detach(), before - 0.5 * model.vis_only.grad)


def test_zero_grad_drops_components_and_remove():
    model, (x, y) = Net(), make_batch()
    ref = expected("vgs", flat_grads(model, x, y))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    steer = vgs.GradientSteering(opt, gamma=GAMMA)
    steer.backward(losses(model, x, y, scale=5.0))
    opt.zero_grad()  # forgets that step's components too
    steer.backward(losses(model, x, y))
    steer.apply()
    torch.testing.assert_close(steered_grad(model), ref, rtol=1e-5, atol=1e-7)
    assert steer.step_count == 1 and not steer._grads._buffers
    with pytest.raises(RuntimeError, match="already has"):
        vgs.GradientSteering(opt)
    steer.remove()
    assert "zero_grad" not in opt.__dict__
    opt.zero_grad()
    losses(model, x, y)["std"].backward()
    g = steered_grad(model).clone()
    opt.step()  # no steering any more
    torch.testing.assert_close(steered_grad(model), g)
    vgs.GradientSteering(opt).remove()  # can register again


def test_fallback_when_all_gradients_vanish():
    model, (x, y) = Net(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    steer = vgs.GradientSteering(opt, gamma=GAMMA)
    steer.backward({n: 0.0 * v for n, v in losses(model, x, y).items()})  # G = 0: eta = 0/0
    opt.step()
    assert steer.stats["fallback"].item() is True
    assert torch.equal(steered_grad(model), torch.zeros_like(steered_grad(model)))  # zeros, not NaN


@pytest.mark.parametrize("policy", ["vgs", "project", "auto"])
def test_student_equal_to_teacher_still_moves(policy):
    """Std's gradient is 0 (the student equals its teacher with the image) while Vis and LP are not: Eq. 15
    gives eta = 0, which dropped Vis and LP silently. The step is the plain weighted sum, flagged."""
    model, (x, y) = Net(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    steer = vgs.GradientSteering(opt, policy=policy, gamma=GAMMA)
    g = flat_grads(model, x, y)
    comps = losses(model, x, y)
    steer.backward({**comps, "std": 0.0 * comps["std"]})
    opt.step()
    assert steer.stats["fallback"].item() is True and steer.stats["eta"].item() == 1.0
    torch.testing.assert_close(steered_grad(model), expected("sum", {**g, "std": 0 * g["std"]}))


AMP_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", AMP_DTYPES)
def test_amp_grad_scaler(dtype):
    """Scaled losses, steered before the scaler unscales: the step equals the unscaled reference."""
    model, (x, y) = Net("transformer"), make_batch(kind="transformer")
    with torch.autocast("cpu", dtype=dtype):  # the same scaled backward: fp16 needs it to not underflow
        ref = expected("vgs", flat_grads(model, x, y, scale=2.0 ** 10))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    steer = vgs.GradientSteering(opt, gamma=GAMMA, scaler=scaler)
    with torch.autocast("cpu", dtype=dtype):
        steer.backward(losses(model, x, y))
    scaler.unscale_(opt)  # e.g. for clipping: .grad is already steered here
    torch.testing.assert_close(steered_grad(model), ref, rtol=1e-4, atol=1e-6)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 10 and not steer.stats["fallback"]
    torch.testing.assert_close(steer.stats["norms"][0], ref.new_tensor(0) + flat_grads_norm(model, x, y, dtype),
                               rtol=1e-3, atol=0)  # stats are unscaled
    steer.remove()
    assert "unscale_" not in scaler.__dict__


def flat_grads_norm(model, x, y, dtype):
    """|g_std| at the parameters before the step (p + grad undoes SGD lr=1)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad)
    with torch.autocast("cpu", dtype=dtype):
        n = flat_grads(model, x, y, scale=2.0 ** 10)["std"].norm()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(p.grad)
    return n


@pytest.mark.parametrize("policy", ["vgs", "sum"])
def test_amp_overflow_in_one_component_skips_the_step(policy):
    """inf only in the "vis" buffer (.grad holds a finite std): the scaler must still skip."""
    model, (x, y) = Net(), make_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    steer = vgs.GradientSteering(opt, policy=policy, gamma=GAMMA, scaler=scaler)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        L = losses(model, x, y)
    L["vis"] = L["vis"] * torch.tensor(float("inf"))
    steer.backward(L)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 7  # inf found: step skipped, scale backed off
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert steer.stats["fallback"].item() is True and steer.step_count == 1
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        steer.backward(losses(model, x, y))  # the next step is normal again
    scaler.step(opt)
    assert not steer.stats["fallback"] and not torch.equal(model.vis_only, before["vis_only"])


def test_single_process_group_all_reduce():
    """The Gram is all-reduced over the process group (world size 1 here: unchanged)."""
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    model, (x, y) = Net(), make_batch()
    ref = expected("vgs", flat_grads(model, x, y))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        steer = vgs.GradientSteering(opt, gamma=GAMMA)
        steer.backward(losses(model, x, y))
        steer.apply()
        torch.testing.assert_close(steered_grad(model), ref, rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_bad_input():
    model, (x, y) = Net(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="policy must be one of"):
        vgs.GradientSteering(opt, policy="pcgrad-ish")
    with pytest.raises(ValueError, match="needs eta"):
        vgs.GradientSteering(opt, policy="fixed")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        vgs.GradientSteering(model)
    steer = vgs.GradientSteering(opt)
    L = losses(model, x, y)
    with pytest.raises(ValueError, match="scalar"):
        steer.backward({"std": model(x)[0], "vis": L["vis"]})
    steer.backward(L)
    with pytest.raises(ValueError, match=r"components \('std', 'vis', 'lp'\)"):
        steer.backward({"vis": L["vis"], "std": L["std"], "lp": L["lp"]})
    with pytest.raises(ValueError, match="1 to 4 components"):
        vgs.GradientSteering(torch.optim.SGD(Net().parameters(), lr=1.0)).backward(
            {str(i): L["std"] for i in range(5)})


# ----------------------------------------------------------------------------- GPU (Triton kernels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["vgs", "project", "sum"])
def test_hook_on_cuda(policy):
    model = Net("transformer", d=64).cuda()
    x, y = (t.cuda() for t in make_batch(32, kind="transformer", d=64))
    ref = expected(policy, flat_grads(model, x, y))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    steer = vgs.GradientSteering(opt, policy=policy, gamma=GAMMA)
    for xs, ys in zip(x.chunk(2), y.chunk(2)):  # with accumulation
        steer.backward(losses(model, xs, ys, scale=0.5))
    steer.apply()
    torch.testing.assert_close(steered_grad(model), ref, rtol=1e-4, atol=1e-6)
    assert steer.stats["gram"].is_cuda and not steer.stats["fallback"]
    opt.zero_grad()
    steer.backward(losses(model, x, y))
    torch.cuda.set_sync_debug_mode("error")  # the steering itself never waits for the GPU
    try:
        steer.apply()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(steered_grad(model), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_overflow_skips_on_cuda():
    model = Net("transformer", d=64).cuda()
    x, y = (t.cuda() for t in make_batch(kind="transformer", d=64))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
    steer = vgs.GradientSteering(opt, gamma=GAMMA, scaler=scaler)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        L = losses(model, x, y)
    L["vis"] = L["vis"] * torch.tensor(float("inf"), device="cuda")
    steer.backward(L)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 7
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_wrapped_optimizer_is_unwrapped():
    """HF Accelerate's AcceleratedOptimizer is no torch Optimizer but holds one as `.optimizer`:
    the hook registers on the inner one, so stepping the wrapper steers."""

    class Wrapper:  # the shape of accelerate.optimizer.AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self):
            self.optimizer.step()

    model, (x, y) = Net(), make_batch()
    ref = expected("vgs", flat_grads(model, x, y))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    steer = vgs.GradientSteering(Wrapper(opt), gamma=GAMMA)
    assert steer.optimizer is opt
    steer.backward(losses(model, x, y))
    steer.apply()
    torch.testing.assert_close(steered_grad(model), ref, rtol=1e-5, atol=1e-7)
