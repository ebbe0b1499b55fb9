"""Every command README.md tells a newcomer to run is run by a test or by CI (.ci/run), or is named here as
exempt and why. A new command in the README fails test_every_readme_command_is_mapped until it is added."""
import importlib
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
bench = importlib.import_module("benchmarks.__main__")

CI = ".ci/run (CI: a clean checkout)"
BENCH_FLAGS = "tests/test_readme_commands.py::test_readme_benchmark_flags_select_their_cases"
# command (as the README writes it, in a bash block or inline) -> what runs it
COMMANDS = {
    "make bench": "tests/test_bench_cli.py::test_cli_runs_every_suite_and_writes_outputs (its recipe, python -m "
                  "benchmarks, with --sizes tiny; the recipe: test_makefile_recipes_are_what_the_tests_run)",
    "python -m benchmarks": "tests/test_bench_cli.py::test_cli_runs_every_suite_and_writes_outputs",
    "python -m benchmarks.accuracy": "tests/test_bench_cli.py::test_accuracy_cli_prints_the_bf16_table",
    "make test": CI,
    "make wheel-check": CI,
    "make lock": "exempt: maintenance, a fresh venv from the network (moves constraints.txt)",
    "make test-latest": "exempt: maintenance, the newest releases from the network (the README says CI does not run it)",
    "make TORCH=torch==2.X ...": "exempt: make test / make bench with another torch",
    "make CONSTRAINTS= ...": "exempt: make test / make bench without the pins",
    "pip install --no-build-isolation -e .": CI + ", through make install (test_makefile_recipes_are_what_the_tests_run)",
    "pip install triton": "exempt: a CUDA machine's install",
    "pip install vgs-kernels[trl]": "exempt: a release on PyPI (make wheel-check checks the wheel, in CI)",
    "--no-build-isolation": "the flag of pip install -e . above",
    "make gpu-check": "exempt: needs a CUDA GPU (tests/test_gpu_check.py tests its report without one)",
    "make compile-report": "tests/ops/test_triton_compile.py::test_every_launched_specialisation_compiles_for_sm80_sm90_"
                           "gfx942_without_spills (benchmarks.compile_report, the recipe's module)",
    "python python/trl_vgs.py": "tests/test_examples.py::test_trl_example_each_method",
    "--method vgs|opd|va_opd": "tests/test_examples.py::test_trl_example_each_method",
    "python python/distill_demo.py": "tests/test_demo.py::test_quick_demo_both_regimes",
    "--quick": "tests/test_demo.py::test_quick_demo_both_regimes, tests/test_examples.py::test_trl_example_each_method",
    "--regime blind": "tests/test_demo.py::test_quick_demo_both_regimes",
    "--regime grounded": "tests/test_demo.py::test_quick_demo_both_regimes",
    "--regime aligned": "tests/test_demo.py::test_quick_demo_aligned_regime",
    "--methods all": "tests/test_readme_commands.py::test_demo_methods_all_selects_every_method (the runs: "
                     "tests/test_demo.py runs one method per code path)",
    "python -m vgs_kernels.testing --coverage": "tests/vlm/test_vlm_messages.py::test_coverage_command_lists_the_"
                                                "installed_families",
    "--suite opd --goal": BENCH_FLAGS,
    "--suite steering --goal": BENCH_FLAGS,
    "--suite fused-linear --goal": BENCH_FLAGS,
    "--device cuda": "tests/test_bench_cli.py::test_cli_on_cuda_checks_every_fast_path (needs a CUDA GPU)",
    **{f"accelerate launch --config_file python/accelerate_configs/{c}.yaml python/trl_launch.py":
       "tests/test_examples.py::test_readme_launch_lines_on_two_cpu_processes" for c in ("deepspeed_zero3", "fsdp2", "ddp")},
    "--num_processes 2 --mixed_precision no": "tests/test_examples.py::test_readme_launch_lines_on_two_cpu_processes",
}


def readme_commands(text: str) -> list:
    """The commands of the README's bash blocks (comments dropped) and its inline commands and flags."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        found += [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [c for c in re.findall(r"`([^`\n]+)`", prose) if re.match(r"(make |python |pip |--)", c)]
    return list(dict.fromkeys(found))


def test_every_readme_command_is_mapped():
    found = readme_commands(open(os.path.join(ROOT, "README.md")).read())
    assert {"make bench", "make test", "python python/trl_vgs.py"} <= set(found)
    missing = [c for c in found if c not in COMMANDS]
    assert not missing, f"README commands without a test or a reason in COMMANDS: {missing}"
    for where in COMMANDS.values():  # the tests named exist
        for path, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", where):
            assert re.search(rf"^def {name}\(", open(os.path.join(ROOT, path)).read(), re.M), (path, name)


def _recipe(makefile: str, target: str) -> str:
    return re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)", makefile, re.M).group(1)


def test_makefile_recipes_are_what_the_tests_run():
    """make bench is python -m benchmarks, make test is pytest on tests/ after make install (pip install -e .),
    make compile-report is benchmarks.compile_report; CI runs make test and make wheel-check."""
    mk = open(os.path.join(ROOT, "Makefile")).read()
    assert _recipe(mk, "bench").strip() == "$(PY) -m benchmarks $(BENCH_ARGS)"
    assert _recipe(mk, "test").strip() == "$(PY) -m pytest -q tests"
    assert "pip install -q --no-build-isolation -e ." in _recipe(mk, "$(VENV)/.installed")
    assert "-m benchmarks.compile_report" in _recipe(mk, "compile-report")
    assert "python/distill_demo.py" in _recipe(mk, "demo")
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run")) if not line.startswith("#")]
    assert "make test" in ci and "make wheel-check" in ci


@pytest.mark.parametrize("flags, label", [
    ("--suite steering --goal", "steering goal 120M"),
    ("--suite fused-linear --goal", "fused-linear N={} H={} V={}".format(*bench.GOAL_FUSED_LINEAR["cpu"])),
    ("--suite opd --goal", "opd N={} H={} V={} {} pad={}".format(*bench.GOAL_OPD)),
])
def test_readme_benchmark_flags_select_their_cases(flags, label):
    """The README's benchmark flags parse and add their goal case to the run (the cases are not run: minutes each
    on a CPU; the same cases run at tiny sizes in tests/test_bench_cli.py)."""
    args = bench.parse_args([*flags.split(), "--device", "cpu"])
    labels = [job.label for job in bench.jobs(args)]
    assert label in labels, labels
    without = [job.label for job in bench.jobs(bench.parse_args([flags.split()[0], flags.split()[1], "--device", "cpu"]))]
    assert label not in without


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_device_cuda_without_a_gpu_says_so(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_demo_methods_all_selects_every_method():
    import sys
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import distill_demo

    assert distill_demo.parse_args(["--methods", "all"]).methods == list(distill_demo.METHODS)
    for regime in ("blind", "grounded", "aligned"):
        assert distill_demo.parse_args(["--regime", regime]).regime == [regime]
