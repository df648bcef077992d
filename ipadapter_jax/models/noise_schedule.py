"""Host-side (numpy) noise-schedule arithmetic of the samplers in `ipadapter_jax.models.schedulers`.

Each function follows diffusers 0.39's PyTorch schedulers (`scheduling_ddim.py`, `scheduling_dpmsolver_multistep.py`,
`scheduling_euler_discrete.py`) step for step, including their dtypes: betas and cumulative products in float32
(as torch computes them), timestep grids and interpolated sigmas in float64 before the final float32 cast. Arrays
are 1-d; T is the number of training timesteps, N the number of inference steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def betas(settings: Mapping[str, Any]) -> np.ndarray:
    """(T,) float32 betas of `settings` (num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
    rescale_betas_zero_snr), as every diffusers scheduler builds them."""
    count = settings["num_train_timesteps"]
    if settings["trained_betas"] is not None:
        values = np.asarray(settings["trained_betas"], np.float32)
    elif settings["beta_schedule"] == "linear":
        values = np.linspace(settings["beta_start"], settings["beta_end"], count, dtype=np.float32)
    elif settings["beta_schedule"] == "scaled_linear":
        root = np.linspace(settings["beta_start"] ** 0.5, settings["beta_end"] ** 0.5, count, dtype=np.float32)
        values = root**2
    else:  # squaredcos_cap_v2 (the settings check admits BETA_SCHEDULES only)
        values = _cosine_betas(count)
    return rescale_zero_terminal_snr(values) if settings["rescale_betas_zero_snr"] else values


def _cosine_betas(count: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's cosine schedule (diffusers' `betas_for_alpha_bar`, cosine transform)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / count) / alpha_bar(i / count), max_beta) for i in range(count)], np.float32
    )


def rescale_zero_terminal_snr(values: np.ndarray) -> np.ndarray:
    """Betas rescaled to a zero terminal SNR (Lin et al. 2023, Algorithm 1), float32."""
    root = np.sqrt(np.cumprod(1.0 - values, dtype=np.float32))
    first, last = root[0].copy(), root[-1].copy()
    root = (root - last) * (first / (first - last))
    bar = root**2
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (1 - alphas).astype(np.float32)


def alphas_cumprod(values: np.ndarray) -> np.ndarray:
    """(T,) float32 cumulative products of 1 - betas (sequential float32, as torch.cumprod)."""
    return np.cumprod(1.0 - values, dtype=np.float32)


def spaced_timesteps(spacing: str, count: int, num_steps: int, steps_offset: int) -> np.ndarray:
    """(N,) float64 timesteps of DDIM's and Euler's `set_timesteps` (descending, not yet rounded for linspace)."""
    if spacing == "linspace":
        return np.linspace(0, count - 1, num_steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, num_steps) * (count // num_steps)).round()[::-1] + steps_offset
    return np.round(np.arange(count, 0, -count / num_steps)) - 1  # trailing


def dpm_timesteps(spacing: str, count: int, last: int, num_steps: int, steps_offset: int) -> np.ndarray:
    """(N,) int64 timesteps of DPM-Solver's `set_timesteps`; `last` is T less the steps `lambda_min_clipped` cuts."""
    if spacing == "linspace":
        grid = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        grid = (np.arange(0, num_steps + 1) * (last // (num_steps + 1))).round()[::-1][:-1] + steps_offset
    else:  # trailing
        grid = np.arange(last, 0, -count / num_steps).round() - 1
    return grid.astype(np.int64)


def train_sigmas(cumprod: np.ndarray) -> np.ndarray:
    """(T,) float32 sigma = sqrt((1 - alpha_bar) / alpha_bar) of every training timestep."""
    return ((1 - cumprod) / cumprod) ** np.float32(0.5)


def karras(in_sigmas: np.ndarray, num_steps: int, sigma_min: float | None, sigma_max: float | None) -> np.ndarray:
    """(N,) float64 Karras et al. (2022) sigmas (rho = 7) from `in_sigmas`' ends (descending) or the given bounds."""
    low = float(in_sigmas[-1]) if sigma_min is None else sigma_min
    high = float(in_sigmas[0]) if sigma_max is None else sigma_max
    ramp = np.linspace(0, 1, num_steps)
    rho = 7.0
    return (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """(N,) float64 (fractional) timesteps of `sigmas`, interpolating log sigma between training timesteps."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).reshape(sigmas.shape)


def final_sigma(final_sigmas_type: str, cumprod: np.ndarray) -> float:
    """The sigma after the last step: 0 ("zero") or the first training timestep's sigma ("sigma_min")."""
    if final_sigmas_type == "zero":
        return 0.0
    return float(((1 - cumprod[0]) / cumprod[0]) ** np.float32(0.5))
