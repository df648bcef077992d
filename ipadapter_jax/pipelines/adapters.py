"""The adapters of a pipeline: fit checks, per-adapter arguments, regional masks.

Several adapters follow diffusers' convention (`load_ip_adapter([...])`): an argument that differs per adapter
(`image`, `image_embeds`, `negative_image`, `negative_image_embeds`, `mask`) is a list with one entry per adapter
when the pipeline holds more than one; `scale`, `embeds_scaling` and `combine` are one value for all adapters or a
list.

Masks (regional IP-Adapter) are preprocessed as diffusers' `IPAdapterMaskProcessor.preprocess(masks, height,
width)`: resized to the output's (width, height) with PIL's Lanczos filter, converted to grayscale, divided by 255
and binarized at 0.5. The UNet resamples them to each layer's token grid (`ipadapter_jax.models.ip_attention`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util
from PIL import Image

from ipadapter_jax.models.adapter import Adapter, ip_layer_paths
from ipadapter_jax.models.base_model import BaseModel
from ipadapter_jax.models.designs import get_design
from ipadapter_jax.models.scale_presets import ScalePreset
from ipadapter_jax.pipelines.image_prompt import ImageInput, ImagePrompt, as_image_list


def per_adapter(value: Any, count: int, name: str) -> list:
    """One pipeline argument -> one entry per adapter: itself for one adapter, else a list of `count` entries."""
    if count == 1:
        return [value]
    if value is None:
        return [None] * count
    if not isinstance(value, (list, tuple)) or len(value) != count:
        got = f"a list of {len(value)}" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(
            f"{name}: this pipeline has {count} adapters, pass a list with one entry per adapter; got {got}"
        )
    return list(value)


def per_adapter_setting(value: Any, count: int, name: str) -> list:
    """`scale` / `embeds_scaling` / `combine`: one value (number, per-block dict, `ScalePreset` or mode name) for
    every adapter, or a list."""
    if count > 1 and isinstance(value, (str, int, float, Mapping, ScalePreset)):
        return [value] * count
    return per_adapter(value, count, name)


def mask_pixels(masks: ImageInput | Sequence[ImageInput], height: int, width: int) -> np.ndarray:
    """K mask images (PIL or uint8 arrays, any size and mode) -> (K, height, width) float32 in {0, 1}."""
    pixels = []
    for mask in as_image_list(masks):
        picture = mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask))
        resized = picture.resize((width, height), resample=Image.Resampling.LANCZOS).convert("L")
        pixels.append((np.asarray(resized, np.float32) / 255.0 >= 0.5).astype(np.float32))
    return np.stack(pixels)


def check_adapter_fits(base: BaseModel, adapter: Adapter, index: int = 0) -> None:
    """One clear error when the adapter (the `index`-th of the pipeline) was made for another base model."""
    which = "the adapter" if index == 0 else f"adapter {index}"
    cross_attention_dim = base.unet.config.cross_attention_dim
    if adapter.token_dim != cross_attention_dim:
        raise ValueError(
            f"{which}'s image projection makes {adapter.token_dim}-d tokens but this UNet's cross-attention takes "
            f"{cross_attention_dim}-d (an adapter for a different base model?)"
        )
    if not get_design(adapter.design).layer_params:
        return  # a design that trains the projection only
    flat_unet = traverse_util.flatten_dict(base.unet_params)
    expected = {path[:-2] for path in flat_unet if path[-3:] == ("attn2", "to_k", "kernel")}
    found = set(ip_layer_paths(adapter.params["ip_layers"]))
    if found != expected:
        missing = sorted("/".join(p) for p in expected - found)[:2]
        unexpected = sorted("/".join(p) for p in found - expected)[:2]
        raise ValueError(
            f"{which} has {len(found)} cross-attention layers, this UNet {len(expected)}; e.g. missing "
            f"{missing}, unexpected {unexpected} (an adapter for a different base model?)"
        )
    flat_ip = traverse_util.flatten_dict(adapter.params["ip_layers"])
    for path in sorted(expected):
        for ip_name, base_name in (("to_k_ip", "to_k"), ("to_v_ip", "to_v")):
            have, want = flat_ip[path + (ip_name, "kernel")].shape, flat_unet[path + (base_name, "kernel")].shape
            if tuple(have) != tuple(want):
                raise ValueError(
                    f"{which}'s kernel {'/'.join(path + (ip_name,))} is {tuple(have)} but this UNet's {base_name} "
                    f"is {tuple(want)} (an adapter for a different base model?)"
                )


def adapters_unet(unet: Any, adapters: Sequence[Adapter]) -> Any:
    """The IP-UNet module for `adapters`: one image branch each, their design (`ipadapter_jax.models.designs`).

    Raises:
      ValueError: several adapters of which one is not of the decoupled design.
    """
    designs = [adapter.design for adapter in adapters]
    if len(adapters) > 1 and set(designs) != {"decoupled"}:
        raise ValueError(f"several adapters at once must all be of the decoupled design; got designs {designs}")
    if (len(adapters), designs[0]) == (1, "decoupled"):
        return unet
    return unet.clone(num_ip_adapters=len(adapters), adapter_design=designs[0])


def check_design_options(design: str, masks: Sequence[Any], embeds_scaling: Sequence[str], scales: Sequence) -> None:
    """ValueError when a request uses regional masks, an embeds_scaling mode other than "v_only" or a precise weight
    type with an adapter whose design has no decoupled image branch (`AdapterDesign.image_branch_options`)."""
    if get_design(design).image_branch_options:
        return
    used = [
        name
        for name, on in (
            ("mask", any(mask is not None for mask in masks)),
            ("embeds_scaling", any(mode != "v_only" for mode in embeds_scaling)),
            ("precise weight types", any(isinstance(s, ScalePreset) and s.name.endswith("-precise") for s in scales)),
        )
        if on
    ]
    if used:
        raise ValueError(
            f"{', '.join(used)}: not available with an adapter of the {design!r} design (they act on the decoupled "
            "image branch, which it has not)"
        )


def adapter_fields(
    count: int, images: dict[str, Any], per_prompt_images: bool, scale: Any, embeds_scaling: Any, combine: Any
) -> dict[str, tuple]:
    """The pipeline's image arguments (`images`: image, image_embeds, negative_image, negative_image_embeds, mask)
    -> `GenerationRequest`'s per-adapter fields: image_prompts (empty: text-to-image; each with its adapter's
    `combine` mode), scales, masks, embeds_scaling."""
    listed = {name: per_adapter(value, count, name) for name, value in images.items()}
    combines = per_adapter_setting(combine, count, "combine")
    prompts = [
        ImagePrompt.of(*(listed[name][a] for name in list(images)[:4]), per_prompt_images, combines[a])
        for a in range(count)
    ]
    missing = [index for index, prompt in enumerate(prompts) if prompt is None]
    if missing and len(missing) < count:
        raise ValueError(f"every adapter needs an image prompt (image or image_embeds); adapter(s) {missing} have none")
    return dict(
        image_prompts=tuple(prompt for prompt in prompts if prompt is not None),
        scales=tuple(per_adapter_setting(scale, count, "scale")),
        masks=tuple(None if masks is None else tuple(as_image_list(masks)) for masks in listed["mask"]),
        embeds_scaling=tuple(per_adapter_setting(embeds_scaling, count, "embeds_scaling")),
    )
