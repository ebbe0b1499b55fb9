"""The benchmark CLI on tiny sizes: it runs every suite, checks before timing, writes its outputs.

No timing assertions (timings belong in the benchmark output, not in tests).
"""
import csv
import importlib
import os

import pytest
import torch

try:  # installed: vgs_kernels.benchmarks; from a source checkout: the top-level benchmarks/ package
    bench = importlib.import_module("vgs_kernels.benchmarks.__main__")
except ImportError:
    bench = importlib.import_module("benchmarks.__main__")
harness = importlib.import_module(bench.__package__ + ".harness")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--sizes", "tiny", "--suite", "all", "--device", "cpu", "--no-compile", "--no-progress",
            "--out", str(out)]
    return bench.main(argv), out


def _rows(out):
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


def test_cli_runs_every_suite_and_writes_outputs(tiny_run, capsys):
    status, out = tiny_run
    rows = _rows(out)
    assert {r["suite"] for r in rows} == {"loss", "steering", "step", "fused-linear"}
    for r in rows:  # every row names the run's environment
        assert r["device"] and r["torch"] == torch.__version__ and r["date"]
    assert os.path.getsize(os.path.join(out, "results.md")) > 0
    assert any(name.endswith(".png") for name in os.listdir(out))
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(float(r["median_ms"]) > 0 and int(r["repeats"]) == 1 for r in ok)
    # The baselines are plain torch and must always run; the exit status reports any failed impl.
    assert {"eager decomposed", "eager mono", "flatten/concat", "foreach", "monolithic"} <= {r["impl"] for r in ok}
    assert status == (0 if len(ok) == len(rows) else 1)


def test_loss_table_has_the_ratios_side_by_side(tiny_run):
    _, out = tiny_run
    loss = [r for r in _rows(out) if r["suite"] == "loss" and r["status"] == "ok"]
    assert {r["mode"] for r in loss} == {"fwd", "bwd", "fwdbwd"}
    eager = next(r for r in loss if r["impl"] == "eager decomposed" and r["mode"] == "fwdbwd")
    assert float(eager["speedup_vs[eager mono]"]) > 0 and float(eager["frac_copy_bw"]) > 0


def test_a_wrong_kernel_is_reported_and_not_timed():
    dev = torch.device("cpu")
    x = torch.randn(4, 8)
    impls = [harness.Impl("right", lambda _: x * 2),
             harness.Impl("wrong", lambda _: x * 2 + 1e-2, reference="right")]
    case = harness.Case("t", {}, impls, baselines=["right"], tolerance=1e-4)
    res = {r.impl: r for r in harness.run_case(case, dev, repeats=2, warmup=1)}
    assert res["right"].status == "ok" and len(res["right"].times) == 2
    assert res["wrong"].status.startswith("mismatch") and res["wrong"].times == []
    assert res["wrong"].error > 1e-4 and res["right"].error is None


def test_a_lenient_baseline_is_timed_with_its_error_reported():
    x = torch.randn(4, 8)
    impls = [harness.Impl("exact", lambda _: x, timed=False),
             harness.Impl("rough", lambda _: x + 1e-2, reference="exact", strict=False)]
    case = harness.Case("t", {}, impls, baselines=["rough"], tolerance=1e-4)
    (res,) = harness.run_case(case, torch.device("cpu"), repeats=1, warmup=1)
    assert res.impl == "rough" and res.status == "ok" and res.error > 1e-4 and len(res.times) == 1


def test_a_failed_reference_is_replaced_by_its_fallback():
    dev = torch.device("cpu")
    x = torch.randn(4, 8)

    def oom(_):
        raise MemoryError("out of memory")

    impls = [harness.Impl("ref", oom), harness.Impl("ref (chunked)", lambda _: x * 2, fallback_for="ref"),
             harness.Impl("fast", lambda _: x * 2, reference="ref"),
             harness.Impl("bad", lambda _: x * 3, reference="ref")]
    case = harness.Case("t", {}, impls, baselines=["ref"], tolerance=1e-4)
    res = {r.impl: r for r in harness.run_case(case, dev, repeats=1, warmup=1)}
    assert set(res) == {"ref", "fast", "bad"} and res["ref"].status == "OOM"
    assert res["fast"].status == "ok" and res["bad"].status.startswith("mismatch")


def test_cpu_peak_memory_sees_a_large_temporary():
    if not harness.cpu_peak_supported():
        pytest.skip("no /proc/self/clear_refs")
    with harness.PeakMemory(torch.device("cpu")) as mem:
        y = torch.ones(16 << 20)  # 64 MiB, freed before the end
        del y
    assert 60 << 20 <= mem.peak <= 80 << 20


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        bench.parse_args(["--suite", "nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "sideways"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_on_cuda_checks_every_fast_path(tmp_path):
    """The Triton / CUDA paths pass their agreement checks inside the benchmark (bf16, tiny sizes)."""
    status = bench.main(["--sizes", "tiny", "--suite", "all", "--device", "cuda", "--no-progress",
                         "--out", str(tmp_path)])
    rows = _rows(tmp_path)
    assert [r for r in rows if r["status"] != "ok"] == [] and status == 0
    assert all(float(r["frac_copy_bw"]) > 0 for r in rows if r["suite"] in ("loss", "steering"))


def test_accuracy_cli_prints_the_bf16_table(capsys):
    """python -m benchmarks.accuracy (README, "Exact in bf16"): both rows of each case, ours within 2x TRL's."""
    pytest.importorskip("trl")
    from benchmarks import accuracy

    accuracy.main(["--seeds", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| plain") or line.startswith("| scale")]
    assert len(rows) == 4 and "fused VGS terms" in out
    for line in rows:
        trl, ours = (list(map(float, cell.split(" / "))) for cell in line.strip("|").split("|")[2:4])
        assert max(ours[1:]) <= 2 * max(trl[1:]), line
