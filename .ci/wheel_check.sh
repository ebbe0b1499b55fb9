#!/usr/bin/env bash
# The wheel, not the checkout (an editable install hides a sub-package the wheel leaves out):
#   1. build it with the .venv's python (its torch compiles the C++ extension),
#   2. install it with torch in a fresh venv outside the source tree, through constraints.txt,
#   3. from outside the tree: import it, check that the compiled extension loaded and that an op run on
#      the C++ backend matches the plain-torch reference, import every module it ships,
#   4. compare its file list with vgs_kernels/ in the tree: every package and module is there (a new
#      sub-package cannot be dropped silently), nothing else, no test files.
# Run by .ci/run and `make wheel-check` (~2 min on 2 cores). Env: PY, TORCH, CONSTRAINTS (empty: unpinned).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-.venv/bin/python}
TORCH=${TORCH:-torch==2.13.0}
CONSTRAINTS=${CONSTRAINTS-constraints.txt}
PIN=()
if [ -n "$CONSTRAINTS" ]; then
    case $CONSTRAINTS in /*) ;; *) CONSTRAINTS=$ROOT/$CONSTRAINTS ;; esac
    PIN=(-c "$CONSTRAINTS")
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vgs-wheel-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS

echo "== wheel-check: building the wheel"
# build/lib* may hold modules deleted from the tree since the last build: they would ship. Start clean.
rm -rf build/lib* build/bdist* dist/vgs_kernels-*.whl
"$PY" -m pip wheel -q --no-build-isolation --no-deps . -w dist
WHEEL=$(ls "$ROOT"/dist/vgs_kernels-*.whl)
echo "   $WHEEL ($((SECONDS - t0)) s)"

echo "== wheel-check: installing it in a fresh venv in $WORK"
BASE_PY=$("$PY" -c 'import sys; print(sys._base_executable)')  # same interpreter as the wheel's tag
"$BASE_PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$TORCH" "$WHEEL" "${PIN[@]}"
echo "   ($((SECONDS - t0)) s)"

# The files the wheel must hold: vgs_kernels/ as git sees it (tracked + untracked, not ignored), so
# build outputs and stray ignored files do not count; a plain directory walk outside a git checkout.
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -co --exclude-standard -- vgs_kernels > "$WORK/tree.txt"
else
    (cd "$ROOT" && find vgs_kernels -type f -not -path '*/__pycache__/*' -not -name '*.so' -not -name '*.pyc') > "$WORK/tree.txt"
fi

echo "== wheel-check: checking it from $WORK"
cd "$WORK"
env -u PYTHONPATH VGS_ROOT="$ROOT" VGS_WHEEL="$WHEEL" VGS_TREE="$WORK/tree.txt" "$WORK/venv/bin/python" - <<'EOF'
import fnmatch
import importlib
import os
import re
import sys
import zipfile

import torch

root, wheel = os.environ["VGS_ROOT"], os.environ["VGS_WHEEL"]
errors = []

import vgs_kernels  # noqa: E402

where = os.path.dirname(os.path.abspath(vgs_kernels.__file__))
assert not (where + os.sep).startswith(root + os.sep), f"vgs_kernels imported from the checkout ({where})"

# -- the file list: every package and module of the tree, nothing else, no tests ---------------------
def is_test(path):
    parts = path.split("/")
    name = parts[-1]
    return ("tests" in parts[:-1] or "test" in parts[:-1] or name == "conftest.py"
            or fnmatch.fnmatch(name, "test_*.py") or fnmatch.fnmatch(name, "*_test.py"))

names = zipfile.ZipFile(wheel).namelist()
in_wheel = {n for n in names if n.startswith("vgs_kernels/")}
tree = {p for p in open(os.environ["VGS_TREE"]).read().split("\n")
        if p and os.path.isfile(os.path.join(root, p)) and "__pycache__" not in p and not p.endswith((".so", ".pyc"))}
expected = {p for p in tree if not is_test(p)}
tree_pkgs = sorted(os.path.dirname(p) for p in tree if p.endswith("/__init__.py"))
wheel_pkgs = {os.path.dirname(n) for n in in_wheel if n.endswith("/__init__.py")}
missing_pkgs = [p for p in tree_pkgs if p not in wheel_pkgs]
if missing_pkgs:
    errors.append(f"sub-packages of the tree missing from the wheel: {missing_pkgs}")
no_init = sorted({os.path.dirname(p) for p in expected if p.endswith(".py")} - set(tree_pkgs))
if no_init:
    errors.append(f"directories with modules but no __init__.py (not shipped as packages): {no_init}")
missing = sorted(expected - in_wheel)
if missing:
    errors.append(f"files of vgs_kernels/ missing from the wheel (data files need package-data): {missing}")
ext = [n for n in in_wheel if re.fullmatch(r"vgs_kernels/_C\..*\.so", n)]
if len(ext) != 1:
    errors.append(f"expected one compiled vgs_kernels/_C*.so in the wheel, found {ext}")
extra = sorted(in_wheel - tree - set(ext))
if extra:
    errors.append(f"files in the wheel that the tree does not have (stale build?): {extra}")
tops = {n.split("/", 1)[0] for n in names}
dist_info = {t for t in tops if t.endswith(".dist-info")}
if tops - dist_info != {"vgs_kernels"}:
    errors.append(f"top-level entries other than vgs_kernels/ and the dist-info: {sorted(tops - dist_info - {'vgs_kernels'})}")
tests = [n for n in names if is_test(n)]
if tests:
    errors.append(f"test files in the wheel: {tests}")
print(f"   files: {len(in_wheel)} under vgs_kernels/, packages {tree_pkgs}")

# -- version: one definition, the wheel's metadata agrees ---------------------------------------------
from importlib.metadata import version  # noqa: E402

from vgs_kernels._version import __version__  # noqa: E402

if version("vgs-kernels") != __version__ or getattr(vgs_kernels, "__version__", __version__) != __version__:
    errors.append(f"versions disagree: metadata {version('vgs-kernels')}, vgs_kernels._version {__version__}, "
                  f"vgs_kernels.__version__ {getattr(vgs_kernels, '__version__', None)}")

# -- the compiled extension loaded, and an op on it matches the reference ------------------------------
info = vgs_kernels.backend_info()
print(f"   backend_info: cpp_loaded={info['cpp_loaded']} cpu={info['cpu']} torch={info['torch']}")
if not info["cpp_loaded"] or info["cpu"] != "cpp":
    errors.append(f"the compiled extension did not load from the wheel: {info}")
else:
    g = torch.Generator().manual_seed(0)
    s, u, a, b = (torch.randn(3, 5, 37, generator=g) for _ in range(4))
    mask = torch.rand(3, 5, generator=g) > 0.2
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    with vgs_kernels.use_backend("cpp"):
        out = vgs_kernels.decomposed_kl(s1, u, a, b, mask)
    ref = vgs_kernels.decomposed_kl_reference(s2, u, a, b, mask)
    for name in ("std", "vis", "lang", "vds"):
        if not torch.allclose(getattr(out, name), getattr(ref, name), rtol=1e-4, atol=1e-5):
            errors.append(f"decomposed_kl (cpp) {name} differs from the reference")
    (out.std + out.vis).sum().backward()
    (ref.std + ref.vis).sum().backward()
    if not torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-5):
        errors.append("decomposed_kl (cpp) gradient differs from the reference")
    print("   decomposed_kl on the cpp backend matches decomposed_kl_reference")

# -- every module the wheel ships imports (optional third-party dependencies may be absent) --------------
skipped = {}
for n in sorted(in_wheel):
    if not n.endswith(".py") or n.endswith("/__main__.py"):
        continue
    mod = n[:-3].replace("/", ".").removesuffix(".__init__")
    try:
        importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "vgs_kernels":
            errors.append(f"import {mod}: {e}")
        else:
            skipped[mod] = e.name
    except Exception as e:  # noqa: BLE001
        errors.append(f"import {mod}: {type(e).__name__}: {e}")
print(f"   imported every module; not installed here, so skipped: "
      f"{', '.join(f'{m} (needs {d})' for m, d in skipped.items()) or 'none'}")

if errors:
    print("wheel-check FAILED:\n  - " + "\n  - ".join(errors), file=sys.stderr)
    sys.exit(1)
EOF
echo "== wheel-check: OK ($((SECONDS - t0)) s)"
