"""IP-Adapter text-to-image pipelines (SD1.5/SD2 family and SDXL, optional ControlNet) on JAX.

    pipe = IPAdapterPipeline.from_pretrained(SD15_DIR, "ip-adapter_sd15.safetensors", IMAGE_ENCODER_DIR)
    out = pipe(image, prompt="best quality", scale=0.6, num_inference_steps=50, seed=0)
    out.images  # PIL images; out.pixels (B, H, W, 3) float32 in [0, 1]; out.settings (JSON-able)

A call is request -> conditioning -> sampler, as the diffusers PyTorch pipelines it matches
(`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `StableDiffusionControlNetPipeline` with an IP-Adapter
loaded) compute it:

1. Request (`request.GenerationRequest`): the call's arguments, validated; its fields are the output's settings.
2. Conditioning. Text (`models.text_encoder`): prompts, and with guidance the negative prompts ("" by default;
   SDXL with `force_zeros_for_empty_prompt` and no negative prompt: zeros), each repeated
   `num_images_per_prompt` times; SDXL also gets `time_ids` = (height, width, 0, 0, height, width). Image
   (`image_prompt`, per adapter: several adapters at once as diffusers' `load_ip_adapter([...])`, `adapters`):
   images or features -> tokens; several images concatenate their tokens (or, with masks, attend one by one); the
   negative tokens come from the reference's null features or a negative image. One image prompt is shared by
   the batch, or (`per_prompt_images=True`) each text prompt has its own (evaluation runs many in one call).
3. Sampling (`sampling`): one compiled function runs every denoising step (scheduler: whatever the base holds;
   DDIM, DPM-Solver++ and Euler are tested) and the VAE decode, batch-sharded over the local devices.

Classifier-free guidance is on iff `guidance_scale > 1` (as in diffusers); that and the shapes are the only
things that select a compiled function: scale, guidance scale, prompts, seed and the image step range are data.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ipadapter_jax.models.adapter import Adapter, merge_adapters_params
from ipadapter_jax.models.base_model import BaseModel
from ipadapter_jax.models.image_encoder import ImageEncoder
from ipadapter_jax.models.scales import ScaleSpec
from ipadapter_jax.models.text_encoder import PromptEncoder
from ipadapter_jax.pipelines.adapters import adapter_fields, adapters_unet, check_adapter_fits
from ipadapter_jax.pipelines.conditioning import image_conditioning, text_conditioning
from ipadapter_jax.pipelines.image_prompt import ImageInput, ImagePromptEncoder
from ipadapter_jax.pipelines.images import control_pixels, to_pil
from ipadapter_jax.pipelines.request import GenerationRequest
from ipadapter_jax.pipelines.sampling import Sampler, SamplingInputs, initial_noise
from ipadapter_jax.sharding import local_mesh, pad_rows, padded_size, replicated


@dataclasses.dataclass
class GenerationOutput:
    """images: B PIL images (prompt-major: all images of prompt 0 first); pixels: (B, H, W, 3) float32 in
    [0, 1]; settings: every setting the request used (JSON-able); timings: seconds per phase."""

    images: list[Image.Image]
    pixels: np.ndarray
    settings: dict
    timings: dict


class IPAdapterPipeline:
    """Image-prompted generation with an IP-Adapter on a Stable Diffusion (SD1.5/SD2/SDXL) base model.

    Args:
      base: the frozen model (`ipadapter_jax.weights.load_base`).
      image_encoder: the CLIP image encoder (`ipadapter_jax.weights.load_image_encoder`).
      adapter: the IP-Adapter (`ipadapter_jax.weights.load_adapter`).
      controlnet, controlnet_params: optional diffusers `FlaxControlNetModel` (SD1.5/SD2 family only).
      devices: devices to shard the batch over (default: all local devices).
    Raises:
      ValueError: the adapter does not fit the UNet (token width, layers or kernel shapes), or the text
        encoders / ControlNet do not fit the UNet's kind.
    """

    def __init__(
        self,
        base: BaseModel,
        image_encoder: ImageEncoder,
        adapter: Adapter | Sequence[Adapter],
        *,
        controlnet: Any = None,
        controlnet_params: Any = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.is_sdxl = base.is_sdxl
        if self.is_sdxl != (len(base.text_encoders) == 2):
            raise ValueError(
                f"this UNet ({'SDXL, text_time' if self.is_sdxl else 'SD1.5/SD2'} conditioning) needs "
                f"{2 if self.is_sdxl else 1} text encoder(s), got {len(base.text_encoders)}"
            )
        if controlnet is not None and self.is_sdxl:
            raise ValueError("ControlNet is supported for SD1.5/SD2-family models only (diffusers' Flax ControlNet)")

        self.base, self.image_encoder = base, image_encoder
        self.controlnet, self.controlnet_params = controlnet, controlnet_params
        self.mesh = local_mesh(list(devices) if devices is not None else None)
        self.vae_scale_factor = base.vae_scale_factor
        # The Flax UNet cannot crop upsampled maps to odd skip sizes (PyTorch's can): latents must halve exactly
        # at every down block.
        self.size_multiple = self.vae_scale_factor * 2 ** (len(base.unet.config.block_out_channels) - 1)
        self.prompt_encoder = PromptEncoder(base.text_encoders)
        self.has_controlnet = controlnet is not None
        self._samplers: dict[tuple, Sampler] = {}  # per adapter count and design: they survive unloading
        self._set_adapters((adapter,) if isinstance(adapter, Adapter) else tuple(adapter))

    def _set_adapters(self, adapters: tuple[Adapter, ...]) -> None:
        """Checks the adapters against the base, merges their kernels into the UNet params, places them."""
        if not adapters:
            raise ValueError("an IPAdapterPipeline needs at least one adapter")
        for index, adapter in enumerate(adapters):
            check_adapter_fits(self.base, adapter, index)
        unet = adapters_unet(self.base.unet, adapters)
        if (key := (len(adapters), unet.adapter_design)) not in self._samplers:
            self._samplers[key] = Sampler(unet, self.base.vae, self.base.scheduler, self.mesh, self.controlnet)
        self.adapters, self.sampler = adapters, self._samplers[key]
        self.image_prompt_encoders = [ImagePromptEncoder(self.image_encoder, adapter) for adapter in adapters]
        unet_params = merge_adapters_params(self.base.unet_params, [a.params for a in adapters])
        params = {"unet": unet_params, "vae": self.base.vae_params}
        if self.controlnet is not None:
            params["controlnet"] = self.controlnet_params
        self.params = jax.device_put(params, replicated(self.mesh))

    @property
    def adapter(self) -> Adapter:
        """The first adapter (the only one unless several were given or loaded)."""
        return self.adapters[0]

    @property
    def image_prompt_encoder(self) -> ImagePromptEncoder:
        """The first adapter's image prompt encoder."""
        return self.image_prompt_encoders[0]

    def load_adapter(self, adapter: str | os.PathLike | Adapter, dtype: Any = jnp.float32) -> None:
        """Adds an adapter (a file as `from_pretrained` takes, or an `Adapter`) after the loaded ones; calls then
        take per-adapter lists (see `__call__`). The next call compiles for the new number of adapters."""
        if not isinstance(adapter, Adapter):
            from ipadapter_jax.weights import load_adapter

            adapter = load_adapter(adapter, self.base, image_encoder=self.image_encoder, dtype=dtype)
        self._set_adapters(self.adapters + (adapter,))

    def unload_adapter(self, index: int = -1) -> None:
        """Removes the `index`-th adapter (default: the last); one adapter always stays."""
        if len(self.adapters) == 1:
            raise ValueError("unload_adapter: this pipeline holds one adapter, which it needs; nothing to unload")
        if not -len(self.adapters) <= index < len(self.adapters):
            raise ValueError(f"unload_adapter: index {index} out of range for {len(self.adapters)} adapters")
        kept = list(self.adapters)
        del kept[index]
        self._set_adapters(tuple(kept))

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        adapter: str | os.PathLike | Sequence[str | os.PathLike],
        image_encoder: str | os.PathLike,
        *,
        scheduler: str = "ddim",
        dtype: Any = jnp.float32,
        cache_dir: str | os.PathLike | None = None,
        controlnet: str | os.PathLike | None = None,
        devices: Sequence[jax.Device] | None = None,
        progress: bool = True,
        attention_implementation: str = "diffusers",
        pytorch_numerics: bool = True,
        loras: Sequence[tuple[str | os.PathLike, float]] = (),
    ) -> IPAdapterPipeline:
        """The pipeline from files, as the users' PyTorch side has them (`ipadapter_jax.weights`' loaders).

        Args:
          base: a diffusers pipeline folder (SD1.5/SD2 family or SDXL), or "tiny".
          adapter: an official IP-Adapter file (`.safetensors`/`.bin`; base, Plus or Full detected from its keys)
            or our Flax adapter file (`.msgpack`); or a list of them (several adapters at once).
          image_encoder: a `CLIPVisionModelWithProjection` folder, or "tiny". Image prompts are preprocessed as
            `base`'s `feature_extractor/` says, else as the encoder folder's `preprocessor_config.json`, else with
            `CLIPImageProcessor`'s defaults at the encoder's size (`ipadapter_jax.weights.load_image_encoder`).
          scheduler: "ddim" (the paper's), "dpm-solver++" or "euler".
          dtype: computation dtype (params stay float32).
          cache_dir: keep the converted Flax params here (later loads skip the conversion).
          controlnet: a diffusers `ControlNetModel` folder (SD1.5/SD2 family).
          progress: a progress bar over the base model's components.
          attention_implementation, pytorch_numerics, loras: as `load_base` (the UNet's kernel, see
            `models.unet.Attention`; PyTorch's numerics; LoRA files `(path, scale)` merged into UNet and text encoders).
        Raises:
          ValueError (ConversionError): a missing or malformed file, or models that do not fit each other; OSError.
        """
        from ipadapter_jax.weights import load_adapter, load_base, load_image_encoder
        from ipadapter_jax.weights.diffusers_models import load_controlnet
        from ipadapter_jax.weights.load import feature_extractor_config

        base_model = load_base(
            base,
            scheduler=scheduler,
            dtype=dtype,
            cache_dir=cache_dir,
            progress=progress,
            attention_implementation=attention_implementation,
            pytorch_numerics=pytorch_numerics,
            loras=loras,
        )
        encoder = load_image_encoder(image_encoder, dtype=dtype, preprocessor_config=feature_extractor_config(base))
        files = [adapter] if isinstance(adapter, (str, os.PathLike)) else list(adapter)
        adapters = [load_adapter(file, base_model, image_encoder=encoder, dtype=dtype) for file in files]
        extra = {}
        if controlnet is not None:
            cache = None if cache_dir is None else os.path.join(cache_dir, "controlnet")
            model = load_controlnet(controlnet, dtype=jnp.dtype(dtype), cache_dir=cache)
            extra = dict(controlnet=model.module, controlnet_params=model.params)
        return cls(base_model, encoder, adapters, devices=devices, **extra)

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def with_scheduler(self, scheduler: Any, scheduler_state: Any) -> IPAdapterPipeline:
        """The same models and devices with another scheduler and its `create_state()`, e.g.
        `ipadapter_jax.weights.diffusers_models.load_scheduler(folder, "euler")`'s (any object with the interface of
        `ipadapter_jax.models.schedulers`). Its sampling function compiles on first use."""
        return IPAdapterPipeline(
            self.base.replace(scheduler=scheduler, scheduler_state=scheduler_state),
            self.image_encoder,
            self.adapters,
            controlnet=self.controlnet,
            controlnet_params=self.controlnet_params,
            devices=list(self.mesh.devices.flat),
        )

    def encode_image(self, images: ImageInput | Sequence[ImageInput], adapter_index: int = 0) -> np.ndarray:
        """Images -> CLIP features for adapter `adapter_index`, (K, *feature_shape), to pass as `image_embeds`."""
        return np.asarray(self.image_prompt_encoders[adapter_index].features(images))

    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput] | None = None,
        *,
        prompt: str | Sequence[str] = "",
        negative_prompt: str | Sequence[str] | None = None,
        image_embeds: np.ndarray | None = None,
        negative_image: ImageInput | Sequence[ImageInput] | None = None,
        negative_image_embeds: np.ndarray | None = None,
        per_prompt_images: bool = False,
        scale: ScaleSpec | Sequence[ScaleSpec] = 1.0,
        mask: ImageInput | Sequence[Any] | None = None,
        embeds_scaling: str | Sequence[str] = "v_only",
        combine: str | Sequence[str] = "concat",
        image_step_range: tuple[float, float] = (0.0, 1.0),
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        seed: int | Sequence[int] = 0,
        num_images_per_prompt: int = 1,
        latents: np.ndarray | None = None,
        control_image: ImageInput | None = None,
        controlnet_conditioning_scale: float = 1.0,
        progress: bool = False,
        step_progress: bool = False,
    ) -> GenerationOutput:
        """Generates `len(prompts) * num_images_per_prompt` images.

        Args:
          image: the image prompt: one image or several (their tokens concatenated), PIL or uint8 arrays of any
            size and mode (preprocessed as `ImageEncoder.image_preprocessing` says). None with `image_embeds`
            None: plain text-to-image.
          prompt, negative_prompt: a string or one per prompt. Image-only generation: the default "" prompt.
          image_embeds: instead of `image`, CLIP features (K, *feature_shape) from `encode_image`.
          negative_image / negative_image_embeds: replace the default unconditional image features; one image
            (used for every prompt image) or K; shared by all prompts.
          per_prompt_images: `image` is a sequence with one image prompt per text prompt (each one image or K
            images; K the same for all), `image_embeds` is (P, K, *feature_shape); prompt p's images see only
            image prompt p. One call then generates for many image prompts at once.
          scale: IP-Adapter scale: a number, a per-block dict or a `ScalePreset` (`ipadapter_jax.models.scales`).
          mask: regional IP-Adapter: a mask image per image prompt image (white: where it acts; any size, resized
            as diffusers' `IPAdapterMaskProcessor`); each masked image attends on its own. Shared by the batch.
          embeds_scaling: how the scale enters the attention (`models.ip_attention`); "v_only" is diffusers'.
          combine: K images -> the adapter's input (`image_combine`): concat, add, subtract, average, norm-average.
          Several adapters: `image`, `image_embeds`, `negative_image(_embeds)` and `mask` are lists with one entry
            per adapter; `scale`, `embeds_scaling` and `combine` one value for all or a list (as diffusers).
          image_step_range: (start, end) fractions of the steps; step i uses the image branch iff
            start <= i / num_inference_steps < end.
          guidance_scale: classifier-free guidance is on iff > 1.
          height, width: pixels, multiples of `size_multiple` (default: the UNet's sample size x the VAE's factor).
          seed: initial noise `jax.random.normal(PRNGKey(seed), (B, C, h, w))`; a sequence of P seeds: prompt
            p's images get `normal(PRNGKey(seed[p]), (num_images_per_prompt, C, h, w))` (the noise a one-prompt
            call with that seed gets). Unused when `latents` (B, C, h, w), NCHW, unscaled, is given.
          control_image: ControlNet conditioning image (needs a ControlNet), resized to (width, height).
          progress: tqdm bars for the compile and sampling phases.
          step_progress: advance the sampling bar at every step (a host callback in the loop: that executable
            is not written to JAX's persistent compilation cache, see `sampling`).
        Raises:
          ValueError: bad sizes, counts, ranges, non-finite scales, or a scale dict naming a block this UNet lacks.
        """
        start_time = time.perf_counter()
        default_size = self.base.unet.config.sample_size * self.vae_scale_factor
        request = GenerationRequest.of(
            prompt,
            negative_prompt,
            **adapter_fields(
                len(self.adapters),
                dict(
                    image=image,
                    image_embeds=image_embeds,
                    negative_image=negative_image,
                    negative_image_embeds=negative_image_embeds,
                    mask=mask,
                ),
                per_prompt_images,
                scale,
                embeds_scaling,
                combine,
            ),
            image_step_range=image_step_range,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            height=default_size if height is None else height,
            width=default_size if width is None else width,
            seed=seed,
            num_images_per_prompt=num_images_per_prompt,
            latents=latents,
            control_image=control_image,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
        )
        request.check(self.size_multiple, self.vae_scale_factor, self.has_controlnet)
        inputs = self._conditioning(request)
        inputs = jax.device_put(inputs, inputs.shardings(self.mesh))
        scheduler_state = jax.device_put(
            self.base.scheduler.set_timesteps(self.base.scheduler_state, num_inference_steps, inputs.latents.shape),
            replicated(self.mesh),
        )
        prepare_s = time.perf_counter() - start_time

        step_progress = progress and step_progress
        with tqdm(total=1, desc="compiling", disable=not progress) as bar:
            compile_s = self.sampler.compile(self.params, scheduler_state, inputs, report_steps=step_progress)
            bar.set_postfix_str(f"{compile_s:.1f} s" if compile_s else "already compiled")
            bar.update()
        start_time = time.perf_counter()
        with tqdm(total=num_inference_steps, desc="sampling", unit="step", disable=not progress) as bar:

            def advance(steps_done: int) -> None:
                if steps_done > bar.n:
                    bar.update(steps_done - bar.n)

            images = self.sampler(self.params, scheduler_state, inputs, progress=advance if step_progress else None)
            pixels = np.asarray(images)[: request.batch]
            bar.update(num_inference_steps - bar.n)
        sample_s = time.perf_counter() - start_time

        settings = dict(
            request.settings(),
            scheduler=type(self.base.scheduler).__name__,
            adapter_kind=self.adapter.kind if len(self.adapters) == 1 else [a.kind for a in self.adapters],
            devices=self.num_devices,
        )
        if not self.has_controlnet:
            settings["controlnet_conditioning_scale"] = None
        timings = {"prepare_s": prepare_s, "compile_s": compile_s, "sample_s": sample_s}
        return GenerationOutput(images=to_pil(pixels), pixels=pixels, settings=settings, timings=timings)

    def _conditioning(self, request: GenerationRequest) -> SamplingInputs:
        """The request as the sampler's arrays: rows prompt-major (each prompt repeated num_images_per_prompt
        times), padded to a multiple of the device count by repeating the last row (dropped from the output)."""
        num_prompts = len(request.prompts)
        text, added = text_conditioning(self.prompt_encoder, request, self.base)
        image_tokens, ip_masks, ip_scale = image_conditioning(self.image_prompt_encoders, request, self.params["unet"])
        latent_shape = (
            request.batch,
            self.base.unet.config.in_channels,
            request.height // self.vae_scale_factor,
            request.width // self.vae_scale_factor,
        )
        latents = request.latents
        if latents is None:
            latents = initial_noise(request.seed, num_prompts, latent_shape)
        elif tuple(np.shape(latents)) != latent_shape:
            raise ValueError(f"latents must have shape {latent_shape}, got {tuple(np.shape(latents))}")
        padded = padded_size(request.batch, self.num_devices)

        def per_prompt(x: np.ndarray) -> np.ndarray:  # (prompts, ...) -> (padded, ...)
            return pad_rows(np.repeat(x, request.num_images_per_prompt, axis=0), padded)

        control = request.control_image
        return SamplingInputs(
            latents=pad_rows(np.asarray(latents, np.float32), padded),
            text=per_prompt(text),
            added=None if added is None else {k: per_prompt(v) for k, v in added.items()},
            image_tokens=None if image_tokens is None else tuple(per_prompt(tokens) for tokens in image_tokens),
            ip_masks=ip_masks,
            ip_scale=ip_scale,
            image_steps=np.array(request.image_step_range, np.float32),
            guidance_scale=np.float32(request.guidance_scale),
            control_image=None if control is None else control_pixels(control, request.height, request.width),
            control_scale=np.float32(request.controlnet_conditioning_scale),
        )
