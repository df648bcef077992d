"""Our adapter pytree <-> the official IP-Adapter checkpoint layout (REFERENCE s.2).

Official layout (what `torch.save`d `ip-adapter_*.bin` holds and diffusers' `load_ip_adapter` reads):

    {"image_proj": {"proj.weight": ..., ...},
     "ip_adapter": {"1.to_k_ip.weight": (inner, cross), "1.to_v_ip.weight": ..., "3.to_k_ip.weight": ...}}

`<id>` numbers every attention processor of the PyTorch UNet in module registration order (down, up, mid;
attn1 then attn2 of each transformer block), so the k-th cross-attention layer has id 2k + 1.

FaceID files also hold a LoRA for every attention processor (attn1 of that block: id 2k) in `ip_adapter`:
`<id>.to_{q,k,v,out}_lora.down.weight` (rank, in) and `.up.weight` (out, rank); diffusers' `load_ip_adapter` loads
it with weight 1 (alpha = rank). It becomes the adapter's `unet_lora` (`ipadapter_jax.models.adapter`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from ipadapter_jax.models.adapter import IP_KERNELS, ip_layer_paths
from ipadapter_jax.models.designs import get_design
from ipadapter_jax.weights import image_proj_keys
from ipadapter_jax.weights.torch_layout import ConversionError, describe_problems

SECTIONS = ("image_proj", "ip_adapter")
_LORA_KEY = re.compile(r"(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_LORA_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out_0"}  # official -> Flax module


def check_official_layout(design: str, path: Any) -> None:
    """ConversionError unless adapter design `design` (`ipadapter_jax.models.designs`) has the official file layout
    (.safetensors/.bin); `path` is the file being written."""
    if not get_design(design).official_layout:
        raise ConversionError(
            f"{path}: the {design!r} adapter design has no official IP-Adapter file layout (.safetensors/.bin); save "
            "it as our .msgpack (save_flax_adapter, or a .msgpack path), which records the design"
        )


def adapter_to_official(adapter: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Our adapter {"image_proj", "ip_layers"} -> {"image_proj": {...}, "ip_adapter": {...}} (numpy, PyTorch layout)."""
    section = ip_layers_to_official(adapter["ip_layers"])
    if "unet_lora" in adapter:
        section.update(unet_lora_to_official(adapter["unet_lora"], adapter["ip_layers"]))
    return {"image_proj": image_proj_keys.flax_to_official(adapter["image_proj"]), "ip_adapter": section}


def adapter_from_official(
    state: Mapping[str, Mapping[str, Any]], unet_params: Any, *, source: str = "ip-adapter"
) -> tuple[image_proj_keys.ImageProjSpec, Any, dict]:
    """Official two-section state -> (image projection spec, its Flax module, our adapter pytree).

    `unet_params`: the target IP-UNet's (concrete or abstract) params, which fix layer ids and shapes; the
    image projection's token width must equal the UNet's cross-attention width.
    """
    missing = [name for name in SECTIONS if name not in state]
    if missing:
        raise ConversionError(f"{source}: missing section(s) {missing}; found {sorted(state)}")
    check_weights(state, source=source)
    spec, module, image_proj = image_proj_keys.load_image_proj(state["image_proj"], source=f"{source} [image_proj]")
    lora = {key: value for key, value in state["ip_adapter"].items() if _LORA_KEY.fullmatch(key)}
    ip_section = {key: value for key, value in state["ip_adapter"].items() if key not in lora}
    ip_layers = ip_layers_from_official(ip_section, unet_params, source=f"{source} [ip_adapter]")
    cross = next(iter(traverse_util.flatten_dict(ip_layers).values())).shape[0]
    token_dim = spec.hparams.get("cross_attention_dim", spec.hparams.get("output_dim"))
    if token_dim != cross:
        raise ConversionError(
            f"{source}: the image projection makes {token_dim}-d tokens but this UNet's cross-attention "
            f"takes {cross}-d (adapter for a different base model?)"
        )
    adapter = {"image_proj": image_proj, "ip_layers": ip_layers}
    if lora:
        adapter["unet_lora"] = unet_lora_from_official(lora, unet_params, source=f"{source} [ip_adapter]")
    return spec, module, adapter


def check_weights(state: Mapping[str, Mapping[str, Any]], *, source: str = "ip-adapter") -> None:
    """ConversionError naming the first tensor that is not floating point or holds NaN/inf values (an adapter
    with them would load and silently produce black or noise images)."""
    for section, part in state.items():
        for key, value in part.items():
            array = np.asarray(value)
            if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
                raise ConversionError(
                    f"{source}: '{section}.{key}' has dtype {array.dtype}; IP-Adapter weights are floating point. "
                    "Likely cause: a corrupted or hand-edited file."
                )
            finite = np.isfinite(array.astype(np.float32))
            if not finite.all():
                raise ConversionError(
                    f"{source}: '{section}.{key}' holds {int((~finite).sum())} non-finite value(s) (NaN/inf) of "
                    f"{array.size}. Likely cause: a diverged training run or a corrupted file."
                )


def official_layer_ids(unet_params: Any) -> dict[tuple[str, ...], int]:
    """attn2 path -> official id (1, 3, 5, ...) for every cross-attention layer of `unet_params`."""
    return {path: 2 * k + 1 for k, path in enumerate(ip_layer_paths(unet_params))}


def ip_layers_to_official(ip_layers: Any) -> dict[str, np.ndarray]:
    """`ip_layers` -> the `ip_adapter` section: {"<id>.to_k_ip.weight": (inner, cross) numpy, ...}."""
    flat = traverse_util.flatten_dict(ip_layers)
    out = {}
    for path, layer_id in official_layer_ids(ip_layers).items():
        for name in IP_KERNELS:
            out[f"{layer_id}.{name}.weight"] = np.ascontiguousarray(np.asarray(flat[path + (name, "kernel")]).T)
    return out


def ip_layers_from_official(section: Mapping[str, Any], unet_params: Any, *, source: str = "ip_adapter") -> dict:
    """The `ip_adapter` section -> `ip_layers` for the UNet whose (concrete or abstract) params are given.

    `unet_params` must hold the K'/V' kernels (an IP-UNet's params, e.g. from `jax.eval_shape`), which fix
    every layer's id and expected shape. Raises `ConversionError` naming `source`, every missing or
    unexpected key and every shape mismatch (with the likely cause when all shapes are off).
    """
    flat_target = traverse_util.flatten_dict(unet_params)
    expected: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
    for path, layer_id in official_layer_ids(unet_params).items():
        for name in IP_KERNELS:
            in_dim, out_dim = flat_target[path + (name, "kernel")].shape
            expected[f"{layer_id}.{name}.weight"] = (path + (name, "kernel"), (out_dim, in_dim))

    missing = [f"'{key}' {expected[key][1]}" for key in sorted(set(expected) - set(section), key=_id_order)]
    unexpected = sorted(set(section) - set(expected), key=_id_order)
    mismatched = []
    converted = {}
    for key, (path, shape) in expected.items():
        if key not in section:
            continue
        array = np.asarray(section[key])
        if array.shape != shape:
            mismatched.append(f"'{key}': expected {shape}, found {array.shape}")
        else:
            converted[path] = array.T
    if missing or unexpected or mismatched:
        hint = ""
        if len(mismatched) + len(missing) + len(unexpected) > len(expected) // 2:
            hint = (
                f". Likely cause: the adapter was trained for a different base model (this UNet has "
                f"{len(expected) // 2} cross-attention layers, the file {len(_layer_ids(section))})."
            )
        raise ConversionError(
            f"{source} does not fit this UNet: " + describe_problems(mismatched, missing, unexpected, limit=8) + hint
        )
    return traverse_util.unflatten_dict(converted)


def attention_ids(unet_params: Any) -> dict[int, tuple[str, ...]]:
    """Official id -> Flax path of every attention processor: attn2 of the k-th cross-attention layer at 2k + 1,
    the attn1 of its transformer block at 2k."""
    ids = {}
    for path, layer_id in official_layer_ids(unet_params).items():
        ids[layer_id - 1], ids[layer_id] = path[:-1] + ("attn1",), path
    return ids


def unet_lora_from_official(section: Mapping[str, Any], unet_params: Any, *, source: str = "ip_adapter") -> dict:
    """A FaceID file's `<id>.to_q_lora.down.weight`... entries -> `unet_lora` (float32, Flax layout) for the UNet
    whose params (with K'/V', concrete or abstract) are given. Raises `ConversionError` naming the key and the
    expected and found shapes, or a missing partner."""
    flat = traverse_util.flatten_dict(unet_params)
    ids = attention_ids(unet_params)
    lora = {}
    for key in sorted(section, key=_id_order):
        layer_id, projection, which = _LORA_KEY.fullmatch(key).groups()
        partner = key.replace(f".{which}.", ".up." if which == "down" else ".down.")
        if partner not in section:
            raise ConversionError(f"{source}: '{key}' has no matching '{partner}'")
        if int(layer_id) not in ids:
            raise ConversionError(
                f"{source}: '{key}': this UNet has no attention processor {layer_id} (ids 0-{len(ids) - 1}). "
                "Likely cause: an adapter for another base model."
            )
        module = ids[int(layer_id)] + (_LORA_MODULES[projection],)
        in_dim, out_dim = flat[module + ("kernel",)].shape
        array = np.asarray(section[key], np.float32)
        rank = np.shape(section[key.replace(f".{which}.", ".down.")])[0]
        expected = (rank, in_dim) if which == "down" else (out_dim, rank)
        if array.shape != expected:
            raise ConversionError(
                f"{source}: '{key}': expected {expected} for {'/'.join(module)}, found {array.shape}. Likely "
                "cause: an adapter for another base model."
            )
        lora[module + (which,)] = array.T
    return traverse_util.unflatten_dict(lora)


def unet_lora_to_official(unet_lora: Any, ip_layers: Any) -> dict[str, np.ndarray]:
    """`unet_lora` -> its `ip_adapter` entries `<id>.to_q_lora.down.weight` (rank, in)... (numpy, PyTorch layout);
    `ip_layers` fix the ids."""
    id_of = {path: layer_id for layer_id, path in attention_ids(ip_layers).items()}
    projection_of = {flax: official for official, flax in _LORA_MODULES.items()}
    out = {}
    for path, value in traverse_util.flatten_dict(unet_lora).items():
        attention, module, which = path[:-2], path[-2], path[-1]
        key = f"{id_of[attention]}.{projection_of[module]}_lora.{which}.weight"
        out[key] = np.ascontiguousarray(np.asarray(value).T)
    return out


def _id_order(key: str) -> tuple[int, str]:
    head = key.split(".", 1)[0]
    return (int(head) if head.isdigit() else -1, key)


def _layer_ids(section: Mapping[str, Any]) -> set[str]:
    return {key.split(".", 1)[0] for key in section}
