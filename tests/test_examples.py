"""Every runnable script in python/ has a smoke path run here, asserted on what it promises to print or write
(python/distill_demo.py's is tests/test_demo.py). Sizes are cut to seconds with the scripts' own flags."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_DIR = os.path.join(ROOT, "python")
sys.path.insert(0, PYTHON_DIR)

# The scripts of python/ (files with a __main__ block) and the tests that run their smoke paths.
SMOKE = {"distill_demo.py": "tests/test_demo.py", "optimum_check.py": "tests/test_examples.py",
         "trl_vgs.py": "tests/test_examples.py", "trl_launch.py": "tests/test_examples.py"}
# README "Multi-GPU with TRL": its launch lines, and what Accelerate runs each with on CPU processes
LAUNCH = re.compile(r"^accelerate launch --config_file (python/accelerate_configs/\S+) python/trl_launch.py$", re.M)
ON_CPU = {"deepspeed_zero3.yaml": "distributed: DEEPSPEED, processes: 2, student: DeepSpeedEngine",
          "fsdp2.yaml": "distributed: MULTI_CPU, processes: 2, student: DistributedDataParallel",
          "ddp.yaml": "distributed: MULTI_CPU, processes: 2, student: DistributedDataParallel"}
# Tiny pre-training for the examples that build distill_demo's models (distill_demo's own flags).
TINY = ["--teacher-steps", "10", "--calibrate-steps", "3", "--student-steps", "6", "--ground-steps", "3"]


def test_every_script_has_a_smoke_test():
    scripts = sorted(f for f in os.listdir(PYTHON_DIR) if f.endswith(".py")
                     and "__main__" in open(os.path.join(PYTHON_DIR, f)).read())
    assert scripts == sorted(SMOKE), "a script in python/ without a smoke test: add it to SMOKE and test it"
    assert not os.path.exists(os.path.join(PYTHON_DIR, "tiny_vlm.py")), "the tiny VLMs come from vgs_kernels.testing"


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.parametrize("method", ["vgs", "opd", "va_opd"])
def test_trl_example_each_method(method, tmp_path, capsys):
    """python python/trl_vgs.py --quick --method M: trains, prints the accuracy before and after, the method's
    logged metrics (vgs/* for vgs, TRL's loss and entropy for opd, va/* for va_opd) and where the outputs went."""
    trl_vgs = pytest.importorskip("trl_vgs")
    out, cache = tmp_path / "out", tmp_path / "cache"
    res = trl_vgs.main(["--quick", "--method", method, "--out", str(out), "--cache", str(cache), "--steps", "2",
                        "--batch", "4", "--eval-size", "4", "--threads", "1", *TINY])
    printed = capsys.readouterr().out
    for name in ("before", "after"):
        assert re.search(rf"^{name}: greedy accuracy with the image [01]\.\d{{3}}, blank image [01]\.\d{{3}}$",
                         printed, re.M), printed
        assert 0 <= res[name]["image"]["all"] <= 1
    keys = trl_vgs.METRICS[method]
    assert {"vgs": "vgs/eta", "opd": "entropy", "va_opd": "va/mean"}[method] in keys
    assert re.search(r"^step +" + r" +".join(re.escape(k) for k in keys) + "$", printed, re.M), printed
    (row,) = res["logs"]  # logging_steps=2, 2 steps
    assert row["step"] == 2 and all(_finite(row[k]) for k in keys if k != "vgs/cos_std_vis"), row
    assert not any(k.startswith("va/") for k in row) or method == "va_opd"
    assert not any(k.startswith("vgs/") for k in row) or method == "vgs"
    assert f"outputs: {out}" in printed and f"cache: {cache}" in printed
    assert {"log_history.json", "model.safetensors", "config.json"} <= set(os.listdir(out))
    assert json.load(open(out / "log_history.json"))[0]["step"] == 2
    assert [f for f in os.listdir(cache) if f.endswith(".pt")]  # the pre-trained teacher and student


def test_optimum_check_quick(tmp_path, capsys):
    """python python/optimum_check.py --quick: prints the table (one row per u, frozen and trained) and writes
    <out>/optimum.json with the distances before and after."""
    import optimum_check

    out = tmp_path / "out"
    rows = optimum_check.main(["--quick", "--regime", "grounded", "--steps", "3", "--batch", "4", "--cache", "",
                               "--out", str(out), *TINY])
    printed = capsys.readouterr().out
    assert printed.startswith("| regime | seed | u | TV(p, p*) |")
    assert len(re.findall(r"^\| grounded \| 0 \| (frozen|trained) \| .* → .* \|$", printed, re.M)) == 2, printed
    assert f"wrote {out / 'optimum.json'}" in printed
    saved = json.load(open(out / "optimum.json"))
    assert saved == json.loads(json.dumps(rows)) and [r["u"] for r in saved] == ["frozen", "trained"]
    for r in saved:
        assert all(_finite(r[when][k]) and r[when][k] >= 0 for when in ("before", "after") for k in r["before"])
        assert r["tokens"] > 0 and _finite(r["loss_last"])


def test_scripts_run_as_commands():
    """The scripts start as the README's commands do (python python/X.py, from the repository root, without
    PYTHONPATH): --help prints each one's usage, which names --quick."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import runpy, sys\n"
            "for script in sys.argv[1:]:\n"
            "    sys.argv = [script, '--help']\n"
            "    try:\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, None), (script, e.code)\n"
            "    print('=== done', script, flush=True)\n")
    scripts = [os.path.join("python", s) for s in sorted(SMOKE)]
    res = subprocess.run([sys.executable, "-c", code, *scripts], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for part, script in zip(res.stdout.split("=== done")[:-1], scripts):
        assert "usage:" in part and "--quick" in part, (script, part[-2000:])


def test_examples_processor_is_the_whitespace_kind():
    """The examples' tiny models (python/distill_demo.py, benchmarks/suite_trl*.py) come from vgs_kernels.testing:
    tokenizer="whitespace", Qwen's one-line template (no newline token), the task's words and nothing else."""
    import distill_demo

    from vgs_kernels.testing import tiny_processor

    proc = distill_demo.processor("qwen2_vl")
    vocab = proc.tokenizer.get_vocab()
    assert "\n" not in vocab and set(distill_demo.task.WORDS) <= set(vocab) and len(vocab) == 32
    text = proc.apply_chat_template([[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]],
                                    add_generation_prompt=True)[0]
    assert text == "<|im_start|>user <|vision_start|><|image_pad|><|vision_end|>hi <|im_end|> <|im_start|>assistant "
    with pytest.raises(ValueError, match="Qwen families"):
        tiny_processor("llava", ["a"], tokenizer="whitespace")


def test_readme_launch_lines_on_two_cpu_processes(tmp_path):
    """README "Multi-GPU with TRL": every `accelerate launch` line runs python/trl_launch.py on 2 CPU processes
    (its config's num_processes and bf16 overridden: 2, no mixed precision), which trains one exact VGS step
    under the config's engine (FSDP2 runs as DDP on CPUs: Accelerate enables FSDP on accelerators only)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    lines = LAUNCH.findall(readme)
    assert sorted(os.path.basename(c) for c in lines) == sorted(ON_CPU)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    for cfg in lines:
        name = os.path.basename(cfg)
        run = subprocess.run([accelerate, "launch", "--config_file", cfg, "--num_processes", "2", "--mixed_precision",
                              "no", "python/trl_launch.py", "--quick", "--out", str(tmp_path / name)],
                             cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, f"{name}:\n{run.stderr[-4000:]}"
        assert ON_CPU[name] in run.stdout and re.search(r"step 1: vgs/eta \d", run.stdout), run.stdout
