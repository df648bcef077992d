"""Weights between PyTorch formats (official IP-Adapter files, diffusers model folders) and our Flax trees."""
