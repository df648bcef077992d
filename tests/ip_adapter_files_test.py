"""Official IP-Adapter files <-> Flax (conversion.ip_adapter_files, flax_adapter_file, cli), fp32 on CPU.

The peer is diffusers' PyTorch pipeline: an adapter we export must load with `pipe.load_ip_adapter` (offline,
from a folder) into a real `StableDiffusionPipeline` / `StableDiffusionXLPipeline` built in memory from tiny
random components, and its UNet must then predict the same noise as our Flax UNet with the same adapter
(max |flax - torch| <= 1e-4 * max |torch|, the tolerance of tests/unet_parity_test.py). Then: file -> Flax ->
file keeps every tensor's bytes, fp16/bf16 exports stay within their rounding, every bad input of issue 3 ends
in one ConversionError naming file, key and shapes, failed saves leave nothing behind, and the CLI round-trips.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch

from conversion import cli, flax_adapter_file, unet_config
from conversion.image_proj import CLIP_TOKENS, ImageProjSpec, build_image_proj, flax_to_official, param_shapes
from conversion.ip_adapter import adapter_from_official
from conversion.ip_adapter_files import (
    DTYPES,
    load_ip_adapter,
    metadata_sidecar,
    read_ip_adapter,
    read_metadata,
    save_ip_adapter,
)
from conversion.torch_layout import ConversionError, torch_state_to_flax
from ipadapter_jax.adapter import merge_unet_params, split_unet_params
from ipadapter_jax.random_init import numpy_init
from ipadapter_jax.scales import ip_scale_tree
from tests import tiny

BATCH, TEXT_TOKENS, CLIP_DIM, NUM_TOKENS, SCALE = 2, 7, 48, 4, 0.7
RTOL = 1e-4
VARIANTS = ("base", "plus", "full")
SUFFIX = {"safetensors": ".safetensors", "bin": ".bin"}
# Relative rounding error bound of round-to-nearest-even; fp16 values below 2**-14 are subnormal (absolute bound).
PRECISION = {"fp16": (2.0**-11, 2.0**-25), "bf16": (2.0**-8, 0.0)}


class Model:
    """One tiny config: the pristine PyTorch UNet, the same weights in our Flax IP-UNet, our adapters (base, Plus,
    Full) with their image projection modules, and the inputs of one UNet step."""

    def __init__(self, name: str):
        self.name, self.config = name, tiny.CONFIGS[name]
        self.torch_unet = tiny.torch_unet(self.config)
        self.unet = unet_config.ip_unet_from_config(self.config)
        self.abstract = unet_config.abstract_ip_unet_params(self.unet)
        base_state = {k: v.numpy() for k, v in self.torch_unet.state_dict().items()}
        self.frozen = torch_state_to_flax(base_state, split_unet_params(self.abstract)[0], source=f"torch {name} UNet")
        # Our adapters: random official-layout weights (numbered by diffusers' processor order) brought into Flax.
        loaded = {v: adapter_from_official(official_state(self, v), self.abstract) for v in VARIANTS}
        self.image_projs = {v: module for v, (_, module, _) in loaded.items()}
        self.adapters = {v: adapter for v, (_, _, adapter) in loaded.items()}

        rng = np.random.default_rng(0)
        cross = self.config["cross_attention_dim"]
        self.sample = rng.standard_normal((BATCH, 4, 16, 16)).astype(np.float32)
        self.timesteps = np.array([3, 700], dtype=np.int32)
        self.text = rng.standard_normal((BATCH, TEXT_TOKENS, cross)).astype(np.float32)
        self.added = {}
        if self.config.get("addition_embed_type") == "text_time":
            self.added = {
                "text_embeds": rng.standard_normal((BATCH, tiny.SDXL_TEXT_EMBEDS_DIM)).astype(np.float32),
                "time_ids": np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (BATCH, 1)),
            }
        hidden = rng.standard_normal((BATCH, 1, tiny.PLUS_TOKENS, tiny.PLUS_HIDDEN)).astype(np.float32)
        self.embeds = {"base": rng.standard_normal((BATCH, 1, CLIP_DIM)).astype(np.float32), "plus": hidden}
        # Full makes one token per hidden state: NUM_TOKENS of them, so every variant shares one compiled UNet.
        self.embeds["full"] = hidden[:, :, :NUM_TOKENS]
        self._predict = jax.jit(
            lambda params, ip_scale, tokens: self.unet.apply(
                {"params": params, "ip_scale": ip_scale},
                jnp.asarray(self.sample),
                jnp.asarray(self.timesteps),
                jnp.asarray(self.text),
                added_cond_kwargs={k: jnp.asarray(v) for k, v in self.added.items()} or None,
                image_tokens=tokens,
            ).sample
        )

    def flax_predict(self, variant: str, adapter: dict | None = None) -> np.ndarray:
        """Our image projection + IP-UNet at scale SCALE (`adapter` defaults to our adapter of `variant`)."""
        adapter = self.adapters[variant] if adapter is None else adapter
        tokens = self.image_projs[variant].apply({"params": adapter["image_proj"]}, jnp.asarray(self.embeds[variant]))
        params = merge_unet_params(self.frozen, adapter["ip_layers"])
        return np.asarray(self._predict(params, ip_scale_tree(params, SCALE), tokens))

    def torch_pipeline(self):
        """A real diffusers pipeline from tiny random components around a fresh copy of the pristine UNet."""
        return tiny.torch_pipeline(copy.deepcopy(self.torch_unet), sdxl=self.name == "sdxl")

    def torch_predict(self, pipe, variant: str, scale: float = SCALE) -> np.ndarray:
        """The pipeline's UNet with its loaded IP-Adapter at `scale`, set through the pipeline."""
        pipe.set_ip_adapter_scale(scale)
        added = {"image_embeds": [torch.from_numpy(self.embeds[variant])]}
        added.update({k: torch.from_numpy(v) for k, v in self.added.items()})
        with torch.no_grad():
            out = pipe.unet(
                torch.from_numpy(self.sample),
                torch.from_numpy(self.timesteps).long(),
                torch.from_numpy(self.text),
                added_cond_kwargs=added,
            ).sample
        return out.numpy()


@pytest.fixture(scope="module", autouse=True)
def single_threaded_torch():
    """On this shared 2-core machine torch's OpenMP threads spin against JAX's and other processes': a tiny UNet
    forward takes 2-9 s with 2 threads and 0.04 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Models(dict):
    """Each tiny config's `Model`, built on first use and kept for the whole module."""

    def __missing__(self, name: str) -> Model:
        self[name] = Model(name)
        return self[name]


@pytest.fixture(scope="module")
def models() -> Models:
    return Models()


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def model(request, models) -> Model:
    return models[request.param]


@pytest.fixture
def sd15(models) -> Model:
    return models["sd15"]


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL) -> None:
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"max abs diff {err:.2e} x max|expected| > {rtol}"


def load_in_diffusers(model: Model, path: Path):
    pipe = model.torch_pipeline()
    pipe.load_ip_adapter(
        str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None, local_files_only=True
    )
    return pipe


def official_file(tmp_path: Path, state: dict, file_format: str, name: str = "ip-adapter") -> Path:
    """An official-layout file written by the reference tools (safetensors' numpy API / torch.save), not by us."""
    path = tmp_path / f"{name}{SUFFIX[file_format]}"
    if file_format == "safetensors":
        safetensors.numpy.save_file({f"{s}.{k}": v for s, part in state.items() for k, v in part.items()}, path)
    else:
        torch.save({s: {k: _to_torch(v) for k, v in part.items()} for s, part in state.items()}, path)
    return path


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def official_state(model: Model, variant: str = "base") -> dict:
    """A random official-layout adapter, numbered by diffusers' attention processor order (see tests/tiny.py)."""
    if variant != "full":
        return tiny.random_official_adapter(model.torch_unet, clip_dim=CLIP_DIM, num_tokens=NUM_TOKENS, variant=variant)
    state = tiny.random_official_adapter(model.torch_unet, clip_dim=CLIP_DIM, num_tokens=NUM_TOKENS)
    cross = model.config["cross_attention_dim"]
    spec = ImageProjSpec("full", CLIP_TOKENS, dict(cross_attention_dim=cross, clip_embeddings_dim=tiny.PLUS_HIDDEN))
    image_proj = flax_to_official(numpy_init(param_shapes(build_image_proj(spec)), seed=3))
    rng = np.random.default_rng(4)
    # numpy_init leaves norms at identity and biases at 0; move every 1-d param so none is trivial.
    state["image_proj"] = {
        k: (v + rng.standard_normal(v.shape) * 0.1).astype(np.float32) if v.ndim == 1 else v
        for k, v in image_proj.items()
    }
    return state


# --- Flax -> file -> diffusers ------------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_file_gives_our_noise_prediction_in_diffusers_pipeline(model, variant, file_format, tmp_path):
    path = save_ip_adapter(model.adapters[variant], tmp_path / f"ip{SUFFIX[file_format]}", format=file_format)
    pipe = load_in_diffusers(model, path)
    expected = model.torch_predict(pipe, variant)
    assert_close(model.flax_predict(variant), expected)
    # The comparison has power: without the image branch the prediction is far outside the tolerance.
    assert np.abs(model.torch_predict(pipe, variant, scale=0.0) - expected).max() > 100 * RTOL * np.abs(expected).max()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_export_loads_in_diffusers_and_matches_rounded_weights(sd15, dtype, tmp_path):
    """diffusers computes with the rounded weights; our model loaded from the same file predicts the same."""
    path = save_ip_adapter(sd15.adapters["base"], tmp_path / "ip.safetensors", dtype=dtype)
    _, _, rounded = load_ip_adapter(path, sd15.abstract)
    assert_close(sd15.flax_predict("base", rounded), sd15.torch_predict(load_in_diffusers(sd15, path), "base"))


# --- file -> Flax -> file -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_file_to_flax_to_file_is_byte_identical(sd15, variant, file_format, dtype, tmp_path):
    state = official_state(sd15, variant)
    state = {s: {k: v.astype(DTYPES[dtype]) for k, v in part.items()} for s, part in state.items()}
    source = official_file(tmp_path, state, file_format)
    spec, _, adapter = load_ip_adapter(source, sd15.abstract)
    assert (spec.variant, spec.num_tokens) == (variant, CLIP_TOKENS if variant == "full" else NUM_TOKENS)
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
    expected = {**extra, "variant": "plus", "num_tokens": str(NUM_TOKENS)}
    assert read_metadata(save_ip_adapter(adapter, tmp_path / "ip.safetensors", metadata=extra)) == expected
    path = save_ip_adapter(adapter, tmp_path / "ip.bin", format="bin", metadata=extra)
    assert read_metadata(path) == expected and json.loads(metadata_sidecar(path).read_text()) == expected
    # The .bin itself holds exactly the two sections, as the official files do.
    assert set(torch.load(path, weights_only=True)) == {"image_proj", "ip_adapter"}
    with pytest.raises(ValueError, match=r"variant='base' \(weights say 'plus'\)"):
        save_ip_adapter(adapter, tmp_path / "x.safetensors", metadata={"variant": "base"})


def test_flax_file_round_trip(sd15, tmp_path):
    adapter = sd15.adapters["plus"]
    path = flax_adapter_file.save_flax_adapter(adapter, tmp_path / "a.msgpack", metadata={"base_model": "m"})
    params, metadata = flax_adapter_file.read_flax_adapter(path)
    assert metadata == {"base_model": "m", "variant": "plus", "num_tokens": str(NUM_TOKENS)}
    jax.tree.map(np.testing.assert_array_equal, params, adapter)
    spec, _, loaded = flax_adapter_file.load_flax_adapter(path, sd15.abstract)
    assert spec.variant == "plus"
    jax.tree.map(np.testing.assert_array_equal, loaded, adapter)


# --- bad input: one clear error each ------------------------------------------------------------------------


def error_naming(call, *parts: str) -> str:
    """Runs `call`, which must raise one ConversionError whose message contains every one of `parts`."""
    with pytest.raises(ConversionError) as err:
        call()
    message = str(err.value)
    for part in parts:
        assert part in message, f"{part!r} not in the error message: {message}"
    return message


def test_truncated_safetensors(sd15, tmp_path):
    path = save_ip_adapter(sd15.adapters["base"], tmp_path / "ip.safetensors")
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-100])
    error_naming(
        lambda: load_ip_adapter(path, sd15.abstract),
        f"{path}: truncated: the file has {size - 100} bytes but its header needs at least {size}",
        "Likely cause: an interrupted download or copy",
    )


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "ip.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    error_naming(lambda: read_ip_adapter(path), f"{path}: not a readable safetensors file (4096 bytes", "corrupt")


def test_truncated_bin(sd15, tmp_path):
    path = save_ip_adapter(sd15.adapters["base"], tmp_path / "ip.bin", format="bin")
    path.write_bytes(path.read_bytes()[:1000])
    error_naming(
        lambda: read_ip_adapter(path),
        f"{path}: not a readable PyTorch checkpoint (1000 bytes; torch: ",
        "Likely cause: a truncated or corrupt file",
    )


class _RunsCodeWhenUnpickled:
    """Pickles as a call to `open(marker, "w")`: unpickling it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_bin_with_arbitrary_objects_is_refused_without_running_them(sd15, tmp_path):
    marker, path = tmp_path / "code-ran", tmp_path / "ip.bin"
    state = {s: {k: torch.from_numpy(v) for k, v in part.items()} for s, part in official_state(sd15).items()}
    torch.save({**state, "extra": _RunsCodeWhenUnpickled(marker)}, path)
    message = error_naming(
        lambda: load_ip_adapter(path, sd15.abstract),
        f"{path}: refused to load: the pickle references '",
        "could run arbitrary code",
    )
    assert "open'" in message  # the refused global, io.open or builtins.open
    assert not marker.exists()


def test_missing_ip_adapter_key(sd15, tmp_path):
    state = official_state(sd15)
    del state["ip_adapter"]["3.to_v_ip.weight"]
    path = official_file(tmp_path, state, "safetensors")
    error_naming(
        lambda: load_ip_adapter(path, sd15.abstract),
        f"{path} [ip_adapter] does not fit this UNet: missing (1): '3.to_v_ip.weight' (32, 32)",
    )


def test_missing_image_proj_key(sd15, tmp_path):
    state = official_state(sd15)
    del state["image_proj"]["norm.bias"]
    path = official_file(tmp_path, state, "bin")
    error_naming(
        lambda: load_ip_adapter(path, sd15.abstract),
        f"{path} [image_proj] does not fit ImageProjModel: missing (1): 'norm.bias' (32,)",
    )


def test_extra_ip_adapter_key(sd15, tmp_path):
    state = official_state(sd15)
    state["ip_adapter"]["99.to_k_ip.weight"] = np.zeros((64, 32), np.float32)
    path = official_file(tmp_path, state, "safetensors")
    error_naming(
        lambda: load_ip_adapter(path, sd15.abstract),
        f"{path} [ip_adapter] does not fit this UNet: unexpected (1): 99.to_k_ip.weight",
    )


def test_misshapen_key(sd15, tmp_path):
    state = official_state(sd15)
    state["ip_adapter"]["5.to_k_ip.weight"] = np.zeros((64, 30), np.float32)
    path = official_file(tmp_path, state, "bin")
    error_naming(
        lambda: load_ip_adapter(path, sd15.abstract),
        f"{path} [ip_adapter] does not fit this UNet: shape mismatch: '5.to_k_ip.weight': expected (64, 32), "
        "found (64, 30)",
    )


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_key_outside_the_two_sections(sd15, file_format, tmp_path):
    path = official_file(tmp_path, official_state(sd15), file_format)
    if file_format == "safetensors":
        safetensors.numpy.save_file({**safetensors.numpy.load_file(path), "lora.up.weight": np.zeros(2)}, path)
    else:
        torch.save({**torch.load(path, weights_only=True), "lora.up.weight": torch.zeros(2)}, path)
    error_naming(
        lambda: read_ip_adapter(path),
        f"{path}: unexpected key(s) outside the 'image_proj' and 'ip_adapter' sections (1): ['lora.up.weight']",
    )


def test_missing_section(sd15, tmp_path):
    path = tmp_path / "ip.bin"
    torch.save({"image_proj": {k: torch.from_numpy(v) for k, v in official_state(sd15)["image_proj"].items()}}, path)
    error_naming(lambda: read_ip_adapter(path), f"{path}: missing or empty section(s) ['ip_adapter']", "not an IP-Adapter file")


def test_sd15_adapter_on_sdxl_unet(models, tmp_path):
    path = save_ip_adapter(models["sd15"].adapters["base"], tmp_path / "ip-adapter_sd15.safetensors")
    error_naming(
        lambda: load_ip_adapter(path, models["sdxl"].abstract),
        f"{path} [ip_adapter] does not fit this UNet",
        "'1.to_k_ip.weight': expected (64, 64), found (32, 32)",  # SDXL-tiny cross-attention 64 wide, SD1.5-tiny 32
        "Likely cause: the adapter was trained for a different base model",
    )


@pytest.mark.parametrize(
    "variant, file_width, encoder, expected",
    [
        # ip-adapter_sdxl (bigG/14: 1280-d image_embeds) given a ViT-H/14 encoder (1024-d).
        (
            "base",
            1280,
            {"encoder_projection_dim": 1024},
            [
                "key 'image_proj.proj.weight': expected (128, 1024)",
                "found (128, 1280)",
                "Likely cause: an adapter trained with CLIP ViT-bigG/14 (1280-d) used with CLIP ViT-H/14 (1024-d)",
            ],
        ),
        # A Plus adapter reads hidden states: bigG/14 1664-d, ViT-H/14 1280-d.
        (
            "plus",
            1664,
            {"encoder_hidden_size": 1280},
            [
                "key 'image_proj.proj_in.weight': expected (32, 1280)",
                "found (32, 1664)",
                "Likely cause: an adapter trained with CLIP ViT-bigG/14 (1664-d) used with CLIP ViT-H/14 (1280-d)",
            ],
        ),
    ],
)
def test_adapter_for_another_image_encoder(sd15, tmp_path, variant, file_width, encoder, expected):
    state = official_state(sd15, variant)
    key = "proj.weight" if variant == "base" else "proj_in.weight"
    state["image_proj"][key] = np.zeros((state["image_proj"][key].shape[0], file_width), np.float32)
    path = official_file(tmp_path, state, "safetensors")
    error_naming(lambda: load_ip_adapter(path, sd15.abstract, **encoder), f"{path}: ", *expected)
    load_ip_adapter(path, sd15.abstract)  # without the encoder's widths there is nothing to contradict


def test_truncated_flax_file(sd15, tmp_path):
    path = flax_adapter_file.save_flax_adapter(sd15.adapters["base"], tmp_path / "a.msgpack")
    path.write_bytes(path.read_bytes()[:-10])
    error_naming(lambda: flax_adapter_file.read_flax_adapter(path), f"{path}: not a readable msgpack file", "truncated")


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_failed_save_leaves_no_partial_file(sd15, file_format, tmp_path, monkeypatch):
    path = tmp_path / f"ip{SUFFIX[file_format]}"
    path.write_bytes(b"previous version")

    def write_part_then_fail(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    if file_format == "safetensors":
        monkeypatch.setattr(safetensors.numpy, "save_file", write_part_then_fail)
    else:
        monkeypatch.setattr(torch, "save", write_part_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_ip_adapter(sd15.adapters["base"], path, format=file_format)
    assert os.listdir(tmp_path) == [path.name] and path.read_bytes() == b"previous version"


def test_saved_files_get_the_usual_permissions(sd15, tmp_path):
    """As `open(path, "w")` would create them (safetensors itself writes owner-only 0600 files)."""
    (tmp_path / "reference").touch()
    usual = stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    adapter = sd15.adapters["base"]
    written = [
        save_ip_adapter(adapter, tmp_path / "ip.safetensors"),
        save_ip_adapter(adapter, tmp_path / "ip.bin", format="bin"),
        metadata_sidecar(tmp_path / "ip.bin"),
        flax_adapter_file.save_flax_adapter(adapter, tmp_path / "a.msgpack"),
    ]
    assert [stat.S_IMODE(path.stat().st_mode) for path in written] == [usual] * 4


def test_save_refuses_a_name_diffusers_would_misread(sd15, tmp_path):
    with pytest.raises(ValueError, match="must not end in '.safetensors'"):
        save_ip_adapter(sd15.adapters["base"], tmp_path / "ip.safetensors", format="bin")
    assert not os.listdir(tmp_path)


# --- CLI ------------------------------------------------------------------------------------------------------


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
    assert read_metadata(exported) == {"base_model": "tiny", "variant": "plus", "num_tokens": str(NUM_TOKENS)}
    captured = capsys.readouterr()
    assert "tracing UNet shapes" in captured.err and "done in" in captured.err
    assert f"wrote {exported}: plus, {NUM_TOKENS} tokens" in captured.out

    half = str(tmp_path / "half.bin")
    assert cli.main(["to-torch", "--adapter", flax_file, "--out", half, "--dtype", "fp16"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", half]) == 0
    printed = {k: v.strip() for k, _, v in (line.partition(":") for line in capsys.readouterr().out.splitlines())}
    layers = len(state["ip_adapter"]) // 2
    assert printed["variant"] == "plus" and printed["tokens"] == str(NUM_TOKENS) and printed["dtypes"] == "float16"
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
        [sys.executable, "-m", "conversion.cli", "to-torch", "--help"], cwd=repo, capture_output=True, text=True
    )
    assert result.returncode == 0 and "--dtype" in result.stdout
