"""Orbax checkpoints of a training run: the `TrainState` (adapter, optimizer, step, RNG) and the data position.

Layout: `<workdir>/checkpoints/<step>/{state,data}`; `max_to_keep` newest kept; saves are asynchronous
(the next steps run while the previous state is written). Restores always go through an abstract target
carrying the shardings of the current mesh, so optax's state structure survives and a run may resume on a
different device count. Every leaf, scalars included, must carry a NamedSharding of the mesh (the train
script places the state that way): multi-process saves need global arrays.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


def manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options, item_names=("state", "data")
    )


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, *, force: bool = False) -> None:
    """Starts an asynchronous save of `state` and the data iterator position at `step`."""
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        force=force,
    )


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """-> (state placed like `abstract_state`, data iterator state, step); latest step by default."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
    )
    return restored["state"], restored["data"], step
