"""The pod launcher (training/launch_tpu_pod.py) in dry-run mode: the exact gcloud command lines it would run, and
its preemption reruns with a stand-in `gcloud` on PATH (a script that records its calls; nothing leaves this host)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "launch_tpu_pod.py"
TARGET = ["--tpu", "pod-1", "--zone", "us-central2-b", "--project", "my-proj"]
SSH = "gcloud compute tpus tpu-vm ssh pod-1 --zone us-central2-b --project my-proj --worker=all --command"


def _launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
    )


def test_dry_run_prints_the_install_and_train_lines():
    result = _launch(*TARGET, "--config", "sd15", "--workdir", "gs://b/runs/sd15", "--config.data.path=gs://b/cache",
                     "--config.total_steps=1000")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{SSH} 'python3 -m pip install --upgrade '\"'\"'ipadapter-jax[tpu]'\"'\"''",
        f"{SSH} 'python3 -m ipadapter_jax train --multihost --config sd15 --workdir gs://b/runs/sd15 "
        "--config.data.path=gs://b/cache --config.total_steps=1000'",
    ]


def test_a_local_wheel_and_config_file_are_copied_to_every_host(tmp_path):
    wheel = tmp_path / "ipadapter_jax-0.1.0-py3-none-any.whl"
    config = tmp_path / "my_config.py"
    wheel.write_bytes(b"")
    config.write_text("")
    result = _launch(*TARGET, "--config", str(config), "--workdir", "gs://b/run", "--package", str(wheel))
    assert result.returncode == 0, result.stderr
    scp = "gcloud compute tpus tpu-vm scp"
    assert result.stdout.splitlines() == [
        f"{scp} {wheel} pod-1: --zone us-central2-b --project my-proj --worker=all",
        f"{scp} {config} pod-1: --zone us-central2-b --project my-proj --worker=all",
        f"{SSH} 'python3 -m pip install --upgrade '\"'\"'./ipadapter_jax-0.1.0-py3-none-any.whl[tpu]'\"'\"''",
        f"{SSH} 'python3 -m ipadapter_jax train --multihost --config ./my_config.py --workdir gs://b/run'",
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "sd15", "--workdir", "runs/sd15"], "the hosts of a pod share nothing but a bucket"),
        (["--config", "sd15", "--workdir", "gs://b/r", "--steps=3"], "unrecognized arguments: --steps=3"),
    ],
)
def test_bad_arguments_are_one_usage_error(argv, message):
    result = _launch(*TARGET, *argv)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]


def test_run_reruns_a_preempted_train_command_until_it_succeeds(tmp_path):
    """A stand-in gcloud: the install succeeds, the train command exits 75 twice (preempted), then 0."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'case "$*" in *" train "*) n=$(grep -c " train " ' + str(calls) + '); [ "$n" -le 2 ] && exit 75;; esac\n'
        "exit 0\n"
    )
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    result = _launch(*TARGET, "--config", "tiny", "--workdir", "gs://b/r", "--run", "--restart-delay", "0", env=env)
    assert result.returncode == 0, result.stderr
    lines = calls.read_text().splitlines()
    assert [("install" in line, " train " in line) for line in lines] == [(True, False)] + [(False, True)] * 3
    assert result.stderr.count("preempted (SIGTERM): rerunning") == 2


def test_run_gives_up_after_max_restarts(tmp_path):
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\ncase "$*" in *" train "*) exit 255;; esac\nexit 0\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    result = _launch(*TARGET, "--config", "tiny", "--workdir", "gs://b/r", "--run", "--restart-delay", "0",
                     "--max-restarts", "1", env=env)  # fmt: skip
    assert result.returncode == 255
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the train command stopped: exit status 255 (a host lost?); 1 reruns spent. Run this script again "
        "to resume from gs://b/r"
    )
