"""Tiny random PyTorch IP-Adapter pipelines saved to disk, and our Flax pipeline loaded from the same files.

Components come from `tests.tiny_folders` (UNet, text encoders, tokenizer, ControlNet), plus:
- a 4-block VAE (down-sampling 8, as every Stable Diffusion VAE; the ControlNet's conditioning embedding
  down-samples by 8 too),
- a CLIP `CLIPVisionModelWithProjection` (hidden 40 = `tiny.PLUS_HIDDEN`, 224 px in patches of 112: 5 tokens =
  `tiny.PLUS_TOKENS`; projection 48 = the base adapter's input) and the default `CLIPImageProcessor`,
- SD1.5's DDIM settings (scaled-linear betas, no clipping, steps_offset 1), saved as the pipeline's scheduler,
- random adapters in the official layout (`tiny.random_official_adapter`) saved as `.safetensors`.

`python -m tests.pipeline_testutil FOLDER OUT.npy` runs `SHARDED_REQUEST` (the multi-device test's subprocess).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch

from tests import tiny, tiny_folders

CLIP_DIM = 48  # image encoder projection_dim: the base adapter's input
NUM_TOKENS = 4  # tokens per image of the tiny adapters (base and Plus)

VAE_TINY = dict(
    block_out_channels=(32, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    sample_size=64,
)

DDIM = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return tiny_folders.perturb(AutoencoderKL(**VAE_TINY).eval(), seed)


def image_encoder(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=tiny.PLUS_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=224,
        patch_size=112,
        projection_dim=CLIP_DIM,
    )
    torch.manual_seed(seed)
    return tiny_folders.perturb(CLIPVisionModelWithProjection(config).eval(), seed)


def save_pipeline(folder: Path, kind: str, controlnet: bool = False):
    """Builds and saves a tiny `kind` ("sd15" or "sdxl") PyTorch pipeline with DDIM and an image encoder into
    `folder`, a base and a Plus adapter file (`adapter_file`) and, with `controlnet`, `folder/controlnet`.
    Returns the PyTorch pipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPImageProcessor

    common = dict(
        vae=vae(),
        tokenizer=tiny_folders.tokenizer(),
        scheduler=DDIMScheduler(**DDIM),
        image_encoder=image_encoder(),
        feature_extractor=CLIPImageProcessor(),
    )
    if kind == "sd15":
        pipe = StableDiffusionPipeline(
            text_encoder=tiny_folders.text_encoder(),
            unet=tiny_folders.unet(tiny.SD15_TINY),
            safety_checker=None,
            requires_safety_checker=False,
            **common,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            text_encoder=tiny_folders.text_encoder(32, seed=1),
            text_encoder_2=tiny_folders.text_encoder(32, projection=True, seed=2),
            tokenizer_2=tiny_folders.tokenizer(),
            unet=tiny_folders.unet(tiny.SDXL_TINY, 1),
            add_watermarker=False,
            **common,
        )
    pipe.save_pretrained(folder)
    for variant in ("base", "plus"):
        official = tiny.random_official_adapter(pipe.unet, clip_dim=CLIP_DIM, num_tokens=NUM_TOKENS, variant=variant)
        flat = {f"{section}.{key}": value for section, part in official.items() for key, value in part.items()}
        safetensors.numpy.save_file(flat, str(adapter_file(folder, variant)))
    if controlnet:
        tiny_folders.controlnet().save_pretrained(folder / "controlnet")
    return pipe


def adapter_file(folder: Path, variant: str) -> Path:
    return folder / f"ip-adapter-{variant}.safetensors"


def torch_pipeline_with_adapter(folder: Path, torch_pipe, variant: str, controlnet: bool = False):
    """A copy of `torch_pipe` (saved in `folder`) with the `variant` adapter loaded by diffusers'
    `load_ip_adapter` (offline); with `controlnet`, a `StableDiffusionControlNetPipeline` of the same components
    plus `folder/controlnet`."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe = copy.deepcopy(torch_pipe)  # loading an adapter changes the UNet's attention processors
    if controlnet:
        pipe = StableDiffusionControlNetPipeline(
            **pipe.components, controlnet=ControlNetModel.from_pretrained(folder / "controlnet").eval()
        )
    path = adapter_file(folder, variant)
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flax_pipeline(folder: Path, variant: str, controlnet: bool = False, **kwargs):
    """Our `IPAdapterPipeline` loaded by the project's loaders from the folder `save_pipeline` wrote, with the
    `variant` adapter (and `folder/controlnet`); `kwargs` go to the pipeline."""
    from conversion.clip import load_clip_image_encoder
    from conversion.diffusers_models import load_controlnet, load_pipeline
    from conversion.ip_adapter_files import load_ip_adapter
    from conversion.unet_config import abstract_ip_unet_params
    from ipadapter_jax.pipeline import BaseModel, IPAdapterPipeline

    base = BaseModel.from_flax_pipeline(load_pipeline(folder, progress=False))
    encoder, encoder_params = load_clip_image_encoder(folder / "image_encoder")
    _, image_proj, adapter = load_ip_adapter(adapter_file(folder, variant), abstract_ip_unet_params(base.unet))
    extra = {}
    if controlnet:
        loaded = load_controlnet(folder / "controlnet")
        extra = dict(controlnet=loaded.module, controlnet_params=loaded.params)
    return IPAdapterPipeline(base, encoder, encoder_params, image_proj, adapter, **extra, **kwargs)


def test_image(seed: int, size: tuple[int, int] = (96, 80), mode: str = "RGB"):
    """A random PIL image (smooth enough that resizing matters) of `size` (width, height) and `mode`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)
    return image.convert(mode)


# The request of the 1-vs-8-device test: 2 prompts x 3 images (6 rows: padded to 8 on 8 devices), guidance on.
SHARDED_REQUEST = dict(
    prompt=["a red cat", "the dog"],
    num_images_per_prompt=3,
    scale=0.6,
    num_inference_steps=3,
    height=64,
    width=64,
    seed=3,
)


def sharded_request(folder: Path) -> np.ndarray:
    """Runs `SHARDED_REQUEST` with the base adapter on all local devices -> pixels (6, 64, 64, 3)."""
    return flax_pipeline(folder, "base")(test_image(0), **SHARDED_REQUEST).pixels


if __name__ == "__main__":  # python -m tests.pipeline_testutil FOLDER OUT.npy (the multi-device test's subprocess)
    import jax

    import ipadapter_jax  # noqa: F401  (log filter before the loaders import Flax classes)

    jax.config.update("jax_compilation_cache_dir", sys.argv[3] if len(sys.argv) > 3 else ".jax_cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    np.save(sys.argv[2], sharded_request(Path(sys.argv[1])))
    print(f"devices={jax.device_count()}")
