"""The embedded tiny base (trained on the procedural world, shipped with the package): tests and CPU runs."""

from __future__ import annotations

import ml_collections

from ipadapter_jax.presets import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.model.base = "tiny"
    c.model.image_encoder = "tiny"
    c.model.dtype = "float32"
    c.data.resolution = 64
    c.data.batch_size_per_device = 4
    c.total_steps = 200
    c.log_every = 10
    c.checkpoint_every = 100
    c.export_every = 100
    return c
