"""Our Flax adapter (.msgpack) -> an official file that diffusers' load_ip_adapter reads.

python conversion/to_torch.py --help      (the same as `ipadapter-jax convert to-torch --help`)
"""

import sys

from ipadapter_jax.cli.convert import main
from ipadapter_jax.cli.main import exit_process

if __name__ == "__main__":
    exit_process(main(["to-torch", *sys.argv[1:]]))
