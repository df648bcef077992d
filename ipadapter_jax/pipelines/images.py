"""Pixels in and out of the pipelines: output arrays as PIL images, image grids, ControlNet conditioning images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ipadapter_jax.pipelines.image_prompt import ImageInput


def to_pil(pixels: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> B RGB PIL images (rounded to uint8, as diffusers does)."""
    return [Image.fromarray(image) for image in (np.asarray(pixels) * 255).round().astype(np.uint8)]


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tiles equally sized images row-major into one image, `cols` per row (default: ~square)."""
    if not images:
        raise ValueError("no images to tile")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    return grid


def control_pixels(image: ImageInput, height: int, width: int) -> np.ndarray:
    """ControlNet conditioning as diffusers' control image processor makes it: PIL resize to (width, height)
    (Lanczos), RGB, [0, 1] (not normalised). -> (3, H, W) float32."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.resize((width, height), resample=Image.Resampling.LANCZOS).convert("RGB")
    return np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
