"""Train an IP-Adapter: the loop. The same code runs on one CPU and on a multi-host TPU pod.

    ipadapter-jax train --config tiny --workdir out/tiny --config.data.path=DATA
    ipadapter-jax train --config sd15 --workdir runs/sd15 --config.model.base=... (pod: on every host, --multihost)

`train(config, workdir)` reads top to bottom: build the run (`run.build_run`: mesh, components, data, optimizer,
state restored or created sharded, the step compiled) -> the hooks (`hooks`) -> step, then call the hooks that
are due, until the total is reached or SIGTERM arrives -> the final export.

A run restarted with the same workdir resumes from its latest checkpoint: same params, optimizer state and data
order as if never interrupted. SIGTERM (preemption) finishes the current step, checkpoints it and raises
`Preempted` (the command's exit status 75). The adapter is exported in the official layout every
`export_every` steps (workdir/exports/) and at the end (workdir/ip-adapter.safetensors); an adapter design without
the official layout (`models.designs`) as ip-adapter.msgpack. The workdir may be a bucket (gs://): checkpoints,
metrics, TensorBoard events and exports are written there (`ipadapter_jax.paths`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import tqdm

from ipadapter_jax import locks, paths
from ipadapter_jax.training import checkpoint
from ipadapter_jax.training import hooks as hooks_lib
from ipadapter_jax.training.config import TrainConfig
from ipadapter_jax.training.run import Run, build_run
from ipadapter_jax.training.tensorboard import TensorBoard

WORKDIR_LOCK = ".train.lock"  # in the workdir, held by process 0 while a run writes there


class Preempted(RuntimeError):
    """SIGTERM arrived: the run checkpointed its last step and stopped; the same command resumes it."""


def train(config: TrainConfig | Mapping[str, Any], workdir: str) -> dict:
    """Runs (or resumes) training in `workdir`; returns the last logged metrics.

    `config`: a `TrainConfig`, or a ConfigDict of `training/configs` (validated here).
    Raises:
      ConfigError: an invalid config.  Preempted: SIGTERM.  NonFiniteLoss: on_nonfinite="stop" saw a NaN/inf.
    """
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_config_dict(config)
    paths.makedirs(workdir)
    with _workdir_lock(workdir), _Preemption() as preemption:
        run = build_run(config, workdir, log=_log)
        metrics = _metrics_log(run)
        periodic = _hooks(run, metrics)
        if run.first_step == 0 and run.held_out_loss is not None:
            metrics.write({"step": 0, "eval_loss": run.held_out_loss(run.state.adapter)})
        step = run.first_step
        try:
            preemption.defer()  # from here SIGTERM finishes the step and checkpoints it
            while step < config.total_steps and not preemption.requested:
                run.state, step_metrics = run.step(run.state, run.frozen, next(run.batches))
                step += 1
                metrics.record(step_metrics)
                info = hooks_lib.StepInfo(step, run.state, done=step >= config.total_steps or preemption.requested)
                for hook in (metrics, *periodic):
                    if hook.due(info):
                        hook(info)
        except hooks_lib.NonFiniteLoss as err:
            # Non-finite steps changed nothing but the step counter: this is the last good state.
            if run.checkpoints.latest_step() != step:
                checkpoint.save(run.checkpoints, step, run.state, run.batches.get_state(), force=True)
            raise hooks_lib.NonFiniteLoss(f"{err}; last good state saved at step {step} in {workdir}") from None
        finally:
            run.checkpoints.wait_until_finished()
            run.batches.close()
            for hook in (metrics, *periodic):
                hook.close()
        if step < config.total_steps:
            raise Preempted(f"SIGTERM: checkpointed step {step} in {workdir}; rerun the same command to resume")
        final = paths.join(workdir, hooks_lib.final_export(config.model.design))
        hooks_lib.export_adapter(run.state.adapter, final, _export_metadata(config), config.model.design)
    _log(f"exported {final}")
    return metrics.last


def _metrics_log(run: Run) -> hooks_lib.MetricsLog:
    config = run.config
    return hooks_lib.MetricsLog(
        run.workdir,
        config.log_every,
        run.global_batch,
        run.step_flops,
        run.first_step,
        config.total_steps,
        config.on_nonfinite,
        run.is_main,
        _log,
    )


@contextlib.contextmanager
def _workdir_lock(workdir: str) -> Iterator[None]:
    """Process 0 holds the workdir's lock for the run: a second run on the same workdir fails at once."""
    if jax.process_index() != 0:
        yield
        return
    with locks.locked(workdir, WORKDIR_LOCK, "`ipadapter-jax train` run"):
        yield


def _hooks(run: Run, metrics: hooks_lib.MetricsLog) -> list[Any]:
    """The periodic hooks after `metrics`, in the order they run."""
    config = run.config
    hooks: list[Any] = []
    if run.held_out_loss is not None:
        hooks.append(hooks_lib.HeldOutLoss(run.held_out_loss, config.eval_every, metrics))
    hooks.append(hooks_lib.Checkpoint(run.checkpoints, config.checkpoint_every, run.batches.get_state))
    hooks.append(hooks_lib.Export(run.workdir, config.export_every, _export_metadata(config), config.model.design))
    if config.profile_steps:
        hooks.append(hooks_lib.Profile(run.workdir, *config.profile_steps))
    if config.tensorboard:
        hooks.append(TensorBoard(run, metrics))
    return hooks


def _export_metadata(config: TrainConfig) -> dict[str, str]:
    return {"base_model": config.model.base, "image_encoder": config.model.image_encoder}


class _Preemption:
    """SIGTERM during the run: before the first step (loading, compiling) it ends the run at once with `Preempted`
    (nothing to checkpoint); once `defer`red, it sets `requested` and the loop checkpoints after the current step.
    The previous handler is restored on exit.

    The exception raised in the handler surfaces wherever the main thread is, and a library may swallow it there
    (jax turns an exception while reading its persistent compilation cache into a warning): `requested` is set
    either way, and `defer` raises it again."""

    def __init__(self) -> None:
        self.deferred, self.requested = False, False

    def defer(self) -> None:
        """From now on SIGTERM only sets `requested`; raises `Preempted` if one came (and was swallowed) before."""
        self.deferred = True
        if self.requested:
            raise Preempted("SIGTERM before the first step: nothing to checkpoint; rerun the same command to start")

    def __enter__(self) -> _Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, *_: object) -> None:
        self.requested = True
        if not self.deferred:
            raise Preempted("SIGTERM before the first step: nothing to checkpoint; rerun the same command to start")


def _log(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.tqdm.write(message, file=sys.stderr)
