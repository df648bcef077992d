"""Describe an adapter file (.safetensors, .bin or .msgpack): kind, tokens, layers, dtypes, metadata.

python conversion/inspect_adapter.py --help      (the same as `ipadapter-jax convert inspect --help`)
"""

import sys

from ipadapter_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
