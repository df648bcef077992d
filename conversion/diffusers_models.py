"""diffusers-format model folders with PyTorch weights -> diffusers/transformers Flax modules and their params.

One function per component folder, plus `load_pipeline` for a whole pipeline folder:

| folder            | config file              | Flax module                                             |
|-------------------|--------------------------|---------------------------------------------------------|
| `unet/`           | config.json              | our `IPUNet2DConditionModel` (params: its frozen part)  |
| `vae/`            | config.json              | diffusers `FlaxAutoencoderKL`                           |
| `text_encoder/`   | config.json              | transformers `FlaxCLIPTextModel`                        |
| `text_encoder_2/` | config.json              | transformers `FlaxCLIPTextModelWithProjection` (SDXL)   |
| `tokenizer*/`     | vocab.json, merges.txt   | transformers `CLIPTokenizer`                            |
| `scheduler/`      | scheduler_config.json    | a diffusers Flax scheduler (DDIM by default)            |
| a ControlNet      | config.json              | diffusers `FlaxControlNetModel`                         |

How params are made: the module is built from the folder's config, its param tree's shapes come from
`jax.eval_shape` of its init (nothing is computed), every checkpoint key and shape is checked against that
tree before any tensor is read, then the weights are read tensor by tensor (`conversion.weight_files`),
converted by `conversion.torch_layout`'s rules and moved to the default device one leaf at a time. Peak host
memory is about one copy of the params plus one tensor (`bench/conversion_bench.py` measures it).

Key maps are our own (diffusers' Flax->PyTorch renamer turns SDXL's `add_embedding.linear_1` into
`add_embedding.linear.1`): UNet and ControlNet keys follow `torch_layout`'s naming rule unchanged; the VAE
renames its attention block (see `vae_key`); transformers' Flax CLIP keeps list indices as their own level
(`layers/0/...`). Fine-tunes of a base model have its keys and shapes, so they load the same way.

With `cache_dir`, converted params are saved with orbax (`conversion.flax_cache`) and later runs restore them
instead of converting. Every load returns a `LoadReport` (time, size, dtype, cache use) and logs it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from conversion import flax_cache
from conversion.torch_layout import ConversionError, torch_key_to_flax_module_path, torch_state_to_flax
from conversion.weight_files import LazyStateDict, find_weight_file, open_state_dict
from ipadapter_jax import quiet
from ipadapter_jax.adapter import split_unet_params
from ipadapter_jax.unet import IPUNet2DConditionModel

quiet.install()

from diffusers import (  # noqa: E402  (after the log filter)
    FlaxAutoencoderKL,
    FlaxControlNetModel,
    FlaxDDIMScheduler,
    FlaxDDPMScheduler,
    FlaxDPMSolverMultistepScheduler,
    FlaxEulerDiscreteScheduler,
    FlaxLMSDiscreteScheduler,
    FlaxPNDMScheduler,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTokenizer,
    FlaxCLIPTextModel,
    FlaxCLIPTextModelWithProjection,
)

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": FlaxDDIMScheduler,
    "ddpm": FlaxDDPMScheduler,
    "pndm": FlaxPNDMScheduler,
    "lms": FlaxLMSDiscreteScheduler,
    "euler": FlaxEulerDiscreteScheduler,
    "dpm_solver_multistep": FlaxDPMSolverMultistepScheduler,
}


def _only(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: value in allowed


def _all_in(*allowed: Any) -> Callable[[Any], bool]:
    return lambda values: all(v in allowed for v in values)


# PyTorch config fields that diffusers' Flax models do not implement, with the values under which the Flax model
# computes the same function. Any other value would load (or fail on shapes) and silently compute something
# else, so it is refused. Left out on purpose: `upcast_attention` (SD2.1 sets it; it only changes fp16 overflow
# behaviour) and VAE `force_upcast` (a pipeline hint).
_SD_CONFIG = {
    "act_fn": _only("silu"),
    "norm_num_groups": _only(32),
    "norm_eps": _only(1e-5),
    "downsample_padding": _only(1),
    "mid_block_scale_factor": _only(1),
    "class_embed_type": _only(None),
    "num_class_embeds": _only(None),
    "encoder_hid_dim": _only(None),
    "encoder_hid_dim_type": _only(None),
    "resnet_time_scale_shift": _only("default"),
    "down_block_types": _all_in("CrossAttnDownBlock2D", "DownBlock2D"),
}
_UNET_CONFIG = {
    **_SD_CONFIG,
    "up_block_types": _all_in("CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": _only("UNetMidBlock2DCrossAttn", None),
    "center_input_sample": _only(False),
    "dual_cross_attention": _only(False),
    "resnet_skip_time_act": _only(False),
    "resnet_out_scale_factor": _only(1, 1.0),
    "time_embedding_type": _only("positional"),
    "time_embedding_dim": _only(None),
    "time_embedding_act_fn": _only(None),
    "timestep_post_act": _only(None),
    "time_cond_proj_dim": _only(None),
    "conv_in_kernel": _only(3),
    "conv_out_kernel": _only(3),
    "attention_type": _only("default"),
    "class_embeddings_concat": _only(False),
    "mid_block_only_cross_attention": _only(None, False),
    "cross_attention_norm": _only(None),
    "reverse_transformer_layers_per_block": _only(None),
}
_CONTROLNET_CONFIG = {
    **_SD_CONFIG,
    "conditioning_channels": _only(3),
    "mid_block_type": _only("UNetMidBlock2DCrossAttn"),
    "transformer_layers_per_block": lambda v: v == 1 or (isinstance(v, list) and set(v) == {1}),
    "addition_embed_type": _only(None),  # SDXL ControlNets: diffusers' Flax ControlNet has no text_time embedding
    "global_pool_conditions": _only(False),
}
_VAE_CONFIG = {
    "act_fn": _only("silu"),
    "down_block_types": _all_in("DownEncoderBlock2D"),
    "up_block_types": _all_in("UpDecoderBlock2D"),
    "use_quant_conv": _only(True),
    "use_post_quant_conv": _only(True),
    "mid_block_add_attention": _only(True),
    "shift_factor": _only(None),
    "latents_mean": _only(None),
    "latents_std": _only(None),
}

# Buffers (not parameters) that checkpoints of older transformers versions hold; the Flax model recomputes them.
_TEXT_BUFFERS = ("text_model.embeddings.position_ids",)

# VAE attention block: current diffusers names -> the Flax block's names (which older checkpoints also use).
_VAE_ATTENTION = re.compile(r"(attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.")
_VAE_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What loading one component did: sizes, dtypes, times (seconds) and the Flax cache's use.

    `cache` is "off" (no cache_dir), "saved" (converted now, then saved) or "restored" (no conversion).
    """

    folder: str
    weights: str
    num_params: int
    param_dtype: str
    param_bytes: int
    cache: str = "off"
    convert_s: float | None = None
    cache_s: float | None = None
    cache_dir: str | None = None
    stored_dtype: str | None = None
    stored_bytes: int | None = None

    def summary(self) -> str:
        """One line for logs and CLIs."""
        size = f"{self.param_bytes / 2**20:.1f} MiB"
        line = f"{self.folder}: {self.num_params:,} params, {self.param_dtype}, {size}"
        if self.convert_s is not None:
            line += f"; converted from {Path(self.weights).name} in {self.convert_s:.2f} s"
        if self.cache != "off":
            verb = "restored from" if self.cache == "restored" else "saved to"
            line += (
                f"; {verb} Flax cache {self.cache_dir} in {self.cache_s:.2f} s "
                f"({self.stored_dtype}, {self.stored_bytes / 2**20:.1f} MiB on disk)"
            )
        return line


@dataclasses.dataclass
class LoadedModel:
    """A Flax model and its params (a nested dict of device arrays), with the report of how they were loaded.

    `module` is what the params are applied with: diffusers' Flax models are linen modules
    (`module.apply({"params": params}, ...)`); transformers' CLIP text encoders are their Flax wrapper,
    created without an init pass (`module(input_ids, params=params)`).
    """

    module: Any
    params: dict
    report: LoadReport


@dataclasses.dataclass
class FlaxPipeline:
    """A Stable Diffusion (SD1.5/SD2) or SDXL pipeline folder loaded for Flax.

    `text_encoder_2`/`tokenizer_2` are SDXL's second text encoder (None for SD1.5/SD2). `scheduler_state` is
    the Flax scheduler's state (`scheduler.create_state()`), to be passed to its methods.
    """

    unet: LoadedModel
    vae: LoadedModel
    text_encoder: LoadedModel
    tokenizer: CLIPTokenizer
    scheduler: Any
    scheduler_state: Any
    text_encoder_2: LoadedModel | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def reports(self) -> list[LoadReport]:
        """The load report of each model in the pipeline."""
        models = (self.unet, self.vae, self.text_encoder, self.text_encoder_2)
        return [m.report for m in models if m is not None]


def load_unet(
    folder: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: Any = np.float32,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    cache_dtype: Any = None,
) -> LoadedModel:
    """A diffusers `UNet2DConditionModel` folder (SD1.5, SD2, SDXL shapes) as our `IPUNet2DConditionModel`.

    The params are the frozen UNet's (no `to_k_ip`/`to_v_ip`): merge an adapter's `ip_layers` with
    `ipadapter_jax.adapter.merge_unet_params`; without them the module is diffusers' Flax UNet.

    Args:
      folder: holds `config.json` and the weights (see `conversion.weight_files`).
      dtype: the module's computation dtype.
      param_dtype: the params' dtype (checkpoints stored in fp16 are cast).
      variant: weight file variant, e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.
      cache_dir: this component's Flax cache folder (created); None: no cache.
      cache_dtype: dtype the cache stores (e.g. jnp.bfloat16 halves it); None: `param_dtype`. With a
        narrower dtype the first run also returns the rounded params, so every run gets the same values.
    Returns:
      `LoadedModel`; `module.apply({"params": params}, sample (B, C, H, W), timesteps (B,),
      encoder_hidden_states (B, T, cross_attention_dim), ...)`.
    Raises:
      ConversionError: missing/invalid config or weights, a config the Flax UNet cannot represent, or weights
        that do not fit the config (every mismatching key with expected and found shapes).
    """
    folder = Path(folder)
    config = _read_model_config(folder, "UNet2DConditionModel")
    kwargs = _module_kwargs(IPUNet2DConditionModel, config, _UNET_CONFIG, folder)
    module = IPUNet2DConditionModel(**kwargs, dtype=dtype)
    frozen, _ = split_unet_params(jax.eval_shape(module.init_weights, jax.random.PRNGKey(0)))
    options = dict(param_dtype=param_dtype, variant=variant, cache_dir=cache_dir, cache_dtype=cache_dtype)
    params, report = _load_params(folder, frozen, config=config, **options)
    return LoadedModel(module, params, report)


def load_vae(
    folder: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: Any = np.float32,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    cache_dtype: Any = None,
) -> LoadedModel:
    """A diffusers `AutoencoderKL` folder as diffusers' `FlaxAutoencoderKL`.

    Arguments as `load_unet`. `module.apply({"params": p}, images (B, 3, H, W), method=module.encode)
    .latent_dist` has NHWC moments (B, H/8, W/8, latent_channels); `method=module.decode` takes NCHW or NHWC
    latents and returns `.sample` (B, 3, H, W).
    """
    folder = Path(folder)
    config = _read_model_config(folder, "AutoencoderKL")
    module = FlaxAutoencoderKL(**_module_kwargs(FlaxAutoencoderKL, config, _VAE_CONFIG, folder), dtype=dtype)
    target = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
    options = dict(param_dtype=param_dtype, variant=variant, cache_dir=cache_dir, cache_dtype=cache_dtype)
    params, report = _load_params(folder, target, config=config, rename=vae_key, **options)
    return LoadedModel(module, params, report)


def load_controlnet(
    folder: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: Any = np.float32,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    cache_dtype: Any = None,
) -> LoadedModel:
    """A diffusers `ControlNetModel` folder (SD1.5/SD2 shapes) as diffusers' `FlaxControlNetModel`.

    Arguments as `load_unet`. `module.apply({"params": p}, sample (B, 4, h, w), timesteps, text (B, T, D),
    controlnet_cond (B, 3, 8h, 8w))` gives `.down_block_res_samples` and `.mid_block_res_sample` for the UNet.
    SDXL ControlNets are refused: diffusers' Flax ControlNet has no SDXL (text_time) conditioning.
    """
    folder = Path(folder)
    config = _read_model_config(folder, "ControlNetModel")
    kwargs = _module_kwargs(FlaxControlNetModel, config, _CONTROLNET_CONFIG, folder)
    module = FlaxControlNetModel(**kwargs, dtype=dtype)
    target = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
    options = dict(param_dtype=param_dtype, variant=variant, cache_dir=cache_dir, cache_dtype=cache_dtype)
    params, report = _load_params(folder, target, config=config, **options)
    return LoadedModel(module, params, report)


def load_text_encoder(
    folder: str | Path,
    *,
    with_projection: bool | None = None,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: Any = np.float32,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    cache_dtype: Any = None,
) -> LoadedModel:
    """A transformers `CLIPTextModel` / `CLIPTextModelWithProjection` folder as its Flax twin.

    Args:
      with_projection: build `FlaxCLIPTextModelWithProjection` (SDXL's `text_encoder_2`); None: as the
        config's `architectures` says.
      Others as `load_unet`.
    Returns:
      `LoadedModel` whose module is the transformers wrapper: `module(input_ids (B, T), params=params,
      output_hidden_states=True)` gives `last_hidden_state` (B, T, hidden), `hidden_states` and
      `pooler_output` (B, hidden), or with projection `text_embeds` (B, projection_dim).
    """
    folder = Path(folder)
    raw = _read_json(folder / "config.json", "the text encoder's transformers config")
    if raw.get("model_type") != "clip_text_model":
        raise ConversionError(
            f"{folder / 'config.json'}: model_type is {raw.get('model_type')!r}, expected 'clip_text_model'. "
            "Likely cause: the wrong folder (a text encoder folder holds a CLIPTextModel)."
        )
    if with_projection is None:
        with_projection = "CLIPTextModelWithProjection" in (raw.get("architectures") or ())
    cls = FlaxCLIPTextModelWithProjection if with_projection else FlaxCLIPTextModel
    model = cls(CLIPTextConfig.from_dict(raw), dtype=dtype, _do_init=False)  # shapes only: no init pass
    # transformers' Flax CLIP names list members `layers/0/...`; torch_layout's rule gives `layers_0`:
    # convert against the joined form of the target, then put the original paths back.
    target = traverse_util.flatten_dict(model.params_shape_tree)
    original = {_join_index_levels(path): path for path in target}
    joined_target = traverse_util.unflatten_dict({_join_index_levels(path): leaf for path, leaf in target.items()})
    options = dict(param_dtype=param_dtype, variant=variant, cache_dir=cache_dir, cache_dtype=cache_dtype)
    params, report = _load_params(folder, joined_target, config=raw, drop=_TEXT_BUFFERS, **options)
    flat = traverse_util.flatten_dict(params)
    return LoadedModel(model, traverse_util.unflatten_dict({original[p]: v for p, v in flat.items()}), report)


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A `CLIPTokenizer` from a local folder (vocab.json, merges.txt, tokenizer_config.json); never downloads."""
    folder = Path(folder)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise ConversionError(f"{folder / name} is missing. Likely cause: not a CLIP tokenizer folder.")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_scheduler(folder: str | Path, kind: str = "ddim") -> tuple[Any, Any]:
    """A diffusers Flax scheduler of `kind` (a key of `SCHEDULERS`) with the noise schedule of `folder`'s config.

    The folder's `scheduler_config.json` may be of another class (SD1.5 ships PNDM, SDXL Euler): the settings the
    chosen class takes (betas, prediction type, steps offset, clipping...) are carried over, the rest is
    logged and ignored.
    Returns:
      (scheduler, state), with `state = scheduler.create_state()`.
    """
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler kind {kind!r}; one of {sorted(SCHEDULERS)}")
    path = Path(folder) / "scheduler_config.json"
    config = _read_json(path, "the scheduler's diffusers config")
    cls = SCHEDULERS[kind]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "dtype"}
    kwargs = {k: v for k, v in config.items() if k in accepted}
    if kwargs.get("trained_betas") is not None:
        kwargs["trained_betas"] = jnp.asarray(kwargs["trained_betas"], jnp.float32)
    ignored = sorted(k for k in config if k not in accepted and not k.startswith("_"))
    if ignored:
        logger.info("%s: %s does not take %s; ignored", path, cls.__name__, ", ".join(ignored))
    scheduler = cls(**kwargs)
    if "steps_offset" not in accepted:
        # diffusers' Flax DPM-Solver reads config.steps_offset for "leading" spacing (SDXL's) but does not take
        # it as an argument: record the folder's value in its config.
        scheduler.register_to_config(steps_offset=config.get("steps_offset", 0))
    return scheduler, scheduler.create_state()


def load_pipeline(
    folder: str | Path,
    *,
    scheduler: str = "ddim",
    dtype: jnp.dtype = jnp.float32,
    param_dtype: Any = np.float32,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    cache_dtype: Any = None,
    progress: bool = True,
) -> FlaxPipeline:
    """A diffusers Stable Diffusion / SDXL pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
    `scheduler/`, and for SDXL `text_encoder_2/`, `tokenizer_2/`) loaded for Flax, with a progress bar.

    Args:
      scheduler: the Flax scheduler kind (see `load_scheduler`).
      cache_dir: root of the Flax cache: each model is cached in `cache_dir/<subfolder>`.
      progress: show a tqdm bar over the components.
      Others as `load_unet`, applied to every model.
    Raises:
      ConversionError: a required subfolder is missing, or any component fails to load.
    """
    folder = Path(folder)
    required = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    missing = [name for name in required if not (folder / name).is_dir()]
    if missing:
        raise ConversionError(
            f"{folder}: missing subfolder(s) {', '.join(missing)}. Likely cause: not a diffusers pipeline folder "
            "(for a single model, use load_unet/load_vae/... on its folder)."
        )
    sdxl = (folder / "text_encoder_2").is_dir()
    options = dict(dtype=dtype, param_dtype=param_dtype, variant=variant, cache_dtype=cache_dtype)

    def model(load: Callable[..., LoadedModel], name: str) -> Callable[[], LoadedModel]:
        cache = None if cache_dir is None else Path(cache_dir) / name
        return lambda: load(folder / name, cache_dir=cache, **options)

    steps: list[tuple[str, Callable[[], Any]]] = [
        ("text_encoder", model(load_text_encoder, "text_encoder")),
        ("tokenizer", lambda: load_tokenizer(folder / "tokenizer")),
        ("unet", model(load_unet, "unet")),
        ("vae", model(load_vae, "vae")),
        ("scheduler", lambda: load_scheduler(folder / "scheduler", scheduler)),
    ]
    if sdxl:
        steps += [
            ("text_encoder_2", model(load_text_encoder, "text_encoder_2")),
            ("tokenizer_2", lambda: load_tokenizer(folder / "tokenizer_2")),
        ]
    loaded = {}
    with tqdm(steps, desc=f"loading {folder.name}", unit="component", disable=not progress) as bar:
        for name, load in bar:
            bar.set_postfix_str(name)
            loaded[name] = load()
    scheduler_module, scheduler_state = loaded.pop("scheduler")
    return FlaxPipeline(scheduler=scheduler_module, scheduler_state=scheduler_state, **loaded)


def vae_key(key: str) -> str:
    """A PyTorch VAE key -> the key whose generic Flax path is `FlaxAutoencoderKL`'s.

    The attention block's projections are `to_q/to_k/to_v/to_out.0` in current diffusers and
    `query/key/value/proj_attn` in Flax and in checkpoints written before diffusers 0.14 (kept as they are);
    `group_norm` has one name everywhere.
    """
    return _VAE_ATTENTION.sub(lambda m: f"{m[1]}.{_VAE_ATTENTION_NAMES[m[2]]}.", key)


def _load_params(
    folder: Path,
    target: Any,
    *,
    config: dict,
    param_dtype: Any,
    variant: str | None,
    cache_dir: str | Path | None,
    cache_dtype: Any,
    rename: Callable[[str], str] | None = None,
    drop: tuple[str, ...] = (),
) -> tuple[dict, LoadReport]:
    """Params for `target` from the folder's weights, or from the Flax cache when it is fresh."""
    param_dtype = np.dtype(param_dtype)
    stored_dtype = np.dtype(cache_dtype or param_dtype)
    num_params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(target))
    weights = find_weight_file(folder, variant)
    base = dict(
        folder=str(folder),
        weights=str(weights),
        num_params=num_params,
        param_dtype=param_dtype.name,
        param_bytes=num_params * param_dtype.itemsize,
    )

    key = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        key = flax_cache.fingerprint(
            config, _weight_files(weights), param_dtype=param_dtype.name, stored_dtype=stored_dtype.name
        )
        start = time.perf_counter()
        params = flax_cache.restore(cache_dir, target, fingerprint=key, dtype=param_dtype)
        if params is not None:
            info = flax_cache.read_info(cache_dir)
            cached = dict(
                cache_dir=str(cache_dir), stored_dtype=info["stored_dtype"], stored_bytes=info["stored_bytes"]
            )
            report = LoadReport(**base, cache="restored", cache_s=time.perf_counter() - start, **cached)
            logger.info(report.summary())
            return params, report

    start = time.perf_counter()
    state = open_state_dict(folder, variant).without(drop)
    params = _convert(state, target, rename=rename, param_dtype=param_dtype)
    convert_s = time.perf_counter() - start
    if cache_dir is None:
        report = LoadReport(**base, convert_s=convert_s)
    else:
        start = time.perf_counter()
        about = {"source": str(weights), "num_params": num_params, "param_dtype": param_dtype.name}
        info = flax_cache.save(cache_dir, params, fingerprint=key, info=about, stored_dtype=stored_dtype)
        if stored_dtype != param_dtype:
            # Return what later runs will restore (rounded to the stored dtype), not the unrounded conversion.
            del params
            params = flax_cache.restore(cache_dir, target, fingerprint=key, dtype=param_dtype)
        cached = dict(cache_dir=str(cache_dir), stored_dtype=info["stored_dtype"], stored_bytes=info["stored_bytes"])
        report = LoadReport(**base, cache="saved", convert_s=convert_s, cache_s=time.perf_counter() - start, **cached)
    logger.info(report.summary())
    return params, report


def _convert(state: LazyStateDict, target: Any, *, rename: Callable[[str], str] | None, param_dtype: np.dtype) -> dict:
    source = str(state.source)
    try:
        # Keys and shapes first, on zero-memory placeholders: a wrong file fails before any tensor is read.
        torch_state_to_flax(state.placeholders(), target, source=source, rename=rename)
    except ConversionError as err:
        raise ConversionError(
            f"{err}; likely cause: the weights were saved for a different model than "
            f"{state.source.parent / 'config.json'} describes (e.g. SD1.5 weights with an SDXL config, or another "
            "component's weights), or the checkpoint is incomplete."
        ) from None
    # Cast here rather than in torch_state_to_flax: `np.asarray` copies only when the dtype changes (astype
    # always copies: +6 s on an SD1.5 UNet). Flattened at once so the nested numpy tree is not kept: each leaf
    # below is replaced by its device copy and its host array freed, so host memory holds about one copy of
    # the params at any time.
    converted = torch_state_to_flax(state, target, source=source, rename=rename)
    flat = traverse_util.flatten_dict(converted)
    del converted
    for path in flat:
        flat[path] = jax.device_put(np.asarray(flat[path], dtype=param_dtype))
    return traverse_util.unflatten_dict(flat)


def _weight_files(weights: Path) -> list[Path]:
    # The files whose change must invalidate a cache: the weight file, or the index and every shard it lists.
    if not weights.name.endswith(".index.json"):
        return [weights]
    try:
        shards = set(json.loads(weights.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return [weights]  # a broken index: the conversion that follows reports it
    return [weights] + [weights.parent / shard for shard in sorted(shards) if (weights.parent / shard).is_file()]


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(
            f"{path} is missing ({what}). Likely cause: not a diffusers model folder (pass the component's own "
            "folder, e.g. <pipeline>/unet), or an incomplete download."
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: not valid JSON ({err}). Likely cause: a damaged file.") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def _read_model_config(folder: Path, class_name: str) -> dict:
    config = _read_json(folder / "config.json", f"the {class_name}'s diffusers config")
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise ConversionError(
            f"{folder / 'config.json'} describes a {found}, expected a {class_name}. Likely cause: the wrong "
            "component folder."
        )
    return config


def _module_kwargs(cls: type, config: Mapping[str, Any], supported: Mapping[str, Callable], folder: Path) -> dict:
    """The Flax module's constructor arguments from a PyTorch config; refuses settings it cannot represent."""
    unsupported = [f"{k}={config[k]!r}" for k, ok in supported.items() if k in config and not ok(config[k])]
    if unsupported:
        raise ConversionError(
            f"{folder / 'config.json'}: diffusers' {cls.__name__} cannot represent {', '.join(unsupported)}. "
            "Likely cause: not a Stable Diffusion 1.x/2.x/XL-family model."
        )
    fields = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name", "dtype"}
    # JSON lists -> tuples: module attributes must be hashable.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}


def _join_index_levels(path: tuple[str, ...]) -> tuple[str, ...]:
    # ('text_model', 'encoder', 'layers', '0', 'mlp', 'fc1', 'kernel') -> (..., 'layers_0', 'mlp', 'fc1', 'kernel')
    return torch_key_to_flax_module_path(".".join(path[:-1])) + path[-1:]
