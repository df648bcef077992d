"""The `ipadapter-jax` command line: `main.py` dispatches to one module per subcommand."""
