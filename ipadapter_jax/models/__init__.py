"""Flax modules: the IP-UNet (decoupled cross-attention), image projections, the CLIP image encoder, text
conditioning, the adapter's own param tree and per-layer scales, and the `BaseModel` type."""
