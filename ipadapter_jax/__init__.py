"""ipadapter-jax: IP-Adapter (Ye et al., 2023) for diffusers' Flax Stable Diffusion models."""

from ipadapter_jax import quiet

# Before any diffusers/transformers Flax class is imported: drop their per-module deprecation notices.
quiet.install()
