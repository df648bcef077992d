"""PyTorch (diffusers / transformers) model configs -> Flax module arguments, refusing what Flax cannot represent.

diffusers' Flax models implement a subset of their PyTorch twins' config fields. `SD_CONFIG` and friends list, per
model, the fields the Flax model does not implement with the values under which it computes the same function;
`module_kwargs` refuses any other value (it would load, or fail on shapes, and silently compute something else).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ipadapter_jax.weights.torch_layout import ConversionError


def _only(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: value in allowed


def _all_in(*allowed: Any) -> Callable[[Any], bool]:
    return lambda values: all(v in allowed for v in values)


# PyTorch config fields that diffusers' Flax models do not implement, with the values under which the Flax model
# computes the same function. Any other value would load (or fail on shapes) and silently compute something
# else, so it is refused. Left out on purpose: `upcast_attention` (SD2.1 sets it; it only changes fp16 overflow
# behaviour) and VAE `force_upcast` (a pipeline hint).
SD_CONFIG = {
    "act_fn": _only("silu"),
    "norm_num_groups": _only(32),
    "norm_eps": _only(1e-5),
    "downsample_padding": _only(1),
    "mid_block_scale_factor": _only(1),
    "class_embed_type": _only(None),
    "num_class_embeds": _only(None),
    "encoder_hid_dim": _only(None),
    "encoder_hid_dim_type": _only(None),
    "resnet_time_scale_shift": _only("default"),
    "down_block_types": _all_in("CrossAttnDownBlock2D", "DownBlock2D"),
}
UNET_CONFIG = {
    **SD_CONFIG,
    "up_block_types": _all_in("CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": _only("UNetMidBlock2DCrossAttn", None),
    "center_input_sample": _only(False),
    "dual_cross_attention": _only(False),
    "resnet_skip_time_act": _only(False),
    "resnet_out_scale_factor": _only(1, 1.0),
    "time_embedding_type": _only("positional"),
    "time_embedding_dim": _only(None),
    "time_embedding_act_fn": _only(None),
    "timestep_post_act": _only(None),
    "time_cond_proj_dim": _only(None),
    "conv_in_kernel": _only(3),
    "conv_out_kernel": _only(3),
    "attention_type": _only("default"),
    "class_embeddings_concat": _only(False),
    "mid_block_only_cross_attention": _only(None, False),
    "cross_attention_norm": _only(None),
    "reverse_transformer_layers_per_block": _only(None),
}
CONTROLNET_CONFIG = {
    **SD_CONFIG,
    "conditioning_channels": _only(3),
    "mid_block_type": _only("UNetMidBlock2DCrossAttn"),
    "transformer_layers_per_block": lambda v: v == 1 or (isinstance(v, list) and set(v) == {1}),
    "addition_embed_type": _only(None),  # SDXL ControlNets: diffusers' Flax ControlNet has no text_time embedding
    "global_pool_conditions": _only(False),
}
VAE_CONFIG = {
    "act_fn": _only("silu"),
    "down_block_types": _all_in("DownEncoderBlock2D"),
    "up_block_types": _all_in("UpDecoderBlock2D"),
    "use_quant_conv": _only(True),
    "use_post_quant_conv": _only(True),
    "mid_block_add_attention": _only(True),
    "shift_factor": _only(None),
    "latents_mean": _only(None),
    "latents_std": _only(None),
}

# Buffers (not parameters) that checkpoints of older transformers versions hold; the Flax model recomputes them.


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(
            f"{path} is missing ({what}). Likely cause: not a diffusers model folder (pass the component's own "
            "folder, e.g. <pipeline>/unet), or an incomplete download."
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: not valid JSON ({err}). Likely cause: a damaged file.") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def read_model_config(folder: Path, class_name: str) -> dict:
    config = read_json(folder / "config.json", f"the {class_name}'s diffusers config")
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise ConversionError(
            f"{folder / 'config.json'} describes a {found}, expected a {class_name}. Likely cause: the wrong "
            "component folder."
        )
    return config


def module_kwargs(cls: type, config: Mapping[str, Any], supported: Mapping[str, Callable], folder: Path) -> dict:
    """The Flax module's constructor arguments from a PyTorch config; refuses settings it cannot represent."""
    unsupported = [f"{k}={config[k]!r}" for k, ok in supported.items() if k in config and not ok(config[k])]
    if unsupported:
        raise ConversionError(
            f"{folder / 'config.json'}: diffusers' {cls.__name__} cannot represent {', '.join(unsupported)}. "
            "Likely cause: not a Stable Diffusion 1.x/2.x/XL-family model."
        )
    fields = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name", "dtype"}
    # JSON lists -> tuples: module attributes must be hashable.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
