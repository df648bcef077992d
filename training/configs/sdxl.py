"""SDXL at 1024 px with a base IP-Adapter (CLIP ViT-bigG/14 image_embeds), batch 4 per device.

The frozen UNet (2.6G params) and text encoders are FSDP-split like the trained state once mesh.fsdp > 1
(e.g. --config.mesh.fsdp=4): 16 GB chips cannot hold them replicated next to the activations.

On TPUs (`ipadapter-jax plan`, bench/tpu_plan.json): --config.model.attention_implementation=splash and
--config.mesh.fsdp=8. At 1024 px, batch 8/chip on v5p (8 chips, fsdp 8): 53.5 GiB of 95, no remat needed; on v5e
(16 GiB) batch 8 does not fit even with remat (XLA: 34.8 GiB required); batch 3 with remat is undecided (its
compile outgrew a 24 GB host).
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
