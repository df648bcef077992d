"""`GenerationRequest`: one call of `IPAdapterPipeline`, validated; its fields are the settings JSON of the output."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ipadapter_jax.choices import EMBEDS_SCALING
from ipadapter_jax.models.scale_presets import ScalePreset
from ipadapter_jax.pipelines.image_prompt import ImageInput, ImagePrompt


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """What to generate: `len(prompts) * num_images_per_prompt` images (arguments as `IPAdapterPipeline.__call__`).

    `negative_prompts` None means the default: "" (or zeros for SDXL's `force_zeros_for_empty_prompt`).
    `seed` is one int or one per prompt; unused when `latents` are given.
    Per adapter (one entry each): `image_prompts` (empty: text-to-image), `scales`, `masks` (None or K mask
    images, K the images of that adapter's prompt), `embeds_scaling` (`choices.EMBEDS_SCALING`).
    """

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None = None
    image_prompts: tuple[ImagePrompt, ...] = ()
    scales: tuple[float | Mapping[str, Any] | ScalePreset, ...] = (1.0,)
    masks: tuple[tuple[ImageInput, ...] | None, ...] = (None,)
    embeds_scaling: tuple[str, ...] = ("v_only",)
    image_step_range: tuple[float, float] = (0.0, 1.0)
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    height: int = 512
    width: int = 512
    seed: int | tuple[int, ...] = 0
    num_images_per_prompt: int = 1
    latents: np.ndarray | None = None
    control_image: ImageInput | None = None
    controlnet_conditioning_scale: float = 1.0

    @classmethod
    def of(
        cls, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None, **fields: Any
    ) -> GenerationRequest:
        """From the pipeline's keyword arguments: one prompt or a list; one negative prompt or one per prompt."""
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
        negatives = None
        if negative_prompt is not None:
            negatives = (
                (negative_prompt,) * len(prompts) if isinstance(negative_prompt, str) else tuple(negative_prompt)
            )
        seed = fields.pop("seed", 0)
        seed = int(seed) if isinstance(seed, (int, np.integer)) else tuple(int(s) for s in seed)
        step_range = tuple(float(v) for v in fields.pop("image_step_range", (0.0, 1.0)))
        return cls(prompts=prompts, negative_prompts=negatives, seed=seed, image_step_range=step_range, **fields)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on iff guidance_scale > 1 (as in diffusers)."""
        return self.guidance_scale > 1.0

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    def check(self, size_multiple: int, vae_scale_factor: int, has_controlnet: bool) -> None:
        """ValueError naming the first setting this pipeline cannot honour."""
        if self.height <= 0 or self.width <= 0 or self.height % size_multiple or self.width % size_multiple:
            raise ValueError(
                f"height and width must be positive multiples of {size_multiple} for this model "
                f"(VAE factor {vae_scale_factor} x UNet down-sampling {size_multiple // vae_scale_factor}); "
                f"got {self.height}x{self.width}"
            )
        start, end = self.image_step_range
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"image_step_range must satisfy 0 <= start <= end <= 1; got ({start}, {end})")
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if self.negative_prompts is not None and len(self.negative_prompts) != len(self.prompts):
            raise ValueError(f"{len(self.negative_prompts)} negative prompts for {len(self.prompts)} prompts")
        if self.num_images_per_prompt < 1 or self.num_inference_steps < 1:
            raise ValueError("num_images_per_prompt and num_inference_steps must be >= 1")
        for name in ("guidance_scale", "controlnet_conditioning_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for where, value in _scale_values(self.scales[0] if len(self.scales) == 1 else list(self.scales)):
            if not math.isfinite(value):
                raise ValueError(f"scale{where} must be a finite number, got {value}")
        for mode in self.embeds_scaling:
            if mode not in EMBEDS_SCALING:
                raise ValueError(f"embeds_scaling must be one of {EMBEDS_SCALING}, got {mode!r}")
        if not isinstance(self.seed, int) and len(self.seed) != len(self.prompts):
            raise ValueError(f"seed: one per prompt ({len(self.prompts)}) or a single int; got {len(self.seed)}")
        if self.control_image is not None and not has_controlnet:
            raise ValueError("control_image given but this pipeline has no ControlNet")
        if has_controlnet and self.control_image is None:
            raise ValueError("this pipeline has a ControlNet: pass control_image")
        for prompt in self.image_prompts:
            prompt.check(len(self.prompts))
        for index, masks in enumerate(self.masks):
            if masks is None:
                continue
            if not self.image_prompts:
                raise ValueError("mask given without an image prompt")
            if self.image_prompts[index].combine != "concat":
                which = "" if len(self.masks) == 1 else f" of adapter {index}"
                raise ValueError(
                    f"mask{which}: a mask per image needs each image's own tokens (combine='concat'); got combine="
                    f"{self.image_prompts[index].combine!r}, which merges the images into one input"
                )
            if len(masks) != self.image_prompts[index].num_images:
                which = "" if len(self.masks) == 1 else f" of adapter {index}"
                raise ValueError(
                    f"mask{which}: one mask per image prompt image ({self.image_prompts[index].num_images}), "
                    f"got {len(masks)}"
                )

    def settings(self) -> dict:
        """Every setting, JSON-able (images are counted, not stored; the seed is None when latents are given)."""
        image_prompt = {
            "num_prompt_images": 0,
            "per_prompt_images": False,
            "image_embeds_given": False,
            "negative_image": False,
            "combine": "concat",
        }
        if self.image_prompts:
            described = [prompt.settings() for prompt in self.image_prompts]
            image_prompt = {key: one_or_list([d[key] for d in described]) for key in described[0]}
        return {
            "prompt": list(self.prompts),
            "negative_prompt": None if self.negative_prompts is None else list(self.negative_prompts),
            **image_prompt,
            "scale": one_or_list([_json_scale(scale) for scale in self.scales]),
            "embeds_scaling": one_or_list(list(self.embeds_scaling)),
            "masks": one_or_list([0 if masks is None else len(masks) for masks in self.masks]),
            "image_step_range": list(self.image_step_range),
            "guidance_scale": float(self.guidance_scale),
            "num_inference_steps": self.num_inference_steps,
            "height": self.height,
            "width": self.width,
            "seed": None
            if self.latents is not None
            else (self.seed if isinstance(self.seed, int) else list(self.seed)),
            "latents_given": self.latents is not None,
            "num_images_per_prompt": self.num_images_per_prompt,
            "controlnet_conditioning_scale": float(self.controlnet_conditioning_scale),
        }


def _scale_values(scale: Any, where: str = "") -> list[tuple[str, float]]:
    """Every number in a scale spec (a number, nested dicts/lists of numbers, a preset), with where it sits."""
    if isinstance(scale, ScalePreset):
        return [(".weight", float(scale.weight))]
    if isinstance(scale, Mapping):
        return [item for key, value in scale.items() for item in _scale_values(value, f"{where}.{key}")]
    if isinstance(scale, (list, tuple)):
        return [item for i, value in enumerate(scale) for item in _scale_values(value, f"{where}[{i}]")]
    return [(where, float(scale))]


def one_or_list(values: list) -> Any:
    """Per-adapter settings: the value itself for one adapter, the list for several."""
    return values[0] if len(values) == 1 else values


def _json_scale(scale: Any) -> Any:
    if isinstance(scale, ScalePreset):
        return scale.settings()
    if isinstance(scale, Mapping):
        return {key: _json_scale(value) for key, value in scale.items()}
    if isinstance(scale, (list, tuple)):
        return [_json_scale(value) for value in scale]
    return float(scale)
