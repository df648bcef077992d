"""`python -m ipadapter_jax ...` = the `ipadapter-jax` command."""

import sys

from ipadapter_jax.cli.main import main

sys.exit(main())
