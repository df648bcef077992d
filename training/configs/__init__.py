"""Training presets, one Python file each (installed as `ipadapter_jax.presets`).

    default.py    the paper's recipe (REFERENCE.md s.3) for an SD1.5 base adapter; every preset starts from it
    tiny.py       the embedded tiny base (tests, quick runs on a CPU)
    demo.py       `make demo`: tiny with the demo's learning rate, condition drops and steps
    sd15.py       SD1.5, base adapter (4 tokens)
    sd15_plus.py  SD1.5, Plus adapter (16-token Resampler)
    sdxl.py       SDXL 1024 px, base adapter, frozen params FSDP-split

A preset file defines `get_config() -> ml_collections.ConfigDict`, starting from `default.get_config()` and
overriding a few fields. `ipadapter-jax train --config sd15` takes a preset by name, `--config path/to/file.py`
any such file (copy a preset to start your own); `--config.optim.lr=5e-5` overrides one field.
`ipadapter_jax.training.config.TrainConfig.from_config_dict` validates a ConfigDict and turns it into the typed
config the library uses.
"""

from __future__ import annotations

import importlib
import os

import ml_collections

PRESETS = ("tiny", "demo", "sd15", "sd15_plus", "sdxl")


def preset_path(name: str) -> str:
    """The file of the preset `name` (one of `PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)} (or a path to a config file)")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")


def get_preset(name: str) -> ml_collections.ConfigDict:
    """The ConfigDict of the preset `name` (one of `PRESETS`)."""
    preset_path(name)  # the error for an unknown name
    return importlib.import_module(f"{__name__}.{name}").get_config()
