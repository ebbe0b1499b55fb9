"""Issue 10: where a real training loop meets the library, every misuse gives the correct step or
raises naming the fix. One test per case found silent (numbered as in the issue), then the
siblings: loss inputs, masks, the hook's inputs, stats, backend reporting."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import vgs_kernels as vgs
from vgs_kernels.steering import STAT_KEYS

from helpers.steering import ETA, GAMMA, LAM, Net, expected, flat_grads, losses, make_batch, steered_grad


def fused_inputs(seed=0, n=6, h=4, v=11):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(h, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g))
    h_s, h_u, h_a, h_b = (torch.randn(n, h, generator=g) for _ in range(4))
    w_t = torch.randn(v, h, generator=g)
    return head, (h_s, h_u, h_a, h_b, w_t)


# ----------------------------------------------------------------------------- 1. combined-only outputs


def test_1_fused_linear_combined_output_steps_or_raises():
    head, (h_s, h_u, h_a, h_b, w_t) = fused_inputs()
    full = vgs.FusedLinearVGSLoss(components=True)(h_s, h_u, head.weight, h_a, h_b, w_t)
    ref = torch.autograd.grad(ETA * (full.std + GAMMA * full.vis + LAM * full.lp), head.weight)[0]

    steer = vgs.GradientSteering(torch.optim.SGD(head.parameters(), lr=0.5), policy="fixed", eta=ETA)
    out = vgs.FusedLinearVGSLoss(components=False)(h_s, h_u, head.weight, h_a, h_b, w_t)
    with pytest.raises(ValueError, match=r"losses\['std'\] does not require grad.*steer.backward\(out\)"):
        steer.backward({"std": out.std, "vis": out.vis, "lp": out.lp})  # silently a zero step before
    steer.backward(out)  # the whole output: its combined gradient, scaled by the hook's eta
    torch.testing.assert_close(head.weight.grad, ref, rtol=1e-4, atol=1e-6)  # fp32, other kernel paths

    exact = vgs.GradientSteering(torch.optim.SGD(nn.Linear(4, 11).parameters(), lr=0.5), policy="vgs")
    with pytest.raises(ValueError, match="needs each component's gradient.*components=True"):
        exact.backward(vgs.FusedLinearVGSLoss(components=False)(h_s, h_u, head.weight, h_a, h_b, w_t))


def test_1_components_follow_needs_components():
    """auto: components=False on the combined steps, True on the measurements, one loss module."""
    head, (h_s, h_u, h_a, h_b, w_t) = fused_inputs()
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    steer = vgs.GradientSteering(opt, policy="auto", every=2)
    loss_fn = vgs.FusedLinearVGSLoss()
    modes = []
    for _ in range(4):
        loss_fn.components = steer.needs_components
        steer.backward(loss_fn(h_s, h_u, head.weight, h_a, h_b, w_t))
        opt.step()
        opt.zero_grad()
        modes.append(steer.stats["mode"])
    assert modes == ["exact", "combined", "exact", "combined"]


# ----------------------------------------------------------------------------- 2. auto after a fallback


def test_2_auto_fallback_does_not_seed_the_ema():
    model, (x, y) = Net(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    steer = vgs.GradientSteering(opt, policy="auto", gamma=GAMMA, every=16)
    bad = losses(model, x, y)
    bad["vis"] = bad["vis"] * math.inf  # e.g. an fp16 overflow on the first step
    steer.backward(bad)
    steer.apply()  # (no step: .grad is inf)
    opt.zero_grad()
    assert steer.stats["fallback"] and math.isnan(steer.stats["eta_ema"])
    steer.backward(losses(model, x, y))  # measures again instead of running at eta = 1
    opt.step()
    opt.zero_grad()
    assert steer.stats["mode"] == "exact" and not steer.stats["fallback"]
    g = flat_grads(model, x, y)
    exact = g["std"].norm() / (g["std"] + GAMMA * g["vis"]).norm()
    torch.testing.assert_close(steer.eta_ema, exact, rtol=1e-5, atol=0)  # the first good measurement
    steer.backward(losses(model, x, y))
    opt.step()
    assert steer.stats["mode"] == "combined"
    torch.testing.assert_close(steer.stats["eta"], exact, rtol=1e-5, atol=0)


def test_2_auto_fallback_later_keeps_the_ema_and_remeasures():
    model, (x, y) = Net(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    steer = vgs.GradientSteering(opt, policy="auto", gamma=GAMMA, every=3)
    modes = []
    for step in range(6):
        L = losses(model, x, y)
        if step == 3:  # a measurement step falls back
            L["vis"] = L["vis"] * math.nan
        steer.backward(L)
        steer.apply()  # (no step: the weights stay, so every exact eta is the same)
        opt.zero_grad()
        modes.append(steer.stats["mode"])
        if step == 1:
            ema = steer.eta_ema.clone()
    assert modes == ["exact", "combined", "combined", "exact", "exact", "combined"]
    assert torch.isfinite(steer.eta_ema)
    torch.testing.assert_close(steer.eta_ema, ema, rtol=1e-5, atol=0)  # same weights: same eta, not 1


# ----------------------------------------------------------------------------- 4. resume in either order


@pytest.mark.parametrize("order", ["hook_then_load", "load_then_hook"])
def test_4_resume_in_either_order(order):
    x, y = make_batch()

    def run(model, opt, steer, steps):
        for _ in range(steps):
            opt.zero_grad()
            steer.backward(losses(model, x, y))
            opt.step()

    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    steer = vgs.GradientSteering(opt, policy="auto", gamma=GAMMA, every=3)
    run(model, opt, steer, 4)
    sd = copy.deepcopy(opt.state_dict())  # (a plain state_dict shares Adam's tensors with opt)
    assert sd["param_groups"][0][vgs.steering.STATE_KEY]["step_count"] == 4
    clone = Net()
    clone.load_state_dict(model.state_dict())
    opt2 = torch.optim.Adam(clone.parameters(), lr=1e-2)
    if order == "hook_then_load":
        steer2 = vgs.GradientSteering(opt2, policy="auto", gamma=GAMMA, every=3)
        opt2.load_state_dict(sd)
    else:  # what most loops and Trainer do
        opt2.load_state_dict(sd)
        steer2 = vgs.GradientSteering(opt2, policy="auto", gamma=GAMMA, every=3)
    assert steer2.step_count == 4 and vgs.steering.STATE_KEY not in opt2.param_groups[0]
    assert steer2.names == ("std", "vis", "lp")
    torch.testing.assert_close(steer2.eta_ema, steer.eta_ema)
    run(model, opt, steer, 3)  # steps 4, 5 (combined) and 6 (exact)
    run(clone, opt2, steer2, 3)
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert steer2.stats["mode"] == "exact" and steer2.step_count == 7
    steer3 = vgs.GradientSteering(torch.optim.SGD(Net().parameters(), lr=1.0), policy="auto")
    steer3.load_state_dict(steer.state_dict())  # the hook's own state_dict, without an optimizer
    assert steer3.step_count == 7


# ----------------------------------------------------------------------------- 5. model.zero_grad()


def test_5_model_zero_grad_discards_the_components():
    model, (x, y) = Net(), make_batch()
    ref = expected("vgs", flat_grads(model, x, y))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    steer = vgs.GradientSteering(opt, gamma=GAMMA)
    steer.backward(losses(model, x, y, scale=math.nan))  # a bad batch ...
    model.zero_grad()                                    # ... discarded through the model
    steer.backward(losses(model, x, y))
    steer.apply()
    torch.testing.assert_close(steered_grad(model), ref, rtol=1e-5, atol=1e-7)

    steer.reset()
    model.zero_grad()
    steer.backward(losses(model, x, y))
    model.zero_grad()  # discarded right before the step: nothing is steered, nothing stepped
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_5_in_place_zeroing_raises():
    model, (x, y) = Net(), make_batch()
    steer = vgs.GradientSteering(torch.optim.SGD(model.parameters(), lr=1.0), gamma=GAMMA)
    steer.backward(losses(model, x, y))
    model.zero_grad(set_to_none=False)
    with pytest.raises(RuntimeError, match=r"\.grad of \d+ parameter.*optimizer.zero_grad\(\)"):
        steer.backward(losses(model, x, y))


# ----------------------------------------------------------------------------- 6. a GradScaler not passed


@pytest.mark.parametrize("explicit_unscale", [True, False])
def test_6_grad_scaler_not_given_to_the_hook_steers_before_unscaling(explicit_unscale):
    """The loop scales the losses itself (the usual AMP idiom) and never tells the hook."""
    model, (x, y) = Net(), make_batch()
    g = flat_grads(model, x, y)
    ref = expected("vgs", g)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    steer = vgs.GradientSteering(opt, gamma=GAMMA)
    steer.backward({n: scaler.scale(v) for n, v in losses(model, x, y).items()})
    if explicit_unscale:
        scaler.unscale_(opt)  # e.g. before clipping: steers first
        torch.testing.assert_close(steered_grad(model), ref, rtol=1e-4, atol=1e-7)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    scaler.step(opt)
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    step = torch.cat([(b - a).reshape(-1) for a, b in zip(after, before)])
    torch.testing.assert_close(step, ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(steer.stats["norms"][0], g["std"].norm(), rtol=1e-2, atol=0)  # unscaled


# ----------------------------------------------------------------------------- 7. clipping


def test_7_clipping_before_steering_raises_and_steer_clip_is_right():
    model, (x, y) = Net(), make_batch()
    ref = expected("vgs", flat_grads(model, x, y))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    steer = vgs.GradientSteering(opt, gamma=GAMMA)
    steer.backward(losses(model, x, y))
    nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # sees only g_std
    with pytest.raises(RuntimeError, match=r"steer.clip_grad_norm_"):
        opt.step()
    opt.zero_grad()
    steer.backward(losses(model, x, y))
    norm = steer.clip_grad_norm_(1e-3)
    torch.testing.assert_close(norm, ref.norm(), rtol=1e-5, atol=0)  # the steered gradient's norm
    torch.testing.assert_close(steered_grad(model), ref * (1e-3 / (ref.norm() + 1e-6)), rtol=1e-5, atol=1e-9)
    opt.step()  # already steered: the step uses the clipped gradient


def test_7_clip_with_scaler_unscales_once():
    model, (x, y) = Net(), make_batch()
    ref = expected("vgs", flat_grads(model, x, y))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    steer = vgs.GradientSteering(opt, gamma=GAMMA, scaler=scaler)
    steer.backward(losses(model, x, y))
    norm = steer.clip_grad_norm_(1e9)  # steers, unscales, clips (a no-op here)
    torch.testing.assert_close(norm, ref.norm(), rtol=1e-4, atol=0)
    scaler.step(opt)  # does not unscale again
    scaler.update()


def test_7_clipping_on_combined_steps_is_fine():
    """One combined backward leaves the steered gradient in .grad: plain clipping is correct."""
    model, (x, y) = Net(), make_batch()
    ref = expected("fixed", flat_grads(model, x, y))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    steer = vgs.GradientSteering(opt, policy="fixed", eta=ETA, gamma=GAMMA)
    steer.backward(losses(model, x, y))
    norm = nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    torch.testing.assert_close(norm, ref.norm(), rtol=1e-5, atol=0)
    opt.step()


# ----------------------------------------------------------------------------- the loss output carries its weights


def logits(seed=0, shape=(2, 5, 13)):
    g = torch.Generator().manual_seed(seed)
    s, u = (torch.randn(shape, generator=g).requires_grad_() for _ in range(2))
    a, b = (torch.randn(shape, generator=g) for _ in range(2))
    return s, u, a, b


def test_backward_takes_the_loss_output_and_checks_weights():
    s, u, a, b = logits()
    p = nn.Parameter(torch.ones(()))
    out = vgs.VGSLoss(gamma=3.0, lam=0.1)(s * p, u * p, a, b)
    opt = torch.optim.SGD([p], lr=1.0)
    ref = torch.autograd.grad(out.std + 3.0 * out.vis + 0.1 * out.lp, p, retain_graph=True)[0]
    steer = vgs.GradientSteering(opt, policy="sum")
    steer.backward(out)
    assert steer.names == ("std", "vis", "lp")
    steer.apply()
    torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="weighs 'vis' by 3.0 but GradientSteering's weight is 2.0"):
        vgs.GradientSteering(torch.optim.SGD([nn.Parameter(torch.ones(()))]), gamma=2.0).backward(out)
    with pytest.raises(ValueError, match="loss's own eta"):
        vgs.GradientSteering(torch.optim.SGD([nn.Parameter(torch.ones(()))])).backward(
            vgs.VGSLoss(eta=0.41)(s * p, u * p, a, b))


def test_stats_have_the_same_keys_every_step():
    model, (x, y) = Net(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steer = vgs.GradientSteering(opt, policy="auto", gamma=GAMMA, every=2)
    for _ in range(3):
        steer.backward(losses(model, x, y))
        opt.step()
        opt.zero_grad()
        assert set(steer.stats) == set(STAT_KEYS)
        assert steer.stats["cos"].shape == (3, 3) and steer.stats["norms"].shape == (3,)
    assert steer.stats["mode"] == "exact" and math.isfinite(steer.stats["eta_error"])


# ----------------------------------------------------------------------------- siblings: the hook's inputs


def test_sparse_gradients_raise_clearly():
    emb = nn.Embedding(10, 4, sparse=True)
    with pytest.raises(TypeError, match="sparse=False"):
        vgs.GradientSteering(torch.optim.SGD(emb.parameters(), lr=0.1), model=emb)
    steer = vgs.GradientSteering(torch.optim.SGD(emb.parameters(), lr=0.1))
    h = emb(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="sparse=False"):
        steer.backward({"std": h.sum(), "vis": (h ** 2).sum()})


@pytest.mark.parametrize("ret, error", [
    (lambda G, names: [1.0, 0.5, 0.0], None),                      # a list works
    (lambda G, names: torch.ones(2), "must return a \\[k\\] = \\[3\\] tensor"),
    (lambda G, names: torch.tensor(1.0), "got shape \\(\\)"),
    (lambda G, names: "abc", "must return 3 coefficients"),
])
def test_callable_policy_output_is_validated(ret, error):
    model, (x, y) = Net(), make_batch()
    steer = vgs.GradientSteering(torch.optim.SGD(model.parameters(), lr=1.0), policy=ret, gamma=GAMMA)
    steer.backward(losses(model, x, y))
    if error is None:
        steer.apply()
        g = flat_grads(model, x, y)
        torch.testing.assert_close(steered_grad(model), g["std"] + 0.5 * g["vis"], rtol=1e-5, atol=1e-7)
    else:
        with pytest.raises((ValueError, TypeError), match=error):
            steer.apply()


# ----------------------------------------------------------------------------- siblings: loss inputs


def test_empty_batch_gives_zero_loss_and_gradients():
    s, u, a, b = logits(shape=(2, 0, 13))
    out = vgs.VGSLoss()(s, u, a, b)
    assert out.total.item() == 0.0 and out.vds.shape == (2, 0)
    out.total.backward()
    assert s.grad.shape == s.shape


@pytest.mark.parametrize("n", [0, torch.tensor(0), -3, torch.tensor(-1.0)])
def test_num_items_in_batch_must_be_positive(n):
    s, u, a, b = logits()
    with pytest.raises(ValueError, match="num_items_in_batch must be a count > 0"):
        vgs.VGSLoss(reduction="token")(s, u, a, b, num_items_in_batch=n)


@pytest.mark.parametrize("mask", [
    torch.tensor([[1.0, 0.5, 1, 1, 0]] * 2),              # a weight
    torch.tensor([[1, -1, 1, 1, 0]] * 2),                 # -1
    torch.tensor([[1.0, math.nan, 1, 1, 0]] * 2),         # NaN
    torch.tensor([[-100, -100, 5, 7, 2]] * 2),            # a labels tensor
])
def test_non_binary_masks_raise(mask):
    s, u, a, b = logits()
    with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
        vgs.VGSLoss()(s, u, a, b, mask)
    with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
        vgs.decomposed_kl(s, u, a, b, mask)


def test_binary_masks_of_any_dtype_agree():
    s, u, a, b = logits()
    m = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]])
    ref = vgs.VGSLoss()(s, u, a, b, m.bool()).total
    for dt in (torch.int64, torch.float32, torch.uint8):
        torch.testing.assert_close(vgs.VGSLoss()(s, u, a, b, m.to(dt)).total, ref)


# ----------------------------------------------------------------------------- siblings: backend reporting


def test_backend_info_and_one_warning_on_fallback(monkeypatch):
    from vgs_kernels.ops import backend as _backend

    info = vgs.backend_info()
    assert info["cpu"] == ("cpp" if info["cpp_loaded"] else "reference")
    assert set(info) >= {"cpu", "cuda", "cpu_reason", "cpp_loaded", "cpp_error", "triton", "torch"}
    monkeypatch.setattr(_backend, "HAS_CPP", False)
    monkeypatch.setattr(_backend, "CPP_ERROR", "ImportError: undefined symbol: _ZN3c10")
    monkeypatch.setattr(_backend, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _backend.resolve(torch.device("cpu")) == "reference"
        assert _backend.resolve(torch.device("cpu")) == "reference"
    assert len(caught) == 1 and "undefined symbol" in str(caught[0].message)
    assert "rebuild" in vgs.backend_info()["cpu_reason"]


def test_a_backward_that_bypasses_the_hook_raises():
    """E.g. a framework's own loss.backward() (Trainer): the step would go unsteered."""
    model, (x, y) = Net(), make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    steer = vgs.GradientSteering(opt, gamma=GAMMA)
    L = losses(model, x, y)
    (L["std"] + GAMMA * L["vis"]).backward()
    with pytest.raises(RuntimeError, match="did not come through steer.backward"):
        opt.step()
    opt.zero_grad()
    opt.step()  # nothing to step: fine
    steer.backward(losses(model, x, y))
    steer.clip_grad_norm_(1.0)
    opt.step()  # steered by clip_grad_norm_ already: fine


def test_scaler_and_a_scaling_backward_fn_are_not_combined():
    class Acc:  # stands for accelerate.Accelerator: backward() scales with self.scaler
        def __init__(self):
            self.scaler = torch.amp.GradScaler("cpu")

        def backward(self, loss, **kwargs):
            self.scaler.scale(loss).backward(**kwargs)

    acc = Acc()
    opt = torch.optim.SGD(Net().parameters(), lr=1.0)
    with pytest.raises(ValueError, match="scaled twice; drop scaler="):
        vgs.GradientSteering(opt, scaler=acc.scaler, backward_fn=acc.backward)


def test_loss_output_without_weights_uses_the_hooks():
    """An output rebuilt without its weights (e.g. `_make`) must not fall back to weights of 1."""
    s, u, a, b = logits()
    p = nn.Parameter(torch.ones(()))
    out = vgs.VGSLoss(gamma=3.0, lam=0.1)(s * p, u * p, a, b)
    bare = vgs.VGSLossOutput._make(out)
    assert bare.weights is None and set(bare.losses()) == {"std", "vis", "lp"}
    ref = torch.autograd.grad(out.std + 3.0 * out.vis + 0.1 * out.lp, p, retain_graph=True)[0]
    steer = vgs.GradientSteering(torch.optim.SGD([p], lr=1.0), policy="sum", gamma=3.0, lam=0.1)
    steer.backward(bare)
    steer.apply()
    torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7)
