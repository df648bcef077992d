"""Preprocessing against references: transformers' CLIPImageProcessor, a torch re-statement of torchvision's
Resize/CenterCrop tensor path, hand-derived crop geometry, the CLIP tokenizer, and the drop statistics."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import ipadapter_jax  # noqa: F401  (log filter before transformers)

# isort: split
from transformers import CLIPImageProcessor  # noqa: E402

from ipadapter_jax.data import preprocess, rgb
from ipadapter_jax.models.clip_preprocessing import OPENAI_CLIP_STD
from ipadapter_jax.testing import data_files

pytestmark = pytest.mark.parity

PIXEL = 1 / 255


def _images() -> list[Image.Image]:
    """Smooth images of varied sizes (odd, portrait, landscape, smaller than the outputs) and modes."""
    rng = np.random.default_rng(0)
    sizes = [(480, 640), (333, 500), (700, 331), (61, 100), (224, 224), (97, 151), (1023, 517), (40, 41)]
    images = [Image.fromarray(data_files.smooth_rgb(rng, h, w)) for h, w in sizes]
    base = images[1]
    images += [base.convert("L"), base.convert("RGBA"), base.convert("P"), base.convert("CMYK")]
    return images


def test_clip_pixel_values_match_transformers_clip_image_processor():
    """The training path (stored bytes -> decode -> to_rgb -> the pipelines' CLIP preprocessing) vs transformers."""
    processor = CLIPImageProcessor()  # OpenAI defaults: 224, bicubic, center crop, OpenAI mean/std
    pre = preprocess.Preprocessor([], resolution=32)
    worst = 0.0
    for image in _images():
        stored = io.BytesIO()
        image.save(stored, format="TIFF")  # lossless for every mode here, CMYK included
        reference = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = pre({"image": stored.getvalue(), "text": ""})["clip_pixel_values"]
        assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
        # Compare in pixel units ([0, 1]): the normalised difference times the std.
        worst = max(worst, float(np.max(np.abs(ours - reference) * np.float32(OPENAI_CLIP_STD))))
    assert worst <= PIXEL, worst


def _torchvision_style_target(image: Image.Image, resolution: int) -> np.ndarray:
    """torchvision's tensor path restated with torch ops: Resize(r, BILINEAR, antialias=True) on a uint8 tensor
    (interpolate + round), CenterCrop(r) (offset round((size - r) / 2)), ToTensor, Normalize([.5], [.5])."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].double()
    w, h = image.size
    new_h, new_w = (int(resolution * h / w), resolution) if w <= h else (resolution, int(resolution * w / h))
    y = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    y = y.round().clamp(0, 255)[0]
    top, left = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))
    y = y[:, top : top + resolution, left : left + resolution] / 255.0
    return ((y - 0.5) / 0.5).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("resolution", [64, 512])
def test_target_image_matches_torchvision_style_reference(resolution):
    worst = 0.0
    for image in _images():
        ours, _ = preprocess.target_image(rgb.to_rgb(image), resolution)
        assert ours.shape == (resolution, resolution, 3) and ours.dtype == np.float32
        assert ours.min() >= -1 and ours.max() <= 1
        reference = _torchvision_style_target(rgb.to_rgb(image), resolution)
        worst = max(worst, float(np.max(np.abs(ours - reference))) / 2)  # [-1, 1] -> pixel units
    assert worst <= PIXEL + 1e-6, worst  # 1e-6: float32 outputs


def test_target_geometry_hand_derived():
    # 100x61 (w x h) at 64: short side 61 -> 64, long side int(64 * 100 / 61) = 104, left = round(40 / 2) = 20.
    image = Image.new("RGB", (100, 61), (255, 0, 51))
    pixels, crop = preprocess.target_image(image, 64)
    assert crop.tolist() == [0, 20]
    # A constant image stays constant: 255 -> 1, 0 -> -1, 51 -> 51 / 127.5 - 1 = -0.6.
    np.testing.assert_allclose(pixels[0, 0], [1.0, -1.0, -0.6], atol=1e-6)
    np.testing.assert_allclose(pixels, np.broadcast_to(pixels[0, 0], pixels.shape), atol=1e-6)
    # Odd margins: torchvision rounds half to even (round(1.5) = 2), CLIPImageProcessor floors (3 // 2 = 1).
    _, crop = preprocess.target_image(Image.new("RGB", (67, 64)), 64)  # 64 x 67: margin 3 -> left 2
    assert crop.tolist() == [0, 2]
    _, crop = preprocess.target_image(Image.new("RGB", (64, 69)), 64)  # margin 5 -> round(2.5) = 2
    assert crop.tolist() == [2, 0]


def test_to_rgb_modes():
    gray16 = Image.fromarray(np.arange(12, dtype=np.uint16).reshape(3, 4) * 257 * 20)
    assert gray16.mode == "I;16"
    converted = np.asarray(rgb.to_rgb(gray16))
    np.testing.assert_array_equal(converted[..., 0], np.arange(12).reshape(3, 4) * 20)  # 65535 -> 255, not clipped
    np.testing.assert_array_equal(converted[..., 0], converted[..., 2])
    rgba = Image.fromarray(np.dstack([np.full((2, 2, 3), 7, np.uint8), np.zeros((2, 2, 1), np.uint8)]))
    np.testing.assert_array_equal(np.asarray(rgb.to_rgb(rgba)), 7)  # alpha dropped as in the reference
    with pytest.raises(ValueError):
        rgb.to_rgb(Image.fromarray(np.zeros((2, 2), np.float32)))


def test_tokenize_pads_and_truncates_to_77(tmp_path):
    tokenizer = data_files.tiny_clip_tokenizer(str(tmp_path))
    vocab = tokenizer.get_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    ids = preprocess.tokenize(tokenizer, "A photo")
    assert ids.dtype == np.int32 and ids.shape == (77,)
    assert ids[:4].tolist() == [bos, vocab["a</w>"], vocab["photo</w>"], eos]
    assert (ids[4:] == eos).all()  # CLIP pads with the end token
    long = preprocess.tokenize(tokenizer, " ".join(["dog"] * 100))
    assert long.shape == (77,) and long[0] == bos and long[-1] == eos and (long[1:-1] == vocab["dog</w>"]).all()
    null = preprocess.Preprocessor([tokenizer, tokenizer], resolution=32).null_example()
    assert null["input_ids"][:2].tolist() == [bos, eos] and null["input_ids_2"].shape == (77,)
    assert not null["pixel_values"].any() and null["clip_pixel_values"].shape == (224, 224, 3)


def test_condition_drop_rates_and_reproducibility():
    draws = np.array([preprocess.condition_drop(7, i, 0) for i in range(20000)])
    image_only = np.mean(draws[:, 0] & ~draws[:, 1])
    text_only = np.mean(~draws[:, 0] & draws[:, 1])
    both = np.mean(draws[:, 0] & draws[:, 1])
    sigma = np.sqrt(0.05 * 0.95 / 20000)  # binomial standard error of a 5% rate
    for rate in (image_only, text_only, both):
        assert abs(rate - 0.05) < 4 * sigma, (image_only, text_only, both)
    # A pure function of (seed, index, epoch): same inputs, same draw; another epoch, another draw.
    again = np.array([preprocess.condition_drop(7, i, 0) for i in range(20000)])
    np.testing.assert_array_equal(draws, again)
    other_epoch = np.array([preprocess.condition_drop(7, i, 1) for i in range(20000)])
    assert (draws != other_epoch).any(axis=1).mean() > 0.2
    # The bands, hand-derived from the draw r itself.
    for i in range(200):
        r = np.random.default_rng((7, i, 0)).random()
        expected = (r < 0.05 or 0.10 <= r < 0.15, 0.05 <= r < 0.15)
        assert preprocess.condition_drop(7, i, 0) == expected
    assert preprocess.condition_drop(7, 3, 0, rates=(0.0, 0.0, 0.0)) == (False, False)


def test_target_crops_hand_derived():
    # 41 x 24 (w x h) at 16: short side 24 -> 16, long side int(16 * 41 / 24) = 27; margins (0, 11).
    image = Image.fromarray(data_files.smooth_rgb(np.random.default_rng(1), 24, 41))
    resized = np.asarray(image.resize((27, 16), Image.BILINEAR)).astype(np.float32) / 127.5 - 1.0
    expected = {"center": 6, "center_floor": 5}  # torchvision: round(5.5) = 6; tutorial_train_sdxl.py: 11 // 2 = 5
    for crop, left in expected.items():
        pixels, top_left = preprocess.target_image(image, 16, crop)
        assert top_left.tolist() == [0, left]
        np.testing.assert_array_equal(pixels, resized[:, left : left + 16])
    lefts = set()
    for epoch in range(20):
        pixels, top_left = preprocess.target_image(image, 16, "random", (0, 3, epoch))
        top, left = top_left.tolist()
        assert top == 0 and 0 <= left <= 11
        np.testing.assert_array_equal(pixels, resized[:, left : left + 16])
        again, same = preprocess.target_image(image, 16, "random", (0, 3, epoch))  # one draw per (seed, index, epoch)
        assert same.tolist() == [top, left] and np.array_equal(again, pixels)
        lefts.add(left)
    assert len(lefts) >= 5, lefts  # 20 uniform draws of 12 offsets
    with pytest.raises(ValueError, match="needs the example's"):
        preprocess.target_image(image, 16, "random")
    with pytest.raises(ValueError, match="crop must be one of"):
        preprocess.target_image(image, 16, "centre")
