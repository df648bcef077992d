"""Per-example preprocessing of the IP-Adapter reference recipe (REFERENCE.md s.3), on the host in numpy.

- Target image: resize the shortest side to `resolution` (PIL bilinear), crop a square, scale to [-1, 1]. The
  crop (`TARGET_CROPS`): "center" is what torchvision's `Resize(r, BILINEAR)`, `CenterCrop(r)`, `ToTensor()`,
  `Normalize([.5], [.5])` do to a PIL image (tutorial_train.py), offset `round((size - r) / 2)`; "center_floor" is
  tutorial_train_sdxl.py's default, offset `(size - r) // 2`; "random" is that script's random crop, offsets
  uniform in [0, size - r], drawn per (seed, example index, epoch). SDXL's micro-conditions come along:
  original (height, width), crop (top, left) and target (height, width), which the step concatenates into
  SDXL's time ids in that order (tutorial_train_sdxl.py's `add_time_ids`).
- CLIP image: `ipadapter_jax.models.clip_preprocessing.preprocess`, the pipelines' own: what transformers'
  `CLIPImageProcessor` does with the image encoder's settings (`ImageEncoder.image_preprocessing`; by default
  OpenAI's: shortest side to the encoder's 224, PIL bicubic, center crop, /255, OpenAI mean/std).
- Text: any Hugging Face tokenizer, padded/truncated to 77 ids.
- Condition drop: one uniform draw per (seed, example index, epoch).

Images are HWC (NHWC once batched): the layout of decoded images and the fast one for XLA convolutions.
diffusers' Flax VAE wrapper takes NCHW, so an encoder function transposes at its own input.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ipadapter_jax.choices import TARGET_CROPS
from ipadapter_jax.data.face_embeds import KEY as FACE_EMBEDS
from ipadapter_jax.data.face_embeds import example_face_embeds
from ipadapter_jax.data.rgb import to_rgb
from ipadapter_jax.models.clip_preprocessing import ClipPreprocessing
from ipadapter_jax.models.clip_preprocessing import preprocess as clip_preprocess

# Drop rates of the reference (image only, text only, both): r < .05, .05 <= r < .10, .10 <= r < .15.
DROP_RATES = (0.05, 0.05, 0.05)

# Where an example's draws come from: (seed, record index, epoch), the same for any process or worker count.
Draw = tuple[int, int, int]
# Second word of the random-crop generator's seed, so that its stream is not the condition drop's.
_CROP_STREAM = 1


def decode_rgb(data: bytes) -> Image.Image:
    """Decodes PNG/JPEG/... bytes fully into an 8-bit RGB PIL image (raises on corrupt or truncated data)."""
    image = Image.open(io.BytesIO(data))  # in-memory: nothing to close
    image.load()
    return to_rgb(image)


def _resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after scaling the shortest side to `short_side`; the long side is truncated, as both
    torchvision's `Resize(int)` and transformers' `shortest_edge` resize do."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def crop_offsets(margins: tuple[int, int], crop: str, draw: Draw | None = None) -> tuple[int, int]:
    """(top, left) of the square crop, given the resized image's (height - r, width - r) margins.

    "center": `round(margin / 2)` (torchvision: half to even); "center_floor": `margin // 2`; "random": each
    uniform in [0, margin], from a generator seeded by `draw` = (seed, index, epoch) (required).
    """
    if crop == "center":
        return tuple(int(round(m / 2.0)) for m in margins)
    if crop == "center_floor":
        return tuple(m // 2 for m in margins)
    if crop == "random":
        if draw is None:
            raise ValueError("crop='random' needs the example's (seed, index, epoch) draw")
        rng = np.random.default_rng((*draw, _CROP_STREAM))
        return tuple(int(rng.integers(0, m + 1)) for m in margins)
    raise ValueError(f"crop must be one of {TARGET_CROPS}, got {crop!r}")


def target_image(
    image: Image.Image, resolution: int, crop: str = "center", draw: Draw | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The diffusion target: bilinear shortest-side resize, a square crop (`crop_offsets`), [-1, 1].

    Args:
      image: 8-bit RGB PIL image.
      resolution: side of the square output.
      crop: one of `TARGET_CROPS`; draw: (seed, index, epoch), for "random".
    Returns:
      pixels: float32 (resolution, resolution, 3) in [-1, 1].
      crop_top_left: int32 (2,), (top, left) of the crop in the resized image (SDXL's crop condition).
    """
    width, height = _resized_size(image.width, image.height, resolution)
    resized = image.resize((width, height), Image.BILINEAR)
    top, left = crop_offsets((height - resolution, width - resolution), crop, draw)
    crop = np.asarray(resized)[top : top + resolution, left : left + resolution]
    pixels = crop.astype(np.float32) / 127.5 - 1.0
    return pixels, np.array([top, left], np.int32)


def tokenize(tokenizer: Any, text: str, max_length: int = 77) -> np.ndarray:
    """int32 (max_length,) token ids of `text`, padded and truncated like the reference's text input."""
    ids = tokenizer(text, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    return np.asarray(ids, np.int32)


def condition_drop(
    seed: int, index: int, epoch: int, rates: tuple[float, float, float] = DROP_RATES
) -> tuple[bool, bool]:
    """(drop_image, drop_text) of one example in one epoch, from one uniform draw r.

    The draw depends only on (seed, index, epoch): identical for any process count, worker count or resume
    point. With `rates` = (image only, text only, both): r < rates[0] drops the image, the next rates[1]
    of the unit interval the text, the next rates[2] both.
    """
    r = np.random.default_rng((seed, index, epoch)).random()
    image_only_end = rates[0]
    text_only_end = image_only_end + rates[1]
    both_end = text_only_end + rates[2]
    drop_image = r < image_only_end or text_only_end <= r < both_end
    drop_text = image_only_end <= r < both_end
    return bool(drop_image), bool(drop_text)


def token_key(i: int) -> str:
    """Batch key of the i-th tokenizer's ids: "input_ids", "input_ids_2", ... (diffusers' naming)."""
    return "input_ids" if i == 0 else f"input_ids_{i + 1}"


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """Turns one stored record (TFDS features, image still encoded) into model inputs.

    Output of `__call__` (one example, numpy):
      pixel_values       float32 (resolution, resolution, 3) in [-1, 1]
      clip_pixel_values  float32 (clip_size, clip_size, 3), CLIP-normalised with `clip`'s settings
      input_ids[_2]      int32 (max_length,), one key per tokenizer (SDXL: two)
      original_size      int32 (2,) (height, width) of the stored image
      crop_top_left      int32 (2,) (top, left)
      target_size        int32 (2,) (resolution, resolution)
      face_embeds        float32 (D,), passed on as stored, when the record has an identity embedding
    `crop` (one of `TARGET_CROPS`) places the target's square; "random" draws it from `draw`, the loader's
    (seed, index, epoch) of the example. `face_embed_dim`: the width D of the identity embeddings a FaceID adapter's
    training reads (the null example then holds zeros (D,)); None for other adapters.
    """

    tokenizers: Sequence[Any]
    resolution: int = 512
    clip: ClipPreprocessing = ClipPreprocessing.default()
    max_length: int = 77
    crop: str = "center"
    face_embed_dim: int | None = None

    @property
    def clip_size(self) -> int:
        """The side of the CLIP images (the image encoder's input size)."""
        return self.clip.output_size()[0]

    def __call__(self, record: dict[str, Any], draw: Draw | None = None) -> dict[str, np.ndarray]:
        image = decode_rgb(record["image"])
        text = record["text"]
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        pixels, crop_top_left = target_image(image, self.resolution, self.crop, draw)
        example = {
            "pixel_values": pixels,
            "clip_pixel_values": clip_preprocess(image, self.clip)[0],
            "original_size": np.array([image.height, image.width], np.int32),
            "crop_top_left": crop_top_left,
            "target_size": np.array([self.resolution, self.resolution], np.int32),
        }
        for i, tokenizer in enumerate(self.tokenizers):
            example[token_key(i)] = tokenize(tokenizer, text, self.max_length)
        example.update(example_face_embeds(record))
        return example

    def null_example(self) -> dict[str, np.ndarray]:
        """What a dropped condition stands for: ids of the empty text "" and all-zero images (zeros after CLIP
        normalisation, as the reference feeds the Plus encoder for a dropped image); the SDXL sizes of an
        uncropped image at the target resolution; zero identity embeddings with `face_embed_dim`. Same keys and shapes
        as `__call__`."""
        size = np.array([self.resolution, self.resolution], np.int32)
        example = {
            "pixel_values": np.zeros((self.resolution, self.resolution, 3), np.float32),
            "clip_pixel_values": np.zeros((self.clip_size, self.clip_size, 3), np.float32),
            "original_size": size,
            "crop_top_left": np.zeros(2, np.int32),
            "target_size": size,
        }
        for i, tokenizer in enumerate(self.tokenizers):
            example[token_key(i)] = tokenize(tokenizer, "", self.max_length)
        if self.face_embed_dim is not None:
            example[FACE_EMBEDS] = np.zeros(self.face_embed_dim, np.float32)
        return example
