"""Test-wide setup: the Flax deprecation log filter and JAX's persistent compilation cache."""

import os

import jax

import ipadapter_jax  # noqa: F401  (installs the diffusers/transformers log filter first)

# Repeat compiles of the same tiny models are 3-5x faster from the cache; CI reuses it within one run.
jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
