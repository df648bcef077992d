"""Image prompt -> image tokens for decoupled cross-attention, with the negative tokens of classifier-free guidance.

`ImagePrompt` is the request's value: images (or precomputed features) shared by every text prompt or one image
prompt per text prompt, and optional negative images. `ImagePromptEncoder` turns it into tokens in two stages, so
that the expensive, adapter-independent one can be cached by the caller:

1. features: CLIP preprocessing and the frozen image encoder -> the projection's input per image, (K, ...):
   `image_embeds` (K, projection_dim) for the base adapter, `hidden_states[-2]` (K, 1 + patches, hidden) for
   Plus/Full (`ipadapter_jax.models.image_encoder.projection_input`). This is what diffusers calls image
   embeddings (`ip_adapter_image_embeds`); averaging or interpolating them is meaningful.
2. tokens: the adapter's projection; K images of one prompt give the concatenation of their tokens,
   (K * num_tokens, cross_attention_dim), or, with another `combine` mode (`image_combine`: add, subtract,
   average, norm-average), the tokens of their features combined into one input, (num_tokens, cross).

Negative features (the unconditional branch of guidance) default to the reference's
(`ImageEncoder.null_features`: zeros for the base adapter, the encoder's features of the all-zero image for
Plus/Full); a negative image replaces them by its own features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ipadapter_jax.models.adapter import Adapter
from ipadapter_jax.models.image_encoder import ImageEncoder
from ipadapter_jax.pipelines.image_combine import combine_features, combine_mode_name, combine_negative_features

ImageInput = Image.Image | np.ndarray


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or a sequence of images -> a non-empty list."""
    listed = [images] if isinstance(images, (Image.Image, np.ndarray)) else list(images)
    if not listed:
        raise ValueError("an image prompt needs at least one image")
    return listed


@dataclasses.dataclass(frozen=True)
class ImagePrompt:
    """The image side of a request. P: text prompts; K: images per image prompt.

    images: shared: K images for every prompt; per_prompt: P groups of K images, group p for prompt p only.
    embeds: instead of images, precomputed features: shared (K, ...), per_prompt (P, K, ...).
    negative_images / negative_embeds: replace the default unconditional features; 1 (used for every prompt
      image) or K, shared by all prompts.
    combine: how the K images become the adapter's input (`image_combine`; default concat).
    """

    images: tuple | None = None
    embeds: np.ndarray | None = None
    per_prompt: bool = False
    negative_images: tuple | None = None
    negative_embeds: np.ndarray | None = None
    combine: str = "concat"

    @classmethod
    def of(
        cls,
        image: Any = None,
        image_embeds: Any = None,
        negative_image: Any = None,
        negative_image_embeds: Any = None,
        per_prompt: bool = False,
        combine: str = "concat",
    ) -> ImagePrompt | None:
        """From the pipeline's keyword arguments; None when there is no image prompt (text-to-image)."""
        if image is not None and image_embeds is not None:
            raise ValueError("pass either image or image_embeds, not both")
        if negative_image is not None and negative_image_embeds is not None:
            raise ValueError("pass either negative_image or negative_image_embeds, not both")
        combine = combine_mode_name(combine)
        if image is None and image_embeds is None:
            if negative_image is not None or negative_image_embeds is not None:
                raise ValueError("a negative image needs an image prompt")
            return None
        images = None
        if image is not None:
            listed = as_image_list(image)
            images = tuple(tuple(as_image_list(group)) for group in listed) if per_prompt else tuple(listed)
        return cls(
            images=images,
            embeds=None if image_embeds is None else np.asarray(image_embeds, np.float32),
            per_prompt=per_prompt,
            negative_images=None if negative_image is None else tuple(as_image_list(negative_image)),
            negative_embeds=None if negative_image_embeds is None else np.asarray(negative_image_embeds, np.float32),
            combine=combine,
        )

    @property
    def num_images(self) -> int:
        """K, the images of one image prompt (before `combine`)."""
        if self.embeds is not None:
            return self.embeds.shape[1] if self.per_prompt else self.embeds.shape[0]
        return len(self.images[0]) if self.per_prompt else len(self.images)

    def check(self, num_prompts: int) -> None:
        """ValueError unless the prompt fits `num_prompts` text prompts."""
        if not self.per_prompt:
            return
        if self.images is not None:
            counts = sorted({len(group) for group in self.images})
            if len(self.images) != num_prompts or len(counts) != 1:
                raise ValueError(
                    f"per_prompt_images: need one image prompt per text prompt ({num_prompts}) with the same number "
                    f"of images each; got {len(self.images)} image prompts of {counts} image(s)"
                )
        elif self.embeds.ndim < 3 or self.embeds.shape[0] != num_prompts:
            raise ValueError(
                f"per_prompt_images: image_embeds must be (prompts={num_prompts}, images, *feature_shape), got "
                f"{tuple(self.embeds.shape)}"
            )

    def settings(self) -> dict:
        """JSON-able description for the request's settings."""
        return {
            "num_prompt_images": self.num_images,
            "per_prompt_images": self.per_prompt,
            "image_embeds_given": self.embeds is not None,
            "negative_image": self.negative_images is not None or self.negative_embeds is not None,
            "combine": self.combine,
        }


class ImagePromptEncoder:
    """The image encoder + the adapter's projection; each stage compiled once per number of images."""

    def __init__(self, image_encoder: ImageEncoder, adapter: Adapter):
        self.image_encoder, self.adapter = image_encoder, adapter
        self.kind = adapter.kind
        self._project = jax.jit(lambda params, features: adapter.image_proj.apply({"params": params}, features))

    def features(self, images: ImageInput | Sequence[ImageInput]) -> jax.Array:
        """K images (PIL or uint8 arrays, any size and mode) -> (K, *feature_shape) projection inputs."""
        return self.image_encoder.features(as_image_list(images), self.kind)

    def negative_features(self, num_images: int) -> jax.Array:
        """The default unconditional features for `num_images` images, (num_images, *feature_shape)."""
        null = self.image_encoder.null_features(self.kind)
        return jnp.broadcast_to(null, (num_images,) + null.shape[1:])

    def tokens(self, features: jax.Array) -> jax.Array:
        """(G, K, *feature_shape) features of G prompts of K images each -> (G, K * num_tokens, cross) tokens."""
        return self._project(self.adapter.params["image_proj"], features)

    def encode(self, prompt: ImagePrompt, num_prompts: int, guided: bool) -> np.ndarray:
        """-> image tokens (P, G, K' * num_tokens, cross): G = 2 (negative, positive) with guidance, else 1;
        K' = K with concat, else 1 (`prompt.combine`)."""
        prompt.check(num_prompts)
        if prompt.embeds is not None:
            features = jnp.asarray(prompt.embeds)
            features = features if prompt.per_prompt else features[None]  # (P' , K, ...)
        elif prompt.per_prompt:
            flat = self.features([picture for group in prompt.images for picture in group])
            features = flat.reshape((num_prompts, prompt.num_images) + flat.shape[1:])
        else:
            features = self.features(list(prompt.images))[None]
        count = features.shape[1]
        features = combine_features(features, prompt.combine)
        if guided:
            if prompt.negative_images is not None:
                negative = self.features(list(prompt.negative_images))
            elif prompt.negative_embeds is not None:
                negative = jnp.asarray(prompt.negative_embeds)
            else:
                negative = self.negative_features(count)
            if negative.shape[1:] != features.shape[2:] or negative.shape[0] not in (1, count):
                raise ValueError(
                    f"negative image features {tuple(negative.shape)} do not fit the prompt images' "
                    f"{tuple(features.shape[1:])}: need 1 or {count} of shape {tuple(features.shape[2:])}"
                )
            negative = combine_negative_features(negative, prompt.combine, count)
            features = jnp.stack([jnp.broadcast_to(negative, features.shape), features], axis=1)  # (P', 2, K, ...)
        else:
            features = features[:, None]  # (P', 1, K, ...)
        tokens = self.tokens(features.reshape((-1,) + features.shape[2:]))  # (P' * G, K * n, cross)
        tokens = np.asarray(tokens).reshape(features.shape[:2] + tokens.shape[1:])
        return np.broadcast_to(tokens, (num_prompts,) + tokens.shape[1:])
