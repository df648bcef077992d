"""LoRAs merged into a base model's Flax params at load time: W += scale * (alpha / rank) * up @ down.

    from ipadapter_jax.weights import apply_loras, load_base

    base = apply_loras(load_base("stable-diffusion-v1-5"), [("style.safetensors", 0.8)])
    # or: load_base("stable-diffusion-v1-5", loras=[("style.safetensors", 0.8)])

The files are read by `ipadapter_jax.weights.lora_files` (diffusers/peft and kohya formats; kohya's SDXL names of the
original UNet are renamed by `ipadapter_jax.weights.sgm_names`). Each layer names a
PyTorch module of the UNet or a text encoder; it is found in the Flax params by the project's naming rule
(`ipadapter_jax.weights.torch_layout`: `down_blocks.0.attentions.0...to_q` -> `down_blocks_0/attentions_0/.../to_q`;
transformers' Flax CLIP keeps list indices as their own level) and its delta, converted to the Flax kernel's layout
(Linear (in, out), Conv2d (kh, kw, in, out)), is added to the kernel. What diffusers' PyTorch `load_lora_weights`
+ `set_adapters(weights=scale)` computes in every forward pass (`x W^T + scale * alpha / rank * x down^T up^T`) is
then one matmul per layer, as `fuse_lora` does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ipadapter_jax.models.base_model import BaseModel
from ipadapter_jax.weights.lora_files import LoraLayer, read_lora
from ipadapter_jax.weights.sgm_names import is_sgm_name, sgm_to_diffusers
from ipadapter_jax.weights.torch_layout import ConversionError, FlaxPath, torch_key_to_flax_module_path

LoraSpec = tuple["str | os.PathLike", float]


def apply_loras(base: BaseModel, loras: Sequence[LoraSpec]) -> BaseModel:
    """`base` with every LoRA `(path, scale)` merged into its UNet and text encoder params, in order.

    Raises:
      ConversionError: a file that cannot be read (`read_lora`), a layer naming a module the model does not have,
        a text encoder the model does not have, or a delta whose shape is not its module's weight's (named with
        expected and found shapes).
    """
    unet_params = base.unet_params
    text_params = [encoder.params for encoder in base.text_encoders]
    for path, scale in loras:
        layers = read_lora(path)
        source = os.fspath(path)
        unet_layers = [_diffusers_named(layer, base.unet.config) for layer in layers if layer.component == "unet"]
        unet_params = merge_lora_layers(unet_params, unet_layers, scale=scale, source=source)
        for index, component in enumerate(("text_encoder", "text_encoder_2")):
            selected = [layer for layer in layers if layer.component == component]
            if not selected:
                continue
            if index >= len(text_params):
                raise ConversionError(
                    f"{source}: key '{selected[0].key}' adapts {component}, but the base model has "
                    f"{len(text_params)} text encoder(s). Likely cause: an SDXL LoRA on an SD1.5-family model."
                )
            text_params[index] = merge_lora_layers(
                text_params[index], selected, scale=scale, source=source, module_path=_text_module_path
            )
    encoders = tuple(dataclasses.replace(enc, params=p) for enc, p in zip(base.text_encoders, text_params))
    return base.replace(unet_params=unet_params, text_encoders=encoders)


def merge_lora_layers(
    params: Any,
    layers: Sequence[LoraLayer],
    *,
    scale: float,
    source: str,
    module_path: Callable[[str], FlaxPath] = torch_key_to_flax_module_path,
) -> dict:
    """One component's Flax params with the layers' deltas added (`scale * alpha / rank * up @ down`).

    Args:
      params: the component's Flax param tree (e.g. `BaseModel.unet_params`).
      layers: LoRA layers of this component.
      scale: the user's weight for the LoRA.
      source: the file, for error messages.
      module_path: PyTorch module path -> Flax module path (the UNet's rule by default).
    Returns:
      A new param tree (float32 kernels as in `params`; untouched leaves are the same arrays).
    """
    flat = traverse_util.flatten_dict(params.unfreeze() if hasattr(params, "unfreeze") else params)
    kernels = {path[:-1] for path in flat if path[-1] == "kernel"}
    by_underscored = {"_".join(path): path for path in kernels}
    for layer in layers:
        module = by_underscored.get(layer.module) if layer.kohya else module_path(layer.module)
        if module not in kernels:
            raise ConversionError(
                f"{source}: key '{layer.key}': {layer.component} has no Linear or Conv2d module '{layer.module}'. "
                "Likely cause: a LoRA for another base model (e.g. SDXL vs SD1.5)."
            )
        kernel = flat[module + ("kernel",)]
        delta = _flax_delta(layer)
        if delta.shape != kernel.shape:
            raise ConversionError(
                f"{source}: key '{layer.key}': the LoRA's weight delta for {layer.component} '{layer.module}' is "
                f"{_torch_shape(delta.shape)}, the module's weight is {_torch_shape(kernel.shape)} (PyTorch layout). "
                "Likely cause: a LoRA for another base model."
            )
        factor = scale * layer.alpha / layer.rank
        merged = np.asarray(kernel, np.float32) + np.float32(factor) * delta
        flat[module + ("kernel",)] = jnp.asarray(merged, dtype=kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def _diffusers_named(layer: LoraLayer, unet_config: Any) -> LoraLayer:
    """A kohya layer named after the original SD UNet (`input_blocks_4_1_...`, kohya's SDXL files) renamed to
    diffusers' modules (`ipadapter_jax.weights.sgm_names`); other layers as they are."""
    if layer.kohya and is_sgm_name(layer.module):
        name = sgm_to_diffusers(layer.module, unet_config)
        if name is not None:
            return dataclasses.replace(layer, module=name)
    return layer


def _flax_delta(layer: LoraLayer) -> np.ndarray:
    """up @ down in the Flax kernel's layout: (in, out) for a Linear, (kh, kw, in, out) for a Conv2d."""
    if layer.down.ndim == 2:
        return (layer.up @ layer.down).T
    torch_delta = np.einsum("or,rikl->oikl", layer.up[:, :, 0, 0], layer.down)  # (out, in, kh, kw)
    return torch_delta.transpose(2, 3, 1, 0)


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 2:
        return (flax_shape[1], flax_shape[0])
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)


def _text_module_path(module: str) -> FlaxPath:
    """transformers' Flax CLIP keeps list indices as levels: `text_model.encoder.layers.0.q_proj` -> its parts."""
    return tuple(module.split("."))
