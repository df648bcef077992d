"""Flags shared by the commands that run a training config (`train`, `cache`): the config and multi-process set-up."""

from __future__ import annotations

import os

import jax
from absl import flags
from ml_collections import config_flags


def define(flag_values: flags.FlagValues) -> None:
    """`--config FILE:PRESET` (+ `--config.x.y=v` overrides) and the multi-process flags."""
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "config.py:tiny"), "config file:preset", flag_values=flag_values
    )
    flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (TPU pods, SLURM, ...)", flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process)", flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "number of processes (explicit multi-process)", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "this process's id (explicit multi-process)", flag_values=flag_values)


def parse(flag_values: flags.FlagValues, command: str, argv: list[str]) -> None:
    """Parses `argv` (without the command name); `-h`/`--help` prints the flags and exits."""
    if "-h" in argv or "--help" in argv:
        print(f"usage: ipadapter-jax {command} [flags]\n\n{flag_values.get_help()}")
        raise SystemExit(0)
    flag_values([command] + argv)


def initialize_distributed(flag_values: flags.FlagValues) -> None:
    """Joins the multi-process run the flags describe (nothing for a single process)."""
    if flag_values.coordinator_address:
        jax.distributed.initialize(
            flag_values.coordinator_address, num_processes=flag_values.num_processes, process_id=flag_values.process_id
        )
    elif flag_values.multihost:
        jax.distributed.initialize()
