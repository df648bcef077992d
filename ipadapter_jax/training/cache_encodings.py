"""Encode a built dataset once with a training config's frozen encoders (`ipadapter-jax cache`).

The VAE encoder and CLIP cost more than the UNet step they feed (REFERENCE.md s.4); training on the cache
(`--config.data.path=CACHE`) gives the same results as training on the raw data, whose examples the step would
otherwise encode itself (`ipadapter_jax.training.encode`).
"""

from __future__ import annotations

from ipadapter_jax.data import embedding_cache
from ipadapter_jax.training import components
from ipadapter_jax.training.config import TrainConfig
from ipadapter_jax.training.encode import encode_batch


def build_cache(config: TrainConfig, raw: str, out: str, workdir: str, batch_size: int) -> dict | None:
    """Encodes `raw` (a built dataset) into the embedding cache `out` with `config`'s frozen encoders.

    `workdir` holds what loading the components writes (the Flax weight cache). Returns the cache info when this
    process completed the cache (see `embedding_cache.build_embedding_cache`).
    """
    comps = components.load(config, workdir)
    preprocessor = comps.preprocessor(config.data.resolution, config.data.crop)

    def encode(params: dict, batch: dict) -> dict:
        return encode_batch(comps.encoders, params, batch)

    return embedding_cache.build_embedding_cache(
        raw, out, preprocessor, {"frozen": (encode, comps.frozen["encoders"])}, batch_size=batch_size
    )
