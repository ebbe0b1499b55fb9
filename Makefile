# Two commands do all the set-up on a fresh machine:
#   make bench   -> microbenchmarks against the monolithic loss (CPU by default)
#   make test    -> the test suite
# Both create .venv, install torch (CPU build), triton and the package with its C++ extension.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
BENCH_ARGS ?=

.PHONY: install bench test ext demo clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TORCH)" -r requirements-dev.txt  # torch pinned: a dependency must not upgrade it
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

clean:
	rm -rf build *.egg-info vgs_kernels/*.so
