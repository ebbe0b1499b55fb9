"""pytest-benchmark suite for the loss (run: `pytest benchmarks/`; not part of `pytest tests`).

Same cases and impls as `vgs-bench --suite loss`; each impl is checked against its reference
before it is timed. Select with -k, e.g. `pytest benchmarks/ -k "2048 and fused"`.
"""
import pytest
import torch

from . import suite_loss
from .harness import run_case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = [(512, 32000), (2048, 32000), (256, 151936)] if DEVICE.type == "cpu" else \
    [(4096, 32000), (4096, 151936), (8192, 151936)]
IMPLS = ["vgs fused", "eager decomposed", "compiled decomposed", "eager mono", "vgs fused mono", "compiled mono"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwdbwd"])
@pytest.mark.parametrize("n,v", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
def test_loss(benchmark, n, v, mode, impl):
    (case,) = suite_loss.cases([(n, v, (mode,))], DTYPE, DEVICE)
    keep = {impl, next(i.reference for i in case.impls if i.name == impl) or impl}
    case.impls = [i for i in case.impls if i.name in keep]
    status = {r.impl: r.status for r in run_case(case, DEVICE, repeats=0, warmup=1)}
    assert status[impl] == "ok", status[impl]
    (target,) = [i for i in case.impls if i.name == impl]
    benchmark.extra_info.update(n=n, v=v, mode=mode, bytes_moved=target.bytes_moved)
    benchmark.pedantic(target.step, setup=lambda: ((target.setup(),), {}), rounds=5, warmup_rounds=1)
