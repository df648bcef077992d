"""Official IP-Adapter files <-> Flax (ipadapter_jax.weights.adapter_files, flax_adapter_file, cli), fp32 on CPU.

The peer is diffusers' PyTorch pipeline: an adapter we export must load with `pipe.load_ip_adapter` (offline,
from a folder) into a real `StableDiffusionPipeline` / `StableDiffusionXLPipeline` built in memory from tiny
random components, and its UNet must then predict the same noise as our Flax UNet with the same adapter
(max |flax - torch| <= 1e-4 * max |torch|, the tolerance of tests/unet_parity_test.py). Then: file -> Flax ->
file keeps every tensor's bytes, fp16/bf16 exports stay within their rounding, every bad input of issue 3 ends
in one ConversionError naming file, key and shapes, failed saves leave nothing behind, and the CLI round-trips.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from ipadapter_jax.cli import convert as cli
from ipadapter_jax.testing.adapter_files import (
    KINDS,
    NUM_TOKENS,
    PRECISION,
    RTOL,
    SUFFIX,
    Model,
    Models,
    assert_close,
    load_in_diffusers,
    official_file,
    official_state,
)
from ipadapter_jax.weights import flax_adapter_file
from ipadapter_jax.weights.adapter_files import (
    DTYPES,
    load_ip_adapter,
    metadata_sidecar,
    read_ip_adapter,
    read_metadata,
    save_ip_adapter,
)
from ipadapter_jax.weights.image_proj_keys import CLIP_TOKENS

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module", autouse=True)
def single_threaded_torch():
    """On this shared 2-core machine torch's OpenMP threads spin against JAX's and other processes': a tiny UNet
    forward takes 2-9 s with 2 threads and 0.04 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models() -> Models:
    return Models()


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def model(request, models) -> Model:
    return models[request.param]


@pytest.fixture
def sd15(models) -> Model:
    return models["sd15"]


# --- Flax -> file -> diffusers ------------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
@pytest.mark.parametrize("kind", KINDS)
def test_exported_file_gives_our_noise_prediction_in_diffusers_pipeline(model, kind, file_format, tmp_path):
    path = save_ip_adapter(model.adapters[kind], tmp_path / f"ip{SUFFIX[file_format]}", format=file_format)
    pipe = load_in_diffusers(model, path)
    expected = model.torch_predict(pipe, kind)
    assert_close(model.flax_predict(kind), expected)
    # The comparison has power: without the image branch the prediction is far outside the tolerance.
    assert np.abs(model.torch_predict(pipe, kind, scale=0.0) - expected).max() > 100 * RTOL * np.abs(expected).max()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_export_loads_in_diffusers_and_matches_rounded_weights(sd15, dtype, tmp_path):
    """diffusers computes with the rounded weights; our model loaded from the same file predicts the same."""
    path = save_ip_adapter(sd15.adapters["base"], tmp_path / "ip.safetensors", dtype=dtype)
    _, _, rounded = load_ip_adapter(path, sd15.abstract)
    assert_close(sd15.flax_predict("base", rounded), sd15.torch_predict(load_in_diffusers(sd15, path), "base"))


# --- file -> Flax -> file -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
@pytest.mark.parametrize("kind", KINDS)
def test_file_to_flax_to_file_is_byte_identical(sd15, kind, file_format, dtype, tmp_path):
    state = official_state(sd15, kind)
    state = {s: {k: v.astype(DTYPES[dtype]) for k, v in part.items()} for s, part in state.items()}
    source = official_file(tmp_path, state, file_format)
    spec, _, adapter = load_ip_adapter(source, sd15.abstract)
    assert (spec.kind, spec.num_tokens) == (kind, CLIP_TOKENS if kind == "full" else NUM_TOKENS)
    out = save_ip_adapter(adapter, tmp_path / f"out{SUFFIX[file_format]}", format=file_format, dtype=dtype)
    written = read_ip_adapter(out)
    for section, part in state.items():
        assert written[section].keys() == part.keys()
        for key, value in part.items():
            assert written[section][key].dtype == value.dtype and written[section][key].shape == value.shape
            assert written[section][key].tobytes() == value.tobytes(), f"{section}.{key}"


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_export_within_rounding(sd15, dtype, file_format, tmp_path):
    adapter = sd15.adapters["plus"]
    path = save_ip_adapter(adapter, tmp_path / f"ip{SUFFIX[file_format]}", format=file_format, dtype=dtype)
    written = read_ip_adapter(path)
    assert {v.dtype for part in written.values() for v in part.values()} == {DTYPES[dtype]}
    _, _, loaded = load_ip_adapter(path, sd15.abstract)
    rtol, atol = PRECISION[dtype]
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapter)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def test_metadata(sd15, tmp_path):
    adapter = sd15.adapters["plus"]
    extra = {"base_model": "runwayml/stable-diffusion-v1-5", "image_encoder": "CLIP ViT-H/14"}
    expected = {**extra, "adapter_kind": "plus", "num_tokens": str(NUM_TOKENS)}
    assert read_metadata(save_ip_adapter(adapter, tmp_path / "ip.safetensors", metadata=extra)) == expected
    path = save_ip_adapter(adapter, tmp_path / "ip.bin", format="bin", metadata=extra)
    assert read_metadata(path) == expected and json.loads(metadata_sidecar(path).read_text()) == expected
    # The .bin itself holds exactly the two sections, as the official files do.
    assert set(torch.load(path, weights_only=True)) == {"image_proj", "ip_adapter"}
    with pytest.raises(ValueError, match=r"kind='base' \(weights say 'plus'\)"):
        save_ip_adapter(adapter, tmp_path / "x.safetensors", metadata={"adapter_kind": "base"})


def test_flax_file_round_trip(sd15, tmp_path):
    adapter = sd15.adapters["plus"]
    path = flax_adapter_file.save_flax_adapter(adapter, tmp_path / "a.msgpack", metadata={"base_model": "m"})
    params, metadata = flax_adapter_file.read_flax_adapter(path)
    assert metadata == {"base_model": "m", "adapter_kind": "plus", "num_tokens": str(NUM_TOKENS)}
    jax.tree.map(np.testing.assert_array_equal, params, adapter)
    spec, _, loaded = flax_adapter_file.load_flax_adapter(path, sd15.abstract)
    assert spec.kind == "plus"
    jax.tree.map(np.testing.assert_array_equal, loaded, adapter)


def test_cli_round_trip(model, tmp_path, capsys):
    model.torch_unet.save_config(tmp_path / "unet")
    config = str(tmp_path / "unet" / "config.json")
    state = official_state(model, "plus")
    source = official_file(tmp_path, state, "bin")
    flax_file, exported = str(tmp_path / "adapter.msgpack"), tmp_path / "exported.safetensors"

    argv = ["to-flax", "--adapter", str(source), "--unet-config", config, "--out", flax_file, "--base-model", "tiny"]
    assert cli.main(argv) == 0
    assert cli.main(["to-torch", "--adapter", flax_file, "--out", str(exported), "--unet-config", config]) == 0
    written = read_ip_adapter(exported)
    for section, part in state.items():
        for key, value in part.items():
            assert written[section][key].tobytes() == value.tobytes()
    assert read_metadata(exported) == {"base_model": "tiny", "adapter_kind": "plus", "num_tokens": str(NUM_TOKENS)}
    captured = capsys.readouterr()
    assert "tracing UNet shapes" in captured.err and "done in" in captured.err
    assert f"wrote {exported}: plus, {NUM_TOKENS} tokens" in captured.out

    half = str(tmp_path / "half.bin")
    assert cli.main(["to-torch", "--adapter", flax_file, "--out", half, "--dtype", "fp16"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", half]) == 0
    printed = {k: v.strip() for k, _, v in (line.partition(":") for line in capsys.readouterr().out.splitlines())}
    layers = len(state["ip_adapter"]) // 2
    assert printed["adapter_kind"] == "plus" and printed["tokens"] == str(NUM_TOKENS) and printed["dtypes"] == "float16"
    assert printed["cross-attention layers"].startswith(f"{layers} (ids 1..{2 * layers - 1})")
    assert printed["params"].startswith(f"{sum(v.size for part in state.values() for v in part.values()):,} ")
    assert printed["metadata base_model"] == "tiny"


def test_cli_reports_bad_input_in_one_line(models, tmp_path, capsys):
    models["sdxl"].torch_unet.save_config(tmp_path / "sdxl_unet")
    source = save_ip_adapter(models["sd15"].adapters["base"], tmp_path / "ip-adapter_sd15.safetensors")
    out = tmp_path / "a.msgpack"
    argv = ["to-flax", "--adapter", str(source), "--unet-config", str(tmp_path / "sdxl_unet"), "--out", str(out)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {source} [ip_adapter] does not fit this UNet") and "different base model" in err
    assert not out.exists()


def test_module_entry_point():
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "ipadapter_jax.cli.convert", "to-torch", "--help"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "--dtype" in result.stdout
