# Two entry points (see README), each creating .venv and installing everything from scratch on a fresh
# machine: `make demo` runs the main job on the embedded tiny default, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
# torch 2.13.0 is the CPU build on this machine's disk; an unpinned `torch` would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
# Tests and the demo run on the CPU, also where libtpu (the `tpu` extra, for compiling TPU programs) is installed;
# libtpu must not ask a TPU VM's metadata server for its topology when none is attached.
export JAX_PLATFORMS ?= cpu
export TPU_SKIP_MDS_QUERY ?= 1

.PHONY: venv test test-fast lint demo

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[test,tpu]"
	touch $@

venv: $(VENV)/.installed

# Test files run in parallel, one file per worker (pytest-xdist; one worker per core, at most 4): compiling is
# mostly single-threaded. The whole suite: 23 min on the 2-core CI machine at the last recorded run; 19-23 min of
# pytest here from a clean clone (685 tests, two workers, quiet host).
PYTEST := $(VENV)/bin/python -m pytest tests -q -n auto --maxprocesses 4 --dist loadfile

# The whole suite: what CI runs (.ci/run).
test: venv
	$(PYTEST) -rfE --durations=30

# The quick subset for development: no slow or multi-process tests (< 5 min on 2 cores).
test-fast: venv
	$(PYTEST) -m "not slow and not multiprocess"

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The main job on the embedded tiny default (training/demo.py): procedural data -> TFDS -> embedding cache ->
# IP-Adapter training -> official export checked in diffusers -> image-prompted samples -> report in out/demo.
demo: venv
	$(VENV)/bin/python training/demo.py --out out/demo
