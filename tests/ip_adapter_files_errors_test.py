"""Official IP-Adapter files: every bad input ends in one ConversionError naming the file, the key, the expected
and found shapes and the likely cause; failed saves leave nothing behind. (Round trips and parity with diffusers:
ip_adapter_files_test.py.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from ipadapter_jax.cli import convert as cli
from ipadapter_jax.testing.adapter_files import SUFFIX, Model, Models, official_file, official_state
from ipadapter_jax.weights import flax_adapter_file
from ipadapter_jax.weights.adapter_files import load_ip_adapter, metadata_sidecar, read_ip_adapter, save_ip_adapter
from ipadapter_jax.weights.torch_layout import ConversionError


@pytest.fixture(scope="module")
def models() -> Models:
    return Models()


@pytest.fixture
def sd15(models) -> Model:
    return models["sd15"]


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
    error_naming(
        lambda: read_ip_adapter(path), f"{path}: missing or empty section(s) ['ip_adapter']", "not an IP-Adapter file"
    )


def test_sd15_adapter_on_sdxl_unet(models, tmp_path):
    path = save_ip_adapter(models["sd15"].adapters["base"], tmp_path / "ip-adapter_sd15.safetensors")
    error_naming(
        lambda: load_ip_adapter(path, models["sdxl"].abstract),
        f"{path} [ip_adapter] does not fit this UNet",
        "'1.to_k_ip.weight': expected (64, 64), found (32, 32)",  # SDXL-tiny cross-attention 64 wide, SD1.5-tiny 32
        "Likely cause: the adapter was trained for a different base model",
    )


@pytest.mark.parametrize(
    "kind, file_width, encoder, expected",
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
def test_adapter_for_another_image_encoder(sd15, tmp_path, kind, file_width, encoder, expected):
    state = official_state(sd15, kind)
    key = "proj.weight" if kind == "base" else "proj_in.weight"
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


def test_convert_refuses_to_write_over_its_input(sd15, tmp_path, capsys):
    source = save_ip_adapter(sd15.adapters["base"], tmp_path / "ip.safetensors")
    before = source.read_bytes()
    argv = ["to-flax", "--adapter", str(source), "--unet-config", str(tmp_path), "--out", str(source)]
    assert cli.main(argv) == 2
    assert "is the input file" in capsys.readouterr().err
    assert source.read_bytes() == before


@pytest.mark.parametrize(
    "command, out, message",
    [
        ("to-flax", "adapter.safetensors", "Flax adapter files end in .msgpack"),
        ("to-torch", "adapter.msgpack", "bin files end in .bin or .pt or .pth"),
    ],
)
def test_convert_refuses_an_output_suffix_that_misnames_the_format(sd15, tmp_path, capsys, command, out, message):
    source = (
        save_ip_adapter(sd15.adapters["base"], tmp_path / "ip.safetensors")
        if command == "to-flax"
        else flax_adapter_file.save_flax_adapter(sd15.adapters["base"], tmp_path / "ip.msgpack")
    )
    argv = [command, "--adapter", str(source), "--out", str(tmp_path / out)]
    argv += ["--unet-config", str(tmp_path)] if command == "to-flax" else []
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / out).exists()


@pytest.mark.parametrize("bad", ["nan", "inf", "int64"])
def test_non_finite_or_integer_weights_are_refused(sd15, tmp_path, bad):
    state = official_state(sd15)
    key = sorted(state["ip_adapter"])[0]
    tensor = state["ip_adapter"][key].copy()
    if bad == "int64":
        tensor = tensor.astype(np.int64)
    else:
        tensor.flat[3] = np.nan if bad == "nan" else np.inf
    state["ip_adapter"][key] = tensor
    path = official_file(tmp_path, state, "safetensors")
    expected = "has dtype int64" if bad == "int64" else "holds 1 non-finite value(s) (NaN/inf)"
    error_naming(lambda: load_ip_adapter(path, sd15.abstract), str(path), f"'ip_adapter.{key}'", expected)
