"""The image branch of one adapter in one attn2 layer, as pure functions: embedding scaling modes, regional masks.

Image branch of adapter a (keys/values from its own `to_k_ip`/`to_v_ip`; Q shared with the text branch):

    K' = key_scale * K
    V' = value_scale * V + (value_mean_scale - value_scale) * mean_tokens(V)
    out_a = scale * sum_i mask_i * Attn(Q, K'_i, V'_i)

Without a mask the adapter's K images attend as one set of K * num_tokens tokens (i = the single set, mask 1);
with masks each image attends on its own and its output is weighted by its mask on this layer's token grid, as
diffusers' `IPAdapterAttnProcessor2_0` (`ip_adapter_masks`) computes it. `mean_tokens` averages over the tokens
of one attention (all K images' without masks, one image's with masks). The four factors are per-layer data in
the "ip_scale" variable collection (`ip_variables.ip_variables`); a factor that is absent is 1 (training).

Embedding scaling modes (`EMBEDS_SCALING`, weight w = the layer's IP scale, C = the layer's inner width
heads * dim_head, p = w * C / 1280), after cubiq/ComfyUI_IPAdapter_plus `CrossAttentionPatch.py`
(`embeds_scaling`, its names in quotes):

    "v_only"              ("V only")                 out = w * Attn(Q, K, V)          (diffusers' and the paper's)
    "k_v"                 ("K+V")                    out = Attn(Q, w K, w V)
    "k_v_c_penalty"       ("K+V w/ C penalty")       out = Attn(Q, p K, p V)
    "k_mean_v_c_penalty"  ("K+mean(V) w/ C penalty") out = Attn(Q, p K, V - mean(V) + p mean(V))

Every mode is the same program with other factor values, so switching modes never recompiles.

A fifth factor, "swap" (0 or 1; absent: 0), serves ComfyUI's precise weight types (`scale_presets`): where it is 1
the adapter's tokens are replaced by the caller's swapped tokens (`select_tokens`): the positive image's tokens on
the negative rows of classifier-free guidance, zeros on the positive rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.choices import EMBEDS_SCALING

FACTOR_NAMES = ("scale", "key_scale", "value_scale", "value_mean_scale", "swap")
C_PENALTY_WIDTH = 1280  # ComfyUI's reference width for the C penalty (SD1.5's widest attn2)


def factor_name(name: str, adapter_index: int) -> str:
    """The "ip_scale" variable of adapter `adapter_index`: "scale" for adapter 0, "scale_1" for adapter 1, ..."""
    return name if adapter_index == 0 else f"{name}_{adapter_index}"


def scaling_factors(mode: str, weight: float, inner_dim: int) -> dict[str, float]:
    """The four factors of `mode` (see the module docstring) for IP weight `weight` on a layer of width `inner_dim`."""
    if mode not in EMBEDS_SCALING:
        raise ValueError(f"embeds_scaling must be one of {EMBEDS_SCALING}, got {mode!r}")
    if mode == "v_only":
        return {"scale": weight, "key_scale": 1.0, "value_scale": 1.0, "value_mean_scale": 1.0}
    factor = weight if mode == "k_v" else weight * inner_dim / C_PENALTY_WIDTH
    value = 1.0 if mode == "k_mean_v_c_penalty" else factor
    return {"scale": 1.0, "key_scale": factor, "value_scale": value, "value_mean_scale": factor}


def select_tokens(tokens: jax.Array, swapped: jax.Array | None, factors: dict[str, jax.Array]) -> jax.Array:
    """tokens (B, N, D), or where `factors["swap"]` is 1 the `swapped` tokens (B, N, D) (a select, as data)."""
    if swapped is None or "swap" not in factors:
        return tokens
    return jnp.where(factors["swap"] > 0.5, swapped.astype(tokens.dtype), tokens)


def image_attention(
    query: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    factors: dict[str, jax.Array],
    masks: jax.Array | None = None,
) -> jax.Array:
    """One adapter's image branch before the output projection, without `factors["scale"]`.

    Args:
      query: (B, L, heads, dim_head).
      keys, values: (B, N, heads * dim_head), `to_k_ip`/`to_v_ip` of the adapter's tokens (K images x n tokens,
        image-major).
      factors: "key_scale", "value_scale", "value_mean_scale" (scalars; absent: 1).
      masks: (K, L) per-image weights on this layer's L queries (`masks_on_token_grid`), or None.
    Returns:
      (B, L, heads * dim_head).
    """
    batch, length, heads, dim_head = query.shape
    groups = 1 if masks is None else masks.shape[0]
    factors = {name: jnp.asarray(value, keys.dtype) for name, value in factors.items()}  # bf16 stays bf16
    if "key_scale" in factors:
        keys = keys * factors["key_scale"]
    keys = keys.reshape(batch, groups, -1, heads, dim_head)
    values = values.reshape(batch, groups, -1, heads, dim_head)
    if "value_scale" in factors:
        mean = jnp.mean(values, axis=2, keepdims=True)
        values = factors["value_scale"] * values + (factors["value_mean_scale"] - factors["value_scale"]) * mean
    out = None
    for group in range(groups):
        attended = jax.nn.dot_product_attention(query, keys[:, group], values[:, group], implementation="xla")
        attended = attended.reshape(batch, length, heads * dim_head)
        if masks is not None:
            attended = attended * masks[group][None, :, None].astype(attended.dtype)
        out = attended if out is None else out + attended
    return out


def token_grid(num_queries: int, mask_height: int, mask_width: int) -> tuple[int, int]:
    """The (rows, cols) a (mask_height, mask_width) mask is resampled to for a layer of `num_queries` tokens, as
    diffusers' `IPAdapterMaskProcessor.downsample` picks it (rows from the aspect ratio, rounded up to divide)."""
    rows = max(int(math.sqrt(num_queries / (mask_width / mask_height))), 1)
    rows += int(num_queries % rows != 0)
    return rows, max(num_queries // rows, 1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` along one
    axis: source x = (i + 0.5) * in / out - 0.5, Keys' cubic kernel with A = -0.75, neighbours clamped to the edge."""
    a = -0.75
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        source = (i + 0.5) * in_size / out_size - 0.5
        left = math.floor(source)
        t = source - left
        near = [((a + 2) * x - (a + 3)) * x * x + 1 for x in (t, 1 - t)]
        far = [((a * x - 5 * a) * x + 8 * a) * x - 4 * a for x in (t + 1, 2 - t)]
        for offset, weight in zip((-1, 0, 1, 2), (far[0], near[0], near[1], far[1])):
            matrix[i, min(max(left + offset, 0), in_size - 1)] += weight
    return matrix.astype(np.float32)


def masks_on_token_grid(masks: jax.Array, num_queries: int) -> jax.Array:
    """(K, H, W) masks -> (K, num_queries) weights for a layer of `num_queries` tokens (row-major grid).

    As diffusers' `IPAdapterMaskProcessor.downsample`: bicubic resampling to `token_grid`, then zero-padded or
    cut to `num_queries` when the grid does not cover the layer exactly (masks of another aspect ratio).
    """
    count, height, width = masks.shape
    rows, cols = token_grid(num_queries, height, width)
    resampled = jnp.einsum(
        "rh,khw,cw->krc",
        bicubic_matrix(height, rows),
        masks.astype(jnp.float32),
        bicubic_matrix(width, cols),
        precision=jax.lax.Precision.HIGHEST,
    ).reshape(count, rows * cols)
    if rows * cols < num_queries:
        return jnp.pad(resampled, ((0, 0), (0, num_queries - rows * cols)))
    return resampled[:, :num_queries]
