"""The frozen CLIP image encoder of IP-Adapter, its preprocessing, and the image projection's inputs.

transformers 4.57 has no `FlaxCLIPVisionModelWithProjection`, so `CLIPImageEncoder` is transformers'
`FlaxCLIPVisionTransformer` (the module inside `FlaxCLIPVisionModel`) plus a bias-free Dense
`visual_projection`. Its param tree is the PyTorch `CLIPVisionModelWithProjection` state dict's, path for
path: `vision_model/...` exactly as `FlaxCLIPVisionModel.params` (layers named `layers/0/...`) and
`visual_projection/kernel` (see `ipadapter_jax.weights.clip_image_encoder` to load it).

Pixel layout: NHWC, (B, S, S, 3) float32 after CLIP normalisation, S = config.image_size (224 for every released
IP-Adapter encoder; `ipadapter_jax.models.clip_preprocessing.preprocess` produces it). That is the
layout of transformers' bare Flax module; only its `FlaxCLIPVisionModel.__call__` wrapper takes NCHW.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax import quiet
from ipadapter_jax.models.clip_preprocessing import ClipPreprocessing, preprocess
from ipadapter_jax.models.image_proj import AdapterKind

quiet.install()

from transformers import CLIPVisionConfig  # noqa: E402  (after the log filter)
from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionTransformer  # noqa: E402


@flax.struct.dataclass
class CLIPImageFeatures:
    """What IP-Adapter projections read from the encoder.

    image_embeds: (B, projection_dim) projected pooled output (base kind).
    penultimate_hidden_states: (B, 1 + patches, hidden) = `hidden_states[-2]`, the input of the last encoder
      layer (Plus and Full kinds; (B, 257, 1280) for ViT-H/14).
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


@dataclasses.dataclass(frozen=True)
class ImageEncoder:
    """A CLIP image encoder, its params (`ipadapter_jax.weights.load_image_encoder` loads one) and its image
    preprocessing (None: `CLIPImageProcessor`'s defaults at the encoder's `image_size`)."""

    module: CLIPImageEncoder
    params: Any
    preprocessing: ClipPreprocessing | None = None

    @property
    def config(self) -> CLIPVisionConfig:
        return self.module.config

    @property
    def image_preprocessing(self) -> ClipPreprocessing:
        """The preprocessing of this encoder's image prompts and training images."""
        return self.preprocessing or ClipPreprocessing.default(self.config.image_size)

    def features(self, images: Any, kind: AdapterKind) -> jax.Array:
        """Images (PIL or uint8 arrays, any size and mode) -> what an adapter of `kind` projects, (K, ...):
        CLIP preprocessing (`image_preprocessing`), the encoder, `projection_input`."""
        pixels = preprocess(images, self.image_preprocessing)
        return self._encode(self.params, jnp.asarray(pixels), kind)

    def null_features(self, kind: AdapterKind) -> jax.Array:
        """The unconditional projection input of one image, (1, ...) (`null_projection_input`)."""
        size, channels = self.config.image_size, self.config.num_channels
        zero_image = jnp.zeros((1, size, size, channels), jnp.float32)
        return null_projection_input(self._encode(self.params, zero_image, kind), kind)

    @functools.cached_property
    def _encode(self) -> Any:  # compiled once per encoder, kind and number of images
        def encode(params: Any, pixel_values: jax.Array, kind: AdapterKind) -> jax.Array:
            return projection_input(self.module.apply({"params": params}, pixel_values), kind)

        return jax.jit(encode, static_argnums=2)


def projection_input(features: CLIPImageFeatures, kind: AdapterKind) -> jax.Array:
    """Which encoder output an adapter of `kind` projects to tokens: `image_embeds` (B, projection_dim) for the base
    adapter, `hidden_states[-2]` (B, 1 + patches, hidden) for Plus and Full (the one place this rule is written)."""
    if kind == "base":
        return features.image_embeds
    if kind in ("faceid", "faceid-plus"):
        raise ValueError(
            f"unknown image projection kind {kind!r} for image features: FaceID adapters read identity embeddings; "
            "pass image_embeds from ipadapter_jax.pipelines.faceid.faceid_prompt (generate: --face-embeds)"
        )
    if kind not in ("plus", "full"):
        raise ValueError(f"unknown image projection kind {kind!r}; expected 'base', 'plus' or 'full'")
    return features.penultimate_hidden_states


def null_projection_input(zero_image_input: jax.Array, kind: AdapterKind) -> jax.Array:
    """The projection input of a dropped image or an unconditional (guidance) branch, as the reference makes it:
    zeros for the base adapter; for Plus/Full the encoder's output on the all-zero image (zeros after CLIP
    normalisation), which is `zero_image_input` (= `projection_input` of that image)."""
    return jnp.zeros_like(zero_image_input) if kind == "base" else zero_image_input


def image_proj_inputs(
    encoder: CLIPImageEncoder, params: dict, pixel_values: jax.Array, kind: AdapterKind
) -> tuple[jax.Array, jax.Array]:
    """The image projection's conditional and unconditional (classifier-free guidance) inputs, each (B, ...).

    Pure and traceable (`kind` static under `jax.jit`). The zero image is the same for every example: it is
    encoded once, in the same batch, and broadcast.

    Args:
      pixel_values: (B, S, S, 3) NHWC, CLIP-normalised (`preprocess`), S = the encoder's image_size.
    """
    both = jnp.concatenate([pixel_values, jnp.zeros_like(pixel_values[:1])])
    inputs = projection_input(encoder.apply({"params": params}, both), kind)
    null = null_projection_input(inputs[-1:], kind)
    return inputs[:-1], jnp.broadcast_to(null, inputs[:-1].shape)
