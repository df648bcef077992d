"""Published model configs, and the modules and param shapes they make, without weights.

`ipadapter-jax plan` compiles a preset's training step for a TPU topology from shapes alone
(`ipadapter_jax.training.components.abstract_components`). The shapes come from a model folder's config.json files
when `model.base` / `model.image_encoder` name folders, from the embedded tiny base for "tiny", and otherwise from
the published configs of `model.architecture` held here:

- "sd15": `runwayml/stable-diffusion-v1-5` (= `stable-diffusion-v1-5/stable-diffusion-v1-5`): `unet/config.json`,
  `vae/config.json`, `text_encoder/config.json` (OpenAI CLIP ViT-L/14's text tower), `scheduler/scheduler_config.json`;
  image encoder: `h94/IP-Adapter` `models/image_encoder/config.json` (OpenCLIP ViT-H/14, laion2B, as
  `CLIPVisionModelWithProjection`).
- "sdxl": `stabilityai/stable-diffusion-xl-base-1.0`: `unet/`, `vae/`, `text_encoder/` (CLIP ViT-L/14 text),
  `text_encoder_2/` (OpenCLIP ViT-bigG/14 text, with projection), `scheduler/`; image encoder: `h94/IP-Adapter`
  `sdxl_models/image_encoder/config.json` (OpenCLIP ViT-bigG/14 vision).

The dicts keep the fields that fix shapes and computation (bookkeeping entries such as `_diffusers_version`,
`torch_dtype`, dropout rates and initializer ranges are left out; they change neither). Written from those files;
the param counts they give are the published models': SD1.5 UNet 859.52M, text encoder 123.06M, VAE 83.65M, ViT-H/14
632.08M (`tests/plan_test.py`); SDXL UNet 2,567.46M, text encoder 2 694.66M, ViT-bigG/14 1,844.91M (checked once;
too slow to trace in every test run). Adapter shapes: the reference's (`image_proj_spec`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ipadapter_jax import quiet
from ipadapter_jax.choices import ADAPTER_KINDS
from ipadapter_jax.models.adapter import split_unet_params
from ipadapter_jax.models.base_model import BaseModel
from ipadapter_jax.models.image_encoder import CLIPImageEncoder, ImageEncoder
from ipadapter_jax.models.random_init import abstract_params
from ipadapter_jax.models.text_encoder import TextEncoder
from ipadapter_jax.models.unet import IPUNet2DConditionModel
from ipadapter_jax.weights.diffusers_configs import UNET_CONFIG, VAE_CONFIG, module_kwargs, read_json, read_model_config
from ipadapter_jax.weights.diffusers_models import scheduler_from_config
from ipadapter_jax.weights.image_proj_keys import ImageProjSpec
from ipadapter_jax.weights.unet_config import abstract_ip_unet_params

quiet.install()

from diffusers import FlaxAutoencoderKL  # noqa: E402  (after the log filter)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPVisionConfig,
    FlaxCLIPTextModel,
    FlaxCLIPTextModelWithProjection,
)

_SD_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_CLIP_VIT_L14_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
_DDPM_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

SD15 = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "sample_size": 64,
    },
    "vae": _SD_VAE,
    "text_encoders": [_CLIP_VIT_L14_TEXT],
    "scheduler": {"_class_name": "PNDMScheduler", "skip_prk_steps": True, **_DDPM_SCHEDULE},
}

SDXL = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": True,
    },
    "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    "text_encoders": [
        _CLIP_VIT_L14_TEXT,
        {
            **_CLIP_VIT_L14_TEXT,
            "architectures": ["CLIPTextModelWithProjection"],
            "hidden_act": "gelu",
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_attention_heads": 20,
            "num_hidden_layers": 32,
            "projection_dim": 1280,
        },
    ],
    "scheduler": {
        "_class_name": "EulerDiscreteScheduler",
        "interpolation_type": "linear",
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "use_karras_sigmas": False,
        **_DDPM_SCHEDULE,
    },
}

_CLIP_VISION = {"model_type": "clip_vision_model", "hidden_act": "gelu", "image_size": 224, "num_channels": 3}
CLIP_VIT_H14 = {
    **_CLIP_VISION,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 16,
    "num_hidden_layers": 32,
    "patch_size": 14,
    "projection_dim": 1024,
    "layer_norm_eps": 1e-05,
}
CLIP_VIT_BIGG14 = {
    **_CLIP_VISION,
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_attention_heads": 16,
    "num_hidden_layers": 48,
    "patch_size": 14,
    "projection_dim": 1280,
    "layer_norm_eps": 1e-05,
}

# model.architecture -> (the base pipeline's configs, the image encoder of its IP-Adapters).
ARCHITECTURES = {"sd15": (SD15, CLIP_VIT_H14), "sdxl": (SDXL, CLIP_VIT_BIGG14)}

# The Plus Resampler of the reference (REFERENCE.md s.1): width 768 for SD1.5-width UNets, 1280 otherwise.
RESAMPLER = dict(depth=4, dim_head=64, ff_mult=4)


def image_proj_spec(
    kind: str,
    cross_attention_dim: int,
    encoder_config: Any,
    num_tokens: int,
    *,
    face_embed_dim: int = 512,
    shortcut_scale: float | None = None,
    resampler_width: int = 0,
    resampler_depth: int = RESAMPLER["depth"],
) -> ImageProjSpec:
    """The image projection of a new adapter of `kind` for a UNet of `cross_attention_dim` and a CLIP image encoder
    (`encoder_config`: its `CLIPVisionConfig`) as an `ImageProjSpec`: "base" (`num_tokens` tokens from the projected
    image embedding), "plus" (a Resampler of `num_tokens` queries over the penultimate hidden states, the reference's
    depth 4 / head size 64), "full" (one token per hidden state; `num_tokens` must be the encoder's 1 + patches),
    "faceid" (the official `MLPProjModel`: `num_tokens` tokens from a (face_embed_dim,) identity embedding, hidden
    width 2 * face_embed_dim) or "faceid-plus" (`ProjModelFaceIdPlus`: those tokens at the cross-attention width,
    refined by a depth-4 perceiver of cross_attention_dim / 64 heads of 64 over the hidden states; `shortcut_scale`:
    v2's shortcut, None for v1). diffusers' loader builds FaceID Plus projections with 4 tokens.

    The Plus Resampler is `resampler_width` wide (0: the reference's, 768 for a 768-wide cross-attention, else 1280;
    a multiple of the head size 64, which the official file layout implies) and `resampler_depth` layers deep.

    Raises:
      ValueError: an unknown kind, a "full" adapter whose `num_tokens` is not the encoder's token count, or a
        Resampler width that is not a positive multiple of 64.
    """
    cross, encoder = cross_attention_dim, encoder_config
    if kind == "base":
        hparams = dict(cross_attention_dim=cross, clip_embeddings_dim=encoder.projection_dim, num_tokens=num_tokens)
    elif kind == "plus":
        width = resampler_width or (768 if cross == 768 else 1280)
        if width % RESAMPLER["dim_head"] or resampler_depth < 1:
            raise ValueError(
                f"a Resampler needs a width that is a multiple of its head size {RESAMPLER['dim_head']} and a depth "
                f">= 1, got width {width}, depth {resampler_depth}"
            )
        hparams = dict(
            dim=width,
            heads=width // RESAMPLER["dim_head"],
            num_queries=num_tokens,
            embedding_dim=encoder.hidden_size,
            output_dim=cross,
            **dict(RESAMPLER, depth=resampler_depth),
        )
    elif kind == "full":
        tokens = 1 + (encoder.image_size // encoder.patch_size) ** 2
        if num_tokens != tokens:
            raise ValueError(
                f"a full adapter makes one token per hidden state: num_tokens must be {tokens}, got {num_tokens}"
            )
        hparams = dict(cross_attention_dim=cross, clip_embeddings_dim=encoder.hidden_size)
    elif kind == "faceid":
        hparams = dict(cross_attention_dim=cross, id_embeddings_dim=face_embed_dim, num_tokens=num_tokens, mult=2)
    elif kind == "faceid-plus":
        hparams = dict(cross_attention_dim=cross, dim=cross, heads=max(1, cross // RESAMPLER["dim_head"]),
                       clip_embeddings_dim=encoder.hidden_size, id_embeddings_dim=face_embed_dim,
                       num_tokens=num_tokens, depth=4, dim_head=RESAMPLER["dim_head"], ff_mult=4, mult=2,
                       shortcut_scale=shortcut_scale)  # fmt: skip
    else:
        raise ValueError(f"adapter kind must be one of {ADAPTER_KINDS}, got {kind!r}")
    return ImageProjSpec(kind, num_tokens, hparams)


@dataclasses.dataclass(frozen=True)
class ShapeTokenizer:
    """Stands in for a CLIP tokenizer where only the shape of its ids matters (no tokenizer files are read): every
    text becomes `model_max_length` ids of `pad_token_id`, the length the text encoder's positions allow."""

    model_max_length: int = 77
    pad_token_id: int = 1

    def __call__(self, text: Any, **_: Any) -> dict:
        ids = [self.pad_token_id] * self.model_max_length
        return {"input_ids": [ids] * len(text) if isinstance(text, (list, tuple)) else ids}


def abstract(tree: Any) -> Any:
    """Every leaf (a numpy or jax array, or a ShapeDtypeStruct) as a `jax.ShapeDtypeStruct` of its shape and dtype."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x)), tree)


def _dtype(x: Any) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def pipeline_configs(base: str, architecture: str) -> tuple[dict, Path]:
    """{"unet", "vae", "text_encoders": [...], "scheduler"} config dicts of the diffusers folder `base` (its
    config.json files), or of `architecture`'s published model when `base` is ""; and where they come from.

    Raises:
      ConversionError: a missing or invalid config file, or one of another model class.
    """
    if not base:
        return ARCHITECTURES[architecture][0], Path(f"<published {architecture}>")
    folder = Path(base)
    texts = [name for name in ("text_encoder", "text_encoder_2") if (folder / name).is_dir()]
    configs = {
        "unet": read_model_config(folder / "unet", "UNet2DConditionModel"),
        "vae": read_model_config(folder / "vae", "AutoencoderKL"),
        "text_encoders": [read_json(folder / name / "config.json", "the text encoder's config") for name in texts],
        "scheduler": read_json(folder / "scheduler" / "scheduler_config.json", "the scheduler's config"),
    }
    return configs, folder


def abstract_base(base: str, architecture: str, dtype: Any) -> BaseModel:
    """The `BaseModel` of a diffusers folder (`base`), or of `architecture`'s published configs when `base` is "",
    computing in `dtype`, every param a float32 `jax.ShapeDtypeStruct` (nothing read but config files, nothing
    allocated). Modules are built and their configs checked as the loaders do
    (`ipadapter_jax.weights.diffusers_configs.module_kwargs`); tokenizers are `ShapeTokenizer`s.

    Raises:
      ConversionError: a folder's config that the Flax models cannot represent.
    """
    configs, source = pipeline_configs(base, architecture)
    unet = IPUNet2DConditionModel(
        **module_kwargs(IPUNet2DConditionModel, configs["unet"], UNET_CONFIG, source / "unet"), dtype=dtype
    )
    vae = FlaxAutoencoderKL(**module_kwargs(FlaxAutoencoderKL, configs["vae"], VAE_CONFIG, source / "vae"), dtype=dtype)
    text_encoders = []
    for raw in configs["text_encoders"]:
        with_projection = "CLIPTextModelWithProjection" in (raw.get("architectures") or ())
        cls = FlaxCLIPTextModelWithProjection if with_projection else FlaxCLIPTextModel
        wrapper = cls(CLIPTextConfig.from_dict(raw), dtype=dtype, _do_init=False)  # shapes only: no init pass
        tokenizer = ShapeTokenizer(wrapper.config.max_position_embeddings, wrapper.config.pad_token_id)
        text_encoders.append(TextEncoder(tokenizer, wrapper.module, wrapper.params_shape_tree))
    scheduler, state = scheduler_from_config(configs["scheduler"], "ddim", source=str(source / "scheduler"))
    return BaseModel(
        unet=unet,
        unet_params=split_unet_params(abstract_ip_unet_params(unet))[0],
        vae=vae,
        vae_params=jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0)),
        text_encoders=tuple(text_encoders),
        scheduler=scheduler,
        scheduler_state=state,
    )


def abstract_image_encoder(image_encoder: str, architecture: str, dtype: Any) -> ImageEncoder:
    """The `ImageEncoder` of a `CLIPVisionModelWithProjection` folder (its config.json), or of `architecture`'s
    published encoder when `image_encoder` is "", computing in `dtype`, its params float32 `jax.ShapeDtypeStruct`s."""
    if image_encoder:
        config = CLIPVisionConfig.from_pretrained(image_encoder, local_files_only=True)
    else:
        config = CLIPVisionConfig.from_dict(ARCHITECTURES[architecture][1])
    module = CLIPImageEncoder(config, dtype=dtype)
    pixels = np.zeros((1, config.image_size, config.image_size, config.num_channels), np.float32)
    return ImageEncoder(module, abstract_params(module, pixels))
