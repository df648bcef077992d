"""LoRA files merged at load time (`load_base(loras=...)`, `apply_loras`) vs diffusers' PyTorch `load_lora_weights`.

Random LoRAs over the tiny SD1.5/SDXL pipelines' PyTorch UNet (attention and feed-forward Linears, a 1x1 and a 3x3
conv) and text encoders (`ipadapter_jax.testing.lora_files`), saved as diffusers/peft (alphas in the header
metadata, one module with its own alpha), kohya (`.alpha` tensors, one module with its own) and the pre-peft
diffusers format. diffusers loads them with `load_lora_weights` + `set_adapters(weights=SCALE)`; we merge them into
the Flax params. Tolerance: 1e-5 of the output's max on the UNet's noise prediction and the text encoders' hidden
states (measured ~1e-6 / ~5e-7); the LoRAs move the UNet's output by ~100% of its max, so the check discriminates.
Pipelines with an IP-Adapter too: the pipeline test's 5e-5 bound on [0, 1] pixels.

One difference from diffusers, not tested against it: diffusers drops a kohya file's per-module alpha on attention
projections (its alpha names for `to_q_lora` never match a module), so it scales them by the file's most common
alpha; we use each module's own alpha, as kohya's sd-scripts and other loaders do.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from ipadapter_jax.cli.generate import lora_argument
from ipadapter_jax.models.text_encoder import PromptEncoder
from ipadapter_jax.pipelines import IPAdapterPipeline
from ipadapter_jax.testing import lora_files
from ipadapter_jax.testing import pipeline_fixtures as tu
from ipadapter_jax.weights import apply_loras, load_base
from ipadapter_jax.weights.torch_layout import ConversionError

RTOL = 1e-5
SCALE = 0.7
PROMPT = "the red cat"
# One module with an alpha of its own: peft's alpha_pattern; kohya's `.alpha` (on a conv: see the docstring).
SPECIAL = {
    "peft": ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 2.0),
    "kohya": ("down_blocks.0.resnets.0.conv1", 2.0),
    "diffusers": None,
    lora_files.KOHYA_SGM: ("down_blocks.0.resnets.0.conv1", 2.0),
}
ALPHAS = {"unet": 8.0, "text_encoder": 2.0, "text_encoder_2": 6.0}


def torch_outputs(pipe, latents: np.ndarray, added: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' text conditioning of PROMPT (SD1.5: the last hidden state; SDXL: both encoders' penultimate states)
    and its UNet's noise prediction at t=500 on it."""
    pairs = [
        (pipe.tokenizer, pipe.text_encoder),
        (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)),
    ]
    with torch.no_grad():
        states = []
        for tokenizer, encoder in (pair for pair in pairs if pair[1] is not None):
            ids = tokenizer([PROMPT], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
            out = encoder(ids.input_ids, output_hidden_states=True)
            states.append(out.hidden_states[-2] if added else out.last_hidden_state)
        context = torch.cat(states, -1)
        kwargs = {} if not added else {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}}
        noise = pipe.unet(torch.from_numpy(latents), 500, context, **kwargs).sample
    return noise.numpy(), context.numpy()


def flax_outputs(base, latents: np.ndarray, added: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    context = PromptEncoder(base.text_encoders)([PROMPT]).context
    if base.is_sdxl not in _UNET_FORWARD:  # one compile per model shape, shared by the tests
        unet = base.unet
        _UNET_FORWARD[base.is_sdxl] = jax.jit(
            lambda p, x, t, c, a: unet.apply({"params": p}, x, t, c, added_cond_kwargs=a).sample
        )
    added = None if added is None else {k: jnp.asarray(v) for k, v in added.items()}
    noise = _UNET_FORWARD[base.is_sdxl](base.unet_params, jnp.asarray(latents), jnp.asarray([500]), context, added)
    return np.asarray(noise), np.asarray(context)


_UNET_FORWARD: dict = {}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def saved_lora(models: tu.SavedPipelines, fmt: str, name: str = "") -> Path:
    pipe = models.torch_base
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        components["text_encoder_2"] = pipe.text_encoder_2
    path = models.folder / f"lora-{fmt}{name}.safetensors"
    if not path.exists():
        config = dict(pipe.unet.config)
        lora_files.save_lora(path, lora_files.random_lora(components), fmt, ALPHAS, SPECIAL[fmt], unet_config=config)
    return path


def diffusers_with_lora(pipe, path: Path, scale: float = SCALE):
    pipe = copy.deepcopy(pipe)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[scale])
    return pipe


@pytest.mark.parity
@pytest.mark.parametrize("fmt", lora_files.FORMATS)
def test_sd15_lora_matches_diffusers_load_lora_weights(sd15: tu.SavedPipelines, fmt: str):
    path = saved_lora(sd15, fmt)
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    noise, context = torch_outputs(diffusers_with_lora(sd15.torch_base, path), latents)
    ours_noise, ours_context = flax_outputs(load_base(sd15.folder, progress=False, loras=[(path, SCALE)]), latents)
    assert relative_error(ours_context, context) <= RTOL
    assert relative_error(ours_noise, noise) <= RTOL
    plain, _ = torch_outputs(sd15.torch_base, latents)
    assert relative_error(plain, noise) > 0.3  # the LoRA changes the prediction a lot


@pytest.mark.parity
@pytest.mark.slow
def test_sdxl_kohya_lora_in_original_unet_naming_matches_diffusers(sdxl: tu.SavedPipelines):
    """kohya's SDXL layout: UNet modules named after the original UNet (down/mid/up blocks' resnets, attentions,
    samplers), `lora_te1_` and `lora_te2_` for both text encoders."""
    path = saved_lora(sdxl, lora_files.KOHYA_SGM)
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    added = {"text_embeds": rng.standard_normal((1, 32)).astype(np.float32),
             "time_ids": np.array([[64, 64, 0, 0, 64, 64]], np.float32)}  # fmt: skip
    noise, context = torch_outputs(diffusers_with_lora(sdxl.torch_base, path), latents, added)
    ours_noise, ours_context = flax_outputs(
        load_base(sdxl.folder, progress=False, loras=[(path, SCALE)]), latents, added
    )
    assert relative_error(ours_context, context) <= RTOL
    assert relative_error(ours_noise, noise) <= RTOL


@pytest.mark.parity
@pytest.mark.slow
def test_pipeline_with_lora_and_ip_adapter_matches_diffusers(sd15: tu.SavedPipelines):
    path = saved_lora(sd15, "peft")
    image = tu.test_image(0)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    torch_pipe = diffusers_with_lora(tu.torch_pipeline_with_adapter(sd15.folder, sd15.torch_base, "base"), path)
    torch_pipe.set_ip_adapter_scale(0.6)
    with torch.no_grad():
        expected = torch_pipe(prompt=PROMPT, ip_adapter_image=image, num_inference_steps=4, height=64, width=64,
                              latents=torch.from_numpy(latents), output_type="np").images  # fmt: skip
    pipe = IPAdapterPipeline.from_pretrained(
        sd15.folder, tu.adapter_file(sd15.folder, "base"), sd15.folder / "image_encoder", progress=False,
        loras=[(path, SCALE)],
    )  # fmt: skip
    ours = pipe([image], prompt=PROMPT, scale=0.6, num_inference_steps=4, height=64, width=64, latents=latents).pixels
    assert np.abs(ours - expected).max() <= 5e-5


@pytest.fixture(scope="module")
def sd15_base(sd15: tu.SavedPipelines):
    return load_base(sd15.folder, progress=False)


def write(path: Path, state: dict) -> Path:
    safetensors.numpy.save_file({k: np.asarray(v, np.float32) for k, v in state.items()}, str(path))
    return path


def test_two_loras_and_scales_add_up(sd15_base, tmp_path):
    """Hand-computed: a rank-1 LoRA on one Linear adds scale * alpha / rank * outer(up, down) to W^T."""
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    kernel = np.asarray(sd15_base.unet_params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]
                        ["to_v"]["kernel"])  # fmt: skip
    down, up = np.arange(kernel.shape[0], dtype=np.float32)[None] / 10, np.ones((kernel.shape[1], 1), np.float32)
    first = write(
        tmp_path / "a.safetensors", {f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up}
    )
    kohya = f"lora_unet_{module.replace('.', '_')}"
    second = write(tmp_path / "b.safetensors", {f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": 2 * up,
                                                f"{kohya}.alpha": np.float32(0.5)})  # fmt: skip
    merged = apply_loras(sd15_base, [(first, 0.5), (second, 3.0)])
    got = np.asarray(merged.unet_params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_v"]
                     ["kernel"])  # fmt: skip
    expected = kernel + (0.5 * 1.0 + 3.0 * 0.5 * 2.0) * np.outer(down[0], up[:, 0])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "state, message",
    [
        (
            {
                "unet.no_such_block.to_q.lora_A.weight": np.ones((1, 4)),
                "unet.no_such_block.to_q.lora_B.weight": np.ones((4, 1)),
            },
            "key 'unet.no_such_block.to_q.lora_A.weight': unet has no Linear or Conv2d module 'no_such_block.to_q'",
        ),  # fmt: skip
        (
            {
                "unet.mid_block.attentions.0.proj_in.lora_A.weight": np.ones((2, 64, 1, 1)),
                "unet.mid_block.attentions.0.proj_in.lora_B.weight": np.ones((32, 2, 1, 1)),
            },
            "'mid_block.attentions.0.proj_in' is (32, 64, 1, 1), the module's weight is (64, 64, 1, 1)",
        ),  # fmt: skip
        ({"unet.conv_in.lora_A.weight": np.ones((2, 4, 3, 3))}, "'unet.conv_in.lora_A.weight' has no matching up"),
        (
            {
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones((1, 32)),
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": np.ones((37, 1)),
            },
            "adapts text_encoder_2, but the base model has 1 text encoder(s)",
        ),  # fmt: skip
        (
            {
                "lora_unet_middle_block_7_proj_in.lora_down.weight": np.ones((1, 4)),
                "lora_unet_middle_block_7_proj_in.lora_up.weight": np.ones((4, 1)),
            },
            "unet has no Linear or Conv2d module 'middle_block_7_proj_in'",
        ),  # fmt: skip
        (
            {
                "unet.conv_in.lora_A.weight": np.ones((2, 4)),
                "unet.conv_in.lora_B.weight": np.ones((3, 2)),
                "unet.conv_in.dora_scale": np.ones(3),
            },
            "'unet.conv_in.dora_scale': DoRA",
        ),  # fmt: skip
        ({"vae.decoder.conv_in.lora_A.weight": np.ones((2, 4))}, "'vae.decoder.conv_in.lora_A.weight' is not part"),
        (
            {"unet.conv_in.lora_A.weight": np.ones((2, 4)), "unet.conv_in.lora_B.weight": np.ones((3, 5))},
            "down (2, 4) and up (3, 5) are not a LoRA pair",
        ),  # fmt: skip
    ],
    ids=[
        "unknown_module",
        "shape_mismatch",
        "no_up",
        "second_text_encoder",
        "unknown_sgm",
        "dora",
        "unknown_key",
        "pair",
    ],
)
def test_a_lora_that_does_not_fit_is_one_clear_error(sd15_base, tmp_path, state: dict, message: str):
    path = write(tmp_path / "bad.safetensors", state)
    with pytest.raises(ConversionError) as err:
        apply_loras(sd15_base, [(path, 1.0)])
    assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_lora_argument_takes_an_optional_trailing_scale():
    assert lora_argument("style.safetensors") == ("style.safetensors", 1.0)
    assert lora_argument("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert lora_argument("gs://bucket/style.safetensors") == ("gs://bucket/style.safetensors", 1.0)
    assert lora_argument("gs://bucket/style.safetensors:-1") == ("gs://bucket/style.safetensors", -1.0)
    with pytest.raises(Exception, match="finite"):
        lora_argument("style.safetensors:nan")


def test_loras_change_only_the_named_kernels(sd15_base, sd15: tu.SavedPipelines):
    merged = apply_loras(sd15_base, [(saved_lora(sd15, "kohya"), SCALE)])
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                           sd15_base.unet_params, merged.unet_params))  # fmt: skip
    layers = lora_files.random_lora({"unet": sd15.torch_base.unet})
    assert sum(changed) == len([key for key in layers if key[0] == "unet"])
