"""The layout docs/ARCHITECTURE.md describes: which layer may import which, no import cycles (imports
inside functions count), no class over ~250 lines, and ``import vgs_kernels`` with torch alone."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vgs_kernels"
MAX_CLASS_LINES = 250

# layer -> the layers its modules may import (docs/ARCHITECTURE.md, "Layers"); "" is the package's __init__
ALLOWED = {
    "_version": set(),
    "ops": {"ops"},
    "losses": {"ops", "losses"},
    "distributed": {"ops", "distributed"},
    "steering": {"ops", "losses", "distributed", "steering"},
    "vlm": {"vlm"},
    "analysis": {"ops", "steering", "analysis"},
    "testing": {"ops", "losses", "vlm", "testing"},
    "integrations": {"ops", "losses", "steering", "distributed", "vlm", "integrations"},
    "": {"_version", "ops", "losses", "steering", "vlm", "analysis"},
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path


def _imports(name, path):
    """The vgs_kernels modules ``name`` imports anywhere in its file, TYPE_CHECKING blocks left out."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            # `from package import submodule` imports the submodule, `from module import name` the module
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t == "vgs_kernels" or t.startswith("vgs_kernels."):
                yield t


def _graph():
    modules = dict(_modules())
    graph = {}
    for name, path in modules.items():
        deps = set()
        for t in _imports(name, path):
            if t == "vgs_kernels._C":  # the compiled extension (csrc/): below every layer
                continue
            while t not in modules and "." in t:  # `from mod import name`: the module
                t = t.rsplit(".", 1)[0]
            if t in modules and t != name:
                deps.add(t)
        graph[name] = deps
    return graph


def _layer(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_only_what_the_architecture_allows():
    bad = [f"{m} ({_layer(m) or '__init__'}) imports {d}" for m, deps in _graph().items() for d in sorted(deps)
           if _layer(d) not in ALLOWED[_layer(m)]]
    assert not bad, "imports across layers that docs/ARCHITECTURE.md does not allow:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(cycles)


def test_no_class_is_longer_than_250_lines():
    long = []
    for name, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)


def test_tests_import_no_other_test_file():
    """Shared test code lives in tests/helpers/ (or tests/conftest.py), not in a test file; this covers
    ``from test_x import``, ``from tests.test_x import``, ``from tests import test_x`` and the helpers."""
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                assert not any(part.startswith("test_") for n in names for part in n.split(".")), \
                    f"{path.relative_to(ROOT / 'tests')} imports a test file"


def test_tests_mirror_the_package():
    """tests/<layer>/ holds the tests of vgs_kernels/<layer>/ (tests/ itself: the cross-cutting ones)."""
    dirs = [d for d in (ROOT / "tests").rglob("*") if d.is_dir() and d.name not in ("helpers", "__pycache__")
            and "helpers" not in d.parts and "__pycache__" not in d.parts]
    assert dirs and [str(d.relative_to(ROOT / "tests")) for d in dirs
                     if not (PACKAGE / d.relative_to(ROOT / "tests")).is_dir()] == []


BLOCKER = """
import importlib.abc, importlib.util, sys
OPTIONAL = {"transformers", "trl", "accelerate", "deepspeed", "datasets", "tokenizers", "PIL", "triton",
            "matplotlib", "liger_kernel", "torchjd"}
class Block(importlib.abc.MetaPathFinder):  # as if not installed
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in OPTIONAL:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in OPTIONAL else find_spec(name, *a)
import torch, vgs_kernels as vgs
s, u, a, b = torch.randn(4, 3, 11).unbind(0)
t = vgs.decomposed_kl(s, u, a, b)
ref = vgs.decomposed_kl_reference(s, u, a, b)
torch.testing.assert_close(torch.stack(list(t)), torch.stack(list(ref)), rtol=1e-5, atol=1e-6)
print(sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL))
"""


def test_import_needs_only_the_install_requirements():
    """``import vgs_kernels`` and one op run with every optional dependency blocked (triton included)."""
    out = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["vgs_kernels.integrations.trl", "vgs_kernels.testing"])
def test_optional_layers_import(module):
    """The layers that need an extra import it themselves (and import cleanly with it installed)."""
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


# The names users and outside checks rely on (README, docs/ARCHITECTURE.md): they stay importable.
PUBLIC = ("BACKENDS DistillLogits FamilySpec FusedLinearVGSLoss GeometryRow GradientSteering KLTerms LMHead "
          "SteeringConflictWarning VAOPDLoss VAOPDOutput VGSLoss VGSLossOutput VisionTokens __version__ backend_info "
          "check_processor combine decomposed_kl decomposed_kl_reference distill_logits fused_chunked_divergence_loss "
          "fused_linear_decomposed_kl get_backend gradient_geometry gram group_advantages grpo_surrogate grpo_vgs_loss "
          "plot_gradient_geometry policies register_family response_logits response_positions rollout_batch "
          "set_backend std_descent strip_images text_only_batch use_backend vgs_loss").split()
PUBLIC_TRL = ["VGSDistillationConfig", "VGSDistillationTrainer", "VGSGRPOConfig", "VGSGRPOTrainer", "METHODS"]


def test_public_names_stay_importable():
    import vgs_kernels
    from vgs_kernels.integrations import trl

    assert [n for n in PUBLIC if n not in vgs_kernels.__all__ or not hasattr(vgs_kernels, n)] == []
    assert [n for n in vgs_kernels.__all__ if not hasattr(vgs_kernels, n)] == []
    assert [n for n in PUBLIC_TRL if n not in trl.__all__] == []


def test_both_trl_configs_carry_every_steering_field():
    from dataclasses import fields

    from vgs_kernels.integrations.trl import VGSDistillationConfig, VGSGRPOConfig
    from vgs_kernels.integrations.trl.config import SteeringArguments

    steering = {f.name for f in fields(SteeringArguments)}
    assert "steering_patience" in steering
    for cls in (VGSDistillationConfig, VGSGRPOConfig):
        assert steering <= {f.name for f in fields(cls)}, cls.__name__
