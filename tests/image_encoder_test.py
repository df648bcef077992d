"""CLIP image encoder, its loader and preprocessing, checked against transformers' and diffusers' PyTorch code."""

import logging
import re
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.image_utils import PILImageResampling

from ipadapter_jax.models.clip_preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess
from ipadapter_jax.models.image_encoder import image_proj_inputs
from ipadapter_jax.weights.clip_image_encoder import clip_state_to_flax, load_clip_image_encoder, read_weights
from ipadapter_jax.weights.torch_layout import ConversionError

pytestmark = pytest.mark.parity


def tiny_clip(hidden_act: str = "quick_gelu") -> CLIPVisionModelWithProjection:
    """A random 3-layer CLIP ViT/14 at 224 px (257 tokens), every LayerNorm perturbed away from (1, 0)."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
        projection_dim=24,
        hidden_act=hidden_act,
    )
    model = CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


def clip_processor() -> CLIPImageProcessor:
    """transformers' (slow, PIL) processor with OpenAI CLIP's settings, spelled out."""
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": 224},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
    """(folder written by `save_pretrained`, the PyTorch model)."""
    model = tiny_clip()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    return folder, model


def assert_close(ours, theirs, rtol=1e-4):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    err = np.max(np.abs(ours - theirs))
    assert err <= rtol * np.max(np.abs(theirs)), f"max abs diff {err} vs max |output| {np.max(np.abs(theirs))}"


def encode(module, params, pixel_values_nhwc):
    return jax.jit(module.apply)({"params": params}, pixel_values_nhwc)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])  # OpenAI ViT-L / ViT-H, bigG
def test_encoder_matches_pytorch(hidden_act, tmp_path):
    model = tiny_clip(hidden_act)
    model.save_pretrained(tmp_path)
    module, params = load_clip_image_encoder(tmp_path)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(pixels), output_hidden_states=True)
    ours = encode(module, params, pixels.transpose(0, 2, 3, 1))
    assert ours.penultimate_hidden_states.shape == (2, 257, 32)
    assert_close(ours.image_embeds, theirs.image_embeds)
    assert_close(ours.penultimate_hidden_states, theirs.hidden_states[-2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loads_half_precision_shards_as_float32(dtype, tmp_path):
    model = tiny_clip().to(dtype)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / "model.safetensors.index.json").exists()
    _, params = load_clip_image_encoder(tmp_path)
    state = model.state_dict()
    assert len(jax.tree.leaves(params)) == len(state)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    vision, layers = params["vision_model"], params["vision_model"]["encoder"]["layers"]
    pairs = [
        (layers["2"]["mlp"]["fc1"]["kernel"], state["vision_model.encoder.layers.2.mlp.fc1.weight"].T),
        (layers["0"]["layer_norm2"]["scale"], state["vision_model.encoder.layers.0.layer_norm2.weight"]),
        (vision["embeddings"]["class_embedding"], state["vision_model.embeddings.class_embedding"]),
        (params["visual_projection"]["kernel"], state["visual_projection.weight"].T),
        # Conv: PyTorch (out, in, kh, kw) -> Flax (kh, kw, in, out).
        (
            vision["embeddings"]["patch_embedding"]["kernel"],
            state["vision_model.embeddings.patch_embedding.weight"].permute(2, 3, 1, 0),
        ),
    ]
    for ours, theirs in pairs:
        assert np.array_equal(ours, theirs.float().numpy())


def test_loading_compiles_and_runs_nothing(saved_clip, caplog):
    """Shapes come from `jax.eval_shape` of the init: a concrete (random) init would compile its ops."""
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        load_clip_image_encoder(saved_clip[0])
    assert not [record.getMessage() for record in caplog.records if "Compiling" in record.getMessage()]


def test_conversion_errors_name_key_and_shapes(saved_clip):
    folder, _ = saved_clip
    module, _ = load_clip_image_encoder(folder)
    good = read_weights(folder)

    state = {key: value for key, value in good.items() if key != "vision_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(ConversionError, match=r"missing \(1\): vision_model/encoder/layers_1/mlp/fc2/bias"):
        clip_state_to_flax(state, module, source="clip")

    state = dict(good, **{"visual_projection.weight": np.zeros((24, 33), np.float32)})
    message = (
        "'visual_projection.weight': expected Flax visual_projection/kernel (32, 24), found (33, 24) (PyTorch (24, 33))"
    )
    with pytest.raises(ConversionError, match=re.escape(message)):
        clip_state_to_flax(state, module, source="clip")

    # Older checkpoints store the position_ids buffer: ignored. Anything else unknown is an error.
    with_buffer = dict(good, **{"vision_model.embeddings.position_ids": np.arange(257)[None]})
    clip_state_to_flax(with_buffer, module, source="clip")
    with pytest.raises(ConversionError, match=r"clip does not fit the target model: unexpected \(1\): text_projection"):
        clip_state_to_flax(dict(good, text_projection=np.zeros((4, 4))), module, source="clip")


@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (1, 200, 200, 3), (224, 224, 3)])
def test_rejects_nchw_or_misshapen_pixels(saved_clip, shape):
    module, params = load_clip_image_encoder(saved_clip[0])
    with pytest.raises(ValueError, match=re.escape(f"NHWC pixel values (B, 224, 224, 3); got shape {shape}")):
        module.apply({"params": params}, np.zeros(shape, np.float32))


def _image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # A smooth gradient plus noise: resampling has both edges and flat areas to get right.
    y, x = np.mgrid[0:height, 0:width]
    base = (255 * (x + y) / max(width + height - 2, 1))[..., None] + rng.normal(0, 40, (height, width, 4))
    rgba = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


IMAGES = {
    "rgb-landscape": _image("RGB", 300, 200),
    "rgb-portrait": _image("RGB", 201, 333),
    "gray-L": _image("L", 256, 256),
    "rgba": _image("RGBA", 640, 480),
    "palette-P": _image("P", 250, 230),
    "gray-alpha-LA": _image("LA", 230, 260),
    "cmyk": _image("CMYK", 240, 240),
    "bilevel-1": _image("1", 227, 300),
    "tiny-10x10": _image("RGB", 10, 10),
    "large": _image("RGB", 1920, 1080),
    "numpy-uint8": np.asarray(_image("RGB", 320, 240)),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_preprocess_matches_clip_image_processor(name):
    image = IMAGES[name]
    theirs = clip_processor()(image, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    ours = preprocess(image)
    assert ours.shape == (1, 224, 224, 3) and ours.dtype == np.float32
    # The same PIL conversion and bicubic resize on uint8: equal up to float rounding, far below 1/255.
    assert np.max(np.abs(ours - theirs)) <= 1e-5


def test_preprocess_batch():
    images = [IMAGES["rgb-landscape"], IMAGES["gray-L"], IMAGES["tiny-10x10"]]
    assert np.array_equal(preprocess(images), np.concatenate([preprocess(image) for image in images]))


@pytest.mark.parametrize("kind", ["base", "plus", "full"])
def test_negative_embedding_rules_match_diffusers(kind, saved_clip):
    """Our (conditional, unconditional) projection inputs vs diffusers' `encode_image`, PIL images in."""
    folder, model = saved_clip
    module, params = load_clip_image_encoder(folder)
    images = [IMAGES["rgb-portrait"], IMAGES["rgba"]]
    pipe = SimpleNamespace(image_encoder=model, feature_extractor=clip_processor())
    with torch.no_grad():
        theirs = StableDiffusionPipeline.encode_image(pipe, images, "cpu", 1, output_hidden_states=kind != "base")
    ours = jax.jit(lambda p, x: image_proj_inputs(module, p, x, kind))(params, preprocess(images))
    assert_close(ours[0], theirs[0])
    if kind == "base":
        assert not np.any(np.asarray(ours[1])) and ours[1].shape == tuple(theirs[1].shape)
    else:
        assert_close(ours[1], theirs[1])


def test_unknown_variant(saved_clip):
    module, params = load_clip_image_encoder(saved_clip[0])
    with pytest.raises(ValueError, match="unknown image projection kind 'faceid'"):
        image_proj_inputs(module, params, np.zeros((1, 224, 224, 3), np.float32), "faceid")
