"""A procedural image-text dataset: one coloured shape, of a size and at a place, on a coloured, plain, striped or
checked background.

Written in the reference training data format (a JSON list of {"image_file", "text"} plus an image folder),
so it goes through the same `data build` path as real data. Used by the demo and the training tests, and (as
arrays, `sample`) to train the tiny base model (`training.tiny_base_train`); deterministic in `seed`.

Captions name every attribute, e.g. "a small red circle at the left on a striped blue background": 4 shapes x 7
colours x 6 other background colours x 3 textures x 3 places x 2 sizes = 3024 captions. Layout (place, size) and
form (shape, texture) are named as well as colour, so an image encoder trained on them cannot get by on colour
alone. Every pattern is on the scale of an 8x down-sampling VAE's latent cells (8 px at 64 px): the tiny base's
latents can hold it. The exact position and size within the named ones, and the shape's colour shade, vary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

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
SHAPES = ("circle", "square", "triangle", "cross")
TEXTURES = ("plain", "striped", "checked")
PLACES = {"left": 0.3, "middle": 0.5, "right": 0.7}  # the shape's centre, as a fraction of the width
SIZES = {"small": (0.13, 0.17), "large": (0.22, 0.27)}  # the shape's half-width range, as a fraction of the size
ATTRIBUTES = ("colour", "shape", "background", "texture", "place", "size")
# Every word of every caption (the tiny base's tokenizer makes each one token).
WORDS = ("a", "at", "in", "the", "on", "background", *SIZES, *COLOURS, *SHAPES, *TEXTURES[1:], *PLACES)

_CAPTION = re.compile(
    rf"a (?P<size>{'|'.join(SIZES)}) (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)}) "
    rf"(?:at the|in the) (?P<place>{'|'.join(PLACES)}) on a (?:(?P<texture>{'|'.join(TEXTURES[1:])}) )?"
    rf"(?P<background>{'|'.join(COLOURS)}) background"
)


@dataclasses.dataclass(frozen=True)
class Scene:
    """What an image shows: every attribute its caption names."""

    shape: str
    colour: str
    background: str
    texture: str = "plain"
    place: str = "middle"
    size: str = "large"

    @property
    def caption(self) -> str:
        texture = "" if self.texture == "plain" else f"{self.texture} "
        where = f"{'in' if self.place == 'middle' else 'at'} the {self.place}"
        return f"a {self.size} {self.colour} {self.shape} {where} on a {texture}{self.background} background"

    @classmethod
    def parse(cls, caption: str) -> Scene:
        """The scene of a caption `Scene.caption` wrote.

        Raises:
          ValueError: the caption is not of that form.
        """
        match = _CAPTION.fullmatch(caption)
        if match is None:
            raise ValueError(f"not a caption of the procedural world: {caption!r}")
        return cls(**{k: v or "plain" for k, v in match.groupdict().items()})


def _pattern_colour(rgb: tuple[int, ...]) -> tuple[int, ...]:
    """A darker shade of a light colour, a lighter one of a dark colour: a pattern visible on every background."""
    return tuple(int(c * 0.6) for c in rgb) if sum(rgb) > 150 else tuple(int(c + 0.4 * (255 - c)) for c in rgb)


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """The `size` x `size` RGB image of `scene`; `rng` draws what the caption leaves open (exact place and size)."""
    base = COLOURS[scene.background]
    image = Image.new("RGB", (size, size), base)
    canvas = ImageDraw.Draw(image)
    pattern = _pattern_colour(base)
    period, width = max(2, size // 4), max(1, size // 8)  # a quarter of the image: two latent cells
    if scene.texture == "striped":  # vertical stripes
        for x in range(0, size, period):
            canvas.rectangle([x, 0, x + width - 1, size], fill=pattern)
    elif scene.texture == "checked":  # a checkerboard of latent-cell-sized squares
        for y in range(0, size, width):
            for x in range((y // width) % 2 * width, size, 2 * width):
                canvas.rectangle([x, y, x + width - 1, y + width - 1], fill=pattern)
    radius = size * rng.uniform(*SIZES[scene.size])
    cx = size * (PLACES[scene.place] + rng.uniform(-0.04, 0.04))
    cy = size * rng.uniform(0.4, 0.6)
    colour = COLOURS[scene.colour]
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if scene.shape == "circle":
        canvas.ellipse(box, fill=colour)
    elif scene.shape == "square":
        canvas.rectangle(box, fill=colour)
    elif scene.shape == "triangle":
        canvas.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    else:  # a cross: two bars, each 2/3 of the width thick
        arm = radius / 3
        canvas.rectangle([cx - radius, cy - arm, cx + radius, cy + arm], fill=colour)
        canvas.rectangle([cx - arm, cy - radius, cx + arm, cy + radius], fill=colour)
    return image


def random_scene(rng: np.random.Generator) -> Scene:
    """Every attribute drawn uniformly; the shape's and the background's colours differ."""
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), 2, replace=False)
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=names[fg],
        background=names[bg],
        texture=TEXTURES[rng.integers(len(TEXTURES))],
        place=list(PLACES)[rng.integers(len(PLACES))],
        size=list(SIZES)[rng.integers(len(SIZES))],
    )


def draw(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """One random `size` x `size` RGB image and its caption."""
    scene = random_scene(rng)
    return render(scene, size, rng), scene.caption


def sample(num_images: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """-> images (num_images, size, size, 3) uint8 and their captions; the same as `write_dataset` writes."""
    rng = np.random.default_rng(seed)
    drawn = [draw(rng, size) for _ in range(num_images)]
    return np.stack([np.asarray(image) for image, _ in drawn]), [text for _, text in drawn]


def sample_groups(num_groups: int, group_size: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Images in groups of near neighbours: a random scene, then `group_size - 1` scenes that each change another
    attribute of it (`edit`; the attributes drawn at random). Contrastive training on whole groups meets
    negatives that differ in one attribute only, so it must learn every attribute, not the easiest ones.

    Returns:
      images (num_groups * group_size, size, size, 3) uint8, group g at rows [g * group_size, (g + 1) * group_size),
      and their captions.
    """
    if not 1 <= group_size <= len(ATTRIBUTES) + 1:
        raise ValueError(f"group_size must be in [1, {len(ATTRIBUTES) + 1}], got {group_size}")
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(num_groups):
        scene = random_scene(rng)
        edits = rng.choice(len(ATTRIBUTES), group_size - 1, replace=False)
        for member in [scene, *(edit(scene, ATTRIBUTES[a]) for a in edits)]:
            images.append(np.asarray(render(member, size, rng)))
            captions.append(member.caption)
    return np.stack(images), captions


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


def edit(scene: Scene, attribute: str) -> Scene:
    """`scene` with one attribute (of `ATTRIBUTES`) changed to the next value of its list; a colour skips the other
    colour of the scene (the shape and its background always differ).

    Raises:
      ValueError: an unknown attribute.
    """
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    values = {
        "colour": list(COLOURS), "background": list(COLOURS), "shape": list(SHAPES), "texture": list(TEXTURES),
        "place": list(PLACES), "size": list(SIZES),
    }[attribute]  # fmt: skip
    taken = {scene.colour, scene.background} if attribute in ("colour", "background") else set()
    start = values.index(getattr(scene, attribute))
    new = next(value for k in range(1, len(values)) if (value := values[(start + k) % len(values)]) not in taken)
    return dataclasses.replace(scene, **{attribute: new})


def edit_caption(caption: str, attribute: str) -> str:
    """`caption` (as `draw` writes it) with one attribute changed (`edit`).

    Raises:
      ValueError: the caption is not of `draw`'s form, or an unknown attribute.
    """
    return edit(Scene.parse(caption), attribute).caption
