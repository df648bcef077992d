"""`python -m ipadapter_jax ...` = the `ipadapter-jax` command."""

from ipadapter_jax.cli.main import console

console()
