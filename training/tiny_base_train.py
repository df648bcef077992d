"""Trains the `tiny` preset's frozen base model on the procedural dataset (-> ipadapter_jax/weights/assets/tiny_base).

    python training/tiny_base_train.py      # the committed weights (~25-40 min on 2 shared CPU cores)
    python training/tiny_base_train.py --out /tmp/base --steps_scale 0.05    # a quick smoke run

Random tiny components cannot show what an IP-Adapter does (a random VAE cannot even reconstruct an image),
so the demo's embedded default is a small base model trained here, in Stable Diffusion's order:

1. encoders: the CLIP text and image encoders, contrastively (CLIP's symmetric InfoNCE over a batch of
   image-caption pairs). Captions repeat (3024 distinct), so every pair sharing a caption is a positive. A batch
   is whole groups of near neighbours (a scene and scenes with one attribute of it changed), so shape and place
   must be learnt, not only the colours that tell most random pairs apart. The text side's projection is a
   training-only head: the UNet reads the text encoder's hidden states. The tokenizer has one token per caption
   word (`tiny_base.write_tokenizer`), written with the weights.
2. vae: the autoencoder (pixel MSE + a small KL term), then its latent scaling factor 1 / std(latents).
3. unet: text-conditioned epsilon prediction on the scaled latents with SD1.5's DDPM schedule; 10% of the
   captions are dropped to "" so the empty prompt gives unconditional samples (image-only generation's start).

Each stage trains on a fixed pool of procedural images (`synthetic.sample_groups`), scored on held-out images of another
seed. Every random draw derives from `--seed`: a rerun gives the same weights (same software and CPU). Outputs in
`--out`: {text_encoder,image_encoder,vae,unet}.msgpack (float16, read by `ipadapter_jax.weights.tiny_base`) and
base.json (scaling factor, settings, loss curves, held-out metrics, times).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import ipadapter_jax  # noqa: F401  (log filter before any Flax model import)

# isort: split
from diffusers import FlaxUNet2DConditionModel  # noqa: E402  (after the log filter)
from transformers import CLIPVisionConfig  # noqa: E402
from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextModule  # noqa: E402

from ipadapter_jax.data import synthetic
from ipadapter_jax.data.preprocess import tokenize
from ipadapter_jax.models import clip_preprocessing as clip
from ipadapter_jax.models.image_encoder import CLIPImageEncoder
from ipadapter_jax.models.scheduler_base import training_alphas_cumprod
from ipadapter_jax.training.step import sample_noise_and_timesteps
from ipadapter_jax.weights import tiny_base


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the committed weights were trained with (`--steps_scale` shrinks every stage's steps)."""

    seed: int = 0
    pool_images: int = 8192  # training images, drawn once
    group_size: int = 4  # the pool's groups of near neighbours (`synthetic.sample_groups`), whole in each batch
    held_out_images: int = 256  # scoring images (seed + 1)
    encoder_steps: int = 1000
    encoder_batch: int = 128
    encoder_lr: float = 2e-3
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5  # times the KL summed over the latent: keeps latents bounded, barely blurs
    unet_steps: int = 2400
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_drop: float = 0.1


@dataclasses.dataclass
class Pool:
    """Procedural images and their captions as indices into `captions` (the distinct ones; last: "")."""

    images: np.ndarray  # (N, 64, 64, 3) uint8
    caption_index: np.ndarray  # (N,) int32
    captions: list[str]


def make_pools(settings: Settings) -> tuple[Pool, Pool]:
    """(training pool, held-out pool); the held-out images come from another seed."""
    size = tiny_base.VAE["sample_size"]
    groups = settings.pool_images // settings.group_size
    train_images, train_text = synthetic.sample_groups(groups, settings.group_size, size, settings.seed)
    test_images, test_text = synthetic.sample(settings.held_out_images, size, settings.seed + 1)
    captions = sorted(set(train_text) | set(test_text)) + [""]
    index = {text: i for i, text in enumerate(captions)}
    return (
        Pool(train_images, np.array([index[t] for t in train_text], np.int32), captions),
        Pool(test_images, np.array([index[t] for t in test_text], np.int32), captions),
    )


def fit(
    name: str,
    loss_fn: Callable[[Any, dict, jax.Array], jax.Array],
    params: Any,
    batch_fn: Callable[[np.random.Generator], dict],
    steps: int,
    lr: float,
    seed: int,
) -> tuple[Any, list[float]]:
    """AdamW (5% linear warmup, cosine decay to 5%, global-norm clip 1) on `loss_fn(params, batch, key)`.

    Returns the trained params and the mean loss of every 25 steps.
    """
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, end_value=lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))

    @jax.jit
    def step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    opt_state = optimizer.init(params)
    losses, curve = [], []
    with tqdm.tqdm(total=steps, desc=name, unit="step") as bar:
        for i in range(steps):
            params, opt_state, loss = step(params, opt_state, batch_fn(rng), jax.random.fold_in(key, i))
            losses.append(float(loss))  # waits for the step: the bar shows the real rate
            if (i + 1) % 25 == 0 or i + 1 == steps:
                curve.append(float(np.mean(losses)))
                losses = []
                bar.set_postfix(loss=f"{curve[-1]:.4f}")
            bar.update()
    return jax.device_get(params), curve


def clip_pixels(images: jax.Array) -> jax.Array:
    """(B, H, W, 3) uint8 -> (B, 224, 224, 3) CLIP input: bicubic (PIL's kernel, no uint8 rounding), OpenAI mean/std."""
    x = images.astype(jnp.float32) / 255.0
    x = jnp.clip(jax.image.resize(x, (x.shape[0], clip.CLIP_IMAGE_SIZE, clip.CLIP_IMAGE_SIZE, 3), "bicubic"), 0.0, 1.0)
    return (x - jnp.asarray(clip.OPENAI_CLIP_MEAN)) / jnp.asarray(clip.OPENAI_CLIP_STD)


def to_vae_input(images: jax.Array) -> jax.Array:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1] (diffusers' Flax VAE takes NCHW)."""
    return jnp.transpose(images.astype(jnp.float32) / 127.5 - 1.0, (0, 3, 1, 2))


def in_chunks(fn: Callable[[jax.Array], Any], data: np.ndarray, size: int = 256) -> Any:
    """`fn` over `data` in chunks of `size` rows, results concatenated along axis 0."""
    parts = [jax.device_get(fn(data[i : i + size])) for i in range(0, len(data), size)]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def train_encoders(
    settings: Settings,
    steps: int,
    pool: Pool,
    held_out: Pool,
    tokens: np.ndarray,
    text_encoder: FlaxCLIPTextModule,
    image_encoder: CLIPImageEncoder,
    init: dict,
) -> tuple[dict, dict]:
    """Stage 1 -> ({"text_encoder", "image_encoder"} params, report). `tokens`: (captions, 77) ids."""
    positions = jnp.arange(tokens.shape[1])[None]

    def embed_text(params: dict, ids: jax.Array) -> jax.Array:
        """(B, 77) ids -> (B, projection_dim): the end-of-text state through the training-only projection."""
        positions_b = jnp.broadcast_to(positions, ids.shape)
        out = text_encoder.apply({"params": params["text_encoder"]}, ids, jnp.ones_like(ids), positions_b)
        return out.pooler_output @ params["text_projection"]

    def embed_images(params: dict, images: jax.Array) -> jax.Array:
        return image_encoder.apply({"params": params["image_encoder"]}, clip_pixels(images)).image_embeds

    def normalise(x: jax.Array) -> jax.Array:
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def loss_fn(params: dict, batch: dict, key: jax.Array) -> jax.Array:
        image = normalise(embed_images(params, batch["images"]))
        text = normalise(embed_text(params, batch["ids"]))
        logits = jnp.exp(jnp.minimum(params["logit_scale"], np.log(100.0))) * image @ text.T
        same = (batch["caption"][:, None] == batch["caption"][None, :]).astype(jnp.float32)
        targets = same / same.sum(axis=1, keepdims=True)  # symmetric: same.T == same
        image_to_text = optax.softmax_cross_entropy(logits, targets).mean()
        text_to_image = optax.softmax_cross_entropy(logits.T, targets).mean()
        return 0.5 * (image_to_text + text_to_image)

    def batch_fn(rng: np.random.Generator) -> dict:
        """Whole groups of the pool: each image meets negatives that differ from it in one attribute."""
        group = settings.group_size
        groups = rng.integers(len(pool.images) // group, size=settings.encoder_batch // group)
        pick = (groups[:, None] * group + np.arange(group)).reshape(-1)
        caption = pool.caption_index[pick]
        return {"images": pool.images[pick], "ids": tokens[caption], "caption": caption}

    width, dim = tiny_base.CROSS_DIM, tiny_base.TEXT["projection_dim"]
    projection = np.random.default_rng(settings.seed).standard_normal((width, dim)).astype(np.float32) * width**-0.5
    # CLIP's initial temperature 0.07, learnt, capped at 100 in the loss.
    params = dict(init, text_projection=projection, logit_scale=np.float32(np.log(1 / 0.07)))
    params, curve = fit("1/3 encoders", loss_fn, params, batch_fn, steps, settings.encoder_lr, settings.seed)

    # Held-out zero-shot accuracy: each image's most similar caption among all distinct ones is its own.
    text = normalise(jax.jit(embed_text)(params, jnp.asarray(tokens[:-1])))
    image = normalise(in_chunks(jax.jit(lambda x: embed_images(params, x)), held_out.images))
    best = np.argmax(np.asarray(image @ text.T), axis=1)
    accuracy = float(np.mean(best == held_out.caption_index))
    # Per attribute: how often that caption names the image's own value (what the encoder sees beyond colour).
    scenes = [synthetic.Scene.parse(caption) for caption in held_out.captions[:-1]]
    pairs = [(scenes[b], scenes[t]) for b, t in zip(best, held_out.caption_index)]
    per_attribute = {name: float(np.mean([getattr(b, name) == getattr(t, name) for b, t in pairs]))
                     for name in synthetic.ATTRIBUTES}  # fmt: skip
    report = {
        "loss_curve": curve,
        "held_out_caption_accuracy": accuracy,
        "held_out_attribute_accuracy": per_attribute,
        "logit_scale": float(np.exp(params["logit_scale"])),
    }
    return {"text_encoder": params["text_encoder"], "image_encoder": params["image_encoder"]}, report


def train_vae(
    settings: Settings, steps: int, pool: Pool, held_out: Pool, vae: Any, init: dict
) -> tuple[dict, float, dict]:
    """Stage 2 -> (VAE params, latent scaling factor, report)."""

    def loss_fn(params: dict, batch: dict, key: jax.Array) -> jax.Array:
        x = to_vae_input(batch["images"])
        posterior = vae.apply({"params": params}, x, method=vae.encode).latent_dist
        recon = vae.apply({"params": params}, posterior.sample(key), method=vae.decode).sample
        return jnp.mean(jnp.square(recon - x)) + settings.kl_weight * jnp.mean(posterior.kl())

    def batch_fn(rng: np.random.Generator) -> dict:
        return {"images": pool.images[rng.integers(len(pool.images), size=settings.vae_batch)]}

    params, curve = fit("2/3 vae", loss_fn, init, batch_fn, steps, settings.vae_lr, settings.seed + 1)

    @jax.jit
    def posterior_mean(images: jax.Array) -> jax.Array:
        return vae.apply({"params": params}, to_vae_input(images), method=vae.encode).latent_dist.mean

    @jax.jit
    def reconstruct(images: jax.Array) -> jax.Array:
        return vae.apply({"params": params}, posterior_mean(images), method=vae.decode).sample

    latents = in_chunks(posterior_mean, pool.images)
    # 4 significant digits: the factor is a config value (SD1.5's is 0.18215).
    scaling = float(f"{1.0 / np.std(latents):.4g}")
    recon = in_chunks(reconstruct, held_out.images)
    mse = float(np.mean(np.square(recon - np.asarray(to_vae_input(held_out.images)))))
    report = {
        "loss_curve": curve,
        "held_out_mse": mse,
        "held_out_psnr_db": float(10 * np.log10(4.0 / mse)),
        "latent_mean": float(np.mean(latents)),
        "latent_std": float(np.std(latents)),
    }
    return params, scaling, report


def train_unet(
    settings: Settings,
    steps: int,
    pool: Pool,
    held_out: Pool,
    tokens: np.ndarray,
    unet: FlaxUNet2DConditionModel,
    vae: Any,
    text_encoder: FlaxCLIPTextModule,
    params: dict,
    init: dict,
) -> tuple[dict, dict]:
    """Stage 3 -> (UNet params, report). `params` holds the trained encoders and VAE."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    # Every caption's hidden states, computed once: (captions + "", 77, cross).
    text_table = jax.device_get(
        text_encoder.apply(
            {"params": params["text_encoder"]}, jnp.asarray(tokens), jnp.ones_like(tokens), positions
        ).last_hidden_state
    )

    @jax.jit
    def posterior(images: jax.Array) -> tuple[jax.Array, jax.Array]:
        dist = vae.apply({"params": params["vae"]}, to_vae_input(images), method=vae.encode).latent_dist
        return jnp.transpose(dist.mean, (0, 3, 1, 2)), jnp.transpose(dist.std, (0, 3, 1, 2))  # NCHW for the UNet

    train_latents, test_latents = in_chunks(posterior, pool.images), in_chunks(posterior, held_out.images)
    schedule = jnp.asarray(training_alphas_cumprod(tiny_base.SCHEDULER))
    scaling = np.float32(vae.scaling_factor)

    def loss_fn(unet_params: dict, batch: dict, key: jax.Array) -> jax.Array:
        latent_key, noise_key = jax.random.split(key)
        latents = scaling * (batch["mean"] + batch["std"] * jax.random.normal(latent_key, batch["mean"].shape))
        noise, t = sample_noise_and_timesteps(noise_key, latents.shape, schedule.shape[0])
        alpha = schedule[t].reshape(-1, 1, 1, 1)
        noisy = jnp.sqrt(alpha) * latents + jnp.sqrt(1.0 - alpha) * noise
        pred = unet.apply({"params": unet_params}, noisy, t, batch["text"]).sample
        return jnp.mean(jnp.square(pred - noise))

    empty = len(pool.captions) - 1

    def batch_fn(rng: np.random.Generator) -> dict:
        pick = rng.integers(len(pool.images), size=settings.unet_batch)
        caption = np.where(rng.random(settings.unet_batch) < settings.caption_drop, empty, pool.caption_index[pick])
        return {"mean": train_latents[0][pick], "std": train_latents[1][pick], "text": text_table[caption]}

    unet_params, curve = fit("3/3 unet", loss_fn, init, batch_fn, steps, settings.unet_lr, settings.seed + 2)
    held = {"mean": test_latents[0], "std": test_latents[1], "text": text_table[held_out.caption_index]}
    # Held-out loss with fixed noise and timesteps; with the empty prompt, the gap shows the text is used.
    held_empty = dict(held, text=np.broadcast_to(text_table[empty], held["text"].shape))
    test_loss = jax.jit(loss_fn)(unet_params, held, jax.random.PRNGKey(0))
    test_loss_empty = jax.jit(loss_fn)(unet_params, held_empty, jax.random.PRNGKey(0))
    report = {
        "loss_curve": curve,
        "held_out_loss": float(test_loss),
        "held_out_loss_empty_prompt": float(test_loss_empty),
    }
    return unet_params, report


def train(settings: Settings, out: str, steps_scale: float = 1.0) -> dict:
    """Runs the three stages and writes the weights and base.json to `out`; returns the summary."""
    start = time.time()

    def steps(n: int) -> int:
        return max(1, round(n * steps_scale))

    tokenizer = tiny_base.write_tokenizer(os.path.join(out, tiny_base.TOKENIZER), synthetic.WORDS)
    unet = FlaxUNet2DConditionModel(**tiny_base.UNET)
    text_encoder = FlaxCLIPTextModule(tiny_base.text_config(tokenizer))
    image_encoder = CLIPImageEncoder(CLIPVisionConfig(**tiny_base.IMAGE))
    shapes = tiny_base.abstract_base_params(unet, tiny_base.vae_module(1.0), text_encoder, image_encoder)
    init = tiny_base.random_base_params(shapes, settings.seed)
    pool, held_out = make_pools(settings)
    tokens = np.stack([tokenize(tokenizer, text) for text in pool.captions])
    stages, times = {}, {}

    t = time.time()
    encoders = {"text_encoder": init["text_encoder"], "image_encoder": init["image_encoder"]}
    params, stages["encoders"] = train_encoders(
        settings, steps(settings.encoder_steps), pool, held_out, tokens, text_encoder, image_encoder, encoders
    )
    times["encoders_s"] = time.time() - t

    t = time.time()
    params["vae"], scaling, stages["vae"] = train_vae(
        settings, steps(settings.vae_steps), pool, held_out, tiny_base.vae_module(1.0), init["vae"]
    )
    times["vae_s"] = time.time() - t

    t = time.time()
    params["unet"], stages["unet"] = train_unet(
        settings, steps(settings.unet_steps), pool, held_out, tokens, unet, tiny_base.vae_module(scaling),
        text_encoder, params, init["unet"]
    )  # fmt: skip
    times["unet_s"] = time.time() - t

    sizes = tiny_base.save_base_params(params, out)
    times["total_s"] = time.time() - start
    summary = {
        "vae_scaling_factor": scaling,
        "settings": dataclasses.asdict(settings),
        "steps_scale": steps_scale,
        "stages": stages,
        "times": times,
        "file_bytes": sizes,
        "params": {name: int(sum(x.size for x in jax.tree.leaves(params[name]))) for name in tiny_base.FROZEN},
        "software": {"jax": jax.__version__, "device": jax.devices()[0].device_kind},
    }
    with open(os.path.join(out, tiny_base.SUMMARY), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=tiny_base.ASSETS, help="output folder (default: the committed assets)")
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--steps_scale", type=float, default=1.0, help="multiply every stage's steps (quick runs)")
    args = parser.parse_args(argv)
    summary = train(Settings(seed=args.seed), args.out, args.steps_scale)
    for name, stage in summary["stages"].items():
        print(name, {k: v for k, v in stage.items() if k != "loss_curve"}, f"{summary['times'][name + '_s']:.0f} s")
    megabytes = sum(summary["file_bytes"].values()) / 1e6
    print(
        f"wrote {args.out} ({megabytes:.2f} MB) in {summary['times']['total_s']:.0f} s; "
        f"VAE scaling factor {summary['vae_scaling_factor']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
