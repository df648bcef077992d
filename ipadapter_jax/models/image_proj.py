"""IP-Adapter's image projections: CLIP image features -> image tokens for decoupled cross-attention.

| kind | class          | diffusers (PyTorch)          | input per image          | tokens |
|---------|----------------|------------------------------|--------------------------|--------|
| base    | ImageProjModel | ImageProjection              | image_embeds (D,)        | 4      |
| plus    | Resampler      | IPAdapterPlusImageProjection | hidden_states[-2] (T, E) | 16     |
| full    | MLPProjModel   | IPAdapterFullImageProjection | hidden_states[-2] (T, E) | T=257  |
| faceid  | FaceIDProjModel | IPAdapterFaceIDImageProjection | identity embedding (D,) | 4    |
| faceid-plus | FaceIDPlusProjModel | IPAdapterFaceIDPlusImageProjection | packed (D + T * E,) | 4 |

FaceID adapters read a face model's identity embedding (insightface's ArcFace `normed_embedding`, D = 512); FaceID
Plus also the CLIP `hidden_states[-2]` of the face crop, passed packed with it in one array per image
(`pack_faceid_plus_features`) so that every pipeline path handles it as one feature array.

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

AdapterKind = Literal["base", "plus", "full", "faceid", "faceid-plus"]

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
        return _perceive(self, latents, x).reshape(batch, -1, self.output_dim)


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


class FaceIDProjModel(nn.Module):
    """FaceID projection (official `MLPProjModel` of `ip_adapter_faceid`): identity embedding -> Dense(D -> mult * D),
    GELU, Dense(-> num_tokens * cross_attention_dim), LayerNorm per token.

    Params `proj_0`, `proj_2`, `norm` (official `proj.0`, `proj.2`, `norm`).
    """

    cross_attention_dim: int
    id_embeddings_dim: int = 512
    num_tokens: int = 4
    mult: int = 2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, id_embeds: jax.Array) -> jax.Array:
        """id_embeds (B, D) or (B, num_images, D) -> tokens (B, num_images * num_tokens, cross_attention_dim)."""
        batch = id_embeds.shape[0]
        x = _images_as_batch(id_embeds, 1, self.id_embeddings_dim, type(self).__name__)
        x = _identity_tokens(x, self.mult, self.num_tokens, self.cross_attention_dim, self.dtype)
        return x.reshape(batch, -1, self.cross_attention_dim)


class FacePerceiverResampler(nn.Module):
    """The Resampler of FaceID Plus: given latents (the identity tokens) cross-attend to the CLIP hidden states.

    Params: `proj_in` Dense(embedding_dim -> dim); per layer i `layers_{i}_0` PerceiverAttention and `layers_{i}_1`
    FeedForward, each residual; `proj_out` Dense(dim -> output_dim); `norm_out` LayerNorm.
    """

    dim: int
    depth: int
    heads: int
    embedding_dim: int
    output_dim: int
    dim_head: int = 64
    ff_mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array, hidden_states: jax.Array) -> jax.Array:
        """latents (N, Q, dim), hidden_states (N, T, embedding_dim) -> (N, Q, output_dim)."""
        return _perceive(self, latents, hidden_states)


def _perceive(module: Resampler | FacePerceiverResampler, latents: jax.Array, features: jax.Array) -> jax.Array:
    """The perceiver stack both resamplers share, its layers created in `module`'s compact `__call__`: `proj_in`
    Dense(-> dim) of the features (N, T, E), `depth` residual PerceiverAttention + FeedForward layers on the latents
    (N, Q, dim), `proj_out` Dense(-> output_dim) and `norm_out` LayerNorm: (N, Q, output_dim)."""
    x = nn.Dense(module.dim, dtype=module.dtype, name="proj_in")(features)
    for i in range(module.depth):
        attention = PerceiverAttention(module.dim_head, module.heads, module.dtype, name=f"layers_{i}_0")
        latents = latents + attention(x, latents)
        latents = latents + FeedForward(module.ff_mult, module.dtype, name=f"layers_{i}_1")(latents)
    latents = nn.Dense(module.output_dim, dtype=module.dtype, name="proj_out")(latents)
    return _layer_norm(module.dtype, "norm_out")(latents)


class FaceIDPlusProjModel(nn.Module):
    """FaceID Plus projection (official `ProjModelFaceIdPlus`): identity tokens as in `FaceIDProjModel` (width
    `dim`), refined by a `FacePerceiverResampler` over the face's CLIP hidden states. With `shortcut_scale` (FaceID
    Plus v2's `shortcut=True, s_scale`) the output is `identity tokens + shortcut_scale * resampler output`.

    Params `proj_0`, `proj_2`, `norm`, `perceiver_resampler/...` (official `proj.0`, `proj.2`, `norm`,
    `perceiver_resampler.*`). SD1.5: cross_attention_dim = dim = 768, heads 12, clip_embeddings_dim 1280 (ViT-H).
    """

    cross_attention_dim: int
    dim: int
    heads: int
    clip_embeddings_dim: int
    id_embeddings_dim: int = 512
    num_tokens: int = 4
    depth: int = 4
    dim_head: int = 64
    ff_mult: int = 4
    mult: int = 2
    shortcut_scale: float | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """Packed features (B, D + T * E) or (B, num_images, D + T * E) (`pack_faceid_plus_features`) -> tokens
        (B, num_images * num_tokens, cross_attention_dim)."""
        d, e = self.id_embeddings_dim, self.clip_embeddings_dim
        width = features.shape[-1]
        if features.ndim not in (2, 3) or width <= d or (width - d) % e:
            raise ValueError(
                f"{type(self).__name__} takes packed per-image features (D + T * E,) with D={d}, E={e} "
                f"(pack_faceid_plus_features), batched as (B, ...) or (B, num_images, ...); got {tuple(features.shape)}"
            )
        batch = features.shape[0]
        flat = features.reshape(-1, width)
        ids, hidden = flat[:, :d], flat[:, d:].reshape(flat.shape[0], -1, e)
        tokens = _identity_tokens(ids, self.mult, self.num_tokens, self.dim, self.dtype)
        resampler = FacePerceiverResampler(
            self.dim,
            self.depth,
            self.heads,
            e,
            self.cross_attention_dim,
            self.dim_head,
            self.ff_mult,
            self.dtype,
            name="perceiver_resampler",
        )
        out = resampler(tokens, hidden)
        if self.shortcut_scale is not None:
            out = tokens + self.shortcut_scale * out
        return out.reshape(batch, -1, self.cross_attention_dim)


def pack_faceid_plus_features(id_embeds: jax.Array, hidden_states: jax.Array) -> jax.Array:
    """FaceID Plus input per image: identity embeddings (..., D), CLIP hidden states (..., T, E) -> (..., D + T * E)."""
    flat_hidden = hidden_states.reshape(hidden_states.shape[:-2] + (-1,))
    return jnp.concatenate([jnp.asarray(id_embeds, flat_hidden.dtype), flat_hidden], axis=-1)


def _identity_tokens(ids: jax.Array, mult: int, num_tokens: int, width: int, dtype: jnp.dtype) -> jax.Array:
    """(N, D) -> (N, num_tokens, width): Dense `proj_0`, GELU, Dense `proj_2`, LayerNorm `norm` (FaceID's MLP)."""
    x = _gelu(nn.Dense(mult * ids.shape[-1], dtype=dtype, name="proj_0")(ids))
    x = nn.Dense(num_tokens * width, dtype=dtype, name="proj_2")(x)
    return _layer_norm(dtype, "norm")(x.reshape(-1, num_tokens, width))


def projection_kind(image_proj: nn.Module) -> AdapterKind:
    """The adapter kind of an image projection module: "base", "plus", "full", "faceid" or "faceid-plus"."""
    kinds = ((ImageProjModel, "base"), (Resampler, "plus"), (MLPProjModel, "full"), (FaceIDProjModel, "faceid"),
             (FaceIDPlusProjModel, "faceid-plus"))  # fmt: skip
    for cls, kind in kinds:
        if isinstance(image_proj, cls):
            return kind
    raise TypeError(f"not an IP-Adapter image projection: {type(image_proj).__name__}")


def projection_token_dim(image_proj: nn.Module) -> int:
    """The width of the tokens the projection makes (must equal the UNet's cross_attention_dim)."""
    return image_proj.output_dim if isinstance(image_proj, Resampler) else image_proj.cross_attention_dim
