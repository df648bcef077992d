"""grain input pipeline: global shuffle, per-process shards, global batches, JSON-serialisable resume state.

Order. Global position p (0, 1, 2, ... over all epochs) holds record `index_shuffle(p mod N)` of epoch p // N,
a permutation of the N records seeded by (seed, epoch). Global step s consumes positions [s*B, (s+1)*B),
B the global batch size; process i of n reads the contiguous block [s*B + i*b, s*B + (i+1)*b), b = B/n.
So processes never read the same example, together they read every position, and the examples of step s
do not depend on the process count, the worker count or where a run was resumed.

Resume. The state is `{"step": s, ...}`: the iterator restarts at step s by slicing the (lazy, random-access)
grain dataset. It is the same on every process and JSON-serialisable (`ocp.args.JsonSave`).

Batches (`DataIterator.__next__`), dict of arrays with leading dimension B (global jax.Array sharded by the
caller's NamedSharding) or b (numpy, without sharding):
  index       int32 (B,)  record index in the dataset
  drop_image  bool (B,)   condition drop of the reference: zero the image embedding (Plus: the CLIP pixels)
  drop_text   bool (B,)   substitute the empty-text encoding (`Dataset.null_example`)
  raw data (`preprocess.Preprocessor`):
    pixel_values float32 (B, R, R, 3) in [-1, 1]; clip_pixel_values float32 (B, 224, 224, 3);
    input_ids int32 (B, 77) [input_ids_2 for a second tokenizer]
  cached data (`embedding_cache`): the encoders' outputs, e.g. latent_mean/latent_std, image_embeds, text states
  both: original_size, crop_top_left, target_size int32 (B, 2) (SDXL micro-conditions); face_embeds float32 (B, D)
    when the dataset holds identity embeddings (`face_embeds.py`; FaceID training)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from ipadapter_jax.data import builder, embedding_cache, preprocess


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A random-access dataset and how to turn its records into examples.

    source: `len()` and `[i]` -> record. example_fn: (record, draw) -> dict of numpy arrays (one example); draw
    is the example's (seed, record index, epoch), for random preprocessing (`preprocess.Preprocessor`).
    null_example: what a dropped condition stands for (raw: ids of "" and zero images; cached: the
    encoders' outputs for those inputs), one example without batch dimension.
    """

    source: Any
    example_fn: Callable[[Any, preprocess.Draw], dict[str, np.ndarray]]
    null_example: dict[str, np.ndarray]
    cached: bool


def open_dataset(path: str | os.PathLike, preprocessor: preprocess.Preprocessor | None = None) -> Dataset:
    """Opens a built TFDS dataset (raw, needs `preprocessor`) or an embedding cache (detected by its info file)."""
    if embedding_cache.is_cache(path):
        source = embedding_cache.CachedSource(path)
        return Dataset(source, embedding_cache.cached_example, source.null_example(), cached=True)
    if preprocessor is None:
        raise ValueError(f"{path} holds raw images: a preprocessor is needed")
    return Dataset(builder.raw_source(path), preprocessor, preprocessor.null_example(), cached=False)


def global_batch(batch_size_per_device: int, device_count: int) -> int:
    """B, the examples of one training step: `batch_size_per_device` on each of the devices of all processes."""
    return batch_size_per_device * device_count


def per_process_batch(batch: int, process_count: int) -> int:
    """b = B / n, the rows of the global batch B each of n processes reads per step (process i: positions
    [s*B + i*b, s*B + (i+1)*b)). `DataIterator` splits its batches with it; `ipadapter-jax plan` checks a topology's
    hosts with it.

    Raises:
      ValueError: B is not divisible by the process count.
    """
    if batch % process_count:
        raise ValueError(f"global batch {batch} not divisible by {process_count} processes")
    return batch // process_count


def epoch_seed(seed: int, epoch: int) -> int:
    """32-bit shuffle seed of one epoch, independent across (seed, epoch) pairs (seed+epoch would repeat)."""
    return int(np.random.SeedSequence((seed, epoch)).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class _Element:
    """Local element j of one process -> example (a picklable function for grain's worker processes)."""

    data: Dataset
    num_records: int
    seed: int
    shuffle: bool
    drop_rates: tuple[float, float, float]
    global_batch: int
    local_batch: int
    process_index: int

    def position(self, j: int) -> int:
        step, row = divmod(j, self.local_batch)
        return step * self.global_batch + self.process_index * self.local_batch + row

    def __call__(self, j: int) -> dict[str, np.ndarray]:
        epoch, k = divmod(self.position(j), self.num_records)
        if self.shuffle:
            k = grain.experimental.index_shuffle(
                k, max_index=self.num_records - 1, seed=epoch_seed(self.seed, epoch), rounds=4
            )
        example = self.data.example_fn(self.data.source[k], (self.seed, k, epoch))
        if "index" in example and int(example["index"]) != k:  # a cache written out of order
            raise ValueError(f"record {k} holds example {int(example['index'])}")
        drop_image, drop_text = preprocess.condition_drop(self.seed, k, epoch, self.drop_rates)
        example.update(index=np.int32(k), drop_image=np.bool_(drop_image), drop_text=np.bool_(drop_text))
        return example


class DataIterator:
    """Iterator over global batches of `data` (see the module docstring for order, shards and contents).

    Args:
      data: `open_dataset(...)`.
      global_batch_size: B, divisible by the process count.
      seed: shuffle and condition-drop seed.
      num_epochs: None repeats forever; otherwise stops after floor(num_epochs * N / B) steps.
      shuffle: False reads records in order (evaluation).
      drop_rates: (image only, text only, both) condition-drop rates; (0, 0, 0) for evaluation.
      sharding: NamedSharding of the global batch (batch dimension sharded); None yields local numpy batches.
      process_index, process_count: this process's shard; default `jax.process_index()/process_count()`.
        Explicit values simulate other processes (tests).
      num_threads: threads preparing batches (per worker process), each a whole batch; PIL decoding releases
        the GIL. At most `prefetch_buffer_size`: a thread needs a free buffer slot for its batch.
      prefetch_buffer_size: batches prepared ahead by the threads.
      worker_count: worker processes (grain `mp_prefetch`); 0 keeps everything in this process. The batches
        are the same for any worker count. Raw data on many-core hosts wants processes: threads share the
        GIL for the Python between decode and resize calls.
    """

    def __init__(
        self,
        data: Dataset,
        *,
        global_batch_size: int,
        seed: int,
        num_epochs: int | None = None,
        shuffle: bool = True,
        drop_rates: tuple[float, float, float] = preprocess.DROP_RATES,
        sharding: jax.sharding.NamedSharding | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        num_threads: int = 4,
        prefetch_buffer_size: int = 4,
        worker_count: int = 0,
    ):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process index {self.process_index} outside 0..{self.process_count - 1}")
        local_batch = per_process_batch(global_batch_size, self.process_count)
        self.num_records = len(data.source)
        if not self.num_records:
            raise ValueError("empty dataset")
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.num_steps = None if num_epochs is None else num_epochs * self.num_records // global_batch_size
        self._element = _Element(
            data,
            self.num_records,
            seed,
            shuffle,
            tuple(drop_rates),
            global_batch_size,
            local_batch,
            self.process_index,
        )
        self._sharding = sharding
        if not 1 <= num_threads <= prefetch_buffer_size:
            raise ValueError(
                f"num_threads must be between 1 and prefetch_buffer_size ({prefetch_buffer_size}), got {num_threads}"
            )
        self._read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
        self._worker_count = worker_count
        self._step = 0
        self._iterator: Any = None
        self._peeked: dict[str, Any] | None = None

    def _start(self) -> Any:
        local = self._element.local_batch
        stop = sys.maxsize if self.num_steps is None else self.num_steps * local
        dataset = (
            grain.MapDataset.range(self._step * local, max(stop, self._step * local))
            .map(self._element)
            .batch(local, drop_remainder=True)  # batching before mp_prefetch: workers hand out whole batches
            .to_iter_dataset(self._read_options)
        )
        if self._worker_count:
            # grain 0.2.18 reads an absl flag when starting workers, which raises in programs that never
            # parse absl flags (google/grain#1355, fixed after 0.2.18): use the flags' defaults there.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
        return iter(dataset)

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = self.peek()
        self._peeked = None
        self._step += 1
        return batch

    def peek(self) -> dict[str, Any]:
        """The batch the next `next()` returns, without consuming it (e.g. to compile for its shapes)."""
        if self._peeked is None:
            if self._iterator is None:
                self._iterator = self._start()
            batch = next(self._iterator)
            if self._sharding is not None:
                batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(self._sharding, x), batch)
            self._peeked = batch
        return self._peeked

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: equal on all processes (save it once, e.g. `ocp.args.JsonSave`)."""
        return {
            "step": self._step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_records": self.num_records,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues after `state["step"]` steps, exactly as an uninterrupted run would (any process count)."""
        for key in ("seed", "global_batch_size", "num_records"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state from a run with {key}={state[key]}, this iterator has {getattr(self, key)}")
        self.close()
        self._step = int(state["step"])

    def close(self) -> None:
        """Stops worker processes and threads; the next `next()` restarts at the current step."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None
        self._peeked = None
