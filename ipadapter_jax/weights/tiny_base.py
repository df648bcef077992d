"""The `tiny` preset's base model: SD1.5-shaped components small enough to train on a 2-core CPU.

The shapes follow SD1.5 (4-channel latents at 1/8 resolution, 77 text tokens, a CLIP image encoder at 224 px
with a projection), only narrower and shallower. The frozen components (text encoder, CLIP image encoder, VAE,
UNet) are trained on the procedural dataset (`ipadapter_jax.data.synthetic`) by `training/tiny_base_train.py` and
shipped as float16 msgpack files in `ipadapter_jax/weights/assets/tiny_base/` (~3 MB) with the tokenizer's files
(`tokenizer/`: CLIP BPE, characters plus one token per word of the procedural captions); `load_base` loads them, so
the tiny base really generates images and an adapter trained on it has a measurable effect. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from ipadapter_jax import quiet
from ipadapter_jax.models.base_model import BaseModel
from ipadapter_jax.models.clip_preprocessing import CLIP_IMAGE_SIZE
from ipadapter_jax.models.image_encoder import CLIPImageEncoder, ImageEncoder
from ipadapter_jax.models.random_init import abstract_params, numpy_init
from ipadapter_jax.models.text_encoder import TextEncoder
from ipadapter_jax.models.unet import IPUNet2DConditionModel
from ipadapter_jax.weights.diffusers_models import scheduler_from_config

quiet.install()

from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # noqa: E402
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
# Four blocks: the 1/8 latent resolution of SD's VAE. Narrow high-resolution blocks (GroupNorm over 8 groups)
# keep its training affordable on a CPU.
VAE = dict(
    block_out_channels=(8, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)
TEXT = dict(
    hidden_size=CROSS_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=CROSS_DIM
)
IMAGE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=CLIP_IMAGE_SIZE,
    patch_size=32,
    projection_dim=32,
)

# SD1.5's scheduler folder (scheduler/scheduler_config.json): the tiny base's noise schedule and DDIM settings.
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

# The trained frozen components, one float16 msgpack file each, and what `tiny_base_train` measured
# (`base.json`: the VAE's latent scaling factor, the training settings and losses).
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_base")
FROZEN = ("text_encoder", "image_encoder", "vae", "unet")
SUMMARY = "base.json"


TOKENIZER = "tokenizer"  # the folder of the trained base's tokenizer files in `ASSETS`


def _clip_tokenizer(directory: str, vocab: list[str], merges: list[tuple[str, str]]) -> CLIPTokenizer:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return _read_tokenizer(directory)


def _read_tokenizer(directory: str) -> CLIPTokenizer:
    return CLIPTokenizer(
        os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"), model_max_length=TEXT_TOKENS
    )


def write_tokenizer(directory: str, words: Sequence[str] = ()) -> CLIPTokenizer:
    """A CLIP BPE tokenizer (77 tokens) saved in `directory`: character level (CLIP's byte alphabet), plus merges
    that make each of `words` (lower case) one token, so a small text encoder reads words, not spellings.

    The merges are found by tokenizing each word with the merges so far and appending a merge of its first two
    pieces until it is one piece; an appended merge ranks last, so it never changes a word already merged.
    """
    # CLIP's byte-to-unicode alphabet: printable bytes map to themselves, the rest to code points >= 256.
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    vocab = chars + [c + "</w>" for c in chars]
    special = ["<|startoftext|>", "<|endoftext|>"]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        while len(pieces := _clip_tokenizer(directory, vocab + special, merges).bpe(word).split()) > 1:
            merges.append((pieces[0], pieces[1]))
            if pieces[0] + pieces[1] not in vocab:
                vocab.append(pieces[0] + pieces[1])
    return _clip_tokenizer(directory, vocab + special, merges)


def text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """The tiny CLIP text encoder's config for `tokenizer` (its vocabulary size and special tokens)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=TEXT_TOKENS,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT,
    )


def vae_module(scaling: float | None = None, dtype: Any = jnp.float32) -> FlaxAutoencoderKL:
    """The tiny VAE; its config carries the latent scaling factor (default: the trained one, `scaling_factor`),
    which diffusers-style samplers read from `vae.config.scaling_factor`."""
    scaling = float(scaling_factor() if scaling is None else scaling)
    return FlaxAutoencoderKL(**VAE, scaling_factor=scaling, dtype=dtype)


def abstract_base_params(
    unet: FlaxUNet2DConditionModel,
    vae: FlaxAutoencoderKL,
    text_encoder: FlaxCLIPTextModule,
    image_encoder: CLIPImageEncoder,
) -> dict[str, Any]:
    """Param shapes of the frozen components, {"text_encoder", "image_encoder", "vae", "unet"} (no K'/V' when
    `unet` is diffusers' plain UNet)."""
    latent = VAE["sample_size"] // 8
    ids = jnp.zeros((1, TEXT_TOKENS), jnp.int32)
    return {
        "text_encoder": abstract_params(text_encoder, ids, ids, ids),
        "image_encoder": abstract_params(image_encoder, jnp.zeros((1, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE, 3))),
        "vae": abstract_params(vae, jnp.zeros((1, 3, VAE["sample_size"], VAE["sample_size"]))),
        "unet": abstract_params(
            unet, jnp.zeros((1, 4, latent, latent)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, CROSS_DIM))
        ),
    }


def random_base_params(shapes: dict[str, Any], seed: int) -> dict[str, dict]:
    """Untrained weights for `abstract_base_params` shapes (`tiny_base_train`'s starting point)."""
    return {name: numpy_init(shapes[name], seed=seed + i) for i, name in enumerate(FROZEN)}


def save_base_params(params: dict[str, Any], directory: str = ASSETS) -> dict[str, int]:
    """Writes each frozen component as `<name>.msgpack` (float16); returns the file sizes in bytes."""
    os.makedirs(directory, exist_ok=True)
    sizes = {}
    for name in FROZEN:
        flat = traverse_util.flatten_dict(params[name])
        half = {"/".join(path): np.asarray(leaf, np.float16) for path, leaf in flat.items()}
        path = os.path.join(directory, f"{name}.msgpack")
        with open(path, "wb") as f:
            f.write(serialization.msgpack_serialize(half))
        sizes[name] = os.path.getsize(path)
    return sizes


def load_base_params(shapes: dict[str, Any], directory: str = ASSETS) -> dict[str, dict]:
    """The trained frozen components as float32 numpy trees, checked leaf by leaf against `shapes`."""
    params = {}
    for name in FROZEN:
        path = os.path.join(directory, f"{name}.msgpack")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} is missing: run `python training/tiny_base_train.py` to train the tiny base"
            )
        with open(path, "rb") as f:
            stored = serialization.msgpack_restore(f.read())
        expected = {"/".join(p): leaf.shape for p, leaf in traverse_util.flatten_dict(shapes[name]).items()}
        found = {key: value.shape for key, value in stored.items()}
        if found != expected:
            differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
            raise ValueError(
                f"{path} does not fit the {name} config in ipadapter_jax/weights/tiny_base.py ({len(differ)} params "
                f"differ, e.g. {differ[:3]}): retrain with `python training/tiny_base_train.py`"
            )
        params[name] = traverse_util.unflatten_dict(
            {tuple(key.split("/")): np.asarray(value, np.float32) for key, value in stored.items()}
        )
    return params


def read_summary(directory: str = ASSETS) -> dict:
    """What `tiny_base_train` recorded: {"vae_scaling_factor", "settings", "stages", ...}."""
    with open(os.path.join(directory, SUMMARY)) as f:
        return json.load(f)


def tokenizer(directory: str = ASSETS) -> CLIPTokenizer:
    """The trained base's tokenizer: the files `tiny_base_train` wrote with `write_tokenizer` (`TOKENIZER`)."""
    return _read_tokenizer(os.path.join(directory, TOKENIZER))


def load_base(dtype: Any = jnp.float32, scheduler: str = "ddim") -> BaseModel:
    """The tiny base with its trained weights (`ASSETS`), computing in `dtype`; `scheduler` as `load_scheduler`'s
    kinds, configured as SD1.5's scheduler folder (`SCHEDULER`)."""
    tok = tokenizer()
    unet = IPUNet2DConditionModel(**UNET, dtype=dtype)
    vae = vae_module(dtype=dtype)
    text_encoder = FlaxCLIPTextModule(text_config(tok), dtype=dtype)
    params = load_base_params(_shapes(tok))
    sampler, state = scheduler_from_config(SCHEDULER, scheduler, source="tiny_base.SCHEDULER")
    return BaseModel(
        unet=unet,
        unet_params=params["unet"],
        vae=vae,
        vae_params=params["vae"],
        text_encoders=(TextEncoder(tok, text_encoder, params["text_encoder"]),),
        scheduler=sampler,
        scheduler_state=state,
    )


def load_image_encoder(dtype: Any = jnp.float32) -> ImageEncoder:
    """The tiny base's trained CLIP image encoder (224 px, 32-d projection)."""
    return ImageEncoder(
        CLIPImageEncoder(image_config(), dtype=dtype), load_base_params(_shapes(tokenizer()))["image_encoder"]
    )


def image_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(**IMAGE)


def _shapes(tok: CLIPTokenizer) -> dict[str, Any]:
    return abstract_base_params(
        FlaxUNet2DConditionModel(**UNET),
        vae_module(),
        FlaxCLIPTextModule(text_config(tok)),
        CLIPImageEncoder(image_config()),
    )


def scaling_factor() -> np.float32:
    """The tiny VAE's latent scaling factor: 1 / std of its latents over the procedural data, measured by
    `tiny_base_train` (SD1.5's 0.18215 was measured the same way for its VAE)."""
    return np.float32(read_summary()["vae_scaling_factor"])
