"""Tiny random PyTorch Stable Diffusion components saved as diffusers folders (`save_pretrained`).

SD1.5-like and SDXL-like pipelines (UNet from `ipadapter_jax.testing.tiny`, VAE, CLIP text encoder(s), a tokenizer with
a hand-written 58-token vocabulary, the scheduler each base ships), an SD2-like UNet (linear projections,
per-block head counts) and a ControlNet. Every norm scale/bias and every zero-initialised layer is perturbed,
so a swapped or dropped weight changes the outputs.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from ipadapter_jax.testing import tiny

SD2_TINY = dict(
    tiny.SD15_TINY,
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    cross_attention_dim=48,
    upcast_attention=True,  # as SD2.1 ships it
)

VAE_TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    layers_per_block=1,
    sample_size=32,
)

MAX_TOKENS = 16


def tokenizer_files(folder: Path) -> Path:
    """A 58-token CLIP BPE vocabulary: letters, end-of-word letters, 4 merges, start/end tokens (highest ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    tokens = letters + [c + "</w>" for c in letters] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def tokenizer():
    """transformers' `CLIPTokenizer` over `tokenizer_files`, padding with the end token to MAX_TOKENS."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        files = tokenizer_files(Path(tmp))
        return CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=MAX_TOKENS)


def text_encoder(hidden: int = 32, projection: bool = False, seed: int = 0):
    """A 2-layer CLIP text encoder (`CLIPTextModelWithProjection` with `projection`), vocabulary of `tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = 58
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=32,
        hidden_act="quick_gelu" if not projection else "gelu",
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    return perturb(model, seed)


def vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return perturb(AutoencoderKL(**VAE_TINY).eval(), seed)


def unet(config: dict, seed: int = 0):
    return perturb(tiny.torch_unet(config, seed), seed)


def controlnet(seed: int = 0):
    """A ControlNet for the SD1.5-like UNet; its zero-initialised output convs get random weights."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(tiny.torch_unet(tiny.SD15_TINY, seed)).eval()
    return perturb(net, seed, also=("controlnet_",))


def perturb(model, seed: int, also: tuple[str, ...] = ()):
    """Adds noise to norm params (torch inits them to 1/0) and to params whose names start with `also`."""
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.startswith(also):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def sd15_pipeline(folder: Path):
    """Saves and returns a tiny SD1.5-like `StableDiffusionPipeline` (PNDM scheduler, as SD1.5 ships)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae(),
        text_encoder=text_encoder(),
        tokenizer=tokenizer(),
        unet=unet(tiny.SD15_TINY),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return pipe


def sdxl_pipeline(folder: Path):
    """Saves and returns a tiny SDXL-like `StableDiffusionXLPipeline` (Euler scheduler, as SDXL ships)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae(1),
        text_encoder=text_encoder(32, seed=1),
        text_encoder_2=text_encoder(32, projection=True, seed=2),
        tokenizer=tokenizer(),
        tokenizer_2=tokenizer(),
        unet=unet(tiny.SDXL_TINY),
        scheduler=scheduler,
    )
    pipe.save_pretrained(folder)
    return pipe
