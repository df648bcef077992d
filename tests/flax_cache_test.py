"""Converted params saved as Flax (orbax) and restored by later runs: exact, skips conversion, stays fresh,
optional bf16 storage, never partial."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ipadapter_jax.testing import tiny, tiny_folders
from ipadapter_jax.weights import component_params, flax_cache
from ipadapter_jax.weights.diffusers_models import load_pipeline, load_unet


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd15") / "unet"
    tiny_folders.unet(tiny.SD15_TINY).save_pretrained(folder)
    return folder


@pytest.fixture
def no_conversion(monkeypatch):
    """Makes any read of PyTorch weights fail, so a passing load proves it came from the cache."""

    def fail(*args, **kwargs):
        raise AssertionError("PyTorch weights were read")

    monkeypatch.setattr(component_params, "open_state_dict", fail)


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def assert_trees_equal(actual, expected) -> None:
    assert flat(actual).keys() == flat(expected).keys()
    for path, value in flat(expected).items():
        assert flat(actual)[path].dtype == value.dtype, path
        np.testing.assert_array_equal(np.asarray(flat(actual)[path]), np.asarray(value))


@pytest.mark.slow
def test_round_trip_is_exact_and_skips_conversion(unet_folder, tmp_path, request, caplog):
    cache = tmp_path / "out" / "flax_cache" / "unet"
    with caplog.at_level(logging.INFO, logger="ipadapter_jax.weights.component_params"):
        first = load_unet(unet_folder, cache_dir=cache)
    report = first.report
    assert report.cache == "saved" and report.convert_s > 0 and report.cache_s > 0
    assert report.stored_dtype == "float32" and report.param_dtype == "float32"
    assert (cache / "cache.json").is_file() and (cache / "params").is_dir()
    assert report.stored_bytes == flax_cache.folder_bytes(cache / "params") > 0.9 * report.param_bytes
    assert any("saved to Flax cache" in r.getMessage() for r in caplog.records)
    assert [p.name for p in cache.parent.iterdir()] == ["unet"]  # no temporary folders left

    request.getfixturevalue("no_conversion")
    second = load_unet(unet_folder, cache_dir=cache)
    assert second.report.cache == "restored" and second.report.convert_s is None
    assert_trees_equal(second.params, first.params)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(second.params))
    assert "restored from Flax cache" in second.report.summary()


@pytest.mark.slow
def test_changed_weights_or_settings_convert_again(unet_folder, tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(unet_folder, folder)
    cache = tmp_path / "cache"
    load_unet(folder, cache_dir=cache)

    fine_tune = tiny_folders.unet(tiny.SD15_TINY, seed=7)
    fine_tune.save_pretrained(folder)  # replaces the weights
    retrained = load_unet(folder, cache_dir=cache)
    assert retrained.report.cache == "saved"
    expected = fine_tune.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(retrained.params["conv_in"]["kernel"], expected)
    assert load_unet(folder, cache_dir=cache).report.cache == "restored"
    assert load_unet(folder, cache_dir=cache, param_dtype=jnp.bfloat16).report.cache == "saved"


@pytest.mark.slow
def test_bf16_storage_returns_the_same_values_every_run(unet_folder, tmp_path, request):
    cache = tmp_path / "cache"
    fp32 = load_unet(unet_folder).params
    first = load_unet(unet_folder, cache_dir=cache, cache_dtype=jnp.bfloat16)
    assert first.report.stored_dtype == "bfloat16" and first.report.param_dtype == "float32"
    assert first.report.stored_bytes < 0.6 * first.report.param_bytes
    request.getfixturevalue("no_conversion")
    second = load_unet(unet_folder, cache_dir=cache, cache_dtype=jnp.bfloat16)
    assert second.report.cache == "restored"
    assert_trees_equal(second.params, first.params)
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), fp32)
    assert_trees_equal(first.params, rounded)


@pytest.mark.slow
def test_unreadable_cache_is_rebuilt(unet_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    expected = load_unet(unet_folder, cache_dir=cache).params
    for path in (cache / "params").rglob("*"):
        if path.is_file() and path.stat().st_size > 1000:
            path.write_bytes(b"\0" * 10)
    with caplog.at_level(logging.WARNING, logger="ipadapter_jax.weights.flax_cache"):
        rebuilt = load_unet(unet_folder, cache_dir=cache)
    assert rebuilt.report.cache == "saved"
    assert any("unreadable Flax cache" in r.getMessage() for r in caplog.records)
    assert_trees_equal(rebuilt.params, expected)


@pytest.mark.slow
def test_interrupted_save_leaves_no_partial_cache(unet_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    save = flax_cache.ocp.Checkpointer.save

    def save_then_crash(self, directory, *args, **kwargs):
        save(self, directory, *args, **kwargs)  # everything written...
        raise KeyboardInterrupt  # ...then killed before the rename

    monkeypatch.setattr(flax_cache.ocp.Checkpointer, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        load_unet(unet_folder, cache_dir=cache)
    assert list(tmp_path.iterdir()) == []

    # An existing cache survives a failed replacement untouched.
    monkeypatch.setattr(flax_cache.ocp.Checkpointer, "save", save)
    load_unet(unet_folder, cache_dir=cache)
    before = json.loads((cache / "cache.json").read_text())
    monkeypatch.setattr(flax_cache.ocp.Checkpointer, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        load_unet(unet_folder, cache_dir=cache, cache_dtype=jnp.float16)
    assert json.loads((cache / "cache.json").read_text()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


@pytest.mark.slow
def test_pipeline_cache(tmp_path, request, capsys):
    folder = tmp_path / "sd15"
    tiny_folders.sd15_pipeline(folder)
    cache = tmp_path / "out" / "flax_cache"
    first = load_pipeline(folder, cache_dir=cache, progress=False)
    assert [r.cache for r in first.reports] == ["saved"] * 3
    assert sorted(p.name for p in cache.iterdir()) == ["text_encoder", "unet", "vae"]
    request.getfixturevalue("no_conversion")
    second = load_pipeline(folder, cache_dir=cache)
    assert [r.cache for r in second.reports] == ["restored"] * 3
    assert "loading sd15" in capsys.readouterr().err  # the tqdm bar
    for name in ("unet", "vae", "text_encoder"):
        assert_trees_equal(getattr(second, name).params, getattr(first, name).params)
