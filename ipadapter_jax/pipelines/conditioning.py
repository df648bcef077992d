"""A request's conditioning as arrays: text (and SDXL's added conditioning), and per adapter image tokens, masks
and the "ip_scale" variables. Rows are prompts, the second axis the guidance pair (negative, positive) or
(positive,); `IPAdapterPipeline` repeats them per image and pads them to the devices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ipadapter_jax.models.adapter import cross_attention_layout
from ipadapter_jax.models.base_model import BaseModel
from ipadapter_jax.models.ip_variables import ip_variables
from ipadapter_jax.models.text_encoder import PromptEncoder
from ipadapter_jax.pipelines.adapters import check_design_options, mask_pixels
from ipadapter_jax.pipelines.image_prompt import ImagePromptEncoder
from ipadapter_jax.pipelines.request import GenerationRequest


def text_conditioning(
    prompt_encoder: PromptEncoder, request: GenerationRequest, base: BaseModel
) -> tuple[np.ndarray, dict | None]:
    """-> text (P, G, T, D) and, for SDXL, {"text_embeds": (P, G, pooled), "time_ids": (P, G, 6)}."""
    prompts = list(request.prompts)
    rows = prompts
    if request.guided:
        rows = list(request.negative_prompts or [""] * len(prompts)) + prompts
    encoded = prompt_encoder(rows)
    groups = 2 if request.guided else 1
    zero_negative = request.guided and request.negative_prompts is None and base.force_zeros_for_empty_prompt

    def paired(x: jax.Array) -> np.ndarray:  # (G*P, ...) -> (P, G, ...)
        x = np.asarray(x).reshape((groups, len(prompts)) + x.shape[1:]).swapaxes(0, 1).copy()
        if zero_negative:
            x[:, 0] = 0.0
        return x

    text = paired(encoded.context)
    if not base.is_sdxl:
        return text, None
    size = (request.height, request.width)
    time_ids = np.tile(np.array([*size, 0, 0, *size], np.float32), (len(prompts), groups, 1))
    return text, {"text_embeds": paired(encoded.pooled), "time_ids": time_ids}


def image_conditioning(
    encoders: Sequence[ImagePromptEncoder], request: GenerationRequest, unet_params: Any
) -> tuple[tuple[np.ndarray, ...] | None, tuple[np.ndarray | None, ...] | None, dict | None]:
    """-> per adapter: tokens (P, G, K_a * n_a, D); masks (K_a, height, width) or None (None when no adapter has
    masks); and the "ip_scale" variables (`ip_variables`). All None without an image prompt."""
    if not request.image_prompts:
        return None, None, None
    for encoder in encoders:
        check_design_options(encoder.adapter.design, request.masks, request.embeds_scaling, request.scales)
    num_prompts = len(request.prompts)
    tokens = tuple(
        encoder.encode(prompt, num_prompts, request.guided)
        for encoder, prompt in zip(encoders, request.image_prompts, strict=True)
    )
    masks = None
    if any(m is not None for m in request.masks):
        masks = tuple(None if m is None else mask_pixels(m, request.height, request.width) for m in request.masks)
    # The layers and widths of the decoupled design's branches name the scale variables of every design.
    layout = cross_attention_layout(unet_params)
    return tokens, masks, ip_variables(layout, request.scales, request.embeds_scaling)
