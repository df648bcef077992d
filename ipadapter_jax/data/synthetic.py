"""A procedural image-text dataset: coloured shapes on coloured, optionally striped backgrounds.

Written in the reference training data format (a JSON list of {"image_file", "text"} plus an image folder),
so it goes through the same `data build` path as real data. Used by the demo and the training tests, and (as
arrays, `sample`) to train the tiny base model (`training.tiny_base_train`); deterministic in `seed`.

Captions name every attribute: "a red circle on a striped blue background" (3 shapes x 7 colours x 6 other
background colours x plain/striped = 252 captions); position and size vary continuously and are not named.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


def draw(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """One random `size` x `size` RGB image and its caption."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), 2, replace=False)
    striped = bool(rng.integers(2))
    image = Image.new("RGB", (size, size), COLOURS[names[bg]])
    canvas = ImageDraw.Draw(image)
    if striped:
        # Vertical stripes with a period of a quarter of the image: two latent cells of an 8x down-sampling VAE,
        # so the tiny base's latents can hold them.
        base = COLOURS[names[bg]]
        # Darker stripes on light colours, lighter ones on dark colours: visible on every background.
        stripe = tuple(int(c * 0.6) for c in base) if sum(base) > 150 else tuple(int(c + 0.4 * (255 - c)) for c in base)
        for x in range(0, size, max(2, size // 4)):
            canvas.rectangle([x, 0, x + max(1, size // 8) - 1, size], fill=stripe)
    radius = size * rng.uniform(0.2, 0.35)
    cx, cy = size * rng.uniform(0.35, 0.65, 2)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    colour = COLOURS[names[fg]]
    if shape == "circle":
        canvas.ellipse(box, fill=colour)
    elif shape == "square":
        canvas.rectangle(box, fill=colour)
    else:
        canvas.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    texture = "striped " if striped else ""
    return image, f"a {names[fg]} {shape} on a {texture}{names[bg]} background"


def sample(num_images: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """-> images (num_images, size, size, 3) uint8 and their captions; the same as `write_dataset` writes."""
    rng = np.random.default_rng(seed)
    drawn = [draw(rng, size) for _ in range(num_images)]
    return np.stack([np.asarray(image) for image, _ in drawn]), [text for _, text in drawn]


def write_dataset(root: str, num_images: int, size: int = 64, seed: int = 0) -> str:
    """Writes `num_images` PNGs to `root/images` and the captions to `root/captions.json`; returns its path."""
    images, captions = sample(num_images, size, seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    entries = []
    for i, (pixels, text) in enumerate(zip(images, captions)):
        name = f"{i:05d}.png"
        Image.fromarray(pixels).save(os.path.join(root, "images", name))
        entries.append({"image_file": name, "text": text})
    path = os.path.join(root, "captions.json")
    with open(path, "w") as f:
        json.dump(entries, f, indent=0)
    return path


def edit_caption(caption: str, attribute: str) -> str:
    """`caption` (as `draw` writes it) with one attribute changed: "colour" (the shape's colour -> the next colour
    of `COLOURS` that is neither it nor the background's) or "shape" (-> the next of `SHAPES`).

    Raises:
      ValueError: the caption is not of `draw`'s form, or an unknown attribute.
    """
    words = caption.split()
    if len(words) < 6 or words[1] not in COLOURS or words[2] not in SHAPES or words[-2] not in COLOURS:
        raise ValueError(f"not a caption of the procedural world: {caption!r}")
    names = list(COLOURS)
    if attribute == "colour":
        start = names.index(words[1])
        words[1] = next(
            name for k in range(1, len(names)) if (name := names[(start + k) % len(names)]) not in (words[1], words[-2])
        )
    elif attribute == "shape":
        words[2] = SHAPES[(SHAPES.index(words[2]) + 1) % len(SHAPES)]
    else:
        raise ValueError(f"attribute must be 'colour' or 'shape', got {attribute!r}")
    return " ".join(words)
