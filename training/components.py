"""What a training run is built from: modules, frozen params, the initial adapter and the tokenizers.

`load(config, workdir)` reads `config.model`: the `tiny` base is built locally (`training.tiny_components`);
a real base is a diffusers model folder plus a CLIP image encoder folder, converted from PyTorch weights.
All params come back as host numpy trees; the train script places them on the mesh.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from ipadapter_jax.adapter import ip_layers_from_unet, split_unet_params
from ipadapter_jax.image_proj import ImageProjModel
from ipadapter_jax.random_init import numpy_init
from training import preprocess, tiny_components
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

    def preprocessor(self, resolution: int) -> preprocess.Preprocessor:
        """Host preprocessing for these encoders: images at `resolution`, ids padded to the tokenizer's length."""
        return preprocess.Preprocessor(
            self.tokenizers, resolution=resolution, max_length=self.tokenizers[0].model_max_length
        )


def alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> np.ndarray:
    """Cumulative alpha products of a DDPM schedule, from diffusers' own Flax scheduler."""
    from diffusers import FlaxDDPMScheduler

    scheduler = FlaxDDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule
    )
    return np.asarray(scheduler.create_state().common.alphas_cumprod, np.float32)


def step_models(config: ml_collections.ConfigDict, unet: nn.Module, image_proj: nn.Module) -> StepModels:
    """The modules the step applies, with `config.model`'s attention kernel and memory options (remat)."""
    unet = unet.clone(
        use_memory_efficient_attention=config.model.memory_efficient_attention,
        attention_implementation=config.model.attention_implementation,
    )
    return StepModels(unet=unet, image_proj=image_proj, remat=config.model.remat)


def load(config: ml_collections.ConfigDict, workdir: str) -> Components:
    """The components `config.model` names; the Flax conversion of a real base is cached in workdir/flax_cache."""
    if config.model.base == "tiny":
        return _tiny(config, workdir)
    return _from_folders(config, workdir)


def _from_folders(config: ml_collections.ConfigDict, workdir: str) -> Components:
    from conversion import diffusers_models
    from conversion.clip import load_clip_image_encoder
    from conversion.ip_adapter_files import load_ip_adapter
    from conversion.unet_config import abstract_ip_unet_params
    from conversion.image_proj import ImageProjSpec, build_image_proj, param_shapes

    base, dtype = config.model.base, jnp.dtype(config.model.dtype)
    cache = os.path.join(workdir, "flax_cache")
    pipe = diffusers_models.load_pipeline(base, dtype=dtype, cache_dir=cache)
    image_encoder, image_encoder_params = load_clip_image_encoder(config.model.image_encoder, dtype=dtype)
    text_models = [pipe.text_encoder] + ([pipe.text_encoder_2] if pipe.text_encoder_2 is not None else [])
    cross = pipe.unet.module.cross_attention_dim
    if config.model.init_adapter:
        spec, image_proj, adapter = load_ip_adapter(
            config.model.init_adapter, abstract_ip_unet_params(pipe.unet.module), encoder_projection_dim=image_encoder.config.projection_dim,
            encoder_hidden_size=image_encoder.config.hidden_size,
        )
        if spec.variant != config.model.variant:
            raise ValueError(f"{config.model.init_adapter} is a {spec.variant} adapter; config says {config.model.variant}")
        image_proj = image_proj.clone(dtype=dtype)
    else:
        if config.model.variant == "base":
            hparams = dict(cross_attention_dim=cross, clip_embeddings_dim=image_encoder.config.projection_dim,
                           num_tokens=config.model.num_tokens)
        else:  # the Plus Resampler of the reference (REFERENCE.md s.1)
            width = 768 if cross == 768 else 1280
            hparams = dict(dim=width, depth=4, heads=width // 64, num_queries=config.model.num_tokens,
                           embedding_dim=image_encoder.config.hidden_size, output_dim=cross, dim_head=64, ff_mult=4)
        image_proj = build_image_proj(ImageProjSpec(config.model.variant, config.model.num_tokens, hparams), dtype)
        adapter = {
            "image_proj": numpy_init(param_shapes(image_proj), seed=config.seed),
            "ip_layers": ip_layers_from_unet(pipe.unet.params),
        }
    schedule = {k: pipe.scheduler.config[k] for k in SD_SCHEDULE}
    return Components(
        models=step_models(config, pipe.unet.module, image_proj),
        encoders=Encoders(
            vae=pipe.vae.module, text_encoders=tuple(m.module.module for m in text_models),
            image_encoder=image_encoder, variant=config.model.variant,
        ),
        tokenizers=[pipe.tokenizer] + ([pipe.tokenizer_2] if pipe.tokenizer_2 is not None else []),
        frozen={
            "unet": pipe.unet.params,
            "encoders": {
                "vae": pipe.vae.params,
                "text_encoders": tuple(m.params for m in text_models),
                "image_encoder": image_encoder_params,
            },
            "alphas_cumprod": alphas_cumprod(**schedule),
            "vae_scaling_factor": np.float32(pipe.vae.module.scaling_factor),
        },
        adapter=adapter,
    )


def _tiny(config: ml_collections.ConfigDict, workdir: str) -> Components:
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
        models=step_models(config, unet, image_proj),
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

