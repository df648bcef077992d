"""The "ip_scale" variable collection for one or several adapters, with their embedding scaling modes.

Per attn2 layer and adapter a, five scalars (`ipadapter_jax.models.ip_attention`): "scale", "key_scale",
"value_scale", "value_mean_scale", "swap" (adapter 0), "scale_1", "key_scale_1", ... (adapter 1), and so on; "swap"
is 1 at the swapped layers of a precise `ScalePreset`, else 0. The IP weight
of each layer comes from the adapter's scale spec (a number or diffusers' per-block dict,
`ipadapter_jax.models.scales.ip_scale_tree`), the factors from its mode and the layer's width. All of it is data:
changing a scale or a mode never recompiles.

Usage: `unet.apply({"params": params, "ip_scale": ip_variables(params, [0.6, {"up": ...}], ["v_only", "k_v"])},
..., image_tokens=(tokens_a, tokens_b))`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from ipadapter_jax.models.ip_attention import factor_name, scaling_factors
from ipadapter_jax.models.scale_presets import ScalePreset
from ipadapter_jax.models.scales import ScaleSpec, ip_scale_tree


def ip_variables(unet_params: Any, scales: Sequence[ScaleSpec], embeds_scaling: Sequence[str]) -> dict:
    """-> {"down_blocks_1": {"attentions_0": {"transformer_blocks_0": {"attn2": {"scale": f32[], "key_scale": ...,
    "scale_1": ..., ...}}}}, ...}: one scale spec and one mode (`choices.EMBEDS_SCALING`) per adapter.

    `unet_params`: the IP-UNet's params (adapter 0's `to_k_ip` kernels give the layers and their widths).
    """
    if len(scales) != len(embeds_scaling):
        raise ValueError(f"{len(scales)} scale spec(s) for {len(embeds_scaling)} embeds_scaling mode(s)")
    params = traverse_util.flatten_dict(unet_params.unfreeze() if hasattr(unet_params, "unfreeze") else unet_params)
    flat = {}
    for adapter, (spec, mode) in enumerate(zip(scales, embeds_scaling)):
        weights = traverse_util.flatten_dict(ip_scale_tree(unet_params, spec))
        swaps = spec.layer_swaps([path[:-1] for path in weights]) if isinstance(spec, ScalePreset) else {}
        for path, weight in weights.items():
            layer = path[:-1]
            inner_dim = params[layer + ("to_k_ip", "kernel")].shape[1]
            factors = {**scaling_factors(mode, float(weight), inner_dim), "swap": swaps.get(layer, 0.0)}
            for name, value in factors.items():
                flat[layer + (factor_name(name, adapter),)] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(flat)
