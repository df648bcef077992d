"""Bad model folders: each load ends in one `ConversionError` naming the file, the key, the expected and found
shapes and the likely cause, and nothing is written (no partial cache)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch

from ipadapter_jax.testing import tiny, tiny_folders
from ipadapter_jax.weights.diffusers_models import (
    load_controlnet,
    load_pipeline,
    load_scheduler,
    load_text_encoder,
    load_unet,
    load_vae,
)
from ipadapter_jax.weights.torch_layout import ConversionError

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd15") / "unet"
    tiny.torch_unet(tiny.SD15_TINY).save_pretrained(folder)
    return folder


def copy_with_state(source: Path, target: Path, edit) -> Path:
    """`source` copied to `target` with its state dict replaced by `edit(state)`."""
    shutil.copytree(source, target)
    state = safetensors.torch.load_file(source / WEIGHTS)
    safetensors.torch.save_file(edit(state), target / WEIGHTS)
    return target


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_missing_key(unet_folder, tmp_path):
    key = "down_blocks.1.attentions.0.proj_in.weight"
    folder = copy_with_state(unet_folder, tmp_path / "unet", lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(ConversionError) as info:
        load_unet(folder)
    message = str(info.value)
    assert str(folder / WEIGHTS) in message
    assert "missing (1): down_blocks_1/attentions_0/proj_in/kernel" in message
    assert "likely cause" in message and "incomplete" in message


def test_extra_key(unet_folder, tmp_path):
    def add(state):
        return {**state, "down_blocks.0.attentions.0.to_k_ip.weight": state["conv_in.weight"].clone()}

    folder = copy_with_state(unet_folder, tmp_path / "unet", add)
    with pytest.raises(ConversionError, match=r"unexpected \(1\): down_blocks.0.attentions.0.to_k_ip.weight"):
        load_unet(folder)


def test_weights_of_another_base(unet_folder, tmp_path):
    """SD1.5-shaped UNet weights with an SDXL-shaped config."""
    folder = tmp_path / "unet"
    shutil.copytree(unet_folder, folder)
    tiny.torch_unet(tiny.SDXL_TINY).save_config(tmp_path / "sdxl")
    shutil.copy(tmp_path / "sdxl" / "config.json", folder / "config.json")
    with pytest.raises(ConversionError) as info:
        load_unet(folder)
    message = str(info.value)
    assert message.startswith(f"{folder / WEIGHTS} does not fit the target model: shape mismatch: ")
    # e.g. an attn2 key projection: SD1.5 cross_attention_dim 32, SDXL 64.
    assert (
        "'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight': expected Flax "
        "down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/kernel (64, 64), found (32, 64) (PyTorch (64, 32))"
    ) in message
    assert "SD1.5 weights with an SDXL config" in message


def test_missing_config(unet_folder, tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(unet_folder, folder)
    (folder / "config.json").unlink()
    with pytest.raises(ConversionError, match=rf"{folder / 'config.json'} is missing .*not a diffusers model folder"):
        load_unet(folder)
    with pytest.raises(ConversionError, match="config.json is missing"):
        load_text_encoder(folder)


def test_config_of_another_component(unet_folder):
    with pytest.raises(ConversionError, match="describes a UNet2DConditionModel, expected a AutoencoderKL"):
        load_vae(unet_folder)


def test_config_the_flax_model_cannot_represent(unet_folder, tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(unet_folder, folder)
    edit_config(folder, act_fn="gelu", class_embed_type="timestep")
    with pytest.raises(ConversionError, match="cannot represent act_fn='gelu', class_embed_type='timestep'"):
        load_unet(folder)


def test_sdxl_controlnet_is_refused(tmp_path):
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(tiny.torch_unet(tiny.SDXL_TINY)).save_pretrained(tmp_path / "controlnet")
    with pytest.raises(ConversionError, match="cannot represent .*addition_embed_type='text_time'"):
        load_controlnet(tmp_path / "controlnet")


def test_truncated_file_through_the_loader_leaves_no_cache(unet_folder, tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(unet_folder, folder)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    cache = tmp_path / "out" / "flax_cache" / "unet"
    with pytest.raises(ConversionError, match=rf"{folder / WEIGHTS}: truncated: tensor '.+' .* float32 ends at byte"):
        load_unet(folder, cache_dir=cache)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_not_a_pipeline_folder(unet_folder):
    with pytest.raises(ConversionError, match="missing subfolder.*vae, text_encoder, tokenizer, scheduler"):
        load_pipeline(unet_folder.parent, progress=False)


def test_text_encoder_folder_with_unet_weights(unet_folder, tmp_path):
    """A text encoder config next to another model's weights: every problem listed, capped at 20 per kind."""
    folder = tmp_path / "text_encoder"
    shutil.copytree(unet_folder, folder)
    (folder / "config.json").unlink()
    tiny_folders.text_encoder().config.to_json_file(folder / "config.json")
    with pytest.raises(ConversionError) as info:
        load_text_encoder(folder)
    message = str(info.value)
    assert "missing (" in message and "unexpected (" in message and " ..." in message
    assert len(message) < 10_000 and "\n" not in message


def test_scheduler_errors(unet_folder):
    with pytest.raises(ConversionError, match="scheduler_config.json is missing"):
        load_scheduler(unet_folder)
    with pytest.raises(ValueError, match="unknown scheduler kind 'heun'"):
        load_scheduler(unet_folder, "heun")
