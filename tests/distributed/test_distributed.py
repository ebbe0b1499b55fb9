"""Distributed steering (issue 4): DDP and FSDP2 give the single-process update on the concatenated batch.

Two processes on gloo (CPU) run every scenario below once, in one spawn (the start-up, importing
torch and transformers, is most of the time); each writes its final parameters (full tensors), the
Gram matrices and what it measured to a file. The tests compare them with a single process steering
the same model on the concatenated batch. Every collective is bounded by the process group's
timeout and the spawn by a deadline, so a bug fails instead of hanging.
"""
from __future__ import annotations

import datetime
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import vgs_kernels as vgs
from vgs_kernels.distributed.process_group import ProcessGroupSync, all_reduce_mean, resolve_group

from helpers.spawn import assert_params_close, no_errors, one_thread, spawn_ranks
from helpers.student import POLICY_KW, STEPS, WORLD, Student, batch, losses, rank_rows

TIMEOUT = datetime.timedelta(seconds=60)  # every collective
DEADLINE = 170                            # seconds for the whole spawn
ATOL, RTOL = 2e-5, 1e-4                   # fp32, 3 SGD steps

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


# ----------------------------------------------------------------------------- training


def train(model, steer, optimizer, seed, micro=1, rows=slice(None), no_sync=None, begin=None, stepping=None):
    """STEPS steps of `micro` accumulated micro-batches (all but the last under `no_sync`, if given);
    `begin(step)` is called first, `stepping(step)` is the context of optimizer.step().
    Returns the Gram of each step (None on combined steps) and which parameters had no gradient
    at the last step."""
    loss_fn = vgs.VGSLoss(gamma=2.0)
    grams = []
    for step in range(STEPS):
        if begin is not None:
            begin(step)
        for m in range(micro):
            with no_sync() if no_sync is not None and m < micro - 1 else nullcontext():
                steer.backward(losses(model, loss_fn, batch(seed, step, m, rows), 1.0 / micro))
        with stepping(step) if stepping is not None else nullcontext():
            optimizer.step()
        no_grad = [p.grad is None for p in model.parameters()]
        optimizer.zero_grad()
        grams.append(steer.stats["gram"].clone() if steer.stats["mode"] == "exact" else None)
    return grams, no_grad


# ----------------------------------------------------------------------------- scenarios


def scenario(name):
    """What a scenario name means: '<ddp|fsdp>_<policy or variant>'."""
    kind, _, rest = name.partition("_")
    return {"parallel": kind, "policy": rest if rest in POLICY_KW else "vgs",
            "auto": rest in ("modelauto", "accummodel"),                          # policy "auto", every=2
            "model_kw": rest in ("model", "modelauto", "accummodel", "unused"),   # the hook gets model=
            "micro": 3 if rest in ("accum", "accummodel", "bucketview") else 1,   # accumulated, no_sync
            "tied": rest == "tied", "heads": rest == "unused", "ignored": rest == "ignored",
            "bucket_view": rest == "bucketview"}


SCENARIOS = ([f"ddp_{p}" for p in POLICY_KW] + ["ddp_model", "ddp_modelauto", "ddp_accum", "ddp_accummodel",
                                                  "ddp_bucketview", "ddp_tied", "ddp_unused"]
             + [f"fsdp_{p}" for p in POLICY_KW] + ["fsdp_tied", "fsdp_ignored"])


class Collectives:
    """Records the c10d ops (name, numel of the first tensor) and the hook's gradient all-reduces
    (floating tensors beyond the k x k Gram: numel) of each step, and DDP's buckets per step."""

    def __init__(self):
        self.step, self.ops, self.grad_all_reduce, self.ddp_buckets = 0, [], [0] * STEPS, [[] for _ in range(STEPS)]

    def begin(self, step):
        self.step = step

    def ddp_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        self.ddp_buckets[self.step].append(bucket.buffer().numel())
        return allreduce_hook(state, bucket)

    @contextmanager
    def stepping(self, step):
        from torch.utils._python_dispatch import TorchDispatchMode
        ops, real, counts = [], dist.all_reduce, self.grad_all_reduce

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if "c10d" in str(func):
                    first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
                    ops.append((str(func), first.numel()))
                return func(*args, **(kwargs or {}))

        def all_reduce(tensor, *args, **kwargs):
            if tensor.is_floating_point() and tensor.numel() > 4:
                counts[step] += tensor.numel()
            return real(tensor, *args, **kwargs)

        dist.all_reduce = all_reduce
        try:
            with Mode():
                yield
        finally:
            dist.all_reduce = real
            self.ops.append(ops)


def run_scenario(name, rank):
    """One scenario on this rank; returns the full parameters after STEPS steps, the Grams and
    what was communicated."""
    from torch.distributed.fsdp import fully_shard

    sc = scenario(name)
    policy = "auto" if sc["auto"] else sc["policy"]
    seed = SCENARIOS.index(name)
    inner = Student(tied=sc["tied"], heads=sc["heads"], seed=seed)
    rec = Collectives()
    if sc["parallel"] == "ddp":
        model = nn.parallel.DistributedDataParallel(inner, gradient_as_bucket_view=sc["bucket_view"])
        model.register_comm_hook(None, rec.ddp_hook)
    else:
        for layer in inner.lm.model.layers:
            fully_shard(layer)
        model = fully_shard(inner, ignored_params={inner.lm.model.norm.weight} if sc["ignored"] else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    steer = vgs.GradientSteering(optimizer, policy=policy, gamma=2.0, process_group=None,
                                 **POLICY_KW[policy], **({"model": model} if sc["model_kw"] else {}))
    grams, no_grad = train(model, steer, optimizer, seed, sc["micro"], rank_rows(rank),
                  model.no_sync if sc["parallel"] == "ddp" else None, rec.begin, rec.stepping)
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in inner.named_parameters()}
    return {"params": params, "grams": grams, "ops": rec.ops, "grad_all_reduce": rec.grad_all_reduce,
            "ddp_buckets": rec.ddp_buckets,
            "none_grads": [n for (n, _), none in zip(inner.named_parameters(), no_grad) if none]}


def bad_inputs(rank):
    """Mismatched or missing components across ranks: every rank raises, nothing hangs."""
    out = {}
    for case, names in {"order": (("std", "vis"), ("vis", "std")), "missing": (("std", "vis"), ("std",))}.items():
        model = Student(seed=7)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        steer = vgs.GradientSteering(optimizer, policy="vgs", gamma=2.0)
        full = losses(model, vgs.VGSLoss(), batch(7, 0, 0, rank_rows(rank)))
        try:
            steer.backward({n: full[n] for n in names[rank]})
            optimizer.step()
            out[case] = "no error"
        except RuntimeError as e:
            out[case] = str(e)
        steer.remove()
    # FSDP2 with its gradient sync off during a per-component backward (the hook sees the model)
    from torch.distributed.fsdp import fully_shard
    model = fully_shard(Student(seed=8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steer = vgs.GradientSteering(optimizer, policy="vgs", gamma=2.0, model=model)
    model.set_requires_gradient_sync(False)
    try:
        steer.backward(losses(model, vgs.VGSLoss(), batch(8, 0, 0, rank_rows(rank))))
        out["fsdp_nosync"] = "no error"
    except RuntimeError as e:
        out["fsdp_nosync"] = str(e)
    # the bucketed average: mixed dtypes, buckets smaller than a tensor, non-contiguous tensors
    g = torch.Generator().manual_seed(rank)
    ts = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).half(), torch.randn(4, 6, generator=g).t(),
          torch.randn(1000, generator=g)]
    want = [t.float().clone() for t in ts]
    for t in want:
        dist.all_reduce(t)
    all_reduce_mean(ts, dist.group.WORLD, bucket_bytes=64)
    out["buckets"] = max((t.float() - w / WORLD).abs().max().item() for t, w in zip(ts, want))
    return out


def by_hand(rank):
    """DTensor gradients made with distribute_tensor: Shard and Replicate placements, each element
    counted once (the Gram of the full tensors); Partial refused; FSDP1's flat shards refused."""
    from torch.distributed.tensor import Partial, Replicate
    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(3)  # the same full tensors on every rank
    full = [[torch.randn(5, 3, generator=g) for _ in range(2)] for _ in range(4)]
    places = [[Shard(0)], [Replicate()], [Shard(1)], [Replicate()]]
    params = [nn.Parameter(distribute_tensor(torch.zeros(5, 3), mesh, pl)) for pl in places]
    cols = [[distribute_tensor(full[j][i], mesh, places[j]) for i in range(2)] for j in range(4)]
    optimizer = torch.optim.SGD(params, lr=0.1)
    sync = ProcessGroupSync(optimizer)
    _, _, lists = sync.prepare(params, cols, ("std", "vis"))
    G = sync.reduce_gram(vgs.gram(lists))
    out = {"gram_error": (G - vgs.gram([[f[i] for f in full] for i in range(2)])).abs().max().item(),
           "counted": sum(t is not None for t in lists[0])}
    partial = [[DTensor.from_local(torch.ones(5, 3), mesh, [Partial()])] * 2]
    try:
        sync.prepare(params[:1], partial, ("std", "vis"))
        out["partial"] = "no error"
    except ValueError as e:
        out["partial"] = str(e)
    # FSDP1 needs an accelerator; its parameters carry this mark (the function it uses)
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened
    model = nn.Linear(4, 2)
    _set_fsdp_flattened(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steer = vgs.GradientSteering(optimizer)
    y = model(torch.randn(3, 4))
    steer.backward({"std": y.square().mean(), "vis": y.sin().mean()})
    try:
        optimizer.step()
        out["fsdp1"] = "no error"
    except ValueError as e:
        out["fsdp1"] = str(e)
    return out


def head_inputs():
    g = torch.Generator().manual_seed(11)
    hs, ht = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 6, generator=g)
    ws, wt, bs = torch.randn(30, 8, generator=g), torch.randn(30, 6, generator=g), torch.randn(30, generator=g)
    return hs, ht, ws, wt, bs, torch.ones(2, 5, dtype=torch.long)


def head_losses(ws, wt, bs):
    """The drop-in and the fused VGS loss on (possibly DTensor) heads: losses and head gradients."""
    hs, ht, _, _, _, mask = head_inputs()
    out = {}
    loss = vgs.fused_chunked_divergence_loss(hs, ht, ws, wt, mask, 1.0, student_lm_head_bias=bs)[0]
    loss = loss + vgs.FusedLinearVGSLoss()(hs, hs.flip(0), ws, ht, ht.flip(0), wt, mask, bias_student=bs).total
    out["loss"] = loss.detach()
    for name, g in zip(("ws", "bs"), torch.autograd.grad(loss, [ws, bs])):
        out[name] = g.full_tensor() if isinstance(g, DTensor) else g
    return out


def dtensor_head(rank):
    """FSDP2 keeps an LM head as a DTensor (Shard(0)): the losses take it (TRL calls .full_tensor() once)."""
    mesh = init_device_mesh("cpu", (WORLD,))
    _, _, ws, wt, bs, _ = head_inputs()
    shard = lambda t: distribute_tensor(t, mesh, [Shard(0)]).requires_grad_()  # noqa: E731
    return head_losses(shard(ws), distribute_tensor(wt, mesh, [Shard(0)]), shard(bs))


def tasks(rank, path):
    """What every rank runs (helpers.spawn): every scenario, then the misuse and by-hand cases."""
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=TIMEOUT)
    return ([(name, lambda name=name: run_scenario(name, rank)) for name in SCENARIOS]
            + [(key, lambda fn=fn: fn(rank)) for key, fn in (("bad", bad_inputs), ("by_hand", by_hand),
                                                            ("dtensor_head", dtensor_head))])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs every scenario on WORLD processes; returns each rank's results."""
    return spawn_ranks(tasks, tmp_path_factory.mktemp("dist"), world=WORLD, deadline=DEADLINE,
                       what="the distributed workers")


def reference(name):
    """One process, the same model, the concatenated batch (all ranks' sequences at once)."""
    with one_thread():
        return _reference(name)


def _reference(name):
    sc = scenario(name)
    policy = "auto" if sc["auto"] else sc["policy"]
    seed = SCENARIOS.index(name)
    model = Student(tied=sc["tied"], heads=sc["heads"], seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    steer = vgs.GradientSteering(optimizer, policy=policy, gamma=2.0, **POLICY_KW[policy])
    assert steer._sync.group() is None  # no distributed set-up in this process
    if sc["heads"]:  # the extra head is used by rank 0's sequences only: the mean of the ranks' losses
        loss_fn = vgs.VGSLoss(gamma=2.0)
        grams = []
        for step in range(STEPS):
            parts = [losses(model, loss_fn, batch(seed, step, 0, rank_rows(r)), 1 / WORLD)
                     for r in range(WORLD)]
            steer.backward({n: sum(p[n] for p in parts) for n in parts[0]})
            optimizer.step()
            optimizer.zero_grad()
            grams.append(steer.stats["gram"].clone() if steer.stats["mode"] == "exact" else None)
    else:
        grams, _ = train(model, steer, optimizer, seed, sc["micro"])
    return {n: p.detach() for n, p in model.named_parameters()}, grams


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", SCENARIOS)
def test_same_update_as_one_process(ranks, name):
    got = no_errors(ranks, name)
    want, want_grams = reference(name)
    for r, res in enumerate(got):
        assert res["params"].keys() == want.keys()
        assert_params_close(res["params"], want, atol=ATOL, rtol=RTOL, rank=r)
        for step, (g, w) in enumerate(zip(res["grams"], want_grams)):
            assert (g is None) == (w is None), f"step {step}: exact and combined steps differ"
            if w is not None:  # the Gram of the averaged gradients, every parameter counted once
                torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    exact = [g is not None for g in want_grams]
    assert any(exact) == (scenario(name)["policy"] != "fixed" or scenario(name)["auto"])


def test_tied_embedding_is_one_parameter():
    model = Student(tied=True)
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight
    assert sum(p is model.lm.lm_head.weight for p in model.parameters()) == 1


@pytest.mark.parametrize("name", ["ddp_model", "ddp_modelauto", "ddp_accummodel"])
def test_ddp_no_doubled_communication(ranks, name):
    """model=ddp: per-component steps are all-reduced once by the hook (DDP sends nothing);
    combined steps ("auto" between measurements) are synced by DDP alone (the hook sends nothing)."""
    res = ranks[0][name]
    numel = sum(p.numel() for p in res["params"].values())
    for step, g in enumerate(res["grams"]):
        if g is not None:  # per component: k = 2 gradients averaged by the hook, DDP idle
            assert res["ddp_buckets"][step] == [], step
            assert res["grad_all_reduce"][step] == 2 * numel, step
        else:
            assert sum(res["ddp_buckets"][step]) == numel, step
            assert res["grad_all_reduce"][step] == 0, step
    grams = res["grams"]
    assert any(g is None for g in grams) == scenario(name)["auto"]


def test_ddp_without_model_kw_still_exact(ranks):
    """Without model= the hook averages every component itself (DDP synced component 0 already)."""
    res = ranks[0]["ddp_vgs"]
    numel = sum(p.numel() for p in res["params"].values())
    assert [sum(b) for b in res["ddp_buckets"]] == [numel] * STEPS
    assert res["grad_all_reduce"] == [2 * numel] * STEPS


@pytest.mark.parametrize("name", [f"fsdp_{p}" for p in POLICY_KW] + ["fsdp_tied"])
def test_fsdp_nothing_gathered_to_steer(ranks, name):
    """FSDP2: during the step the only collective is the all-reduce of the k x k Gram (exact steps)
    or nothing (combined steps): no gradient or parameter is all-gathered."""
    res = ranks[0][name]
    for step, ops in enumerate(res["ops"]):
        want = [("c10d.allreduce_.default", 4)] if res["grams"][step] is not None else []
        assert ops == want, (step, ops)


def test_unused_parameters(ranks):
    """The extra head gets gradients on rank 0 only; `never` on no rank: it stays None."""
    for r in range(WORLD):
        res = ranks[r]["ddp_unused"]
        assert res["none_grads"] == ["never.weight", "never.bias"], (r, res["none_grads"])
        want = Student(heads=True, seed=SCENARIOS.index("ddp_unused"))
        torch.testing.assert_close(res["params"]["never.weight"], want.never.weight.detach(), atol=0, rtol=0)


def test_fsdp_ignored_param_is_averaged_and_counted_once(ranks):
    for ops in ranks[0]["fsdp_ignored"]["ops"]:  # presence/fingerprint check, the replica's average, the Gram
        names = [o for o, _ in ops]
        assert "c10d.allgather_.default" not in names and all("allreduce" in o for o in names), ops


def test_mismatched_components_raise_on_every_rank(ranks):
    for r in range(WORLD):
        bad = ranks[r]["bad"]
        assert "error" not in bad, bad.get("error")
        for case in ("order", "missing"):
            assert "ranks disagree" in bad[case] and "('std', 'vis')" in bad[case], (r, case, bad[case])
        assert "set_requires_gradient_sync(False)" in bad["fsdp_nosync"], bad["fsdp_nosync"]
        assert bad["buckets"] < 1e-3  # fp16 tensor in the mix


def test_dtensor_placements_by_hand(ranks):
    for r in range(WORLD):
        res = ranks[r]["by_hand"]
        assert "error" not in res, res.get("error")
        assert res["gram_error"] < 1e-5
        assert "Partial" in res["partial"], res["partial"]
        assert "FSDP1" in res["fsdp1"], res["fsdp1"]
    # every rank counts its 2 shards; each of the 2 replicated tensors is counted by one rank
    assert sum(ranks[r]["by_hand"]["counted"] for r in range(WORLD)) == 2 * WORLD + 2


def test_dtensor_lm_head_in_the_losses(ranks):
    _, _, ws, wt, bs, _ = head_inputs()
    want = head_losses(ws.clone().requires_grad_(), wt, bs.clone().requires_grad_())
    for r in range(WORLD):
        got = ranks[r]["dtensor_head"]
        assert "error" not in got, got.get("error")
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- single process


def test_single_process_needs_no_distributed_setup():
    assert not dist.is_initialized()
    assert resolve_group(None) is None
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steer = vgs.GradientSteering(optimizer, policy="vgs", gamma=2.0, process_group=None)
    x = torch.randn(4, 3)
    steer.backward({"std": model(x).square().mean(), "vis": model(x).sin().mean()})
    optimizer.step()
    assert steer.stats["gram"].shape == (2, 2)


def test_group_not_initialised_is_an_error(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="not initialised.*init_process_group"):
        vgs.GradientSteering(optimizer, process_group=object())
    # a group that goes away after the hook was made: a clear error at the step, not a hang
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=TIMEOUT)
    try:
        group = dist.new_group([0])
        steer = vgs.GradientSteering(optimizer, process_group=group)
        assert steer._sync.group() is None  # one rank: nothing to communicate
        x = torch.randn(4, 3)
        steer.backward({"std": model(x).square().mean(), "vis": model(x).sin().mean()})
        optimizer.step()
        steer.backward({"std": model(x).square().mean(), "vis": model(x).sin().mean()})
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="not initialised"):
        optimizer.step()
    steer.remove()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ProcessGroupSync(optimizer, None, model="ddp")
