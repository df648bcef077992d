"""Flags shared by the commands that run a training config (`train`, `cache`): the config and multi-process set-up.

`--config` takes a preset name (`tiny`, `demo`, `sd15`, `sd15_plus`, `sdxl`: `ipadapter_jax.presets`, the files of
`training/configs/`) or the path of a config file defining `get_config()`; `--config.x.y=v` overrides one field.
The ConfigDict is validated once (`TrainConfig.from_config_dict`) before any work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
from absl import flags
from ml_collections import config_flags

from ipadapter_jax import paths
from ipadapter_jax.cli.main import UsageError
from ipadapter_jax.presets import PRESETS, preset_path
from ipadapter_jax.training.config import TrainConfig


def define(flag_values: flags.FlagValues, command: str, argv: list[str]) -> None:
    """`--config PRESET_OR_FILE` (+ `--config.x.y=v` overrides, found in `argv`) and the multi-process flags."""
    with _as_usage_errors():
        config_flags.DEFINE_config_file(
            "config",
            preset_path("tiny"),
            f"a preset ({', '.join(PRESETS)}) or a config file",
            flag_values=flag_values,
            sys_argv=[command] + _presets_to_paths(argv),  # ml_collections reads overrides here
        )
    flags.DEFINE_bool(
        "multihost", False, "call jax.distributed.initialize() (TPU pods, SLURM, ...)", flag_values=flag_values
    )
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 (explicit multi-process)", flag_values=flag_values
    )
    flags.DEFINE_integer("num_processes", None, "number of processes (explicit multi-process)", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "this process's id (explicit multi-process)", flag_values=flag_values)


def parse(flag_values: flags.FlagValues, command: str, argv: list[str]) -> None:
    """Parses `argv` (without the command name); `-h`/`--help` prints the flags and exits.

    Raises:
      UsageError: unknown flags, a bad value, or a config file that cannot be loaded.
    """
    if "-h" in argv or "--help" in argv:
        print(f"usage: ipadapter-jax {command} [flags]\n\n{flag_values.get_help()}")
        raise SystemExit(0)
    with _as_usage_errors():
        flag_values([command] + _presets_to_paths(argv))


def train_config(flag_values: flags.FlagValues) -> TrainConfig:
    """The parsed `--config` validated and typed (ConfigError on an invalid field).

    Raises:
      UsageError: `--config` names no preset and no loadable config file.
    """
    try:
        config = flag_values.config.to_dict()  # a config file that failed to load raises on first use
    except Exception as err:  # noqa: BLE001  (any failure of the user's config file)
        value = getattr(flag_values["config"], "config_filename", flag_values["config"].serialize())
        cause = str(err).replace("\n", " ")
        raise UsageError(
            f"--config {value}: neither a preset ({', '.join(PRESETS)}) nor a config file that loads ({cause})"
        ) from None
    return TrainConfig.from_config_dict(config)


def check_storage(config: TrainConfig, *others: str | None) -> None:
    """`ipadapter_jax.paths.check_storage` over the config's paths and `others` (workdir, --out, ...): a bad bucket
    name, a missing bucket or missing credentials is one error before any work."""
    model, data = config.model, config.data
    paths.check_storage([*others, data.path, data.eval_path, model.base, model.image_encoder, model.init_adapter,
                         *config.samples.images])  # fmt: skip


def initialize_distributed(flag_values: flags.FlagValues) -> None:
    """Joins the multi-process run the flags describe (nothing for a single process)."""
    if flag_values.coordinator_address:
        jax.distributed.initialize(
            flag_values.coordinator_address, num_processes=flag_values.num_processes, process_id=flag_values.process_id
        )
    elif flag_values.multihost:
        jax.distributed.initialize()


@contextlib.contextmanager
def _as_usage_errors() -> Iterator[None]:
    """Bad flags, overrides of fields that do not exist, and config files that fail -> `UsageError`."""
    try:
        yield
    except flags.Error as err:
        raise UsageError(str(err).replace("\n", " ")) from None
    except (AttributeError, KeyError) as err:  # ml_collections' answer to `--config.a.b=v` with no field a.b
        raise UsageError(
            f"a --config.* override names a field the config does not have ({err}); the fields are in "
            "training/configs/default.py"
        ) from None
    except Exception as err:  # noqa: BLE001  (the config file is user code: whatever its get_config() raises)
        raise UsageError(f"loading --config failed: {type(err).__name__}: {err}") from None


def _presets_to_paths(argv: list[str]) -> list[str]:
    """`--config NAME` / `--config=NAME` with a preset name -> the preset's file; other arguments unchanged."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith(("--config=", "-config=")):
            prefix, _, value = arg.partition("=")
            if value in PRESETS:
                out[i] = f"{prefix}={preset_path(value)}"
        elif arg in ("--config", "-config") and i + 1 < len(out) and out[i + 1] in PRESETS:
            out[i + 1] = preset_path(out[i + 1])
    return out
