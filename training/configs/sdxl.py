"""SDXL at 1024 px with a base IP-Adapter (CLIP ViT-bigG/14 image_embeds), batch 4 per device.

The frozen UNet (2.6G params) and text encoders are FSDP-split like the trained state once mesh.fsdp > 1
(e.g. --config.mesh.fsdp=4): 16 GB chips cannot hold them replicated next to the activations.

On TPUs (`ipadapter-jax plan`, bench/tpu_plan.json): --config.model.attention_implementation=splash and
--config.mesh.fsdp=8, no remat. At 1024 px on 8 chips: v5p takes batch 8/chip (53.5 GiB of 95; the default attention
82.4 GiB, a 60% longer roofline step); v6e (32 GiB) batch 7 (29.9 GiB; batch 8 needs 32.1); on v5e (16 GiB) batch 8
does not fit even with remat (XLA: 34.8 GiB required) and batch 3 with remat is undecided (its compile outgrew a
24 GB host).
"""

from __future__ import annotations

import ml_collections

from ipadapter_jax.presets import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.model.architecture = "sdxl"
    c.data.resolution = 1024
    c.data.batch_size_per_device = 4
    c.data.crop = "center_floor"  # tutorial_train_sdxl.py's default; "random" is its random crop
    c.sharding_rules = ((".*", "fsdp"),)
    return c
