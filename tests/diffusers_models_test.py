"""diffusers model folders -> Flax: every loaded component computes what the PyTorch component computes.

Tiny random SD1.5-like and SDXL-like pipelines, an SD2-like UNet and a ControlNet are saved with
`save_pretrained` (safetensors; the SD2 UNet as `.bin`; a UNet sharded and as an fp16 variant), loaded with
`ipadapter_jax.weights.diffusers_models`, and run on the same inputs as the PyTorch models, fp32 on CPU.
Tolerance: max |flax - torch| <= 1e-4 * max |torch| (the UNet parity tolerance of tests/unet_parity_test.py;
diffusers' Flax UNet differs from PyTorch by ~6e-5 there because Flax's GEGLU uses tanh-approximate GELU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from ipadapter_jax.testing import tiny, tiny_folders
from ipadapter_jax.weights.diffusers_models import (
    SCHEDULERS,
    load_controlnet,
    load_pipeline,
    load_scheduler,
    load_unet,
)

pytestmark = pytest.mark.parity

RTOL = 1e-4
BATCH, TEXT_TOKENS = 2, 7
PROMPTS = ["a photo of the dog", "the cat and the dog"]


def assert_close(actual, expected, rtol: float = RTOL) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"max abs diff {err:.2e} x max|expected| > {rtol}"


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15")
    torch_pipe = tiny_folders.sd15_pipeline(folder)
    return folder, torch_pipe, load_pipeline(folder, progress=False)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    torch_pipe = tiny_folders.sdxl_pipeline(folder)
    return folder, torch_pipe, load_pipeline(folder, scheduler="euler", progress=False)


def unet_inputs(config: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    inputs = {
        "sample": rng.standard_normal((BATCH, 4, 16, 16)).astype(np.float32),
        "timesteps": np.array([3, 700], np.int32),
        "text": rng.standard_normal((BATCH, TEXT_TOKENS, config["cross_attention_dim"])).astype(np.float32),
        "added": None,
    }
    if config.get("addition_embed_type") == "text_time":
        inputs["added"] = {
            "text_embeds": rng.standard_normal((BATCH, tiny.SDXL_TEXT_EMBEDS_DIM)).astype(np.float32),
            "time_ids": np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (BATCH, 1)),
        }
    return inputs


def torch_unet_out(unet, inputs: dict) -> np.ndarray:
    added = None if inputs["added"] is None else {k: torch.from_numpy(v) for k, v in inputs["added"].items()}
    with torch.no_grad():
        return unet(
            torch.from_numpy(inputs["sample"]),
            torch.from_numpy(inputs["timesteps"]).long(),
            torch.from_numpy(inputs["text"]),
            added_cond_kwargs=added,
        ).sample.numpy()


def flax_unet_out(loaded, inputs: dict) -> np.ndarray:
    added = None if inputs["added"] is None else {k: jnp.asarray(v) for k, v in inputs["added"].items()}
    fn = jax.jit(lambda p, x, t, c: loaded.module.apply({"params": p}, x, t, c, added_cond_kwargs=added).sample)
    return np.asarray(fn(loaded.params, inputs["sample"], inputs["timesteps"], inputs["text"]))


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_unet_noise_prediction_matches_pytorch(base, request):
    _, torch_pipe, pipe = request.getfixturevalue(base)
    inputs = unet_inputs(torch_pipe.unet.config)
    assert_close(flax_unet_out(pipe.unet, inputs), torch_unet_out(torch_pipe.unet, inputs))
    assert pipe.unet.report.cache == "off" and pipe.unet.report.num_params == sum(
        p.numel() for p in torch_pipe.unet.parameters()
    )


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # inside diffusers
def test_sdxl_add_embedding_key_map(sdxl, caplog):
    """REFERENCE s.2: diffusers' generic Flax->PyTorch renamer mangles SDXL's `add_embedding.linear_1`. Verified:
    that direction turns it into `add_embedding.linear.1` and leaves PyTorch's add_embedding untouched (only a
    log line says so). Our PyTorch->Flax map puts it in place (the SDXL parity test covers its effect).
    (diffusers' PyTorch->Flax converter, checked once by hand, gives our tree exactly; it is not run here
    because it needs a random init pass: 30 s.)"""
    from diffusers.models.modeling_pytorch_flax_utils import load_flax_weights_in_pytorch_model

    _, torch_pipe, pipe = sdxl
    linear = torch_pipe.unet.add_embedding.linear_1
    kernel = pipe.unet.params["add_embedding"]["linear_1"]["kernel"]
    np.testing.assert_array_equal(kernel, linear.weight.detach().numpy().T)

    other = tiny.torch_unet(tiny.SDXL_TINY, seed=9)
    before = other.add_embedding.linear_1.weight.detach().clone()
    load_flax_weights_in_pytorch_model(other, jax.tree.map(np.array, pipe.unet.params))
    assert torch.equal(other.add_embedding.linear_1.weight, before)  # not loaded
    assert "add_embedding.linear.1.weight" in caplog.text


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_vae_encode_decode_match_pytorch(base, request):
    _, torch_pipe, pipe = request.getfixturevalue(base)
    module, params = pipe.vae.module, pipe.vae.params
    images = np.random.default_rng(1).uniform(-1, 1, (BATCH, 3, 16, 16)).astype(np.float32)
    latents = np.random.default_rng(2).standard_normal((BATCH, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        posterior = torch_pipe.vae.encode(torch.from_numpy(images)).latent_dist
        decoded = torch_pipe.vae.decode(torch.from_numpy(latents)).sample.numpy()

    def encode(p, x):
        latent_dist = module.apply({"params": p}, x, method=module.encode).latent_dist
        return latent_dist.mean, latent_dist.std

    mean, std = jax.jit(encode)(params, images)
    # Flax moments are NHWC; decode is given NHWC latents (it guesses the layout from the last axis).
    nchw = (0, 3, 1, 2)
    assert_close(np.transpose(mean, nchw), posterior.mean.numpy())
    assert_close(np.transpose(std, nchw), posterior.std.numpy())
    flax_decoded = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode).sample)(
        params, latents.transpose(0, 2, 3, 1)
    )
    assert_close(flax_decoded, decoded)
    assert module.scaling_factor == torch_pipe.vae.config.scaling_factor


def test_vae_old_attention_names_load_the_same(sd15, tmp_path):
    """Checkpoints written before diffusers 0.14 name the VAE attention query/key/value/proj_attn."""
    import safetensors.torch

    folder, _, pipe = sd15
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_bytes((folder / "vae" / "config.json").read_bytes())
    state = safetensors.torch.load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        for new_name, old_name in old.items():
            key = key.replace(f".{new_name}.", f".{old_name}.")
        renamed[key] = value
    assert renamed.keys() != state.keys()
    safetensors.torch.save_file(renamed, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    from ipadapter_jax.weights.diffusers_models import load_vae

    loaded = load_vae(tmp_path / "vae")
    for path, value in flat(pipe.vae.params).items():
        np.testing.assert_array_equal(flat(loaded.params)[path], value)


def torch_text(encoder, ids: np.ndarray):
    with torch.no_grad():
        return encoder(torch.from_numpy(ids).long(), output_hidden_states=True)


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_tokenizer_and_text_encoders_match_pytorch(base, request):
    _, torch_pipe, pipe = request.getfixturevalue(base)
    pairs = [(torch_pipe.tokenizer, pipe.tokenizer, torch_pipe.text_encoder, pipe.text_encoder)]
    if base == "sdxl":
        pairs.append((torch_pipe.tokenizer_2, pipe.tokenizer_2, torch_pipe.text_encoder_2, pipe.text_encoder_2))
    for torch_tokenizer, tokenizer, torch_encoder, encoder in pairs:
        ids = tokenizer(PROMPTS, padding="max_length", max_length=tiny_folders.MAX_TOKENS, return_tensors="np")
        expected_ids = torch_tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="np").input_ids
        np.testing.assert_array_equal(ids.input_ids, expected_ids)
        assert len(set(ids.input_ids[0])) > 4  # the BPE vocabulary is really used, not just unknown tokens
        expected = torch_text(torch_encoder, ids.input_ids)
        out = encoder.module(ids.input_ids, params=encoder.params, output_hidden_states=True)
        assert_close(out.last_hidden_state, expected.last_hidden_state.numpy())
        assert_close(out.hidden_states[-2], expected.hidden_states[-2].numpy())  # SDXL's conditioning layer
        if hasattr(expected, "text_embeds"):
            assert_close(out.text_embeds, expected.text_embeds.numpy())
        else:
            assert_close(out.pooler_output, expected.pooler_output.numpy())


def test_schedulers_take_the_noise_schedule_of_the_folder(sd15):
    """SD1.5 ships a PNDM config (scaled_linear betas, clip_sample False, steps_offset 1); every Flax kind gets
    its betas, and a DDIM step equals PyTorch's DDIM built from the same config."""
    from diffusers import DDIMScheduler

    folder, torch_pipe, pipe = sd15
    expected_alphas = torch_pipe.scheduler.alphas_cumprod.numpy()
    for kind in SCHEDULERS:
        _, state = load_scheduler(folder / "scheduler", kind)
        np.testing.assert_allclose(state.alphas_cumprod, expected_alphas, rtol=1e-5)  # fp32 cumprod order

    torch_ddim = DDIMScheduler.from_config(torch_pipe.scheduler.config)
    torch_ddim.set_timesteps(10)
    scheduler, state = pipe.scheduler, pipe.scheduler_state
    state = scheduler.set_timesteps(state, 10, (1, 4, 8, 8))
    np.testing.assert_array_equal(state.timesteps, torch_ddim.timesteps.numpy())
    rng = np.random.default_rng(3)
    sample, noise = (rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(2))
    t = int(torch_ddim.timesteps[2])
    expected = torch_ddim.step(torch.from_numpy(noise), t, torch.from_numpy(sample)).prev_sample.numpy()
    assert_close(scheduler.step(state, noise, t, sample).prev_sample, expected, rtol=1e-6)


@pytest.fixture(scope="module")
def sd2_unet(tmp_path_factory):
    """SD2-like UNet (linear projections, head-count lists), saved as `.bin`."""
    folder = tmp_path_factory.mktemp("sd2") / "unet"
    unet = tiny_folders.unet(tiny_folders.SD2_TINY, seed=2)
    unet.save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    return folder, unet


def test_sd2_unet_from_bin_matches_pytorch(sd2_unet):
    folder, torch_unet = sd2_unet
    loaded = load_unet(folder)
    assert loaded.report.weights.endswith(".bin")
    inputs = unet_inputs(tiny_folders.SD2_TINY, seed=4)
    assert_close(flax_unet_out(loaded, inputs), torch_unet_out(torch_unet, inputs))


def test_sharded_and_fp16_variant_load_like_the_single_file(sd15, tmp_path):
    folder, torch_pipe, pipe = sd15
    torch_pipe.unet.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    sharded = load_unet(tmp_path / "sharded")
    assert sharded.report.weights.endswith(".index.json")
    for path, value in flat(pipe.unet.params).items():
        np.testing.assert_array_equal(flat(sharded.params)[path], value)

    # A fine-tune shipped as an fp16 variant: same keys and shapes, loaded as fp32 values of the fp16 weights.
    half = tiny_folders.unet(tiny.SD15_TINY).half()
    half.save_pretrained(tmp_path / "fp16", variant="fp16")
    fp16 = load_unet(tmp_path / "fp16", variant="fp16")
    for path, value in flat(pipe.unet.params).items():
        np.testing.assert_array_equal(flat(fp16.params)[path], np.asarray(value).astype(np.float16).astype(np.float32))
        assert flat(fp16.params)[path].dtype == jnp.float32


def test_controlnet_residuals_match_pytorch(tmp_path):
    torch_net = tiny_folders.controlnet()
    torch_net.save_pretrained(tmp_path / "controlnet")
    loaded = load_controlnet(tmp_path / "controlnet")
    inputs = unet_inputs(tiny.SD15_TINY, seed=5)
    cond = np.random.default_rng(6).uniform(0, 1, (BATCH, 3, 128, 128)).astype(np.float32)
    with torch.no_grad():
        expected = torch_net(
            torch.from_numpy(inputs["sample"]),
            torch.from_numpy(inputs["timesteps"]).long(),
            torch.from_numpy(inputs["text"]),
            torch.from_numpy(cond),
            return_dict=False,
        )
    module = loaded.module
    down, mid = jax.jit(lambda p, x, t, c, h: module.apply({"params": p}, x, t, c, h, return_dict=False))(
        loaded.params, inputs["sample"], inputs["timesteps"], inputs["text"], cond
    )
    # Flax residuals are NHWC, the layout diffusers' Flax UNet adds them in.
    assert len(down) == len(expected[0]) == 3 * len(tiny.SD15_TINY["block_out_channels"])
    for actual, want in zip(down, expected[0]):
        assert_close(np.transpose(actual, (0, 3, 1, 2)), want.numpy())
    assert_close(np.transpose(mid, (0, 3, 1, 2)), expected[1].numpy())


def test_dpm_solver_from_an_sdxl_scheduler_config_has_diffusers_timesteps(tmp_path):
    """SDXL ships "leading" spacing with steps_offset=1, which diffusers' Flax DPM-Solver reads from its config
    without taking it as an argument: the loader must carry it over (same timesteps as PyTorch diffusers)."""
    import json

    from diffusers import DPMSolverMultistepScheduler

    config = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler", **config}))
    scheduler, state = load_scheduler(tmp_path, "dpm_solver_multistep")
    state = scheduler.set_timesteps(state, 10, (1, 4, 8, 8))
    reference = DPMSolverMultistepScheduler(**config)
    reference.set_timesteps(10)
    np.testing.assert_array_equal(np.asarray(state.timesteps), reference.timesteps.numpy())
