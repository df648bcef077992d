"""`ipadapter-jax cache`: run the frozen encoders of a training config once over a built dataset.

    ipadapter-jax cache --config sd15 --config.model.base=SD15 --config.model.image_encoder=IMAGE_ENCODER \\
        --raw data/ip_adapter_captions/1.0.0 --out data/cache

Afterwards `--config.data.path=data/cache` trains on the stored encodings (VAE posterior mean and std, text
states, image embeddings; SDXL time ids), with the same results as training on the raw data. Interrupted passes
resume (finished chunks are kept). Run it on every host of a pod with `--multihost`.
"""

from __future__ import annotations

import sys

from absl import flags

from ipadapter_jax.cli import run_flags
from ipadapter_jax.cli.main import UsageError, exit_process, report_errors


def run(argv: list[str]) -> int:
    flag_values = flags.FlagValues()
    run_flags.define(flag_values, "cache", argv)
    flags.DEFINE_string("raw", None, "built dataset directory (ipadapter-jax data build)", flag_values=flag_values)
    flags.DEFINE_string("out", None, "cache directory to write", flag_values=flag_values)
    flags.DEFINE_string(
        "workdir", None, "scratch directory for loaded components (default: OUT/.components)", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "batch_size", 0, "examples per encoder call per host (default: 8 per device)", flag_values=flag_values
    )
    run_flags.parse(flag_values, "cache", argv)
    if not flag_values.raw or not flag_values.out:
        raise UsageError("--raw and --out are required")
    config = run_flags.train_config(flag_values)
    run_flags.check_storage(config, flag_values.raw, flag_values.out, flag_values.workdir)
    run_flags.initialize_distributed(flag_values)

    import jax

    import ipadapter_jax  # noqa: F401  (the log filter, before the models are imported)
    from ipadapter_jax import paths
    from ipadapter_jax.training.cache_encodings import build_cache

    batch_size = flag_values.batch_size or 8 * jax.local_device_count()
    workdir = flag_values.workdir or paths.join(flag_values.out, ".components")
    build_cache(config, flag_values.raw, flag_values.out, workdir, batch_size)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`ipadapter-jax cache` entry point; returns the exit status."""
    return report_errors(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    exit_process(main())
