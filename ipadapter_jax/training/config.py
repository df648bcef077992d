"""The training config, typed: what `training/configs/*.py` (an `ml_collections.ConfigDict`) means, validated once.

Config files and `--config.x.y=v` overrides stay ConfigDicts at the command line's edge (`ml_collections`'
override syntax); `TrainConfig.from_config_dict` checks every field (type, range, choices, unknown names) and
returns frozen dataclasses, which the library then uses. An invalid field is a `ConfigError` naming the field,
the value and what is allowed, raised before anything is loaded or compiled.

Fields and defaults: `training/configs/default.py` (the reference recipe, REFERENCE.md s.3).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ipadapter_jax.choices import ADAPTER_DESIGNS, ADAPTER_KINDS, ATTENTION_IMPLEMENTATIONS, DTYPES, TARGET_CROPS

PREDICTION_TYPES = ("epsilon", "v_prediction")
# The published model families whose shapes `ipadapter_jax.weights.known_models` holds (`model.architecture`).
ARCHITECTURES = ("sd15", "sdxl")
ON_NONFINITE = ("stop", "skip")


class ConfigError(ValueError):
    """An invalid training config field (the message names it): the command line's exit status 2."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The base model, the image encoder and the adapter to train (`config.model`)."""

    base: str = ""
    image_encoder: str = ""
    architecture: str = "sd15"
    weights_variant: str = ""
    adapter_kind: str = "base"
    num_tokens: int = 4
    face_embed_dim: int = 512
    faceid_shortcut_scale: float = 0.0
    design: str = "decoupled"
    resampler_width: int = 0
    resampler_depth: int = 4
    init_adapter: str = ""
    prediction_type: str = "epsilon"
    dtype: str = "bfloat16"
    remat: bool = False
    memory_efficient_attention: bool = False
    attention_implementation: str = "diffusers"
    pytorch_numerics: bool = True

    def validate(self) -> None:
        """Checks every field; `base` and `image_encoder` may be empty (a preset's shapes), `require_models`
        checks them where models are loaded."""
        _choice(self.architecture, ARCHITECTURES, "model.architecture")
        _choice(self.adapter_kind, ADAPTER_KINDS, "model.adapter_kind")
        _choice(self.design, ADAPTER_DESIGNS, "model.design")
        _at_least(self.num_tokens, 1, "model.num_tokens")
        _at_least(self.face_embed_dim, 1, "model.face_embed_dim")
        _at_least(self.faceid_shortcut_scale, 0.0, "model.faceid_shortcut_scale")
        if self.faceid_shortcut_scale and self.adapter_kind != "faceid-plus":
            raise ConfigError(
                f"model.faceid_shortcut_scale is FaceID Plus v2's shortcut: it needs model.adapter_kind='faceid-plus', "
                f"got {self.adapter_kind!r}"
            )
        _at_least(self.resampler_width, 0, "model.resampler_width")
        if self.resampler_width % 64:
            raise ConfigError(
                f"model.resampler_width must be 0 (the reference's) or a multiple of the head size 64, "
                f"got {self.resampler_width}"
            )
        _at_least(self.resampler_depth, 1, "model.resampler_depth")
        _choice(self.prediction_type, PREDICTION_TYPES, "model.prediction_type")
        _choice(self.dtype, DTYPES, "model.dtype")
        _choice(self.attention_implementation, ATTENTION_IMPLEMENTATIONS, "model.attention_implementation")
        if self.memory_efficient_attention and self.attention_implementation != "diffusers":
            raise ConfigError(
                "model.memory_efficient_attention is diffusers' chunked kernel: it needs "
                f"model.attention_implementation='diffusers', got {self.attention_implementation!r}"
            )
        if self.base and self.image_encoder and (self.base == "tiny") != (self.image_encoder == "tiny"):
            raise ConfigError(
                f"model.base={self.base!r} with model.image_encoder={self.image_encoder!r}: the tiny base needs the "
                "tiny image encoder (and only it)"
            )

    def require_models(self) -> None:
        """ConfigError unless the base model and the image encoder are given (loading needs them)."""
        for name, what in (
            ("base", "a diffusers model folder or 'tiny'"),
            ("image_encoder", "a CLIPVisionModelWithProjection folder or 'tiny'"),
        ):
            if not getattr(self, name):
                raise ConfigError(f"model.{name} is empty: give {what} (--config.model.{name}=...)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data (`config.data`): a built dataset or an embedding cache, and how batches are drawn."""

    path: str = ""
    eval_path: str = ""
    resolution: int = 512
    batch_size_per_device: int = 8
    num_workers: int = 0
    drop_rates: tuple[float, float, float] = (0.05, 0.05, 0.05)
    crop: str = "center"
    seed: int = -1

    def shuffle_seed(self, run_seed: int) -> int:
        """The data order's and condition drops' seed: `seed`, or the run's when it is -1."""
        return run_seed if self.seed < 0 else self.seed

    def validate(self) -> None:
        if self.crop not in TARGET_CROPS:
            raise ConfigError(f"data.crop must be one of {TARGET_CROPS}, got {self.crop!r}")
        _at_least(self.resolution, 8, "data.resolution")
        if self.resolution % 8:
            raise ConfigError(f"data.resolution must be a multiple of 8 (the VAE's factor), got {self.resolution}")
        _at_least(self.batch_size_per_device, 1, "data.batch_size_per_device")
        _at_least(self.num_workers, 0, "data.num_workers")
        _at_least(self.seed, -1, "data.seed")
        if len(self.drop_rates) != 3:
            raise ConfigError(f"data.drop_rates must be 3 rates (image only, text only, both), got {self.drop_rates}")
        for rate in self.drop_rates:
            _in_range(rate, 0.0, 1.0, "data.drop_rates")
        if sum(self.drop_rates) > 1.0 + 1e-9:
            raise ConfigError(f"data.drop_rates {self.drop_rates} sum to {sum(self.drop_rates):g}; at most 1")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule (`config.optim`); `ipadapter_jax.training.step.make_optimizer` builds it."""

    lr: float = 1e-4
    weight_decay: float = 1e-2
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip_norm: float = 0.0
    grad_accum_steps: int = 1

    def validate(self) -> None:
        _positive(self.lr, "optim.lr")
        _at_least(self.weight_decay, 0.0, "optim.weight_decay")
        _in_range(self.b1, 0.0, 1.0, "optim.b1", high_open=True)
        _in_range(self.b2, 0.0, 1.0, "optim.b2", high_open=True)
        _positive(self.eps, "optim.eps")
        _at_least(self.warmup_steps, 0, "optim.warmup_steps")
        _at_least(self.grad_clip_norm, 0.0, "optim.grad_clip_norm")
        _at_least(self.grad_accum_steps, 1, "optim.grad_accum_steps")

    def build(self) -> tuple[Any, Any]:
        """-> (the optax optimizer, its learning-rate schedule) (`ipadapter_jax.training.step.make_optimizer`)."""
        from ipadapter_jax.training.step import learning_rate_schedule, make_optimizer

        schedule = learning_rate_schedule(self.lr, self.warmup_steps)
        optimizer = make_optimizer(
            schedule,
            weight_decay=self.weight_decay,
            b1=self.b1,
            b2=self.b2,
            eps=self.eps,
            grad_clip_norm=self.grad_clip_norm,
            grad_accum_steps=self.grad_accum_steps,
        )
        return optimizer, schedule


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Loss options beyond the reference's plain epsilon MSE (`config.loss`)."""

    noise_offset: float = 0.0
    snr_gamma: float = 0.0

    def validate(self) -> None:
        _at_least(self.noise_offset, 0.0, "loss.noise_offset")
        _at_least(self.snr_gamma, 0.0, "loss.snr_gamma")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The ("data", "fsdp") device mesh (`config.mesh`); `ipadapter_jax.sharding.make_mesh` builds it."""

    data: int = -1
    fsdp: int = 1
    fsdp_min_size: int = 2**14

    def validate(self) -> None:
        if self.data != -1:
            _at_least(self.data, 1, "mesh.data (or -1: all devices fsdp leaves)")
        _at_least(self.fsdp, 1, "mesh.fsdp")
        _at_least(self.fsdp_min_size, 0, "mesh.fsdp_min_size")


@dataclasses.dataclass(frozen=True)
class SamplesConfig:
    """Grids of samples for fixed image prompts in TensorBoard (`config.samples`; `every` = 0: none)."""

    every: int = 0
    images: tuple = ()
    count: int = 4
    per_prompt: int = 2
    steps: int = 20
    guidance_scale: float = 5.0
    scale: float = 1.0

    def validate(self) -> None:
        _at_least(self.every, 0, "samples.every")
        for name in ("count", "per_prompt", "steps"):
            _at_least(getattr(self, name), 1, f"samples.{name}")
        _at_least(self.guidance_scale, 0.0, "samples.guidance_scale")
        if not all(isinstance(path, str) and path for path in self.images):
            raise ConfigError(f"samples.images must be image file paths, got {self.images!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run. `from_config_dict` is the way in from config files."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossOptions = LossOptions()
    mesh: MeshConfig = MeshConfig()
    samples: SamplesConfig = SamplesConfig()
    sharding_rules: tuple = (("^frozen/", "replicate"), (".*", "fsdp"))
    seed: int = 0
    ema_decay: float = 0.0
    total_steps: int = 1_000_000
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    export_every: int = 10_000
    on_nonfinite: str = "stop"
    profile_steps: tuple = ()
    tensorboard: bool = True

    def validate(self) -> None:
        for part in (self.model, self.data, self.optim, self.loss, self.mesh, self.samples):
            part.validate()
        from ipadapter_jax.sharding import check_rules  # jax-free callers may validate without importing jax

        try:
            check_rules(self.sharding_rules)
        except ValueError as err:
            raise ConfigError(f"sharding_rules: {err}") from None
        _in_range(self.ema_decay, 0.0, 1.0, "ema_decay", high_open=True)
        for name in ("total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "export_every"):
            _at_least(getattr(self, name), 1, name)
        _choice(self.on_nonfinite, ON_NONFINITE, "on_nonfinite")
        if self.samples.every and self.model.adapter_kind.startswith("faceid"):
            raise ConfigError(
                "samples.every: the sample grids prompt the adapter with images, a FaceID adapter needs identity "
                f"embeddings (model.adapter_kind={self.model.adapter_kind!r}): set --config.samples.every=0"
            )
        if self.profile_steps and not (
            len(self.profile_steps) == 2 and 0 <= self.profile_steps[0] < self.profile_steps[1]
        ):
            raise ConfigError(
                f"profile_steps must be () or (first, last) with 0 <= first < last; got {self.profile_steps}"
            )

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any]) -> TrainConfig:
        """Validates a config (an `ml_collections.ConfigDict` or a nested dict) and returns it typed.

        Raises:
          ConfigError: an unknown field, a value of the wrong type, or one outside its allowed range.
        """
        typed = _build(cls, _as_dict(config), "")
        typed.validate()
        return typed

    def loss_config(self) -> Any:
        """The step's `LossConfig` (prediction type of the base, noise offset, min-SNR gamma)."""
        from ipadapter_jax.training.step import LossConfig

        return LossConfig(self.model.prediction_type, self.loss.noise_offset, self.loss.snr_gamma)

    def to_dict(self) -> dict:
        """JSON-able nested dict (the run records it in its workdir)."""
        return dataclasses.asdict(self)


def _as_dict(config: Any) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {', '.join(prefix + name for name in unknown)}; "
            f"{prefix or 'the top level'} has {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default if fields[name].default is not dataclasses.MISSING else None
        kwargs[name] = _coerce(value, default, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, name: str) -> Any:
    """`value` converted to the type of the field's default (ConfigDicts to dataclasses, lists to tuples)."""
    if dataclasses.is_dataclass(default):
        if not isinstance(value, Mapping) and not hasattr(value, "to_dict"):
            raise ConfigError(f"{name} must be a group of fields, got {value!r}")
        return _build(type(default), _as_dict(value), name + ".")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{name} must be a tuple, got {value!r}")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def _choice(value: Any, allowed: tuple, name: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _at_least(value: float, low: float, name: str) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value!r}")


def _positive(value: float, name: str) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


def _in_range(value: float, low: float, high: float, name: str, high_open: bool = False) -> None:
    if not (low <= value < high if high_open else low <= value <= high):
        raise ConfigError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value!r}")
