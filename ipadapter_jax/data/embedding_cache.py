"""Embedding cache: one pass of frozen encoders over a built dataset, written as a new array_record dataset.

The VAE encoder and CLIP cost more than the UNet step they feed (REFERENCE.md s.4), and they are frozen, so
their outputs can be computed once. `build_embedding_cache` runs caller-supplied encoder functions (VAE
latent mean/std, CLIP image embeddings, text-encoder states, ...) over every record in order, jitted with
the batch sharded over this process's devices, and stores per record the encoders' outputs plus the
`keep` fields of the preprocessed example (SDXL micro-conditions), the identity embedding `face_embeds` as stored
(when the dataset has one, `face_embeds.py`) and the record `index`.

Layout of a cache directory:
  cache.array_record-CCCCC-of-NNNNN  chunk c holds records [c*chunk_size, (c+1)*chunk_size), each a msgpack
                                     dict of numpy arrays (flax.serialization); chunks in order = records
                                     in order, so cached record i is raw record i
  null_example.msgpack               the encoders' outputs for `Preprocessor.null_example()` (empty text, zero
                                     images): what the training step substitutes for a dropped condition
  cache_info.json                    written last: record count, files, feature shapes/dtypes, settings

Processes split the chunks (chunk c goes to process c mod n); each encodes on its own devices, so no
collective ties them together. A chunk appears under its final name only when complete, so an interrupted
pass resumes by skipping finished chunks (the directory must be shared by all processes).

In a bucket (gs://; array_record reads and writes POSIX files only): chunks are written in the local mirror
(`staging.mirror`) and each is uploaded as one object when complete; cache_info.json, uploaded last, marks the cache
complete. Readers (`CachedSource`) stage the cache to local disk first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tqdm
from array_record.python import array_record_module
from flax import serialization
from jax.experimental import multihost_utils

from ipadapter_jax import paths, sharding, staging
from ipadapter_jax.data import builder, face_embeds, preprocess

CACHE_INFO = "cache_info.json"
NULL_EXAMPLE = "null_example.msgpack"

# encode(params, batch) -> outputs. batch: the preprocessed example fields with a leading batch dimension
# (see `preprocess.Preprocessor`); outputs: arrays with the same leading batch dimension.
EncodeFn = Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]


def is_cache(path: str | os.PathLike) -> bool:
    """Whether `path` is a complete embedding cache."""
    return paths.exists(paths.join(path, CACHE_INFO))


def chunk_name(chunk: int, num_chunks: int) -> str:
    return f"cache.array_record-{chunk:05d}-of-{num_chunks:05d}"


class CachedSource:
    """Random-access source over a cache: `len()`, `[i]` -> dict of numpy arrays of record i. Picklable."""

    def __init__(self, path: str | os.PathLike):
        self.path = staging.stage_down(path, what="embedding cache")  # a local copy of a bucket cache
        with open(os.path.join(self.path, CACHE_INFO)) as f:
            self.info = json.load(f)
        self._records = grain.sources.ArrayRecordDataSource(
            [os.path.join(self.path, name) for name in self.info["files"]]
        )
        if len(self._records) != self.info["num_records"]:
            raise ValueError(f"{self.path}: {len(self._records)} records, info says {self.info['num_records']}")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return serialization.msgpack_restore(self._records[index])

    def null_example(self) -> dict[str, np.ndarray]:
        with open(os.path.join(self.path, NULL_EXAMPLE), "rb") as f:
            return serialization.msgpack_restore(f.read())


def cached_example(record: dict[str, np.ndarray], draw: preprocess.Draw | None = None) -> dict[str, np.ndarray]:
    """A cached record is already an example (the loader's `example_fn` for caches; nothing is drawn: the cache
    holds one encoding per record)."""
    return dict(record)


class _RawRow:
    """Record index -> preprocessed example plus its index (picklable, for grain threads)."""

    def __init__(self, source: Any, preprocessor: preprocess.Preprocessor):
        self.source, self.preprocessor = source, preprocessor

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return {**self.preprocessor(self.source[index]), "index": np.int32(index)}


def _encoder(
    encoders: Mapping[str, tuple[EncodeFn, Any]], keep: Sequence[str], devices: Sequence[jax.Device], batch_size: int
) -> Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]:
    """All encoders as one jitted function of a host batch, the batch sharded over `devices`."""
    mesh = sharding.local_mesh(devices)
    if batch_size % mesh.size:
        raise ValueError(f"batch_size {batch_size} not divisible by {mesh.size} devices")
    split = sharding.batch_sharding(mesh)
    params = {name: jax.device_put(p, sharding.replicated(mesh)) for name, (_, p) in encoders.items()}

    def encode_all(params: dict, batch: dict) -> dict:
        outputs: dict = {}
        for name, (fn, _) in encoders.items():
            for key, value in fn(params[name], batch).items():
                if key in outputs or key in keep or key == "index":
                    raise ValueError(f"encoder {name!r} output {key!r} is already a field of the cache")
                outputs[key] = value
        return outputs

    encode = jax.jit(encode_all, out_shardings=split)

    def run(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        inputs = {k: v for k, v in batch.items() if k != "index"}
        return encode(params, jax.device_put(inputs, split))

    return run


def _encode_chunk(
    run: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]],
    batches: Any,
    batch_size: int,
    keep: Sequence[str],
    path: str,
    bar: tqdm.tqdm,
) -> None:
    """Encodes the host batches of one chunk into `path`, written under a temporary name until complete."""
    tmp = f"{path}.tmp{os.getpid()}"
    # group_size:1 makes every record its own chunk, for random access. array_record's default zstd
    # compression saves ~15% on float data and still decodes >3,000 SD1.5-sized records/s per core.
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")

    def write(batch: dict[str, np.ndarray], outputs: dict[str, jax.Array]) -> None:
        outputs = jax.device_get(outputs)
        for row in range(len(batch["index"])):
            record = {k: v[row] for k, v in outputs.items()}
            record.update({k: batch[k][row] for k in (*keep, "index")})
            writer.write(serialization.msgpack_serialize(record))
        bar.update(len(batch["index"]))

    # One batch in flight: the devices encode batch k while the host writes batch k-1 and threads prepare k+1.
    pending = None
    for batch in batches:
        outputs = run(sharding.pad_rows(batch, batch_size))  # the padded rows' outputs are not written
        if pending is not None:
            write(*pending)
        pending = (batch, outputs)
    write(*pending)
    writer.close()
    os.replace(tmp, path)


def build_embedding_cache(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    preprocessor: preprocess.Preprocessor,
    encoders: Mapping[str, tuple[EncodeFn, Any]],
    *,
    batch_size: int = 64,
    chunk_size: int = 4096,
    keep: Sequence[str] = ("original_size", "crop_top_left", "target_size"),
    devices: Sequence[jax.Device] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 4,
    progress: bool = True,
) -> dict | None:
    """Encodes this process's share of the records of `raw_dir` into `out_dir`.

    Args:
      raw_dir: a built dataset (`builder.dataset_dir(...)`).
      out_dir: the cache directory (shared by all processes).
      preprocessor: the preprocessing whose output the encoders read (fixes resolution, crop and tokenizers); its
        crop cannot be "random" (one encoding per image).
      encoders: name -> (encode_fn, params). All run in one jitted function; their output names must differ.
        Cast outputs inside encode_fn to the dtype to store (e.g. bfloat16 halves the cache).
      batch_size: examples per encoder call on this process, divisible by the number of devices.
      chunk_size: records per output file (the unit of resumption).
      keep: preprocessed fields stored alongside the outputs (and `face_embeds`, when the records have it).
      devices: devices of this process to shard the batch over (default: all local devices).
      process_index, process_count: this process's share (default from jax); explicit values simulate
        processes one after another (tests).
      num_threads: host threads decoding and preprocessing images ahead of the encoders, a batch each (as many
        batches are buffered).
      progress: show a progress bar (process 0 only).
    Returns:
      The cache info when this call completed the cache (all chunks present and this process finalises:
      process 0, or any process when jax runs a single process); None otherwise.
    """
    if preprocessor.crop == "random":
        raise ValueError(
            "crop='random' draws a new crop every epoch, but an embedding cache holds one encoding per image: train "
            "from the built dataset, or cache with crop 'center' or 'center_floor'"
        )
    out_dir, local_dir = os.fspath(out_dir), staging.mirror(out_dir)  # local_dir: where chunks are written
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    source = builder.raw_source(raw_dir)
    num_records = len(source)
    if num_records and face_embeds.KEY in source[0]:
        keep = (*keep, face_embeds.KEY)
    num_chunks = -(-num_records // chunk_size)
    files = [chunk_name(c, num_chunks) for c in range(num_chunks)]
    os.makedirs(local_dir, exist_ok=True)
    run = _encoder(encoders, keep, devices or jax.local_devices(), batch_size)

    mine = [c for c in range(num_chunks) if c % count == index and not paths.exists(paths.join(out_dir, files[c]))]
    for name in os.listdir(local_dir):  # partial chunks of an interrupted pass
        if ".tmp" in name and name.split(".tmp")[0] in {files[c] for c in mine}:
            os.remove(os.path.join(local_dir, name))
    total = sum(min(chunk_size, num_records - c * chunk_size) for c in mine)
    bar = tqdm.tqdm(total=total, desc="embedding cache", unit="ex", disable=not progress or index != 0)
    rows = grain.MapDataset.range(num_records).map(_RawRow(source, preprocessor))
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads)
    for c in mine:
        batches = rows[c * chunk_size : (c + 1) * chunk_size].batch(batch_size).to_iter_dataset(read_options)
        _encode_chunk(run, batches, batch_size, keep, os.path.join(local_dir, files[c]), bar)
        if paths.is_remote(out_dir):  # one object, complete or absent
            staging.upload(
                os.path.join(local_dir, files[c]), paths.join(out_dir, files[c]), what="chunk", progress=False
            )
    bar.close()

    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("embedding_cache")
    if not all(paths.exists(paths.join(out_dir, name)) for name in files):
        return None
    if jax.process_count() > 1 and index != 0:
        return None

    null = {k: np.repeat(v[None], batch_size, 0) for k, v in preprocessor.null_example().items()}
    null_outputs = jax.device_get(run(null))
    paths.write_bytes(
        paths.join(out_dir, NULL_EXAMPLE), serialization.msgpack_serialize({k: v[0] for k, v in null_outputs.items()})
    )
    first_chunk = staging.stage_down(paths.join(out_dir, files[0]), what="chunk", progress=False)
    first = serialization.msgpack_restore(grain.sources.ArrayRecordDataSource([first_chunk])[0])
    info = {
        "num_records": num_records,
        "files": files,
        "chunk_size": chunk_size,
        "raw_dataset": os.fspath(raw_dir) if paths.is_remote(raw_dir) else os.path.abspath(raw_dir),
        "encoders": list(encoders),
        "features": {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in first.items()},
        "preprocessor": {
            "resolution": preprocessor.resolution,
            "clip_size": preprocessor.clip_size,
            "max_length": preprocessor.max_length,
            "crop": preprocessor.crop,
        },
    }
    paths.write_json(paths.join(out_dir, CACHE_INFO), info)  # last: marks the cache complete
    return info
