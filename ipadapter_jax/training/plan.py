"""The training step compiled ahead of time for a TPU topology that is not attached: memory, FLOPs and bounds.

`plan(config, topology)` builds the step `ipadapter-jax train` runs, by the same code (`components` ->
`program.step_program` -> `StepProgram.compile`: the config's mesh, sharding rules, donation, remat, attention kernel
and dtype), from shapes alone (`components.abstract_components`: no weights, nothing allocated), over the devices
of a TPU topology description (libtpu compiles for it on a CPU host), and reads XLA's per-chip memory and cost
analyses. Batches are the data loader's (`loader.global_batch`, `loader.per_process_batch`: the same arithmetic
as a multi-host run), in the embedding cache's form unless the raw data is asked for.

Topologies (`ipadapter_jax.training.accelerators.tpu_topology`): "v4:2x2x2", "v5e:16x16", "v5p:4x8x8",
"v6e:2x4", ...; `num_slices` > 1 is a multi-slice run whose slices lie along the mesh's `data` axis.

Memory per chip: total = arguments + temporaries + outputs - aliased (outputs written into donated arguments), as
XLA's buffer assignment sizes them; `xla_peak` is XLA's own peak (lower for SD-sized steps, higher for tiny ones,
whose many small arrays fill whole TPU tiles); footprint = the larger of the two. The step fits when the compile
succeeds and footprint <= the chip's HBM; headroom is what the footprint leaves of it. Roofline: a lower bound on
step time, max(FLOPs / peak, bytes accessed / HBM bandwidth) per chip with datasheet figures, and the upper bounds on
images/s and MFU it implies: bounds, not measurements. FLOPs and bytes are XLA's cost analysis with every while
loop's body counted once per trip (`loop_costs`: XLA counts it once, and under FSDP the TPU compiler turns
all-gathered matmuls and convolutions into such loops); XLA's own counts are `xla_flops` and `xla_bytes_accessed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from ipadapter_jax import sharding
from ipadapter_jax.data import embedding_cache, loader
from ipadapter_jax.training import components
from ipadapter_jax.training.accelerators import Topology
from ipadapter_jax.training.config import ConfigError, TrainConfig
from ipadapter_jax.training.encode import encode_batch, null_conditions
from ipadapter_jax.training.loop_costs import program_costs
from ipadapter_jax.training.program import StepProgram, step_program

GiB = 2**30


class DoesNotFit(RuntimeError):
    """The step does not fit in a chip's HBM even at batch 1 per chip (exit status 1)."""


@dataclasses.dataclass
class StepPlan:
    """One compile of the step at `batch_per_chip`. `memory`: bytes per chip as XLA's memory analysis gives them
    (see the module docstring); when the compile ran out of memory, only what XLA's error said (`_oom_sizes`: HBM
    `required` of `available`, or the TPU memory space that ran out), and no costs."""

    batch_per_chip: int
    compile_s: float
    fits: bool
    memory: dict
    costs: dict | None = None  # the report's cost_per_chip
    error: str | None = None


class Planner:
    """The step of `config` on `topology`, compiled for any batch per chip (`compile(batch_per_chip)`)."""

    def __init__(self, config: TrainConfig, topology: Topology, cached: bool = True):
        self.config, self.topology, self.cached = config, topology, cached
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, topology.devices)
        _check_slices(self.mesh, topology)
        self.comps = components.abstract_components(config)
        example = self.comps.preprocessor(config.data.resolution, config.data.crop).null_example()
        null = _encode(self.comps, _batched(example, 1))
        kind = self.comps.encoders.kind
        frozen = dict(self.comps.frozen, **jax.eval_shape(lambda n: null_conditions(kind, n), null))  # run's nulls
        if cached:
            del frozen["encoders"]
        self.program: StepProgram = step_program(config, self.comps, frozen, cached, self.mesh)
        self.frozen = _with(frozen, self.program.shardings["frozen"])
        self.example = example

    def batch(self, batch_per_chip: int) -> dict:
        """The global batch a `DataIterator` yields (this config's fields and dtypes), as ShapeDtypeStructs."""
        size = loader.global_batch(batch_per_chip, self.mesh.size)
        batch = _step_batch(self.comps, _batched(self.example, size), self.cached)
        split = sharding.batch_sharding(self.mesh)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=split) for k, v in batch.items()}

    def compile(self, batch_per_chip: int) -> StepPlan:
        """Compiles the step at `batch_per_chip` and reads XLA's memory and cost analyses."""
        start = time.time()
        try:
            with _no_persistent_cache():
                compiled = self.program.compile(self.program.state_target(), self.frozen, self.batch(batch_per_chip))
        except Exception as err:  # noqa: BLE001  (XLA reports running out of HBM as a compile error)
            message = " ".join(str(err).split())
            if "RESOURCE_EXHAUSTED" not in message:
                raise
            return StepPlan(batch_per_chip, time.time() - start, False, _oom_sizes(message), error=message[:400])
        seconds = time.time() - start
        stats = compiled.memory_analysis()
        memory = {
            "arguments": stats.argument_size_in_bytes,
            "temporaries": stats.temp_size_in_bytes,
            "outputs": stats.output_size_in_bytes,
            "aliased": stats.alias_size_in_bytes,
            "code": stats.generated_code_size_in_bytes,
            "xla_peak": getattr(stats, "peak_memory_in_bytes", None),
        }
        memory["total"] = memory["arguments"] + memory["temporaries"] + memory["outputs"] - memory["aliased"]
        memory["footprint"] = max(memory["total"], memory["xla_peak"] or 0)
        fits = memory["footprint"] <= self.topology.chip.hbm_bytes
        return StepPlan(batch_per_chip, seconds, fits, memory, dataclasses.asdict(program_costs(compiled)))


def max_batch_per_chip(
    compile_at: Callable[[int], StepPlan], limit: int, capacity: int, start: int = 1
) -> tuple[int, list[StepPlan]]:
    """A batch per chip <= `limit` that fits in `capacity` bytes while the next does not, by compiling: `start`, then
    where a line through the measured totals reaches `capacity`, kept inside the bracket (largest fitting, smallest
    failing); the midpoint after two guesses that did not halve it. It assumes memory grows with the batch; near full
    HBM XLA recomputes to fit, and memory can even fall as the batch grows. Returns the batch and every compile.

    Raises:
      DoesNotFit: batch 1 does not fit.
    """
    tried: dict[int, StepPlan] = {}
    low, high = 0, limit + 1  # low fits (0: none yet); high does not fit (limit + 1: beyond the search)
    guess, predicted, slow = min(max(start, 1), limit), False, 0
    while high - low > 1:
        result = tried[guess] = compile_at(guess)
        if guess == 1 and not result.fits:
            raise DoesNotFit(_does_not_fit(result, capacity))
        width = high - low
        low, high = (guess, high) if result.fits else (low, guess)
        slow = slow + 1 if predicted and high <= limit and (high - low) * 2 > width else 0
        prediction = None if slow >= 2 else _predict(tried, low, high, capacity)
        predicted = prediction is not None
        guess = min(max(prediction, low + 1), high - 1) if predicted else (low + high) // 2
    return low, [tried[batch] for batch in sorted(tried)]


def _predict(tried: dict[int, StepPlan], low: int, high: int, capacity: int) -> int | None:
    """The batch at which the line through the bracket's measured sizes reaches `capacity` (with one measurement:
    its batch-independent arguments, none if it did not fit, and the rest per example). A size is the footprint of a
    compile that fit, or what XLA said a failing one required: a failing compile is usually the fast one (XLA gives
    up in minutes unless the batch is within a few percent of fitting), so a search from above costs little."""
    totals = {b: r.memory.get("footprint") or r.memory.get("required") for b, r in tried.items()}
    totals = {batch: total for batch, total in totals.items() if total}
    bracket = [(b, totals[b]) for b in (low, high) if b in totals]
    points = bracket if len(bracket) == 2 else sorted(totals.items())[-2:]
    if not points:
        return None
    if len(points) == 1:
        (batch, total), fixed = points[0], tried[points[0][0]].memory.get("arguments", 0)
        slope = max(total - fixed, 1) / batch
    else:
        (b0, t0), (b1, t1) = points
        slope = max(t1 - t0, 1) / (b1 - b0)
        fixed = t1 - slope * b1
    return int((capacity - fixed) // slope)


def plan(
    config: TrainConfig,
    topology: Topology,
    batch_per_chip: int | None = None,
    *,
    cached: bool | None = None,
    limit: int = 64,
    log: Callable[[str], None] = print,
) -> dict:
    """Compiles `config`'s step for `topology` and returns the report (`REPORT_FIELDS`, sizes in bytes per chip).

    Args:
      batch_per_chip: None: `config.data.batch_size_per_device`; 0: the largest batch per chip up to `limit` that
        fits (`max_batch_per_chip` from the config's batch; the report is that batch's; under "auto": every compile
        with its images/s bound, and the fitting batch with the best bound).
      cached: the step reads embedding-cache batches; None: as `config.data.path` is a cache (or when no path).
    Raises:
      DoesNotFit: automatic batch, and not even batch 1 fits.
      ValueError: the global batch does not split over the hosts as the data loader reads it.
    """
    if cached is None:
        cached = not config.data.path or embedding_cache.is_cache(config.data.path)
    start = time.time()
    planner = Planner(config, topology, cached)
    log(f"built the step for {topology.name} (x{topology.num_slices} slices) in {time.time() - start:.1f}s")
    capacity = topology.chip.hbm_bytes

    def compile_at(batch: int) -> StepPlan:
        result = planner.compile(batch)
        footprint = result.memory.get("footprint")
        size = f"{footprint / GiB:.2f} GiB" if footprint else out_of_memory(result.memory)
        log(f"  batch {batch}/chip: {'fits' if result.fits else 'does not fit'}, {size}, in {result.compile_s:.0f}s")
        return result

    if batch_per_chip == 0:
        best, tried = max_batch_per_chip(compile_at, limit, capacity, start=config.data.batch_size_per_device)
    else:
        best, tried = None, [compile_at(batch_per_chip or config.data.batch_size_per_device)]
    reports = {r.batch_per_chip: _report(config, topology, planner, r) for r in tried}
    report = reports[best or tried[0].batch_per_chip]
    if batch_per_chip == 0:
        bounds = {batch: r["roofline"]["images_per_s_upper_bound"] for batch, r in reports.items()}
        fitting = [r.batch_per_chip for r in tried if r.fits and bounds[r.batch_per_chip]]
        report["auto"] = {
            "max_batch_per_chip": best,
            "fastest_batch_per_chip": max(fitting, key=bounds.__getitem__, default=best),
            "limit": limit,
            "tried": [
                {
                    "batch_per_chip": r.batch_per_chip,
                    "fits": r.fits,
                    "footprint": r.memory.get("footprint"),
                    "images_per_s_upper_bound": bounds[r.batch_per_chip],
                    "compile_s": round(r.compile_s, 1),
                }
                for r in tried
            ],
        }
    report["total_s"] = round(time.time() - start, 1)
    return report


# The report's fields (`plan`); "auto" only with an automatic batch. Sizes in bytes per chip.
REPORT_FIELDS = {
    "topology": "name num_slices device_kind chips hosts chips_per_host mesh libtpu_init_args".split(),
    "model": (
        "architecture base image_encoder adapter_kind resolution dtype attention_implementation "
        "memory_efficient_attention remat sharding_rules data"
    ).split(),
    "batch": "per_chip global per_host".split(),
    "memory_per_chip": (
        "arguments temporaries outputs aliased code xla_peak total footprint capacity fits headroom_pct"
    ).split(),
    "cost_per_chip": (
        "flops bytes_accessed xla_flops xla_bytes_accessed while_loops loop_trips unknown_trip_counts"
    ).split(),
    "roofline": (
        "peak_flops_per_chip hbm_bandwidth_per_chip compute_s memory_s step_s_lower_bound images_per_s_upper_bound "
        "mfu_upper_bound bound"
    ).split(),
    "compile_s": [],
    "total_s": [],
}


def _report(config: TrainConfig, topology: Topology, planner: Planner, result: StepPlan) -> dict:
    chip, mesh, model = topology.chip, planner.mesh, config.model
    size = loader.global_batch(result.batch_per_chip, mesh.size)
    memory = {key: result.memory.get(key) for key in REPORT_FIELDS["memory_per_chip"]}
    memory.update(result.memory, capacity=chip.hbm_bytes, fits=result.fits)
    footprint = memory["footprint"]
    memory["headroom_pct"] = None if footprint is None else round(100 * (1 - footprint / chip.hbm_bytes), 1)
    report = {
        "topology": {
            "name": topology.name,
            "num_slices": topology.num_slices,
            "device_kind": topology.devices[0].device_kind,
            "chips": len(topology.devices),
            "hosts": topology.hosts,
            "chips_per_host": len(topology.devices) // topology.hosts,
            "mesh": dict(mesh.shape),
            # the TPU compiler's flags (a TPU VM's job reads the same variable): they change the program
            "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
        },
        "model": {
            "architecture": model.architecture,
            "base": model.base,
            "image_encoder": model.image_encoder,
            "adapter_kind": model.adapter_kind,
            "resolution": config.data.resolution,
            "dtype": model.dtype,
            "attention_implementation": model.attention_implementation,
            "memory_efficient_attention": model.memory_efficient_attention,
            "remat": model.remat,
            "sharding_rules": [
                [rule, spec if isinstance(spec, (str, tuple)) else str(spec)] for rule, spec in config.sharding_rules
            ],
            "data": "cached" if planner.cached else "raw",
        },
        "batch": {"per_chip": result.batch_per_chip, "global": size, "per_host": _host_rows(mesh, size)},
        "memory_per_chip": memory,
        "cost_per_chip": {key: (result.costs or {}).get(key) for key in REPORT_FIELDS["cost_per_chip"]},
        "roofline": chip.roofline(*((result.costs or {}).get(key) for key in ("flops", "bytes_accessed")), size),
        "compile_s": round(result.compile_s, 1),
    }
    if result.error:
        report["error"] = result.error
    return report


def _host_rows(mesh: Any, size: int) -> int:
    """The rows each host reads (`loader.per_process_batch`), checked against the batch sharding: host p's devices
    hold exactly rows [p*b, (p+1)*b), which `make_array_from_process_local_data` fills from its `DataIterator`."""
    hosts = sorted({device.process_index for device in mesh.devices.flat})
    per_host = loader.per_process_batch(size, len(hosts))
    rows: dict[int, set] = {}
    for device, index in sharding.batch_sharding(mesh).devices_indices_map((size,)).items():
        rows.setdefault(device.process_index, set()).update(range(*index[0].indices(size)))
    for rank, host in enumerate(hosts):
        if rows[host] != set(range(rank * per_host, (rank + 1) * per_host)):
            raise ValueError(f"host {host}'s devices do not hold one contiguous block of the batch")
    return per_host


def _check_slices(mesh: Any, topology: Topology) -> None:
    """Slices must lie along `data`: an fsdp group (a row of the mesh) spanning slices would all-gather over the
    data-center network every layer."""
    for row in mesh.devices:
        if len({getattr(device, "slice_index", 0) for device in row}) > 1:
            raise ConfigError(
                f"mesh.fsdp={mesh.shape[sharding.FSDP_AXIS]} spans slices of {topology.name} "
                f"({len(topology.devices) // topology.num_slices} chips each): use mesh.fsdp <= the chips of a slice"
            )


# What the embedding cache stores next to the encoders' outputs (`embedding_cache.build_embedding_cache`'s `keep`),
# and what the data loader adds to every example.
_CACHE_KEEP = inspect.signature(embedding_cache.build_embedding_cache).parameters["keep"].default
_LOADER_FIELDS = {"index": np.int32, "drop_image": np.bool_, "drop_text": np.bool_}


def _batched(example: dict, size: int) -> dict:
    """One preprocessed example (numpy) -> a batch of `size` as ShapeDtypeStructs, with the loader's fields."""
    batch = {key: jax.ShapeDtypeStruct((size, *np.shape(v)), np.asarray(v).dtype) for key, v in example.items()}
    return dict(batch, **{key: jax.ShapeDtypeStruct((size,), dtype) for key, dtype in _LOADER_FIELDS.items()})


def _encode(comps: components.Components, raw: dict) -> dict:
    """The shapes `encode_batch` gives a raw batch (what the embedding cache holds and the run's null encodings)."""
    inputs = {key: value for key, value in raw.items() if key not in _LOADER_FIELDS}
    return jax.eval_shape(lambda p, b: encode_batch(comps.encoders, p, b), comps.frozen["encoders"], inputs)


def _step_batch(comps: components.Components, raw: dict, cached: bool) -> dict:
    """A raw batch, or the embedding-cache batch of the same examples (encodings + kept fields + loader fields)."""
    if not cached:
        return raw
    kept = {key: raw[key] for key in (*_CACHE_KEEP, "face_embeds", *_LOADER_FIELDS) if key in raw}
    return dict(_encode(comps, raw), **kept)


@contextlib.contextmanager
def _no_persistent_cache() -> Iterator[None]:
    """jax's persistent compilation cache off: it cannot load executables for a topology without its client (a
    warning on every hit) and would store each of them (gigabytes for SD-sized steps) for nothing."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)


def _with(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _oom_sizes(message: str) -> dict:
    """What XLA's out-of-memory compile error says it needed and had, in bytes: `required` and `available` when HBM ran
    out; when another of the TPU's memory spaces did (e.g. `sflag`, its synchronisation flags), that space's name as
    `memory_space` and its `space_required` / `space_available`, and no HBM figure; empty when the error says none."""
    units = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    hbm = re.search(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)", message)
    match = hbm or re.search(r"Used ([\d.]+)([KMGTB]?) of ([\d.]+)([KMGTB]?) (\w+)", message)
    if not match:
        return {}
    need, have = (int(float(match[i]) * units[match[i + 1]]) for i in (1, 3))
    space = "hbm" if hbm else match[5].lower()
    if space == "hbm":
        return {"required": need, "available": have}
    return {"memory_space": space, "space_required": need, "space_available": have}


def out_of_memory(memory: dict) -> str:
    """What a compile that ran out of memory says, from `_oom_sizes`'s fields: which memory, needed of available."""
    if memory.get("memory_space"):
        return (
            f"XLA ran out of the chip's {memory['memory_space']} memory ({memory['space_required']} of "
            f"{memory['space_available']} bytes), not of HBM"
        )
    if memory.get("required"):
        return f"XLA ran out of HBM ({memory['required'] / GiB:.2f} GiB needed of {memory['available'] / GiB:.2f})"
    return "XLA ran out of HBM"


def _does_not_fit(result: StepPlan, capacity: int) -> str:
    size = result.memory.get("footprint")
    amount = f"needs {size / GiB:.2f} GiB of {capacity / GiB:.0f} GiB" if size else out_of_memory(result.memory)
    return (
        f"the step does not fit on one chip at batch 1 per chip ({amount}); try "
        "--config.model.attention_implementation=splash, --config.model.remat=True, or --config.mesh.fsdp=N with "
        "sharding_rules that split the frozen params (the sdxl preset's)"
    )
