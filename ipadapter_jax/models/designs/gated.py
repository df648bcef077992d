"""Gated image attention: the decoupled image branch through a learned per-layer gate that starts closed,

    out = text_attention + tanh(gate) * image_attention,   gate = 0 at the start of training,

so training starts from the frozen text-to-image UNet and opens each layer's image branch as far as it helps.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ipadapter_jax.models.adapter import IP_KERNELS, ip_layers_from_unet
from ipadapter_jax.models.designs.base import AdapterDesign


class GatedDesign(AdapterDesign):
    name = "gated"
    layer_params = (*IP_KERNELS, "ip_gate")  # K'/V' kernels as the decoupled design, plus one scalar gate
    image_branch_options = True  # the image branch is the decoupled one: masks and scaling modes apply

    def new_layers(self, unet_params: Any) -> dict:
        """K'/V' copied from to_k/to_v (as the decoupled design) and a gate of 0 in every attn2."""
        flat = traverse_util.flatten_dict(ip_layers_from_unet(unet_params))
        gates = {path[:-2] + ("ip_gate",): np.zeros((), np.float32) for path in flat if path[-2] == "to_k_ip"}
        return traverse_util.unflatten_dict({**flat, **gates})

    def declare_params(self, attn: Any) -> dict[str, jax.Array]:
        return {"ip_gate": attn.param("ip_gate", nn.initializers.zeros_init(), ())}

    def attn2(self, attn: Any, hidden_states: jax.Array, context: Any, deterministic: bool) -> jax.Array:
        text_out = attn.text_attention(hidden_states, context.text, deterministic)
        image_out = attn.image_attention(hidden_states, context)
        return text_out + jnp.tanh(attn.design_params["ip_gate"]).astype(image_out.dtype) * image_out
