"""The paper's decoupled cross-attention (Ye et al., 2023, eq. 5): per layer its own K'/V' for the image tokens,
initialised from the frozen to_k/to_v, out = text branch + scale * image branch. The official files' design."""

from __future__ import annotations

from typing import Any

import jax

from ipadapter_jax.models.adapter import IP_KERNELS, ip_layers_from_unet
from ipadapter_jax.models.designs.base import AdapterDesign


class DecoupledDesign(AdapterDesign):
    name = "decoupled"
    layer_params = IP_KERNELS
    official_layout = True

    def new_layers(self, unet_params: Any) -> dict:
        """`to_k_ip`/`to_v_ip` of every attn2, copies of its `to_k`/`to_v` (the paper's init, s.3.2)."""
        return ip_layers_from_unet(unet_params)

    def attn2(self, attn: Any, hidden_states: jax.Array, context: Any, deterministic: bool) -> jax.Array:
        """to_out(Attn(Q, K, V)) + sum_a scale_a * Attn(Q, K'_a, V'_a) @ W_out."""
        text_out = attn.text_attention(hidden_states, context.text, deterministic)
        return text_out + attn.image_attention(hidden_states, context)
