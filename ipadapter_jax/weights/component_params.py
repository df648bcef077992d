"""Converting one component's PyTorch weights to its Flax param tree, through the Flax cache when given one.

`load_params` checks every checkpoint key and shape against the module's abstract param tree before any tensor is
read, then reads the weights tensor by tensor (`ipadapter_jax.weights.weight_files`), converts them by
`ipadapter_jax.weights.torch_layout`'s rules and moves them to the default device one leaf at a time: peak host
memory is about one copy of the params plus one tensor (`bench/conversion_bench.py` measures it). Every load
returns a `LoadReport` (time, size, dtype, cache use) and logs it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from ipadapter_jax.weights import flax_cache
from ipadapter_jax.weights.torch_layout import ConversionError, torch_state_to_flax
from ipadapter_jax.weights.weight_files import LazyStateDict, find_weight_file, open_state_dict

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What loading one component did: sizes, dtypes, times (seconds) and the Flax cache's use.

    `cache` is "off" (no cache_dir), "saved" (converted now, then saved) or "restored" (no conversion).
    """

    folder: str
    weights: str
    num_params: int
    param_dtype: str
    param_bytes: int
    cache: str = "off"
    convert_s: float | None = None
    cache_s: float | None = None
    cache_dir: str | None = None
    stored_dtype: str | None = None
    stored_bytes: int | None = None

    def summary(self) -> str:
        """One line for logs and CLIs."""
        size = f"{self.param_bytes / 2**20:.1f} MiB"
        line = f"{self.folder}: {self.num_params:,} params, {self.param_dtype}, {size}"
        if self.convert_s is not None:
            line += f"; converted from {Path(self.weights).name} in {self.convert_s:.2f} s"
        if self.cache != "off":
            verb = "restored from" if self.cache == "restored" else "saved to"
            line += (
                f"; {verb} Flax cache {self.cache_dir} in {self.cache_s:.2f} s "
                f"({self.stored_dtype}, {self.stored_bytes / 2**20:.1f} MiB on disk)"
            )
        return line


@dataclasses.dataclass
class LoadedModel:
    """A Flax model and its params (a nested dict of device arrays), with the report of how they were loaded.

    `module` is what the params are applied with: diffusers' Flax models are linen modules
    (`module.apply({"params": params}, ...)`); transformers' CLIP text encoders are their Flax wrapper,
    created without an init pass (`module(input_ids, params=params)`).
    """

    module: Any
    params: dict
    report: LoadReport


def load_params(
    folder: Path,
    target: Any,
    *,
    config: dict,
    param_dtype: Any,
    variant: str | None,
    cache_dir: str | Path | None,
    cache_dtype: Any,
    rename: Callable[[str], str] | None = None,
    drop: tuple[str, ...] = (),
) -> tuple[dict, LoadReport]:
    """Params for `target` from the folder's weights, or from the Flax cache when it is fresh."""
    param_dtype = np.dtype(param_dtype)
    stored_dtype = np.dtype(cache_dtype or param_dtype)
    num_params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(target))
    weights = find_weight_file(folder, variant)
    base = dict(
        folder=str(folder),
        weights=str(weights),
        num_params=num_params,
        param_dtype=param_dtype.name,
        param_bytes=num_params * param_dtype.itemsize,
    )

    key = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        key = flax_cache.fingerprint(
            config, _weight_files(weights), param_dtype=param_dtype.name, stored_dtype=stored_dtype.name
        )
        start = time.perf_counter()
        params = flax_cache.restore(cache_dir, target, fingerprint=key, dtype=param_dtype)
        if params is not None:
            info = flax_cache.read_info(cache_dir)
            cached = dict(
                cache_dir=str(cache_dir), stored_dtype=info["stored_dtype"], stored_bytes=info["stored_bytes"]
            )
            report = LoadReport(**base, cache="restored", cache_s=time.perf_counter() - start, **cached)
            logger.info(report.summary())
            return params, report

    start = time.perf_counter()
    state = open_state_dict(folder, variant).without(drop)
    params = _convert(state, target, rename=rename, param_dtype=param_dtype)
    convert_s = time.perf_counter() - start
    if cache_dir is None:
        report = LoadReport(**base, convert_s=convert_s)
    else:
        start = time.perf_counter()
        about = {"source": str(weights), "num_params": num_params, "param_dtype": param_dtype.name}
        info = flax_cache.save(cache_dir, params, fingerprint=key, info=about, stored_dtype=stored_dtype)
        if stored_dtype != param_dtype:
            # Return what later runs will restore (rounded to the stored dtype), not the unrounded conversion.
            del params
            params = flax_cache.restore(cache_dir, target, fingerprint=key, dtype=param_dtype)
        cached = dict(cache_dir=str(cache_dir), stored_dtype=info["stored_dtype"], stored_bytes=info["stored_bytes"])
        report = LoadReport(**base, cache="saved", convert_s=convert_s, cache_s=time.perf_counter() - start, **cached)
    logger.info(report.summary())
    return params, report


def _convert(state: LazyStateDict, target: Any, *, rename: Callable[[str], str] | None, param_dtype: np.dtype) -> dict:
    source = str(state.source)
    try:
        # Keys and shapes first, on zero-memory placeholders: a wrong file fails before any tensor is read.
        torch_state_to_flax(state.placeholders(), target, source=source, rename=rename)
    except ConversionError as err:
        raise ConversionError(
            f"{err}; likely cause: the weights were saved for a different model than "
            f"{state.source.parent / 'config.json'} describes (e.g. SD1.5 weights with an SDXL config, or another "
            "component's weights), or the checkpoint is incomplete."
        ) from None
    # Cast here rather than in torch_state_to_flax: `np.asarray` copies only when the dtype changes (astype
    # always copies: +6 s on an SD1.5 UNet). Flattened at once so the nested numpy tree is not kept: each leaf
    # below is replaced by its device copy and its host array freed, so host memory holds about one copy of
    # the params at any time.
    converted = torch_state_to_flax(state, target, source=source, rename=rename)
    flat = traverse_util.flatten_dict(converted)
    del converted
    for path in flat:
        flat[path] = jax.device_put(np.asarray(flat[path], dtype=param_dtype))
    return traverse_util.unflatten_dict(flat)


def _weight_files(weights: Path) -> list[Path]:
    # The files whose change must invalidate a cache: the weight file, or the index and every shard it lists.
    if not weights.name.endswith(".index.json"):
        return [weights]
    try:
        shards = set(json.loads(weights.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return [weights]  # a broken index: the conversion that follows reports it
    return [weights] + [weights.parent / shard for shard in sorted(shards) if (weights.parent / shard).is_file()]
