"""What a training run is built from: modules, frozen params, the initial adapter and the tokenizers.

`load(config, workdir)` reads `config.model`: the `tiny` base is built locally (`training.tiny_components`);
a real base is a diffusers model folder plus a CLIP image encoder folder, converted from PyTorch weights.
All params come back as host numpy trees; the train script places them on the mesh.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from ipadapter_jax.adapter import ip_layers_from_unet, split_unet_params
from ipadapter_jax.image_proj import ImageProjModel
from training import tiny_components
from training.encode import Encoders
from training.step import StepModels

# SD1.5's noise schedule (scheduler/scheduler_config.json): the tiny base uses it too.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclasses.dataclass
class Components:
    models: StepModels
    encoders: Encoders
    tokenizers: list[Any]
    frozen: dict  # {"unet", "encoders", "alphas_cumprod", "vae_scaling_factor"} (null encodings added later)
    adapter: dict  # initial {"image_proj", "ip_layers"}


def alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> np.ndarray:
    """Cumulative alpha products of a DDPM schedule, from diffusers' own Flax scheduler."""
    from diffusers import FlaxDDPMScheduler

    scheduler = FlaxDDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule
    )
    return np.asarray(scheduler.create_state().common.alphas_cumprod, np.float32)


def load(config: ml_collections.ConfigDict, workdir: str) -> Components:
    if config.model.base != "tiny":
        raise NotImplementedError("real base models: see conversion.diffusers_models (next step of issue 6)")
    if config.model.variant != "base":
        raise ValueError("the tiny base has a base (4-token) adapter only")
    dtype = jnp.dtype(config.model.dtype)
    tiny = tiny_components.build(os.path.join(workdir, "tiny_base"), seed=config.seed)
    unet = tiny.unet.clone(dtype=dtype)
    image_proj = ImageProjModel(
        cross_attention_dim=tiny.image_proj.cross_attention_dim,
        clip_embeddings_dim=tiny.image_proj.clip_embeddings_dim,
        num_tokens=config.model.num_tokens,
        dtype=dtype,
    )
    frozen_unet, _ = split_unet_params(tiny.params["unet"])
    return Components(
        models=StepModels(unet=unet, image_proj=image_proj),
        encoders=Encoders(
            vae=tiny.vae, text_encoders=(tiny.text_encoder,), image_encoder=tiny.image_encoder, variant="base"
        ),
        tokenizers=[tiny.tokenizer],
        frozen={
            "unet": frozen_unet,
            "encoders": {
                "vae": tiny.params["vae"],
                "text_encoders": (tiny.params["text_encoder"],),
                "image_encoder": tiny.params["image_encoder"],
            },
            "alphas_cumprod": alphas_cumprod(**SD_SCHEDULE),
            "vae_scaling_factor": tiny_components.scaling_factor(),
        },
        # The paper's init: K'/V' copied from the frozen K/V; the projection random.
        adapter={"image_proj": tiny.params["image_proj"], "ip_layers": ip_layers_from_unet(frozen_unet)},
    )

