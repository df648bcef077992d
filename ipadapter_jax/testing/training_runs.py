"""Training runs for the tests: a procedural dataset, the tiny preset with overrides, runs in this process or as
`ipadapter-jax train` subprocesses, and the final state of a workdir read back from its checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from ipadapter_jax import paths
from ipadapter_jax.data import builder, synthetic
from ipadapter_jax.presets import get_preset
from ipadapter_jax.training.hooks import METRICS_FILE

REPO = Path(__file__).resolve().parents[2]


def build_dataset(root: Path, num_images: int, seed: int) -> str:
    """`num_images` procedural 64 px images with captions, built into a dataset under `root`; returns its path."""
    captions = synthetic.write_dataset(str(root / "src"), num_images=num_images, size=64, seed=seed)
    path, _ = builder.build_dataset(captions, str(root / "src" / "images"), str(root / "built"))
    return path


def build_face_dataset(root: Path, num_images: int, seed: int, dim: int) -> tuple[str, np.ndarray]:
    """`build_dataset` whose entries also name identity embeddings: random float32 (dim,) vectors saved as
    `faces/<i>.npy` under the image root (the annotations' `face_embeds`). Returns (dataset path, the vectors
    (num_images, dim) in entry order)."""
    captions = synthetic.write_dataset(str(root / "src"), num_images=num_images, size=64, seed=seed)
    images = root / "src" / "images"
    (images / "faces").mkdir()
    embeds = np.random.default_rng(seed).standard_normal((num_images, dim)).astype(np.float32)
    with open(captions) as f:
        entries = json.load(f)
    for i, entry in enumerate(entries):
        np.save(images / "faces" / f"{i}.npy", embeds[i])
        entry["face_embeds"] = f"faces/{i}.npy"
    with open(captions, "w") as f:
        json.dump(entries, f)
    path, _ = builder.build_dataset(captions, str(images), str(root / "built"), progress=False)
    return path, embeds


def overrides(dataset: str, steps: int, per_device: int, **extra: object) -> list[str]:
    """`--config.*` flags of a short tiny-preset run on `dataset` (checkpoints and logs every 2 steps)."""
    flags = {
        "data.path": dataset,
        "total_steps": steps,
        "data.batch_size_per_device": per_device,
        "log_every": 2,
        "checkpoint_every": 2,
        "mesh.fsdp_min_size": 256,  # so the tiny adapter's kernels really are FSDP-split
        **extra,
    }
    return [f"--config.{k}={v}" for k, v in flags.items()]


def config(dataset: str, steps: int, per_device: int, **extra: object):
    """The tiny preset with `overrides(...)` applied, as the command line would (a ConfigDict)."""
    cfg = get_preset("tiny")
    for flag in overrides(dataset, steps, per_device, **extra):
        key, value = flag[len("--config.") :].split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = type(node[leaf])(value)
    return cfg


def train_subprocess(
    workdir: str, args: list[str], devices: int = 1, extra_env: dict | None = None
) -> subprocess.Popen:
    """`python -m ipadapter_jax.cli.train --workdir=... *args` on `devices` host devices (stdout+stderr piped)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(extra_env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "ipadapter_jax.cli.train", f"--workdir={workdir}", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def train_two_processes(workdir: str, args: list[str], devices: int = 4) -> None:
    """Two `train_subprocess`es of one run (jax.distributed on a free localhost port, `devices` each); both must
    succeed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [train_subprocess(workdir, [*args, *cluster, f"--process_id={i}"], devices=devices) for i in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out


def final_state(workdir: str) -> dict:
    """Flattened adapter, optimizer state and step of the latest checkpoint in `workdir` (numpy, any device count;
    local or gs://)."""
    root = paths.join(workdir, "checkpoints")
    step = max(int(d) for d in paths.listdir(root) if d.isdigit())
    path = paths.join(root, str(step), "state")
    metadata = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    state = ocp.StandardCheckpointer().restore(path, target)
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)  # ema=None (no EMA) has no leaves
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def step_flops(workdir: str) -> float:
    """The FLOPs of one whole (global) step that `workdir`'s metrics.jsonl reports (TFLOP/s over steps/s)."""
    records = [json.loads(line) for line in paths.read_text(paths.join(workdir, METRICS_FILE)).splitlines()]
    last = next(r for r in reversed(records) if "tflops_per_s" in r)
    return last["tflops_per_s"] * 1e12 / last["steps_per_s"]


def assert_states_close(actual: dict, expected: dict, rtol: float = 1e-5) -> None:
    """Every leaf within `rtol` of its max |value|; adapter params also pass within 1e-7 absolute (a thousandth of
    one 1e-4 AdamW update), which a tensor starting at zero (a bias) needs after few steps. rtol=0: bit for bit."""
    assert actual.keys() == expected.keys()
    bad = {}
    for key, want in expected.items():
        diff = np.abs(actual[key] - want).max()
        atol = 1e-7 if key.startswith("['adapter']") and rtol else 0.0
        if diff > atol + rtol * np.abs(want).max():
            bad[key] = f"{diff:.2e} (max |value| {np.abs(want).max():.2e})"
    assert not bad, bad
