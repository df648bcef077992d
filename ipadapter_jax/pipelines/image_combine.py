"""Several images of one image prompt -> the adapter's input: ComfyUI_IPAdapter_plus's `combine_embeds` modes.

They act on the projection's inputs (the CLIP features, `ImagePromptEncoder.features`), before the projection, as
ComfyUI_IPAdapter_plus's `ipadapter_execute` does. For K features x_1..x_K of one prompt (each of any shape):

- concat: unchanged, K inputs whose tokens are concatenated (K * num_tokens tokens; the IP-Adapter default).
- add: x_1 + ... + x_K.
- subtract: x_1 - mean(x_2, ..., x_K).
- average: mean(x_1, ..., x_K).
- norm-average: mean_k(x_k / ||x||), ||x|| the L2 norm over the K images at each feature position (elementwise,
  as the source's `torch.norm(x, dim=0)`; a position where all K features are 0 gives NaN, as there).

Every mode but concat gives one input (num_tokens tokens). With K = 1 every mode leaves the features unchanged
(the source combines only K > 1), and the negative (unconditional) features are then the first of the K negative
ones, as the source keeps `uncond[0]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ipadapter_jax.choices import IMAGE_COMBINE_MODES


def combine_mode_name(mode: str) -> str:
    """A mode in our spelling or ComfyUI's ("norm average" -> "norm-average"); ValueError listing the valid ones."""
    canonical = "-".join(str(mode).strip().lower().split())
    if canonical not in IMAGE_COMBINE_MODES:
        raise ValueError(f"unknown image combine mode {mode!r}; valid: {', '.join(IMAGE_COMBINE_MODES)}")
    return canonical


def combine_features(features: jax.Array, mode: str) -> jax.Array:
    """(P, K, *feature_shape) features of P prompts of K images -> (P, K', *feature_shape); K' = 1 unless concat
    (or K = 1: unchanged)."""
    mode = combine_mode_name(mode)
    if mode == "concat" or features.shape[1] == 1:
        return features
    if mode == "add":
        return jnp.sum(features, axis=1, keepdims=True)
    if mode == "subtract":
        return features[:, :1] - jnp.mean(features[:, 1:], axis=1, keepdims=True)
    if mode == "average":
        return jnp.mean(features, axis=1, keepdims=True)
    norm = jnp.sqrt(jnp.sum(jnp.square(features), axis=1, keepdims=True))
    return jnp.mean(features / norm, axis=1, keepdims=True)


def combine_negative_features(negative: jax.Array, mode: str, num_images: int) -> jax.Array:
    """(N, *feature_shape) negative features of a prompt with `num_images` images -> the ones to use: the first
    alone when the images are combined into one input, else all N."""
    if combine_mode_name(mode) == "concat" or num_images == 1:
        return negative
    return negative[:1]
