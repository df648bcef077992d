"""Periodic work of a training run, one hook each: metrics, held-out loss, checkpoints, exports, profiling.

A hook runs after a step when that step is a multiple of its `every` or is the last of the run (`done`: the
total is reached or the run was preempted); `Profile` runs at its own two steps. Each is a small object, tested
alone, that the loop (`ipadapter_jax.training.loop`) calls in order:

    MetricsLog       metrics.jsonl (loss, grad/param norm, LR, images/s, TFLOP/s, MFU) and the progress bar;
                     raises `NonFiniteLoss` under on_nonfinite="stop"; passes each record to its `listeners`
    HeldOutLoss      the held-out batch's loss (fixed noise and timesteps) into metrics.jsonl
    Checkpoint       orbax checkpoints (asynchronous), with the data position
    Export           the adapter as an official .safetensors (workdir/exports/) that diffusers loads; a design
                     without the official layout as our .msgpack
    Profile          a jax.profiler trace of a step range into workdir/profile
    TensorBoard      event files in workdir/tensorboard (`ipadapter_jax.training.tensorboard`)

The workdir may be a bucket (gs://, `ipadapter_jax.paths`): metrics.jsonl is then rewritten whole at each record
(a bucket has no append), exports are single object uploads, and a profile is traced locally and uploaded.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from ipadapter_jax import paths, staging
from ipadapter_jax.models.designs import get_design
from ipadapter_jax.training import accelerators, checkpoint
from ipadapter_jax.weights.adapter_files import save_ip_adapter
from ipadapter_jax.weights.flax_adapter_file import SUFFIX, save_flax_adapter

METRICS_FILE = "metrics.jsonl"
FINAL_EXPORT = "ip-adapter.safetensors"


def export_suffix(design: str) -> str:
    """ ".safetensors" for an adapter design with the official layout, else ".msgpack" (`models.designs`)."""
    return ".safetensors" if get_design(design).official_layout else SUFFIX


def final_export(design: str) -> str:
    """The final export's file name in the workdir: FINAL_EXPORT, or ip-adapter.msgpack (no official layout)."""
    return "ip-adapter" + export_suffix(design)


class NonFiniteLoss(FloatingPointError):
    """A step had a non-finite loss or gradient and the config says on_nonfinite="stop"."""


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after a step: `step` steps are done; `done` marks the run's last step."""

    step: int
    state: Any  # TrainState
    done: bool


class Every:
    """Base of the periodic hooks: due every `every` steps and at the run's last step."""

    every: int = 1

    def due(self, info: StepInfo) -> bool:
        return info.step % self.every == 0 or info.done

    def __call__(self, info: StepInfo) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Releases what the hook holds at the end of the run (nothing, unless overridden)."""


class MetricsLog(Every):
    """Summarises the steps since the last log into one metrics.jsonl record (process 0 writes).

    On resume, records past the resumed step (logged after the checkpoint the run restarts from) are dropped,
    so the file stays one record per logged step, in order. Every written record also goes to each of `listeners`
    (process 0). In a bucket the file is rewritten whole at each record (one object upload: no append there).
    """

    def __init__(
        self,
        workdir: str,
        every: int,
        global_batch: int,
        step_flops: float,
        first_step: int,
        total_steps: int,
        on_nonfinite: str,
        is_main: bool,
        log: Callable[[str], None],
    ):
        self.every, self.global_batch, self.step_flops = every, global_batch, step_flops
        self.on_nonfinite, self.log, self.is_main = on_nonfinite, log, is_main
        self.path = paths.join(workdir, METRICS_FILE)
        self.pending: list[dict] = []
        self.last: dict = {}
        self.listeners: list[Callable[[dict], None]] = []
        self._start, self._steps = time.time(), 0
        self._lines = drop_records_after(self.path, first_step) if is_main else []
        self.bar = tqdm.tqdm(total=total_steps, initial=first_step, disable=not is_main, desc="train", unit="step")

    def record(self, metrics: dict) -> None:
        """Keeps one step's (device) metrics until the next log."""
        self.pending.append(metrics)
        self._steps += 1
        self.bar.update(1)

    def __call__(self, info: StepInfo) -> None:
        if not self.pending:
            return
        fetched = jax.device_get(self.pending)
        self.pending = []
        elapsed = time.time() - self._start
        self.last = summarise(fetched, info.step, self._steps, elapsed, self.global_batch, self.step_flops)
        self._start, self._steps = time.time(), 0
        self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", img_s=f"{self.last['images_per_s']:.1f}")
        self.write(self.last)
        if self.last["nonfinite_steps"]:
            message = f"{self.last['nonfinite_steps']} step(s) up to step {info.step} had a non-finite loss or gradient"
            if self.on_nonfinite == "stop":
                raise NonFiniteLoss(message)
            self.log(message + " (skipped: on_nonfinite=skip)")

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        line = json.dumps(record) + "\n"
        if paths.is_remote(self.path):
            self._lines.append(line)
            paths.write_text(self.path, "".join(self._lines))
        else:
            with open(self.path, "a") as f:
                f.write(line)
        for listener in self.listeners:
            listener(record)

    def close(self) -> None:
        """Closes the progress bar."""
        self.bar.close()


class HeldOutLoss(Every):
    """The held-out batch's loss under the current adapter, logged as {"step", "eval_loss"} (process 0 writes;
    every process computes, since the adapter may be FSDP-split)."""

    def __init__(self, loss: Callable[[Any], float], every: int, metrics: MetricsLog):
        self.loss, self.every, self.metrics = loss, every, metrics

    def __call__(self, info: StepInfo) -> None:
        self.metrics.write({"step": info.step, "eval_loss": self.loss(info.state.adapter)})


class Checkpoint(Every):
    """An asynchronous orbax checkpoint of the state and the data position (the last one forced)."""

    def __init__(self, manager: Any, every: int, data_state: Callable[[], dict]):
        self.manager, self.every, self.data_state = manager, every, data_state

    def __call__(self, info: StepInfo) -> None:
        checkpoint.save(self.manager, info.step, info.state, self.data_state(), force=info.done)


class Export(Every):
    """The adapter as an official .safetensors at workdir/exports/ip-adapter_<step>.safetensors, or .msgpack for a
    design without the official layout (not at the run's last step: the final export is `final_export`)."""

    def __init__(self, workdir: str, every: int, metadata: dict[str, str], design: str = "decoupled"):
        self.workdir, self.every, self.metadata, self.design = workdir, every, metadata, design

    def due(self, info: StepInfo) -> bool:
        return info.step % self.every == 0 and not info.done

    def __call__(self, info: StepInfo) -> None:
        path = paths.join(self.workdir, "exports", f"ip-adapter_{info.step:08d}{export_suffix(self.design)}")
        export_adapter(info.state.adapter, path, self.metadata, self.design)


class Profile:
    """A jax.profiler trace of steps first+1 .. last into workdir/profile (for a bucket: traced into its local
    mirror, then uploaded)."""

    def __init__(self, workdir: str, first: int, last: int):
        self.path, self.first, self.last, self.active = paths.join(workdir, "profile"), first, last, False

    def due(self, info: StepInfo) -> bool:
        return info.step in (self.first, self.last) or (self.active and info.done)

    def __call__(self, info: StepInfo) -> None:
        if not self.active and info.step == self.first and not info.done:
            jax.profiler.start_trace(staging.mirror(self.path))
            self.active = True
        elif self.active:
            jax.profiler.stop_trace()
            self.active = False
            if paths.is_remote(self.path):
                staging.upload(staging.mirror(self.path), self.path, what="profile", progress=False)

    def close(self) -> None:
        """Stops a trace still running (a run that ended inside the range)."""
        if self.active:
            self(StepInfo(self.last, None, done=True))


def export_adapter(adapter: Any, path: str, metadata: dict[str, str], design: str = "decoupled") -> None:
    """Writes the adapter of `design` as an official `.safetensors` (diffusers' `load_ip_adapter` reads it) or, for a
    `path` ending in .msgpack, as our Flax file (which records the design).

    Every process takes part in gathering FSDP-split params; process 0 writes.
    Raises:
      ConversionError: a .safetensors path for a design without the official layout.
    """
    host_adapter = multihost_utils.process_allgather(adapter, tiled=True)
    if jax.process_index() == 0:
        paths.makedirs(paths.parent(path))
        if path.endswith(SUFFIX):
            save_flax_adapter(host_adapter, path, metadata=metadata, design=design)
        else:
            save_ip_adapter(host_adapter, path, metadata=metadata, design=design)


def summarise(fetched: list[dict], step: int, steps: int, elapsed: float, global_batch: int, step_flops: float) -> dict:
    """One metrics record from the per-step metrics of the steps since the last one."""
    finite = [m for m in fetched if int(m["finite"])]
    summary = {
        "step": step,
        "loss": float(np.mean([m["loss"] for m in finite])) if finite else float("nan"),
        "grad_norm": float(np.mean([m["grad_norm"] for m in finite])) if finite else float("nan"),
        "param_norm": float(fetched[-1]["param_norm"]),
        "learning_rate": float(fetched[-1]["learning_rate"]),
        "nonfinite_steps": len(fetched) - len(finite),
        "steps_per_s": steps / elapsed,
        "images_per_s": steps * global_batch / elapsed,
        "tflops_per_s": steps * step_flops / elapsed / 1e12,
    }
    peak = accelerators.peak_flops(jax.devices()[0].device_kind)  # unknown devices (CPUs): no MFU
    if peak:
        summary["mfu"] = summary["tflops_per_s"] * 1e12 / (peak * jax.device_count())
    return summary


def drop_records_after(path: str, step: int) -> list[str]:
    """Rewrites a metrics.jsonl (local or in a bucket) without the records of steps after `step`, atomically;
    returns the lines kept (no file: none)."""
    if not paths.exists(path):
        return []
    lines = [line + "\n" for line in paths.read_text(path).splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        paths.write_text(path, "".join(kept))
    return kept
