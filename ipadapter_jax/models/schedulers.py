"""The sampling schedulers: DDIM, DPM-Solver++ (multistep) and Euler, as diffusers 0.39's PyTorch schedulers of
those names do them, with every setting of a model folder's `scheduler_config.json` honoured or refused.

Interface (that of diffusers' Flax schedulers, which `ipadapter_jax.pipelines.sampling` drives):

    scheduler = SCHEDULERS[kind].from_config(config, source="path/to/scheduler_config.json")
    state = scheduler.set_timesteps(scheduler.create_state(), num_steps, latents.shape)   # on the host
    x = scheduler.scale_model_input(state, latents, state.timesteps[i])                  # traceable
    out = scheduler.step(state, model_output, state.timesteps[i], latents)               # out.prev_sample, out.state

`create_state()` is the folder's training noise schedule; `set_timesteps` computes the timesteps and sigmas of N
steps in numpy (`ipadapter_jax.models.noise_schedule`, float64 where diffusers uses numpy) and returns the sampling
state, a pytree whose shapes depend only on N and the latents' shape; `step` is pure float32 arithmetic and runs
inside `jax.lax.fori_loop`. Steps are counted in the state (diffusers' `step_index`), so `step` must be called once
per timestep, in order, from the first (the pipelines' use; diffusers' img2img `begin_index` is not needed here).

Which settings count (the rule `from_config` applies): a scheduler of kind K behaves as diffusers'
`K.from_config(config)` (e.g. `DDIMScheduler.from_config(config)`), whatever class the folder names. So
- a key K's PyTorch class does not take is ignored, as diffusers ignores it: it belongs to the folder's own class
  (SD1.5's PNDM `skip_prk_steps`, SDXL's Euler `interpolation_type` read by DDIM) and cannot change K;
- a key K takes is honoured when its value is one implemented here (`scheduler_base.SETTINGS`: timestep_spacing,
  steps_offset, rescale_betas_zero_snr, prediction_type, the betas, DDIM's set_alpha_to_one / clip_sample /
  thresholding, DPM-Solver's and Euler's use_karras_sigmas / final_sigmas_type, DPM-Solver's solver order and
  type...), else `from_config` raises `UnsupportedSchedulerSetting` naming the file, the key, its value and the
  supported values (e.g. DPM-Solver's SDE variants, Euler's log-linear interpolation, exponential/beta sigmas);
- a key K takes that the folder lacks gets diffusers' default for K (DDIM: clip_sample=True, "leading" spacing;
  DPM-Solver and Euler: "linspace").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.models import noise_schedule as ns
from ipadapter_jax.models.scheduler_base import (
    NoiseSchedule,
    SamplingState,
    Scheduler,
    StepOutput,
    UnsupportedSchedulerSetting,
)

__all__ = ["SCHEDULERS", "UnsupportedSchedulerSetting", "NoiseSchedule", "SamplingState", "StepOutput"]


class DDIMScheduler(Scheduler):
    """Deterministic DDIM (eta = 0), diffusers' `DDIMScheduler`."""

    name = "DDIMScheduler"
    zero_snr_floor = False  # DDIM keeps alpha_bar = 0 at the last training step

    def set_timesteps(self, state: NoiseSchedule, num_steps: int, shape: tuple[int, ...]) -> SamplingState:
        """The sampling state of `num_steps` steps: timesteps (N,) int32; `shape` (the latents') is unused."""
        del shape
        self._check_steps(num_steps)
        c = self.config
        grid = ns.spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], num_steps, c["steps_offset"])
        final = 1.0 if c["set_alpha_to_one"] else np.asarray(state.alphas_cumprod)[0]
        return self._sampling_state(state, grid.round().astype(np.int32), final_alpha_cumprod=np.float32(final))

    def step(self, state: SamplingState, model_output: jax.Array, timestep: jax.Array, sample: jax.Array) -> StepOutput:
        """One DDIM step from `timestep` to `timestep - T // N` (diffusers' rule, whatever the spacing).

        model_output, sample: (B, C, h, w) float32; timestep: () int, the state's current one.
        """
        c = self.config
        prev = timestep - c["num_train_timesteps"] // state.timesteps.shape[0]
        alpha = state.alphas_cumprod[timestep]
        alpha_prev = jnp.where(prev >= 0, state.alphas_cumprod[jnp.maximum(prev, 0)], state.final_alpha_cumprod)
        beta = 1 - alpha
        if c["prediction_type"] == "epsilon":
            x0, eps = (sample - beta**0.5 * model_output) / alpha**0.5, model_output
        elif c["prediction_type"] == "sample":
            x0, eps = model_output, (sample - alpha**0.5 * model_output) / beta**0.5
        else:  # v_prediction
            x0 = alpha**0.5 * sample - beta**0.5 * model_output
            eps = alpha**0.5 * model_output + beta**0.5 * sample
        if c["thresholding"]:
            x0 = self._threshold(x0)
        elif c["clip_sample"]:
            x0 = jnp.clip(x0, -c["clip_sample_range"], c["clip_sample_range"])
        prev_sample = alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps
        return StepOutput(prev_sample, state.replace(step_index=state.step_index + 1))


class EulerDiscreteScheduler(Scheduler):
    """Euler's method on the probability-flow ODE in sigma (no churn), diffusers' `EulerDiscreteScheduler`."""

    name = "EulerDiscreteScheduler"

    def set_timesteps(self, state: NoiseSchedule, num_steps: int, shape: tuple[int, ...]) -> SamplingState:
        """The sampling state: timesteps (N,) float32 (fractional with Karras sigmas), sigmas (N + 1,)."""
        del shape
        self._check_steps(num_steps)
        c = self.config
        cumprod = np.asarray(state.alphas_cumprod)
        grid = ns.spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], num_steps, c["steps_offset"])
        timesteps = grid.astype(np.float32)
        train = ns.train_sigmas(cumprod)
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
        if c["use_karras_sigmas"]:
            sigmas = ns.karras(sigmas, num_steps, c["sigma_min"], c["sigma_max"])
            timesteps = ns.sigma_to_t(sigmas, np.log(train))
        sigmas = np.concatenate([sigmas, [ns.final_sigma(c["final_sigmas_type"], cumprod)]]).astype(np.float32)
        if c["timestep_type"] == "continuous" and c["prediction_type"] == "v_prediction":
            timesteps = 0.25 * np.log(sigmas[:-1])
        top = sigmas.max()
        init = top if c["timestep_spacing"] in ("linspace", "trailing") else (top**2 + 1) ** 0.5
        return self._sampling_state(
            state, timesteps.astype(np.float32), sigmas=sigmas, init_noise_sigma=np.float32(init)
        )

    def scale_model_input(self, state: SamplingState, sample: jax.Array, timestep: jax.Array) -> jax.Array:
        """sample / sqrt(sigma^2 + 1) at the current step."""
        sigma = state.sigmas[state.step_index]
        return sample / (sigma**2 + 1) ** 0.5

    def step(self, state: SamplingState, model_output: jax.Array, timestep: jax.Array, sample: jax.Array) -> StepOutput:
        """One Euler step from sigma_i to sigma_{i+1}. model_output, sample: (B, C, h, w) float32."""
        i = state.step_index
        sigma = state.sigmas[i]
        kind = self.config["prediction_type"]
        if kind in ("sample", "original_sample"):
            x0 = model_output
        elif kind == "epsilon":
            x0 = sample - sigma * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (state.sigmas[i + 1] - sigma)
        return StepOutput(prev_sample, state.replace(step_index=i + 1))


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ (data prediction), multistep of order 1-3, diffusers' `DPMSolverMultistepScheduler`."""

    name = "DPMSolverMultistepScheduler"

    def set_timesteps(self, state: NoiseSchedule, num_steps: int, shape: tuple[int, ...]) -> SamplingState:
        """The sampling state: timesteps (N,) int32, sigmas (N + 1,), model_outputs (solver_order, *shape) zeros."""
        self._check_steps(num_steps)
        c = self.config
        count = c["num_train_timesteps"]
        cumprod = np.asarray(state.alphas_cumprod)
        lambdas = np.log(np.sqrt(cumprod)) - np.log(np.sqrt(1 - cumprod))
        last = count - int(np.searchsorted(lambdas[::-1], c["lambda_min_clipped"]))
        timesteps = ns.dpm_timesteps(c["timestep_spacing"], count, last, num_steps, c["steps_offset"])
        train = ns.train_sigmas(cumprod)
        if c["use_karras_sigmas"]:
            sigmas = ns.karras(train[::-1], num_steps, None, None)
            timesteps = ns.sigma_to_t(sigmas, np.log(train))
            if c["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(train)), train)
        sigmas = np.concatenate([sigmas, [ns.final_sigma(c["final_sigmas_type"], cumprod)]]).astype(np.float32)
        outputs = np.zeros((c["solver_order"],) + tuple(shape), np.float32)
        return self._sampling_state(state, timesteps.astype(np.int32), sigmas=sigmas, model_outputs=outputs)

    def step(self, state: SamplingState, model_output: jax.Array, timestep: jax.Array, sample: jax.Array) -> StepOutput:
        """One multistep update of the order diffusers picks (lower at the start and, for short or "zero"-final
        schedules, at the end). model_output, sample: (B, C, h, w) float32."""
        c = self.config
        i, n, order = state.step_index, state.timesteps.shape[0], c["solver_order"]
        alpha, sigma = _alpha_sigma(state.sigmas[i])
        if c["prediction_type"] == "epsilon":
            x0 = (sample - sigma * model_output) / alpha
        elif c["prediction_type"] == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = alpha * sample - sigma * model_output
        if c["thresholding"]:
            x0 = self._threshold(x0)
        outputs = jnp.concatenate([state.model_outputs[1:], x0[None]])
        short = c["lower_order_final"] and n < 15
        final = (i == n - 1) & (c["euler_at_final"] or short or c["final_sigmas_type"] == "zero")
        first = (order == 1) | (state.lower_order_nums < 1) | final
        second = (order == 2) | (state.lower_order_nums < 2) | ((i == n - 2) & short)
        branch = jnp.where(first, 0, jnp.where(second, 1, 2))
        updates = (_first_order, self._second_order, _third_order)[:order]
        prev_sample = jax.lax.switch(branch, updates, state.sigmas, i, outputs, sample)
        lower = jnp.minimum(state.lower_order_nums + 1, order)
        return StepOutput(prev_sample, state.replace(step_index=i + 1, model_outputs=outputs, lower_order_nums=lower))

    def _second_order(self, sigmas: jax.Array, i: jax.Array, outputs: jax.Array, sample: jax.Array) -> jax.Array:
        (alpha_t, sigma_t, lambda_t), (_, sigma_s0, lambda_s0), (_, _, lambda_s1) = _points(sigmas, i, 3)
        m0, m1 = outputs[-1], outputs[-2]
        h = lambda_t - lambda_s0
        d0, d1 = m0, (1.0 / ((lambda_s0 - lambda_s1) / h)) * (m0 - m1)
        x = sigma_t / sigma_s0 * sample - alpha_t * (jnp.exp(-h) - 1.0) * d0
        if self.config["solver_type"] == "heun":
            return x + alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0) * d1
        return x - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1


def _alpha_sigma(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The VP (alpha_t, sigma_t) of a VE sigma."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def _points(sigmas: jax.Array, i: jax.Array, count: int) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """(alpha, sigma, lambda) at the target sigmas[i + 1], then sigmas[i], sigmas[i - 1]... (`count` points)."""
    points = []
    for offset in range(count):
        alpha, sigma = _alpha_sigma(sigmas[i + 1 - offset])
        points.append((alpha, sigma, jnp.log(alpha) - jnp.log(sigma)))
    return points


def _first_order(sigmas: jax.Array, i: jax.Array, outputs: jax.Array, sample: jax.Array) -> jax.Array:
    (alpha_t, sigma_t, lambda_t), (_, sigma_s, lambda_s) = _points(sigmas, i, 2)
    h = lambda_t - lambda_s
    return sigma_t / sigma_s * sample - alpha_t * (jnp.exp(-h) - 1.0) * outputs[-1]


def _third_order(sigmas: jax.Array, i: jax.Array, outputs: jax.Array, sample: jax.Array) -> jax.Array:
    (alpha_t, sigma_t, lambda_t), (_, sigma_s0, lambda_s0), (_, _, lambda_s1), (_, _, lambda_s2) = _points(sigmas, i, 4)
    m0, m1, m2 = outputs[-1], outputs[-2], outputs[-3]
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    r0, r1 = h_0 / h, h_1 / h
    d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return (
        sigma_t / sigma_s0 * sample
        - alpha_t * (jnp.exp(-h) - 1.0) * m0
        + alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0) * d1
        - alpha_t * ((jnp.exp(-h) - 1.0 + h) / h**2 - 0.5) * d2
    )


# The kinds of `ipadapter_jax.choices.SCHEDULERS`' values.
SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddim": DDIMScheduler,
    "dpm_solver_multistep": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}
