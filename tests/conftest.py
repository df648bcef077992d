"""Test-wide setup: the Flax deprecation log filter, JAX's persistent compilation cache, the markers, and the tiny
saved pipelines shared by the pipeline tests."""

import os

import jax
import pytest

import ipadapter_jax  # noqa: F401  (installs the diffusers/transformers log filter first)

# isort: split
from ipadapter_jax.testing import pipeline_fixtures

# Repeat compiles of the same tiny models are 3-5x faster from the cache; CI reuses it within one run.
jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def sd15(tmp_path_factory) -> pipeline_fixtures.SavedPipelines:
    """A tiny SD1.5-like pipeline (with a ControlNet) saved by diffusers, with base and Plus adapter files."""
    return pipeline_fixtures.SavedPipelines(tmp_path_factory.mktemp("sd15"), "sd15")


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory) -> pipeline_fixtures.SavedPipelines:
    """A tiny SDXL-like pipeline saved by diffusers, with base and Plus adapter files."""
    return pipeline_fixtures.SavedPipelines(tmp_path_factory.mktemp("sdxl"), "sdxl")
