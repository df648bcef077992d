"""`IPAdapterPipeline` vs diffusers' PyTorch pipelines with the same IP-Adapter, end to end, fp32 on CPU.

Tiny random SD1.5-like and SDXL-like pipelines (DDIM, a CLIP image encoder, a ControlNet) and random base/Plus
adapters in the official layout are saved to disk (`ipadapter_jax.testing.pipeline_fixtures`). diffusers' pipelines load
the adapter with `load_ip_adapter`; ours loads every component with the project's loaders. Both start from the same
initial latents. Tolerance: max |ours - diffusers| <= 5e-5 on [0, 1] pixels, 64x64, 4 DDIM steps. Measured: 2e-6
to 1e-5 for every case, with the UNet's PyTorch numerics (`pytorch_numerics`; diffusers' Flax numerics gave 1e-5
to 8e-5); the image branch moves the images by 0.2-0.4 (`test_parity_is_discriminating`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from ipadapter_jax.pipelines import IPAdapterPipeline
from ipadapter_jax.pipelines.sampling import Sampler
from ipadapter_jax.testing import pipeline_fixtures as tu
from ipadapter_jax.testing.compilations import lowerings

pytestmark = pytest.mark.parity

TOLERANCE = 5e-5
SIZE, STEPS = 64, 4
IMAGE = tu.test_image(0)
GRAY_IMAGE = tu.test_image(1, (50, 70), "L")
CONTROL_IMAGE = tu.test_image(5, (SIZE, SIZE))
LATENTS = np.random.default_rng(0).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
PER_BLOCK = {"down": {"block_1": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}, "mid": 0.5}


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str = "base"
    images: tuple = (IMAGE,)
    prompt: str = "a red cat"
    negative_prompt: str | None = None
    scale: float | dict = 0.6
    guidance_scale: float = 7.5
    controlnet: bool = False


SD15_CASES = {
    "image_only": Case(prompt="", scale=1.0),
    "text_and_image": Case(negative_prompt="ugly"),
    "cfg_off": Case(guidance_scale=1.0, scale=1.0),
    "scale_0": Case(scale=0.0),
    "scale_1": Case(scale=1.0),
    "per_block_scale": Case(scale=PER_BLOCK),
    "two_images": Case(images=(IMAGE, GRAY_IMAGE)),
    "plus": Case(kind="plus"),
    "plus_two_images": Case(kind="plus", images=(IMAGE, GRAY_IMAGE)),
    "controlnet": Case(controlnet=True),
}
SDXL_CASES = {
    "text_and_image": Case(),  # no negative prompt: SDXL's zero negative text conditioning
    "image_only_negative_prompt": Case(prompt="", negative_prompt="ugly", scale=1.0),
}


def run_torch(models: tu.SavedPipelines, case: Case, **extra) -> np.ndarray:
    pipe = models.torch(case.kind, case.controlnet)
    pipe.set_ip_adapter_scale(case.scale)
    if case.controlnet:
        extra.update(image=CONTROL_IMAGE, controlnet_conditioning_scale=0.8)
    if "ip_adapter_image_embeds" not in extra:
        extra["ip_adapter_image"] = case.images[0] if len(case.images) == 1 else [list(case.images)]
    with torch.no_grad():
        return pipe(
            prompt=case.prompt,
            negative_prompt=case.negative_prompt,
            num_inference_steps=STEPS,
            guidance_scale=case.guidance_scale,
            height=SIZE,
            width=SIZE,
            latents=torch.from_numpy(LATENTS),
            output_type="np",
            **extra,
        ).images


def run_flax(models: tu.SavedPipelines, case: Case, pipe: IPAdapterPipeline | None = None, **extra) -> np.ndarray:
    if case.controlnet:
        extra.update(control_image=CONTROL_IMAGE, controlnet_conditioning_scale=0.8)
    if "image_embeds" not in extra:
        extra["image"] = list(case.images)
    out = (pipe or models.flax(case.kind, case.controlnet))(
        prompt=case.prompt,
        negative_prompt=case.negative_prompt,
        scale=case.scale,
        guidance_scale=case.guidance_scale,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        latents=LATENTS,
        **extra,
    )
    assert out.pixels.shape == (1, SIZE, SIZE, 3) and out.images[0].size == (SIZE, SIZE)
    return out.pixels


def assert_images_close(actual: np.ndarray, expected: np.ndarray, tolerance: float = TOLERANCE) -> None:
    assert actual.shape == expected.shape
    err = np.abs(actual - expected).max()
    assert err <= tolerance, f"max |ours - diffusers| = {err:.2e} > {tolerance} on [0, 1] pixels"


@pytest.mark.parametrize("name", list(SD15_CASES))
def test_sd15_matches_diffusers(sd15: tu.SavedPipelines, name: str):
    case = SD15_CASES[name]
    assert_images_close(run_flax(sd15, case), run_torch(sd15, case))


@pytest.mark.parametrize("name", list(SDXL_CASES))
def test_sdxl_matches_diffusers(sdxl: tu.SavedPipelines, name: str):
    case = SDXL_CASES[name]
    assert_images_close(run_flax(sdxl, case), run_torch(sdxl, case))


@pytest.mark.parametrize("kernel", ["xla", "splash"])
def test_from_pretrained_with_another_attention_kernel_matches_diffusers(sd15: tu.SavedPipelines, kernel: str):
    """`from_pretrained(attention_implementation=...)`: the UNet attends with jax.nn.dot_product_attention ("xla") or
    Pallas splash attention ("splash", interpret mode on a CPU) inside the compiled sampling loop."""
    case = SD15_CASES["text_and_image"]
    pipe = IPAdapterPipeline.from_pretrained(
        sd15.folder,
        tu.adapter_file(sd15.folder, case.kind),
        sd15.folder / "image_encoder",
        attention_implementation=kernel,
        progress=False,
    )
    assert pipe.base.unet.attention_implementation == kernel
    assert_images_close(run_flax(sd15, case, pipe=pipe), run_torch(sd15, case))


def test_from_pretrained_with_an_unknown_attention_kernel_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"attention_implementation must be one of .*'splash'\), got 'flash'"):
        IPAdapterPipeline.from_pretrained(tmp_path, "a.safetensors", tmp_path, attention_implementation="flash")


def test_negative_image_matches_diffusers_negative_embeddings(sd15: tu.SavedPipelines):
    """A negative image replaces the zero embedding; diffusers takes it as precomputed [negative, positive]."""
    case = Case()
    pipe = sd15.flax("base")
    ours = run_flax(sd15, case, negative_image=GRAY_IMAGE)
    embeds = np.stack([pipe.encode_image(GRAY_IMAGE), pipe.encode_image(IMAGE)])  # (2, 1 image, D)
    theirs = run_torch(sd15, case, ip_adapter_image_embeds=[torch.from_numpy(embeds)])
    assert_images_close(ours, theirs)
    assert np.abs(ours - run_flax(sd15, case)).max() > 100 * TOLERANCE


def test_precomputed_embeddings_equal_images(sd15: tu.SavedPipelines):
    pipe = sd15.flax("plus")
    features = pipe.encode_image([IMAGE, GRAY_IMAGE])
    assert features.shape == (2, tu.tiny.PLUS_TOKENS, tu.tiny.PLUS_HIDDEN)
    case = Case(kind="plus", images=(IMAGE, GRAY_IMAGE))
    np.testing.assert_array_equal(run_flax(sd15, case, image_embeds=features), run_flax(sd15, case))
    zero_features = pipe.image_prompt_encoder.negative_features(2)
    np.testing.assert_array_equal(
        run_flax(sd15, case, negative_image_embeds=np.asarray(zero_features)), run_flax(sd15, case)
    )


def test_per_prompt_images_match_diffusers_one_call_per_prompt(sd15: tu.SavedPipelines):
    """Two prompts, each with its own image prompt, in one call == diffusers run once per prompt with that
    prompt's image and noise. (diffusers has no per-row image prompts in one call: it repeats precomputed image
    embeddings `batch_size * num_images_per_prompt` times, as one image prompt for the whole batch.)"""
    pipe = sd15.flax("base")
    latents = np.random.default_rng(1).standard_normal((2, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
    prompts, images = ["a red cat", "a blue dog"], [IMAGE, GRAY_IMAGE]
    settings = dict(guidance_scale=7.5, num_inference_steps=STEPS, height=SIZE, width=SIZE)
    ours = pipe(images, per_prompt_images=True, prompt=prompts, latents=latents, scale=0.8, **settings).pixels
    torch_pipe = sd15.torch("base")
    torch_pipe.set_ip_adapter_scale(0.8)
    theirs = []
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        with torch.no_grad():
            theirs.append(
                torch_pipe(
                    prompt=prompt,
                    ip_adapter_image=image,
                    latents=torch.from_numpy(latents[i : i + 1]),
                    output_type="np",
                    **settings,
                ).images
            )
    assert_images_close(ours, np.concatenate(theirs))
    assert np.abs(ours[0] - ours[1]).max() > 0.05


def test_per_prompt_images_and_seeds_equal_one_call_per_prompt(sd15: tu.SavedPipelines):
    """What batched evaluation relies on: prompt p of a per-prompt call (images, seed[p]) = a call for p alone."""
    pipe = sd15.flax("plus")
    settings = dict(scale=1.0, num_inference_steps=STEPS, height=SIZE, width=SIZE, num_images_per_prompt=2)
    prompts = [[IMAGE], [GRAY_IMAGE]]
    batched = pipe(prompts, per_prompt_images=True, prompt=["", "a cat"], seed=[3, 7], **settings)
    assert batched.pixels.shape == (4, SIZE, SIZE, 3) and batched.settings["seed"] == [3, 7]
    alone = [pipe(IMAGE, prompt="", seed=3, **settings), pipe(GRAY_IMAGE, prompt="a cat", seed=7, **settings)]
    np.testing.assert_allclose(batched.pixels, np.concatenate([a.pixels for a in alone]), atol=1e-5, rtol=0)
    embeds = np.stack([pipe.encode_image(IMAGE), pipe.encode_image(GRAY_IMAGE)])  # (prompts, 1, S, E)
    from_embeds = pipe(image_embeds=embeds, per_prompt_images=True, prompt=["", "a cat"], seed=[3, 7], **settings)
    np.testing.assert_allclose(from_embeds.pixels, batched.pixels, atol=1e-5, rtol=0)  # encoded 1 vs 2 at a time
    with pytest.raises(ValueError, match=r"one image prompt per text prompt \(2\).*got 3"):
        pipe([IMAGE, IMAGE, IMAGE], per_prompt_images=True, prompt=["", ""], **settings)
    with pytest.raises(ValueError, match=r"same number of images each; got 2 image prompts of \[1, 2\]"):
        pipe([IMAGE, [IMAGE, GRAY_IMAGE]], per_prompt_images=True, prompt=["", ""], **settings)
    with pytest.raises(ValueError, match=r"image_embeds must be \(prompts=2, images, \*feature_shape\)"):
        pipe(image_embeds=embeds[:1], per_prompt_images=True, prompt=["", ""], **settings)
    with pytest.raises(ValueError, match=r"seed: one per prompt \(2\) or a single int; got 1"):
        pipe(prompts, per_prompt_images=True, prompt=["", ""], seed=[1], **settings)


def test_parity_is_discriminating(sd15: tu.SavedPipelines):
    """The image branch moves the images far beyond the tolerance, so the parity tests can see it."""
    base = run_flax(sd15, Case(scale=0.0))
    assert np.abs(run_flax(sd15, Case(scale=1.0)) - base).max() > 100 * TOLERANCE
    assert np.abs(run_flax(sd15, Case(images=(GRAY_IMAGE,), scale=1.0)) - run_flax(sd15, Case(scale=1.0))).max() > 0.05


def test_image_step_range_turns_the_image_branch_off_outside_it(sd15: tu.SavedPipelines):
    case = Case(scale=1.0)
    never = run_flax(sd15, case, image_step_range=(0.0, 0.0))
    np.testing.assert_array_equal(never, run_flax(sd15, Case(scale=0.0)))
    np.testing.assert_array_equal(run_flax(sd15, case, image_step_range=(0.0, 1.0)), run_flax(sd15, case))
    first_half = run_flax(sd15, case, image_step_range=(0.0, 0.5))
    assert np.abs(first_half - never).max() > 0.01 and np.abs(first_half - run_flax(sd15, case)).max() > 0.01


def test_text_to_image_without_image_prompt_is_scale_0(sd15: tu.SavedPipelines):
    pipe = sd15.flax("base")
    plain = pipe(prompt="a red cat", num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=LATENTS)
    assert plain.settings["num_prompt_images"] == 0
    assert_images_close(plain.pixels, run_flax(sd15, Case(scale=0.0)), tolerance=1e-5)


def test_changing_scale_guidance_prompt_or_seed_does_not_recompile(sd15: tu.SavedPipelines):
    pipe = sd15.flax("base")
    request = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE)
    pipe(IMAGE, prompt="a red cat", **request)  # compiles (or finds) every function this structure needs
    compiled = pipe.sampler.num_compiled
    with lowerings() as lowered:
        for change in (
            dict(scale=0.3),
            dict(scale=PER_BLOCK),
            dict(guidance_scale=3.0),
            dict(prompt="the dog and the cat", negative_prompt="ugly"),
            dict(seed=7),
            dict(image_step_range=(0.25, 0.75)),
        ):
            out = pipe(GRAY_IMAGE, **{"prompt": "a cat", **request, **change})
            assert out.timings["compile_s"] == 0.0
    assert lowered == [], f"{len(lowered)} functions were compiled again"
    assert pipe.sampler.num_compiled == compiled


def test_step_progress_reports_every_step_and_changes_nothing(sd15: tu.SavedPipelines, monkeypatch):
    steps = []
    report = Sampler._report_step  # the loop's host callback binds it when it is traced: patch before that
    monkeypatch.setattr(Sampler, "_report_step", lambda self, done: (steps.append(int(done)), report(self, done)))
    pipe = sd15.flax("base")
    case = Case(scale=1.0)
    with_steps = run_flax(sd15, case, progress=True, step_progress=True)
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    np.testing.assert_array_equal(with_steps, run_flax(sd15, case))
    assert pipe.sampler.num_compiled >= 2  # the executables with and without the callback


def test_one_and_eight_devices_give_the_same_images(sd15: tu.SavedPipelines, tmp_path):
    """The same request on this process's single CPU device and, in a subprocess, on 8 host devices (6 images:
    one per device plus 2 padding rows there)."""
    out = tmp_path / "eight.npy"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cache = jax.config.jax_compilation_cache_dir or ".jax_cache"
    result = subprocess.run(
        [sys.executable, "-m", "ipadapter_jax.testing.pipeline_fixtures", str(sd15.folder), str(out), cache],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "devices=8" in result.stdout
    assert jax.device_count() == 1
    one = sd15.flax("base")(IMAGE, **tu.SHARDED_REQUEST).pixels
    # Different per-device batch sizes change XLA's CPU kernels' rounding, not the images: measured 2.3e-6.
    assert_images_close(np.load(out), one, tolerance=1e-5)
    assert one.shape == (6, SIZE, SIZE, 3)


# A non-default scheduler folder per kind: the settings diffusers' Flax schedulers dropped.
SCHEDULER_FOLDERS = {
    "ddim": dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    "dpm_solver_multistep": dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_type="heun"),
    "euler": dict(timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"),
}


@pytest.mark.parametrize("kind", list(SCHEDULER_FOLDERS))
def test_scheduler_folders_match_diffusers(sd15: tu.SavedPipelines, tmp_path, kind: str):
    """Each kind loaded from a scheduler folder with non-default settings, against diffusers' pipeline with that
    kind's PyTorch scheduler loaded from the same folder. Measured: DDIM 6.3e-6, DPM-Solver++ 2.0e-6, Euler 7.3e-6
    (with diffusers' Flax numerics, which v-prediction amplifies: 2.3e-4, 4.4e-5, 2.0e-4)."""
    import diffusers

    from ipadapter_jax.weights.diffusers_models import SCHEDULERS, load_scheduler

    settings = dict(tu.DDIM, **SCHEDULER_FOLDERS[kind])
    torch_class = SCHEDULERS[kind].name  # diffusers' PyTorch class of the same behaviour
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": torch_class, **settings}))
    pipe = sd15.flax("base").with_scheduler(*load_scheduler(tmp_path, kind))
    request = dict(prompt="a red cat", scale=0.6, num_inference_steps=STEPS, height=SIZE, width=SIZE)
    ours = pipe(IMAGE, latents=LATENTS, **request)
    assert ours.settings["scheduler"] == torch_class
    torch_pipe = sd15.torch("base")
    original = torch_pipe.scheduler
    torch_pipe.scheduler = getattr(diffusers, torch_class).from_pretrained(tmp_path)
    try:
        theirs = run_torch(sd15, Case())
    finally:
        torch_pipe.scheduler = original
    assert_images_close(ours.pixels, theirs)


# --- bad input -------------------------------------------------------------------------------------------------
