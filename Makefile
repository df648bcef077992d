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

# The main job on the embedded tiny default: a procedural dataset -> TFDS build -> embedding cache ->
# 200 training steps with checkpoints -> out/demo/run/ip-adapter.safetensors (official layout).
DEMO := out/demo
demo: venv
	rm -rf $(DEMO)
	$(VENV)/bin/python -c "from training.synthetic_data import write_dataset; write_dataset('$(DEMO)/src', 256)"
	$(VENV)/bin/ipadapter-jax data build --json $(DEMO)/src/captions.json --root $(DEMO)/src/images --out $(DEMO)/data
	$(VENV)/bin/ipadapter-jax cache --raw $(DEMO)/data/ip_adapter_captions/1.0.0 --out $(DEMO)/cache
	$(VENV)/bin/ipadapter-jax train --workdir $(DEMO)/run --config.data.path=$(DEMO)/cache
	$(VENV)/bin/ipadapter-jax convert inspect $(DEMO)/run/ip-adapter.safetensors
	@echo "metrics: $(DEMO)/run/metrics.jsonl; adapter: $(DEMO)/run/ip-adapter.safetensors"
