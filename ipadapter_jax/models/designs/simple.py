"""The paper's "simple adapter" (Fig. 10): the image tokens are appended to the text tokens and go through the
frozen text cross-attention; only the projection trains.

    out = to_out(softmax over [text keys; image keys] of Q K^T / sqrt(d), with to_k/to_v of both)

which at scale 1 is diffusers' UNet given encoder_hidden_states = concat(text, image tokens). The IP scale s of a
layer multiplies the image keys' unnormalised attention weights (adds log s to their logits): s = 1 is the
trained design, s = 0 exactly the text-only UNet, values between weaken the image, above 1 strengthen it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ipadapter_jax.models.designs.base import AdapterDesign


class SimpleDesign(AdapterDesign):
    name = "simple"
    layer_params = ()
    image_branch_options = False

    def new_layers(self, unet_params: Any) -> dict:
        """None: the projection is all it trains."""
        return {}

    def attn2(self, attn: Any, hidden_states: jax.Array, context: Any, deterministic: bool) -> jax.Array:
        """One attention over the text tokens (B, T, D) followed by the image tokens (B, N, D)."""
        (tokens,) = context.image_tokens
        batch, length = hidden_states.shape[:2]
        heads = (attn.heads, attn.dim_head)
        keys_in = jnp.concatenate([context.text, tokens.astype(context.text.dtype)], axis=1)
        query = attn.query(hidden_states).reshape(batch, length, *heads)
        key = attn.key(keys_in).reshape(batch, keys_in.shape[1], *heads)
        value = attn.value(keys_in).reshape(batch, keys_in.shape[1], *heads)
        bias = None
        scale = attn.ip_factors(0).get("scale")
        if scale is not None:
            image_logit = jnp.log(jnp.asarray(scale, jnp.float32))  # log 0 = -inf: the image keys get no weight
            bias = jnp.where(jnp.arange(keys_in.shape[1]) < context.text.shape[1], 0.0, image_logit)
            bias = bias.astype(query.dtype)[None, None, None, :]
        attended = jax.nn.dot_product_attention(query, key, value, bias=bias, implementation="xla")
        out = attn.proj_attn(attended.reshape(batch, length, attn.heads * attn.dim_head))
        return attn.dropout_layer(out, deterministic=deterministic)
