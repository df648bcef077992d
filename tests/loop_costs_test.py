"""`loop_costs`: XLA's cost analysis counts a while loop's body once; the loop-weighted costs count it once per trip.

References: the FLOPs of the same work written without loops (XLA's count of the unrolled or replicated program)
and the matmuls' analytic 2 m k n. Compiled for a TPU topology on this CPU host (libtpu), as `plan` does; the tests
skip with the reason where libtpu cannot be imported.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ipadapter_jax import sharding
from ipadapter_jax.training import accelerators
from ipadapter_jax.training.loop_costs import program_costs

N = 256


@pytest.fixture
def chip():
    pytest.importorskip("libtpu", reason='compiling for TPU topologies needs libtpu (pip install "jax[tpu]")')
    return accelerators.tpu_topology("v5e:2x2").devices[0]


def _xla_flops(compiled: jax.stages.Compiled) -> float:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def _compile(fn, *args) -> jax.stages.Compiled:
    return jax.jit(fn).lower(*args).compile()


def _matrices(chip, count: int = 2) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct((N, N), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(chip))] * count


def test_a_loop_counts_once_per_trip_where_xla_counts_it_once(chip):
    """A 10-trip fori_loop of N x N matmuls: XLA counts one matmul (2 N^3); the loop-weighted count is the unrolled
    program's, ten."""
    looped = _compile(lambda a, b: jax.lax.fori_loop(0, 10, lambda _, x: jnp.tanh(x @ b), a), *_matrices(chip))
    unrolled = _compile(
        lambda a, b: jax.lax.fori_loop(0, 10, lambda _, x: jnp.tanh(x @ b), a, unroll=True), *_matrices(chip)
    )
    assert _xla_flops(looped) == pytest.approx(2 * N**3, rel=0.01)  # one trip's worth, not ten
    costs = program_costs(looped)
    assert (costs.while_loops, costs.loop_trips, costs.unknown_trip_counts) == (1, 10, 0)
    assert costs.flops == pytest.approx(_xla_flops(unrolled), rel=0.01)
    assert costs.flops == pytest.approx(10 * 2 * N**3, rel=0.01)
    assert program_costs(unrolled).while_loops == 0


def test_nested_loops_multiply_their_trips(chip):
    """3 trips of a loop of 4 trips (from 1, by 2, while below 9: 1, 3, 5, 7): 12 matmuls."""

    def nested(a, b):
        inner = lambda x: jax.lax.while_loop(lambda c: c[0] < 9, lambda c: (c[0] + 2, jnp.tanh(c[1] @ b)), (1, x))
        return jax.lax.fori_loop(0, 3, lambda _, x: inner(x)[1], a)

    costs = program_costs(_compile(nested, *_matrices(chip)))
    assert (costs.while_loops, costs.loop_trips, costs.unknown_trip_counts) == (2, 3 + 4, 0)
    assert costs.flops == pytest.approx(12 * 2 * N**3, rel=0.01)


def test_a_loop_whose_trips_depend_on_data_is_counted_once_and_said(chip):
    def until_small(a, b):
        return jax.lax.while_loop(lambda x: jnp.sum(x) > 1.0, lambda x: jnp.tanh(x @ b) * 0.5, a)

    compiled = _compile(until_small, *_matrices(chip))
    costs = program_costs(compiled)
    assert (costs.while_loops, costs.unknown_trip_counts) == (1, 1)
    assert costs.flops == _xla_flops(compiled)


def test_fsdp_collective_matmul_loops_are_counted_whole():
    """A weight split over 8 chips: the TPU compiler all-gathers it chunk by chunk in a collective-matmul loop
    (`windowed_dot_general`) whose later trips XLA leaves out; loop-weighted, the step counts what the program with
    the weight replicated does (no loops), each chip its share of 2 m k n."""
    pytest.importorskip("libtpu", reason='compiling for TPU topologies needs libtpu (pip install "jax[tpu]")')
    mesh = sharding.make_mesh(1, 8, accelerators.tpu_topology("v5e:2x4").devices)
    rows, k, n = 8 * 2048, 4096, 4096
    x = jax.ShapeDtypeStruct((rows, k), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))

    def layer(x, w):
        return jnp.sum(jnp.tanh(x @ w).astype(jnp.float32))

    def compiled(spec: PartitionSpec) -> jax.stages.Compiled:
        w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
        return jax.jit(layer, out_shardings=NamedSharding(mesh, PartitionSpec())).lower(x, w).compile()

    split, replicated = compiled(PartitionSpec("fsdp")), compiled(PartitionSpec())
    share = 2 * rows * k * n / 8
    assert program_costs(replicated).while_loops == 0 and _xla_flops(replicated) == pytest.approx(share, rel=0.01)
    costs = program_costs(split)
    assert costs.while_loops >= 1 and costs.unknown_trip_counts == 0
    assert _xla_flops(split) < 0.6 * share  # XLA's count leaves out trips
    assert costs.flops == pytest.approx(_xla_flops(replicated), rel=0.01)


_FSDP_MATMUL_LOOPS = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from ipadapter_jax import sharding
from ipadapter_jax.training import accelerators
from ipadapter_jax.training.loop_costs import program_costs
mesh = sharding.make_mesh(32, 8, accelerators.tpu_topology("v5e:16x16").devices)
x = jax.ShapeDtypeStruct((256 * 2048, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
layer = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w).astype(jnp.float32)), out_shardings=NamedSharding(mesh, P()))
print(program_costs(layer.lower(x, w).compile()).while_loops)
"""


@pytest.mark.parametrize("flags, loops", [("", 0), ("--xla_tpu_all_gather_collective_matmul_mode=post_spmd", 1)])
def test_at_256_chips_the_fsdp_matmul_loops_only_with_post_spmd_collective_matmul(flags, loops):
    """The README's "Loops in FSDP programs": on `v5e:16x16` (data 32 x fsdp 8) XLA all-gathers a split weight whole,
    no loop; libtpu's post-SPMD all-gather collective matmul (LIBTPU_INIT_ARGS, read when libtpu starts: a process
    each) streams it in a loop as on 8 chips."""
    pytest.importorskip("libtpu", reason='compiling for TPU topologies needs libtpu (pip install "jax[tpu]")')
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", LIBTPU_INIT_ARGS=flags)
    done = subprocess.run([sys.executable, "-c", _FSDP_MATMUL_LOOPS], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == loops
