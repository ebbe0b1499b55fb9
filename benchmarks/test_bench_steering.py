"""pytest-benchmark suite for gradient steering (run: `pytest benchmarks/`).

Gram + combine vs flatten/concat vs torch._foreach_* on Qwen3-VL-2B-like parameter lists (scaled
down on CPU) and on the issue-3 goal case (~120 M parameters in 25 tensors); each impl is checked
against a float64 reference before it is timed.
"""
import pytest
import torch

from . import suite_steering
from .harness import run_case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SETS = {"qwen3-vl-2b": lambda: suite_steering.qwen3_vl_2b_shapes(8 if DEVICE.type == "cpu" else 2),
        "goal-120M": suite_steering.goal_shapes}


@pytest.mark.parametrize("impl", ["vgs gram+combine", "flatten/concat", "foreach"])
@pytest.mark.parametrize("params", sorted(SETS))
def test_steering(benchmark, params, impl):
    case = suite_steering.case(params, SETS[params](), torch.float32, DEVICE)
    keep = {impl, next(i.reference for i in case.impls if i.name == impl)}
    case.impls = [i for i in case.impls if i.name in keep]
    status = {r.impl: r.status for r in run_case(case, DEVICE, repeats=0, warmup=1)}
    assert status[impl] == "ok", status[impl]
    (target,) = [i for i in case.impls if i.name == impl]
    benchmark.extra_info.update(params=case.params, bytes_moved=target.bytes_moved)
    benchmark.pedantic(target.step, setup=lambda: ((target.setup(),), {}), rounds=5, warmup_rounds=1)
