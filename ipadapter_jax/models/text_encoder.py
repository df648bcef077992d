"""Prompt -> the UNet's text conditioning, as diffusers' PyTorch pipelines compute it.

| base model  | encoders | `context` (cross-attention tokens)                            | `pooled`                   |
|-------------|----------|---------------------------------------------------------------|----------------------------|
| SD1.5 / SD2 | 1        | last hidden state (after the final LayerNorm), (n, T, D)      | None                       |
| SDXL        | 2        | hidden_states[-2] of both encoders concatenated, (n, T, D1+D2) | encoder 2's `text_embeds`  |

SDXL's `text_embeds` is encoder 2's projected end-of-text state, (n, P).

Prompts are tokenized to each tokenizer's `model_max_length` (padded and truncated), so every prompt of a batch
has the same shape and a new prompt never recompiles the encoders. `encode_token_ids` is the one place the
table is computed: the pipelines (`PromptEncoder`) and training (`ipadapter_jax.training.encode`) both call it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """A CLIP tokenizer and its Flax text module with params.

    `module`: transformers' `FlaxCLIPTextModule` (SDXL's second encoder: `FlaxCLIPTextModelWithProjectionModule`),
    the `.module` of a `FlaxCLIPTextModel` wrapper.
    """

    tokenizer: Any
    module: nn.Module
    params: Any


@flax.struct.dataclass
class TextConditioning:
    """context: (n, T, cross_attention_dim); pooled: (n, P) for SDXL's `text_embeds`, else None."""

    context: jax.Array
    pooled: jax.Array | None


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> np.ndarray:
    """(n,) prompts -> (n, tokenizer.model_max_length) int32 token ids, padded and truncated as diffusers does."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np"
    ).input_ids
    return ids.astype(np.int32)


def encode_token_ids(modules: Sequence[nn.Module], params: Sequence[Any], ids: Sequence[jax.Array]) -> TextConditioning:
    """Token ids, (n, T) int32 per text encoder -> the UNet's text conditioning (the table above).

    modules: the Flax CLIP text modules (transformers' `FlaxCLIPTextModule`; SDXL's second one
    `FlaxCLIPTextModelWithProjectionModule`), i.e. the `.module` of the `FlaxCLIPTextModel` wrappers. Pure: call
    it under `jax.jit` or inside a jitted training step.
    """
    outputs = []
    for module, module_params, x in zip(modules, params, ids, strict=True):
        positions = jnp.broadcast_to(jnp.arange(x.shape[-1]), x.shape)
        outputs.append(
            module.apply({"params": module_params}, x, jnp.ones_like(x), positions, output_hidden_states=True)
        )
    if len(outputs) == 1:
        return TextConditioning(context=outputs[0].last_hidden_state, pooled=None)
    # diffusers' SDXL: the penultimate layer of each encoder (no final LayerNorm); pooled = encoder 2's projected
    # end-of-text state.
    context = jnp.concatenate([out.hidden_states[-2] for out in outputs], axis=-1)
    return TextConditioning(context=context, pooled=outputs[1].text_embeds)


class PromptEncoder:
    """Encodes prompts with one (SD1.5/SD2) or two (SDXL) text encoders; compiled once per number of prompts."""

    def __init__(self, encoders: Sequence[TextEncoder]):
        if len(encoders) not in (1, 2):
            raise ValueError(f"expected 1 (SD1.5/SD2) or 2 (SDXL) text encoders, got {len(encoders)}")
        self.encoders = tuple(encoders)
        self._encode = jax.jit(self._encode_ids)

    @property
    def is_sdxl(self) -> bool:
        return len(self.encoders) == 2

    def __call__(self, prompts: Sequence[str]) -> TextConditioning:
        """(n,) prompts -> `TextConditioning` with n rows (device arrays)."""
        ids = tuple(tokenize(encoder.tokenizer, prompts) for encoder in self.encoders)
        return self._encode(tuple(encoder.params for encoder in self.encoders), ids)

    def _encode_ids(self, params: tuple, ids: tuple) -> TextConditioning:
        return encode_token_ids([encoder.module for encoder in self.encoders], params, ids)
