"""TPU self-attention for Stable Diffusion UNets built on Pallas splash attention.

Why splash rather than the Pallas TPU flash attention
------------------------------------------------------
Both ``jax.experimental.pallas.ops.tpu.splash_attention`` and ``...tpu.flash_attention`` have a custom VJP
and segment ids. Splash is used because it works for every case here (checked: forward and backward in
interpret mode on CPU, and Mosaic compilation for a v5e topology) and it is the kernel JAX's own stacks
(maxtext, maxdiffusion) maintain and tune: separate dq / dkv kernels, independent forward/backward block
sizes, block-sparse static masks (a ``FullMask`` here, so no mask work at all), and a per-example
``(heads, seq, head_dim)`` interface that composes with ``vmap`` and ``shard_map``.

What this module adds on top of the raw kernel
----------------------------------------------
* Layout: public functions take ``(batch, seq_len, heads, head_dim)`` (what
  ``jax.nn.dot_product_attention`` takes) and return the same layout.
* Softmax scale: the splash kernel applies **no** scale (``softmax(q k^T)``). We multiply ``q`` by
  ``head_dim ** -0.5`` (in float32, then cast back to the input dtype) *before* padding, so the
  scale uses the real head dim, not the padded one.
* Head dims that are not multiples of 128 (SD1.5: 40, 80, 160; SDXL: 64): q, k and v are zero-padded
  on the last axis up to a multiple of 128 (40/64/80 -> 128, 160 -> 256). Zero columns leave ``q.k``
  unchanged; the padded columns of the output (coming from zero ``v`` columns) are sliced off. The
  gradient of the pad/slice pair routes cotangents only to the real columns.
* Sequence lengths that are not block multiples (tiny test models: 64, 16, 4 tokens; SD1.5's 64-token
  level): the sequence is zero-padded to ``padded_len`` (see the block policy). Padded *keys* get
  kv segment id 0 while real keys get 1; every query row gets segment id 1, so real rows never see
  padded keys and no row is fully masked (padded query rows attend the real keys and are sliced off;
  their output cotangent is zero so they contribute nothing to dq/dk/dv). When no padding is needed
  (all SD1.5/SDXL levels >= 256 tokens) no segment ids are passed at all and the mask is a
  ``FullMask``, which costs nothing in the kernel.
* ``interpret=None``: Pallas interpret mode unless the computation runs on TPU, so the same code
  runs (slowly) on CPU for tests.

Block-size policy (``select_block_sizes``)
------------------------------------------
The splash kernel needs every block (q and kv, forward and backward) to be a multiple of 128 when
segment ids are used, and the kv compute block must be a multiple of 128 in any case. So:

1. ``len128 = round_up(seq_len, 128)``;
2. ``block = the largest of (512, 256, 128) dividing len128``;
3. ``padded_len = len128`` (so padding is always < 128 tokens: never a whole wasted block).

The same block is used for q and kv in the forward, dq and dkv kernels. SD sizes: 4096 -> 512,
1024 -> 512, 256 -> 256, 64 -> 128 (padded from 64), 640 -> 128. Pass ``block_sizes`` to override
(then ``padded_len`` is ``seq_len`` rounded up to the lcm of all given block sizes).

Sharding
--------
``make_splash_mha`` builds a kernel for one device (``head_shards=q_seq_shards=1``).
``sharded_splash_self_attention`` runs it under ``jax.shard_map`` with the batch axis split over the
given mesh axes (the project's ``("data", "fsdp")``) and everything else replicated, so each device
runs the kernel on its own batch shard with no communication.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

__all__ = [
    "padded_head_dim",
    "select_block_sizes",
    "splash_self_attention",
    "sharded_splash_self_attention",
]

LANES = 128
_BLOCK_CANDIDATES = (512, 256, 128)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def padded_head_dim(head_dim: int) -> int:
    """Head dim after zero padding: the next multiple of 128 (40/64/80 -> 128, 160 -> 256)."""
    return _round_up(head_dim, LANES)


def select_block_sizes(seq_len: int) -> tuple[splash_kernel.BlockSizes, int]:
    """Block sizes for a self-attention of ``seq_len`` tokens, and the padded sequence length.

    Returns ``(block_sizes, padded_len)`` with one block size ``b`` for q/kv in all kernels, the largest
    of 512, 256, 128 that divides ``padded_len = round_up(seq_len, 128)``.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    padded_len = _round_up(seq_len, LANES)
    block = next(b for b in _BLOCK_CANDIDATES if padded_len % b == 0)
    sizes = splash_kernel.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return sizes, padded_len


def _padded_len_for(seq_len: int, block_sizes: splash_kernel.BlockSizes) -> int:
    """Sequence length padded to a multiple of every block size in ``block_sizes`` (and of 128)."""
    blocks = [
        block_sizes.block_q,
        block_sizes.block_kv,
        block_sizes.block_kv_compute,
        block_sizes.block_q_dkv,
        block_sizes.block_kv_dkv,
        block_sizes.block_kv_dkv_compute,
        block_sizes.block_q_dq,
        block_sizes.block_kv_dq,
    ]
    multiple = math.lcm(LANES, *[b for b in blocks if b is not None])
    return _round_up(seq_len, multiple)


def _default_interpret() -> bool:
    return jax.default_backend() != "tpu"


def splash_self_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    interpret: bool | None = None,
    block_sizes: splash_kernel.BlockSizes | None = None,
) -> jax.Array:
    """Non-causal, unmasked multi-head self-attention with the Pallas TPU splash kernel.

    Args:
      query, key, value: ``(batch, seq_len, heads, head_dim)``, same shape and dtype (self-attention:
        q and kv lengths are equal). ``head_dim`` may be any size; ``seq_len`` any length.
      interpret: run the Pallas kernels in interpret mode. ``None``: interpret unless
        ``jax.default_backend() == "tpu"`` (so when AOT-lowering for a TPU topology from a CPU host, pass
        ``interpret=False`` or use ``sharded_splash_self_attention``, which looks at the mesh's devices).
      block_sizes: override ``select_block_sizes(seq_len)``. All blocks must be multiples of 128 (they
        are when the sequence needs padding: segment ids require it).

    Returns:
      ``(batch, seq_len, heads, head_dim)`` in the dtype of ``query``:
      ``softmax(q k^T * head_dim**-0.5) v`` per head. Differentiable in q, k, v (splash custom VJP).
    """
    if query.ndim != 4:
        raise ValueError(f"expected (batch, seq, heads, head_dim) query, got shape {query.shape}")
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(f"self-attention needs equal q/k/v shapes, got {query.shape}, {key.shape}, {value.shape}")
    batch, seq_len, heads, head_dim = query.shape
    if interpret is None:
        interpret = _default_interpret()
    if block_sizes is None:
        block_sizes, padded_len = select_block_sizes(seq_len)
    else:
        padded_len = _padded_len_for(seq_len, block_sizes)
    dim_p = padded_head_dim(head_dim)
    dtype = query.dtype

    # Fold the softmax scale into q with the real head dim, before any padding.
    scale = head_dim**-0.5
    query = (query.astype(jnp.float32) * scale).astype(dtype)

    def to_kernel_layout(x: jax.Array) -> jax.Array:
        # (B, L, H, D) -> (B, H, L_p, D_p), zero padded.
        x = jnp.transpose(x, (0, 2, 1, 3))
        pad = ((0, 0), (0, 0), (0, padded_len - seq_len), (0, dim_p - head_dim))
        return jnp.pad(x, pad) if any(p[1] for p in pad) else x

    q, k, v = (to_kernel_layout(x) for x in (query, key, value))

    mask = splash_mask.MultiHeadMask(masks=(splash_mask.FullMask(_shape=(padded_len, padded_len)),) * heads)
    kernel = splash_kernel.make_splash_mha(
        mask,
        block_sizes=block_sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )

    if padded_len != seq_len:
        # Padded keys: segment 0; real keys and all queries: segment 1.
        kv_ids = (np.arange(padded_len) < seq_len).astype(np.int32)
        segment_ids = splash_kernel.SegmentIds(q=jnp.ones((padded_len,), jnp.int32), kv=jnp.asarray(kv_ids))
        out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segment_ids)
    else:
        out = jax.vmap(kernel, in_axes=(0, 0, 0))(q, k, v)

    out = out[:, :, :seq_len, :head_dim]
    return jnp.transpose(out, (0, 2, 1, 3)).astype(dtype)


def sharded_splash_self_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mesh: Mesh | AbstractMesh,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    *,
    interpret: bool | None = None,
    block_sizes: splash_kernel.BlockSizes | None = None,
) -> jax.Array:
    """``splash_self_attention`` run per batch shard under ``jax.shard_map``.

    Args:
      query, key, value: ``(batch, seq_len, heads, head_dim)`` global arrays; ``batch`` must be divisible
        by the product of the sizes of ``batch_axes``.
      mesh: the device mesh, or the abstract mesh of the `jax.set_mesh` context being traced in.
      batch_axes: mesh axes the batch dimension is split over (axes missing from ``mesh`` are ignored).
        All other dimensions and mesh axes are replicated.
      interpret: ``None``: interpret mode unless the mesh's devices are TPUs (so AOT lowering for a TPU
        topology from a CPU host picks the real kernel).
      block_sizes: see ``splash_self_attention``.

    Returns:
      ``(batch, seq_len, heads, head_dim)``, batch-sharded the same way as the inputs' spec.
    """
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in axes)
    if query.shape[0] % shards:
        raise ValueError(f"batch {query.shape[0]} is not divisible by the {shards} shards of mesh axes {axes}")
    if interpret is None:
        interpret = _platform(mesh) != "tpu"
    spec = P(axes if axes else None, None, None, None)

    def local(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return splash_self_attention(q, k, v, interpret=interpret, block_sizes=block_sizes)

    # check_vma=False is required: the splash pallas_call's out_shape ShapeDtypeStructs carry no
    # manual_axis_type, which jax 0.10.2 rejects under check_vma=True. Each shard's output is its own
    # batch slice, so there is nothing to check.
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        query, key, value
    )


def splash_attention_in_mesh_context(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """``splash_self_attention`` for the mesh of the surrounding `jax.set_mesh` context: per batch shard over its
    ("data", "fsdp") axes when it has any, on the whole batch otherwise (one device, or no context). The kernel
    is compiled for the mesh's platform (interpret mode unless it is a TPU), so the same module lowers for a
    CPU test, a TPU pod, or a TPU topology described on a CPU host. Shapes as `splash_self_attention`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        interpret = None if mesh.empty else _platform(mesh) != "tpu"
        return splash_self_attention(query, key, value, interpret=interpret)
    return sharded_splash_self_attention(query, key, value, mesh)


def _platform(mesh: Mesh | AbstractMesh) -> str:
    if isinstance(mesh, Mesh):
        return mesh.devices.flat[0].platform
    return mesh.abstract_device.platform
