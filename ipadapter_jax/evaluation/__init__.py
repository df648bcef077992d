"""CLIP-I / CLIP-T evaluation of IP-Adapters (the paper's Table 1 protocol): `ipadapter-jax eval`."""
