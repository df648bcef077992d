"""What the samplers of `ipadapter_jax.models.schedulers` share: their settings (defaults and honoured values, per
diffusers class), the check of a folder's config against them, the state pytrees and the thresholding of x0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.models import noise_schedule as ns

ANY = None  # a setting honoured whatever its value

# Every setting of a class: name -> (diffusers' default, the values honoured or ANY).
_SCHEDULE = {
    "num_train_timesteps": (1000, ANY),
    "beta_start": (0.0001, ANY),
    "beta_end": (0.02, ANY),
    "beta_schedule": ("linear", ns.BETA_SCHEDULES),
    "trained_betas": (None, ANY),
    "steps_offset": (0, ANY),
    "rescale_betas_zero_snr": (False, (False, True)),
    "timestep_spacing": ("linspace", ns.TIMESTEP_SPACINGS),
}
_THRESHOLDING = {"thresholding": (False, (False, True)), "dynamic_thresholding_ratio": (0.995, ANY)}
_SIGMAS = {
    "use_karras_sigmas": (False, (False, True, None)),
    "use_exponential_sigmas": (False, (False, None)),
    "use_beta_sigmas": (False, (False, None)),
    "final_sigmas_type": ("zero", ("zero", "sigma_min")),
}
SETTINGS: dict[str, dict[str, tuple[Any, Any]]] = {
    "DDPMScheduler": _SCHEDULE,  # training's noise schedule (`training_alphas_cumprod`)
    "DDIMScheduler": {
        **_SCHEDULE,
        **_THRESHOLDING,
        "timestep_spacing": ("leading", ns.TIMESTEP_SPACINGS),
        "clip_sample": (True, (False, True)),
        "clip_sample_range": (1.0, ANY),
        "sample_max_value": (1.0, ANY),
        "set_alpha_to_one": (True, (False, True)),
        "prediction_type": ("epsilon", ("epsilon", "sample", "v_prediction")),
    },
    "DPMSolverMultistepScheduler": {
        **_SCHEDULE,
        **_THRESHOLDING,
        **_SIGMAS,
        "sample_max_value": (1.0, ANY),
        "prediction_type": ("epsilon", ("epsilon", "sample", "v_prediction")),
        "solver_order": (2, (1, 2, 3)),
        # diffusers maps DEIS' and UniPC's names of its own solvers to DPM-Solver++ / midpoint.
        "algorithm_type": ("dpmsolver++", ("dpmsolver++", "deis")),
        "solver_type": ("midpoint", ("midpoint", "heun", "logrho", "bh1", "bh2")),
        "lower_order_final": (True, (False, True)),
        "euler_at_final": (False, (False, True)),
        "lambda_min_clipped": (-math.inf, ANY),
        "variance_type": (None, (None,)),
        "use_lu_lambdas": (False, (False,)),
        "use_flow_sigmas": (False, (False,)),
        # Read only with flow sigmas or a `mu` passed to set_timesteps, which Stable Diffusion never does.
        "flow_shift": (1.0, ANY),
        "use_dynamic_shifting": (False, ANY),
        "time_shift_type": ("exponential", ANY),
    },
    "EulerDiscreteScheduler": {
        **_SCHEDULE,
        **_SIGMAS,
        "prediction_type": ("epsilon", ("epsilon", "sample", "original_sample", "v_prediction")),
        "interpolation_type": ("linear", ("linear",)),
        "sigma_min": (None, ANY),
        "sigma_max": (None, ANY),
        "timestep_type": ("discrete", ("discrete", "continuous")),
    },
}


class UnsupportedSchedulerSetting(ValueError):
    """A scheduler config's setting that this implementation cannot honour."""


def training_alphas_cumprod(config: Mapping[str, Any], source: str = "scheduler config") -> np.ndarray:
    """(T,) float32 cumulative alpha products of the DDPM training schedule in `config`, as diffusers'
    `DDPMScheduler.from_config(config)` (the reference training scripts' noise schedule) builds them: betas, beta
    schedule, trained betas and the zero-terminal-SNR rescale.

    Raises:
      UnsupportedSchedulerSetting: an unknown beta schedule, or trained betas of the wrong length.
    """
    return ns.alphas_cumprod(ns.betas(resolve_settings("DDPMScheduler", config, source)))


def resolve_settings(name: str, config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The settings of diffusers' `name` class made from `config` (its defaults filled in, other keys dropped).

    Raises:
      UnsupportedSchedulerSetting: a setting of `name` with a value not implemented here.
    """
    settings = {}
    for key, (default, honoured) in SETTINGS[name].items():
        value = config.get(key, default)
        if honoured is not ANY and value not in honoured:
            raise UnsupportedSchedulerSetting(
                f"{source}: {key}={value!r} is not supported by the {name} of ipadapter-jax; supported: "
                f"{', '.join(repr(v) for v in honoured)}"
            )
        settings[key] = value
    if settings["trained_betas"] is not None and len(settings["trained_betas"]) != settings["num_train_timesteps"]:
        raise UnsupportedSchedulerSetting(
            f"{source}: trained_betas has {len(settings['trained_betas'])} values, expected num_train_timesteps="
            f"{settings['num_train_timesteps']}"
        )
    return settings


@flax.struct.dataclass
class NoiseSchedule:
    """The training noise schedule (`create_state()`): alphas_cumprod (T,) float32."""

    alphas_cumprod: jax.Array


@flax.struct.dataclass
class SamplingState:
    """One sampling run of N steps. `step_index`: steps done; DPM-Solver's `model_outputs` (solver_order, *shape)
    holds its last data predictions and `lower_order_nums` how many it has (0 and () for the others).

    timesteps: (N,) what the UNet is given; sigmas: (N + 1,) (DPM-Solver, Euler) or (0,) (DDIM);
    alphas_cumprod: (T,); final_alpha_cumprod, init_noise_sigma: () float32.
    """

    timesteps: jax.Array
    sigmas: jax.Array
    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    init_noise_sigma: jax.Array
    step_index: jax.Array
    model_outputs: jax.Array
    lower_order_nums: jax.Array


@flax.struct.dataclass
class StepOutput:
    """prev_sample: the latents after the step, as the input's shape; state: the state for the next step."""

    prev_sample: jax.Array
    state: SamplingState


class Scheduler:
    """What the three kinds share: settings, the training schedule and the thresholding of x0 predictions."""

    name: ClassVar[str]  # diffusers' PyTorch class of the same behaviour
    zero_snr_floor: ClassVar[bool] = True

    def __init__(self, settings: Mapping[str, Any]):
        self.config = dict(settings)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, source: str = "scheduler config") -> Scheduler:
        """A scheduler behaving as diffusers' `cls.name.from_config(config)` (see the module docstring's rule).

        Raises:
          UnsupportedSchedulerSetting: naming `source`, the key, its value and what is supported.
        """
        return cls(resolve_settings(cls.name, config, source))

    def create_state(self) -> NoiseSchedule:
        return NoiseSchedule(jnp.asarray(self._alphas_cumprod()))

    def _alphas_cumprod(self) -> np.ndarray:
        cumprod = ns.alphas_cumprod(ns.betas(self.config))
        if self.zero_snr_floor and self.config["rescale_betas_zero_snr"]:
            cumprod[-1] = 2.0**-24  # DPM-Solver's and Euler's floor, which keeps sigma finite
        return cumprod

    def scale_model_input(self, state: SamplingState, sample: jax.Array, timestep: jax.Array) -> jax.Array:
        """The UNet's input at the current step (unchanged but for Euler)."""
        del state, timestep
        return sample

    def _sampling_state(self, schedule: NoiseSchedule, timesteps: np.ndarray, **fields: Any) -> SamplingState:
        values = dict(
            timesteps=jnp.asarray(timesteps),
            sigmas=jnp.zeros((0,), jnp.float32),
            alphas_cumprod=schedule.alphas_cumprod,
            final_alpha_cumprod=jnp.float32(1.0),
            init_noise_sigma=jnp.float32(1.0),
            step_index=jnp.int32(0),
            model_outputs=jnp.zeros((0,), jnp.float32),
            lower_order_nums=jnp.int32(0),
        )
        values.update({key: jnp.asarray(value) for key, value in fields.items()})
        return SamplingState(**values)

    def _check_steps(self, num_steps: int) -> None:
        if not 0 < num_steps <= self.config["num_train_timesteps"]:
            raise ValueError(
                f"num_inference_steps must be in [1, {self.config['num_train_timesteps']}] (the scheduler's "
                f"num_train_timesteps), got {num_steps}"
            )

    def _threshold(self, x0: jax.Array) -> jax.Array:
        """Dynamic thresholding (Imagen): per example, clip to the `dynamic_thresholding_ratio` quantile s of
        |x0| (s in [1, sample_max_value]) and divide by s. x0: (B, ...)."""
        flat = jnp.abs(x0).reshape(x0.shape[0], -1)
        s = jnp.quantile(flat, self.config["dynamic_thresholding_ratio"], axis=1)
        s = jnp.clip(s, 1.0, self.config["sample_max_value"]).reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -s, s) / s
