"""FaceID image prompts: a face model's identity embeddings (and, for FaceID Plus, the face image) -> the
pipeline's `image_embeds` / `negative_image_embeds`.

    embeds = np.load("face.npy")                                  # (K, 512): insightface's normed_embedding
    out = pipe(**faceid_prompt(pipe, embeds), prompt="a photo in a garden")                      # FaceID
    out = pipe(**faceid_prompt(pipe, embeds, face_image=crop), prompt="...")                     # FaceID Plus

As diffusers' FaceID pipelines do: the negative identity embedding is zeros; FaceID Plus's negative CLIP features
are the encoder's features of the all-zero image (`ImageEncoder.null_features`). FaceID Plus v2's `s_scale`
(the shortcut) is a setting of the loaded adapter: `load_adapter(..., shortcut_scale=...)` or
`with_shortcut_scale(pipe, s_scale)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ipadapter_jax.models.image_proj import FaceIDPlusProjModel, pack_faceid_plus_features
from ipadapter_jax.pipelines.image_prompt import ImageInput, as_image_list
from ipadapter_jax.pipelines.pipeline import IPAdapterPipeline


def faceid_prompt(
    pipe: IPAdapterPipeline,
    face_embeds: Any,
    face_image: ImageInput | Sequence[ImageInput] | None = None,
    adapter_index: int = 0,
) -> dict[str, np.ndarray]:
    """`image_embeds` and `negative_image_embeds` for `pipe(...)` from identity embeddings.

    Args:
      pipe: a pipeline with a FaceID or FaceID Plus adapter.
      face_embeds: (D,) or (K, D) identity embeddings (K faces: their tokens are concatenated), D the adapter's
        `id_embeddings_dim` (512 for insightface's ArcFace).
      face_image: FaceID Plus only: the face image(s), 1 or K, whose CLIP `hidden_states[-2]` the adapter reads.
      adapter_index: which of the pipeline's adapters (several: pass the result as that adapter's list entries).
    Returns:
      {"image_embeds": (K, F), "negative_image_embeds": (1, F)}: F = D (FaceID) or D + T * E (FaceID Plus,
      `pack_faceid_plus_features`).
    Raises:
      ValueError: not a FaceID adapter, embeddings of the wrong width, a missing or surplus face image.
    """
    adapter = pipe.adapters[adapter_index]
    kind, image_proj = adapter.kind, adapter.image_proj
    if kind not in ("faceid", "faceid-plus"):
        raise ValueError(f"face embeddings are the input of FaceID adapters; this adapter is a {kind!r} one")
    embeds = np.asarray(face_embeds, np.float32)
    embeds = embeds[None] if embeds.ndim == 1 else embeds
    width = image_proj.id_embeddings_dim
    if embeds.ndim != 2 or embeds.shape[1] != width:
        raise ValueError(f"face embeddings must be (K, {width}) (one identity embedding per face), got {embeds.shape}")
    negative = np.zeros((1, width), np.float32)
    if kind == "faceid":
        if face_image is not None:
            raise ValueError("a FaceID adapter reads only the identity embeddings; face_image is for FaceID Plus")
        return {"image_embeds": embeds, "negative_image_embeds": negative}
    if face_image is None:
        raise ValueError("a FaceID Plus adapter also reads the face image's CLIP features: pass face_image")
    hidden = np.asarray(pipe.image_encoder.features(as_image_list(face_image), "plus"))
    if hidden.shape[0] not in (1, embeds.shape[0]):
        raise ValueError(f"{hidden.shape[0]} face images for {embeds.shape[0]} face embeddings: pass 1 or as many")
    hidden = np.broadcast_to(hidden, (embeds.shape[0],) + hidden.shape[1:])
    null = np.asarray(pipe.image_encoder.null_features("plus"))
    return {
        "image_embeds": np.asarray(pack_faceid_plus_features(embeds, hidden)),
        "negative_image_embeds": np.asarray(pack_faceid_plus_features(negative, null)),
    }


def with_shortcut_scale(pipe: IPAdapterPipeline, s_scale: float | None, adapter_index: int = 0) -> IPAdapterPipeline:
    """The pipeline with the shortcut of its (`adapter_index`-th) FaceID Plus adapter set: v2's `shortcut=True,
    s_scale` (None: v1, no shortcut). The sampling loop compiles again on the next call."""
    adapter = pipe.adapters[adapter_index]
    if not isinstance(adapter.image_proj, FaceIDPlusProjModel):
        raise ValueError(f"s_scale is a setting of FaceID Plus adapters; this adapter is a {adapter.kind!r} one")
    adapters = list(pipe.adapters)
    adapters[adapter_index] = dataclasses.replace(adapter, image_proj=adapter.image_proj.clone(shortcut_scale=s_scale))
    return IPAdapterPipeline(
        pipe.base,
        pipe.image_encoder,
        adapters,
        controlnet=pipe.controlnet,
        controlnet_params=pipe.controlnet_params,
        devices=list(pipe.mesh.devices.flat),
    )
