"""Train on a Cloud TPU pod slice: install the package on every host, then start the same `train --multihost` on all.

    python training/launch_tpu_pod.py --tpu NAME --zone ZONE --project PROJECT \\
        --config sd15 --workdir gs://BUCKET/runs/sd15 --config.data.path=gs://BUCKET/data/cache ...   # prints
    python training/launch_tpu_pod.py ... --run                                                       # executes

Prints (or with `--run` executes) `gcloud compute tpus tpu-vm ssh NAME --worker=all` command lines: one that
installs the package (`--package`, a pip requirement; a local wheel is first copied to every host with `tpu-vm
scp`, and so is a local `--config` file), and one that starts `python3 -m ipadapter_jax train --multihost` with the
same config, workdir and `--config.*` overrides on every host (jax.distributed finds the other hosts itself). The
workdir must be a bucket (gs://): it is the only place all hosts share.

Preemption: the train command exits 75 after SIGTERM (its last step checkpointed in the bucket) and a lost host ends
the ssh with another status. With `--run` the train line is repeated, up to `--max-restarts` times, after
`--restart-delay` seconds; each repetition resumes from the workdir's latest checkpoint. A slice that was deleted
(spot/preemptible TPUs) has to be created again first; running this script again then resumes the same way.
Needs only the standard library and the gcloud CLI on the machine it runs on.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

EXIT_PREEMPTED = 75  # `ipadapter-jax train` after SIGTERM (ipadapter_jax/cli/main.py)
DEFAULT_PACKAGE = "ipadapter-jax[tpu]"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the launcher's arguments, the `--config.*` overrides passed on to `train`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tpu", required=True, help="TPU VM (pod slice) name")
    parser.add_argument("--zone", required=True, help="its zone, e.g. us-central2-b")
    parser.add_argument("--project", required=True, help="its Google Cloud project")
    parser.add_argument("--config", required=True, help="a preset (tiny, demo, sd15, sd15_plus, sdxl) or a config file")
    parser.add_argument("--workdir", required=True, help="the run's folder in a bucket: gs://BUCKET/...")
    parser.add_argument(
        "--package",
        default=DEFAULT_PACKAGE,
        help=f"pip requirement or local wheel to install (default {DEFAULT_PACKAGE})",
    )
    parser.add_argument("--run", action="store_true", help="execute the commands (default: print them)")
    parser.add_argument("--max-restarts", type=int, default=3, help="reruns of an interrupted train command")
    parser.add_argument("--restart-delay", type=float, default=60.0, help="seconds before a rerun")
    args, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if not arg.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (only --config.* overrides pass through)")
    if not args.workdir.startswith("gs://"):
        parser.error(f"--workdir {args.workdir}: the hosts of a pod share nothing but a bucket; give gs://BUCKET/...")
    return args, rest


def _ssh(args: argparse.Namespace, remote: list[str]) -> list[str]:
    target = ["--zone", args.zone, "--project", args.project, "--worker=all"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, *target, "--command", shlex.join(remote)]


def _scp(args: argparse.Namespace, local: str) -> list[str]:
    target = ["--zone", args.zone, "--project", args.project, "--worker=all"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{args.tpu}:", *target]


def commands(args: argparse.Namespace, overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """(the set-up command lines: copies and the install, the train command line), each an argv list."""
    setup, package, config = [], args.package, args.config
    if package.endswith(".whl") and os.path.isfile(package):  # a wheel built here: copied to each host's home
        setup.append(_scp(args, package))
        package = f"./{os.path.basename(package)}[tpu]"
    if os.path.isfile(config):  # a config file of this machine: copied too
        setup.append(_scp(args, config))
        config = f"./{os.path.basename(config)}"
    setup.append(_ssh(args, ["python3", "-m", "pip", "install", "--upgrade", package]))
    train = ["python3", "-m", "ipadapter_jax", "train", "--multihost", "--config", config, "--workdir", args.workdir]
    return setup, _ssh(args, [*train, *overrides])


def launch(args: argparse.Namespace, setup: list[list[str]], train: list[str]) -> int:
    """Runs the set-up lines, then the train line until it succeeds or `--max-restarts` reruns are spent."""
    for line in setup:
        print(f"$ {shlex.join(line)}", flush=True)
        status = subprocess.call(line)
        if status:
            print(f"error: exit status {status} from: {shlex.join(line)}", file=sys.stderr)
            return status
    for attempt in range(args.max_restarts + 1):
        print(f"$ {shlex.join(train)}", flush=True)
        status = subprocess.call(train)
        if status == 0:
            return 0
        cause = "preempted (SIGTERM)" if status == EXIT_PREEMPTED else f"exit status {status} (a host lost?)"
        if attempt == args.max_restarts:
            print(f"error: the train command stopped: {cause}; {args.max_restarts} reruns spent. Run this script "
                  f"again to resume from {args.workdir}", file=sys.stderr)  # fmt: skip
            return status
        print(f"{cause}: rerunning in {args.restart_delay:g} s (resumes from {args.workdir})", file=sys.stderr)
        time.sleep(args.restart_delay)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Prints the command lines, or with `--run` executes them; returns the exit status."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    setup, train = commands(args, overrides)
    if args.run:
        return launch(args, setup, train)
    for line in [*setup, train]:
        print(shlex.join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
