"""The whole denoising loop and the VAE decode as one compiled function, batch-sharded over local devices.

Everything a user changes between requests is an array argument: the text and image conditioning, the per-layer
IP scales, the guidance scale, the image branch's step range, the ControlNet scale and the initial noise. So a
`Sampler` compiles once per *structure* (batch size, resolution, number of steps, token counts, with/without
guidance, image prompt or ControlNet) and never for a new value.

Classifier-free guidance pairs. The conditioning carries a guidance axis G after the batch axis: G = 2 holds
(negative, positive), G = 1 the positive only (guidance off, as diffusers does for guidance_scale <= 1). Each
step runs the UNet on the B*G rows `b0g0, b0g1, b1g0, ...`: the rows of one example stay next to each other, so
the batch's sharding over devices never needs to move data (a diffusers-style `concat([uncond, cond])` would
interleave devices' rows).

Sharding: a mesh over the local devices (`ipadapter_jax.sharding.local_mesh`); batch-leading inputs (noise, text and
image tokens) are split along it, everything else (params, scheduler state, scales) is replicated. The batch must be
a multiple of the device count (`IPAdapterPipeline` pads it).

Compilation is ahead of time (`jit(...).lower(...).compile()`), with our own cache keyed by the arguments'
structure, shapes, dtypes and shardings, so that the compile phase can be timed and reported separately.
Per-step progress is a host callback inside the loop, compiled in only when asked for: JAX never writes an
executable with host callbacks to its persistent compilation cache, so the default (no callback) is the one a
new process can load from that cache instead of compiling.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ipadapter_jax.models.unet import IP_SCALE_COLLECTION
from ipadapter_jax.sharding import batch_sharding, replicated


@flax.struct.dataclass
class SamplingInputs:
    """The arrays of one request. B: batch (a multiple of the device count); G: guidance pairs (1 or 2).

    latents: (B, C, h, w) initial noise, unscaled (multiplied by the scheduler's `init_noise_sigma` here).
    text: (B, G, T, D) text tokens; along G: (negative, positive) or (positive,).
    added: SDXL's {"text_embeds": (B, G, P), "time_ids": (B, G, 6)}, else None.
    image_tokens: per adapter (B, G, N_a, D) image tokens, along G as `text`; or None (no image prompt: the plain
      UNet).
    ip_masks: per adapter None or (K_a, H, W) masks of its K_a images, shared by the batch; None: no masks.
    ip_scale: the "ip_scale" variable collection (`ip_variables.ip_variables`), or None without image tokens.
    image_steps: (2,) float32 [start, end): step i uses the image branch iff start <= i / num_steps < end.
    guidance_scale: () float32; unused when G == 1.
    control_image: (3, H, W) ControlNet conditioning in [0, 1], shared by the batch, or None.
    control_scale: () float32 ControlNet residual scale.
    """

    latents: jax.Array
    text: jax.Array
    added: dict | None
    image_tokens: tuple[jax.Array, ...] | None
    ip_masks: tuple[jax.Array | None, ...] | None
    ip_scale: dict | None
    image_steps: jax.Array
    guidance_scale: jax.Array
    control_image: jax.Array | None
    control_scale: jax.Array

    def shardings(self, mesh: Mesh) -> SamplingInputs:
        """The placement of each field: batch-leading fields split over `mesh`, the rest replicated."""
        split, whole = batch_sharding(mesh), replicated(mesh)
        placement = jax.tree.map(lambda _: whole, self)
        return placement.replace(
            latents=split,
            text=split,
            added=None if self.added is None else jax.tree.map(lambda _: split, self.added),
            image_tokens=None if self.image_tokens is None else tuple(split for _ in self.image_tokens),
        )


class Sampler:
    """Denoising loop + VAE decode for one set of models.

    `params` passed to `__call__`: {"unet": IP-UNet params (adapter merged), "vae": ..., ["controlnet": ...]}.
    """

    def __init__(self, unet: Any, vae: Any, scheduler: Any, mesh: Mesh, controlnet: Any = None):
        self.unet, self.vae, self.scheduler, self.controlnet, self.mesh = unet, vae, scheduler, controlnet, mesh
        self._jitted = {
            report: jax.jit(functools.partial(self._sample, report_steps=report)) for report in (False, True)
        }
        self._executables: dict[Any, Any] = {}
        self._progress: Callable[[int], None] | None = None

    def compile(self, params: Any, scheduler_state: Any, inputs: SamplingInputs, report_steps: bool = False) -> float:
        """Compiles for the structure of these arguments (and `report_steps`) unless already done.

        Returns the seconds it took (0.0 when already compiled in this process).
        """
        key = (report_steps,) + _signature((params, scheduler_state, inputs))
        if key in self._executables:
            return 0.0
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):  # kernels that run per device shard (splash attention) find it there
            self._executables[key] = self._jitted[report_steps].lower(params, scheduler_state, inputs).compile()
        return time.perf_counter() - start

    def __call__(
        self,
        params: Any,
        scheduler_state: Any,
        inputs: SamplingInputs,
        progress: Callable[[int], None] | None = None,
    ) -> jax.Array:
        """-> (B, H, W, 3) float32 images in [0, 1], batch-sharded; returns when they are computed.

        `scheduler_state` must come from `scheduler.set_timesteps(state, num_steps, latents.shape)`. `progress`,
        if given, is called from the device with the number of finished steps (possibly more than once per step);
        it selects the executable with the step callback (see the module docstring).
        """
        report_steps = progress is not None
        self.compile(params, scheduler_state, inputs, report_steps)
        executable = self._executables[(report_steps,) + _signature((params, scheduler_state, inputs))]
        self._progress = progress
        try:
            # The step callbacks run while the computation does: wait for it before unhooking `progress`.
            return jax.block_until_ready(executable(params, scheduler_state, inputs))
        finally:
            self._progress = None

    @property
    def num_compiled(self) -> int:
        """How many distinct structures have been compiled."""
        return len(self._executables)

    def _report_step(self, steps_done: jax.Array) -> None:
        if self._progress is not None:
            self._progress(int(steps_done))

    def _sample(self, params: Any, state: Any, inputs: SamplingInputs, report_steps: bool) -> jax.Array:
        split = batch_sharding(self.mesh)
        batch, guidance = inputs.text.shape[:2]
        num_steps = state.timesteps.shape[0]

        def rows(x: jax.Array) -> jax.Array:  # (B, G, ...) -> (B*G, ...)
            return x.reshape((batch * guidance,) + x.shape[2:])

        text = rows(inputs.text)
        added = None if inputs.added is None else {k: rows(v) for k, v in inputs.added.items()}
        image_tokens = swapped = control_image = None
        if inputs.image_tokens is not None:
            image_tokens = tuple(rows(tokens) for tokens in inputs.image_tokens)
            swapped = tuple(rows(swapped_tokens(tokens)) for tokens in inputs.image_tokens)
        if inputs.control_image is not None:  # (3, H, W) -> (B*G, 3, H, W)
            control_image = jnp.broadcast_to(inputs.control_image, (batch * guidance,) + inputs.control_image.shape)

        def predict_noise(step: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
            x = jnp.repeat(x, guidance, axis=0)
            timesteps = jnp.broadcast_to(t, (x.shape[0],))
            residuals = {}
            if control_image is not None:
                # ControlNet sees the text tokens only; the image prompt acts through the UNet alone.
                down, mid = self.controlnet.apply(
                    {"params": params["controlnet"]},
                    x,
                    timesteps,
                    text,
                    control_image,
                    conditioning_scale=inputs.control_scale,
                    return_dict=False,
                )
                residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            variables = {"params": params["unet"]}
            if image_tokens is not None:
                start, end = inputs.image_steps[0], inputs.image_steps[1]
                fraction = step / num_steps
                on = ((fraction >= start) & (fraction < end)).astype(jnp.float32)
                variables[IP_SCALE_COLLECTION] = jax.tree.map(lambda s: s * on, inputs.ip_scale)
            eps = self.unet.apply(
                variables,
                x,
                timesteps,
                text,
                added_cond_kwargs=added,
                image_tokens=image_tokens,
                ip_masks=inputs.ip_masks,
                swapped_image_tokens=swapped,
                **residuals,
            ).sample
            eps = eps.reshape((batch, guidance) + eps.shape[1:]).astype(jnp.float32)
            if guidance == 1:
                return eps[:, 0]
            return eps[:, 0] + inputs.guidance_scale * (eps[:, 1] - eps[:, 0])

        def body(step: jax.Array, carry: tuple) -> tuple:
            latents, state = carry
            t = state.timesteps[step]
            x = self.scheduler.scale_model_input(state, latents, t)
            eps = predict_noise(step, x, t)
            out = self.scheduler.step(state, eps, t, latents)
            if report_steps:
                jax.debug.callback(self._report_step, step + 1)
            return jax.lax.with_sharding_constraint(out.prev_sample, split), out.state

        latents = jax.lax.with_sharding_constraint(inputs.latents * state.init_noise_sigma, split)
        latents, _ = jax.lax.fori_loop(0, num_steps, body, (latents, state))
        return self._decode(params["vae"], latents)

    def _decode(self, vae_params: Any, latents: jax.Array) -> jax.Array:
        # NHWC latents: the Flax VAE guesses the layout from the last axis, which fails for 4-pixel-wide latents.
        latents = jnp.transpose(latents / self.vae.config.scaling_factor, (0, 2, 3, 1))
        images = self.vae.apply({"params": vae_params}, latents, method=self.vae.decode).sample  # (B, 3, H, W)
        images = jnp.transpose(images.astype(jnp.float32), (0, 2, 3, 1))
        return jax.lax.with_sharding_constraint(jnp.clip(images / 2 + 0.5, 0.0, 1.0), batch_sharding(self.mesh))


def _signature(args: Any) -> tuple:
    """What a compiled executable is specific to: the pytree structure, each leaf's abstract value (shape, dtype,
    weak type) and sharding."""
    leaves, treedef = jax.tree.flatten(args)
    return (treedef,) + tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves)


def initial_noise(seed: int | tuple[int, ...], num_prompts: int, shape: tuple[int, ...]) -> jax.Array:
    """(B, C, h, w) standard normal noise from one seed, or from one seed per prompt (B / num_prompts rows each)."""
    if isinstance(seed, int):
        return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)
    per_prompt = (shape[0] // num_prompts,) + tuple(shape[1:])
    return jnp.concatenate([jax.random.normal(jax.random.PRNGKey(s), per_prompt, jnp.float32) for s in seed])


def swapped_tokens(tokens: jax.Array) -> jax.Array:
    """(B, G, N, D) -> what a "swap" layer (`models.ip_attention.select_tokens`, ComfyUI's precise weight types) uses:
    the positive tokens on the negative rows and zeros on the positive rows; zeros without guidance (G = 1)."""
    zeros = jnp.zeros_like(tokens[:, -1:])
    return jnp.concatenate([tokens[:, 1:], zeros], axis=1) if tokens.shape[1] == 2 else zeros
