"""TensorBoard event files of a training run, without TensorFlow: scalars of every metrics record and grids of
samples for fixed image prompts, written by the `TensorBoard` hook (process 0; the loop calls it after the other
hooks of `ipadapter_jax.training.hooks`, so a step's held-out loss is in its flush).

Event files are written by tensorboardX's synchronous `EventsWriter` (its summary protos, written in the calling
thread) into a local folder: the workdir's `tensorboard/` or, for a bucket workdir (gs://), a local temporary folder
whose event files are uploaded whole after every flush (an object upload is atomic and event files only grow, so
each upload is a complete superset of the last; a bucket has no append). tensorboardX's `SummaryWriter` is not
used: its `flush()` does not wait for the events still queued for its writer thread (an upload right after it
copied a file that was still growing), and its own gs:// writer re-uploads from `__del__` and can hang at exit. A
resumed run
starts a new event file with `purge_step` = its first step + 1, so TensorBoard drops the older files' points past
the step it resumed from, as metrics.jsonl does.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from tensorboardX import summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog

from ipadapter_jax import paths, staging

EVENTS_DIR = "tensorboard"
_PERF = ("images_per_s", "tflops_per_s", "mfu", "steps_per_s")


def scalar_tag(key: str) -> str:
    """metrics.jsonl key -> TensorBoard tag: `eval/loss`, `perf/images_per_s`, `train/loss`, ..."""
    if key == "eval_loss":
        return "eval/loss"
    return f"perf/{key}" if key in _PERF else f"train/{key}"


class EventWriter:
    """Scalars and images into the event files of `workdir/tensorboard` (local or in a bucket)."""

    def __init__(self, workdir: str, first_step: int):
        self.url = paths.join(workdir, EVENTS_DIR)
        self.local = tempfile.mkdtemp(prefix="ipadapter-jax-tb-") if paths.is_remote(self.url) else self.url
        os.makedirs(self.local, exist_ok=True)
        # The pid in the file name: two runs of one host starting in the same second write separate files.
        self.writer = EventsWriter(os.path.join(self.local, "events"), f".{os.getpid()}")
        if first_step:  # a resumed run purges the older files' points after its first step, as metrics.jsonl does
            self.writer.write_event(Event(step=first_step + 1, session_log=SessionLog(status=SessionLog.START)))

    def _write(self, proto: Any, step: int) -> None:
        self.writer.write_event(Event(summary=proto, step=step, wall_time=time.time()))

    def scalars(self, record: Mapping[str, Any]) -> None:
        """One metrics record ({"step": s, name: value, ...}) as scalars at step s."""
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._write(summary.scalar(scalar_tag(key), float(value)), step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 image."""
        self._write(summary.image(tag, image, dataformats="HWC"), step)

    def flush(self) -> None:
        """Writes the events out; for a bucket, uploads each local event file whole."""
        self.writer.flush()
        self._upload()

    def close(self) -> None:
        """Closes the event file (uploaded a last time; a bucket's local folder is then deleted)."""
        self.writer.close()
        self._upload()
        if self.local != self.url:
            shutil.rmtree(self.local, ignore_errors=True)

    def _upload(self) -> None:
        if self.local != self.url:
            for name in sorted(os.listdir(self.local)):
                staging.upload(
                    os.path.join(self.local, name), paths.join(self.url, name), what="events", progress=False
                )


class SampleGrid:
    """A grid of samples of the current adapter for fixed image prompts: one row per prompt, the prompt image then
    its samples. The base model and the image encoder are loaded again (process 0, on first use) from the run's
    config; the sampling function compiles once and is reused with each new adapter.

    Args:
      config: the run's `TrainConfig` (`model`: what to load; `samples`: how many, steps, guidance, scale).
      workdir: the run's workdir (its Flax cache).
      image_proj: the adapter's image projection module (the run's `comps.models.image_proj`).
      images: the prompt images.
    """

    def __init__(self, config: Any, workdir: str, image_proj: Any, images: Sequence[Image.Image]):
        self.config, self.workdir, self.image_proj, self.images = config, workdir, image_proj, list(images)
        self._models: tuple | None = None
        self._sampler: Any = None

    def __call__(self, adapter_params: Any) -> np.ndarray:
        """The grid (H, W, 3) uint8 for adapter params {"image_proj", "ip_layers"} (host arrays)."""
        from ipadapter_jax.models.adapter import Adapter
        from ipadapter_jax.pipelines import IPAdapterPipeline, image_grid

        base, encoder, features = self._load()
        pipe = IPAdapterPipeline(base, encoder, Adapter(self.image_proj, adapter_params, self.config.model.design))
        if self._sampler is not None:
            pipe.sampler = self._sampler  # same shapes: the compiled sampling loop of the first grid
        samples = self.config.samples
        out = pipe(
            image_embeds=features[:, None],
            per_prompt_images=True,
            prompt=[""] * len(self.images),
            scale=samples.scale,
            guidance_scale=samples.guidance_scale,
            num_inference_steps=samples.steps,
            seed=list(range(len(self.images))),
            num_images_per_prompt=samples.per_prompt,
        )
        self._sampler = pipe.sampler
        size = out.images[0].size
        cells = []
        for i, prompt in enumerate(self.images):
            cells.append(prompt.convert("RGB").resize(size, Image.Resampling.BICUBIC))
            cells.extend(out.images[i * samples.per_prompt : (i + 1) * samples.per_prompt])
        return np.asarray(image_grid(cells, cols=samples.per_prompt + 1))

    def _load(self) -> tuple:
        """(base model, image encoder, the prompts' CLIP features (P, *feature_shape)), loaded once."""
        if self._models is None:
            import jax.numpy as jnp

            from ipadapter_jax.models.adapter import Adapter
            from ipadapter_jax.weights import load_base, load_image_encoder
            from ipadapter_jax.weights.load import TINY

            model, dtype = self.config.model, jnp.dtype(self.config.model.dtype)
            cache = None if model.base == TINY else paths.join(self.workdir, "flax_cache")
            base = load_base(model.base, dtype=dtype, cache_dir=cache, weights_variant=model.weights_variant or None,
                             progress=False)  # fmt: skip
            encoder = load_image_encoder(model.image_encoder, dtype=dtype)
            features = np.asarray(encoder.features(self.images, Adapter(self.image_proj, {}).kind))
            self._models = (base, encoder, features)
        return self._models


def prompt_images(config: Any, count: int) -> list[Image.Image]:
    """The sample grid's fixed image prompts: `config.samples.images` (files, local or gs://), else the first `count`
    images of the run's raw held-out or training dataset (or of the raw dataset an embedding cache was made from).

    Raises:
      ValueError: no image files are given and no raw dataset can be found.
    """
    if config.samples.images:
        return [Image.open(io.BytesIO(paths.read_bytes(path))).convert("RGB") for path in config.samples.images]
    from ipadapter_jax.data import builder, embedding_cache

    for path in (config.data.eval_path, config.data.path):
        if path and embedding_cache.is_cache(path):
            path = paths.read_json(paths.join(path, embedding_cache.CACHE_INFO)).get("raw_dataset", "")
        if path and paths.exists(paths.join(path, "dataset_info.json")):
            source = builder.raw_source(path)
            return [Image.open(io.BytesIO(source[i]["image"])).convert("RGB") for i in range(min(count, len(source)))]
    raise ValueError(
        "samples.every is set but there are no prompt images: give samples.images, or train on a raw dataset (or a "
        "cache whose raw dataset still exists)"
    )


class TensorBoard:
    """The hook: every metrics.jsonl record as scalars (it listens to `metrics`), the event files flushed (and
    uploaded, for a bucket workdir) every `log_every` steps and at the end, and every `samples.every` steps a grid
    of samples (`SampleGrid`) as the image `samples/grid`. Every process calls it (the adapter may be FSDP-split:
    gathering it is collective); process 0 writes."""

    def __init__(self, run: Any, metrics: Any):
        config = run.config
        self.every, self.samples_every, self.is_main = config.log_every, config.samples.every, run.is_main
        self.events = EventWriter(run.workdir, run.first_step) if self.is_main else None
        if self.events is not None:
            metrics.listeners.append(self.events.scalars)
        self.grid = None
        if self.samples_every:
            images = prompt_images(config, config.samples.count) if self.is_main else []
            self.grid = SampleGrid(config, run.workdir, run.comps.models.image_proj, images)

    def due(self, info: Any) -> bool:
        return info.step % self.every == 0 or info.done or self._samples_due(info)

    def _samples_due(self, info: Any) -> bool:
        return bool(self.samples_every) and (info.step % self.samples_every == 0 or info.done)

    def __call__(self, info: Any) -> None:
        if self.grid is not None and self._samples_due(info):
            from jax.experimental import multihost_utils

            adapter = multihost_utils.process_allgather(info.state.adapter, tiled=True)
            if self.events is not None:
                self.events.image("samples/grid", self.grid(adapter), info.step)
        if self.events is not None:
            self.events.flush()

    def close(self) -> None:
        """Flushes and closes the event files (process 0)."""
        if self.events is not None:
            self.events.close()
