"""Per-layer IP-Adapter scales as the "ip_scale" variable collection.

Each attn2 reads its scale from `variables["ip_scale"][...path...]["scale"]`, so a scale is data, not a
Python constant: changing it never recompiles. `ip_scale_tree` builds that collection from

- a number: every cross-attention layer gets it;
- a per-block mapping in diffusers' `set_ip_adapter_scale` convention (InstantStyle), e.g.
  `{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}, "mid": 0.5}`: `block_i` is the i-th
  down/up block of the UNet; a list gives one scale per attention (Transformer2D) of that block, a number
  applies to all of them; each value covers every transformer block inside that attention; unmentioned
  layers get 0.0, as in diffusers. Unlike diffusers, naming a block that has no cross-attention, a key other
  than down/mid/up/block_i, or a list of the wrong length is an error rather than silently ignored.

Usage: `unet.apply({"params": params, "ip_scale": ip_scale_tree(params, 0.6)}, ...)`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from ipadapter_jax.models.adapter import ip_layer_paths
from ipadapter_jax.models.scale_presets import ScalePreset

ScaleSpec = float | Mapping[str, Any] | ScalePreset

_BLOCK_KEY = re.compile(r"block_(\d+)$")


def ip_scale_tree(unet_params: Any, scale: ScaleSpec) -> dict:
    """-> {"down_blocks_1": {"attentions_0": {"transformer_blocks_0": {"attn2": {"scale": f32[]}}}}, ...}.

    `unet_params`: the IP-UNet params or the adapter's `ip_layers` (only the layer paths are read).
    """
    layers = ip_layer_paths(unet_params)
    if isinstance(scale, ScalePreset):
        values = scale.layer_scales(layers)
    elif not isinstance(scale, Mapping):
        values = {path: float(scale) for path in layers}
    else:
        values = _expand_block_scales(layers, scale)
    return traverse_util.unflatten_dict(
        {path + ("scale",): jnp.asarray(value, jnp.float32) for path, value in values.items()}
    )


def _layer_key(path: tuple[str, ...]) -> tuple[str, int, int]:
    """('up_blocks_1', 'attentions_2', ...) -> ('up_blocks', 1, 2); the mid block counts as block 0."""
    container, _, block = path[0].rpartition("_") if path[0] != "mid_block" else ("mid_block", "", "0")
    return container, int(block), int(path[1].rpartition("_")[2])


def _expand_block_scales(layers: list[tuple[str, ...]], spec: Mapping[str, Any]) -> dict:
    # attentions per (container, block index), e.g. ("up_blocks", 0) -> {0, 1, 2}
    attentions: dict[tuple[str, int], set[int]] = {}
    for path in layers:
        container, block, attention = _layer_key(path)
        attentions.setdefault((container, block), set()).add(attention)

    unknown = set(spec) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"ip scale: unknown key(s) {sorted(unknown)}; expected 'down', 'mid' and/or 'up'")

    chosen: dict[tuple[str, int, int], float] = {}  # (container, block, attention) -> scale
    for part, container in (("down", "down_blocks"), ("up", "up_blocks")):
        if part not in spec:
            continue
        blocks = sorted(b for c, b in attentions if c == container)
        value = spec[part]
        per_block = value if isinstance(value, Mapping) else {f"block_{b}": value for b in blocks}
        for block_name, block_value in per_block.items():
            match = _BLOCK_KEY.match(block_name)
            if not match:
                raise ValueError(f"ip scale: '{part}' key '{block_name}' is not of the form 'block_<index>'")
            block = int(match.group(1))
            if block not in blocks:
                raise ValueError(
                    f"ip scale: {part}.{block_name} has no cross-attention layers in this UNet; "
                    f"{part} blocks with cross-attention: {[f'block_{b}' for b in blocks]}"
                )
            n_attn = len(attentions[(container, block)])
            values = block_value if isinstance(block_value, (list, tuple)) else [block_value] * n_attn
            if len(values) == 1:
                values = list(values) * n_attn
            if len(values) != n_attn:
                raise ValueError(
                    f"ip scale: {part}.{block_name} has {n_attn} attention layers, got {len(values)} scales"
                )
            for attn, v in enumerate(values):
                chosen[(container, block, attn)] = float(v)
    if "mid" in spec:
        mid = spec["mid"]
        if isinstance(mid, (list, tuple)):
            if len(mid) != 1:
                raise ValueError(f"ip scale: mid takes one scale, got {len(mid)}")
            mid = mid[0]
        if ("mid_block", 0) not in attentions:
            raise ValueError("ip scale: 'mid' given but this UNet's mid block has no cross-attention")
        for attn in attentions[("mid_block", 0)]:
            chosen[("mid_block", 0, attn)] = float(mid)

    return {path: chosen.get(_layer_key(path), 0.0) for path in layers}
