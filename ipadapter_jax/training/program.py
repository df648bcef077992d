"""The training step as a program: its function, where every array lives, and its compilation.

`step_program(config, comps, cached, mesh)` needs only the shapes of the components' params (concrete arrays or
`jax.ShapeDtypeStruct`s), so the same code builds the step a run executes (`ipadapter_jax.training.run`) and the
step compiled ahead of time for a device topology that is not attached (`ipadapter-jax plan`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from ipadapter_jax import sharding
from ipadapter_jax.training.components import Components
from ipadapter_jax.training.config import TrainConfig
from ipadapter_jax.training.step import init_train_state, make_train_step


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """The step `(state, frozen, batch) -> (state, metrics)` of a run, with its placements.

    `shardings["state"]` / `["frozen"]`: NamedSharding trees from the config's `sharding_rules`; batches are split
    over every device (`sharding.batch_sharding`). `initial_state(adapter)` makes step 0's state.
    """

    mesh: Mesh
    step: Callable[[Any, dict, dict], tuple[Any, dict]]
    initial_state: Callable[[Any], Any]
    abstract_state: Any
    shardings: dict

    def create_state(self, adapter: Any) -> Any:
        """Step 0's state, created already sharded (no full host copy of the optimizer state)."""
        return jax.jit(self.initial_state, out_shardings=self.shardings["state"])(adapter)

    def state_target(self) -> Any:
        """The state as ShapeDtypeStructs with their shardings (what a checkpoint is restored into)."""
        return _with_shardings(self.abstract_state, self.shardings["state"])

    def compile(self, state: Any, frozen: dict, batch: dict) -> Any:
        """Compiles the step ahead of time for these arguments (arrays or ShapeDtypeStructs with shardings); the
        state's buffers are donated to the update. Traced under the mesh (`jax.set_mesh`): kernels that run per
        device shard (splash attention) find it there."""
        jitted = jax.jit(
            self.step,
            in_shardings=(self.shardings["state"], self.shardings["frozen"], jax.tree.map(lambda x: x.sharding, batch)),
            out_shardings=(self.shardings["state"], sharding.replicated(self.mesh)),
            donate_argnums=(0,),
        )
        with jax.set_mesh(self.mesh):
            return jitted.lower(state, frozen, batch).compile()


def step_program(config: TrainConfig, comps: Components, frozen: dict, cached: bool, mesh: Mesh) -> StepProgram:
    """The step of `config` for `comps` (their modules and initial adapter) and the frozen tree the step reads
    (`frozen`: concrete or abstract); `cached`: batches come from an embedding cache (else raw, encoded in the
    step)."""
    optimizer, schedule = config.optim.build()
    train_step = make_train_step(
        comps.models,
        optimizer,
        schedule,
        config.loss_config(),
        ema_decay=config.ema_decay,
        grad_accum_steps=config.optim.grad_accum_steps,
        encoders=None if cached else comps.encoders,
    )

    def initial_state(adapter: Any) -> Any:
        return init_train_state(adapter, optimizer, config.seed, config.ema_decay)

    # Placement by the config's rules over {"state": ..., "frozen": ...} paths.
    abstract = {"state": jax.eval_shape(initial_state, comps.adapter), "frozen": frozen}
    shardings = sharding.named_shardings(abstract, mesh, config.sharding_rules, config.mesh.fsdp_min_size)
    return StepProgram(mesh, train_step, initial_state, abstract["state"], shardings)


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), tree, shardings)
