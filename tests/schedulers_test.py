"""Our schedulers (`ipadapter_jax.models.schedulers`) vs diffusers' PyTorch DDIM, DPM-Solver++ and Euler schedulers,
built with `from_config` from the same folder config, for a grid of settings: the timesteps, the sigmas, the initial
noise scale, and every `scale_model_input` / `step` output of a whole run fed the same model outputs.

Tolerances, measured: integer timesteps are equal; each step (given diffusers' current sample) agrees to ~2e-6 of
the larger of its input's and output's max (float32 rounding).
Sigmas agree to 1e-6 except the smallest (Karras end points, "sigma_min" final sigma), up to 7e-5: torch's float32
`linspace` of the betas is vectorised and rounds 1 ulp differently from numpy's correctly rounded one on some
elements, and sigma = sqrt((1 - alpha_bar) / alpha_bar) amplifies an ulp of alpha_bar ~ 1 near t = 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ipadapter_jax.models.schedulers import SCHEDULERS, UnsupportedSchedulerSetting
from ipadapter_jax.weights.diffusers_models import load_scheduler

pytestmark = pytest.mark.parity

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# SD1.5's folder (PNDM) and SDXL's (Euler): their own keys must not disturb another kind.
SD15_FOLDER = dict(SD, _class_name="PNDMScheduler", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
SDXL_FOLDER = dict(SD, _class_name="EulerDiscreteScheduler", interpolation_type="linear", timestep_spacing="leading")
SHAPE = (2, 4, 8, 8)

CASES = {
    "ddim/sd15_folder": ("ddim", SD15_FOLDER, 7),
    "ddim/sdxl_folder": ("ddim", dict(SDXL_FOLDER, steps_offset=1), 7),
    "ddim/trailing_zero_snr_v": (
        "ddim",
        dict(
            SD,
            timestep_spacing="trailing",
            rescale_betas_zero_snr=True,
            prediction_type="v_prediction",
            clip_sample=False,
        ),
        7,
    ),
    "ddim/linspace_sample_clip": (
        "ddim",
        dict(timestep_spacing="linspace", prediction_type="sample", clip_sample_range=0.5),
        6,
    ),
    "ddim/thresholding": ("ddim", dict(SD, thresholding=True, sample_max_value=1.5, set_alpha_to_one=False), 5),
    "ddim/cosine_betas": ("ddim", dict(beta_schedule="squaredcos_cap_v2", steps_offset=1), 5),
    "dpm/sd15_folder": ("dpm_solver_multistep", SD15_FOLDER, 7),
    "dpm/sdxl_folder_leading": ("dpm_solver_multistep", dict(SDXL_FOLDER, steps_offset=1), 7),
    "dpm/karras_sigma_min": (
        "dpm_solver_multistep",
        dict(SD, use_karras_sigmas=True, final_sigmas_type="sigma_min"),
        8,
    ),
    "dpm/trailing_zero_snr_v_order3": (
        "dpm_solver_multistep",
        dict(
            SD, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction", solver_order=3
        ),
        16,
    ),
    "dpm/heun_sample_threshold": (
        "dpm_solver_multistep",
        dict(
            SD,
            solver_type="heun",
            prediction_type="sample",
            thresholding=True,
            lower_order_final=False,
            final_sigmas_type="sigma_min",
        ),
        6,
    ),
    "dpm/order1_clipped_lambda": (
        "dpm_solver_multistep",
        dict(solver_order=1, lambda_min_clipped=-5.1, euler_at_final=True),
        6,
    ),
    "euler/sdxl_folder": ("euler", dict(SDXL_FOLDER, steps_offset=1), 7),
    "euler/sd15_folder": ("euler", SD15_FOLDER, 7),
    "euler/karras_sigma_min": (
        "euler",
        dict(SD, use_karras_sigmas=True, final_sigmas_type="sigma_min", sigma_max=10.0),
        8,
    ),
    "euler/trailing_zero_snr_v": (
        "euler",
        dict(SD, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
        6,
    ),
    "euler/continuous_v": ("euler", dict(SD, timestep_type="continuous", prediction_type="v_prediction"), 6),
    "euler/sample_prediction": ("euler", dict(SD, prediction_type="sample", timestep_spacing="leading"), 5),
}


def torch_scheduler(kind: str, config: dict):
    """diffusers' PyTorch scheduler of the class our `kind` follows, `from_config(config)`."""
    import diffusers

    return getattr(diffusers, SCHEDULERS[kind].name).from_config(config)


def relative_error(actual, expected, scale: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, scale)."""
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / max(np.abs(expected).max(), scale))


@pytest.mark.parametrize("name", list(CASES))
def test_schedule_and_steps_match_diffusers(name: str):
    kind, config, num_steps = CASES[name]
    reference = torch_scheduler(kind, config)
    reference.set_timesteps(num_steps)
    ours = SCHEDULERS[kind].from_config(config)
    state = ours.set_timesteps(ours.create_state(), num_steps, SHAPE)

    expected_timesteps = reference.timesteps.numpy()
    if expected_timesteps.dtype.kind == "i":
        np.testing.assert_array_equal(state.timesteps, expected_timesteps)
    else:  # Euler's float timesteps, fractional with Karras sigmas
        np.testing.assert_allclose(state.timesteps, expected_timesteps, rtol=1e-5)
    if kind != "ddim":
        expected_sigmas = reference.sigmas.numpy()
        np.testing.assert_allclose(state.sigmas[:-2], expected_sigmas[:-2], rtol=1e-6)
        np.testing.assert_allclose(state.sigmas, expected_sigmas, rtol=1e-4)
    np.testing.assert_allclose(state.init_noise_sigma, float(reference.init_noise_sigma), rtol=1e-6)

    # Each step gets diffusers' current sample, so that each step's error is measured, not their sum.
    rng = np.random.default_rng(0)
    sample = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32) * float(reference.init_noise_sigma))
    errors = []
    for t_torch, t in zip(reference.timesteps, np.asarray(state.timesteps)):
        model_output = rng.standard_normal(SHAPE).astype(np.float32)
        scaled = reference.scale_model_input(sample, t_torch).numpy()
        errors.append(relative_error(ours.scale_model_input(state, sample.numpy(), t), scaled))
        out = ours.step(state, model_output, t, sample.numpy())
        scale = float(sample.abs().max())  # from Euler's sigma 4096 (zero terminal SNR) a step cancels 3 digits
        sample = reference.step(torch.from_numpy(model_output), t_torch, sample).prev_sample
        errors.append(relative_error(out.prev_sample, sample.numpy(), scale))
        state = out.state
    assert max(errors) <= 1e-5, f"max relative error per step {max(errors):.1e}"
    assert int(state.step_index) == num_steps


def test_the_steps_depend_on_the_settings():
    """The comparison above can fail: a folder setting (here v-prediction) changes the first step by O(1)."""
    outputs = []
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = SCHEDULERS["euler"].from_config(dict(SD, prediction_type=prediction_type))
        state = scheduler.set_timesteps(scheduler.create_state(), 4, SHAPE)
        sample = np.ones(SHAPE, np.float32)
        outputs.append(
            np.asarray(scheduler.step(state, np.full(SHAPE, 0.5, np.float32), state.timesteps[0], sample).prev_sample)
        )
    assert relative_error(outputs[0], outputs[1]) > 0.1


@pytest.mark.parametrize(
    ("kind", "key", "value", "supported"),
    [
        ("dpm_solver_multistep", "algorithm_type", "sde-dpmsolver++", "'dpmsolver++', 'deis'"),
        ("dpm_solver_multistep", "use_lu_lambdas", True, "False"),
        ("euler", "interpolation_type", "log_linear", "'linear'"),
        ("euler", "use_exponential_sigmas", True, "False, None"),
        ("ddim", "timestep_spacing", "uniform", "'leading', 'trailing', 'linspace'"),
    ],
)
def test_a_setting_we_cannot_honour_is_an_error(tmp_path, kind: str, key: str, value, supported: str):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(dict(SD, **{key: value})))
    with pytest.raises(UnsupportedSchedulerSetting) as info:
        load_scheduler(tmp_path, kind)
    message = str(info.value)
    assert message == (
        f"{path}: {key}={value!r} is not supported by the {SCHEDULERS[kind].name} of ipadapter-jax; "
        f"supported: {supported}"
    )


def test_another_class_settings_are_ignored_as_diffusers_ignores_them(tmp_path):
    """Euler's log-linear interpolation is not a DDIM setting: DDIM loads the folder, as diffusers' DDIM does."""
    (tmp_path / "scheduler_config.json").write_text(json.dumps(dict(SD, interpolation_type="log_linear")))
    scheduler, state = load_scheduler(tmp_path, "ddim")
    reference = torch_scheduler("ddim", dict(SD, interpolation_type="log_linear"))
    reference.set_timesteps(5)
    np.testing.assert_array_equal(scheduler.set_timesteps(state, 5, SHAPE).timesteps, reference.timesteps.numpy())


@pytest.mark.parametrize(
    "settings",
    [
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
        dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500),
    ],
)
def test_the_training_noise_schedule_is_diffusers_ddpm(settings):
    """Training's alphas_cumprod from a folder's scheduler config == diffusers' `DDPMScheduler.from_config`, the
    reference training scripts' schedule (zero terminal SNR included)."""
    from diffusers import DDPMScheduler

    from ipadapter_jax.models.scheduler_base import training_alphas_cumprod

    config = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, **settings}
    expected = DDPMScheduler.from_config(config).alphas_cumprod.numpy()
    # torch's float32 linspace rounds some betas one ulp away from numpy's: measured 1.3e-6 relative at most.
    np.testing.assert_allclose(training_alphas_cumprod(config), expected, rtol=5e-6, atol=1e-9)
    assert (expected[-1] == 0) == bool(settings.get("rescale_betas_zero_snr"))
