# Two entry points (see README), each creating .venv and installing everything from scratch on a fresh
# machine: `make demo` runs the main job on the embedded tiny default, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
# torch 2.13.0 is the CPU build on this machine's disk; an unpinned `torch` would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache

.PHONY: venv test demo

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(VENV)/bin/python -m pytest tests -q

# The main job on the embedded tiny default (training/demo.py): procedural data -> TFDS -> embedding cache ->
# IP-Adapter training -> official export checked in diffusers -> image-prompted samples -> report in out/demo.
demo: venv
	$(VENV)/bin/python -m training.demo --out out/demo
