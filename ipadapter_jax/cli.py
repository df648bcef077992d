"""The `ipadapter-jax` command: one entry point, one subcommand per job.

    ipadapter-jax convert ...      IP-Adapter files <-> Flax, inspect a file      (conversion/cli.py)
    ipadapter-jax data build ...   build a TFDS dataset from captions + images   (training/data_cli.py)
    ipadapter-jax cache ...        precompute VAE/CLIP/text encodings              (training/cache_cli.py)
    ipadapter-jax train ...        train an adapter                               (training/train.py)
    ipadapter-jax generate ...     image-prompted generation (SD1.5/SDXL/ControlNet) (ipadapter_jax/generate_cli.py)
    ipadapter-jax eval ...         CLIP-I / CLIP-T evaluation, the paper's protocol (evaluation/cli.py)

Each subcommand lives with its code and exposes `main(argv) -> int`; it is imported only when used, so
`ipadapter-jax data` does not pay for importing the models.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "convert": ("conversion.cli", "convert IP-Adapter weights (to-flax, to-torch, inspect)"),
    "data": ("training.data_cli", "build TFDS datasets and embedding caches"),
    "cache": ("training.cache_cli", "encode a built dataset once with a config's frozen encoders"),
    "generate": ("ipadapter_jax.generate_cli", "generate images from image (+ text) prompts"),
    "eval": ("evaluation.cli", "CLIP-I / CLIP-T evaluation (run, compare)"),
    "train": ("training.train", "train an IP-Adapter (--config training/config.py:PRESET --workdir DIR)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
        print("usage: ipadapter-jax SUBCOMMAND [args]\n\nsubcommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
