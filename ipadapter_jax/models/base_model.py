"""`BaseModel`: the frozen parts of a Stable Diffusion model (SD1.5/SD2 family or SDXL) as Flax modules + params.

`ipadapter_jax.weights.load_base` makes one from a diffusers folder (or the embedded "tiny" base); the pipelines,
training and evaluation all take it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ipadapter_jax.models.text_encoder import TextEncoder


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """The frozen model.

    unet: `IPUNet2DConditionModel`; unet_params: its frozen params (without `to_k_ip`/`to_v_ip`).
    vae: diffusers `FlaxAutoencoderKL`; vae_params.
    text_encoders: one (SD1.5/SD2) or two (SDXL) `TextEncoder`s (tokenizer, bare Flax module, params).
    scheduler: the sampling scheduler (`ipadapter_jax.models.schedulers`); scheduler_state: `scheduler.create_state()`.
      Its config also carries the base's training noise schedule (betas), which training reads.
    force_zeros_for_empty_prompt: SDXL's rule (its `model_index.json`): without a negative prompt, the negative
      text conditioning is zeros rather than the encoding of "".
    """

    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    text_encoders: tuple[TextEncoder, ...]
    scheduler: Any
    scheduler_state: Any
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        """SDXL's text-and-time conditioning (two text encoders)."""
        return self.unet.config.addition_embed_type == "text_time"

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent (8 for every Stable Diffusion VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def replace(self, **changes: Any) -> BaseModel:
        """A copy with some fields changed, e.g. another scheduler: `base.replace(scheduler=s, scheduler_state=st)`."""
        return dataclasses.replace(self, **changes)
