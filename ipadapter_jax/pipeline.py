"""IP-Adapter text-to-image pipelines (SD1.5/SD2 family and SDXL, optional ControlNet) on JAX.

    pipe = IPAdapterPipeline(base, image_encoder, image_encoder_params, image_proj, adapter)
    out = pipe(image, prompt="best quality", scale=0.6, num_inference_steps=50, seed=0)
    out.images  # PIL images; out.pixels (B, H, W, 3) float32 in [0, 1]; out.settings (JSON-able)

What a request does, and the diffusers PyTorch pipeline it matches (`StableDiffusionPipeline`,
`StableDiffusionXLPipeline`, `StableDiffusionControlNetPipeline` with an IP-Adapter loaded):

1. Text (`text_conditioning`): prompts, and with guidance the negative prompts ("" by default; SDXL with
   `force_zeros_for_empty_prompt` and no negative prompt: zeros), each repeated `num_images_per_prompt` times.
   SDXL also gets `time_ids` = (height, width, 0, 0, height, width).
2. Image prompt (`image_prompt`): images (or precomputed CLIP features) -> tokens; several images concatenate
   their tokens; the negative tokens come from the reference's zero embedding or a negative image. One image
   prompt is shared by the whole batch, or (`per_prompt_images=True`) each text prompt has its own, so that
   many image prompts run in one batched call (evaluation does this).
3. Sampling (`sampling`): one compiled function runs every denoising step (scheduler: whatever `base` holds;
   DDIM, DPM-Solver++ and Euler are tested) and the VAE decode, batch-sharded over the local devices.

Classifier-free guidance is on iff `guidance_scale > 1` (as in diffusers); that and the shapes are the only
things that select a compiled function: scale, guidance scale, prompts, seed and the image step range are data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image
from tqdm.auto import tqdm

from ipadapter_jax.adapter import ip_layer_paths, merge_unet_params
from ipadapter_jax.image_encoder import CLIPImageEncoder
from ipadapter_jax.image_prompt import ImageInput, ImagePromptEncoder, as_image_list, projection_token_dim
from ipadapter_jax.sampling import Sampler, SamplingInputs, local_mesh, replicated
from ipadapter_jax.scales import ScaleSpec, ip_scale_tree
from ipadapter_jax.text_conditioning import PromptEncoder, TextEncoder
from ipadapter_jax.unet import check_attention_implementation

# Scheduler names of the loaders and CLIs -> `conversion.diffusers_models.load_scheduler` kinds.
SCHEDULERS = {"ddim": "ddim", "dpm-solver++": "dpm_solver_multistep", "euler": "euler"}


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """The frozen parts of a Stable Diffusion model, as Flax modules and params.

    unet: `IPUNet2DConditionModel`; unet_params: its frozen params (without `to_k_ip`/`to_v_ip`).
    vae: diffusers `FlaxAutoencoderKL`. text_encoders: one (SD1.5/SD2) or two (SDXL).
    scheduler: a diffusers Flax scheduler; scheduler_state: `scheduler.create_state()`.
    force_zeros_for_empty_prompt: SDXL's rule (its `model_index.json`): without a negative prompt, the
      negative text conditioning is zeros rather than the encoding of "".
    `conversion.diffusers_models.load_pipeline` output converts with `from_flax_pipeline`.
    """

    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    text_encoders: tuple[TextEncoder, ...]
    scheduler: Any
    scheduler_state: Any
    force_zeros_for_empty_prompt: bool = False

    @classmethod
    def from_flax_pipeline(cls, loaded: Any, force_zeros_for_empty_prompt: bool | None = None) -> BaseModel:
        """From `conversion.diffusers_models.FlaxPipeline`; `force_zeros_for_empty_prompt` defaults to True
        for SDXL (two text encoders), as diffusers' `StableDiffusionXLPipeline`, else False."""
        # loaded.text_encoder.module is transformers' wrapper; its .module the Flax module.
        encoders = [TextEncoder(loaded.tokenizer, loaded.text_encoder.module.module, loaded.text_encoder.params)]
        if loaded.text_encoder_2 is not None:
            encoders.append(
                TextEncoder(loaded.tokenizer_2, loaded.text_encoder_2.module.module, loaded.text_encoder_2.params)
            )
        if force_zeros_for_empty_prompt is None:
            force_zeros_for_empty_prompt = len(encoders) == 2
        return cls(
            unet=loaded.unet.module,
            unet_params=loaded.unet.params,
            vae=loaded.vae.module,
            vae_params=loaded.vae.params,
            text_encoders=tuple(encoders),
            scheduler=loaded.scheduler,
            scheduler_state=loaded.scheduler_state,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        )


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
      base: the frozen model (`BaseModel`).
      image_encoder, image_encoder_params: the CLIP image encoder (`conversion.clip.load_clip_image_encoder`).
      image_proj: the adapter's image projection module; adapter: {"image_proj": params, "ip_layers": params}
        (`conversion.ip_adapter.adapter_from_official` or the adapter file loaders).
      controlnet, controlnet_params: optional diffusers `FlaxControlNetModel` (SD1.5/SD2 family only).
      devices: devices to shard the batch over (default: all local devices).
    Raises:
      ValueError: the adapter does not fit the UNet (token width, layers or kernel shapes), or the text
        encoders / ControlNet do not fit the UNet's kind.
    """

    def __init__(
        self,
        base: BaseModel,
        image_encoder: CLIPImageEncoder,
        image_encoder_params: Any,
        image_proj: nn.Module,
        adapter: Mapping[str, Any],
        *,
        controlnet: Any = None,
        controlnet_params: Any = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        unet_config = base.unet.config
        _check_adapter_fits(base.unet_params, unet_config.cross_attention_dim, image_proj, adapter)
        self.is_sdxl = unet_config.addition_embed_type == "text_time"
        if self.is_sdxl != (len(base.text_encoders) == 2):
            raise ValueError(
                f"this UNet ({'SDXL, text_time' if self.is_sdxl else 'SD1.5/SD2'} conditioning) needs "
                f"{2 if self.is_sdxl else 1} text encoder(s), got {len(base.text_encoders)}"
            )
        if controlnet is not None and self.is_sdxl:
            raise ValueError("ControlNet is supported for SD1.5/SD2-family models only (diffusers' Flax ControlNet)")

        self.base, self.adapter = base, adapter
        self.controlnet, self.controlnet_params = controlnet, controlnet_params
        self.mesh = local_mesh(list(devices) if devices is not None else None)
        self.vae_scale_factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
        # The Flax UNet cannot crop upsampled maps to odd skip sizes (PyTorch's can): latents must halve exactly
        # at every down block.
        self.size_multiple = self.vae_scale_factor * 2 ** (len(unet_config.block_out_channels) - 1)
        self.prompt_encoder = PromptEncoder(base.text_encoders)
        self.image_prompt_encoder = ImagePromptEncoder(
            image_encoder, image_encoder_params, image_proj, adapter["image_proj"]
        )
        self.has_controlnet = controlnet is not None
        self.sampler = Sampler(base.unet, base.vae, base.scheduler, self.mesh, controlnet=controlnet)
        params = {"unet": merge_unet_params(base.unet_params, adapter["ip_layers"]), "vae": base.vae_params}
        if controlnet is not None:
            params["controlnet"] = controlnet_params
        self.params = jax.device_put(params, replicated(self.mesh))

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        adapter: str | os.PathLike,
        image_encoder: str | os.PathLike,
        *,
        scheduler: str = "ddim",
        dtype: Any = jnp.float32,
        cache_dir: str | os.PathLike | None = None,
        controlnet: str | os.PathLike | None = None,
        devices: Sequence[jax.Device] | None = None,
        progress: bool = True,
        attention_implementation: str = "diffusers",
    ) -> IPAdapterPipeline:
        """The pipeline from files, as the users' PyTorch side has them.

        Args:
          base: a diffusers pipeline folder (SD1.5/SD2 family or SDXL; `model_index.json`'s
            `force_zeros_for_empty_prompt` is honoured).
          adapter: an official IP-Adapter file (`.safetensors`/`.bin`; base, Plus or Full detected from its keys)
            or our Flax adapter file (`.msgpack`).
          image_encoder: a `CLIPVisionModelWithProjection` folder.
          scheduler: "ddim" (the paper's), "dpm-solver++" or "euler".
          dtype: computation dtype (params stay float32).
          cache_dir: keep the converted Flax params here (later loads skip the conversion).
          controlnet: a diffusers `ControlNetModel` folder (SD1.5/SD2 family).
          progress: a progress bar over the base model's components.
          attention_implementation: the UNet's attention kernel, "diffusers", "xla" or "cudnn" (NVIDIA GPUs with
            bf16: cuDNN flash attention); see `ipadapter_jax.unet.Attention`.
        Raises:
          ValueError (ConversionError): a missing or malformed file, or models that do not fit each other.
          OSError: unreadable files.
        """
        # conversion imports this package's modules: imported here, not at the top, to keep that one-way.
        from conversion.clip import load_clip_image_encoder
        from conversion.diffusers_models import load_controlnet, load_pipeline
        from conversion.flax_adapter_file import load_flax_adapter
        from conversion.ip_adapter_files import load_ip_adapter
        from conversion.unet_config import abstract_ip_unet_params

        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(sorted(SCHEDULERS))}, got {scheduler!r}")
        check_attention_implementation(attention_implementation)  # before loading gigabytes
        dtype = jnp.dtype(dtype)
        base, cache = Path(base), None if cache_dir is None else Path(cache_dir)
        loaded = load_pipeline(base, scheduler=SCHEDULERS[scheduler], dtype=dtype, cache_dir=cache, progress=progress)
        index_path = base / "model_index.json"
        try:
            index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"{index_path}: not valid JSON ({err})") from None
        base_model = BaseModel.from_flax_pipeline(loaded, index.get("force_zeros_for_empty_prompt"))
        base_model = dataclasses.replace(
            base_model, unet=base_model.unet.clone(attention_implementation=attention_implementation)
        )
        encoder, encoder_params = load_clip_image_encoder(image_encoder, dtype=dtype)
        unet_shapes = abstract_ip_unet_params(base_model.unet)
        if Path(adapter).suffix == ".msgpack":
            _, image_proj, adapter_params = load_flax_adapter(adapter, unet_shapes)
        else:
            _, image_proj, adapter_params = load_ip_adapter(
                adapter, unet_shapes,
                encoder_projection_dim=encoder.config.projection_dim, encoder_hidden_size=encoder.config.hidden_size,
            )
        extra = {}
        if controlnet is not None:
            model = load_controlnet(controlnet, dtype=dtype, cache_dir=None if cache is None else cache / "controlnet")
            extra = dict(controlnet=model.module, controlnet_params=model.params)
        return cls(base_model, encoder, encoder_params, image_proj, adapter_params, devices=devices, **extra)

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def with_scheduler(self, scheduler: Any, scheduler_state: Any) -> IPAdapterPipeline:
        """The same models and devices with another diffusers Flax scheduler and its `create_state()`, e.g.
        `FlaxDPMSolverMultistepScheduler` (DPM-Solver++) or `FlaxEulerDiscreteScheduler`. Its sampling function
        compiles on first use."""
        encoder = self.image_prompt_encoder
        return IPAdapterPipeline(
            dataclasses.replace(self.base, scheduler=scheduler, scheduler_state=scheduler_state),
            encoder.encoder,
            encoder.encoder_params,
            encoder.image_proj,
            self.adapter,
            controlnet=self.controlnet,
            controlnet_params=self.controlnet_params,
            devices=list(self.mesh.devices.flat),
        )

    def encode_image(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Images -> CLIP features for this adapter, (K, *feature_shape), to cache and pass as `image_embeds`."""
        return np.asarray(self.image_prompt_encoder.features(images))

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
        scale: ScaleSpec = 1.0,
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
            size and mode (CLIP preprocessing: RGB, shortest side 224, center crop). None with `image_embeds`
            None: plain text-to-image.
          prompt, negative_prompt: a string or one per prompt. Image-only generation: the default "" prompt.
          image_embeds: instead of `image`, CLIP features (K, *feature_shape) from `encode_image`.
          negative_image / negative_image_embeds: replace the default unconditional image features; one image
            (used for every prompt image) or K; shared by all prompts.
          per_prompt_images: `image` is a sequence with one image prompt per text prompt (each one image or K
            images; K the same for all), `image_embeds` is (P, K, *feature_shape); prompt p's images see only
            image prompt p. One call then generates for many image prompts at once.
          scale: IP-Adapter scale, a number or a per-block dict (`ipadapter_jax.scales`).
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
          ValueError: bad sizes, counts, ranges, or a scale dict naming a block this UNet lacks.
        """
        start_time = time.perf_counter()
        config = self.base.unet.config
        height = height or config.sample_size * self.vae_scale_factor
        width = width or config.sample_size * self.vae_scale_factor
        start, end = (float(v) for v in image_step_range)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self._check_request(
            height, width, start, end, prompts, num_images_per_prompt, num_inference_steps, control_image
        )
        guided = guidance_scale > 1.0
        batch = len(prompts) * num_images_per_prompt

        text, added = self._text_conditioning(prompts, negative_prompt, guided, height, width)
        image_tokens, num_prompt_images = self._image_tokens(
            image, image_embeds, negative_image, negative_image_embeds, guided, len(prompts), per_prompt_images
        )
        ip_scale = None if image_tokens is None else ip_scale_tree(self.params["unet"], scale)

        latent_shape = (batch, config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents_given = latents is not None
        if not latents_given:
            latents = _initial_noise(seed, len(prompts), latent_shape)
        elif tuple(np.shape(latents)) != latent_shape:
            raise ValueError(f"latents must have shape {latent_shape}, got {tuple(np.shape(latents))}")

        # Rows are prompt-major (each prompt repeated num_images_per_prompt times), then padded to a multiple of
        # the device count by repeating the last row (dropped from the output).
        padded = math.ceil(batch / self.num_devices) * self.num_devices

        def pad(x: Any) -> np.ndarray:  # (batch, ...) -> (padded, ...)
            x = np.asarray(x)
            return np.concatenate([x, np.repeat(x[-1:], padded - batch, axis=0)])

        def per_prompt(x: np.ndarray) -> np.ndarray:  # (prompts, ...) -> (padded, ...)
            return pad(np.repeat(x, num_images_per_prompt, axis=0))

        inputs = SamplingInputs(
            latents=pad(np.asarray(latents, np.float32)),
            text=per_prompt(text),
            added=None if added is None else {k: per_prompt(v) for k, v in added.items()},
            image_tokens=None if image_tokens is None else per_prompt(image_tokens),
            ip_scale=ip_scale,
            image_steps=np.array([start, end], np.float32),
            guidance_scale=np.float32(guidance_scale),
            control_image=None if control_image is None else _control_pixels(control_image, height, width),
            control_scale=np.float32(controlnet_conditioning_scale),
        )
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
            pixels = np.asarray(images)[:batch]
            bar.update(num_inference_steps - bar.n)
        sample_s = time.perf_counter() - start_time

        settings = {  # JSON-able: the CLI writes it next to the images
            "prompt": prompts,
            "negative_prompt": negative_prompt,
            "num_prompt_images": num_prompt_images,
            "per_prompt_images": per_prompt_images,
            "image_embeds_given": image_embeds is not None,
            "negative_image": negative_image is not None or negative_image_embeds is not None,
            "scale": scale if isinstance(scale, Mapping) else float(scale),
            "image_step_range": [start, end],
            "guidance_scale": float(guidance_scale),
            "num_inference_steps": num_inference_steps,
            "height": height,
            "width": width,
            "seed": None if latents_given else _json_seed(seed),
            "latents_given": latents_given,
            "num_images_per_prompt": num_images_per_prompt,
            "scheduler": type(self.base.scheduler).__name__,
            "adapter_variant": self.image_prompt_encoder.variant,
            "controlnet_conditioning_scale": float(controlnet_conditioning_scale) if self.has_controlnet else None,
            "devices": self.num_devices,
        }
        timings = {"prepare_s": prepare_s, "compile_s": compile_s, "sample_s": sample_s}
        return GenerationOutput(images=to_pil(pixels), pixels=pixels, settings=settings, timings=timings)

    def _check_request(
        self,
        height: int,
        width: int,
        start: float,
        end: float,
        prompts: list[str],
        num_images_per_prompt: int,
        num_inference_steps: int,
        control_image: Any,
    ) -> None:
        if height <= 0 or width <= 0 or height % self.size_multiple or width % self.size_multiple:
            raise ValueError(
                f"height and width must be positive multiples of {self.size_multiple} for this model "
                f"(VAE factor {self.vae_scale_factor} x UNet down-sampling "
                f"{self.size_multiple // self.vae_scale_factor}); got {height}x{width}"
            )
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"image_step_range must satisfy 0 <= start <= end <= 1; got ({start}, {end})")
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if num_images_per_prompt < 1 or num_inference_steps < 1:
            raise ValueError("num_images_per_prompt and num_inference_steps must be >= 1")
        if control_image is not None and not self.has_controlnet:
            raise ValueError("control_image given but this pipeline has no ControlNet")
        if self.has_controlnet and control_image is None:
            raise ValueError("this pipeline has a ControlNet: pass control_image")

    def _text_conditioning(
        self, prompts: list[str], negative_prompt: str | Sequence[str] | None, guided: bool, height: int, width: int
    ) -> tuple[np.ndarray, dict | None]:
        """-> text (P, G, T, D) and, for SDXL, {"text_embeds": (P, G, pooled), "time_ids": (P, G, 6)}."""
        rows = list(prompts)
        if guided:
            negatives = list(negative_prompt) if _is_list(negative_prompt) else [negative_prompt or ""] * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
            rows = negatives + rows
        encoded = self.prompt_encoder(rows)
        groups = 2 if guided else 1

        def paired(x: jax.Array) -> np.ndarray:  # (G*P, ...) -> (P, G, ...)
            x = np.asarray(x).reshape((groups, len(prompts)) + x.shape[1:]).swapaxes(0, 1).copy()
            if guided and negative_prompt is None and self.base.force_zeros_for_empty_prompt:
                x[:, 0] = 0.0
            return x

        text = paired(encoded.context)
        if not self.is_sdxl:
            return text, None
        time_ids = np.tile(np.array([height, width, 0, 0, height, width], np.float32), (len(prompts), groups, 1))
        return text, {"text_embeds": paired(encoded.pooled), "time_ids": time_ids}

    def _image_tokens(
        self,
        image: Any,
        image_embeds: np.ndarray | None,
        negative_image: Any,
        negative_image_embeds: np.ndarray | None,
        guided: bool,
        num_prompts: int,
        per_prompt: bool,
    ) -> tuple[np.ndarray | None, int]:
        """-> image tokens (P, G, K * num_tokens, cross) or None, and K (the number of images per image prompt)."""
        encoder = self.image_prompt_encoder
        if image is not None and image_embeds is not None:
            raise ValueError("pass either image or image_embeds, not both")
        if image is None and image_embeds is None:
            if negative_image is not None or negative_image_embeds is not None:
                raise ValueError("a negative image needs an image prompt")
            return None, 0
        if not per_prompt:  # one image prompt for every text prompt: (1, K, *feature_shape)
            features = encoder.features(image) if image is not None else jnp.asarray(image_embeds, jnp.float32)
            features = features[None]
        elif image is not None:
            groups = [as_image_list(entry) for entry in as_image_list(image)]
            counts = sorted({len(group) for group in groups})
            if len(groups) != num_prompts or len(counts) != 1:
                raise ValueError(
                    f"per_prompt_images: need one image prompt per text prompt ({num_prompts}) with the same number "
                    f"of images each; got {len(groups)} image prompts of {counts} image(s)"
                )
            flat = encoder.features([picture for group in groups for picture in group])
            features = flat.reshape((num_prompts, counts[0]) + flat.shape[1:])
        else:
            features = jnp.asarray(image_embeds, jnp.float32)
            if features.ndim < 3 or features.shape[0] != num_prompts:
                raise ValueError(
                    f"per_prompt_images: image_embeds must be (prompts={num_prompts}, images, *feature_shape), got "
                    f"{tuple(features.shape)}"
                )
        count = features.shape[1]
        if guided:
            if negative_image is not None and negative_image_embeds is not None:
                raise ValueError("pass either negative_image or negative_image_embeds, not both")
            if negative_image is not None:
                negative = encoder.features(as_image_list(negative_image))
            elif negative_image_embeds is not None:
                negative = jnp.asarray(negative_image_embeds, jnp.float32)
            else:
                negative = encoder.negative_features(count)
            if negative.shape[1:] != features.shape[2:] or negative.shape[0] not in (1, count):
                raise ValueError(
                    f"negative image features {tuple(negative.shape)} do not fit the prompt images' "
                    f"{tuple(features.shape[1:])}: need 1 or {count} of shape {tuple(features.shape[2:])}"
                )
            features = jnp.stack([jnp.broadcast_to(negative, features.shape), features], axis=1)  # (P', 2, K, ...)
        else:
            features = features[:, None]  # (P', 1, K, ...)
        tokens = encoder.tokens(features.reshape((-1,) + features.shape[2:]))  # (P' * G, K * n, cross)
        tokens = np.asarray(tokens).reshape(features.shape[:2] + tokens.shape[1:])
        return np.broadcast_to(tokens, (num_prompts,) + tokens.shape[1:]), count


def to_pil(pixels: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> B RGB PIL images (rounded to uint8, as diffusers does)."""
    return [Image.fromarray(image) for image in (np.asarray(pixels) * 255).round().astype(np.uint8)]


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tiles equally sized images row-major into one image, `cols` per row (default: ~square)."""
    if not images:
        raise ValueError("no images to tile")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    return grid


def _control_pixels(image: ImageInput, height: int, width: int) -> np.ndarray:
    """ControlNet conditioning as diffusers' control image processor makes it: PIL resize to (width, height)
    (Lanczos), RGB, [0, 1] (not normalised). -> (3, H, W) float32."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.resize((width, height), resample=Image.Resampling.LANCZOS).convert("RGB")
    return np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0


def _initial_noise(seed: int | Sequence[int], num_prompts: int, shape: tuple[int, ...]) -> jax.Array:
    """(B, C, h, w) standard normal noise from one seed, or from one seed per prompt (B / num_prompts rows each)."""
    if isinstance(seed, (int, np.integer)):
        return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)
    seeds = list(seed)
    if len(seeds) != num_prompts:
        raise ValueError(f"seed: one per prompt ({num_prompts}) or a single int; got {len(seeds)}")
    per_prompt = (shape[0] // num_prompts,) + tuple(shape[1:])
    return jnp.concatenate([jax.random.normal(jax.random.PRNGKey(int(s)), per_prompt, jnp.float32) for s in seeds])


def _json_seed(seed: int | Sequence[int]) -> int | list[int]:
    return int(seed) if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _check_adapter_fits(unet_params: Any, cross_attention_dim: int, image_proj: nn.Module, adapter: Mapping) -> None:
    """One clear error when the adapter was made for another base model."""
    token_dim = projection_token_dim(image_proj)
    if token_dim != cross_attention_dim:
        raise ValueError(
            f"the adapter's image projection makes {token_dim}-d tokens but this UNet's cross-attention takes "
            f"{cross_attention_dim}-d (an adapter for a different base model?)"
        )
    flat_unet = traverse_util.flatten_dict(unet_params)
    expected = {path[:-2] for path in flat_unet if path[-3:] == ("attn2", "to_k", "kernel")}
    found = set(ip_layer_paths(adapter["ip_layers"]))
    if found != expected:
        missing = sorted("/".join(p) for p in expected - found)[:2]
        unexpected = sorted("/".join(p) for p in found - expected)[:2]
        raise ValueError(
            f"the adapter has {len(found)} cross-attention layers, this UNet {len(expected)}; e.g. missing "
            f"{missing}, unexpected {unexpected} (an adapter for a different base model?)"
        )
    flat_ip = traverse_util.flatten_dict(adapter["ip_layers"])
    for path in sorted(expected):
        for ip_name, base_name in (("to_k_ip", "to_k"), ("to_v_ip", "to_v")):
            have, want = flat_ip[path + (ip_name, "kernel")].shape, flat_unet[path + (base_name, "kernel")].shape
            if tuple(have) != tuple(want):
                raise ValueError(
                    f"adapter kernel {'/'.join(path + (ip_name,))} is {tuple(have)} but this UNet's {base_name} is "
                    f"{tuple(want)} (an adapter for a different base model?)"
                )
