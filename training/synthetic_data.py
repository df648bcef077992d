"""A procedural image-text dataset: coloured shapes on coloured, optionally striped backgrounds.

Written in the reference training data format (a JSON list of {"image_file", "text"} plus an image folder),
so it goes through the same `data build` path as real data. Used by the demo and the training tests;
deterministic in `seed`.
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


def _draw(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    shape = SHAPES[rng.integers(len(SHAPES))]
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), 2, replace=False)
    striped = bool(rng.integers(2))
    image = Image.new("RGB", (size, size), COLOURS[names[bg]])
    draw = ImageDraw.Draw(image)
    if striped:
        stripe = tuple(int(c * 0.7) for c in COLOURS[names[bg]])
        for x in range(0, size, max(2, size // 8)):
            draw.rectangle([x, 0, x + max(1, size // 16), size], fill=stripe)
    radius = size * rng.uniform(0.2, 0.35)
    cx, cy = size * rng.uniform(0.35, 0.65, 2)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    colour = COLOURS[names[fg]]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    texture = "striped " if striped else ""
    return image, f"a {names[fg]} {shape} on a {texture}{names[bg]} background"


def write_dataset(root: str, num_images: int, size: int = 64, seed: int = 0) -> str:
    """Writes `num_images` PNGs to `root/images` and the captions to `root/captions.json`; returns its path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    entries = []
    for i in range(num_images):
        image, text = _draw(rng, size)
        name = f"{i:05d}.png"
        image.save(os.path.join(root, "images", name))
        entries.append({"image_file": name, "text": text})
    path = os.path.join(root, "captions.json")
    with open(path, "w") as f:
        json.dump(entries, f, indent=0)
    return path
