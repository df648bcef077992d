"""`ipadapter-jax train`: train (or resume) an IP-Adapter in a workdir.

    ipadapter-jax train --config tiny --workdir out/tiny --config.data.path=DATA
    ipadapter-jax train --config sd15 --workdir gs://BUCKET/runs/sd15 --config.model.base=SD15 \\
        --config.model.image_encoder=IMAGE_ENCODER --config.data.path=data/cache     (pod: on every host, --multihost)

Exit status 75 after SIGTERM (the last step is checkpointed: rerun the same command to resume); see
`ipadapter_jax.cli.main` for the others.
"""

from __future__ import annotations

import sys

from absl import flags

from ipadapter_jax.cli import run_flags
from ipadapter_jax.cli.main import EXIT_PREEMPTED, UsageError, exit_process, report_errors


def run(argv: list[str]) -> int:
    flag_values = flags.FlagValues()
    run_flags.define(flag_values, "train", argv)
    flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, exports)", flag_values=flag_values)
    run_flags.parse(flag_values, "train", argv)
    if not flag_values.workdir:
        raise UsageError("--workdir is required")
    config = run_flags.train_config(flag_values)  # validated before anything is loaded
    run_flags.check_storage(config, flag_values.workdir)
    run_flags.initialize_distributed(flag_values)

    import ipadapter_jax  # noqa: F401  (the log filter, before the models are imported)
    from ipadapter_jax.training.loop import Preempted, train

    try:
        train(config, flag_values.workdir)
    except Preempted as err:
        print(err, file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def main(argv: list[str] | None = None) -> int:
    """`ipadapter-jax train` entry point; returns the exit status."""
    return report_errors(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    exit_process(main())
