"""Tiny random PyTorch IP-Adapter pipelines saved to disk, and our Flax pipeline loaded from the same files.

Components come from `ipadapter_jax.testing.tiny_folders` (UNet, text encoders, tokenizer, ControlNet), plus:
- a 4-block VAE (down-sampling 8, as every Stable Diffusion VAE; the ControlNet's conditioning embedding
  down-samples by 8 too),
- a CLIP `CLIPVisionModelWithProjection` (hidden 40 = `tiny.PLUS_HIDDEN`, 224 px in patches of 112: 5 tokens =
  `tiny.PLUS_TOKENS`; projection 48 = the base adapter's input) and the default `CLIPImageProcessor`,
- SD1.5's DDIM settings (scaled-linear betas, no clipping, steps_offset 1), saved as the pipeline's scheduler,
- random adapters in the official layout (`tiny.random_official_adapter`) saved as `.safetensors`.

`python -m ipadapter_jax.testing.pipeline_fixtures FOLDER OUT.npy` runs `SHARDED_REQUEST` (the multi-device test's
subprocess).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import torch

from ipadapter_jax.testing import tiny, tiny_folders

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


def save_pipeline(folder: Path, model: str, controlnet: bool = False):
    """Builds and saves a tiny `model` ("sd15" or "sdxl") PyTorch pipeline with DDIM and an image encoder into
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
    if model == "sd15":
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
    for adapter_kind in ("base", "plus"):
        save_adapter(adapter_file(folder, adapter_kind), pipe.unet, adapter_kind)
    if controlnet:
        tiny_folders.controlnet().save_pretrained(folder / "controlnet")
    return pipe


def save_adapter(path: Path, torch_unet: Any, kind: str, seed: int = 1, num_tokens: int = NUM_TOKENS) -> Path:
    """A random `kind` ("base" or "plus") adapter for `torch_unet` (`tiny.random_official_adapter`) saved as an
    official `.safetensors` file at `path`."""
    official = tiny.random_official_adapter(torch_unet, clip_dim=CLIP_DIM, num_tokens=num_tokens, seed=seed, kind=kind)
    flat = {f"{section}.{key}": value for section, part in official.items() for key, value in part.items()}
    safetensors.numpy.save_file(flat, str(path))
    return path


def adapter_file(folder: Path, kind: str) -> Path:
    return folder / f"ip-adapter-{kind}.safetensors"


def torch_pipeline_with_adapter(folder: Path, torch_pipe, kind: str, controlnet: bool = False):
    """A copy of `torch_pipe` (saved in `folder`) with the `kind` adapter loaded by diffusers'
    `load_ip_adapter` (offline); with `controlnet`, a `StableDiffusionControlNetPipeline` of the same components
    plus `folder/controlnet`."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe = copy.deepcopy(torch_pipe)  # loading an adapter changes the UNet's attention processors
    if controlnet:
        pipe = StableDiffusionControlNetPipeline(
            **pipe.components, controlnet=ControlNetModel.from_pretrained(folder / "controlnet").eval()
        )
    path = adapter_file(folder, kind)
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flax_pipeline(folder: Path, kind: str, controlnet: bool = False, **kwargs):
    """Our `IPAdapterPipeline` loaded by the project's loaders from the folder `save_pipeline` wrote, with the
    `kind` adapter (and `folder/controlnet`); `kwargs` go to the pipeline."""
    from ipadapter_jax.pipelines import IPAdapterPipeline
    from ipadapter_jax.weights import load_adapter, load_base, load_image_encoder
    from ipadapter_jax.weights.diffusers_models import load_controlnet

    base = load_base(folder, progress=False)
    encoder = load_image_encoder(folder / "image_encoder")
    adapter = load_adapter(adapter_file(folder, kind), base, image_encoder=encoder)
    extra = {}
    if controlnet:
        loaded = load_controlnet(folder / "controlnet")
        extra = dict(controlnet=loaded.module, controlnet_params=loaded.params)
    return IPAdapterPipeline(base, encoder, adapter, **extra, **kwargs)


class SavedPipelines:
    """One saved tiny pipeline (`save_pipeline`) and, built on first use, the PyTorch pipeline per adapter kind
    (diffusers' loader) and ours (the project's loaders) from the same files."""

    def __init__(self, folder: Path, model: str):
        self.folder, self.model = folder, model
        self.torch_base = save_pipeline(folder, model, controlnet=model == "sd15")
        self._torch, self._flax = {}, {}

    def torch(self, kind: str, controlnet: bool = False):
        key = (kind, controlnet)
        if key not in self._torch:
            self._torch[key] = torch_pipeline_with_adapter(self.folder, self.torch_base, kind, controlnet)
        return self._torch[key]

    def flax(self, kind: str, controlnet: bool = False) -> Any:
        key = (kind, controlnet)
        if key not in self._flax:
            self._flax[key] = flax_pipeline(self.folder, kind, controlnet)
        return self._flax[key]


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


if (
    __name__ == "__main__"
):  # python -m ipadapter_jax.testing.pipeline_fixtures FOLDER OUT.npy (the multi-device test's subprocess)
    import jax

    import ipadapter_jax  # noqa: F401  (log filter before the loaders import Flax classes)

    jax.config.update("jax_compilation_cache_dir", sys.argv[3] if len(sys.argv) > 3 else ".jax_cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    np.save(sys.argv[2], sharded_request(Path(sys.argv[1])))
    print(f"devices={jax.device_count()}")
