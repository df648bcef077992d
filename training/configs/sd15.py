"""SD1.5 with a base IP-Adapter (4 tokens from CLIP ViT-H/14 image_embeds): the paper's recipe as is.

Set model.base (a diffusers SD1.5 folder), model.image_encoder and data.path on the command line.

On TPUs (`ipadapter-jax plan`, bench/tpu_plan.json): --config.model.attention_implementation=splash on every chip, no
remat, frozen params replicated (the default rules: splitting every param over fsdp 8 saves 2.3 GiB per chip at batch
8 but moves 26-41% more bytes per step on 8 chips, compiled on v5e, v5p and v6e). Batch 8/chip on v5e: 9.0 GiB of 16
with splash, 13.9 GiB with the default attention; the largest batch per chip there: splash 33, the default attention
17. v5p and v6e have room to spare at batch 8 (splash 9.6 GiB, the default attention 21 GiB, of 95 on v5p and 32 on
v6e), and splash cuts the roofline step time by 45% on all three. Larger batches fit there as XLA recomputes to fit
them (splash 154 on v5p, 155 not by plan's measure, 64 on v6e; the default attention 118 and 27), but past batch 64 on
v5p (compute-bound) and 36 on v6e the images/s bound barely moves or falls: take the batch with the best bound in
README's compile table. A 256-chip slice needs the same per chip as 8 chips (compiled on v5e, v5p and v6e).
"""

from __future__ import annotations

import ml_collections

from ipadapter_jax.presets import default


def get_config() -> ml_collections.ConfigDict:
    return default.get_config()
