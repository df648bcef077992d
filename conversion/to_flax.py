"""Official IP-Adapter file (.safetensors/.bin) -> our Flax adapter (.msgpack), checked against a UNet config.

python conversion/to_flax.py --help      (the same as `ipadapter-jax convert to-flax --help`)
"""

import sys

from ipadapter_jax.cli.convert import main
from ipadapter_jax.cli.main import exit_process

if __name__ == "__main__":
    exit_process(main(["to-flax", *sys.argv[1:]]))
