"""IP-Adapter's image projections: CLIP image features -> image tokens for decoupled cross-attention.

| kind | class          | diffusers (PyTorch)          | input per image          | tokens |
|---------|----------------|------------------------------|--------------------------|--------|
| base    | ImageProjModel | ImageProjection              | image_embeds (D,)        | 4      |
| plus    | Resampler      | IPAdapterPlusImageProjection | hidden_states[-2] (T, E) | 16     |
| full    | MLPProjModel   | IPAdapterFullImageProjection | hidden_states[-2] (T, E) | T=257  |

The class names are those of the official implementation (tencent-ailab/IP-Adapter).

Every module takes the features of one image per example, or of several images per example with an extra
axis after the batch: (B, ...) or (B, num_images, ...). Several images for one adapter give the
concatenation of their tokens, (B, num_images * tokens, cross_attention_dim), image by image, which is what
diffusers' attention processors attend to.

Parameter names mirror the official checkpoint keys (`ipadapter_jax.weights.image_proj_keys` holds the exact map): a
PyTorch list index is joined to its parent with "_" (`proj.0` -> `proj_0`, `layers.2.0` -> `layers_2_0`); the one
exception is the Resampler's feed-forward `nn.Sequential`, whose members `layers.{i}.1.{0,1,3}` are named
`layers_{i}_1/{norm,fc1,fc2}` here.

Numerics follow the PyTorch modules rather than Flax defaults: LayerNorm eps 1e-5 (PyTorch's default; Flax's
is 1e-6) and exact erf GELU (PyTorch's `nn.GELU()`; Flax's `nn.gelu` defaults to the tanh approximation).
`dtype` is the computation dtype; parameters are always created in float32.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

AdapterKind = Literal["base", "plus", "full"]

# PyTorch's nn.LayerNorm default, used by every LayerNorm of the official and diffusers projections.
LAYER_NORM_EPS = 1e-5


def _layer_norm(dtype: jnp.dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, name=name)


def _gelu(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=False)


def _images_as_batch(features: jax.Array, per_image_ndim: int, feature_dim: int, what: str) -> jax.Array:
    """(B, *per_image) or (B, num_images, *per_image) -> (B * num_images, *per_image).

    `per_image_ndim` is the rank of one image's features (1 for an embedding, 2 for hidden states).
    """
    if features.ndim not in (per_image_ndim + 1, per_image_ndim + 2) or features.shape[-1] != feature_dim:
        per_image = "(D,)" if per_image_ndim == 1 else "(T, D)"
        raise ValueError(
            f"{what} takes per-image features {per_image} with D={feature_dim}, batched as (B, ...) or "
            f"(B, num_images, ...); got shape {tuple(features.shape)}"
        )
    return features.reshape((-1,) + features.shape[-per_image_ndim:])


class ImageProjModel(nn.Module):
    """Base IP-Adapter projection: a linear map of the CLIP image embedding to `num_tokens` tokens, LayerNorm.

    Params: `proj` Dense(clip_embeddings_dim -> num_tokens * cross_attention_dim), `norm` LayerNorm.
    """

    cross_attention_dim: int
    clip_embeddings_dim: int
    num_tokens: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        """image_embeds (B, D) or (B, num_images, D) -> tokens (B, num_images * num_tokens, cross_attention_dim)."""
        batch = image_embeds.shape[0]
        x = _images_as_batch(image_embeds, 1, self.clip_embeddings_dim, type(self).__name__)
        x = nn.Dense(self.num_tokens * self.cross_attention_dim, dtype=self.dtype, name="proj")(x)
        x = x.reshape(-1, self.num_tokens, self.cross_attention_dim)
        x = _layer_norm(self.dtype, "norm")(x)
        return x.reshape(batch, -1, self.cross_attention_dim)


class PerceiverAttention(nn.Module):
    """The latents attend to the image features and to themselves (the Resampler's attention).

    Params: `norm1` (features), `norm2` (latents) LayerNorms; bias-free `to_q` (dim -> inner), `to_kv`
    (dim -> 2 * inner, split into keys then values), `to_out` (inner -> dim); inner = heads * dim_head.
    """

    dim_head: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, latents: jax.Array) -> jax.Array:
        """features (B, T, dim), latents (B, Q, dim) -> attention output (B, Q, dim) (no residual)."""
        inner = self.heads * self.dim_head
        features = _layer_norm(self.dtype, "norm1")(features)
        latents = _layer_norm(self.dtype, "norm2")(latents)
        query = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(latents)
        context = jnp.concatenate([features, latents], axis=1)
        key, value = jnp.split(nn.Dense(2 * inner, use_bias=False, dtype=self.dtype, name="to_kv")(context), 2, -1)

        def heads(x: jax.Array) -> jax.Array:  # (B, L, inner) -> (B, L, heads, dim_head)
            return x.reshape(x.shape[:2] + (self.heads, self.dim_head))

        # Scaling q and k by dim_head**-0.25 each (instead of the logits by dim_head**-0.5) is the reference's
        # way of keeping the fp16 products in range; the result is the same in exact arithmetic.
        scale = self.dim_head**-0.25
        logits = jnp.einsum("bqhd,bkhd->bhqk", heads(query) * scale, heads(key) * scale)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, heads(value))
        out = out.reshape(out.shape[:2] + (inner,))
        return nn.Dense(latents.shape[-1], use_bias=False, dtype=self.dtype, name="to_out")(out)


class FeedForward(nn.Module):
    """The Resampler's feed-forward: LayerNorm, bias-free Dense(dim -> mult * dim), GELU, bias-free Dense back.

    Params `norm`, `fc1`, `fc2` (official `.0`, `.1`, `.3` of an `nn.Sequential`; `.2` is the GELU).
    """

    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., dim) -> (..., dim) (no residual)."""
        dim = x.shape[-1]
        h = _layer_norm(self.dtype, "norm")(x)
        h = _gelu(nn.Dense(self.mult * dim, use_bias=False, dtype=self.dtype, name="fc1")(h))
        return nn.Dense(dim, use_bias=False, dtype=self.dtype, name="fc2")(h)


class Resampler(nn.Module):
    """IP-Adapter Plus projection: `num_queries` learned latents cross-attend to the CLIP hidden states.

    Params: `latents` (1, num_queries, dim); `proj_in` Dense(embedding_dim -> dim); per layer i
    `layers_{i}_0` PerceiverAttention and `layers_{i}_1` FeedForward, each residual; `proj_out`
    Dense(dim -> output_dim); `norm_out` LayerNorm.
    SD1.5 Plus: dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280, output_dim=768.
    SDXL Plus: dim=1280, heads=20, output_dim=2048, the rest the same.
    """

    dim: int
    depth: int
    heads: int
    num_queries: int
    embedding_dim: int
    output_dim: int
    dim_head: int = 64
    ff_mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        """hidden_states (B, T, E) or (B, num_images, T, E) -> tokens (B, num_images * num_queries, output_dim)."""
        batch = hidden_states.shape[0]
        x = _images_as_batch(hidden_states, 2, self.embedding_dim, type(self).__name__)
        latents = self.param("latents", nn.initializers.normal(self.dim**-0.5), (1, self.num_queries, self.dim))
        latents = jnp.broadcast_to(latents.astype(self.dtype), (x.shape[0],) + latents.shape[1:])
        x = nn.Dense(self.dim, dtype=self.dtype, name="proj_in")(x)
        for i in range(self.depth):
            attention = PerceiverAttention(self.dim_head, self.heads, self.dtype, name=f"layers_{i}_0")
            latents = latents + attention(x, latents)
            latents = latents + FeedForward(self.ff_mult, self.dtype, name=f"layers_{i}_1")(latents)
        latents = nn.Dense(self.output_dim, dtype=self.dtype, name="proj_out")(latents)
        latents = _layer_norm(self.dtype, "norm_out")(latents)
        return latents.reshape(batch, -1, self.output_dim)


class MLPProjModel(nn.Module):
    """IP-Adapter Full projection: per token Dense(E -> E), GELU, Dense(E -> cross_attention_dim), LayerNorm.

    Params `proj_0`, `proj_2`, `proj_3` (official `proj.0`, `proj.2`, `proj.3`; `proj.1` is the GELU).
    """

    cross_attention_dim: int
    clip_embeddings_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        """hidden_states (B, T, E) or (B, num_images, T, E) -> tokens (B, num_images * T, cross_attention_dim)."""
        batch = hidden_states.shape[0]
        x = _images_as_batch(hidden_states, 2, self.clip_embeddings_dim, type(self).__name__)
        x = _gelu(nn.Dense(self.clip_embeddings_dim, dtype=self.dtype, name="proj_0")(x))
        x = nn.Dense(self.cross_attention_dim, dtype=self.dtype, name="proj_2")(x)
        x = _layer_norm(self.dtype, "proj_3")(x)
        return x.reshape(batch, -1, self.cross_attention_dim)


def projection_kind(image_proj: nn.Module) -> AdapterKind:
    """The adapter kind of an image projection module: "base", "plus" or "full"."""
    for cls, kind in ((ImageProjModel, "base"), (Resampler, "plus"), (MLPProjModel, "full")):
        if isinstance(image_proj, cls):
            return kind
    raise TypeError(f"not an IP-Adapter image projection: {type(image_proj).__name__}")


def projection_token_dim(image_proj: nn.Module) -> int:
    """The width of the tokens the projection makes (must equal the UNet's cross_attention_dim)."""
    return image_proj.output_dim if isinstance(image_proj, Resampler) else image_proj.cross_attention_dim
