"""Random parameters without compiling an init function.

`jax.jit(model.init)` of even a tiny UNet compiles for ~20 s on a 2-core CPU (threefry). Tracing the init
abstractly with `jax.eval_shape` and filling each leaf with numpy takes ~2 s, so tests, the `tiny` preset
and anything else that needs fresh weights use this instead.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import traverse_util


def numpy_init(abstract: Any, seed: int = 0, *, std: float | None = None) -> dict:
    """Fills an abstract param tree (shapes/dtypes from `jax.eval_shape`) with numpy values.

    Kernels and embeddings: normal with std `1/sqrt(fan_in)` (or `std` if given); norm scales: 1;
    biases: 0; any other leaf (e.g. Resampler `latents`): normal with std `1/sqrt(last dim)`.
    Deterministic in `seed` and independent of device count.
    Returns a nested dict of numpy arrays.
    """
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(abstract.unfreeze() if hasattr(abstract, "unfreeze") else abstract)
    out = {}
    for path, leaf in flat.items():
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        name = path[-1]
        if name == "scale":
            value = np.ones(shape)
        elif name == "bias":
            value = np.zeros(shape)
        else:
            fan_in = int(np.prod(shape[:-1])) if name == "kernel" and len(shape) > 1 else (shape[-1] if shape else 1)
            value = rng.standard_normal(shape) * (std if std is not None else fan_in**-0.5)
        out[path] = value.astype(dtype)
    return traverse_util.unflatten_dict(out)


def abstract_params(module: Any, *args: Any, **kwargs: Any) -> dict:
    """The `params` tree of `module.init(rng, *args, **kwargs)` as `jax.ShapeDtypeStruct`s (nothing computed)."""
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
    return variables["params"]
