"""Frozen encoders: a preprocessed batch -> what the training step consumes (`training.step`'s EncodedBatch).

Used twice with the same code: inside the jitted train step for raw data, and once over the whole dataset
by the embedding cache (`ipadapter_jax.data.embedding_cache`), after which training reads the stored outputs.

Input batch (see `ipadapter_jax.data.preprocess.Preprocessor`), NHWC images:
  pixel_values (B, R, R, 3) in [-1, 1]; clip_pixel_values (B, 224, 224, 3); input_ids[, input_ids_2] (B, 77);
  SDXL: original_size, crop_top_left, target_size (B, 2) int32.
Output:
  latent_mean, latent_std (B, 4, R/8, R/8)  the VAE posterior (unscaled; the step samples from it)
  text_embeds (B, 77, cross)                SD1.5: last hidden state; SDXL: hidden_states[-2] of both encoders
  text_pooled (B, P)                        SDXL only: projected pooled output of the second encoder
  time_ids (B, 6)                           SDXL only: original size, crop top-left, target size
  image_embeds (B, D) | (B, S, E)           CLIP image embedding (base) or hidden_states[-2] (Plus/Full/FaceID
                                            Plus); none for FaceID, whose projection reads the identity embedding
                                            `face_embeds` (B, D) of the data, passed through
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax.models.image_encoder import CLIPImageEncoder, null_projection_input, projection_input
from ipadapter_jax.models.text_encoder import encode_token_ids

# Batch fields that are not encoder inputs and pass through `encode_if_raw` unchanged: the condition-drop flags of
# the data pipeline and the diffusion noise / timesteps a caller may inject (`ipadapter_jax.training.step`).
PASSTHROUGH = ("drop_image", "drop_text", "noise", "timesteps", "face_embeds")

# Adapter kind -> the kind of CLIP image features its projection reads (`projection_input`): FaceID Plus reads Plus's
# hidden_states[-2] (with the identity embedding), FaceID none.
IMAGE_FEATURES = {"base": "base", "plus": "plus", "full": "full", "faceid": None, "faceid-plus": "plus"}


@dataclasses.dataclass(frozen=True)
class Encoders:
    """The frozen encoder modules (params travel separately, as {"vae", "text_encoders", "image_encoder"})."""

    vae: nn.Module  # diffusers FlaxAutoencoderKL
    text_encoders: Sequence[nn.Module]  # transformers Flax CLIP text modules; SDXL: (plain, with projection)
    image_encoder: CLIPImageEncoder
    kind: str  # the adapter kind: which image encoder output is kept (`projection_input`)

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2


def encode_text(encoders: Encoders, params: Sequence[Any], input_ids: Sequence[jax.Array]) -> dict:
    """Token ids, one (B, 77) array per text encoder -> {"text_embeds"[, "text_pooled"]}, as the pipelines
    condition the UNet (`ipadapter_jax.models.text_encoder.encode_token_ids`)."""
    conditioning = encode_token_ids(encoders.text_encoders, params, input_ids)
    result = {"text_embeds": conditioning.context}
    if conditioning.pooled is not None:
        result["text_pooled"] = conditioning.pooled
    return result


def encode_image(encoders: Encoders, params: Any, clip_pixel_values: jax.Array) -> jax.Array:
    """(B, 224, 224, 3) CLIP-normalised pixels -> image_embeds (B, D) or penultimate states (B, S, E)."""
    features = encoders.image_encoder.apply({"params": params}, clip_pixel_values)
    return projection_input(features, IMAGE_FEATURES[encoders.kind])


def null_conditions(kind: str, encoded_null: dict) -> dict:
    """What the step substitutes for dropped conditions, each (1, ...), from `encoded_null` (`encode_batch` of the
    null example, batch 1): null_text_embeds (1, 77, cross), the empty prompt's encoding; SDXL's null_text_pooled
    (1, P); null_image_embeds, the projection's input for a dropped image (`null_projection_input`), none for FaceID
    (no image input; its dropped identity embedding is zeros, `ipadapter_jax.training.step.apply_condition_drop`).
    Traceable: `jax.eval_shape` over it gives their shapes."""
    out = {"null_text_embeds": encoded_null["text_embeds"]}
    if "text_pooled" in encoded_null:
        out["null_text_pooled"] = encoded_null["text_pooled"]
    if IMAGE_FEATURES[kind] is not None:
        out["null_image_embeds"] = null_projection_input(encoded_null["image_embeds"], IMAGE_FEATURES[kind])
    return out


def encode_batch(encoders: Encoders, params: dict, batch: dict) -> dict:
    """A preprocessed batch -> the EncodedBatch fields (see the module docstring)."""
    pixels = jnp.transpose(batch["pixel_values"], (0, 3, 1, 2))  # diffusers' Flax VAE takes NCHW
    posterior = encoders.vae.apply({"params": params["vae"]}, pixels, method=encoders.vae.encode).latent_dist
    ids = [batch["input_ids"]] + ([batch["input_ids_2"]] if encoders.is_sdxl else [])
    out = {
        # diffusers' Flax VAE returns the posterior NHWC; the UNet takes NCHW latents.
        "latent_mean": jnp.transpose(posterior.mean, (0, 3, 1, 2)),
        "latent_std": jnp.transpose(posterior.std, (0, 3, 1, 2)),
        **encode_text(encoders, params["text_encoders"], ids),
    }
    if IMAGE_FEATURES[encoders.kind] is not None:
        out["image_embeds"] = encode_image(encoders, params["image_encoder"], batch["clip_pixel_values"])
    if encoders.is_sdxl:
        out["time_ids"] = sdxl_time_ids(batch)
    return out


def sdxl_time_ids(batch: dict) -> jax.Array:
    """SDXL's micro-conditions as its time ids, float32 (B, 6): original (height, width), crop (top, left), target
    (height, width), in tutorial_train_sdxl.py's `add_time_ids` order."""
    return jnp.concatenate([batch["original_size"], batch["crop_top_left"], batch["target_size"]], axis=-1).astype(
        jnp.float32
    )


def encode_if_raw(encoders: Encoders | None, params: dict | None, batch: dict) -> dict:
    """The training step's EncodedBatch from a data batch: a raw batch (a built dataset) is encoded with the frozen
    encoders (no gradient flows into them); an embedding-cache batch already is one. `PASSTHROUGH` fields are kept.
    """
    if "latent_mean" in batch:
        return batch
    if encoders is None:
        raise ValueError("a raw batch (pixels and token ids) needs the frozen encoders; got none")
    kept = {key: batch[key] for key in PASSTHROUGH if key in batch}
    return dict(jax.lax.stop_gradient(encode_batch(encoders, params, batch)), **kept)
