"""The loading API: from files, as PyTorch users have them, to the project's own types.

    from ipadapter_jax.weights import load_adapter, load_base, load_image_encoder

    base = load_base("path/to/stable-diffusion-v1-5")                 # BaseModel (diffusers folder, or "tiny")
    base = load_base("path/to/stable-diffusion-v1-5", loras=[("style.safetensors", 0.8)])   # with a LoRA merged
    image_encoder = load_image_encoder("path/to/image_encoder")        # ImageEncoder (CLIPVisionModelWithProjection)
    adapter = load_adapter("ip-adapter_sd15.safetensors", base, image_encoder=image_encoder)   # Adapter

The pipelines (`IPAdapterPipeline.from_pretrained`), training, the demo and evaluation all load through these
functions; `new_adapter` makes a fresh adapter with the paper's initialisation. "tiny" names the embedded tiny
base and its image encoder (`ipadapter_jax.weights.tiny_base`), shipped with the package.

Every file is checked before anything is built: a file that does not fit (another base model, another image
encoder, a truncated download) raises `ConversionError` naming the file, the key, the expected and found shapes
and the likely cause.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from ipadapter_jax import paths, staging
from ipadapter_jax.choices import SCHEDULERS
from ipadapter_jax.models.adapter import Adapter
from ipadapter_jax.models.base_model import BaseModel
from ipadapter_jax.models.clip_preprocessing import ClipPreprocessing
from ipadapter_jax.models.designs import get_design
from ipadapter_jax.models.image_encoder import ImageEncoder
from ipadapter_jax.models.image_proj import FaceIDPlusProjModel, FaceIDProjModel
from ipadapter_jax.models.random_init import numpy_init
from ipadapter_jax.models.text_encoder import TextEncoder
from ipadapter_jax.models.unet import check_attention_implementation
from ipadapter_jax.weights import flax_cache, known_models, tiny_base
from ipadapter_jax.weights.adapter_files import load_ip_adapter
from ipadapter_jax.weights.clip_image_encoder import load_clip_image_encoder
from ipadapter_jax.weights.diffusers_models import load_pipeline
from ipadapter_jax.weights.flax_adapter_file import SUFFIX as FLAX_ADAPTER_SUFFIX
from ipadapter_jax.weights.flax_adapter_file import load_design_adapter
from ipadapter_jax.weights.image_proj_keys import build_image_proj, param_shapes
from ipadapter_jax.weights.lora import LoraSpec, apply_loras
from ipadapter_jax.weights.torch_layout import ConversionError
from ipadapter_jax.weights.unet_config import abstract_ip_unet_params

TINY = "tiny"


def load_base(
    base: str | os.PathLike,
    *,
    scheduler: str = "ddim",
    dtype: Any = jnp.float32,
    cache_dir: str | os.PathLike | None = None,
    weights_variant: str | None = None,
    attention_implementation: str = "diffusers",
    pytorch_numerics: bool = True,
    progress: bool = True,
    loras: Sequence[LoraSpec] = (),
) -> BaseModel:
    """A Stable Diffusion model folder (SD1.5/SD2 family or SDXL, as diffusers saves it) as a `BaseModel`.

    Args:
      base: a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; SDXL adds
        `text_encoder_2/`, `tokenizer_2/`) with PyTorch weights, or "tiny" (the embedded tiny base).
        `model_index.json`'s `force_zeros_for_empty_prompt` is honoured (default: True for SDXL). A bucket folder
        (gs://) is staged into the local cache first (its component subfolders and top-level JSON files).
      scheduler: the sampling scheduler: "ddim" (the paper's), "dpm-solver++" or "euler", with the folder's
        noise schedule.
      dtype: computation dtype; params stay float32.
      cache_dir: keep the converted Flax params here (later loads skip the conversion). In a bucket (gs://) the
        cache is staged into a local copy, used there, and what a load adds is uploaded (process 0).
      weights_variant: the weight files' variant suffix, e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.
      attention_implementation: the UNet's attention kernel (`ipadapter_jax.models.unet.Attention`).
      pytorch_numerics: the UNet computes as diffusers' PyTorch UNet does (exact GELU, its GroupNorm epsilons);
        False: as diffusers' Flax UNet does (~6e-5 relative from PyTorch).
      progress: a progress bar over the components.
      loras: LoRA files `(path, scale)` (diffusers/peft or kohya `.safetensors`) merged into the UNet and text
        encoder params, in order (`ipadapter_jax.weights.lora.apply_loras`; the Flax cache keeps the base's own).
    Raises:
      ConversionError: a missing or malformed folder, config or weight file, or a LoRA that does not fit.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(sorted(SCHEDULERS))}, got {scheduler!r}")
    check_attention_implementation(attention_implementation)  # before loading gigabytes
    dtype = jnp.dtype(dtype)
    if os.fspath(base) == TINY:
        model = tiny_base.load_base(dtype, SCHEDULERS[scheduler])
    else:
        folder = Path(staging.stage_down(base, what="base model", include=_model_file, progress=progress))
        local_cache = _staged_cache(cache_dir, progress)
        loaded = load_pipeline(
            folder,
            scheduler=SCHEDULERS[scheduler],
            dtype=dtype,
            variant=weights_variant or None,
            cache_dir=None if local_cache is None else Path(local_cache),
            progress=progress,
        )
        if cache_dir is not None and paths.is_remote(cache_dir):
            _upload_cache(local_cache, os.fspath(cache_dir), progress)
        pairs = [(loaded.tokenizer, loaded.text_encoder), (loaded.tokenizer_2, loaded.text_encoder_2)]
        # transformers' Flax CLIP text models are wrappers; the bare linen module is their `.module`.
        encoders = tuple(TextEncoder(tok, model.module.module, model.params) for tok, model in pairs if model)
        force_zeros = _model_index(folder).get("force_zeros_for_empty_prompt", len(encoders) == 2)
        model = BaseModel(
            unet=loaded.unet.module,
            unet_params=loaded.unet.params,
            vae=loaded.vae.module,
            vae_params=loaded.vae.params,
            text_encoders=encoders,
            scheduler=loaded.scheduler,
            scheduler_state=loaded.scheduler_state,
            force_zeros_for_empty_prompt=bool(force_zeros),
        )
    unet = model.unet.clone(attention_implementation=attention_implementation, pytorch_numerics=pytorch_numerics)
    return apply_loras(model.replace(unet=unet), loras)


def load_image_encoder(
    folder: str | os.PathLike, *, dtype: Any = jnp.float32, preprocessor_config: str | os.PathLike | None = None
) -> ImageEncoder:
    """A `CLIPVisionModelWithProjection` folder (`config.json` + safetensors, as `save_pretrained` writes it;
    IP-Adapter's `models/image_encoder`), or "tiny", as an `ImageEncoder` computing in `dtype`.

    Its image preprocessing (`ImageEncoder.image_preprocessing`) comes from `preprocessor_config` (a
    `CLIPImageProcessor` config file; `feature_extractor_config` finds a pipeline folder's), else from the folder's
    own `preprocessor_config.json`, else `CLIPImageProcessor`'s defaults at the encoder's `image_size`.
    Raises:
      ConversionError: a preprocessor config that does not make (image_size, image_size) images, or is not JSON.
    """
    if os.fspath(folder) == TINY:
        return tiny_base.load_image_encoder(jnp.dtype(dtype))
    folder = staging.stage_down(folder, what="image encoder")  # a bucket folder (gs://): from a local copy
    module, params = load_clip_image_encoder(folder, dtype=jnp.dtype(dtype))
    path = Path(preprocessor_config or Path(folder) / "preprocessor_config.json")
    if preprocessor_config is None and not path.is_file():
        return ImageEncoder(module, params)
    try:
        preprocessing = ClipPreprocessing.from_config(json.loads(path.read_text()), source=str(path))
    except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
        raise ConversionError(f"{path}: not a CLIPImageProcessor config ({err})") from None
    size = module.config.image_size
    if preprocessing.output_size() != (size, size):
        raise ConversionError(
            f"{path}: crop_size/size make {preprocessing.output_size() or 'image-dependent'} images; the image "
            f"encoder {folder} takes image_size={size} (expected ({size}, {size}))"
        )
    return ImageEncoder(module, params, preprocessing)


def feature_extractor_config(base: str | os.PathLike) -> Path | None:
    """A diffusers pipeline folder's `feature_extractor/preprocessor_config.json`, or None (none there, or "tiny").
    diffusers preprocesses IP-Adapter image prompts with the pipeline's feature extractor when it has one."""
    if os.fspath(base) == TINY:
        return None
    path = Path(base) / "feature_extractor" / "preprocessor_config.json"
    return path if path.is_file() else None


def load_adapter(
    path: str | os.PathLike,
    base: BaseModel | Any,
    *,
    image_encoder: ImageEncoder | None = None,
    dtype: Any = jnp.float32,
    shortcut_scale: float | None = None,
) -> Adapter:
    """An IP-Adapter file, checked against the base model (and the image encoder, when given).

    Args:
      path: an official `.safetensors` / `.bin` (base, Plus or Full, detected from its keys) or our `.msgpack` (of
        any adapter design, `ipadapter_jax.models.designs`: the file records it).
      base: the `BaseModel` it is for (or its `IPUNet2DConditionModel`): fixes every cross-attention layer's
        id and shape.
      image_encoder: checks the projection's input width against the encoder's outputs.
      dtype: the image projection's computation dtype.
      shortcut_scale: FaceID Plus only: FaceID Plus v2's `shortcut=True` with `s_scale` (identity tokens +
        s_scale * resampler output). None: v2 (scale 1.0) when the file name says "plusv2", else v1 (no shortcut).
      FaceID files also carry a LoRA for the UNet's attention (the adapter's `unet_lora`, added by `unet_params`).
    Raises:
      ConversionError: the file is unreadable or does not fit the UNet or the image encoder.
    """
    unet = base.unet if isinstance(base, BaseModel) else base
    if not hasattr(unet, "cross_attention_dim"):
        raise TypeError(f"load_adapter needs a BaseModel or an IPUNet2DConditionModel, got {type(base).__name__}")
    design = "decoupled"
    if Path(path).suffix == FLAX_ADAPTER_SUFFIX:
        _, image_proj, params, design = load_design_adapter(path, unet)
        if image_encoder is not None:
            _check_encoder_width(path, image_proj, image_encoder)
    else:
        shapes = abstract_ip_unet_params(unet)
        widths = {}
        if image_encoder is not None:
            widths = dict(
                encoder_projection_dim=image_encoder.config.projection_dim,
                encoder_hidden_size=image_encoder.config.hidden_size,
            )
        _, image_proj, params = load_ip_adapter(path, shapes, **widths)
    image_proj = image_proj.clone(dtype=jnp.dtype(dtype))
    if isinstance(image_proj, FaceIDPlusProjModel):
        v2 = "plusv2" in Path(path).name
        image_proj = image_proj.clone(
            shortcut_scale=shortcut_scale if shortcut_scale is not None else (1.0 if v2 else None)
        )
    elif shortcut_scale is not None:
        raise ValueError(
            f"{path}: shortcut_scale (s_scale) is for FaceID Plus adapters, this one is {type(image_proj).__name__}"
        )
    return Adapter(image_proj, params, design)


def new_adapter(
    kind: str,
    base: BaseModel,
    image_encoder: ImageEncoder,
    *,
    num_tokens: int,
    seed: int = 0,
    dtype: Any = jnp.float32,
    design: str = "decoupled",
    face_embed_dim: int = 512,
    shortcut_scale: float | None = None,
    resampler_width: int = 0,
    resampler_depth: int = known_models.RESAMPLER["depth"],
) -> Adapter:
    """A fresh adapter of `design` (`ipadapter_jax.models.designs`) with its init, the paper's for "decoupled": each
    layer's K'/V' a copy of its frozen K/V; the projection random (deterministic in `seed`).

    `kind`: "base" (`num_tokens` tokens from the projected image embedding), "plus" (a Resampler of `num_tokens`
    queries over the penultimate hidden states, the reference's depth 4 / head size 64) or "full" (one token per
    hidden state; `num_tokens` must equal the encoder's 1 + patches), "faceid" / "faceid-plus" (from a
    (face_embed_dim,) identity embedding; `shortcut_scale`: FaceID Plus v2's). A new FaceID adapter has no UNet LoRA.
    `resampler_width` / `resampler_depth`: the Plus Resampler's size (0 / 4: the reference's). The sizes:
    `known_models.image_proj_spec`.
    """
    spec = known_models.image_proj_spec(kind, base.unet.cross_attention_dim, image_encoder.config, num_tokens,
                                        face_embed_dim=face_embed_dim, shortcut_scale=shortcut_scale,
                                        resampler_width=resampler_width, resampler_depth=resampler_depth)  # fmt: skip
    image_proj = build_image_proj(spec, jnp.dtype(dtype))
    params = {
        "image_proj": numpy_init(param_shapes(image_proj), seed=seed),
        "ip_layers": get_design(design).new_layers(base.unet_params),
    }
    return Adapter(image_proj, params, design)


def _model_file(relative: str) -> bool:
    """What staging a base model folder copies: its component subfolders and top-level JSON (not the single-file
    checkpoints some repositories keep next to them)."""
    return "/" in relative or relative.endswith(".json")


def _staged_cache(cache_dir: str | os.PathLike | None, progress: bool) -> str | None:
    """A local Flax cache folder for `cache_dir`: itself, or for a bucket folder its local copy."""
    if cache_dir is None or not paths.is_remote(cache_dir):
        return None if cache_dir is None else os.fspath(cache_dir)
    if paths.exists(cache_dir):
        return staging.stage_down(cache_dir, what="Flax cache", progress=progress)
    os.makedirs(staging.mirror(cache_dir), exist_ok=True)
    return staging.mirror(cache_dir)


def _upload_cache(local: str, url: str, progress: bool) -> None:
    """Uploads the components whose local cache differs from the bucket's (process 0; `cache.json` last)."""
    import jax

    if jax.process_index() != 0:
        return
    for name in sorted(os.listdir(local)):
        info = os.path.join(local, name, flax_cache.CACHE_INFO)
        remote = paths.join(url, name, flax_cache.CACHE_INFO)
        if not os.path.isfile(info) or (paths.exists(remote) and paths.read_bytes(remote) == Path(info).read_bytes()):
            continue
        paths.rmtree(paths.join(url, name))
        staging.upload(os.path.join(local, name), paths.join(url, name), what=f"Flax cache {name}",
                     last=(flax_cache.CACHE_INFO,), progress=progress)  # fmt: skip


def _model_index(folder: Path) -> dict:
    path = folder / "model_index.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None


def _check_encoder_width(path: str | os.PathLike, image_proj: Any, image_encoder: ImageEncoder) -> None:
    """Our msgpack files carry no encoder check of their own: the projection's input width must be the encoder's
    output width for this kind (the official files are checked by `load_ip_adapter`)."""
    config = image_encoder.config
    if isinstance(image_proj, FaceIDProjModel):
        return  # reads identity embeddings, no image encoder output
    field, width, what = {
        "ImageProjModel": ("clip_embeddings_dim", config.projection_dim, "projected image embeddings"),
        "Resampler": ("embedding_dim", config.hidden_size, "hidden states"),
        "MLPProjModel": ("clip_embeddings_dim", config.hidden_size, "hidden states"),
        "FaceIDPlusProjModel": ("clip_embeddings_dim", config.hidden_size, "hidden states"),
    }[type(image_proj).__name__]
    if getattr(image_proj, field) != width:
        raise ConversionError(
            f"{path}: the adapter's image projection reads {getattr(image_proj, field)}-d {what}, but the image "
            f"encoder makes {width}-d ones. Likely cause: an adapter trained with another image encoder."
        )
