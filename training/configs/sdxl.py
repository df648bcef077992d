"""SDXL at 1024 px with a base IP-Adapter (CLIP ViT-bigG/14 image_embeds), batch 4 per device.

The frozen UNet (2.6G params) and text encoders are FSDP-split like the trained state once mesh.fsdp > 1
(e.g. --config.mesh.fsdp=4): 16 GB chips cannot hold them replicated next to the activations.

On TPUs (`ipadapter-jax plan`, bench/tpu_plan.json): --config.model.attention_implementation=splash and
--config.mesh.fsdp=8, no remat. At 1024 px on 8 chips: v5p takes batch 8/chip (53.5 GiB of 95; the default attention
82.4 GiB, a 58% longer roofline step; batch 24, the largest, fits too, 93.3 GiB, but XLA recomputes to fit and its
img/s bound is 8% lower; the default's largest, batch 31, 94.9 GiB, still bounds 29% fewer img/s than splash at 8);
v6e (32 GiB) batch 7 (29.9 GiB; batch 8 needs 32.1; the default attention fits batch 8 in 29.5 GiB, but its roofline
step is 43% longer per image); v5e (16 GiB) batch 2 (14.1 GiB, 12% headroom; the default attention 14.9 GiB, a 33%
longer roofline step; the default fits up to batch 4, 15.4 GiB, and still bounds 8% fewer img/s than splash at 2);
splash's batch 3 does not compile there (XLA runs out of the chip's sflag memory, not HBM), batch 8 does not fit with
either kernel, even with remat. At 256 chips (data 32 x fsdp 8) XLA compiles a different program that needs more per
chip: v5p:4x8x8 batch 8 57.9 GiB (4.4 more; its largest batches are splash 24, as on 8 chips, and the default 26
against 31), v5e:16x16 batch 2 15.2 GiB (1.1 more; batch 3 needs 16.4), v6e:16x16 batch 5 30.1 GiB (6% headroom;
batches 6 and 7 do not fit; the default attention fits 7 but bounds 28% fewer img/s; on v5e:16x16 it fits 3 and bounds
6% fewer): plan the pod's own topology before renting it.
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
