"""diffusers-format model folders with PyTorch weights -> diffusers/transformers Flax modules and their params.

One function per component folder, plus `load_pipeline` for a whole pipeline folder:

| folder            | config file              | Flax module                                             |
|-------------------|--------------------------|---------------------------------------------------------|
| `unet/`           | config.json              | our `IPUNet2DConditionModel` (params: its frozen part)  |
| `vae/`            | config.json              | diffusers `FlaxAutoencoderKL`                           |
| `text_encoder/`   | config.json              | transformers `FlaxCLIPTextModel`                        |
| `text_encoder_2/` | config.json              | transformers `FlaxCLIPTextModelWithProjection` (SDXL)   |
| `tokenizer*/`     | vocab.json, merges.txt   | transformers `CLIPTokenizer`                            |
| `scheduler/`      | scheduler_config.json    | our `ipadapter_jax.models.schedulers` (DDIM by default) |
| a ControlNet      | config.json              | diffusers `FlaxControlNetModel`                         |

How params are made: the module is built from the folder's config, its param tree's shapes come from
`jax.eval_shape` of its init (nothing is computed), every checkpoint key and shape is checked against that
tree before any tensor is read, then the weights are read tensor by tensor (`ipadapter_jax.weights.weight_files`),
converted by `ipadapter_jax.weights.torch_layout`'s rules and moved to the default device one leaf at a time. Peak host
memory is about one copy of the params plus one tensor (`bench/conversion_bench.py` measures it).

Key maps are our own (diffusers' Flax->PyTorch renamer turns SDXL's `add_embedding.linear_1` into
`add_embedding.linear.1`): UNet and ControlNet keys follow `torch_layout`'s naming rule unchanged; the VAE
renames its attention block (see `vae_key`); transformers' Flax CLIP keeps list indices as their own level
(`layers/0/...`). Fine-tunes of a base model have its keys and shapes, so they load the same way.

With `cache_dir`, converted params are saved with orbax (`ipadapter_jax.weights.flax_cache`) and later runs restore them
instead of converting. Every load returns a `LoadReport` (time, size, dtype, cache use) and logs it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from ipadapter_jax import quiet
from ipadapter_jax.models.adapter import split_unet_params
from ipadapter_jax.models.schedulers import SCHEDULERS, NoiseSchedule, Scheduler
from ipadapter_jax.models.unet import IPUNet2DConditionModel
from ipadapter_jax.weights.component_params import LoadedModel, LoadReport, load_params
from ipadapter_jax.weights.diffusers_configs import (
    CONTROLNET_CONFIG,
    UNET_CONFIG,
    VAE_CONFIG,
    module_kwargs,
    read_json,
    read_model_config,
)
from ipadapter_jax.weights.torch_layout import ConversionError, torch_key_to_flax_module_path

quiet.install()

from diffusers import (  # noqa: E402  (after the log filter)
    FlaxAutoencoderKL,
    FlaxControlNetModel,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTokenizer,
    FlaxCLIPTextModel,
    FlaxCLIPTextModelWithProjection,
)

_TEXT_BUFFERS = ("text_model.embeddings.position_ids",)

# VAE attention block: current diffusers names -> the Flax block's names (which older checkpoints also use).
_VAE_ATTENTION = re.compile(r"(attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.")
_VAE_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@dataclasses.dataclass
class FlaxPipeline:
    """A Stable Diffusion (SD1.5/SD2) or SDXL pipeline folder loaded for Flax.

    `text_encoder_2`/`tokenizer_2` are SDXL's second text encoder (None for SD1.5/SD2). `scheduler_state` is
    the scheduler's training noise schedule (`scheduler.create_state()`), to be passed to its `set_timesteps`.
    """

    unet: LoadedModel
    vae: LoadedModel
    text_encoder: LoadedModel
    tokenizer: CLIPTokenizer
    scheduler: Scheduler
    scheduler_state: NoiseSchedule
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
    `ipadapter_jax.models.adapter.merge_unet_params`; without them the module is diffusers' Flax UNet.

    Args:
      folder: holds `config.json` and the weights (see `ipadapter_jax.weights.weight_files`).
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
    config = read_model_config(folder, "UNet2DConditionModel")
    kwargs = module_kwargs(IPUNet2DConditionModel, config, UNET_CONFIG, folder)
    module = IPUNet2DConditionModel(**kwargs, dtype=dtype)
    frozen, _ = split_unet_params(jax.eval_shape(module.init_weights, jax.random.PRNGKey(0)))
    options = dict(param_dtype=param_dtype, variant=variant, cache_dir=cache_dir, cache_dtype=cache_dtype)
    params, report = load_params(folder, frozen, config=config, **options)
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
    config = read_model_config(folder, "AutoencoderKL")
    module = FlaxAutoencoderKL(**module_kwargs(FlaxAutoencoderKL, config, VAE_CONFIG, folder), dtype=dtype)
    target = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
    options = dict(param_dtype=param_dtype, variant=variant, cache_dir=cache_dir, cache_dtype=cache_dtype)
    params, report = load_params(folder, target, config=config, rename=vae_key, **options)
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
    config = read_model_config(folder, "ControlNetModel")
    kwargs = module_kwargs(FlaxControlNetModel, config, CONTROLNET_CONFIG, folder)
    module = FlaxControlNetModel(**kwargs, dtype=dtype)
    target = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
    options = dict(param_dtype=param_dtype, variant=variant, cache_dir=cache_dir, cache_dtype=cache_dtype)
    params, report = load_params(folder, target, config=config, **options)
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
    raw = read_json(folder / "config.json", "the text encoder's transformers config")
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
    params, report = load_params(folder, joined_target, config=raw, drop=_TEXT_BUFFERS, **options)
    flat = traverse_util.flatten_dict(params)
    return LoadedModel(model, traverse_util.unflatten_dict({original[p]: v for p, v in flat.items()}), report)


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A `CLIPTokenizer` from a local folder (vocab.json, merges.txt, tokenizer_config.json); never downloads."""
    folder = Path(folder)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise ConversionError(f"{folder / name} is missing. Likely cause: not a CLIP tokenizer folder.")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_scheduler(folder: str | Path, kind: str = "ddim") -> tuple[Scheduler, NoiseSchedule]:
    """The scheduler of `kind` (a key of `ipadapter_jax.models.schedulers.SCHEDULERS`) with the settings of
    `folder`'s `scheduler_config.json` (see `scheduler_from_config`). Returns (scheduler, `scheduler.create_state()`).

    Raises:
      ConversionError: the config file is missing or not JSON.
      UnsupportedSchedulerSetting: a setting of the config that the scheduler cannot honour (file, key, value).
    """
    _check_scheduler_kind(kind)
    path = Path(folder) / "scheduler_config.json"
    return scheduler_from_config(read_json(path, "the scheduler's diffusers config"), kind, source=str(path))


def scheduler_from_config(
    config: Mapping[str, Any], kind: str = "ddim", *, source: str = "scheduler config"
) -> tuple[Scheduler, NoiseSchedule]:
    """The scheduler of `kind` behaving as diffusers' PyTorch scheduler of that kind made with `from_config(config)`.

    The config may be of another class (SD1.5 ships PNDM, SDXL Euler): settings the chosen class does not take are
    ignored (they cannot change it), the ones it takes are honoured or refused with `UnsupportedSchedulerSetting`
    naming `source` (the rule: `ipadapter_jax.models.schedulers`' docstring).
    Returns:
      (scheduler, state), with `state = scheduler.create_state()`.
    """
    _check_scheduler_kind(kind)
    scheduler = SCHEDULERS[kind].from_config(config, source=source)
    return scheduler, scheduler.create_state()


def _check_scheduler_kind(kind: str) -> None:
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler kind {kind!r}; one of {sorted(SCHEDULERS)}")


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


def _join_index_levels(path: tuple[str, ...]) -> tuple[str, ...]:
    # ('text_model', 'encoder', 'layers', '0', 'mlp', 'fc1', 'kernel') -> (..., 'layers_0', 'mlp', 'fc1', 'kernel')
    return torch_key_to_flax_module_path(".".join(path[:-1])) + path[-1:]
