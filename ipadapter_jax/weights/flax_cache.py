"""Converted Flax params kept on disk with orbax, so repeated runs skip the PyTorch conversion.

One component's cache folder:

    <cache_dir>/cache.json   source fingerprint and file, parameter count, dtypes, size on disk
    <cache_dir>/params/      orbax checkpoint of the param tree (PyTreeCheckpointHandler: tensorstore/OCDBT)

Why orbax and not `flax.serialization` msgpack: `to_bytes` builds the whole file in memory next to the params
and `from_bytes` reads it whole before building arrays, so saving or restoring an SDXL UNet (10 GB in fp32)
would need two copies of it in RAM; orbax writes and reads array by array, restores straight into device
arrays of the requested dtype (and could restore into a multi-device sharding), casts on save
(`SaveArgs.dtype`) without a cast copy of the tree, and is what the training checkpoints use already.

Freshness: the fingerprint hashes the model's config, each weight file's name, size and modification time,
the dtypes, and `CACHE_FORMAT`; any change means a fresh conversion that replaces the cache.
Atomicity: a cache is written into a temporary sibling folder and renamed into place, so an interrupted run
leaves either the old cache or the new one, never a partial one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

# Bump when the conversion's output for the same source files changes (key maps, layouts).
CACHE_FORMAT = 1
CACHE_INFO = "cache.json"
PARAMS_DIR = "params"


def fingerprint(config: Any, weight_files: Iterable[Path], **settings: Any) -> str:
    """sha256 hex of the model config (JSON-able), each weight file's (name, size, mtime) and `settings`."""
    files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(weight_files)]
    payload = {"format": CACHE_FORMAT, "config": config, "files": files, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_info(cache_dir: Path) -> dict | None:
    """The cache's `cache.json`, or None when there is no readable one."""
    try:
        return json.loads((cache_dir / CACHE_INFO).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def restore(cache_dir: Path, target: Any, *, fingerprint: str, dtype: Any) -> dict | None:
    """Restores params saved by `save`, as `dtype` device arrays on the default device, shaped like `target`.

    Returns None when the cache is absent, was made from other sources or settings, or cannot be read (it is
    derived data: the caller converts again and overwrites it).
    """
    cache_dir = Path(cache_dir).absolute()  # orbax takes absolute paths only
    info = read_info(cache_dir)
    if info is None or info.get("fingerprint") != fingerprint:
        return None
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding), target)
    try:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)  # casts to `dtype` on read
        with _checkpointer() as checkpointer:
            return checkpointer.restore(cache_dir / PARAMS_DIR, args=ocp.args.PyTreeRestore(abstract, restore_args))
    except Exception as err:  # noqa: BLE001  (any unreadable cache is rebuilt, never fatal)
        logger.warning("%s: unreadable Flax cache (%r); converting again", cache_dir, err)
        return None


def save(cache_dir: Path, params: Any, *, fingerprint: str, info: dict, stored_dtype: Any = None) -> dict:
    """Saves `params` (cast to `stored_dtype` if given) atomically as `cache_dir`, replacing any old cache.

    `info` (JSON-able) is stored in `cache.json` next to the fingerprint. Returns the written `cache.json`
    content, which adds `stored_dtype` and `stored_bytes` (size on disk).
    """
    cache_dir = Path(cache_dir).absolute()  # orbax takes absolute paths only
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir.with_name(f".{cache_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(dtype=stored_dtype), params)
    try:
        with _checkpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params, save_args=save_args))
        leaf = jax.tree.leaves(params)[0]
        written = {
            **info,
            "fingerprint": fingerprint,
            "stored_dtype": np.dtype(stored_dtype or leaf.dtype).name,
            "stored_bytes": folder_bytes(tmp / PARAMS_DIR),
        }
        (tmp / CACHE_INFO).write_text(json.dumps(written, indent=1, sort_keys=True))
        _replace_folder(tmp, cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def _checkpointer() -> ocp.Checkpointer:
    # orbax lets 96 GB be in flight by default; 1 GB bounds its buffers next to the params. No compression: zstd
    # saves ~8% of disk on weights and costs CPU time on every save and restore, which a cache exists to save.
    # Together, SD1.5 UNet fp32 (bench/conversion_bench.py): peak RSS while saving 1.06x the params instead of
    # 1.8-2.0x with orbax's defaults; restoring 1.34x.
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, save_concurrent_gb=1, restore_concurrent_gb=1)
    return ocp.Checkpointer(handler)


def folder_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _replace_folder(new: Path, final: Path) -> None:
    # A folder cannot be renamed over a non-empty one: move the old one aside first, then drop it.
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
