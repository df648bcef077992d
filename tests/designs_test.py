"""Adapter designs (`ipadapter_jax.models.designs`) against references.

The simple design (image tokens appended to the text tokens) is diffusers' PyTorch UNet given
encoder_hidden_states = concat(text, image tokens), the tokens from diffusers' `ImageProjection` loaded with our
projection's params: the training step's loss and projection gradients, and the pipeline's images (tiny SD1.5,
4 DDIM steps, guidance on). Its scale s adds log s to the image keys' logits, so s = 2 is the same UNet given the
image tokens twice, and s = 0 the text-only UNet. The gated design with every gate g is the decoupled design at
IP scale tanh(g) (itself parity-tested against diffusers in tests/pipeline_test.py). Files: msgpack round trips
record the design; the official formats refuse the designs they cannot hold.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlaxDDPMScheduler
from diffusers.models.embeddings import ImageProjection
from flax import traverse_util

from ipadapter_jax.choices import ADAPTER_DESIGNS
from ipadapter_jax.models.adapter import Adapter
from ipadapter_jax.models.designs import DESIGNS
from ipadapter_jax.models.random_init import abstract_params
from ipadapter_jax.models.scales import ip_scale_tree
from ipadapter_jax.models.scheduler_base import training_alphas_cumprod
from ipadapter_jax.models.unet import IPUNet2DConditionModel
from ipadapter_jax.pipelines import IPAdapterPipeline
from ipadapter_jax.presets import get_preset
from ipadapter_jax.testing import pipeline_fixtures as tu
from ipadapter_jax.testing import tiny
from ipadapter_jax.testing import training_runs as runs
from ipadapter_jax.training.components import abstract_components
from ipadapter_jax.training.config import ConfigError, TrainConfig
from ipadapter_jax.training.hooks import export_adapter
from ipadapter_jax.training.loop import train
from ipadapter_jax.training.step import (
    LossConfig,
    StepModels,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
)
from ipadapter_jax.weights import load_adapter, load_base, load_image_encoder, new_adapter
from ipadapter_jax.weights.adapter_files import save_ip_adapter
from ipadapter_jax.weights.flax_adapter_file import read_flax_adapter, save_flax_adapter
from ipadapter_jax.weights.image_proj_keys import flax_to_official, load_image_proj
from ipadapter_jax.weights.torch_layout import ConversionError, torch_state_to_flax

README = Path(__file__).resolve().parents[1] / "README.md"
GATED_FILE = Path(__file__).resolve().parents[1] / "ipadapter_jax" / "models" / "designs" / "gated.py"
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)  # the reference training schedule
BATCH, TEXT_TOKENS, CLIP_DIM, NUM_TOKENS = 4, 7, 48, 4
SIZE, STEPS = 64, 4
LATENTS = np.random.default_rng(0).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)


def torch_projection(image_proj_params: dict, cross: int) -> ImageProjection:
    """diffusers' `ImageProjection` (the base adapter's) holding our projection's params."""
    official = flax_to_official(image_proj_params)
    proj = ImageProjection(CLIP_DIM, cross, NUM_TOKENS)
    state = {"image_embeds.weight": official["proj.weight"], "image_embeds.bias": official["proj.bias"]}
    state.update({"norm.weight": official["norm.weight"], "norm.bias": official["norm.bias"]})
    proj.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()})
    return proj


def test_the_registry_names_the_configs_choices():
    assert tuple(DESIGNS) == ADAPTER_DESIGNS
    assert all(design.name == name for name, design in DESIGNS.items())


def test_model_design_is_validated():
    config = get_preset("tiny")
    assert TrainConfig.from_config_dict(config).model.design == "decoupled"
    config.model.design = "simple"
    assert TrainConfig.from_config_dict(config).model.design == "simple"
    config.model.design = "concat"
    with pytest.raises(ConfigError, match=r"model.design must be one of 'decoupled', 'simple', 'gated'; got 'concat'"):
        TrainConfig.from_config_dict(config)


def test_the_readme_writes_out_the_gated_design_verbatim():
    """README's "Write your own adapter design" block is `models/designs/gated.py`, under 60 lines."""
    section = README.read_text().split("## Write your own adapter design", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert block == GATED_FILE.read_text()
    assert len(block.splitlines()) < 60


# --- the simple design's training step vs PyTorch


@pytest.fixture(scope="module")
def simple_step():
    config = tiny.SD15_TINY
    cross = config["cross_attention_dim"]
    torch_unet = tiny.torch_unet(config)
    official = tiny.random_official_adapter(torch_unet, clip_dim=CLIP_DIM)
    _, image_proj, image_proj_params = load_image_proj(official["image_proj"])
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((BATCH, 4, 16, 16)).astype(np.float32)
    drop_image, drop_text = np.array([False, True, False, True]), np.array([False, False, True, True])
    noise = rng.standard_normal(latents.shape).astype(np.float32)
    timesteps = np.array([10, 300, 600, 999], np.int32)
    batch = {
        "latent_mean": latents,
        "latent_std": np.zeros_like(latents),  # with scaling factor 1: the latents exactly
        "text_embeds": rng.standard_normal((BATCH, TEXT_TOKENS, cross)).astype(np.float32),
        "image_embeds": rng.standard_normal((BATCH, CLIP_DIM)).astype(np.float32),
        "drop_image": drop_image,
        "drop_text": drop_text,
        "noise": noise,
        "timesteps": timesteps,
    }
    null_text = rng.standard_normal((1, TEXT_TOKENS, cross)).astype(np.float32)

    unet = IPUNet2DConditionModel(**config, adapter_design="simple")
    shapes = abstract_params(
        unet,
        jnp.zeros((1, 4, 16, 16)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, 1, cross)),
        image_tokens=jnp.zeros((1, NUM_TOKENS, cross)),
    )
    base_state = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
    frozen = {
        "unet": torch_state_to_flax(base_state, shapes, source="torch UNet"),
        "null_text_embeds": null_text,
        "null_image_embeds": np.zeros((1, CLIP_DIM), np.float32),
        "alphas_cumprod": FlaxDDPMScheduler.from_config(SCHEDULER).create_state().common.alphas_cumprod,
        "vae_scaling_factor": np.float32(1.0),
    }
    adapter = {"image_proj": image_proj_params, "ip_layers": {}}
    schedule = learning_rate_schedule(1e-4)
    optimizer = make_optimizer(schedule)
    step = jax.jit(make_train_step(StepModels(unet, image_proj), optimizer, schedule, LossConfig(), return_grads=True))
    _, metrics = step(init_train_state(adapter, optimizer, seed=0), frozen, batch)

    proj = torch_projection(image_proj_params, cross)
    for p in torch_unet.parameters():
        p.requires_grad_(False)
    t_noise, t_steps = torch.from_numpy(noise), torch.from_numpy(timesteps).long()
    noisy = DDPMScheduler(**SCHEDULER).add_noise(torch.from_numpy(latents), t_noise, t_steps)
    image = torch.from_numpy(np.where(drop_image[:, None], 0.0, batch["image_embeds"]).astype(np.float32))
    text = torch.from_numpy(np.where(drop_text[:, None, None], null_text, batch["text_embeds"]).astype(np.float32))
    pred = torch_unet(noisy, t_steps, torch.cat([text, proj(image)], dim=1)).sample
    loss = F.mse_loss(pred, t_noise)
    loss.backward()
    torch_grads = {
        "proj.weight": proj.image_embeds.weight.grad,
        "proj.bias": proj.image_embeds.bias.grad,
        "norm.weight": proj.norm.weight.grad,
        "norm.bias": proj.norm.bias.grad,
    }
    return dict(metrics=metrics, torch_loss=float(loss.detach()), torch_grads=torch_grads)


@pytest.mark.parity
@pytest.mark.slow
def test_simple_design_loss_matches_pytorch_concat_conditioning(simple_step):
    """Within 1e-6 relative, as tests/train_step_test.py (measured: equal in float32)."""
    ours = float(simple_step["metrics"]["loss"])
    assert abs(ours - simple_step["torch_loss"]) <= 1e-6 * simple_step["torch_loss"]


@pytest.mark.parity
@pytest.mark.slow
def test_simple_design_trains_the_projection_only_with_pytorch_gradients(simple_step):
    """Within 2e-5 of each tensor's max |grad|, as tests/train_step_test.py (measured 2.6e-6)."""
    grads = jax.device_get(simple_step["metrics"]["grads"])
    assert grads["ip_layers"] == {}
    ours = flax_to_official(grads["image_proj"])
    assert ours.keys() == simple_step["torch_grads"].keys()
    for key, expected in simple_step["torch_grads"].items():
        expected = expected.numpy()
        err = np.abs(ours[key] - expected).max() / np.abs(expected).max()
        assert err <= 2e-5, f"{key}: {err:.2e}"


# --- the simple design's pipeline vs diffusers' PyTorch pipeline


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("designs") / "sd15"
    torch_pipe = tu.save_pipeline(folder, "sd15")
    torch_pipe.set_progress_bar_config(disable=True)
    base = load_base(folder, progress=False)
    encoder = load_image_encoder(folder / "image_encoder")
    adapter = new_adapter("base", base, encoder, num_tokens=NUM_TOKENS, seed=5, design="simple")
    path = save_flax_adapter(adapter.params, folder / "simple.msgpack", design="simple")
    loaded = load_adapter(path, base, image_encoder=encoder)
    return dict(torch_pipe=torch_pipe, pipe=IPAdapterPipeline(base, encoder, loaded), adapter=adapter, path=path)


def torch_images(sd15: dict, image_copies: int) -> np.ndarray:
    """diffusers' pipeline given text tokens followed by `image_copies` copies of the image tokens."""
    pipe = sd15["torch_pipe"]
    with torch.no_grad():
        text, negative_text = pipe.encode_prompt("a red cat", "cpu", 1, True, "ugly")
        image_embeds, negative_embeds = pipe.encode_image(tu.test_image(0), "cpu", 1)
        proj = torch_projection(sd15["adapter"].params["image_proj"], text.shape[-1])
        tokens, negative_tokens = proj(image_embeds), proj(negative_embeds)
        return pipe(
            prompt_embeds=torch.cat([text, *[tokens] * image_copies], dim=1),
            negative_prompt_embeds=torch.cat([negative_text, *[negative_tokens] * image_copies], dim=1),
            num_inference_steps=STEPS,
            height=SIZE,
            width=SIZE,
            latents=torch.from_numpy(LATENTS),
            output_type="np",
        ).images


def flax_images(sd15: dict, scale: float) -> np.ndarray:
    out = sd15["pipe"](
        tu.test_image(0),
        prompt="a red cat",
        negative_prompt="ugly",
        scale=scale,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        latents=LATENTS,
    )
    return out.pixels


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("scale, image_copies", [(1.0, 1), (2.0, 2), (0.0, 0)])
def test_simple_design_pipeline_matches_diffusers_concat_conditioning(sd15, scale, image_copies):
    """Scale 1: the text tokens followed by the image tokens; 2: by them twice; 0: the text tokens alone. Within
    5e-5 on [0, 1] pixels, as tests/pipeline_test.py (measured 3.1e-6, 3.5e-6, 3.6e-6)."""
    expected = torch_images(sd15, image_copies)
    err = np.abs(flax_images(sd15, scale) - expected).max()
    assert err <= 5e-5, f"max |ours - diffusers| = {err:.2e}"
    if image_copies:  # the image tokens act
        assert np.abs(torch_images(sd15, 0) - expected).max() > 1e-2


def test_simple_design_files_round_trip_and_refuse_the_official_layout(sd15, tmp_path):
    params, metadata = read_flax_adapter(sd15["path"])
    assert metadata["adapter_design"] == "simple" and params["ip_layers"] == {}
    loaded = sd15["pipe"].adapter
    assert loaded.design == "simple"
    for ours, saved in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(sd15["adapter"].params), strict=True):
        np.testing.assert_array_equal(ours, saved)
    for name in ("ip.safetensors", "ip.bin"):
        with pytest.raises(ConversionError, match=f"{tmp_path / name}: the 'simple' adapter design has no official"):
            save_ip_adapter(sd15["adapter"].params, tmp_path / name, format=name.split(".")[1], design="simple")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConversionError, match="the 'simple' adapter design has no official"):
        export_adapter(sd15["adapter"].params, str(tmp_path / "ip-adapter.safetensors"), {}, "simple")
    export_adapter(sd15["adapter"].params, str(tmp_path / "ip-adapter.msgpack"), {}, "simple")
    assert read_flax_adapter(tmp_path / "ip-adapter.msgpack")[1]["adapter_design"] == "simple"


def test_simple_design_refuses_what_needs_a_decoupled_branch(sd15):
    pipe = sd15["pipe"]
    with pytest.raises(ValueError, match="mask: not available with an adapter of the 'simple' design"):
        pipe(tu.test_image(0), mask=np.ones((SIZE, SIZE), np.uint8) * 255, num_inference_steps=1)
    with pytest.raises(ValueError, match="embeds_scaling: not available"):
        pipe(tu.test_image(0), embeds_scaling="k_v", num_inference_steps=1)
    with pytest.raises(ValueError, match=r"several adapters at once must all be of the decoupled design; got designs"):
        IPAdapterPipeline(pipe.base, pipe.image_encoder, [pipe.adapter, pipe.adapter])


# --- the gated design: the README's example, trained one step and sampled


@pytest.fixture(scope="module")
def tiny_gated():
    base = load_base("tiny", progress=False)
    encoder = load_image_encoder("tiny")
    adapter = new_adapter("base", base, encoder, num_tokens=NUM_TOKENS, design="gated")
    return base, encoder, adapter


def with_gates(params: dict, value: float) -> dict:
    flat = traverse_util.flatten_dict(params["ip_layers"])
    gates = {path: np.float32(value) for path in flat if path[-1] == "ip_gate"}
    return {**params, "ip_layers": traverse_util.unflatten_dict({**flat, **gates})}


def test_abstract_components_have_the_shapes_of_a_new_adapter_of_the_design(tiny_gated):
    """What `ipadapter-jax plan` compiles (`abstract_components`) is what training starts from (`new_adapter`)."""
    _, _, adapter = tiny_gated
    config = get_preset("tiny")
    config.model.design = "gated"
    comps = abstract_components(TrainConfig.from_config_dict(config))
    shapes = functools.partial(jax.tree.map, lambda x: tuple(x.shape))
    assert shapes(comps.adapter) == shapes(adapter.params)
    assert comps.models.unet.adapter_design == "gated"


@pytest.mark.slow
def test_gated_design_is_the_decoupled_one_at_scale_tanh_gate(tiny_gated):
    base, _, adapter = tiny_gated
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    text = rng.standard_normal((1, 5, 32)).astype(np.float32)
    tokens = rng.standard_normal((1, NUM_TOKENS, 32)).astype(np.float32)
    gated = Adapter(adapter.image_proj, with_gates(adapter.params, 0.6), "gated")
    gated_unet_params = gated.unet_params(base.unet_params)
    kernels = {p: v for p, v in traverse_util.flatten_dict(adapter.params["ip_layers"]).items() if p[-1] != "ip_gate"}
    decoupled = {**adapter.params, "ip_layers": traverse_util.unflatten_dict(kernels)}
    decoupled_unet_params = Adapter(adapter.image_proj, decoupled).unet_params(base.unet_params)
    out = base.unet.clone(adapter_design="gated").apply(
        {"params": gated_unet_params}, latents, 500, text, image_tokens=tokens
    )
    scales = ip_scale_tree(decoupled_unet_params, float(np.tanh(0.6)))
    expected = base.unet.apply(
        {"params": decoupled_unet_params, "ip_scale": scales}, latents, 500, text, image_tokens=tokens
    )
    plain = base.unet.apply({"params": base.unet_params}, latents, 500, text)
    np.testing.assert_allclose(out.sample, expected.sample, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(out.sample) - np.asarray(plain.sample)).max() > 1e-2


@pytest.mark.slow
def test_gated_design_trains_one_step_and_samples(tiny_gated, tmp_path):
    """At gate 0 the image branch is closed: the gates get gradients, K'/V' none; the step opens the gates, and the
    trained adapter, saved and loaded, samples differently at scale 1 than at scale 0 (the branch off)."""
    base, encoder, adapter = tiny_gated
    rng = np.random.default_rng(2)
    batch = {
        "latent_mean": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        "latent_std": np.zeros((2, 4, 8, 8), np.float32),
        "text_embeds": rng.standard_normal((2, 5, 32)).astype(np.float32),
        "image_embeds": rng.standard_normal((2, encoder.config.projection_dim)).astype(np.float32),
        "drop_image": np.zeros(2, bool),
        "drop_text": np.zeros(2, bool),
    }
    frozen = {
        "unet": base.unet_params,
        "null_text_embeds": np.zeros((1, 5, 32), np.float32),
        "null_image_embeds": np.zeros((1, encoder.config.projection_dim), np.float32),
        "alphas_cumprod": training_alphas_cumprod(base.scheduler.config),
        "vae_scaling_factor": np.float32(base.vae.config.scaling_factor),
    }
    schedule = learning_rate_schedule(1e-2)
    optimizer = make_optimizer(schedule)
    models = StepModels(base.unet.clone(adapter_design="gated"), adapter.image_proj)
    step = jax.jit(make_train_step(models, optimizer, schedule, return_grads=True))
    state, metrics = step(init_train_state(adapter.params, optimizer, seed=0), frozen, batch)
    grads = traverse_util.flatten_dict(jax.device_get(metrics["grads"]["ip_layers"]))
    gates = traverse_util.flatten_dict(jax.device_get(state.adapter["ip_layers"]))
    for path, grad in grads.items():
        if path[-1] == "ip_gate":
            assert grad != 0 and abs(float(gates[path])) == pytest.approx(1e-2, rel=1e-3)  # Adam's first step: +-lr
        else:
            assert not np.any(grad), path

    path = save_flax_adapter(jax.device_get(state.adapter), tmp_path / "gated.msgpack", design="gated")
    trained = load_adapter(path, base, image_encoder=encoder)
    assert trained.design == "gated"
    pipe = IPAdapterPipeline(base, encoder, trained)
    request = dict(prompt="a cat", num_inference_steps=2, seed=0)
    image, closed = (pipe(tu.test_image(0), scale=scale, **request).pixels for scale in (1.0, 0.0))
    assert np.abs(image - closed).max() > 1e-4


@pytest.mark.slow
def test_simple_design_training_run_resumes_and_exports_msgpack(tmp_path):
    """`model.design=simple` through the training loop: its checkpoints (an empty `ip_layers`) resume to the
    uninterrupted run's state bit for bit, and the final export is ip-adapter.msgpack holding that state's adapter."""
    dataset = runs.build_dataset(tmp_path / "data", num_images=8, seed=0)

    def config(steps: int):
        cfg = runs.config(dataset, steps, 2)
        cfg.model.design = "simple"
        return cfg

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train(config(3), straight)
    train(config(2), resumed)
    train(config(3), resumed)
    state = runs.final_state(resumed)
    runs.assert_states_close(state, runs.final_state(straight), rtol=0)
    assert not (tmp_path / "resumed" / "ip-adapter.safetensors").exists()
    params, metadata = read_flax_adapter(tmp_path / "resumed" / "ip-adapter.msgpack")
    assert metadata["adapter_design"] == "simple" and params["ip_layers"] == {}
    exported = traverse_util.flatten_dict(params["image_proj"])
    assert exported and all(
        np.array_equal(value, state["['adapter']['image_proj']" + "".join(f"['{k}']" for k in path)])
        for path, value in exported.items()
    )
