"""CLIP image preprocessing as transformers' (slow, PIL) `CLIPImageProcessor` does it, with the settings of a folder's
`preprocessor_config.json` or its defaults at the encoder's input size.

Steps (each as `CLIPImageProcessor.preprocess`): RGB conversion (PIL `convert`), resize (shortest side to
`size["shortest_edge"]`, the long side truncated, or to `size["height"] x size["width"]`; PIL, `resample`, on uint8),
center crop to `crop_size` (offset `(side - crop) // 2`, zero padding where the crop is larger), rescale
(float64 multiply by `rescale_factor`, then float32), normalise with `image_mean` / `image_std`. Output NHWC.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

CLIP_IMAGE_SIZE = 224
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipPreprocessing:
    """The settings of a `CLIPImageProcessor`. Sizes are (height, width); `shortest_edge` replaces `resize_to`."""

    crop_size: tuple[int, int]
    shortest_edge: int | None
    resize_to: tuple[int, int] | None = None
    do_resize: bool = True
    resample: int = int(Image.Resampling.BICUBIC)
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def default(cls, image_size: int = CLIP_IMAGE_SIZE) -> ClipPreprocessing:
        """`CLIPImageProcessor(size=image_size, crop_size=image_size)`: what diffusers' `load_ip_adapter` makes
        for a pipeline without a feature extractor (OpenAI's settings at the encoder's input size)."""
        return cls(crop_size=(image_size, image_size), shortest_edge=image_size)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, source: str) -> ClipPreprocessing:
        """From a `preprocessor_config.json`'s dict; missing keys take `CLIPImageProcessor`'s defaults (224 px).

        Raises:
          ValueError: a `size` or `crop_size` that `CLIPImageProcessor` does not take (naming `source`).
        """
        size = config.get("size", {"shortest_edge": CLIP_IMAGE_SIZE})
        size = {"shortest_edge": size} if isinstance(size, int) else dict(size)
        if config.get("use_square_size") and "shortest_edge" in size:
            size = {"height": size["shortest_edge"], "width": size["shortest_edge"]}
        crop = config.get("crop_size", {"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE})
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else dict(crop)
        if "shortest_edge" not in size and not {"height", "width"} <= set(size):
            raise ValueError(f"{source}: size={size!r}; expected {{'shortest_edge': n}} or {{'height': h, 'width': w}}")
        if not {"height", "width"} <= set(crop):
            raise ValueError(f"{source}: crop_size={crop!r}; expected {{'height': h, 'width': w}} or an int")
        sizes = ("crop_size", "shortest_edge", "resize_to")
        values = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config and f.name not in sizes}
        for key in ("image_mean", "image_std"):
            if key in values:
                value = values[key]
                values[key] = tuple(value) if isinstance(value, (list, tuple)) else (float(value),) * 3
        values["shortest_edge"] = size.get("shortest_edge")
        values["resize_to"] = None if "shortest_edge" in size else (size["height"], size["width"])
        return cls(crop_size=(crop["height"], crop["width"]), **values)

    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the image (no crop, shortest-side resize)."""
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize and self.resize_to is not None:
            return self.resize_to
        return None


def preprocess(
    images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
    settings: ClipPreprocessing | int = CLIP_IMAGE_SIZE,
) -> np.ndarray:
    """CLIP preprocessing of one or a sequence of images, exactly as `CLIPImageProcessor` with `settings`.

    Args:
      images: PIL images or uint8 arrays (H, W) / (H, W, C) of any size.
      settings: the processor's settings, or an int n for `ClipPreprocessing.default(n)`.
    Returns:
      (B, height, width, 3) float32, NHWC (the crop size).
    """
    if isinstance(settings, int):
        settings = ClipPreprocessing.default(settings)
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    return np.stack([_preprocess_one(image, settings) for image in images])


def _preprocess_one(image: Image.Image | np.ndarray, settings: ClipPreprocessing) -> np.ndarray:
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if settings.do_convert_rgb and image.mode != "RGB":
        image = image.convert("RGB")
    if settings.do_resize:
        image = image.resize(_resized(image.width, image.height, settings), Image.Resampling(settings.resample))
    pixels = np.asarray(image)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if settings.do_center_crop:
        pixels = _center_crop(pixels, *settings.crop_size)
    if settings.do_rescale:
        pixels = (pixels.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    pixels = pixels.astype(np.float32)
    if settings.do_normalize:
        pixels = (pixels - np.array(settings.image_mean, np.float32)) / np.array(settings.image_std, np.float32)
    return pixels


def _resized(width: int, height: int, settings: ClipPreprocessing) -> tuple[int, int]:
    """PIL's (width, height) of the resize: shortest side to `shortest_edge` (long side truncated) or `resize_to`."""
    if settings.shortest_edge is None:
        return settings.resize_to[1], settings.resize_to[0]
    short, long = min(width, height), max(width, height)
    new_long = int(settings.shortest_edge * long / short)
    return (settings.shortest_edge, new_long) if width <= height else (new_long, settings.shortest_edge)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' `center_crop` of an HWC array: the middle `height x width`, zero-padded where larger."""
    rows, cols = pixels.shape[:2]
    new_rows, new_cols = max(height, rows), max(width, cols)
    padded = np.zeros((new_rows, new_cols) + pixels.shape[2:], pixels.dtype)
    top_pad, left_pad = math.ceil((new_rows - rows) / 2), math.ceil((new_cols - cols) / 2)
    padded[top_pad : top_pad + rows, left_pad : left_pad + cols] = pixels
    top, left = (rows - height) // 2 + top_pad, (cols - width) // 2 + left_pad
    return padded[max(0, top) : top + height, max(0, left) : left + width]
