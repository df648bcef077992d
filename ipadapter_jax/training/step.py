"""The IP-Adapter training step: diffusion loss on the frozen UNet, gradients for the adapter only.

One step, for a batch of encoded examples (see `EncodedBatch` below; raw batches are first encoded by the
frozen encoders inside the same compiled step, `ipadapter_jax.training.encode.encode_if_raw`):
  1. latents sampled from the cached VAE posterior, times the VAE scaling factor;
  2. condition dropping (decided per example by the data pipeline): image embeddings -> the null image
     embedding (FaceID: the identity embedding -> zeros, as the official tutorial_train_faceid.py does; FaceID
     Plus also its CLIP hidden states -> those of the all-zero image, as Plus), text tokens -> the encoding of the
     empty prompt;
  3. noise and timesteps t ~ U{0..T-1} from the step's RNG; noisy latents by the base's DDPM schedule;
  4. image tokens = image_proj(its input: `projection_features`); UNet noise (or v) prediction with the adapter's
     K'/V' (FaceID adapters train no UNet LoRA here: the projection and K'/V' only);
  5. MSE against the target (optionally min-SNR weighted), AdamW update of the adapter params.

EncodedBatch (a dict of arrays, leading axis B = global batch):
  latent_mean, latent_std (B, 4, h, w) f32  the VAE posterior of the target image (unscaled)
  text_embeds   (B, T, cross)      text encoder hidden states (SDXL: both encoders concatenated)
  image_embeds  (B, D) or (B, S, E) CLIP image embedding (base) or penultimate hidden states (Plus/Full/FaceID
                                   Plus); absent for FaceID
  face_embeds   (B, D_id)          FaceID kinds: the identity embedding (`ipadapter_jax.data.face_embeds`)
  drop_image    (B,) bool          replace the image embedding by the null image embedding
  drop_text     (B,) bool          replace the text tokens by the empty-prompt encoding
  SDXL only: text_pooled (B, P), time_ids (B, 6)
  optional, injected (tests, research): noise (B, 4, h, w) f32 and timesteps (B,) int32 replace the step's own
    draws of the diffusion noise and timesteps

Frozen (never differentiated, never in the optimizer):
  unet          UNet params without K'/V'
  null_text_embeds (1, T, cross) encoding of "" (SDXL also null_text_pooled (1, P))
  null_image_embeds (1, D) or (1, S, E): zeros (base) or the encoder's output on zero pixels (Plus/Full/FaceID
                    Plus); absent for FaceID
  alphas_cumprod (num_train_timesteps,) of the base's noise schedule
  vae_scaling_factor ()             0.18215 for SD1.5, 0.13025 for SDXL
  encoders      params of `ipadapter_jax.training.encode.Encoders` (only for raw batches)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ipadapter_jax.models.adapter import merge_unet_params
from ipadapter_jax.models.image_proj import pack_faceid_plus_features, projection_kind
from ipadapter_jax.training.encode import Encoders, encode_if_raw


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    step: jax.Array  # () int32: steps taken, non-finite (skipped) steps included
    adapter: Any  # {"image_proj": ..., "ip_layers": ...}
    opt_state: Any
    rng: jax.Array  # base key; step i uses fold_in(rng, i)
    ema: Any = None  # EMA of `adapter`, or None when disabled


@dataclasses.dataclass(frozen=True)
class LossConfig:
    prediction_type: str = "epsilon"  # or "v_prediction" (SD2-768-style bases)
    noise_offset: float = 0.0  # 0 = off; e.g. 0.05 adds per-channel offset noise
    snr_gamma: float = 0.0  # 0 = plain MSE (reference); e.g. 5.0 = min-SNR weighting


@dataclasses.dataclass(frozen=True)
class StepModels:
    """The (stateless) Flax modules the step applies; params travel separately."""

    unet: nn.Module  # IPUNet2DConditionModel
    image_proj: nn.Module  # ImageProjModel / Resampler / MLPProjModel / FaceIDProjModel / FaceIDPlusProjModel
    remat: bool = False  # recompute UNet activations in the backward pass (memory for compute)


def learning_rate_schedule(learning_rate: float = 1e-4, warmup_steps: int = 0) -> optax.Schedule:
    """Constant LR (the reference recipe), optionally after a linear warmup from 0 over `warmup_steps`."""
    if not warmup_steps:
        return optax.constant_schedule(learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
        [warmup_steps],
    )


def make_optimizer(
    schedule: optax.Schedule,
    weight_decay: float = 1e-2,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip_norm: float = 0.0,
    grad_accum_steps: int = 1,
) -> optax.GradientTransformation:
    """AdamW (torch.optim.AdamW semantics: decoupled decay on every param) following `schedule`.

    Options: global-norm clipping, gradient accumulation over `grad_accum_steps` micro-steps.
    """
    chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    optimizer = optax.chain(*chain)
    if grad_accum_steps > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=grad_accum_steps)
    return optimizer


def sample_noise_and_timesteps(
    rng: jax.Array, latents_shape: tuple[int, ...], num_train_timesteps: int, noise_offset: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Gaussian noise of `latents_shape` and timesteps (B,) int32 uniform in [0, num_train_timesteps).

    `rng` is the step's key after `split_step_key`.
    """
    noise_key, offset_key, t_key = jax.random.split(rng, 3)
    noise = jax.random.normal(noise_key, latents_shape, jnp.float32)
    if noise_offset:
        batch, channels = latents_shape[:2]
        noise = noise + noise_offset * jax.random.normal(offset_key, (batch, channels, 1, 1), jnp.float32)
    timesteps = jax.random.randint(t_key, (latents_shape[0],), 0, num_train_timesteps)
    return noise, timesteps


def split_step_key(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A step's key -> (key of the latent sample, key of the diffusion noise and timesteps)."""
    latent_key, noise_key = jax.random.split(rng)
    return latent_key, noise_key


def apply_condition_drop(batch: dict, frozen: dict) -> dict:
    """The batch with dropped conditions replaced by the null encodings (`frozen["null_<field>"]`, (1, ...)).

    drop_text replaces `text_embeds` (and SDXL's `text_pooled`); drop_image replaces `image_embeds` (when the
    adapter reads one) and sets `face_embeds` (when the batch has one) to zeros, the official FaceID training's drop.
    """

    def where(drop: jax.Array, null: jax.Array, value: jax.Array) -> jax.Array:
        drop = drop.reshape((-1,) + (1,) * (value.ndim - 1))
        return jnp.where(drop, null.astype(value.dtype), value)

    out = dict(batch)
    for field in ("text_embeds", "text_pooled"):
        if field in batch:
            out[field] = where(batch["drop_text"], frozen[f"null_{field}"], batch[field])
    if "image_embeds" in batch:
        out["image_embeds"] = where(batch["drop_image"], frozen["null_image_embeds"], batch["image_embeds"])
    if "face_embeds" in batch:
        face = batch["face_embeds"]
        out["face_embeds"] = where(batch["drop_image"], jnp.zeros((1,) + face.shape[1:], face.dtype), face)
    return out


def projection_features(batch: dict, image_proj: nn.Module) -> jax.Array:
    """What the adapter's projection reads from an (encoded, condition-dropped) batch: `image_embeds`; for FaceID
    `face_embeds` (B, D_id); for FaceID Plus both packed per example, (B, D_id + S * E) (`pack_faceid_plus_features`).
    """
    kind = projection_kind(image_proj)
    if kind == "faceid":
        return batch["face_embeds"]
    if kind == "faceid-plus":
        return pack_faceid_plus_features(batch["face_embeds"], batch["image_embeds"])
    return batch["image_embeds"]


def diffusion_loss(
    adapter: Any,
    frozen: dict,
    batch: dict,
    rng: jax.Array,
    models: StepModels,
    loss_config: LossConfig,
) -> tuple[jax.Array, dict]:
    """Mean (optionally min-SNR weighted) squared error of the UNet's prediction; returns (loss, metrics)."""
    latent_key, noise_key = split_step_key(rng)
    posterior_noise = jax.random.normal(latent_key, batch["latent_mean"].shape, jnp.float32)
    latents = frozen["vae_scaling_factor"] * (batch["latent_mean"] + batch["latent_std"] * posterior_noise)
    alphas_cumprod = frozen["alphas_cumprod"]
    noise, timesteps = sample_noise_and_timesteps(
        noise_key, latents.shape, alphas_cumprod.shape[0], loss_config.noise_offset
    )
    noise = batch.get("noise", noise)
    timesteps = batch.get("timesteps", timesteps)
    alpha = alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    noisy = jnp.sqrt(alpha) * latents + jnp.sqrt(1.0 - alpha) * noise
    if loss_config.prediction_type == "epsilon":
        target = noise
    elif loss_config.prediction_type == "v_prediction":
        target = jnp.sqrt(alpha) * noise - jnp.sqrt(1.0 - alpha) * latents
    else:
        raise ValueError(f"unknown prediction_type {loss_config.prediction_type!r}")

    batch = apply_condition_drop(batch, frozen)
    image_tokens = models.image_proj.apply(
        {"params": adapter["image_proj"]}, projection_features(batch, models.image_proj)
    )
    added = None
    if "time_ids" in batch:
        added = {"text_embeds": batch["text_pooled"], "time_ids": batch["time_ids"]}

    def predict(ip_layers: Any, noisy: jax.Array, image_tokens: jax.Array) -> jax.Array:
        variables = {"params": merge_unet_params(frozen["unet"], ip_layers)}
        return models.unet.apply(
            variables, noisy, timesteps, batch["text_embeds"], added_cond_kwargs=added, image_tokens=image_tokens
        ).sample

    if models.remat:
        # Keep only weight-matmul outputs; everything else is recomputed in the backward pass.
        predict = jax.checkpoint(predict, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    pred = predict(adapter["ip_layers"], noisy, image_tokens)
    per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
    if loss_config.snr_gamma:
        snr = alpha[:, 0, 0, 0] / (1.0 - alpha[:, 0, 0, 0])
        # min-SNR-gamma (Hang et al., 2023) in its epsilon and v-prediction forms.
        denominator = snr + 1.0 if loss_config.prediction_type == "v_prediction" else snr
        weight = jnp.minimum(snr, loss_config.snr_gamma) / denominator
        per_example = per_example * weight
    loss = jnp.mean(per_example)
    return loss, {"loss": loss}


def make_train_step(
    models: StepModels,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_config: LossConfig = LossConfig(),
    ema_decay: float = 0.0,
    grad_accum_steps: int = 1,
    encoders: Encoders | None = None,
    return_grads: bool = False,
):
    """-> train_step(state, frozen, batch) -> (state, metrics). Pure; jit and shard it in the caller.

    A step whose loss or gradients are not finite leaves the adapter, optimizer state and EMA unchanged, counts
    the step (`state.step` always advances, so a checkpoint's step is the data position) and reports
    `finite == 0`; the training loop decides whether to stop or go on. `schedule` and `grad_accum_steps` only
    feed the reported learning rate (the optimizer already contains them). With `encoders`, batches may be raw
    preprocessed examples, encoded in the step with `frozen["encoders"]` (`encode_if_raw`). With `return_grads`,
    `metrics["grads"]` holds the adapter's gradients.
    """

    def train_step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict]:
        batch = encode_if_raw(encoders, frozen.get("encoders"), batch)
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(diffusion_loss, has_aux=True)
        (loss, metrics), grads = grad_fn(state.adapter, frozen, batch, rng, models, loss_config)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.adapter)
        adapter = optax.apply_updates(state.adapter, updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        ema = state.ema
        if ema_decay:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema, adapter)
        updated = TrainState(step=state.step, adapter=adapter, opt_state=opt_state, rng=state.rng, ema=ema)
        # On a non-finite step keep the old values; the step is counted either way.
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        new_state = new_state.replace(step=state.step + 1)
        metrics = dict(
            metrics,
            finite=finite.astype(jnp.int32),
            grad_norm=optax.tree.norm(grads),
            param_norm=optax.tree.norm(state.adapter),
            learning_rate=schedule(state.step // grad_accum_steps),
        )
        if return_grads:
            metrics["grads"] = grads
        return new_state, metrics

    return train_step


def init_train_state(
    adapter: Any, optimizer: optax.GradientTransformation, seed: int, ema_decay: float = 0.0
) -> TrainState:
    """Step 0 state for `adapter` (host or device arrays)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        adapter=adapter,
        opt_state=optimizer.init(adapter),
        rng=jax.random.PRNGKey(seed),
        ema=jax.tree.map(jnp.asarray, adapter) if ema_decay else None,
    )
