"""`make demo` (training/demo.py): the tiny preset trained to a visible effect in a few hundred CPU steps.

lr 1e-3 is 10x the paper's 1e-4: a few hundred steps instead of a million. The paper drops the caption for 10%
of the examples; the demo generates from image prompts alone (empty text, as the paper's image-only
generation), so with few steps it trains mostly in that regime: 85% of the examples see the image without text.
The demo fills in data.path and data.eval_path (the datasets it builds).
"""

from __future__ import annotations

import ml_collections

from ipadapter_jax.presets import tiny


def get_config() -> ml_collections.ConfigDict:
    c = tiny.get_config()
    c.optim.lr = 1e-3
    c.data.drop_rates = (0.05, 0.85, 0.05)
    c.data.batch_size_per_device = 16
    c.total_steps = 500
    c.log_every = 10
    c.eval_every = 25
    c.checkpoint_every = 100
    c.export_every = 100
    return c
