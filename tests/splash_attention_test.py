"""Splash self-attention (Pallas, interpret mode on CPU) against jax.nn.dot_product_attention(implementation="xla").

Forward and gradients w.r.t. q, k, v for the SD head dims (40, 64, 80, 160), sequence lengths that are and are
not block multiples, several blocks per sequence with padding, fp32 and bf16, and the shard_map wrapper on an
8-device host mesh (in a subprocess, since the device count is fixed at backend start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel

from ipadapter_jax.models import splash_attention as sa

FP32_TOL = 1e-5
BF16_TOL = 2e-2


def _rel(actual: jax.Array, expected: jax.Array) -> float:
    """max |actual - expected| / max |expected|, in float32."""
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _inputs(shape, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, cotangent = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    return q, k, v, cotangent


def _value_and_grads(attention, q, k, v, cotangent):
    """Output and d/d(q, k, v) of sum(out * cotangent), all under one jit."""

    def loss(q, k, v):
        out = attention(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def _check(shape, dtype, tol, block_sizes=None, seed=0):
    q, k, v, cotangent = _inputs(shape, dtype, seed)
    out, grads = _value_and_grads(
        lambda q, k, v: sa.splash_self_attention(q, k, v, block_sizes=block_sizes), q, k, v, cotangent
    )
    # Reference in float32 (for bf16 inputs: the exact answer for the bf16-rounded inputs).
    f32 = [x.astype(jnp.float32) for x in (q, k, v, cotangent)]
    ref_out, ref_grads = _value_and_grads(_reference, *f32)
    assert out.shape == shape and out.dtype == dtype
    assert all(g.dtype == dtype and g.shape == shape for g in grads)
    errors = {"out": _rel(out, ref_out)}
    errors.update({f"d{name}": _rel(g, r) for name, g, r in zip("qkv", grads, ref_grads)})
    assert all(np.isfinite(e) and e <= tol for e in errors.values()), errors


# (batch, seq_len, heads, head_dim): 64 pads to one 128 block; 200 pads to 256 = 2 blocks of 128 (the
# second part padding); 256 is one exact block; 300 -> 384 = 3 blocks of 128 with padding.
@pytest.mark.parametrize(
    "shape",
    [
        (2, 64, 2, 40),
        (1, 200, 2, 64),
        (1, 256, 2, 80),
        (1, 300, 1, 160),
    ],
)
def test_fp32_forward_and_grads_match_xla(shape):
    _check(shape, jnp.float32, FP32_TOL)


def test_fp32_many_blocks_and_partial_last_block_with_forced_block_sizes():
    # 640 tokens with forced 256 blocks -> padded to 768: 3 q blocks x 3 kv blocks in every kernel, the last
    # kv block 1/2 padding; q and kv blocks of different sizes in the backward kernels.
    blocks = splash_kernel.BlockSizes(
        block_q=256,
        block_kv=256,
        block_kv_compute=128,
        block_q_dkv=128,
        block_kv_dkv=256,
        block_kv_dkv_compute=128,
        block_q_dq=256,
        block_kv_dq=128,
    )
    _check((1, 640, 1, 40), jnp.float32, FP32_TOL, block_sizes=blocks)


@pytest.mark.parametrize("shape", [(2, 64, 2, 64), (1, 200, 2, 40), (1, 300, 1, 160)])
def test_bf16_forward_and_grads_match_xla(shape):
    _check(shape, jnp.bfloat16, BF16_TOL, seed=1)


def test_tiny_model_sequence_lengths():
    # The tiny test UNets: 64, 16 and 4 tokens (each padded to one 128 block, almost all of it masked).
    for seq_len in (16, 4):
        _check((2, seq_len, 2, 8), jnp.float32, FP32_TOL, seed=seq_len)


def test_block_size_policy():
    expected = {
        4096: (512, 4096),
        1024: (512, 1024),
        256: (256, 256),
        64: (128, 128),
        4: (128, 128),
        640: (128, 640),
        300: (128, 384),
        768: (256, 768),
    }
    for seq_len, (block, padded) in expected.items():
        sizes, padded_len = sa.select_block_sizes(seq_len)
        assert padded_len == padded, seq_len
        for name in (
            "block_q",
            "block_kv",
            "block_kv_compute",
            "block_q_dkv",
            "block_kv_dkv",
            "block_kv_dkv_compute",
            "block_q_dq",
            "block_kv_dq",
        ):
            assert getattr(sizes, name) == block, (seq_len, name)
    assert [sa.padded_head_dim(d) for d in (40, 64, 80, 128, 160)] == [128, 128, 128, 128, 256]


def test_padded_keys_are_masked():
    # Keys past seq_len must not take part: changing nothing but the padding would be invisible, so instead
    # check that a sequence whose real part is a prefix of a longer one gives the short-sequence answer, i.e.
    # the kernel did not attend to the zero-padded keys (which would add exp(0) weight to each row).
    q, k, v, _ = _inputs((1, 100, 2, 40), jnp.float32, seed=3)
    out = jax.jit(sa.splash_self_attention)(q, k, v)
    assert _rel(out, _reference(q, k, v)) <= FP32_TOL
    # Attending the 28 zero keys too (what an unmasked padded kernel would compute) differs clearly.
    pad = ((0, 0), (0, 28), (0, 0), (0, 0))
    unmasked = _reference(*(jnp.pad(x, pad) for x in (q, k, v)))[:, :100]
    assert _rel(unmasked, _reference(q, k, v)) > 1e-2


SHARDED_SCRIPT = """
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ipadapter_jax.models.splash_attention import sharded_splash_self_attention
assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
keys = jax.random.split(jax.random.key(0), 4)
shape = (8, 200, 2, 40)
q, k, v, ct = (jax.random.normal(key, shape, jnp.float32) for key in keys)
batch = NamedSharding(mesh, P(("data", "fsdp")))
q, k, v = (jax.device_put(x, batch) for x in (q, k, v))

def loss(attention):
    def f(q, k, v):
        out = attention(q, k, v)
        return jnp.sum(out * ct), out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

(_, out), grads = loss(lambda q, k, v: sharded_splash_self_attention(q, k, v, mesh, ("data", "fsdp")))(q, k, v)
(_, ref), ref_grads = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))(q, k, v)
try:
    sharded_splash_self_attention(q[:6], k[:6], v[:6], mesh)
    indivisible_error = ""
except ValueError as e:
    indivisible_error = str(e)
rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
lowered = jax.jit(lambda q, k, v: sharded_splash_self_attention(q, k, v, mesh)).lower(q, k, v).as_text()
print(json.dumps({
    "errors": [rel(out, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)],
    "out_spec": str(out.sharding.spec),
    "shard_shapes": sorted({s.data.shape for s in out.addressable_shards}),
    "has_shard_map": "shard_map" in lowered or "manual" in lowered,
    "indivisible_error": indivisible_error,
}))
"""


@pytest.mark.slow
def test_sharded_wrapper_on_8_host_devices():
    repo = Path(sa.__file__).resolve().parents[2]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SHARDED_SCRIPT)],
        capture_output=True,
        text=True,
        env=env,
        cwd=repo,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(e <= FP32_TOL for e in report["errors"]), report
    # Batch 8 over data x fsdp = 4 shards: each device holds 2 examples, the full sequence, heads and dims.
    assert report["shard_shapes"] == [[2, 200, 2, 40]], report
    assert "data" in report["out_spec"] and "fsdp" in report["out_spec"], report
    assert report["has_shard_map"], report
    assert "not divisible" in report["indivisible_error"], report


@pytest.mark.slow
def test_sharded_wrapper_on_one_device_and_mesh_without_fsdp_axis():
    q, k, v, _ = _inputs((3, 16, 1, 8), jnp.float32, seed=5)
    expected = _reference(q, k, v)
    for names in (("data", "fsdp"), ("data", "other")):  # a batch axis missing from the mesh is ignored
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), names)
        assert _rel(sa.sharded_splash_self_attention(q, k, v, mesh), expected) <= FP32_TOL
