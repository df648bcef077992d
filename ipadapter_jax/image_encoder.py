"""The frozen CLIP image encoder of IP-Adapter, its preprocessing, and the image projection's inputs.

transformers 4.57 has no `FlaxCLIPVisionModelWithProjection`, so `CLIPImageEncoder` is transformers'
`FlaxCLIPVisionTransformer` (the module inside `FlaxCLIPVisionModel`) plus a bias-free Dense
`visual_projection`. Its param tree is the PyTorch `CLIPVisionModelWithProjection` state dict's, path for
path: `vision_model/...` exactly as `FlaxCLIPVisionModel.params` (layers named `layers/0/...`) and
`visual_projection/kernel` (see `conversion.clip` to load it).

Pixel layout: NHWC, (B, 224, 224, 3) float32 after CLIP normalisation (`preprocess` produces it). That is the
layout of transformers' bare Flax module; only its `FlaxCLIPVisionModel.__call__` wrapper takes NCHW.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ipadapter_jax import quiet
from ipadapter_jax.image_proj import Variant

quiet.install()

from transformers import CLIPVisionConfig  # noqa: E402  (after the log filter)
from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionTransformer  # noqa: E402

# OpenAI CLIP's preprocessing, as `CLIPImageProcessor()` and the IP-Adapter reference use it.
CLIP_IMAGE_SIZE = 224
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@flax.struct.dataclass
class CLIPImageFeatures:
    """What IP-Adapter projections read from the encoder.

    image_embeds: (B, projection_dim) projected pooled output (base variant).
    penultimate_hidden_states: (B, 1 + patches, hidden) = `hidden_states[-2]`, the input of the last encoder
      layer (Plus and Full variants; (B, 257, 1280) for ViT-H/14).
    """

    image_embeds: jax.Array
    penultimate_hidden_states: jax.Array


class CLIPImageEncoder(nn.Module):
    """CLIP vision transformer with its visual projection (PyTorch `CLIPVisionModelWithProjection`)."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.vision_model = FlaxCLIPVisionTransformer(self.config, dtype=self.dtype)
        self.visual_projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype)

    def __call__(self, pixel_values: jax.Array) -> CLIPImageFeatures:
        """pixel_values: (B, H, W, 3) NHWC, CLIP-normalised (H = W = config.image_size)."""
        size, channels = self.config.image_size, self.config.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (size, size, channels):
            raise ValueError(
                f"CLIPImageEncoder takes NHWC pixel values (B, {size}, {size}, {channels}); got shape "
                f"{tuple(pixel_values.shape)} (NCHW input must be transposed: x.transpose(0, 2, 3, 1))"
            )
        outputs = self.vision_model(pixel_values, output_hidden_states=True)
        return CLIPImageFeatures(
            image_embeds=self.visual_projection(outputs.pooler_output),
            penultimate_hidden_states=outputs.hidden_states[-2],
        )


def preprocess(
    images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray], size: int = CLIP_IMAGE_SIZE
) -> np.ndarray:
    """CLIP preprocessing, as transformers' `CLIPImageProcessor` with OpenAI's settings does it.

    Each image: converted to RGB (PIL `convert`: grayscale replicated, alpha dropped, palette expanded),
    shortest side resized to `size` (bicubic, PIL, on uint8; longer side truncated as transformers does), center
    crop `size` x `size` (offset `(side - size) // 2`), scaled to [0, 1], normalised with the OpenAI mean/std.
    Training data (`training.preprocess`) goes through this same function.

    Args:
      images: one or a sequence of PIL images or uint8 arrays (H, W) / (H, W, C) of any size.
      size: the encoder's input side (224 for every released IP-Adapter encoder).
    Returns:
      (B, size, size, 3) float32, NHWC.
    """
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    return np.stack([_preprocess_one(image, size) for image in images])


def _preprocess_one(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    resized = (size, new_long) if width <= height else (new_long, size)
    pixels = np.asarray(image.resize(resized, Image.Resampling.BICUBIC))
    top = (pixels.shape[0] - size) // 2
    left = (pixels.shape[1] - size) // 2
    pixels = pixels[top : top + size, left : left + size].astype(np.float32) / 255.0
    return (pixels - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD)


def image_proj_inputs(
    encoder: CLIPImageEncoder, params: dict, pixel_values: jax.Array, variant: Variant
) -> tuple[jax.Array, jax.Array]:
    """The image projection's conditional and unconditional (classifier-free guidance) inputs.

    base: (image_embeds, zeros_like(image_embeds)), each (B, projection_dim).
    plus/full: (hidden_states[-2] of pixel_values, hidden_states[-2] of zeros_like(pixel_values)), each
      (B, 257, hidden): the zero image after CLIP normalisation, as the reference and diffusers do.
    Pure and traceable (`variant` static under `jax.jit`).

    Args:
      pixel_values: (B, 224, 224, 3) NHWC, CLIP-normalised (`preprocess`).
    """
    if variant == "base":
        embeds = encoder.apply({"params": params}, pixel_values).image_embeds
        return embeds, jnp.zeros_like(embeds)
    if variant not in ("plus", "full"):
        raise ValueError(f"unknown image projection variant {variant!r}; expected 'base', 'plus' or 'full'")
    # The zero image is the same for every example: encode it once, in the same batch, and broadcast.
    both = jnp.concatenate([pixel_values, jnp.zeros_like(pixel_values[:1])])
    hidden = encoder.apply({"params": params}, both).penultimate_hidden_states
    return hidden[:-1], jnp.broadcast_to(hidden[-1:], hidden[:-1].shape)
