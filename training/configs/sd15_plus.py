"""SD1.5 with an IP-Adapter Plus (a 16-query Resampler over CLIP ViT-H/14's penultimate hidden states).

On TPUs (`ipadapter-jax plan`, bench/tpu_plan.json): --config.model.attention_implementation=splash, no remat, frozen
params replicated (the default rules); batch 8/chip on v5e: 9.5 GiB of 16 (the default attention 14.4 GiB), the same
per chip on a 256-chip v5e:16x16 slice, and up to batch 31 on v5e (15.5 GiB; base takes 33; the default attention 16);
on v5p 10.0 GiB of 95 (default 21.6) and up to batch 159 (89.0 GiB; the default attention 117), on v6e 10.2 GiB of 32
(default 21.5) and up to batch 61 (30.9 GiB; the default attention 26, 30.8 GiB): XLA recomputes to fit those, and the
images/s bound barely moves past batch 32 on v6e (see README's compile table).
"""

from __future__ import annotations

import ml_collections

from ipadapter_jax.presets import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.model.adapter_kind = "plus"
    c.model.num_tokens = 16
    return c
