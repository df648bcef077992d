"""Image prompt -> image tokens for decoupled cross-attention, with the negative tokens of classifier-free guidance.

Two stages, so that the expensive, adapter-independent one can be cached by the caller:

1. `ImagePromptEncoder.features(images)`: CLIP preprocessing and the frozen image encoder -> the projection's
   input per image, (K, *feature_shape): `image_embeds` (K, projection_dim) for the base adapter,
   `hidden_states[-2]` (K, 1 + patches, hidden) for Plus/Full. This is what diffusers calls image embeddings
   (`ip_adapter_image_embeds`); averaging or interpolating them is meaningful.
2. `ImagePromptEncoder.tokens(features)`: the adapter's projection; K images of one prompt give the
   concatenation of their tokens, (K * num_tokens, cross_attention_dim).

Negative features (the unconditional branch of guidance) default to the reference's: zeros for the base
adapter, the encoder's features of an all-zero (after CLIP normalisation) image for Plus/Full
(`negative_features`); a negative image replaces them by its own features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ipadapter_jax.image_encoder import CLIPImageEncoder, preprocess
from ipadapter_jax.image_proj import ImageProjModel, MLPProjModel, Resampler, Variant

ImageInput = Union[Image.Image, np.ndarray]


def projection_variant(image_proj: nn.Module) -> Variant:
    """The adapter variant of an image projection module: "base", "plus" or "full"."""
    for cls, variant in ((ImageProjModel, "base"), (Resampler, "plus"), (MLPProjModel, "full")):
        if isinstance(image_proj, cls):
            return variant
    raise TypeError(f"not an IP-Adapter image projection: {type(image_proj).__name__}")


def projection_token_dim(image_proj: nn.Module) -> int:
    """The width of the tokens the projection makes (must equal the UNet's cross_attention_dim)."""
    return image_proj.output_dim if isinstance(image_proj, Resampler) else image_proj.cross_attention_dim


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or a sequence of images -> a non-empty list."""
    listed = [images] if isinstance(images, (Image.Image, np.ndarray)) else list(images)
    if not listed:
        raise ValueError("an image prompt needs at least one image")
    return listed


class ImagePromptEncoder:
    """CLIP image encoder + the adapter's image projection; each stage compiled once per number of images."""

    def __init__(self, encoder: CLIPImageEncoder, encoder_params: Any, image_proj: nn.Module, image_proj_params: Any):
        self.encoder, self.encoder_params = encoder, encoder_params
        self.image_proj, self.image_proj_params = image_proj, image_proj_params
        self.variant = projection_variant(image_proj)
        self._features = jax.jit(self._encode_pixels)
        self._project = jax.jit(lambda params, features: image_proj.apply({"params": params}, features))
        self._zero_image_features: jax.Array | None = None

    def features(self, images: ImageInput | Sequence[ImageInput]) -> jax.Array:
        """K images (PIL or uint8 arrays, any size and mode) -> (K, *feature_shape) projection inputs."""
        return self._features(self.encoder_params, jnp.asarray(preprocess(as_image_list(images))))

    def negative_features(self, num_images: int) -> jax.Array:
        """The default unconditional features for `num_images` images, (num_images, *feature_shape)."""
        if self.variant == "base":
            return jnp.zeros((num_images, self.encoder.config.projection_dim), jnp.float32)
        if self._zero_image_features is None:  # the same for every request: encode the zero image once
            size = self.encoder.config.image_size
            zero_image = jnp.zeros((1, size, size, self.encoder.config.num_channels), jnp.float32)
            self._zero_image_features = self._features(self.encoder_params, zero_image)
        return jnp.broadcast_to(self._zero_image_features, (num_images,) + self._zero_image_features.shape[1:])

    def tokens(self, features: jax.Array) -> jax.Array:
        """(G, K, *feature_shape) features of G prompts of K images each -> (G, K * num_tokens, cross) tokens."""
        return self._project(self.image_proj_params, features)

    def _encode_pixels(self, params: Any, pixel_values: jax.Array) -> jax.Array:
        out = self.encoder.apply({"params": params}, pixel_values)
        return out.image_embeds if self.variant == "base" else out.penultimate_hidden_states
