"""The `tiny` preset's base model: SD1.5-shaped components small enough to train on a 2-core CPU.

Everything is built locally and deterministically (nothing is downloaded): a character-level CLIP tokenizer
written to a folder, and Flax modules with `numpy_init` weights (`jax.eval_shape`, no compiled init). The
shapes follow SD1.5 (4-channel latents at 1/8 resolution, 77 text tokens, CLIP image encoder at 224 px with
a projection), only narrower and shallower.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from ipadapter_jax import quiet
from ipadapter_jax.image_encoder import CLIP_IMAGE_SIZE, CLIPImageEncoder
from ipadapter_jax.image_proj import ImageProjModel
from ipadapter_jax.random_init import abstract_params, numpy_init
from ipadapter_jax.unet import IPUNet2DConditionModel

quiet.install()

from diffusers import FlaxAutoencoderKL  # noqa: E402
from transformers import CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig  # noqa: E402
from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextModule  # noqa: E402

CROSS_DIM = 32
TEXT_TOKENS = 77

UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=4,  # heads (diffusers' naming)
    cross_attention_dim=CROSS_DIM,
)
# Four blocks: the 1/8 latent resolution of SD's VAE.
VAE = dict(
    block_out_channels=(32, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
    sample_size=64,
)
TEXT = dict(hidden_size=CROSS_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=CROSS_DIM)
IMAGE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=CLIP_IMAGE_SIZE,
    patch_size=32, projection_dim=32,
)


def write_tokenizer(directory: str) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (byte alphabet, no merges, 77 tokens) saved in `directory`."""
    os.makedirs(directory, exist_ok=True)
    # CLIP's byte-to-unicode alphabet: printable bytes map to themselves, the rest to code points >= 256.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(
        os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"), model_max_length=TEXT_TOKENS
    )


@dataclasses.dataclass
class TinyBase:
    """Modules and numpy params of the tiny base model and a base (4-token) adapter for it."""

    tokenizer: CLIPTokenizer
    unet: IPUNet2DConditionModel
    vae: FlaxAutoencoderKL
    text_encoder: FlaxCLIPTextModule
    image_encoder: CLIPImageEncoder
    image_proj: ImageProjModel
    params: dict[str, Any]  # {"unet" (with K'/V'), "vae", "text_encoder", "image_encoder", "image_proj"}


def build(directory: str, seed: int = 0) -> TinyBase:
    """Builds the tiny components (tokenizer files go to `directory`); same `seed`, same weights."""
    tokenizer = write_tokenizer(os.path.join(directory, "tokenizer"))
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=TEXT_TOKENS, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT,
    )
    unet = IPUNet2DConditionModel(**UNET)
    vae = FlaxAutoencoderKL(**VAE)
    text_encoder = FlaxCLIPTextModule(text_config)
    image_encoder = CLIPImageEncoder(CLIPVisionConfig(**IMAGE))
    image_proj = ImageProjModel(cross_attention_dim=CROSS_DIM, clip_embeddings_dim=IMAGE["projection_dim"])
    latent = VAE["sample_size"] // 8
    ids = jnp.zeros((1, TEXT_TOKENS), jnp.int32)
    shapes = {
        "unet": abstract_params(
            unet, jnp.zeros((1, 4, latent, latent)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, CROSS_DIM)),
            image_tokens=jnp.zeros((1, 4, CROSS_DIM)),
        ),
        "vae": abstract_params(vae, jnp.zeros((1, 3, VAE["sample_size"], VAE["sample_size"]))),
        "text_encoder": abstract_params(text_encoder, ids, ids, ids),
        "image_encoder": abstract_params(image_encoder, jnp.zeros((1, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE, 3))),
        "image_proj": abstract_params(image_proj, jnp.zeros((1, IMAGE["projection_dim"]))),
    }
    params = {name: numpy_init(tree, seed=seed + i) for i, (name, tree) in enumerate(shapes.items())}
    return TinyBase(tokenizer, unet, vae, text_encoder, image_encoder, image_proj, params)


def scaling_factor() -> np.float32:
    """The tiny VAE keeps diffusers' default latent scaling (SD1.5's 0.18215)."""
    return np.float32(FlaxAutoencoderKL.scaling_factor)
