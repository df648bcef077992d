"""Accelerator datasheet figures, one table: peak dense bf16 FLOP/s, HBM capacity and HBM bandwidth per chip.

MFU in `metrics.jsonl` (`ipadapter_jax.training.hooks`) and the roofline bounds of `ipadapter-jax plan`
(`ipadapter_jax.training.plan`) both read it. Figures per chip (REFERENCE.md s.4 and s.7; Google Cloud TPU
system-architecture pages; NVIDIA H100 / H200 datasheets, SXM, dense, without sparsity):

| chip | device_kind (jax) | bf16 TFLOP/s | HBM | HBM TB/s |
|---|---|---|---|---|
| TPU v4 | "TPU v4" | 275 | 32 GiB | 1.2 |
| TPU v5e | "TPU v5 lite" | 197 | 16 GiB | 0.82 |
| TPU v5p | "TPU v5" | 459 | 95 GiB | 2.76 |
| TPU v6e (Trillium) | "TPU v6 lite" | 918 | 32 GiB | 1.64 |
| H100 SXM | "NVIDIA H100 80GB HBM3" | 989 | 80 GB | 3.35 |
| H200 SXM | "NVIDIA H200" | 989 | 141 GB | 4.8 |

`lookup(device_kind)` matches jax's `Device.device_kind` exactly, or else by its longest known prefix (so
"NVIDIA H100 80GB HBM3" finds "NVIDIA H100"); unknown kinds (CPUs) give None.

TPU topologies (`tpu_topology`, for compiling on a host without TPUs: `ipadapter-jax plan`), named as jax names
them, "<generation>:<chips per axis>". Chips per host, which fixes the process count and so each host's share of
the batch (Google Cloud TPU docs: v4, v5e, v5p, v6e system architecture; GKE TPU machine types):

| generation | shapes | hosts | chips_per_host_bounds |
|---|---|---|---|
| v4 | AxBxC, e.g. 2x2x1 (v4-8), 2x2x2 (v4-16), 4x4x4 (v4-128) | chips / 4 | (2, 2, 1); one device per chip (megacore) |
| v5p | AxBxC, e.g. 2x2x1 (v5p-8), 2x2x2, 4x8x8 (256 chips) | chips / 4 | (2, 2, 1) |
| v5e | 1x1, 2x2, 2x4: one host (ct5lp-hightpu-1t/4t/8t) | 1 | (1, 1, 1), (2, 2, 1), (2, 4, 1) |
| v5e | larger, e.g. 4x4, 8x8, 16x16 (v5litepod-256) | chips / 4 | (2, 2, 1) (ct5lp-hightpu-4t hosts) |
| v6e | as v5e: 1x1, 2x2, 2x4 one host; larger, e.g. 16x16 | 1, or chips / 4 | as v5e (ct6e-standard-1t/4t/8t) |

Several slices (`num_slices`) are joined by the data-center network; libtpu numbers their hosts slice after slice
(`device.slice_index`), so a mesh ordered by process lays the slices along its outer (`data`) axis.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

from ipadapter_jax.training.config import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One chip's datasheet figures. `hbm_bytes`: capacity per chip; `hbm_bandwidth`: bytes/s per chip."""

    name: str
    peak_bf16_flops: float
    hbm_bytes: int
    hbm_bandwidth: float

    def roofline(self, flops: float | None, bytes_accessed: float | None, global_batch: int) -> dict:
        """A lower bound on the step time from its per-chip FLOPs and bytes at this chip's datasheet peaks, and the
        upper bounds on images/s (of `global_batch` images per step) and MFU it implies; all None when either count
        is missing (the compile ran out of HBM)."""
        out = {"peak_flops_per_chip": self.peak_bf16_flops, "hbm_bandwidth_per_chip": self.hbm_bandwidth}
        names = ("compute_s", "memory_s", "step_s_lower_bound", "images_per_s_upper_bound", "mfu_upper_bound", "bound")
        if not flops or not bytes_accessed:
            return dict(out, **dict.fromkeys(names))
        compute, memory = flops / self.peak_bf16_flops, bytes_accessed / self.hbm_bandwidth
        step = max(compute, memory)
        bound = "compute" if compute >= memory else "memory bandwidth"
        return dict(out, **dict(zip(names, (compute, memory, step, global_batch / step, compute / step, bound))))


TPU_V4 = Accelerator("TPU v4", 275e12, 32 * GiB, 1.2e12)
TPU_V5E = Accelerator("TPU v5e", 197e12, 16 * GiB, 0.819e12)
TPU_V5P = Accelerator("TPU v5p", 459e12, 95 * GiB, 2.765e12)
TPU_V6E = Accelerator("TPU v6e", 918e12, 32 * GiB, 1.64e12)
H100 = Accelerator("NVIDIA H100", 989e12, 80 * 10**9, 3.35e12)
H200 = Accelerator("NVIDIA H200", 989e12, 141 * 10**9, 4.8e12)

# jax `device_kind` strings (and the marketing names, for readers) -> chip.
ACCELERATORS: dict[str, Accelerator] = {
    "TPU v4": TPU_V4,
    "TPU v5 lite": TPU_V5E,
    "TPU v5e": TPU_V5E,
    "TPU v5": TPU_V5P,
    "TPU v5p": TPU_V5P,
    "TPU v6 lite": TPU_V6E,
    "TPU v6e": TPU_V6E,
    "NVIDIA H100": H100,
    "NVIDIA H200": H200,
}


def lookup(device_kind: str) -> Accelerator | None:
    """The chip of a jax `device_kind`: an exact key of `ACCELERATORS`, else the longest key it starts with
    followed by a space ("NVIDIA H100 80GB HBM3" -> H100; "TPU v5 lite" is its own key, so v5e is never
    mistaken for v5p); None for devices not in the table."""
    if device_kind in ACCELERATORS:
        return ACCELERATORS[device_kind]
    prefixes = [key for key in ACCELERATORS if device_kind.startswith(key + " ")]
    return ACCELERATORS[max(prefixes, key=len)] if prefixes else None


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one chip of this kind (None if unknown): what MFU divides by."""
    chip = lookup(device_kind)
    return chip.peak_bf16_flops if chip else None


class UnknownTopology(ConfigError):
    """A TPU topology name libtpu or the table below does not know (a usage error: exit status 2)."""


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """How a TPU generation's slices are described: its chip, jax chip config, and hosts (see the table above)."""

    chip: Accelerator
    example: str  # a shape, for messages
    chip_config: str = "default"  # "megacore": one jax device per chip (v4's two TensorCores as one)
    single_host: tuple[str, ...] = ()  # shapes served by one host with all its chips

    def chips_per_host_bounds(self, shape: str) -> tuple[int, int, int]:
        """The chips of one host along each axis for a slice of `shape` ("16x16", "2x2x2")."""
        if shape in self.single_host:
            dims = [int(n) for n in shape.split("x")]
            return tuple(dims + [1] * (3 - len(dims)))  # type: ignore[return-value]
        return (2, 2, 1)


TPU_GENERATIONS = {
    "v4": TpuGeneration(TPU_V4, "2x2x2", chip_config="megacore"),
    "v5e": TpuGeneration(TPU_V5E, "16x16", single_host=("1x1", "2x2", "2x4")),
    "v5p": TpuGeneration(TPU_V5P, "4x8x8"),
    "v6e": TpuGeneration(TPU_V6E, "16x16", single_host=("1x1", "2x2", "2x4")),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice (or several) described by libtpu: its devices, hosts and chip."""

    name: str
    num_slices: int
    devices: list
    chip: Accelerator
    chips_per_host_bounds: tuple[int, int, int]

    @property
    def hosts(self) -> int:
        return len({device.process_index for device in self.devices})


def tpu_topology(name: str, num_slices: int = 1) -> Topology:
    """The devices of the TPU topology `name` ("v5e:16x16", ...) in `num_slices` slices, for compiling only.

    Raises:
      UnknownTopology: an unknown generation, a shape that generation does not have, or `num_slices` < 1.
      RuntimeError: libtpu is not installed (`pip install "jax[tpu]"`), or fails.
    """
    generation, _, shape = name.partition(":")
    known = ", ".join(f"{key}:{g.example}" for key, g in TPU_GENERATIONS.items())
    if generation not in TPU_GENERATIONS or not re.fullmatch(r"\d+(x\d+)+", shape):
        raise UnknownTopology(f"unknown TPU topology {name!r}; known generations: {known}")
    if num_slices < 1:
        raise UnknownTopology(f"--num-slices must be >= 1, got {num_slices}")
    spec = TPU_GENERATIONS[generation]
    bounds = spec.chips_per_host_bounds(shape)
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(
            'compiling for TPU topologies needs libtpu: pip install "jax[tpu]==0.10.2" (or the `tpu` extra)'
        )
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: this host is not a TPU VM
    # Compiling never opens a TPU: other processes may hold libtpu (another plan, a training job on a TPU VM).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # here: the tables above are read without jax

    try:
        description = topologies.get_topology_desc(
            platform="tpu",
            topology_name=name,
            chip_config_name=spec.chip_config,
            chips_per_host_bounds=bounds,
            num_slices=num_slices,
        )
    except Exception as err:  # noqa: BLE001  (libtpu reports every problem as one runtime error type)
        message = " ".join(str(err).split())
        if "INVALID_ARGUMENT" in message:
            raise UnknownTopology(f"TPU topology {name!r}: {message}; known generations: {known}") from None
        raise RuntimeError(f"libtpu cannot describe TPU topology {name!r}: {message}") from None
    return Topology(name, num_slices, list(description.devices), spec.chip, bounds)
