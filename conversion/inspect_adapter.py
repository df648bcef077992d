"""Describe an adapter file (.safetensors, .bin or .msgpack): kind, tokens, layers, dtypes, metadata.

python conversion/inspect_adapter.py --help      (the same as `ipadapter-jax convert inspect --help`)
"""

import sys

from ipadapter_jax.cli.convert import main
from ipadapter_jax.cli.main import exit_process

if __name__ == "__main__":
    exit_process(main(["inspect", *sys.argv[1:]]))
