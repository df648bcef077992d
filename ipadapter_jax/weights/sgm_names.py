"""Module names of the original Stable Diffusion UNet (Stability's sgm/ldm code, which kohya's sd-scripts trains SDXL
on) -> diffusers' names, in kohya's underscored form: `input_blocks_4_1_transformer_blocks_0_attn1_to_q` ->
`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`.

The original UNet numbers its blocks flat: `input_blocks.0.0` is conv_in, then each down block contributes
`layers_per_block` entries `[resnet, attention?]` and (all but the last) one `[downsample op]`; `middle_block` is
resnet, attention, resnet; each up block has `layers_per_block + 1` entries `[resnet, attention?, upsample conv?]`
(the attention only in cross-attention blocks, the upsampler in the last entry of all but the last block).
A resnet's `in_layers.2` / `out_layers.3` / `emb_layers.1` / `skip_connection` are diffusers' `conv1` / `conv2` /
`time_emb_proj` / `conv_shortcut`; `time_embed.0/2`, `label_emb.0.0/0.2` and `out.2` are the time embedding,
SDXL's add embedding and conv_out.
"""

from __future__ import annotations

import re
from typing import Any

_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
           "skip_connection": "conv_shortcut"}  # fmt: skip
_WHOLE = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
          "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
          "label_emb_0_2": "add_embedding_linear_2"}  # fmt: skip
_BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)_(\d+)(?:_(.*))?|middle_block_(\d+)(?:_(.*))?")


def is_sgm_name(name: str) -> bool:
    """A kohya UNet module name (without `lora_unet_`) in the original UNet's naming."""
    return bool(_BLOCK.fullmatch(name)) or name in _WHOLE


def sgm_to_diffusers(name: str, unet_config: Any) -> str | None:
    """The underscored diffusers module name of an underscored sgm one, for a UNet with `unet_config`'s
    `layers_per_block`, `down_block_types` and `up_block_types`; None when the name has no counterpart."""
    if name in _WHOLE:
        return _WHOLE[name]
    match = _BLOCK.fullmatch(name)
    if match is None:
        return None
    kind, index, inner, rest, middle, middle_rest = match.groups()
    layers = unet_config.layers_per_block
    if middle is not None:
        part = {"0": "resnets_0", "1": "attentions_0", "2": "resnets_1"}.get(middle)
        return None if part is None else _join("mid_block", part, middle_rest)
    index, inner = int(index), int(inner)
    if kind == "input_blocks":
        block, layer = divmod(index - 1, layers + 1)
        if layer == layers:  # the down block's downsampler: `op` -> `conv`
            return _join(f"down_blocks_{block}_downsamplers_0", None, "conv" if rest == "op" else None)
        part = f"resnets_{layer}" if inner == 0 else f"attentions_{layer}"
        return _join(f"down_blocks_{block}", part, rest)
    block, layer = divmod(index, layers + 1)
    has_attention = (
        "CrossAttn" in unet_config.up_block_types[block] if block < len(unet_config.up_block_types) else False
    )
    if inner == 0:
        return _join(f"up_blocks_{block}", f"resnets_{layer}", rest)
    if inner == 1 and has_attention:
        return _join(f"up_blocks_{block}", f"attentions_{layer}", rest)
    return _join(f"up_blocks_{block}_upsamplers_0", None, rest)  # the upsampler's `conv`


def _join(block: str, part: str | None, rest: str | None) -> str | None:
    if rest is None:
        return None
    rest = _RESNET.get(rest, rest) if part is None or part.startswith("resnets") else rest
    return "_".join(p for p in (block, part, rest) if p)
