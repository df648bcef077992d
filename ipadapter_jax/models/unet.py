"""diffusers' Flax UNet with IP-Adapter's cross-attention in every cross-attention layer.

Every attn2 layer of the decoupled design (the default) gains two bias-free projections, `to_k_ip` and `to_v_ip`,
and computes `to_out(Attn(Q, K_text, V_text) + ip_scale * Attn(Q, to_k_ip(c_i), to_v_ip(c_i)))` with the query Q
shared by both branches (Ye et al., 2023, eq. 5). Other designs (`adapter_design`, `ipadapter_jax.models.designs`)
decide what attn2 does with the image tokens and which per-layer params it has.

How the classes are built. diffusers 0.39 (the last release with Flax) constructs attn2 four containers deep:
UNet -> cross-attention down/mid/up block -> `FlaxTransformer2DModel` -> `FlaxBasicTransformerBlock` -> attn2.
Flax forbids re-creating a submodule that a parent `setup` already attached, so each of our containers subclasses
its diffusers twin and, as the diffusers `setup` attaches a child (`self.attn2 = FlaxAttention(...)`), swaps that
not-yet-registered child for our subclass built from the very same dataclass fields (`_SwapChildren`). Not a line
of diffusers' `setup` or `__call__` is restated and diffusers' modules are not patched.

How image tokens and scales reach attn2.
- `IPUNet2DConditionModel.__call__(..., image_tokens=...)` packs text and image tokens into an `IPContext` that
  the blocks pass through untouched; only our attn2 unpacks it. Without `image_tokens` the UNet is the plain
  diffusers UNet (text-to-image).
- The scale is read by each attn2 from the variable collection "ip_scale" (see `ipadapter_jax.models.scales`),
  so changing it, globally or per layer, changes only array values and never recompiles. A layer whose
  scale is absent uses 1.0 (training).

Several adapters at once (diffusers' `load_ip_adapter([...])`): with `num_ip_adapters` = A, every attn2 has A
image branches, adapter 0's kernels `to_k_ip`/`to_v_ip` (the single-adapter tree) and adapter a's
`to_k_ip_a`/`to_v_ip_a`; their outputs are summed. `image_tokens` is then a tuple with one (B, N_a, D) array per
adapter (token counts may differ), and `ip_masks` optionally one (K_a, H, W) mask stack per adapter (regional
IP-Adapter). The branch math, the embedding scaling modes and the masks: `ipadapter_jax.models.ip_attention`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ipadapter_jax import quiet
from ipadapter_jax.choices import ATTENTION_IMPLEMENTATIONS
from ipadapter_jax.models import ip_attention
from ipadapter_jax.models.designs import get_design
from ipadapter_jax.models.splash_attention import splash_attention_in_mesh_context

quiet.install()

from diffusers.configuration_utils import flax_register_to_config  # noqa: E402
from diffusers.models.attention_flax import (  # noqa: E402  (after the log filter)
    FlaxAttention,
    FlaxBasicTransformerBlock,
    FlaxFeedForward,
    FlaxGEGLU,
    FlaxTransformer2DModel,
)
from diffusers.models.unets.unet_2d_blocks_flax import (  # noqa: E402
    FlaxCrossAttnDownBlock2D,
    FlaxCrossAttnUpBlock2D,
    FlaxUNetMidBlock2DCrossAttn,
)
from diffusers.models.unets.unet_2d_condition_flax import FlaxUNet2DConditionModel  # noqa: E402

IP_SCALE_COLLECTION = "ip_scale"


@flax.struct.dataclass
class IPContext:
    """What the cross-attention layers attend to: text tokens (B, T, D) and, per adapter, image tokens (B, N_a, D),
    optional masks (K_a, H, W) (None: no mask) and the tokens a "swap" layer uses instead (`ip_attention`)."""

    text: jax.Array
    image_tokens: tuple[jax.Array, ...]
    masks: tuple[jax.Array | None, ...]
    swapped: tuple[jax.Array, ...] | None = None


def check_attention_implementation(name: str) -> None:
    """ValueError unless `name` is one of `ATTENTION_IMPLEMENTATIONS`."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {name!r}")


class Attention(FlaxAttention):
    """diffusers' `FlaxAttention` with a choice of attention kernel; same params, same math.

    `attention_implementation`:
      "diffusers"  diffusers' own `__call__` (einsum attention, or its chunked variant with
                   `use_memory_efficient_attention`);
      "xla"        `jax.nn.dot_product_attention(implementation="xla")`;
      "cudnn"      self-attention through cuDNN's fused flash attention (`jax.nn.dot_product_attention`), which
                   never holds the (heads, L, L) scores; cross-attention through XLA (its L x 77 scores are small,
                   and jax's cuDNN training path rejects odd key lengths such as 77). NVIDIA GPUs, bf16/fp16, head
                   dim a multiple of 8 and at most 128 (256 on Hopper): SD1.5's 40/80/160 and SDXL's 64 fit.
      "splash"     self-attention through Pallas TPU splash attention (`models.splash_attention`), per batch shard
                   of the `jax.set_mesh` mesh; cross-attention through XLA (its 77 text keys are below the
                   kernel's 128-key blocks). TPUs; elsewhere Pallas interpret mode (tests).
    """

    attention_implementation: str = "diffusers"

    def setup(self) -> None:
        super().setup()
        check_attention_implementation(self.attention_implementation)
        if self.attention_implementation != "diffusers" and self.use_memory_efficient_attention:
            raise ValueError(
                "use_memory_efficient_attention is diffusers' chunked kernel; it cannot be combined with "
                f"attention_implementation={self.attention_implementation!r} (a kernel of its own)"
            )

    def __call__(self, hidden_states: jax.Array, context: Any = None, deterministic: bool = True) -> jax.Array:
        """hidden_states (B, L, query_dim); context (B, T, D) or None (self-attention) -> (B, L, query_dim)."""
        if self.attention_implementation == "diffusers":
            return super().__call__(hidden_states, context, deterministic=deterministic)
        if context is None:
            attended = self.attend(hidden_states, hidden_states, self.key, self.value, self.attention_implementation)
        else:
            attended = self.attend(hidden_states, context, self.key, self.value, "xla")
        return self.dropout_layer(self.proj_attn(attended), deterministic=deterministic)

    def attend(
        self, hidden_states: jax.Array, context: jax.Array, to_k: nn.Module, to_v: nn.Module, implementation: str
    ) -> jax.Array:
        """Multi-head `Attn(to_q(hidden_states), to_k(context), to_v(context))` with `jax.nn.dot_product_attention`
        (scale dim_head**-0.5), before the output projection: (B, L, heads * dim_head)."""
        batch = hidden_states.shape[0]
        heads = (self.heads, self.dim_head)
        query = self.query(hidden_states).reshape(batch, -1, *heads)
        key = to_k(context).reshape(batch, -1, *heads)
        value = to_v(context).reshape(batch, -1, *heads)
        if implementation == "splash":
            attended = splash_attention_in_mesh_context(query, key, value)
        else:
            attended = jax.nn.dot_product_attention(query, key, value, implementation=implementation)
        return attended.reshape(batch, -1, self.heads * self.dim_head)


class IPAttention(Attention):
    """`Attention` plus the image branch of decoupled cross-attention.

    Params added: `to_k_ip/kernel`, `to_v_ip/kernel`, each (cross_attention_dim, heads * dim_head).

    The text branch is `Attention.__call__` (by default diffusers' own). `to_out` is affine, so
    `to_out(a + s * b) == to_out(a) + s * (b @ W_out)`: the image branch is added after diffusers' output projection
    using `to_out`'s kernel alone; with `s == 0` the result is the text branch bit for bit. The image branch's 4-16
    keys make it cheap whatever the kernel, so it always uses XLA's. Dropout (0 in every Stable Diffusion config)
    is applied by diffusers to the text branch only. What attn2 computes is its `adapter_design`'s `attn2`.

    With `num_ip_adapters` = A > 1 it has A branches (adapter a's kernels `to_k_ip_a`/`to_v_ip_a`, scale
    variables "scale_a", ...), summed before the output projection.
    """

    num_ip_adapters: int = 1
    adapter_design: str = "decoupled"  # what it does with image tokens: `ipadapter_jax.models.designs`

    def setup(self) -> None:
        super().setup()
        inner_dim = self.dim_head * self.heads

        def dense(name: str) -> nn.Dense:
            return nn.Dense(inner_dim, use_bias=False, dtype=self.dtype, name=name)

        self.to_k_ip = dense("to_k_ip")
        self.to_v_ip = dense("to_v_ip")
        self.extra_k_ip = tuple(dense(f"to_k_ip_{a}") for a in range(1, self.num_ip_adapters))
        self.extra_v_ip = tuple(dense(f"to_v_ip_{a}") for a in range(1, self.num_ip_adapters))
        self.design_params = get_design(self.adapter_design).declare_params(self)

    def __call__(self, hidden_states: jax.Array, context: Any = None, deterministic: bool = True) -> jax.Array:
        """hidden_states (B, L, query_dim); context: None (self-attention), (B, T, D) text, or `IPContext` (then
        the adapter design's `attn2`)."""
        if not isinstance(context, IPContext):
            return super().__call__(hidden_states, context, deterministic=deterministic)
        return get_design(self.adapter_design).attn2(self, hidden_states, context, deterministic)

    def text_attention(self, hidden_states: jax.Array, text: jax.Array, deterministic: bool = True) -> jax.Array:
        """The frozen text branch `Attention.__call__`: (B, L, query_dim)."""
        return super().__call__(hidden_states, text, deterministic=deterministic)

    def ip_factors(self, adapter: int) -> dict[str, jax.Array]:
        """Adapter `adapter`'s "ip_scale" factors on this layer (`ip_attention.FACTOR_NAMES`; absent ones left out)."""
        names = {name: ip_attention.factor_name(name, adapter) for name in ip_attention.FACTOR_NAMES}
        present = {name: var for name, var in names.items() if self.has_variable(IP_SCALE_COLLECTION, var)}
        return {name: self.get_variable(IP_SCALE_COLLECTION, var) for name, var in present.items()}

    def image_attention(self, hidden_states: jax.Array, context: IPContext) -> jax.Array:
        """`sum_a scale_a * branch_a @ W_out` (no bias): (B, L, query_dim); branch_a as
        `ipadapter_jax.models.ip_attention.image_attention` with adapter a's kernels, factors and masks.

        Q is diffusers' `to_q` of the same hidden states; under `jit` XLA's common-subexpression pass
        shares that matmul with the text branch.
        """
        batch, length = hidden_states.shape[:2]
        query = self.query(hidden_states).reshape(batch, length, self.heads, self.dim_head)
        to_k = (self.to_k_ip, *self.extra_k_ip)
        to_v = (self.to_v_ip, *self.extra_v_ip)
        total = None
        swapped = context.swapped or (None,) * len(context.image_tokens)
        for adapter, (tokens, mask) in enumerate(zip(context.image_tokens, context.masks, strict=True)):
            factors = self.ip_factors(adapter)
            weights = None if mask is None else ip_attention.masks_on_token_grid(mask, length)
            tokens = ip_attention.select_tokens(tokens, swapped[adapter], factors)
            branch = ip_attention.image_attention(query, to_k[adapter](tokens), to_v[adapter](tokens), factors, weights)
            branch = jnp.asarray(factors.get("scale", 1.0), branch.dtype) * branch
            total = branch if total is None else total + branch
        out_kernel = self.proj_attn.variables["params"]["kernel"]
        total, out_kernel = nn.dtypes.promote_dtype(total, out_kernel, dtype=self.dtype)
        return total @ out_kernel


class GEGLU(FlaxGEGLU):
    """diffusers' `FlaxGEGLU`, with PyTorch's exact (erf) GELU when `pytorch_numerics` (diffusers' Flax GEGLU uses the
    tanh approximation, its PyTorch GEGLU `F.gelu`, exact: the one line of `__call__` that differs)."""

    pytorch_numerics: bool = True

    def __call__(self, hidden_states: jax.Array, deterministic: bool = True) -> jax.Array:
        """(B, L, dim) -> (B, L, 4 * dim)."""
        if not self.pytorch_numerics:
            return super().__call__(hidden_states, deterministic=deterministic)
        hidden_linear, hidden_gelu = jnp.split(self.proj(hidden_states), 2, axis=2)
        gated = hidden_linear * nn.gelu(hidden_gelu, approximate=False)
        return self.dropout_layer(gated, deterministic=deterministic)


def _pytorch_group_norm(child: nn.GroupNorm, container: Any) -> nn.GroupNorm:
    """The Transformer2D input GroupNorm with PyTorch's epsilon 1e-6 (diffusers' Flax twin uses 1e-5)."""
    return child.clone(epsilon=1e-6) if container.pytorch_numerics else child


class _SwapChildren(nn.Module):
    """Mixin for a Flax container: as its (diffusers) `setup` attaches a child, swap in our subclass.

    `_SWAPS` maps an attribute name to {diffusers class: our subclass, or a function (child, container) -> child}.
    A child created in `setup` without a name is not registered until it is assigned to an attribute (Flax defers
    it), so here it can still be exchanged for an instance of the subclass with identical dataclass fields. Fields
    that only our subclasses declare (`attention_implementation`, `pytorch_numerics`) are handed down from the
    container, which declares them too.
    """

    _SWAPS: ClassVar[dict[str, dict[type, Any]]] = {}
    attention_implementation: str = "diffusers"  # see `Attention`
    # PyTorch's numerics where diffusers' Flax classes differ: exact GELU in GEGLU, GroupNorm epsilon 1e-6 at the
    # input of each Transformer2D. False: diffusers' Flax behaviour (tanh GELU, 1e-5).
    pytorch_numerics: bool = True
    num_ip_adapters: int = 1  # image branches per attn2 (see `IPAttention`)
    adapter_design: str = "decoupled"  # see `IPAttention`

    @nn.nowrap
    def __setattr__(self, name: str, value: Any) -> None:
        table = type(self)._SWAPS.get(name)
        if table:
            if isinstance(value, (list, tuple)):
                value = type(value)(_swap(child, table, self) for child in value)
            else:
                value = _swap(value, table, self)
        super().__setattr__(name, value)


def _swap(child: Any, table: dict[type, Any], container: Any) -> Any:
    new_class = table.get(type(child))
    if new_class is None:
        return child
    if not isinstance(new_class, type):
        return new_class(child, container)
    assert child.name is None, f"{type(child).__name__} was attached under an explicit name; cannot swap it"
    fields = {
        f.name: getattr(child, f.name) for f in dataclasses.fields(child) if f.init and f.name not in ("parent", "name")
    }
    ours = {f.name for f in dataclasses.fields(new_class) if f.init and f.name not in ("parent", "name")} - set(fields)
    return new_class(**fields, **{name: getattr(container, name) for name in ours}, parent=child.parent)


class FeedForward(_SwapChildren, FlaxFeedForward):
    """`FlaxFeedForward` with our `GEGLU`."""

    _SWAPS = {"net_0": {FlaxGEGLU: GEGLU}}


class IPBasicTransformerBlock(_SwapChildren, FlaxBasicTransformerBlock):
    """`FlaxBasicTransformerBlock` whose attn1 (self-attention) is an `Attention`, attn2 (cross-attention) an
    `IPAttention` and feed-forward a `FeedForward`."""

    _SWAPS = {
        "attn1": {FlaxAttention: Attention},
        "attn2": {FlaxAttention: IPAttention},
        "ff": {FlaxFeedForward: FeedForward},
    }


class IPTransformer2DModel(_SwapChildren, FlaxTransformer2DModel):
    """`FlaxTransformer2DModel` built from `IPBasicTransformerBlock`s, its input GroupNorm as PyTorch's."""

    _SWAPS = {
        "transformer_blocks": {FlaxBasicTransformerBlock: IPBasicTransformerBlock},
        "norm": {nn.GroupNorm: _pytorch_group_norm},
    }


_IP_TRANSFORMERS = {"attentions": {FlaxTransformer2DModel: IPTransformer2DModel}}


class IPCrossAttnDownBlock2D(_SwapChildren, FlaxCrossAttnDownBlock2D):
    """`FlaxCrossAttnDownBlock2D` built from `IPTransformer2DModel`s."""

    _SWAPS = _IP_TRANSFORMERS


class IPCrossAttnUpBlock2D(_SwapChildren, FlaxCrossAttnUpBlock2D):
    """`FlaxCrossAttnUpBlock2D` built from `IPTransformer2DModel`s."""

    _SWAPS = _IP_TRANSFORMERS


class IPUNetMidBlock2DCrossAttn(_SwapChildren, FlaxUNetMidBlock2DCrossAttn):
    """`FlaxUNetMidBlock2DCrossAttn` built from `IPTransformer2DModel`s."""

    _SWAPS = _IP_TRANSFORMERS


# diffusers' config registration wraps __init__, which Flax's dataclass transform regenerates per subclass.
@flax_register_to_config
class IPUNet2DConditionModel(_SwapChildren, FlaxUNet2DConditionModel):
    """diffusers' `FlaxUNet2DConditionModel` (same config) with IP-Adapter attn2 layers: its param tree is diffusers'
    plus the design's per-layer params in every attn2 (decoupled: `to_k_ip/kernel`, `to_v_ip/kernel`)."""

    _SWAPS = {
        "down_blocks": {FlaxCrossAttnDownBlock2D: IPCrossAttnDownBlock2D},
        "up_blocks": {FlaxCrossAttnUpBlock2D: IPCrossAttnUpBlock2D},
        "mid_block": {FlaxUNetMidBlock2DCrossAttn: IPUNetMidBlock2DCrossAttn},
    }

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float | int,
        encoder_hidden_states: jax.Array,
        added_cond_kwargs: dict | None = None,
        down_block_additional_residuals: tuple[jax.Array, ...] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
        return_dict: bool = True,
        train: bool = False,
        image_tokens: jax.Array | tuple[jax.Array, ...] | None = None,
        ip_masks: tuple[jax.Array | None, ...] | None = None,
        swapped_image_tokens: tuple[jax.Array, ...] | None = None,
    ):
        """diffusers' UNet call plus `image_tokens` and `ip_masks`.

        Args:
          sample: (B, C, H, W) noisy latents.
          timesteps: (B,) or scalar.
          encoder_hidden_states: (B, T, cross_attention_dim) text tokens.
          image_tokens: (B, N, cross_attention_dim) projected image tokens (several images for one adapter:
            their tokens concatenated along N), or a tuple of such arrays, one per adapter (`num_ip_adapters`),
            or None for plain text conditioning.
          ip_masks: per adapter, None or (K, H, W) masks of its K images (N = K * tokens per image), shared by
            the batch; None: no masks.
          swapped_image_tokens: per adapter, what layers whose "swap" factor is 1 use (shaped as image_tokens).
          Other arguments as diffusers' `FlaxUNet2DConditionModel.__call__` (SDXL `added_cond_kwargs`,
            ControlNet residuals).
        Returns:
          diffusers' output: `.sample` (B, C, H, W).
        """
        if self.only_cross_attention not in (False, None) and image_tokens is not None:
            # With only_cross_attention diffusers feeds the context to attn1 as well; no SD/SDXL model does.
            raise NotImplementedError("IP-Adapter does not support UNets with only_cross_attention")
        if image_tokens is not None:
            tokens = tuple(image_tokens) if isinstance(image_tokens, (tuple, list)) else (image_tokens,)
            masks = (None,) * len(tokens) if ip_masks is None else tuple(ip_masks)
            self._check_image_inputs(tokens, masks, encoder_hidden_states.shape[0])
            swapped = None if swapped_image_tokens is None else tuple(swapped_image_tokens)
            encoder_hidden_states = IPContext(encoder_hidden_states, tokens, masks, swapped)
        return super().__call__(
            sample,
            timesteps,
            encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
            return_dict=return_dict,
            train=train,
        )

    def _check_image_inputs(self, tokens: tuple, masks: tuple, batch: int) -> None:
        """ValueError naming the first image token array or mask that does not fit this UNet."""
        if len(tokens) != self.num_ip_adapters or len(masks) != len(tokens):
            raise ValueError(
                f"this UNet has {self.num_ip_adapters} IP-Adapter branch(es); got image tokens for {len(tokens)} "
                f"adapter(s) and masks for {len(masks)}"
            )
        for index, (array, mask) in enumerate(zip(tokens, masks)):
            if array.ndim != 3 or array.shape[-1] != self.cross_attention_dim or array.shape[0] != batch:
                raise ValueError(
                    f"image_tokens[{index}] must be (batch={batch}, tokens, {self.cross_attention_dim}) for this "
                    f"UNet (cross_attention_dim={self.cross_attention_dim}); got shape {tuple(array.shape)}"
                )
            if mask is not None and (mask.ndim != 3 or array.shape[1] % mask.shape[0]):
                raise ValueError(
                    f"ip_masks[{index}] must be (images, height, width) with images dividing the adapter's "
                    f"{array.shape[1]} tokens; got shape {tuple(mask.shape)}"
                )
