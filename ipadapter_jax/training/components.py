"""What a training run is built from: the step's modules, the frozen encoders, the frozen params, the initial
adapter and the tokenizers, loaded through `ipadapter_jax.weights` from `config.model`.

`load`: params come back as host trees (numpy, or single-device arrays from the converters); the run places them
on its mesh (`ipadapter_jax.training.run`). `abstract_components`: the same components with `jax.ShapeDtypeStruct`
params, for compiling the step ahead of time without weights (`ipadapter-jax plan`). Both assemble them with one
function (`_components`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ipadapter_jax import paths
from ipadapter_jax.data import preprocess
from ipadapter_jax.models.adapter import Adapter, split_unet_params
from ipadapter_jax.models.base_model import BaseModel
from ipadapter_jax.models.clip_preprocessing import ClipPreprocessing
from ipadapter_jax.models.designs import get_design
from ipadapter_jax.models.image_encoder import ImageEncoder
from ipadapter_jax.models.scheduler_base import training_alphas_cumprod
from ipadapter_jax.training.config import ModelConfig, TrainConfig
from ipadapter_jax.training.encode import Encoders
from ipadapter_jax.training.step import StepModels
from ipadapter_jax.weights import known_models, load_adapter, load_base, load_image_encoder, new_adapter
from ipadapter_jax.weights.image_proj_keys import build_image_proj, param_shapes
from ipadapter_jax.weights.load import TINY, feature_extractor_config
from ipadapter_jax.weights.unet_config import abstract_ip_unet_params


@dataclasses.dataclass
class Components:
    models: StepModels
    encoders: Encoders
    tokenizers: list[Any]
    frozen: dict  # {"unet", "encoders", "alphas_cumprod", "vae_scaling_factor"} (null encodings added by the run)
    adapter: dict  # initial {"image_proj", "ip_layers"}
    clip: ClipPreprocessing  # the image encoder's preprocessing
    face_embed_dim: int | None = None  # FaceID adapters: the identity embedding's width

    def preprocessor(self, resolution: int, crop: str = "center") -> preprocess.Preprocessor:
        """Host preprocessing for these encoders: images at `resolution` cropped by `crop` (`TARGET_CROPS`), CLIP
        images as the image encoder's preprocessing makes them, ids padded to the tokenizer's length."""
        return preprocess.Preprocessor(
            self.tokenizers,
            resolution=resolution,
            clip=self.clip,
            max_length=self.tokenizers[0].model_max_length,
            crop=crop,
            face_embed_dim=self.face_embed_dim,
        )


def step_models(model: ModelConfig, unet: nn.Module, image_proj: nn.Module) -> StepModels:
    """The modules the step applies, with `model`'s adapter design, attention kernel and memory options (remat)."""
    unet = unet.clone(
        use_memory_efficient_attention=model.memory_efficient_attention,
        attention_implementation=model.attention_implementation,
        pytorch_numerics=model.pytorch_numerics,
        adapter_design=model.design,
    )
    return StepModels(unet=unet, image_proj=image_proj, remat=model.remat)


def projection_options(model: ModelConfig) -> dict:
    """The size settings of a new projection (`known_models.image_proj_spec`): the Plus Resampler's width and depth,
    the FaceID identity embedding's width and FaceID Plus v2's shortcut scale (None: v1)."""
    return dict(
        resampler_width=model.resampler_width,
        resampler_depth=model.resampler_depth,
        face_embed_dim=model.face_embed_dim,
        shortcut_scale=model.faceid_shortcut_scale or None,
    )


def load(config: TrainConfig, workdir: str) -> Components:
    """The components `config.model` names; a real base's Flax conversion is cached in workdir/flax_cache.

    Raises:
      ConfigError: no base model or image encoder given.
      ValueError: `model.init_adapter` is of another kind or design than `model.adapter_kind` / `model.design`,
        or carries a UNet LoRA.
    """
    model, dtype = config.model, jnp.dtype(config.model.dtype)
    model.require_models()
    cache = None if model.base == TINY else paths.join(workdir, "flax_cache")
    base = load_base(model.base, dtype=dtype, cache_dir=cache, weights_variant=model.weights_variant or None)
    image_encoder = load_image_encoder(
        model.image_encoder, dtype=dtype, preprocessor_config=feature_extractor_config(model.base)
    )
    if model.init_adapter:
        adapter = load_adapter(model.init_adapter, base, image_encoder=image_encoder, dtype=dtype,
                               shortcut_scale=projection_options(model)["shortcut_scale"])  # fmt: skip
        for field, ours, wanted in (
            ("adapter_kind", adapter.kind, model.adapter_kind),
            ("design", adapter.design, model.design),
        ):
            if ours != wanted:
                raise ValueError(
                    f"model.init_adapter {model.init_adapter} is an adapter of {field} {ours!r}; model.{field} is "
                    f"{wanted!r}"
                )
        if "unet_lora" in adapter.params:
            raise ValueError(
                f"model.init_adapter {model.init_adapter} carries a UNet LoRA (an official FaceID file): training "
                "updates the projection and K'/V' only, so its export would lose the LoRA; start from a new adapter"
            )
    else:
        adapter = new_adapter(model.adapter_kind, base, image_encoder, num_tokens=model.num_tokens, seed=config.seed,
                              dtype=dtype, design=model.design, **projection_options(model))  # fmt: skip
    return _components(model, base, image_encoder, adapter)


def abstract_components(config: TrainConfig) -> Components:
    """The components `load` makes for `config.model`, with every param and frozen array a `jax.ShapeDtypeStruct`:
    what compiling the step ahead of time needs (`ipadapter_jax.training.plan`), with no weights and nothing allocated.

    Shapes come from `model.base` / `model.image_encoder` when they name folders (their config.json files), from the
    embedded tiny base for "tiny", and from `model.architecture`'s published configs when they are empty
    (`ipadapter_jax.weights.known_models`). The adapter has the shapes of a new one of `model.adapter_kind` with
    `model.num_tokens` tokens and `model.design` (`model.init_adapter`, a file of the same kind, is not read).
    Tokenizers of bases without tokenizer files are `known_models.ShapeTokenizer`s (ids of the right length).

    Raises:
      ConversionError: a folder's config that the Flax models cannot represent.
    """
    model, dtype = config.model, jnp.dtype(config.model.dtype)
    if model.base == TINY:  # 3 MB of weights shipped with the package: load, then keep the shapes
        base = load_base(TINY, dtype=dtype, progress=False)
        encoders = tuple(dataclasses.replace(e, params=known_models.abstract(e.params)) for e in base.text_encoders)
        base = base.replace(vae_params=known_models.abstract(base.vae_params), text_encoders=encoders)
    else:
        base = known_models.abstract_base(model.base, model.architecture, dtype)
    if model.image_encoder == TINY:
        image_encoder = load_image_encoder(TINY, dtype=dtype)
        image_encoder = dataclasses.replace(image_encoder, params=known_models.abstract(image_encoder.params))
    else:
        image_encoder = known_models.abstract_image_encoder(model.image_encoder, model.architecture, dtype)
    design = get_design(model.design)
    ip_unet = base.unet.clone(adapter_design=model.design)
    unet_params, ip_layers = split_unet_params(abstract_ip_unet_params(ip_unet), design.layer_params)
    spec = known_models.image_proj_spec(model.adapter_kind, base.unet.cross_attention_dim, image_encoder.config,
                                        model.num_tokens, **projection_options(model))  # fmt: skip
    image_proj = build_image_proj(spec, dtype)
    adapter = Adapter(image_proj, {"image_proj": param_shapes(image_proj), "ip_layers": ip_layers}, model.design)
    comps = _components(model, base.replace(unet_params=unet_params), image_encoder, adapter)
    comps.frozen = known_models.abstract(comps.frozen)
    return comps


def _components(model: ModelConfig, base: BaseModel, image_encoder: ImageEncoder, adapter: Adapter) -> Components:
    """The step's modules, encoders, frozen params and initial adapter of a base, an image encoder and an adapter
    (concrete or abstract params): one assembly for `load` and `abstract_components`."""
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
            "alphas_cumprod": training_alphas_cumprod(base.scheduler.config),
            "vae_scaling_factor": np.float32(base.vae.config.scaling_factor),
        },
        adapter=adapter.params,
        clip=image_encoder.image_preprocessing,
        face_embed_dim=getattr(adapter.image_proj, "id_embeddings_dim", None),  # FaceID kinds only
    )
