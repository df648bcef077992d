"""The device mesh and every sharding decision of training, in one place.

The mesh has two axes over all devices of all processes: `data` (pure data parallelism) and `fsdp`
(data parallelism whose params and optimizer state are also split across the axis, ZeRO-3 style). The
batch is split over both axes. A param's placement comes from the first matching rule, a regex on its
path ("down_blocks_0/attentions_0/.../to_k_ip/kernel") mapped to

- a `PartitionSpec`, used as is;
- "fsdp": split the param's largest axis that the fsdp axis size divides, otherwise replicate it;
- "replicate".

Nothing else in the project places arrays on devices for training: the train script asks this module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rule = tuple[str, Union[P, str]]

DATA_AXES = ("data", "fsdp")  # the batch dimension is split over both mesh axes

# Small params are not worth the all-gathers: by default replicated below this many elements.
MIN_FSDP_SIZE = 2**14


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all devices of all processes).

    `data=-1` takes whatever `fsdp` leaves. Devices are ordered so that each process's devices are
    contiguous along `data`, which keeps fsdp collectives within a host where possible.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} != {len(devices)} devices")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices).reshape(data, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device; other axes whole."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    if fsdp_size == 1 or int(np.prod(shape)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])
    return P()


def partition_specs(tree: Any, rules: Sequence[Rule], fsdp_size: int, min_fsdp_size: int = MIN_FSDP_SIZE) -> Any:
    """PartitionSpec for every leaf of `tree` (concrete or abstract), by the first matching rule.

    A leaf no rule matches is replicated; "fsdp" leaves under `min_fsdp_size` elements too. Returns a tree
    of the same structure as `tree`.
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def spec_for(path: tuple, leaf: Any) -> P:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for pattern, spec in compiled:
            if pattern.search(name):
                if spec == "fsdp":
                    return _fsdp_spec(tuple(leaf.shape), fsdp_size, min_fsdp_size)
                if spec == "replicate":
                    return P()
                return spec
        return P()

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def named_shardings(tree: Any, mesh: Mesh, rules: Sequence[Rule], min_fsdp_size: int = MIN_FSDP_SIZE) -> Any:
    """NamedSharding for every leaf of `tree` on `mesh` by `rules`."""
    specs = partition_specs(tree, rules, mesh.shape["fsdp"], min_fsdp_size)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def fsdp_rules(enabled: bool) -> list[Rule]:
    """The default rules: every large param FSDP-split when `enabled`, otherwise everything replicated."""
    return [(".*", "fsdp" if enabled else "replicate")]


def place(tree: Any, shardings: Any) -> Any:
    """Puts host numpy/jax arrays onto devices with the given shardings (identical on every process)."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index]),
        tree,
        shardings,
    )

