"""`ipadapter-jax cache`: run the frozen encoders of a training config once over a built dataset.

    ipadapter-jax cache --config training/config.py:sd15 --config.model.base=SD15 \
        --config.model.image_encoder=IMAGE_ENCODER --raw data/ip_adapter_captions/1.0.0 --out data/cache

The VAE encoder and CLIP cost more than the UNet step they feed (REFERENCE.md s.4); afterwards
`--config.data.path=data/cache` trains on the stored encodings (`training.encode` output: VAE posterior mean
and std, text states, image embeddings; SDXL time ids), with the same results as training on the raw data.
Interrupted passes resume (finished chunks are kept). Run it on every host of a pod with `--multihost`.
"""

from __future__ import annotations

import os
import sys

import jax
import ml_collections

import ipadapter_jax  # noqa: F401  (log filter before any Flax model import)
from training import components, embedding_cache
from training.encode import encode_batch


def build_cache(config: ml_collections.ConfigDict, raw: str, out: str, workdir: str, batch_size: int) -> dict | None:
    """Encodes `raw` (a built dataset) into the embedding cache `out` with `config`'s frozen encoders.

    `workdir` holds what loading the components writes (the tiny base's tokenizer, the Flax weight cache).
    """
    comps = components.load(config, workdir)
    preprocessor = comps.preprocessor(config.data.resolution)

    def encode(params: dict, batch: dict) -> dict:
        return encode_batch(comps.encoders, params, batch)

    return embedding_cache.build_embedding_cache(
        raw, out, preprocessor, {"frozen": (encode, comps.frozen["encoders"])}, batch_size=batch_size
    )


def main(argv: list[str] | None = None) -> int:
    from absl import flags

    from training import cli_flags

    flag_values = flags.FlagValues()
    cli_flags.define(flag_values)
    flags.DEFINE_string("raw", None, "built dataset directory (ipadapter-jax data build)", flag_values=flag_values)
    flags.DEFINE_string("out", None, "cache directory to write", flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "scratch directory for loaded components (default: OUT/.components)",
                        flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 0, "examples per encoder call per host (default: 8 per device)",
                         flag_values=flag_values)
    cli_flags.parse(flag_values, "cache", list(sys.argv[1:] if argv is None else argv))
    if not flag_values.raw or not flag_values.out:
        raise SystemExit("--raw and --out are required")
    cli_flags.initialize_distributed(flag_values)
    batch_size = flag_values.batch_size or 8 * jax.local_device_count()
    workdir = flag_values.workdir or os.path.join(flag_values.out, ".components")
    build_cache(flag_values.config, flag_values.raw, flag_values.out, workdir, batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
