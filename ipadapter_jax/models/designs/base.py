"""What an adapter design is: the per-layer params it trains beside its image projection, and what attn2 does
with the image tokens.

Training, sampling, export and evaluation treat every design alike: the adapter pytree is
{"image_proj": ..., "ip_layers": <the design's per-layer params, mirroring the UNet tree>}, the UNet receives the
image tokens (B, N, D) next to the text tokens (`models.unet.IPContext`), and each attn2 hands them to its design's
`attn2` (`models.unet.IPAttention`). A design is one subclass of `AdapterDesign` plus an entry in
`ipadapter_jax.models.designs.DESIGNS` and its name in `choices.ADAPTER_DESIGNS`.

The "ip_scale" variables (`models.ip_variables`) reach every design: `attn.ip_factors(0)["scale"]` is the layer's
IP scale (absent in training: 1), the image step range included.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax


class AdapterDesign:
    """One adapter design. Subclasses set the class attributes and override `new_layers` and `attn2`.

    name: its name in `choices.ADAPTER_DESIGNS` and in adapter files' metadata ("adapter_design").
    layer_params: the names, right under each attn2, of what the design trains there (e.g. ("to_k_ip", "to_v_ip"),
      Dense modules with a "kernel"; or params such as "ip_gate"); () for a design that trains the projection only.
    official_layout: whether the official IP-Adapter files (.safetensors/.bin) can hold it; if not it is saved as
      our .msgpack only, which records the design.
    image_branch_options: whether the pipeline's regional masks, embeds_scaling modes other than "v_only" and the
      precise weight types' swaps apply (they act on `attn.image_attention`'s decoupled branch).
    """

    name: ClassVar[str]
    layer_params: ClassVar[tuple[str, ...]] = ()
    official_layout: ClassVar[bool] = False
    image_branch_options: ClassVar[bool] = True

    def new_layers(self, unet_params: Any) -> dict:
        """The initial per-layer params for the frozen UNet's params: {"down_blocks_0": ... {"attn2": {...}}}."""
        raise NotImplementedError

    def declare_params(self, attn: Any) -> dict[str, jax.Array]:
        """Called in each attn2's `setup`: declares (`attn.param(name, init, shape)`) and returns the design's params
        that are not Dense modules; `attn.design_params` holds them. Default: none."""
        return {}

    def attn2(self, attn: Any, hidden_states: jax.Array, context: Any, deterministic: bool) -> jax.Array:
        """What one attn2 (`models.unet.IPAttention`, passed as `attn`) computes with image tokens.

        hidden_states: (B, L, query_dim); context: `IPContext` (text (B, T, D), image_tokens: one (B, N, D) per
        adapter). Returns (B, L, query_dim). Building blocks: `attn.text_attention(hidden_states, text,
        deterministic)` (the frozen text branch, after `to_out`), `attn.image_attention(hidden_states, context)`
        (the decoupled image branch, scaled, after `to_out`'s kernel), `attn.ip_factors(0)`, `attn.query`/`key`/
        `value`/`proj_attn` (to_q/to_k/to_v/to_out), `attn.design_params`.
        """
        raise NotImplementedError
