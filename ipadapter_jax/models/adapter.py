"""The adapter's own params: per-layer `to_k_ip`/`to_v_ip`, kept apart from the frozen UNet.

An adapter is the pytree

    {"image_proj": <image projection params>,
     "ip_layers": {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {"attn2":
                       {"to_k_ip": {"kernel": (cross_attention_dim, inner)}, "to_v_ip": {...}}}}}, ...}}

FaceID adapters add `"unet_lora"`: the LoRA their files carry for the UNet's attention projections, in the same
tree form, `{... "attn1": {"to_q": {"down": (in, rank), "up": (rank, out)}}}`, added to the frozen kernels by
`Adapter.unet_params` (kernel + down @ up, the weight 1 diffusers' `load_ip_adapter` gives it).

`ip_layers` mirrors the UNet param tree but holds only the K'/V' kernels, so optimizer state exists for the
adapter alone and `merge_unet_params` rebuilds the full UNet tree (a free restructuring under `jit`).

Layer order: `ip_layer_paths` lists the cross-attention layers in PyTorch *module registration order*
(down_blocks, up_blocks, mid_block; attentions, transformer_blocks in index order), the order the official
checkpoint numbers them (REFERENCE s.2).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from ipadapter_jax.models.image_proj import AdapterKind, projection_kind, projection_token_dim

IP_KERNELS = ("to_k_ip", "to_v_ip")
FlaxPath = tuple[str, ...]

# Registration order of the UNet's block containers in diffusers' PyTorch `UNet2DConditionModel.__init__`.
_BLOCK_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


def _flat(tree: Any) -> dict[FlaxPath, Any]:
    return traverse_util.flatten_dict(tree.unfreeze() if hasattr(tree, "unfreeze") else tree)


def _registration_key(path: FlaxPath) -> tuple:
    container = re.sub(r"_\d+$", "", path[0])
    return (_BLOCK_ORDER[container],) + tuple(int(n) for part in path for n in re.findall(r"_(\d+)$", part))


def ip_layer_paths(unet_params: Any) -> list[FlaxPath]:
    """Paths of the attn2 modules holding `to_k_ip`, e.g. `('down_blocks_0', 'attentions_0',
    'transformer_blocks_0', 'attn2')`, in registration order. Works on concrete or abstract trees, on full
    UNet params or on an adapter's `ip_layers`."""
    paths = {path[:-2] for path in _flat(unet_params) if path[-2] == "to_k_ip"}
    return sorted(paths, key=_registration_key)


def split_unet_params(params: Any, layer_params: tuple[str, ...] = IP_KERNELS) -> tuple[dict, dict]:
    """Full IP-UNet params -> (frozen UNet params, `ip_layers`): the adapter's per-layer params are those named
    `layer_params` (an adapter design's: Dense modules such as K'/V', or params such as a gate)."""
    frozen, ip_layers = {}, {}
    for path, value in _flat(params).items():
        (ip_layers if path[-2] in layer_params or path[-1] in layer_params else frozen)[path] = value
    return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(ip_layers)


def merge_unet_params(unet_params: Any, ip_layers: Any) -> dict:
    """Frozen UNet params + `ip_layers` -> the full IP-UNet param tree (`ip_layers` wins on overlap)."""
    return traverse_util.unflatten_dict({**_flat(unet_params), **_flat(ip_layers)})


def merge_adapters_params(unet_params: Any, adapters_params: list[dict]) -> dict:
    """Frozen UNet params + several adapters' params -> the params of an IP-UNet with `num_ip_adapters` =
    len(adapters_params): adapter 0's kernels stay `to_k_ip`/`to_v_ip`, adapter a's become `to_k_ip_a`/`to_v_ip_a`;
    a FaceID adapter's `unet_lora` is added to the attention kernels it names."""
    for params in adapters_params:
        if "unet_lora" in params:
            unet_params = add_lora_deltas(unet_params, params["unet_lora"])
    flat = _flat(unet_params)
    for index, params in enumerate(adapters_params):
        suffix = "" if index == 0 else f"_{index}"
        layers = _flat(params["ip_layers"])
        flat.update({path[:-2] + (path[-2] + suffix, path[-1]): value for path, value in layers.items()})
    return traverse_util.unflatten_dict(flat)


def add_lora_deltas(unet_params: Any, unet_lora: Any) -> dict:
    """UNet params with each LoRA'd kernel replaced by kernel + down @ up (`unet_lora` as in the module docstring)."""
    flat, lora = _flat(unet_params), _flat(unet_lora)
    for path, down in lora.items():
        if path[-1] == "down":
            kernel = path[:-1] + ("kernel",)
            flat[kernel] = flat[kernel] + down @ lora[path[:-1] + ("up",)]
    return traverse_util.unflatten_dict(flat)


def ip_layers_from_unet(unet_params: Any, dtype: Any = np.float32) -> dict:
    """The paper's init (s.3.2): each layer's `to_k_ip`/`to_v_ip` is a copy of its frozen `to_k`/`to_v`.

    `unet_params` is the base UNet's (or an IP-UNet's) param tree; returns `ip_layers` for every
    cross-attention layer, i.e. every `attn2`.
    """
    sources = _ip_kernel_sources(unet_params)
    return traverse_util.unflatten_dict({path: np.array(value, dtype=dtype) for path, value in sources.items()})


def cross_attention_layout(unet_params: Any) -> dict:
    """The `ip_layers` a decoupled adapter has for this UNet, as `jax.ShapeDtypeStruct`s: the attn2 layers and their
    widths, which name the layers of the "ip_scale" variables (`ip_variables`) for an adapter of any design."""
    sources = _ip_kernel_sources(unet_params)
    return traverse_util.unflatten_dict({p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in sources.items()})


def _ip_kernel_sources(unet_params: Any) -> dict[FlaxPath, Any]:
    """{path of a `to_k_ip`/`to_v_ip` kernel: the attn2's `to_k`/`to_v` kernel} for every attn2 of the UNet."""
    sources = {}
    for path, value in _flat(unet_params).items():
        if len(path) >= 3 and path[-3] == "attn2" and path[-2] in ("to_k", "to_v") and path[-1] == "kernel":
            sources[path[:-2] + (path[-2] + "_ip", "kernel")] = value
    if not sources:
        raise ValueError("no cross-attention (attn2) layers found in the UNet params")
    return sources


def count_params(tree: Any) -> int:
    """Number of scalars in a (concrete or abstract) param tree."""
    return int(sum(np.prod(leaf.shape) for leaf in _flat(tree).values()))


@dataclasses.dataclass(frozen=True)
class Adapter:
    """An IP-Adapter: its image projection module, its params {"image_proj": ..., "ip_layers": ...} and its design
    (`ipadapter_jax.models.designs`: what `ip_layers` holds and what attn2 does with the image tokens).

    `ipadapter_jax.weights.load_adapter` reads one from an official file or our msgpack; training makes one with
    the design's init (`ipadapter_jax.weights.new_adapter`).
    """

    image_proj: nn.Module
    params: dict
    design: str = "decoupled"

    @property
    def kind(self) -> AdapterKind:
        """The adapter kind, "base", "plus" or "full": which CLIP output the projection reads
        (`ipadapter_jax.models.image_encoder.projection_input`)."""
        return projection_kind(self.image_proj)

    @property
    def token_dim(self) -> int:
        """The width of its image tokens: the cross-attention width of the UNet it was made for."""
        return projection_token_dim(self.image_proj)

    def image_tokens(self, features: jax.Array) -> jax.Array:
        """Projection inputs (B, ...) or (B, K, ...) (K images per example) -> tokens (B, K * num_tokens, cross)."""
        return self.image_proj.apply({"params": self.params["image_proj"]}, features)

    def unet_params(self, frozen_unet_params: Any) -> dict:
        """The IP-UNet's full params: the base's frozen UNet params with this adapter's K'/V' kernels (and a FaceID
        adapter's LoRA added to the attention kernels)."""
        return merge_adapters_params(frozen_unet_params, [self.params])
