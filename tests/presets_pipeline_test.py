"""Scale presets and image combine modes through the pipeline and the `generate` CLI, on the tiny SD1.5-like
pipeline (`tests/conftest.py`'s `sd15`).

A preset must act exactly as the per-block scale dict with its numbers (computed by hand below; the dict itself is
parity-tested against diffusers' `set_ip_adapter_scale` in pipeline_test.py), with the step range too, and switching
presets must not compile anything. "average" of two images must equal passing their averaged CLIP features as
`image_embeds`, the negative side being the first negative image's features (ComfyUI_IPAdapter_plus).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.cli import generate as generate_cli
from ipadapter_jax.models.scale_presets import ScalePreset
from ipadapter_jax.testing import pipeline_fixtures as tu
from ipadapter_jax.testing.compilations import lowerings

SIZE, STEPS = 64, 4
IMAGE, OTHER_IMAGE = tu.test_image(0), tu.test_image(8, (70, 60))
NEGATIVES = [tu.test_image(9), tu.test_image(10)]
REQUEST = dict(prompt="a red cat", num_inference_steps=STEPS, height=SIZE, width=SIZE, seed=0)
STEP_RANGE = (0.25, 1.0)
# The tiny UNet's Transformer2Ds in ComfyUI's order t = 0..10: down_blocks 0-1 (2 each), mid, up_blocks 1-2 (3 each).
# ease-in at weight 0.8: 0.8 * (0.05 + 0.95 * (1 - t / 11)).
EASE_IN_08 = {
    "down": {"block_0": [0.8, 0.730909], "block_1": [0.661818, 0.592727]},
    "mid": 0.523636,
    "up": {"block_1": [0.454545, 0.385455, 0.316364], "block_2": [0.247273, 0.178182, 0.109091]},
}
# weak-output at weight 0.8: 0.2 * 0.8 in the up blocks.
WEAK_OUTPUT_08 = {"down": 0.8, "mid": 0.8, "up": 0.16}
TOLERANCE = 1e-5  # measured: 8e-7 (ease-in: the dict rounds to 6 decimals), 0 (weak-output), 2e-6 (average)

pytestmark = pytest.mark.slow


def test_presets_act_as_their_numbers_with_the_step_range_compiled_once(sd15):
    pipe = sd15.flax("base")
    eased = pipe(IMAGE, scale=ScalePreset("ease in", 0.8), image_step_range=STEP_RANGE, **REQUEST)
    with lowerings() as lowered:
        weak = pipe(IMAGE, scale=ScalePreset("weak-output", 0.8), image_step_range=STEP_RANGE, **REQUEST).pixels
        eased_by_hand = pipe(IMAGE, scale=EASE_IN_08, image_step_range=STEP_RANGE, **REQUEST).pixels
        weak_by_hand = pipe(IMAGE, scale=WEAK_OUTPUT_08, image_step_range=STEP_RANGE, **REQUEST).pixels
    assert lowered == []
    np.testing.assert_allclose(eased.pixels, eased_by_hand, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(weak, weak_by_hand, rtol=0, atol=TOLERANCE)
    assert np.abs(eased.pixels - weak).max() > 1e-3  # the per-layer numbers matter
    assert eased.settings["scale"] == {
        "weight_type": "ease-in",
        "weight": 0.8,
        "composition_weight": None,
        "boost": None,
    }


def test_a_layer_table_preset_on_the_tiny_layout_is_one_clear_error(sd15):
    with pytest.raises(ValueError, match=r"'style-transfer' is defined for SD1.5/SD2's 16 .* this UNet has 11"):
        sd15.flax("base")(IMAGE, scale=ScalePreset("style-transfer"), **REQUEST)


def test_average_of_two_images_is_their_averaged_features(sd15):
    pipe = sd15.flax("base")
    features = pipe.encode_image([IMAGE, OTHER_IMAGE])  # (2, projection_dim)
    averaged = pipe([IMAGE, OTHER_IMAGE], combine="average", negative_image=NEGATIVES, **REQUEST)
    by_hand = pipe(
        image_embeds=(features[:1] + features[1:]) / 2,
        negative_image_embeds=pipe.encode_image(NEGATIVES[:1]),
        **REQUEST,
    ).pixels
    np.testing.assert_allclose(averaged.pixels, by_hand, rtol=0, atol=TOLERANCE)
    concatenated = pipe([IMAGE, OTHER_IMAGE], negative_image=NEGATIVES, **REQUEST).pixels
    assert np.abs(averaged.pixels - concatenated).max() > 1e-3
    assert averaged.settings["combine"] == "average" and averaged.settings["num_prompt_images"] == 2


def cli_argv(sd15, tmp_path) -> list[str]:
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for image, path in zip((IMAGE, OTHER_IMAGE), paths):
        image.save(path)
    argv = ["--base", str(sd15.folder), "--adapter", str(tu.adapter_file(sd15.folder, "base"))]
    argv += ["--image-encoder", str(sd15.folder / "image_encoder"), "--image", str(paths[0]), "--image", str(paths[1])]
    argv += ["--prompt", REQUEST["prompt"], "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE)]
    return argv + ["--compile-cache", jax.config.jax_compilation_cache_dir]


def test_generate_cli_weight_type_and_combine(sd15, tmp_path):
    out = tmp_path / "out"
    argv = cli_argv(sd15, tmp_path) + ["--weight-type", "ease-in", "--scale", "0.8", "--combine", "subtract"]
    assert generate_cli.main(argv + ["--image-step-range", *map(str, STEP_RANGE), "--out", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["scale"] == {"weight_type": "ease-in", "weight": 0.8, "composition_weight": None, "boost": None}
    assert settings["combine"] == "subtract"
    # The reloaded images (PNG: uint8) are the Python API's with the same settings.
    expected = sd15.flax("base")(
        [IMAGE, OTHER_IMAGE], combine="subtract", scale=EASE_IN_08, image_step_range=STEP_RANGE, **REQUEST
    ).pixels
    written = np.asarray(Image.open(out / "image_00.png"), np.float32) / 255
    assert np.abs(written - expected[0]).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize(
    "change, message",
    [
        (["--weight-type", "sharp"], "argument --weight-type: invalid choice: 'sharp' (choose from"),
        (["--combine", "mix"], "argument --combine: invalid choice: 'mix' (choose from"),
        (["--composition-weight", "2"], "--composition-weight needs --weight-type"),
        (["--weight-type", "composition", "--composition-weight", "2"], "composition_weight is used by"),
        (["--weight-type", "linear", "--scale", '{"mid": 1}'], "--weight-type takes --scale as a number"),
    ],
)
def test_generate_cli_bad_preset_input_is_one_error_line(tmp_path, capsys, change, message):
    argv = ["--base", str(tmp_path), "--adapter", "a.safetensors", "--image-encoder", str(tmp_path)]
    assert generate_cli.main(argv + ["--image", "missing.png"] + change) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    if "invalid choice" in message:  # the valid names are listed
        assert ("instantstyle-style-layout" if "weight-type" in message else "norm-average") in err[0]
