"""Suite 3 — one on-policy distillation training step of a tiny VLM: monolithic vs VGS fixed η vs
VGS exact vs VGS auto-η.

Student and teacher are randomly initialised Qwen3-VL models built from transformers configs (no
download); the batch is an image + prompt + a sampled response (random tokens: sampling is the same
for every method, so it is not timed). A step is what the training loop does after sampling:

  monolithic   2 forward passes (student, teacher; with the image), Std loss, 1 backward, SGD step
  vgs fixed η  4 forward passes (vgs_kernels.vlm.distill_logits), VGSLoss(eta=0.41).total, 1 backward
  vgs exact    4 passes, GradientSteering(policy="vgs"): one backward per component (std, vis,
               lp), Gram + combine
  vgs auto-η   4 passes, GradientSteering(policy="auto"): exact every K steps, fixed in between

Each timed call runs K = `STEPS` optimizer steps from the same initial weights (so auto-η's cost
is its amortised one: one exact step in K); time ratios are vs monolithic. The agreement check
(the first, untimed call of each method) runs a single step and compares the gradient that
`optimizer.step()` receives (after the steering hook) with the same method computed
independently: plain-torch reference KL backend, and for the steered methods
torch.autograd.grad per component + flatten + Eq. 15.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from .harness import Case, Impl

STEPS = 4      # optimizer steps per timed call (= auto-η's refresh interval here)
GAMMA, LAM, ETA, LR = 2.0, 0.01, 0.41, 0.05
N_IMPLS = 7    # 4 timed + 3 check-only references

SIZES = {  # vocab, student hidden, teacher hidden, layers, batch, prompt, response, image grid
    "tiny": dict(vocab=1000, hidden=64, teacher_hidden=96, layers=1, batch=2, prompt=8, response=8, grid=4),
    "small": dict(vocab=8192, hidden=128, teacher_hidden=192, layers=2, batch=2, prompt=24, response=64,
                  grid=8),
}


def tiny_qwen3_vl(vocab: int, hidden: int, layers: int, seed: int) -> torch.nn.Module:
    """A randomly initialised Qwen3-VL with the last four ids as its vision tokens."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    head_dim = 32
    section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # M-RoPE t/h/w
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=hidden // head_dim, num_key_value_heads=max(1, hidden // head_dim // 2),
                head_dim=head_dim, max_position_embeddings=1024, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                  patch_size=8, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 4,
                        video_token_id=vocab - 3, vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(cfg)


def make_batch(vocab: int, batch: int, prompt: int, response: int, grid: int, device: torch.device, seed: int = 0):
    """<vision_start> image tokens <vision_end> prompt response, with Qwen's vision inputs."""
    g = torch.Generator().manual_seed(seed)
    n_img = grid * grid // 4  # spatial merge 2
    ids = torch.cat([torch.full((batch, 1), vocab - 2), torch.full((batch, n_img), vocab - 4),
                     torch.full((batch, 1), vocab - 1),
                     torch.randint(1, vocab - 4, (batch, prompt + response), generator=g)], 1)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == vocab - 4).long(),
                  pixel_values=torch.randn(batch * grid * grid, 3 * 2 * 8 * 8, generator=g),
                  image_grid_thw=torch.tensor([[1, grid, grid]] * batch))
    response_mask = torch.zeros_like(ids, dtype=torch.bool)
    response_mask[:, -response:] = True
    return {k: v.to(device) for k, v in inputs.items()}, response_mask.to(device)


def case(size: str, device: torch.device) -> Case:
    import vgs_kernels as vgs
    from vgs_kernels import vlm
    from vgs_kernels._backend import use_backend

    cfg = SIZES[size]
    student = tiny_qwen3_vl(cfg["vocab"], cfg["hidden"], cfg["layers"], seed=0).to(device).train()
    teacher = tiny_qwen3_vl(cfg["vocab"], cfg["teacher_hidden"], cfg["layers"], seed=1).to(device).eval()
    teacher.requires_grad_(False)
    batch, rmask = make_batch(cfg["vocab"], cfg["batch"], cfg["prompt"], cfg["response"], cfg["grid"], device)
    text_batch, text_rmask = vlm.strip_images(batch, rmask, vlm.VisionTokens.from_model(student))
    params = [p for p in student.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in params]
    pos, mask = vlm.response_positions(rmask)

    def four_passes():
        return vlm.distill_logits(student, teacher, batch, rmask, text_batch, text_rmask)

    def monolithic(opt, steer):
        s = vlm.response_logits(student, batch, pos)
        with torch.no_grad():
            a = vlm.response_logits(teacher, batch, pos)
        vgs.VGSLoss()(s, None, a, None, mask).total.backward()
        opt.step()

    def fixed(opt, steer):
        vgs.VGSLoss(gamma=GAMMA, lam=LAM, eta=ETA)(*four_passes()).total.backward()
        opt.step()

    def steered(opt, steer):
        out = vgs.VGSLoss(gamma=GAMMA, lam=LAM)(*four_passes())
        steer.backward({"std": out.std, "vis": out.vis, "lp": out.lp})
        opt.step()

    def exact_reference(opt, steer):
        """autograd.grad per component, flatten, Eq. 15: η·(g_std + γ·g_vis + λ·g_lp)."""
        out = vgs.VGSLoss(gamma=GAMMA, lam=LAM)(*four_passes())
        std, vis, lp = (torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(
            params, torch.autograd.grad(c, params, retain_graph=True, allow_unused=True))])
            for c in (out.std, out.vis, out.lp))
        eta = std.norm() / (std + GAMMA * vis).norm()
        for p, g in zip(params, (eta * (std + GAMMA * vis + LAM * lp)).split([p.numel() for p in params])):
            p.grad = g.view_as(p)
        opt.step()

    def impl(name: str, step_fn: Callable, reference: Optional[str] = None, policy: Optional[str] = None,
             backend: Optional[str] = None, timed: bool = True) -> Impl:
        calls = [0]

        def setup():
            with torch.no_grad():
                for p, p0 in zip(params, initial):
                    p.copy_(p0)
            opt = torch.optim.SGD(params, lr=LR)
            opt.zero_grad(set_to_none=True)
            steer = None
            if policy == "vgs":
                steer = vgs.GradientSteering(opt, policy="vgs", gamma=GAMMA, lam=LAM)
            elif policy == "auto":
                steer = vgs.GradientSteering(opt, policy="auto", gamma=GAMMA, lam=LAM, every=STEPS)
            calls[0] += 1
            seen: list = []
            if calls[0] == 1:  # the checked call: one step; keep the gradient step() receives
                opt.register_step_pre_hook(
                    lambda *_: seen.extend(p.grad.detach().clone() for p in params if p.grad is not None))
            return opt, steer, 1 if calls[0] == 1 else STEPS, seen

        def step(state):
            opt, steer, n, _ = state
            with use_backend(backend) if backend else contextlib.nullcontext():
                for _ in range(n):
                    opt.zero_grad(set_to_none=True)
                    step_fn(opt, steer)

        def finish(state, _):
            if state[1] is not None:
                state[1].remove()
            return state[3]

        return Impl(name, step, setup, reference=reference, finish=finish, timed=timed)

    impls = [impl("monolithic", monolithic, reference="monolithic (reference KL)"),
             impl("monolithic (reference KL)", monolithic, backend="reference", timed=False),
             impl("vgs fixed η", fixed, reference="fixed η (reference KL)"),
             impl("fixed η (reference KL)", fixed, backend="reference", timed=False),
             impl("vgs exact", steered, reference="exact (autograd.grad + flatten)", policy="vgs"),
             impl("exact (autograd.grad + flatten)", exact_reference, backend="reference", timed=False),
             impl("vgs auto-η", steered, reference="exact (autograd.grad + flatten)", policy="auto")]
    params_desc = {"model": f"qwen3-vl h={cfg['hidden']} V={cfg['vocab']}",
                   "N": int(mask.sum()), "steps/call": STEPS}
    return Case("step", params_desc, impls, baselines=["monolithic"], tolerance=2e-3, ratio="slowdown")

