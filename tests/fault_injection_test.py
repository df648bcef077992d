"""Nothing lost, ever: training killed at random points (also during asynchronous checkpoint writes), a corrupt
newest checkpoint, a full disk, two trainers on one workdir, a diverging run: after each, the run resumes to the
same final adapter and optimizer state as an uninterrupted run, bit for bit.

Tiny preset on a procedural dataset, a few steps with a checkpoint at every step; `ipadapter-jax train` runs as
a subprocess where a process has to die.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ipadapter_jax.cli.main import EXIT_RUNTIME_ERROR
from ipadapter_jax.testing import training_runs as runs
from ipadapter_jax.training import checkpoint
from ipadapter_jax.training.config import ConfigError
from ipadapter_jax.training.hooks import NonFiniteLoss
from ipadapter_jax.training.loop import WORKDIR_LOCK, train

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS, BATCH = 6, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return runs.build_dataset(tmp_path_factory.mktemp("data"), num_images=16, seed=0)


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory) -> dict:
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    train(runs.config(dataset, STEPS, BATCH, checkpoint_every=1), workdir)
    return runs.final_state(workdir)


def _args(dataset: str, steps: int = STEPS, **extra) -> list[str]:
    return runs.overrides(dataset, steps, BATCH, checkpoint_every=1, log_every=1, **extra)


def _wait_until(ready: Callable[[], bool], process: subprocess.Popen, timeout: float = 300) -> None:
    """Until `ready()`, `process` ends or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)


def _wait_for(path: str, process: subprocess.Popen) -> None:
    _wait_until(lambda: os.path.exists(path) and os.path.getsize(path) > 0, process)


def _logged_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line)["step"] for line in open(path) if line.endswith("\n") and '"loss"' in line]


def test_killed_at_random_points_then_resumed_equals_uninterrupted(dataset, uninterrupted, tmp_path):
    """SIGKILL three times at random moments of the run (after a random step's record, a random part of a step
    later: with a checkpoint after every step, the kills land in and between asynchronous writes), then the same
    command runs to the end. Every run is the same command, so a kill that comes late never trains past STEPS."""
    workdir, rng = str(tmp_path / "killed"), random.Random(0)
    for after_step in sorted(rng.sample(range(1, STEPS), 3)):
        proc = runs.train_subprocess(workdir, _args(dataset))
        _wait_until(lambda step=after_step: max(_logged_steps(workdir), default=0) >= step, proc)
        time.sleep(rng.uniform(0.0, 0.5))
        running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        assert running, f"the run ended before the kill after step {after_step}: {out}"
    done = runs.train_subprocess(workdir, _args(dataset))
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out
    assert not any(".orbax-checkpoint-tmp" in name for name in os.listdir(os.path.join(workdir, "checkpoints")))
    runs.assert_states_close(runs.final_state(workdir), uninterrupted, rtol=0)
    steps = _logged_steps(workdir)
    assert steps == list(range(1, STEPS + 1)), steps  # no missing, duplicate or out-of-order records
    with pytest.raises(ConfigError, match=f"checkpoint of step {STEPS}, past total_steps={STEPS - 1}: this run"):
        train(runs.config(dataset, STEPS - 1, BATCH, checkpoint_every=1), workdir)


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "delete_metadata"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(dataset, uninterrupted, tmp_path, caplog, damage):
    workdir = str(tmp_path / "run")
    train(runs.config(dataset, STEPS - 2, BATCH, checkpoint_every=1), workdir)
    newest = Path(workdir, "checkpoints", str(STEPS - 2), "state")
    files = sorted((f for f in newest.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    if damage == "delete_metadata":
        (newest / "_METADATA").unlink()
    elif damage == "truncate":
        files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 2])
    else:  # a few flipped bytes in the middle of the largest data file: values change, the file still reads
        data = bytearray(files[-1].read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 4):
            data[i] ^= 0x40
        files[-1].write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        train(runs.config(dataset, STEPS, BATCH, checkpoint_every=1), workdir)
    warnings = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"checkpoint step {STEPS - 2} is corrupt"), warnings
    assert len(os.listdir(os.path.join(workdir, checkpoint.CORRUPT_DIR))) == 1
    runs.assert_states_close(runs.final_state(workdir), uninterrupted, rtol=0)


def test_a_second_trainer_on_the_same_workdir_fails_at_once(dataset, tmp_path):
    workdir = str(tmp_path / "shared")
    first = runs.train_subprocess(workdir, _args(dataset, steps=1000))
    _wait_for(os.path.join(workdir, WORKDIR_LOCK), first)
    start = time.time()
    second = runs.train_subprocess(workdir, _args(dataset, **{"optim.lr": 5e-4}))
    out, _ = second.communicate(timeout=120)
    assert second.returncode == EXIT_RUNTIME_ERROR and time.time() - start < 60, out
    assert f"{os.path.join(workdir, WORKDIR_LOCK)}: the folder is locked by pid {first.pid}" in out
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
    assert not os.path.exists(os.path.join(workdir, WORKDIR_LOCK))  # released at the end of the run


def test_a_diverging_run_stops_again_when_rerun(dataset, tmp_path):
    """on_nonfinite="stop": the last good state is saved at the step the data reached (state.step counts the
    skipped steps too). Rerunning the command resumes there (past the batches that diverged) instead of failing on
    an existing checkpoint step, and stops again at the next non-finite step with the same good state."""
    workdir = str(tmp_path / "diverging")
    config = runs.config(dataset, STEPS, BATCH, checkpoint_every=1, log_every=2, **{"optim.lr": 1e8})
    stops, states = [], []
    for _ in range(2):
        with pytest.raises(NonFiniteLoss, match="last good state saved at step") as err:
            train(config, workdir)
        stops.append(int(str(err.value).split("saved at step ")[1].split()[0]))
        states.append(runs.final_state(workdir))
        assert int(states[-1]["['step']"]) == stops[-1]
    assert stops[0] < stops[1] <= STEPS
    unchanged = {k: v for k, v in states[1].items() if k != "['step']"}
    runs.assert_states_close(unchanged, {k: v for k, v in states[0].items() if k != "['step']"}, rtol=0)


def test_skipped_steps_keep_the_checkpoint_step_equal_to_the_data_position(dataset, tmp_path):
    workdir = str(tmp_path / "skipping")
    config = runs.config(
        dataset, STEPS, BATCH, checkpoint_every=1, log_every=1, on_nonfinite="skip", **{"optim.lr": 1e8}
    )
    last = train(config, workdir)
    assert last["step"] == STEPS and int(runs.final_state(workdir)["['step']"]) == STEPS


def test_a_full_disk_keeps_the_earlier_checkpoints_and_the_rerun_finishes(dataset, uninterrupted, tmp_path):
    """The workdir on a tmpfs that fills up right after the first checkpoint: training fails with one error line
    and exit status 1, the checkpoint written before stays intact; with room again, the same command finishes like
    an uninterrupted run."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): needs root in a container "
            "that allows mounts"
        )
    try:
        workdir = str(mount / "run")
        proc = runs.train_subprocess(workdir, _args(dataset, steps=1000))
        _wait_for(os.path.join(workdir, "checkpoints", "1", "_CHECKPOINT_METADATA"), proc)
        with open(mount / "filler", "wb") as filler:  # the disk is full from here on
            with pytest.raises(OSError):
                while True:
                    filler.write(b"\0" * 2**20)
                    filler.flush()
        out, _ = proc.communicate(timeout=600)
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert proc.returncode == EXIT_RUNTIME_ERROR and len(errors) == 1, out
        assert "No space left on device" in errors[0] and "Traceback" not in out, out
        saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
        assert saved and saved[-1] < STEPS, (saved, out)
        (mount / "filler").unlink()
        done = runs.train_subprocess(workdir, _args(dataset))
        out, _ = done.communicate(timeout=600)
        assert done.returncode == 0, out
        assert not any(".orbax-checkpoint-tmp" in name for name in os.listdir(os.path.join(workdir, "checkpoints")))
        runs.assert_states_close(runs.final_state(workdir), uninterrupted, rtol=0)
    finally:
        shutil.rmtree(mount / "run", ignore_errors=True)
        subprocess.run(["umount", str(mount)], capture_output=True)
