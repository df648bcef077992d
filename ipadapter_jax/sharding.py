"""The device mesh and every sharding decision of the project, in one place.

One mesh shape for everything: two axes, `data` (pure data parallelism) and `fsdp` (data parallelism whose params
and optimizer state are also split across the axis, ZeRO-3 style). The batch is split over both axes
(`BATCH_AXES`). Training uses a mesh over all devices of all processes (`make_mesh`); sampling, the embedding
cache and evaluation scoring use one over this process's devices (`local_mesh`, fsdp = 1).

An array's placement comes from the first matching rule, a regex searched in its path ("state/adapter/image_proj/
proj/kernel", "frozen/unet/down_blocks_0/..."), mapped to

- "fsdp": split the array's largest axis that the fsdp axis size divides, otherwise replicate it (also when
  the array has fewer than `min_fsdp_size` elements);
- "replicate";
- a `PartitionSpec`, or a tuple of axis names (None for an unsplit axis) as config files write it.

Batches whose size is not a multiple of the device count are padded by repeating the last row (`pad_rows`); the
padded rows' outputs are dropped by the caller.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Spec = P | str | tuple
Rule = tuple[str, Spec]

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch dimension is split over both mesh axes

# Small params are not worth the all-gathers: by default replicated below this many elements.
MIN_FSDP_SIZE = 2**14


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all devices of all processes).

    `data=-1` takes whatever `fsdp` leaves. Devices are ordered so that each process's devices are
    contiguous along `data`, which keeps fsdp collectives within a host where possible.
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or (data < 1 and data != -1):
        raise ValueError(
            f"mesh sizes must be >= 1 (data may be -1: all devices fsdp leaves); got data={data}, fsdp={fsdp}"
        )
    if data == -1:
        if len(devices) % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} != {len(devices)} devices")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices).reshape(data, fsdp), BATCH_AXES)


def local_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (devices, 1) mesh over `devices` (default: this process's devices), for work each process does alone."""
    return make_mesh(fsdp=1, devices=jax.local_devices() if devices is None else devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh; other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def padded_size(size: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= `size`."""
    return -(-size // multiple) * multiple


def pad_rows(tree: Any, size: int) -> Any:
    """Every array of `tree` (equal leading sizes) padded to `size` rows by repeating its last row."""

    def pad(x: Any) -> np.ndarray:
        x = np.asarray(x)
        return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x

    return jax.tree.map(pad, tree)


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    if fsdp_size == 1 or int(np.prod(shape)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            return P(*[(FSDP_AXIS if a == axis else None) for a in range(len(shape))])
    return P()


def check_rules(rules: Sequence[Rule]) -> None:
    """ValueError naming the first rule that is not (regex, "fsdp" | "replicate" | PartitionSpec | tuple)."""
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"sharding rule {i}: expected (regex, spec), got {rule!r}")
        try:
            re.compile(rule[0])
        except re.error as err:
            raise ValueError(f"sharding rule {i}: invalid regex {rule[0]!r} ({err})") from None
        spec = rule[1]
        if not (spec in ("fsdp", "replicate") or isinstance(spec, (P, tuple, list))):
            raise ValueError(
                f"sharding rule {i}: spec must be 'fsdp', 'replicate' or a tuple of axis names; got {spec!r}"
            )


def partition_specs(tree: Any, rules: Sequence[Rule], fsdp_size: int, min_fsdp_size: int = MIN_FSDP_SIZE) -> Any:
    """PartitionSpec for every leaf of `tree` (concrete or abstract), by the first matching rule.

    A leaf no rule matches is replicated. Returns a tree of the same structure as `tree`.
    """
    check_rules(rules)
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def spec_for(path: tuple, leaf: Any) -> P:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        for pattern, spec in compiled:
            if pattern.search(name):
                if spec == "fsdp":
                    return _fsdp_spec(tuple(leaf.shape), fsdp_size, min_fsdp_size)
                if spec == "replicate":
                    return P()
                return spec if isinstance(spec, P) else P(*spec)
        return P()

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def named_shardings(tree: Any, mesh: Mesh, rules: Sequence[Rule], min_fsdp_size: int = MIN_FSDP_SIZE) -> Any:
    """NamedSharding for every leaf of `tree` on `mesh` by `rules`."""
    specs = partition_specs(tree, rules, mesh.shape[FSDP_AXIS], min_fsdp_size)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def place(tree: Any, shardings: Any) -> Any:
    """Puts host numpy/jax arrays onto devices with the given shardings (identical on every process)."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index]),
        tree,
        shardings,
    )
