"""Weights between PyTorch formats (official IP-Adapter files, diffusers model folders, CLIP encoders) and Flax.

The loading API (`load.py`) is available here: `load_base`, `load_image_encoder`, `load_adapter`, `new_adapter`,
`apply_loras` (imported on first use, so that the light modules of this package stay light).
"""

from __future__ import annotations

from typing import Any

__all__ = ["apply_loras", "load_adapter", "load_base", "load_image_encoder", "new_adapter"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ipadapter_jax.weights import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
