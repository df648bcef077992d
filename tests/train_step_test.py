"""One training step vs a PyTorch reference step (the reference recipe, built from diffusers' own pieces).

PyTorch side: diffusers' `UNet2DConditionModel` with the adapter loaded by diffusers' loader
(`IPAdapterAttnProcessor2_0` + `ImageProjection`), noise added by diffusers' `DDPMScheduler.add_noise`,
`F.mse_loss` against the noise, `torch.optim.AdamW(lr=1e-4, weight_decay=1e-2)` over the projection and the
K'/V' weights. Flax side: `ipadapter_jax.training.step.make_train_step`. Same weights, batch, noise, timesteps and drop
decisions (the noise/timesteps are drawn with the step's own RNG derivation and handed to PyTorch). The memory
options (diffusers' chunked attention, remat) must give the same step.

Our UNet computes with PyTorch's numerics (`pytorch_numerics`, the default: exact GELU, PyTorch's GroupNorm
epsilons), so the reference is diffusers' UNet as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlaxDDPMScheduler

from ipadapter_jax.models.adapter import split_unet_params
from ipadapter_jax.models.random_init import abstract_params
from ipadapter_jax.models.unet import IPUNet2DConditionModel
from ipadapter_jax.presets import get_preset
from ipadapter_jax.testing import tiny
from ipadapter_jax.training.components import step_models
from ipadapter_jax.training.config import TrainConfig
from ipadapter_jax.training.step import (
    LossConfig,
    StepModels,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    sample_noise_and_timesteps,
    split_step_key,
)
from ipadapter_jax.weights.image_proj_keys import flax_to_official, load_image_proj
from ipadapter_jax.weights.official_layout import ip_layers_from_official, ip_layers_to_official
from ipadapter_jax.weights.torch_layout import torch_state_to_flax

pytestmark = [pytest.mark.parity, pytest.mark.slow]

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)
BATCH, TEXT_TOKENS, CLIP_DIM = 4, 7, 48
DROP_IMAGE = np.array([False, True, False, True])
DROP_TEXT = np.array([False, False, True, True])
SEED = 3


@pytest.fixture(scope="module")
def setup():
    config = tiny.SD15_TINY
    cross = config["cross_attention_dim"]
    torch_unet = tiny.torch_unet(config)
    base_state = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
    official = tiny.random_official_adapter(torch_unet, clip_dim=CLIP_DIM)

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((BATCH, 4, 16, 16)).astype(np.float32)
    batch = {
        # A posterior with no spread (and scaling factor 1 below) makes the latents exactly these.
        "latent_mean": latents,
        "latent_std": np.zeros_like(latents),
        "text_embeds": rng.standard_normal((BATCH, TEXT_TOKENS, cross)).astype(np.float32),
        "image_embeds": rng.standard_normal((BATCH, CLIP_DIM)).astype(np.float32),
        "drop_image": DROP_IMAGE,
        "drop_text": DROP_TEXT,
    }
    null_text = rng.standard_normal((1, TEXT_TOKENS, cross)).astype(np.float32)

    # --- Flax step
    unet = IPUNet2DConditionModel(**config)
    _, image_proj, image_proj_params = load_image_proj(official["image_proj"])
    abstract = abstract_params(
        unet,
        jnp.zeros((1, 4, 16, 16)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, 1, cross)),
        image_tokens=jnp.zeros((1, 4, cross)),
    )
    frozen = {
        "unet": torch_state_to_flax(base_state, split_unet_params(abstract)[0], source="torch UNet"),
        "null_text_embeds": null_text,
        "null_image_embeds": np.zeros((1, CLIP_DIM), np.float32),
        "alphas_cumprod": FlaxDDPMScheduler.from_config(SCHEDULER).create_state().common.alphas_cumprod,
        "vae_scaling_factor": np.float32(1.0),
    }
    adapter = {
        "image_proj": image_proj_params,
        "ip_layers": ip_layers_from_official(official["ip_adapter"], abstract),
    }
    schedule = learning_rate_schedule(1e-4)
    optimizer = make_optimizer(schedule, weight_decay=1e-2)
    steps = {}  # the default step, the attention kernels and remat, which must not change the result

    def configured(**model_options) -> StepModels:  # as a training run builds them from config.model
        config = get_preset("tiny")
        config.model.update(model_options)
        return step_models(TrainConfig.from_config_dict(config).model, unet, image_proj)

    for option, models in {
        "default": configured(),
        "memory_efficient_attention": configured(memory_efficient_attention=True),
        "xla_attention": configured(attention_implementation="xla"),
        "splash_attention": configured(attention_implementation="splash"),  # Pallas interpret mode on a CPU
        "remat": configured(remat=True),
    }.items():
        step = jax.jit(make_train_step(models, optimizer, schedule, LossConfig()))
        steps[option] = step(init_train_state(adapter, optimizer, seed=SEED), frozen, batch)

    # The step's own draws of the diffusion noise and timesteps, injected through the batch instead; with the
    # gradients returned. And other injected noise, which must change the loss.
    _, noise_key = split_step_key(jax.random.fold_in(jax.random.PRNGKey(SEED), 0))
    noise, timesteps = sample_noise_and_timesteps(noise_key, latents.shape, 1000)
    injected = jax.jit(make_train_step(configured(), optimizer, schedule, LossConfig(), return_grads=True))
    for option, (noise_in, timesteps_in) in {
        "injected_noise": (noise, timesteps),
        "other_noise": (rng.standard_normal(latents.shape).astype(np.float32), np.asarray(timesteps)[::-1]),
    }.items():
        batch_in = dict(batch, noise=noise_in, timesteps=timesteps_in)
        steps[option] = injected(init_train_state(adapter, optimizer, seed=SEED), frozen, batch_in)

    # --- PyTorch reference step, on the same noise and timesteps. Copies: with accelerate installed diffusers loads
    # the given tensors in place (low_cpu_mem_usage), and the optimizer step would update `official` with them.
    torch_unet._load_ip_adapter_weights([{s: {k: torch.tensor(v) for k, v in d.items()} for s, d in official.items()}])
    trained = [
        p for n, p in torch_unet.named_parameters() if "to_k_ip" in n or "to_v_ip" in n or "encoder_hid_proj" in n
    ]
    for p in torch_unet.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    torch_opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=1e-2)
    t_noise, t_steps = torch.tensor(np.asarray(noise)), torch.tensor(np.asarray(timesteps)).long()
    noisy = DDPMScheduler(**SCHEDULER).add_noise(torch.from_numpy(latents), t_noise, t_steps)
    image = torch.from_numpy(np.where(DROP_IMAGE[:, None], 0.0, batch["image_embeds"]).astype(np.float32))
    text = torch.from_numpy(np.where(DROP_TEXT[:, None, None], null_text, batch["text_embeds"]).astype(np.float32))
    pred = torch_unet(noisy, t_steps, text, added_cond_kwargs={"image_embeds": [image[:, None]]}).sample
    torch_loss = F.mse_loss(pred.float(), t_noise.float(), reduction="mean")
    torch_loss.backward()
    torch_grads = _official_layout(torch_unet, lambda p: p.grad.numpy().copy())
    torch_opt.step()
    return dict(
        steps=steps,
        torch_loss=float(torch_loss.detach()),
        torch_official=_official_layout(torch_unet, lambda p: p.detach().numpy()),
        torch_grads=torch_grads,
        official=official,
    )


def _official_layout(torch_unet, read) -> dict:
    """The PyTorch adapter's tensors (weights or grads, by `read`) under their official keys."""
    out = {"image_proj": {}, "ip_adapter": {}}
    for layer_id, processor in enumerate(torch_unet.attn_processors.values()):
        if hasattr(processor, "to_k_ip"):
            out["ip_adapter"][f"{layer_id}.to_k_ip.weight"] = read(processor.to_k_ip[0].weight)
            out["ip_adapter"][f"{layer_id}.to_v_ip.weight"] = read(processor.to_v_ip[0].weight)
    proj = torch_unet.encoder_hid_proj.image_projection_layers[0]
    for key, param in (
        ("proj.weight", proj.image_embeds.weight),
        ("proj.bias", proj.image_embeds.bias),
        ("norm.weight", proj.norm.weight),
        ("norm.bias", proj.norm.bias),
    ):
        out["image_proj"][key] = read(param)
    return out


OPTIONS = ["default", "memory_efficient_attention", "xla_attention", "splash_attention", "remat", "injected_noise"]


@pytest.mark.parametrize("option", OPTIONS)
def test_loss_matches_pytorch_reference(setup, option):
    _, metrics = setup["steps"][option]
    assert abs(float(metrics["loss"]) - setup["torch_loss"]) <= 1e-6 * abs(setup["torch_loss"])  # measured 1e-7


@pytest.mark.parametrize("option", OPTIONS)
def test_updated_adapter_matches_pytorch_adamw(setup, option):
    """Updated params within 5e-6 of max|param| (measured 1.5e-6), except where the gradient is rounding noise.

    Adam's first step moves each weight by lr * g / (|g| + eps), i.e. +-lr whatever |g|: an element whose
    gradient is ~0 moves by +-lr with a sign decided by rounding, in both implementations. Such elements
    (|g| < 1e-5 max|g| of the tensor) are left out; they must be rare.
    """
    new_state, _ = setup["steps"][option]
    ours = {
        "image_proj": flax_to_official(jax.device_get(new_state.adapter["image_proj"])),
        "ip_adapter": ip_layers_to_official(jax.device_get(new_state.adapter["ip_layers"])),
    }
    excluded = total = 0
    for section, reference in setup["torch_official"].items():
        assert ours[section].keys() == reference.keys()
        for key, expected in reference.items():
            grad = np.abs(setup["torch_grads"][section][key])
            defined = grad >= 1e-5 * grad.max()
            excluded, total = excluded + int((~defined).sum()), total + grad.size
            scale = np.abs(expected).max()
            err = (np.abs(ours[section][key] - expected) * defined).max() / scale
            assert err <= 5e-6, f"{section}.{key}: {err:.2e}"
            # The step really moved the weight (Adam's first step: by ~lr = 1e-4), beyond the tolerance.
            assert np.abs(expected - setup["official"][section][key]).max() > 0.5e-4
    assert excluded <= 0.01 * total


def test_returned_gradients_match_pytorch(setup):
    """`return_grads=True`: the adapter's gradients, within 2e-5 of each tensor's max |grad| of PyTorch's
    (measured 8e-6)."""
    grads = jax.device_get(setup["steps"]["injected_noise"][1]["grads"])
    ours = {
        "image_proj": flax_to_official(grads["image_proj"]),
        "ip_adapter": ip_layers_to_official(grads["ip_layers"]),
    }
    for section, reference in setup["torch_grads"].items():
        assert ours[section].keys() == reference.keys()
        for key, expected in reference.items():
            err = np.abs(ours[section][key] - expected).max() / np.abs(expected).max()
            assert err <= 2e-5, f"{section}.{key}: {err:.2e}"


def test_injected_noise_replaces_the_steps_own(setup):
    """Injecting the step's own draws changes nothing; injecting other noise changes the loss. (The step that also
    returns its gradients is another XLA program, rounded differently: loss within 1e-6 (measured 2e-7), updated
    params within 1e-5 of max |param|, the bound of the PyTorch parity test; measured 3e-6 relative on one element
    of 128k.)"""
    default_state, default_metrics = setup["steps"]["default"]
    same_state, same_metrics = setup["steps"]["injected_noise"]
    assert float(same_metrics["loss"]) == pytest.approx(float(default_metrics["loss"]), rel=1e-6, abs=0)
    for a, b in zip(jax.tree.leaves(same_state.adapter), jax.tree.leaves(default_state.adapter)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    _, other = setup["steps"]["other_noise"]
    assert abs(float(other["loss"]) - float(default_metrics["loss"])) > 1e-3 * float(default_metrics["loss"])


def test_step_reports_health_metrics(setup):
    new_state, metrics = setup["steps"]["default"]
    assert int(metrics["finite"]) == 1
    assert int(new_state.step) == 1
    assert float(metrics["learning_rate"]) == pytest.approx(1e-4)
    assert float(metrics["grad_norm"]) > 0
