"""What a training run is built from: the step's modules, the frozen encoders, the frozen params, the initial
adapter and the tokenizers, loaded through `ipadapter_jax.weights` from `config.model`.

Params come back as host trees (numpy, or single-device arrays from the converters); the run places them on its
mesh (`ipadapter_jax.training.run`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.data import preprocess
from ipadapter_jax.training.config import ModelConfig, TrainConfig
from ipadapter_jax.training.encode import Encoders
from ipadapter_jax.training.step import StepModels
from ipadapter_jax.weights import load_adapter, load_base, load_image_encoder, new_adapter
from ipadapter_jax.weights.load import TINY


@dataclasses.dataclass
class Components:
    models: StepModels
    encoders: Encoders
    tokenizers: list[Any]
    frozen: dict  # {"unet", "encoders", "alphas_cumprod", "vae_scaling_factor"} (null encodings added by the run)
    adapter: dict  # initial {"image_proj", "ip_layers"}

    def preprocessor(self, resolution: int) -> preprocess.Preprocessor:
        """Host preprocessing for these encoders: images at `resolution`, ids padded to the tokenizer's length."""
        return preprocess.Preprocessor(
            self.tokenizers, resolution=resolution, max_length=self.tokenizers[0].model_max_length
        )


def alphas_cumprod(scheduler_config: Any) -> np.ndarray:
    """Cumulative alpha products of the base's DDPM training schedule (its scheduler config's betas), computed by
    diffusers' own Flax scheduler."""
    from diffusers import FlaxDDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    settings = {key: scheduler_config[key] for key in keys if scheduler_config.get(key) is not None}
    return np.asarray(FlaxDDPMScheduler(**settings).create_state().common.alphas_cumprod, np.float32)


def step_models(model: ModelConfig, unet: nn.Module, image_proj: nn.Module) -> StepModels:
    """The modules the step applies, with `model`'s attention kernel and memory options (remat)."""
    unet = unet.clone(
        use_memory_efficient_attention=model.memory_efficient_attention,
        attention_implementation=model.attention_implementation,
    )
    return StepModels(unet=unet, image_proj=image_proj, remat=model.remat)


def load(config: TrainConfig, workdir: str) -> Components:
    """The components `config.model` names; a real base's Flax conversion is cached in workdir/flax_cache.

    Raises:
      ConfigError: no base model or image encoder given.
      ValueError: `model.init_adapter` is of another kind than `model.adapter_kind`.
    """
    model, dtype = config.model, jnp.dtype(config.model.dtype)
    model.require_models()
    cache = None if model.base == TINY else os.path.join(workdir, "flax_cache")
    base = load_base(model.base, dtype=dtype, cache_dir=cache, weights_variant=model.weights_variant or None)
    image_encoder = load_image_encoder(model.image_encoder, dtype=dtype)
    if model.init_adapter:
        adapter = load_adapter(model.init_adapter, base, image_encoder=image_encoder, dtype=dtype)
        if adapter.kind != model.adapter_kind:
            raise ValueError(
                f"model.init_adapter {model.init_adapter} is a {adapter.kind} adapter; model.adapter_kind is "
                f"{model.adapter_kind!r}"
            )
    else:
        adapter = new_adapter(
            model.adapter_kind, base, image_encoder, num_tokens=model.num_tokens, seed=config.seed, dtype=dtype
        )
    return Components(
        models=step_models(model, base.unet, adapter.image_proj),
        encoders=Encoders(
            vae=base.vae,
            text_encoders=tuple(encoder.module for encoder in base.text_encoders),
            image_encoder=image_encoder.module,
            kind=adapter.kind,
        ),
        tokenizers=[encoder.tokenizer for encoder in base.text_encoders],
        frozen={
            "unet": base.unet_params,
            "encoders": {
                "vae": base.vae_params,
                "text_encoders": tuple(encoder.params for encoder in base.text_encoders),
                "image_encoder": image_encoder.params,
            },
            "alphas_cumprod": alphas_cumprod(base.scheduler.config),
            "vae_scaling_factor": np.float32(base.vae.config.scaling_factor),
        },
        adapter=adapter.params,
    )
