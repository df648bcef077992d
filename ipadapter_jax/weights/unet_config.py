"""A diffusers UNet `config.json` -> our IP-UNet module and its param shapes (traced, nothing computed).

Converters check weight files against these shapes before building anything, so a full-size UNet costs only
an abstract trace (`jax.eval_shape`), not its 0.9-2.6G parameters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from ipadapter_jax.models.random_init import abstract_params
from ipadapter_jax.models.unet import IPUNet2DConditionModel
from ipadapter_jax.weights.torch_layout import ConversionError

_UNET_CLASSES = ("UNet2DConditionModel", "FlaxUNet2DConditionModel")


def read_unet_config(path: str | os.PathLike) -> dict:
    """The config dict of a diffusers UNet: `path` is its `config.json` or the folder holding it (`.../unet`).

    Raises:
      FileNotFoundError: no config there.  ConversionError: not JSON, or the config of another model class.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a diffusers UNet config.json or its folder)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None
    class_name = config.get("_class_name", "UNet2DConditionModel") if isinstance(config, dict) else None
    if class_name not in _UNET_CLASSES:
        raise ConversionError(
            f"{path}: a {class_name!r} config, expected a UNet2DConditionModel config. Likely cause: the pipeline's "
            "model_index.json or another component's config instead of unet/config.json."
        )
    return config


def ip_unet_from_config(config: Mapping[str, Any]) -> IPUNet2DConditionModel:
    """Our IP-UNet for a diffusers UNet config (PyTorch-only entries of the config are ignored)."""
    return IPUNet2DConditionModel.from_config(dict(config))


def abstract_ip_unet_params(unet: IPUNet2DConditionModel) -> dict:
    """The IP-UNet's full param tree (frozen UNet + `to_k_ip`/`to_v_ip` of every attn2, and `to_k_ip_a`/`to_v_ip_a`
    with `num_ip_adapters` > 1) as ShapeDtypeStructs."""
    cross = unet.cross_attention_dim
    added = None
    if unet.addition_embed_type == "text_time":
        # Only the concatenation [text_embeds, embedded time_ids] reaches a Dense, so any split whose widths sum
        # to projection_class_embeddings_input_dim yields the real shapes, for base and refiner configs alike.
        added = {
            "text_embeds": jnp.zeros((1, unet.projection_class_embeddings_input_dim - unet.addition_time_embed_dim)),
            "time_ids": jnp.zeros((1, 1)),
        }
    return abstract_params(
        unet,
        jnp.zeros((1, unet.in_channels, unet.sample_size, unet.sample_size)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, 1, cross)),
        added_cond_kwargs=added,
        image_tokens=tuple(jnp.zeros((1, 1, cross)) for _ in range(unet.num_ip_adapters)),
    )
