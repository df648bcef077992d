"""Image-prompt preprocessing from the folder: a non-224 tiny CLIP encoder saved with `save_pretrained` plus a
non-default `preprocessor_config.json`, against transformers' `CLIPImageProcessor` loaded from the same folder and
the PyTorch encoder. Measured: pixels bit-identical (tested within 1e-6), image embeddings 5.4e-7 relative (tested
within 1e-5); the folder's settings move the pixels by 1.2 from the 96-px defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from ipadapter_jax.models.clip_preprocessing import ClipPreprocessing, preprocess
from ipadapter_jax.pipelines.image_prompt import ImagePromptEncoder
from ipadapter_jax.testing import pipeline_fixtures as tu
from ipadapter_jax.weights import load_image_encoder, new_adapter, tiny_base
from ipadapter_jax.weights.load import load_base
from ipadapter_jax.weights.torch_layout import ConversionError

pytestmark = pytest.mark.parity

SIZE = 96  # the encoder's input side: not 224
# A processor unlike OpenAI's: bilinear, another mean/std and rescale factor, crop from a larger resize.
PROCESSOR = dict(
    size={"shortest_edge": 100},
    crop_size={"height": SIZE, "width": SIZE},
    resample=2,
    image_mean=[0.5, 0.4, 0.3],
    image_std=[0.2, 0.25, 0.3],
    rescale_factor=1 / 250,
)
IMAGES = [tu.test_image(0), tu.test_image(1, (50, 70), "L"), tu.test_image(2, (300, 40), "RGBA")]


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    """(folder, PyTorch encoder): a 96-px CLIP encoder with its preprocessor_config.json, as transformers saves them."""
    folder = tmp_path_factory.mktemp("clip96")
    config = CLIPVisionConfig(**dict(tiny_base.IMAGE, image_size=SIZE))  # the tiny base's encoder shapes at 96 px
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(folder)
    CLIPImageProcessor(**PROCESSOR).save_pretrained(folder)
    return folder, model


def test_folder_preprocessing_matches_clip_image_processor(encoder_folder):
    folder, torch_model = encoder_folder
    reference = CLIPImageProcessor.from_pretrained(folder)
    encoder = load_image_encoder(folder)
    expected = reference(IMAGES, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    pixels = preprocess(IMAGES, encoder.image_preprocessing)
    assert pixels.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_allclose(pixels, expected, atol=1e-6)
    assert np.abs(pixels - preprocess(IMAGES, SIZE)).max() > 0.1  # the folder's settings change the pixels

    # The image prompt's features: the folder's preprocessing and the encoder, as diffusers' pipeline encodes them.
    base = load_base("tiny", progress=False)
    adapter = new_adapter("base", base, encoder, num_tokens=2)
    features = ImagePromptEncoder(encoder, adapter).features(IMAGES)
    with torch.no_grad():
        embeds = torch_model(torch.from_numpy(expected.transpose(0, 3, 1, 2).copy())).image_embeds.numpy()
    assert np.abs(np.asarray(features) - embeds).max() <= 1e-5 * np.abs(embeds).max()
    assert ImagePromptEncoder(encoder, adapter).negative_features(3).shape == features.shape


def test_default_preprocessing_is_clip_image_processor_at_the_encoder_size(encoder_folder, tmp_path):
    """Without a preprocessor config: `CLIPImageProcessor(size=S, crop_size=S)`, what diffusers' load_ip_adapter
    makes for a pipeline without a feature extractor."""
    folder, _ = encoder_folder
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    encoder = load_image_encoder(tmp_path)
    assert encoder.image_preprocessing == ClipPreprocessing.default(SIZE)
    expected = CLIPImageProcessor(size=SIZE, crop_size=SIZE)(IMAGES, return_tensors="np").pixel_values
    np.testing.assert_allclose(
        preprocess(IMAGES, encoder.image_preprocessing), expected.transpose(0, 2, 3, 1), atol=1e-6
    )


def test_a_config_for_another_size_is_one_clear_error(encoder_folder, tmp_path):
    folder, _ = encoder_folder
    config = tmp_path / "preprocessor_config.json"
    config.write_text(json.dumps({"crop_size": 224, "size": 224}))
    with pytest.raises(ConversionError, match=r"preprocessor_config.json: crop_size/size make \(224, 224\) images; "):
        load_image_encoder(folder, preprocessor_config=config)
