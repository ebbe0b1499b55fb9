# Two commands do all the set-up on a fresh machine:
#   make bench   -> microbenchmarks against the monolithic loss (CPU by default)
#   make test    -> the test suite
# Both create .venv, install torch (CPU build), triton and the package with its C++ extension.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
BENCH_ARGS ?=

.PHONY: install bench test ext demo clean compile-report gpu-check

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	# torch pinned: a dependency must not upgrade it; DS_BUILD_OPS=0: DeepSpeed JIT-builds the few ops it uses
	DS_BUILD_OPS=0 $(PY) -m pip install -q "$(TORCH)" -r requirements-dev.txt
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

bench: install
	$(PY) -m vgs_kernels.benchmarks $(BENCH_ARGS)

test: install
	$(PY) -m pytest -q tests

# Rebuild the extension in place after editing csrc/ (serialised: several shells may build at once).
ext: $(VENV)/.deps
	flock /tmp/vgs_kernels_build.lock $(PY) setup.py -q build_ext --inplace

demo: install
	$(PY) python/distill_demo.py

# Every Triton kernel specialisation the wrappers launch, compiled for sm_80 / sm_90 / gfx942 without
# a GPU; report in bench_out/compile/ (COMPILE_ARGS=--full for the whole matrix).
compile-report: install
	TRITON_INTERPRET=0 $(PY) -m benchmarks.compile_report $(COMPILE_ARGS)

# On a CUDA machine whose python already has torch + Triton (no venv, no network): build the
# extension, run the gpu tests and the CUDA benchmarks; results, device, driver and versions in
# bench_out/gpu_check/gpu_check.md (paste into BENCHMARKS.md). < 10 min on one H100.
GPU_PY ?= python3
gpu-check:
	VGS_GPU_CHECK_COMMAND="make gpu-check" $(GPU_PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info vgs_kernels/*.so
