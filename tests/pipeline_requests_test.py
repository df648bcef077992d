"""Requests to the pipeline beyond parity: any image prompt input, one clear error per bad request, the outputs
(images, settings, grid), and the `generate` CLI end to end. The tiny pipelines are `tests/conftest.py`'s."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_jax.cli import generate as generate_cli
from ipadapter_jax.pipelines import IPAdapterPipeline, image_grid
from ipadapter_jax.testing import pipeline_fixtures as tu
from ipadapter_jax.weights import load_adapter, load_base

SIZE, STEPS = 64, 4
IMAGE = tu.test_image(0)


@pytest.mark.parametrize(
    "image",
    [
        tu.test_image(2, (60, 90), "L"),
        tu.test_image(3, (80, 80), "RGBA"),
        tu.test_image(4, (3, 2)),
        tu.test_image(6, (2400, 1600)),
        np.asarray(tu.test_image(7, (40, 30), "L")),  # (H, W) uint8 array
    ],
    ids=["grayscale", "rgba", "tiny", "huge", "gray_array"],
)
def test_any_image_mode_and_size_is_encoded_as_clip_preprocessing_would(sd15: tu.SavedPipelines, image):
    pipe = sd15.flax("base")
    torch_pipe = sd15.torch("base")
    # transformers reads a 2-D array as channels-first garbage; as a PIL image ("L") it is what we are given.
    as_pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    pixels = torch_pipe.feature_extractor(as_pil, return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = torch_pipe.image_encoder(pixels).image_embeds.numpy()
    actual = pipe.encode_image(image)
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


def test_scale_dict_naming_a_missing_block_is_one_clear_error(sd15: tu.SavedPipelines):
    with pytest.raises(ValueError, match=r"down\.block_2 has no cross-attention layers"):
        sd15.flax("base")(IMAGE, scale={"down": {"block_2": 1.0}}, num_inference_steps=STEPS, height=SIZE, width=SIZE)


def test_adapter_for_another_cross_attention_width_is_one_clear_error(sd15: tu.SavedPipelines, sdxl: tu.SavedPipelines):
    """An SDXL adapter (64-d tokens) on the SD1.5 UNet (32-d cross-attention)."""
    base_sd15 = sd15.flax("base")
    adapter = load_adapter(tu.adapter_file(sdxl.folder, "base"), load_base(sdxl.folder, progress=False))
    with pytest.raises(ValueError, match="makes 64-d tokens but this UNet's cross-attention takes 32-d"):
        IPAdapterPipeline(base_sd15.base, base_sd15.image_encoder, adapter)


@pytest.mark.parametrize("size", [(60, 64), (64, 36)])
def test_size_not_a_multiple_of_8_is_one_clear_error(sd15: tu.SavedPipelines, size):
    height, width = size
    with pytest.raises(ValueError, match=rf"multiples of 32 .* got {height}x{width}"):
        sd15.flax("base")(IMAGE, height=height, width=width)


def test_outputs_images_settings_and_grid(sd15: tu.SavedPipelines):
    out = sd15.flax("base")(IMAGE, **tu.SHARDED_REQUEST)  # 2 prompts x 3 images
    assert len(out.images) == 6 and out.pixels.shape == (6, SIZE, SIZE, 3)
    np.testing.assert_array_equal(np.asarray(out.images[4]), (out.pixels[4] * 255).round().astype(np.uint8))
    assert out.settings["prompt"] == ["a red cat", "the dog"] and out.settings["seed"] == 3
    assert out.settings["num_images_per_prompt"] == 3 and out.settings["scale"] == 0.6
    assert np.abs(out.pixels[0] - out.pixels[1]).max() > 0.01  # each image its own noise
    grid = image_grid(out.images)  # 3 columns x 2 rows, row-major
    assert grid.size == (3 * SIZE, 2 * SIZE)
    np.testing.assert_array_equal(np.asarray(grid)[SIZE:, SIZE : 2 * SIZE], np.asarray(out.images[4]))


# --- CLI -------------------------------------------------------------------------------------------------------


def test_generate_cli_writes_the_images_a_grid_and_every_setting(sd15: tu.SavedPipelines, tmp_path):
    image_path = tmp_path / "prompt.png"
    IMAGE.save(image_path)
    out = tmp_path / "out"
    request = tu.SHARDED_REQUEST  # 2 prompts x 3 images: the structure other tests compiled already
    argv = ["--base", str(sd15.folder), "--adapter", str(tu.adapter_file(sd15.folder, "base"))]
    argv += ["--image-encoder", str(sd15.folder / "image_encoder"), "--image", str(image_path)]
    for prompt in request["prompt"]:
        argv += ["--prompt", prompt]
    argv += ["--num-images", "3", "--scale", "0.6", "--steps", "3", "--height", "64", "--width", "64", "--seed", "3"]
    argv += ["--out", str(out), "--compile-cache", jax.config.jax_compilation_cache_dir]
    assert generate_cli.main(argv) == 0

    settings = json.loads((out / "settings.json").read_text())
    assert settings["outputs"] == [f"image_{i:02d}.png" for i in range(6)]
    assert settings["prompt"] == request["prompt"] and settings["seed"] == 3 and settings["scale"] == 0.6
    assert settings["num_inference_steps"] == 3 and settings["scheduler"] == "DDIMScheduler"
    assert settings["base"] == str(sd15.folder) and settings["images"] == [str(image_path)]
    assert set(settings["timings"]) == {"load_s", "prepare_s", "compile_s", "sample_s"}
    expected = sd15.flax("base")(IMAGE, **request).images
    for name, image in zip(settings["outputs"], expected):
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), np.asarray(image))
    assert Image.open(out / "grid.png").size == (3 * SIZE, 2 * SIZE)  # one row per prompt


@pytest.mark.parametrize(
    "change, message, status",
    [
        (["--image", "missing.png"], "missing.png", 1),  # a runtime failure
        (["--scale", "{not json"], "--scale must be a number or a JSON object", 2),  # usage: before any work
        (["--scale", "nan"], "--scale must be a finite number", 2),
        (["--guidance-scale", "inf"], "argument --guidance-scale: must be a finite number", 2),
        (["--height", "0"], "argument --height: must be >= 1", 2),
        (["--control-image", "c.png"], "--controlnet and --control-image go together", 2),
    ],
)
def test_generate_cli_bad_input_is_one_error_line(tmp_path, capsys, change, message, status):
    argv = ["--base", str(tmp_path), "--adapter", "a.safetensors", "--image-encoder", str(tmp_path)]
    argv += ["--image", "missing.png"] if "--image" not in change else []
    assert generate_cli.main(argv + change) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
