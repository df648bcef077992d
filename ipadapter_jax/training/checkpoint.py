"""Orbax checkpoints of a training run: the `TrainState` (adapter, optimizer, step, RNG), the data position, and a
fingerprint of the state that every restore verifies.

Layout: `<workdir>/checkpoints/<step>/{state,data,fingerprint}` (local or gs://); `max_to_keep` newest kept; saves are
asynchronous (the next steps run while the previous state is written); temporary folders of saves that never
finished (a kill, a full disk) are removed when the manager opens. Restores go through an abstract target carrying
the shardings of the current mesh, so optax's state structure survives and a run may resume on a different device
count. Every leaf, scalars included, must carry a NamedSharding of the mesh: multi-process saves need global arrays.

Integrity. `fingerprint(state)` is computed on the devices, for every leaf, as two wrapping uint32 sums over the
leaf's bits (plain, and weighted by position): exact integer arithmetic, so the same for any sharding or device
count, and changed by any flipped bit or truncated write. A save refuses a state that is not finite (a diverged
state is never kept as "good"). `restore` tries the newest checkpoint first; one that fails to read, whose
fingerprint differs or whose values are not finite is moved to `<workdir>/corrupt_checkpoints/` with a one-line
warning naming it, and the next older one is tried.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ipadapter_jax import paths

logger = logging.getLogger(__name__)

ITEMS = ("state", "data", "fingerprint")
CORRUPT_DIR = "corrupt_checkpoints"


class NoIntactCheckpoint(RuntimeError):
    """Every checkpoint of the workdir failed its checks (each was moved aside with a warning)."""


def manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(_directory(workdir), options=options, item_names=ITEMS)


def fingerprint(state: Any) -> dict[str, list[int]]:
    """{leaf path: [sum of its bits, position-weighted sum]} as wrapping uint32 sums (see the module docstring)."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    sums = _fingerprint([leaf for _, leaf in leaves])
    return {jax.tree_util.keystr(path): [int(a), int(b)] for (path, _), (a, b) in zip(leaves, jax.device_get(sums))}


def is_finite(state: Any) -> bool:
    """Whether every floating-point leaf of `state` is finite (computed on the devices)."""
    return bool(_all_finite(jax.tree.leaves(state)))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, *, force: bool = False) -> None:
    """Starts an asynchronous save of `state`, the data iterator position and the state's fingerprint at `step`.

    Raises:
      FloatingPointError: the state holds NaN/inf values (it is not saved).
    """
    if not is_finite(state):
        raise FloatingPointError(f"refusing to checkpoint step {step}: the training state holds NaN/inf values")
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            fingerprint=ocp.args.JsonSave(fingerprint(state)),
        ),
        force=force,
    )


def restore(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict, int]:
    """-> (state placed like `abstract_state`, data iterator state, step) of the newest intact checkpoint.

    Raises:
      NoIntactCheckpoint: no checkpoint passed its checks (each failing one was moved aside).
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        # Checkpoints written before fingerprints existed are restored unverified (their values still checked).
        verified = paths.is_dir(paths.join(os.fspath(mngr.directory), str(step), "fingerprint"))
        items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        if verified:
            items["fingerprint"] = ocp.args.JsonRestore()
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
            problem = _problem(restored["state"], restored["fingerprint"] if verified else None)
        except Exception as err:  # noqa: BLE001  (orbax/tensorstore raise many types for damaged files)
            problem = f"unreadable ({type(err).__name__}: {' '.join(str(err).split())[:300]})"
        if problem is None:
            return restored["state"], restored["data"], step
        moved = _move_aside(mngr, step)
        logger.warning("checkpoint step %d is corrupt: %s; moved to %s, trying the previous one", step, problem, moved)
    raise NoIntactCheckpoint(
        f"no intact checkpoint in {mngr.directory}: every one failed its checks (moved to {CORRUPT_DIR}/). Delete the "
        "checkpoints folder to start over"
    )


def _problem(state: Any, stored: dict | None) -> str | None:
    if stored is None:
        logger.warning("checkpoint without a fingerprint (an older version wrote it): restored unverified")
        return None if is_finite(state) else "holds NaN/inf values"
    found = fingerprint(state)
    differ = sorted(path for path in stored if found.get(path) != stored[path])
    if differ or set(found) != set(stored):
        return f"fingerprint differs in {len(differ)} array(s), e.g. {differ[:2]}"
    if not is_finite(state):
        return "holds NaN/inf values"
    return None


def _move_aside(mngr: ocp.CheckpointManager, step: int) -> str:
    """Moves the checkpoint of `step` to the workdir's corrupt_checkpoints/ (process 0) and reloads the manager."""
    source = paths.join(os.fspath(mngr.directory), str(step))
    target = paths.join(paths.parent(os.fspath(mngr.directory)), CORRUPT_DIR, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
        paths.move(source, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"checkpoint_moved_aside_{step}")
    mngr.reload()
    return target


def _directory(workdir: str) -> str:
    """workdir/checkpoints: orbax writes a bucket folder (gs://) directly (tensorstore's gcs driver)."""
    return paths.join(workdir if paths.is_remote(workdir) else os.path.abspath(workdir), "checkpoints")


@jax.jit
def _fingerprint(leaves: list[jax.Array]) -> list[jax.Array]:
    sums = []
    for leaf in leaves:
        bits = _as_uint32(leaf)
        weights = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape) * np.uint32(2654435761) + np.uint32(1)
        sums.append(jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)]))
    return sums


def _as_uint32(leaf: jax.Array) -> jax.Array:
    """The leaf's bits as uint32 values, one per element (narrower types widened, 64-bit ones folded)."""
    if leaf.dtype == jnp.bool_:
        return leaf.astype(jnp.uint32)
    width = leaf.dtype.itemsize
    if width == 4:
        return jax.lax.bitcast_convert_type(leaf, jnp.uint32)
    if width == 2:
        return jax.lax.bitcast_convert_type(leaf, jnp.uint16).astype(jnp.uint32)
    if width == 1:
        return jax.lax.bitcast_convert_type(leaf, jnp.uint8).astype(jnp.uint32)
    halves = jax.lax.bitcast_convert_type(leaf, jnp.uint32)  # 8 bytes -> (..., 2)
    return halves[..., 0] ^ (halves[..., 1] * np.uint32(2246822519))


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)
