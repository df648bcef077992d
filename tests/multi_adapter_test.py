"""Several IP-Adapters at once and regional masks: `IPAdapterPipeline` vs diffusers' PyTorch pipelines with
`load_ip_adapter([...])`, `set_ip_adapter_scale([...])` and `cross_attention_kwargs={"ip_adapter_masks": ...}`.

The tiny saved pipelines of `pipeline_test` (`ipadapter_jax.testing.pipeline_fixtures`) plus a second Plus adapter
(its own seed, 6 tokens per image, so the adapters' kernels and token counts differ). Both frameworks start from
the same latents; 64 px (64x96 for the masks), 4 DDIM steps. Tolerance on [0, 1] pixels: 5e-5 (the issue asks for
1e-3); measured 2.1e-6 (SD1.5, two adapters), 2.8e-6 (masks), 2.6e-6 (unloaded), 2.9e-6 (SDXL), 2.4e-6 (Full adapter
from training's export); the second adapter and the masks move the images by > 0.05.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image

from ipadapter_jax.pipelines import IPAdapterPipeline
from ipadapter_jax.testing import pipeline_fixtures as tu

pytestmark = [pytest.mark.parity, pytest.mark.slow]

TOLERANCE = 5e-5  # as pipeline_test; the issue asks for 1e-3
STEPS = 4
IMAGE, GRAY_IMAGE, THIRD_IMAGE = tu.test_image(0), tu.test_image(1, (50, 70), "L"), tu.test_image(2, (60, 60))
# Two regions given at another size than the 64x96 output: the left and the right half.
LEFT_MASK = Image.fromarray(np.tile((np.arange(120) < 60).astype(np.uint8) * 255, (80, 1)))
RIGHT_MASK = Image.fromarray(255 - np.asarray(LEFT_MASK))
PER_BLOCK = {"down": {"block_1": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}, "mid": 0.5}


def latents(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, height // 8, width // 8)).astype(np.float32)


def second_plus_file(models: tu.SavedPipelines) -> Path:
    path = models.folder / "ip-adapter-plus-6-tokens.safetensors"
    if not path.exists():
        tu.save_adapter(path, models.torch_base.unet, "plus", seed=7, num_tokens=6)
    return path


def torch_multi(models: tu.SavedPipelines, files: list[Path]):
    """diffusers' pipeline with the adapter files loaded by `load_ip_adapter([...])` (offline)."""
    pipe = copy.deepcopy(models.torch_base)
    pipe.load_ip_adapter(
        [str(f.parent) for f in files],
        subfolder=[""] * len(files),
        weight_name=[f.name for f in files],
        image_encoder_folder=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_torch(pipe, scale, height: int = 64, width: int = 64, **extra) -> np.ndarray:
    pipe.set_ip_adapter_scale(scale)
    with torch.no_grad():
        return pipe(
            prompt="a red cat",
            num_inference_steps=STEPS,
            guidance_scale=7.5,  # SDXL's default is 5
            height=height,
            width=width,
            latents=torch.from_numpy(latents(height, width)),
            output_type="np",
            **extra,
        ).images


def run_flax(pipe: IPAdapterPipeline, height: int = 64, width: int = 64, **extra) -> np.ndarray:
    out = pipe(
        prompt="a red cat",
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=height,
        width=width,
        latents=latents(height, width),
        **extra,
    )
    assert out.pixels.shape == (1, height, width, 3)
    return out.pixels


def assert_images_close(actual: np.ndarray, expected: np.ndarray) -> None:
    err = np.abs(actual - expected).max()
    assert err <= TOLERANCE, f"max |ours - diffusers| = {err:.2e} > {TOLERANCE} on [0, 1] pixels"


@pytest.fixture(scope="module")
def sd15_pair(sd15: tu.SavedPipelines) -> tuple[IPAdapterPipeline, object]:
    """Ours: the base adapter's pipeline with the second Plus adapter loaded onto it; diffusers' with both."""
    plus = second_plus_file(sd15)
    pipe = tu.flax_pipeline(sd15.folder, "base")
    pipe.load_adapter(plus)
    return pipe, torch_multi(sd15, [tu.adapter_file(sd15.folder, "base"), plus])


def test_two_adapters_sd15_match_diffusers(sd15_pair):
    """Base (one image, scale 0.6) + Plus (two images, a per-block scale): their outputs summed in every attn2."""
    ours, theirs = sd15_pair
    images = [IMAGE, [GRAY_IMAGE, THIRD_IMAGE]]
    result = run_flax(ours, image=images, scale=[0.6, PER_BLOCK])
    assert_images_close(result, run_torch(theirs, [0.6, PER_BLOCK], ip_adapter_image=images))
    only_first = run_flax(ours, image=images, scale=[0.6, 0.0])  # the same program: scales are data
    assert np.abs(result - only_first).max() > 0.05
    other_mode = ours(
        image=images, prompt="a red cat", num_inference_steps=STEPS, height=64, width=64, latents=latents(64, 64),
        scale=[0.6, PER_BLOCK], embeds_scaling=["k_v", "v_only"],
    )  # fmt: skip
    assert np.abs(other_mode.pixels - result).max() > 0.01 and ours.sampler.num_compiled == 1
    assert other_mode.settings["adapter_kind"] == ["base", "plus"]
    assert other_mode.settings["embeds_scaling"] == ["k_v", "v_only"] and other_mode.settings["scale"][0] == 0.6


def test_masks_two_images_two_regions_non_square_match_diffusers(sd15_pair):
    """Adapter 0 gets two images, each confined to one half of a 64x96 image by a mask given at another size;
    adapter 1 (no mask) one image everywhere."""
    ours, theirs = sd15_pair
    left, right = LEFT_MASK, RIGHT_MASK
    images = [[IMAGE, GRAY_IMAGE], THIRD_IMAGE]
    masks = IPAdapterMaskProcessor().preprocess([left, right], height=64, width=96)  # (2, 1, 64, 96)
    expected = run_torch(
        theirs,
        [0.8, 0.5],
        64,
        96,
        ip_adapter_image=images,
        cross_attention_kwargs={"ip_adapter_masks": [masks.reshape(1, 2, 64, 96), None]},
    )
    result = run_flax(ours, 64, 96, image=images, scale=[0.8, 0.5], mask=[[left, right], None])
    assert_images_close(result, expected)
    unmasked = run_flax(ours, 64, 96, image=images, scale=[0.8, 0.5])
    assert np.abs(result - unmasked).max() > 0.05


def test_unloading_the_second_adapter_matches_diffusers_with_one(sd15: tu.SavedPipelines, sd15_pair):
    ours, _ = sd15_pair
    ours.unload_adapter()
    try:
        single = run_flax(ours, image=IMAGE, scale=0.6)
        assert_images_close(single, run_torch(sd15.torch("base"), 0.6, ip_adapter_image=IMAGE))
        with pytest.raises(ValueError, match="holds one adapter, which it needs"):
            ours.unload_adapter()
    finally:
        ours.load_adapter(second_plus_file(sd15))
    assert len(ours.adapters) == 2


def test_two_adapters_sdxl_from_pretrained_match_diffusers(sdxl: tu.SavedPipelines):
    files = [tu.adapter_file(sdxl.folder, "base"), second_plus_file(sdxl)]
    ours = IPAdapterPipeline.from_pretrained(sdxl.folder, files, sdxl.folder / "image_encoder", progress=False)
    images = [GRAY_IMAGE, IMAGE]
    result = run_flax(ours, image=images, scale=[0.5, 0.8])
    assert_images_close(result, run_torch(torch_multi(sdxl, files), [0.5, 0.8], ip_adapter_image=images))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(image=IMAGE), r"image: this pipeline has 2 adapters, pass a list with one entry per adapter; got Image"),
        (dict(image=[IMAGE, None]), r"every adapter needs an image prompt .* adapter\(s\) \[1\] have none"),
        (dict(image=[IMAGE, IMAGE], scale=[0.5]), r"scale: this pipeline has 2 adapters, .* got a list of 1"),
        (
            dict(image=[IMAGE, IMAGE], mask=[[IMAGE, IMAGE], None]),
            r"mask of adapter 0: one mask per image .*\(1\), got 2",
        ),
        (dict(image=[IMAGE, IMAGE], embeds_scaling="K+V"), r"embeds_scaling must be one of \('v_only'"),
    ],
)
def test_bad_per_adapter_arguments_are_one_clear_error(sd15_pair, arguments: dict, message: str):
    with pytest.raises(ValueError, match=message):
        sd15_pair[0](num_inference_steps=2, **arguments)


def test_generate_cli_two_adapters_and_masks_from_a_settings_file_match_diffusers(
    sd15: tu.SavedPipelines, sd15_pair, tmp_path
):
    """`generate --settings FILE`: the mask case's request written as JSON (per-adapter entries); the PNGs match
    diffusers given the noise `--seed 3` stands for (normal(PRNGKey(3)))."""
    import jax

    from ipadapter_jax.cli import generate as generate_cli

    names = {}
    for name, picture in dict(a=IMAGE, b=GRAY_IMAGE, c=THIRD_IMAGE, left=LEFT_MASK, right=RIGHT_MASK).items():
        names[name] = str(tmp_path / f"{name}.png")
        picture.save(names[name])
    settings = {
        "base": str(sd15.folder),
        "image_encoder": str(sd15.folder / "image_encoder"),
        "adapters": [
            {"adapter": str(tu.adapter_file(sd15.folder, "base")), "image": [names["a"], names["b"]],
             "mask": [names["left"], names["right"]], "scale": 0.8},
            {"adapter": str(second_plus_file(sd15)), "image": names["c"], "scale": 0.5},
        ],
        "prompt": "a red cat", "steps": STEPS, "height": 64, "width": 96, "seed": 3,
    }  # fmt: skip
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    argv = ["--settings", str(tmp_path / "settings.json"), "--out", str(tmp_path / "out")]
    assert generate_cli.main(argv + ["--compile-cache", jax.config.jax_compilation_cache_dir]) == 0
    written = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert written["scale"] == [0.8, 0.5] and written["masks"] == [2, 0] and written["adapter_kind"] == ["base", "plus"]
    ours = np.asarray(Image.open(tmp_path / "out" / "image_00.png"), np.float32) / 255

    _, theirs = sd15_pair
    masks = IPAdapterMaskProcessor().preprocess([LEFT_MASK, RIGHT_MASK], height=64, width=96)
    theirs.set_ip_adapter_scale([0.8, 0.5])
    noise = np.array(jax.random.normal(jax.random.PRNGKey(3), (1, 4, 8, 12)))
    with torch.no_grad():
        expected = theirs(
            prompt="a red cat", num_inference_steps=STEPS, height=64, width=96, latents=torch.from_numpy(noise),
            output_type="np", ip_adapter_image=[[IMAGE, GRAY_IMAGE], THIRD_IMAGE],
            cross_attention_kwargs={"ip_adapter_masks": [masks.reshape(1, 2, 64, 96), None]},
        ).images[0]  # fmt: skip
    assert np.abs(ours - expected).max() <= 1 / 255 + TOLERANCE  # PNG rounding


def test_an_adapter_exported_by_training_runs_next_to_an_official_one(sd15: tu.SavedPipelines, sd15_pair, tmp_path):
    """A fresh Full adapter (the paper's init; one token per CLIP hidden state) written by training's export
    (`hooks.export_adapter`, what `ipadapter-jax train` writes) replaces the second adapter; diffusers loads the
    same two files."""
    from ipadapter_jax.training.hooks import export_adapter
    from ipadapter_jax.weights import load_adapter, new_adapter

    ours, _ = sd15_pair
    trained = new_adapter("full", ours.base, ours.image_encoder, num_tokens=tu.tiny.PLUS_TOKENS, seed=3)
    path = tmp_path / "trained.safetensors"
    export_adapter(trained.params, str(path), {})
    ours.unload_adapter()
    ours.load_adapter(load_adapter(path, ours.base, image_encoder=ours.image_encoder))
    try:
        images = [IMAGE, [GRAY_IMAGE, THIRD_IMAGE]]
        result = run_flax(ours, image=images, scale=[0.6, 0.7])
        theirs = torch_multi(sd15, [tu.adapter_file(sd15.folder, "base"), path])
        assert_images_close(result, run_torch(theirs, [0.6, 0.7], ip_adapter_image=images))
    finally:
        ours.unload_adapter()
        ours.load_adapter(second_plus_file(sd15))
