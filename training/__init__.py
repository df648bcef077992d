"""Training-side code of ipadapter-jax: input pipeline (TFDS builder, grain loader, embedding cache)."""
