"""`make gpu-check` (benchmarks/gpu_check.py), its CPU-side logic: arguments, the step runner
(time limits, failures, the overall budget) and the summary read from real benchmark CSVs.
The GPU run itself needs a CUDA machine; nothing here launches a kernel."""
import importlib
import json
import sys

import pytest

try:  # installed: vgs_kernels.benchmarks; from a source checkout: the top-level benchmarks/ package
    gc = importlib.import_module("vgs_kernels.benchmarks.gpu_check")
except ImportError:
    gc = importlib.import_module("benchmarks.gpu_check")
harness = importlib.import_module(gc.__package__ + ".harness")
report = importlib.import_module(gc.__package__ + ".report")


def test_dry_run_lists_the_steps(capsys):
    assert gc.main(["--dry-run", "--skip", "build"]) == 0
    text = capsys.readouterr().out
    assert "build:" in text and "[skipped: --skip]" in text
    assert "-m pytest -q -m gpu tests" in text
    assert "--device cuda" in text and "-N 8192 -V 151936" in text and "--steering-scale 1" in text


def test_arguments():
    with pytest.raises(SystemExit):
        gc.parse_args(["--skip", "lint"])
    args = gc.parse_args([])
    assert args.budget < 600 and args.skip == []


def test_refuses_to_run_without_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(gc, "environment", lambda: {"gpus": "0", "date": "now", "python": "3"})
    assert gc.main(["--out", str(tmp_path)]) == 2


def test_run_steps_records_failures_timeouts_and_the_budget(tmp_path):
    py = sys.executable
    todo = [gc.Step("ok", [py, "-c", "print('hi')"], 60), gc.Step("fails", [py, "-c", "raise SystemExit(3)"], 60),
            gc.Step("slow", [py, "-c", "import time; time.sleep(30)"], 1)]
    gc.run_steps(todo, str(tmp_path), budget_s=120, cwd=str(tmp_path))
    assert [s.status for s in todo] == ["ok", "failed (exit 3)", "timeout after 1 s"]
    assert open(todo[0].log).read().strip() == "hi"
    absent = [gc.Step("absent", [py, "-c", "pass"], 60, needs=("no_such_module_13",))]
    gc.run_steps(absent, str(tmp_path), budget_s=120, cwd=str(tmp_path))
    assert absent[0].status == "skipped: needs no_such_module_13 (not installed)"
    late = [gc.Step("late", [py, "-c", "pass"], 60)]
    gc.run_steps(late, str(tmp_path), budget_s=5, cwd=str(tmp_path))
    assert late[0].status.startswith("skipped: overall time budget")


def _write_results(path, rows):
    """A results.csv as the benchmark CLI writes it (its own Result rows and CSV writer)."""
    path.mkdir(parents=True)
    report.write_csv(str(path / "results.csv"), rows, {"device": "H100", "torch": "2.11", "triton": "3.6",
                                                       "date": "today"})
    (path / "results.md").write_text("| table |\n")


def test_summary_reads_the_goal_rows_of_the_benchmarks(tmp_path, monkeypatch):
    copy = 3.0e12
    kl = dict(N=8192, V=151936, dtype="bfloat16")
    _write_results(tmp_path / "bench_loss", [
        harness.Result("loss", {**kl, "mode": "fwdbwd"}, "vgs fused", times=[0.010], bytes_moved=24e9, copy_bw=copy),
        harness.Result("loss", {**kl, "mode": "fwd"}, "vgs fused", times=[0.004], bytes_moved=10e9, copy_bw=copy),
        harness.Result("loss", {**kl, "mode": "fwdbwd"}, "eager decomposed", times=[0.1], bytes_moved=24e9,
                       copy_bw=copy)])
    steer = dict(dtype="float32", tensors=625)
    _write_results(tmp_path / "bench_steering", [
        harness.Result("steering", {"params": "qwen3-vl-2b/2", "P": 500_000_000, **steer}, "vgs gram+combine",
                       times=[0.004], bytes_moved=10e9, copy_bw=copy),
        harness.Result("steering", {"params": "qwen3-vl-2b", "P": 2127532032, **steer}, "vgs gram+combine",
                       times=[0.02], bytes_moved=42.55e9, copy_bw=copy),
        harness.Result("steering", {"params": "goal 120M", "P": 120_000_000, **steer}, "vgs gram+combine",
                       times=[0.001], bytes_moved=2.4e9, copy_bw=copy)])
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite tests="30" failures="1" errors="0" skipped="2"/></testsuites>')
    py = sys.executable
    monkeypatch.setattr(gc, "steps", lambda out: [gc.Step("build", [py, "-c", "pass"], 60),
                                                  gc.Step("tests", [py, "-c", "raise SystemExit(1)"], 60)])
    monkeypatch.setattr(gc, "environment", lambda: {"gpu": "NVIDIA H100 80GB HBM3", "driver": "570.1",
                                                    "gpus": "1", "date": "2026-11-25", "python": "3.11",
                                                    "torch": "2.11", "triton": "3.6"})
    monkeypatch.setenv("VGS_GPU_CHECK_COMMAND", "make gpu-check")
    assert gc.main(["--out", str(tmp_path), "--allow-no-cuda"]) == 1  # the tests step failed
    s = json.loads((tmp_path / "gpu_check.json").read_text())
    assert s["tests"] == {"passed": 27, "failed": 1, "errors": 0, "skipped": 2}
    goals = {g["workload"]: g for g in s["goals"]}
    kl_goal, st_goal = goals["decomposed_kl fwd+bwd"], goals["gram+combine"]
    assert kl_goal["fraction"] == pytest.approx(0.8) and kl_goal["reached"] is True  # 24 GB in 10 ms / 3 TB/s
    assert st_goal["case"].startswith("qwen3-vl-2b, 2127532032 params")  # the full-size list, not /2
    assert st_goal["fraction"] == pytest.approx(42.55 / 20 / 3.0, rel=1e-3) and st_goal["reached"] is False
    md = (tmp_path / "gpu_check.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "driver 570.1" in md and "Command: `make gpu-check GPU_CHECK_ARGS=" in md
    assert "| tests | failed (exit 1) |" in md and "**no**" in md and "#### bench_loss/results.md" in md


def test_missing_results_are_reported_as_not_measured(tmp_path):
    s = gc.summary(str(tmp_path), [], {"date": "d", "python": "3"}, "cmd")
    assert s["tests"] is None and all(g["fraction"] is None and g["reached"] is None for g in s["goals"])
    assert "not measured" in gc.markdown(s, str(tmp_path))


def test_benchmark_steps_are_valid_vgs_bench_command_lines(tmp_path):
    """The argv of the benchmark steps parse with the benchmark CLI itself (on CPU here)."""
    bench = importlib.import_module(gc.__package__ + ".__main__")
    todo = {s.name: s for s in gc.steps(str(tmp_path), bench=gc.__package__)}
    for name in ("loss", "steering"):
        argv = todo[name].argv[3:]  # after `python -m <package>`
        argv[argv.index("cuda")] = "cpu"
        args = bench.parse_args(argv)
        assert args.no_plots and args.repeats == 10
        if name == "loss":
            assert args.loss_shapes == [(8192, 151936, ("fwd", "bwd", "fwdbwd"))]
        else:
            assert args.goal and args.steering_scale == 1 and set(args.suites) == {"steering", "fused-linear", "step"}
