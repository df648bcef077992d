"""Prompt -> the UNet's text conditioning, as diffusers' PyTorch pipelines compute it.

| base model  | encoders | `context` (cross-attention tokens)                            | `pooled`                   |
|-------------|----------|---------------------------------------------------------------|----------------------------|
| SD1.5 / SD2 | 1        | last hidden state (after the final LayerNorm), (n, T, D)      | None                       |
| SDXL        | 2        | hidden_states[-2] of both encoders concatenated, (n, T, D1+D2) | encoder 2's `text_embeds`  |

SDXL's `text_embeds` is encoder 2's projected end-of-text state, (n, P).

Prompts are tokenized to each tokenizer's `model_max_length` (padded and truncated), so every prompt of a batch
has the same shape and a new prompt never recompiles the encoders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """A CLIP tokenizer and its Flax text encoder.

    `model` is the transformers Flax wrapper (`FlaxCLIPTextModel`, or `FlaxCLIPTextModelWithProjection` for
    SDXL's second encoder), called as `model(input_ids, params=params, output_hidden_states=True)`.
    """

    tokenizer: Any
    model: Any
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
        if not self.is_sdxl:
            (encoder,), (p,), (x,) = self.encoders, params, ids
            return TextConditioning(context=encoder.model(x, params=p).last_hidden_state, pooled=None)
        outputs = [
            encoder.model(x, params=p, output_hidden_states=True) for encoder, p, x in zip(self.encoders, params, ids)
        ]
        # diffusers' SDXL: the penultimate layer of each encoder (no final LayerNorm); pooled = encoder 2's
        # projected end-of-text state.
        context = jnp.concatenate([out.hidden_states[-2] for out in outputs], axis=-1)
        return TextConditioning(context=context, pooled=outputs[1].text_embeds)
