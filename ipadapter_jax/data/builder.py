"""Builds a TFDS dataset (array_record files, no TensorFlow) from image-caption annotations, with a skip report.

Inputs: the reference's JSON list `[{"image_file": "1.png", "text": "A dog"}, ...]` or a COCO captions file
(`annotations.py`), plus the image root folder. One example per kept entry, in annotation order:

  image       encoded bytes: the original file when it is an RGB JPEG/PNG, otherwise the image converted to
              8-bit RGB (`ipadapter_jax.data.rgb.to_rgb`, as training's preprocessing) and stored as PNG
  text        the caption (UTF-8)
  image_file  the path as written in the annotations
  width, height     int32 size of the image
  annotation_index  int64 position of the entry in the annotations (COCO: of the annotation)
  face_embeds       float32 (D,), only when the entries name identity-embedding .npy files (`face_embeds.py`)

Bad entries are skipped with a reason (`SKIP_REASONS`) and the build fails only when more than
`max_skip_fraction` of all entries are skipped. The report (`build_report.json` in `out_dir`, copied into
the dataset) lists every skipped entry and every converted image.

How it is written, and why not with a TFDS builder (measured with tensorflow_datasets 4.9.10, no TensorFlow):
- `GeneratorBasedBuilder.download_and_prepare()` sends every example through `shuffle.Shuffler`, even with
  `disable_shuffling=True` (that only sorts by key): the whole split is held in memory up to 1000 MiB, then
  spilled through `tf.io.gfile`, which needs TensorFlow. 400 examples of 1 MiB peaked at 499 MiB of RSS.
  `DownloadConfig(nondeterministic_order=True)` only changes Beam pipelines (apache_beam is not installed);
  `max_examples_per_split` truncates. So it cannot build a dataset over ~1 GB here.
- `ShardBasedBuilder` streams shard by shard (151 MiB on the same 400 MiB), but it cannot resume: it writes
  into `incomplete.<random>_1.0.0`, deletes it on any exception, and a rerun starts over in a new one.
- So the shards are written here (`shards.py`): TFDS's own example encoding and array_record options, one shard
  at a time under a temporary name, renamed when complete and listed in a progress file, and TFDS's
  `DatasetInfo.write_to_directory` for `dataset_info.json` / `features.json`. `tfds.builder_from_directory`
  reads the result exactly as it read the builder's (same features, records, file names, metadata).

Memory stays bounded whatever the dataset size: annotations are streamed (`annotations.py`), images are read
and checked by `num_threads` threads at most `4 * num_threads` entries and `FILES_IN_FLIGHT_BYTES` of files
ahead of the writer, full decodes share a `DECODE_BYTES` budget (eight 8000x8000 PNGs do not decode at once),
one shard is open at a time, and the report's lists are kept on disk (`build_report.py`).

Interruptions lose at most one shard: a rerun of the same command (same annotations file, root and limits)
continues after the last complete shard, even after SIGKILL; other settings are refused (or start over with
`overwrite`). Nothing is published until complete: the dataset is finished in `out_dir/.building-*` and moved
into place at the end, the old one kept until then. A lock file in `out_dir` (`ipadapter_jax.locks`) keeps a second
build off the same folder. Images are assumed unchanged between an interrupted run and its resumption. Buckets
(gs://; array_record writes POSIX files only): built in the local mirror (`ipadapter_jax.staging`, resumable there),
uploaded with `dataset_info.json` last; bucket annotations and images are staged to local disk first.
"""

from __future__ import annotations

import collections
import logging
import math
import numbers
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import tensorflow_datasets as tfds
import tqdm

from ipadapter_jax import locks, paths
from ipadapter_jax import staging as bucket_staging
from ipadapter_jax.data import build_report, face_embeds, image_check, shards
from ipadapter_jax.data.annotations import Entry, read_annotations, scan_annotations, screen_entries
from ipadapter_jax.data.image_check import check_image

__all__ = ["Entry", "read_annotations", "screen_entries", "check_image", "build_dataset", "dataset_dir", "raw_source"]

logger = logging.getLogger(__name__)

DATASET_NAME = shards.DATASET_NAME
VERSION = shards.VERSION
REPORT_NAME = "build_report.json"
LOCK_NAME = ".data-build.lock"  # in out_dir, held while a build writes there
SHARD_EXAMPLES = 10_000  # a shard closes at this many examples ...
SHARD_BYTES = 128 << 20  # ... or this many bytes of records (what an interrupted build can lose)
SHARD_REPORT_ENTRIES = 10_000  # ... or this many skipped / converted entries waiting for the progress file
FILES_IN_FLIGHT_BYTES = 256 << 20  # image files read ahead of the writer

SKIP_REASONS = {
    "malformed_entry": "the entry is not an object with a string image_file and a caption",
    "outside_root": "the image path is absolute or leaves the image root with `..`",
    "unknown_image_id": "COCO annotation whose image_id is not in `images`",
    "invalid_caption": "the caption is not a string",
    "empty_caption": "the caption is empty or whitespace",
    "non_utf8_caption": "the caption holds bytes that are not valid UTF-8",
    "duplicate": "same image_file and caption as an earlier entry",
    "missing_file": "the image file does not exist",
    "empty_file": "the image file has zero bytes",
    "unreadable_image": "PIL cannot decode the file (corrupt, truncated, unknown format, too large)",
    "unsupported_mode": "an image mode with no 8-bit RGB meaning (float)",
    "extreme_aspect_ratio": "long/short side above max_aspect_ratio",
}


class BuildError(RuntimeError):
    """The build cannot produce a dataset: too many entries skipped, or none could be written."""


def _check_and_encode(entry: Entry, image_root: str, max_aspect_ratio: float, encode: Callable,
                      face_embed_dim: int | None = None) -> tuple:  # fmt: skip
    """(Checked, the serialized record or None): the whole per-entry work, on a worker thread. An entry's
    face_embeds file that is missing or not float32 (face_embed_dim,) raises ValueError (`face_embeds.py`)."""
    checked = check_image(entry, image_root, max_aspect_ratio)
    if checked.reason:
        return checked, None
    example = {"image": checked.image, "text": entry.text, "image_file": entry.image_file,
               "width": checked.width, "height": checked.height, "annotation_index": entry.index}  # fmt: skip
    if entry.face_embeds is not None:
        path = face_embeds.face_embeds_file(entry, image_root)
        example[face_embeds.KEY] = face_embeds.read_face_embeds(path, face_embed_dim)
    record = encode(example)
    checked.image = b""  # the record holds the bytes now
    return checked, record


def _file_size(entry: Entry, image_root: str) -> int:
    """What reading the entry's image holds until it is written (1 + its size: a missing file counts too)."""
    try:
        return 1 + os.stat(os.path.join(image_root, entry.image_file)).st_size
    except OSError:
        return 1


def _checked_in_order(entries: Iterator[Entry], image_root: str, max_aspect_ratio: float, num_threads: int,
                      encode: Callable, face_embed_dim: int | None = None) -> Iterator[tuple]:  # fmt: skip
    """`_check_and_encode` over `entries` on `num_threads` threads, results in order, with a bounded read-ahead."""
    pool = futures.ThreadPoolExecutor(num_threads, thread_name_prefix="data-build")
    window: collections.deque = collections.deque()  # (future or result, file bytes)
    held = 0
    try:
        for entry in entries:
            cost = 0 if entry.problem else _file_size(entry, image_root)
            while window and (len(window) >= 4 * num_threads or held + cost > FILES_IN_FLIGHT_BYTES):
                item, item_cost = window.popleft()
                held -= item_cost
                yield item.result() if isinstance(item, futures.Future) else item
            if entry.problem:
                window.append(((image_check.Checked(entry, reason=entry.problem), None), 0))
            else:
                work = pool.submit(_check_and_encode, entry, image_root, max_aspect_ratio, encode, face_embed_dim)
                window.append((work, cost))
                held += cost
        while window:
            item, _ = window.popleft()
            yield item.result() if isinstance(item, futures.Future) else item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _validate(max_skip_fraction: float, max_aspect_ratio: float, num_threads: int, shard_examples: int,
              shard_bytes: int) -> None:  # fmt: skip
    def number(value: Any) -> float:
        return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan

    if not 0 <= number(max_skip_fraction) <= 1:
        raise ValueError(f"max_skip_fraction must be a fraction in [0, 1], got {max_skip_fraction!r}")
    if not 1 <= number(max_aspect_ratio) < math.inf:
        raise ValueError(f"max_aspect_ratio must be a finite number >= 1 (long side / short side), "
                         f"got {max_aspect_ratio!r}")  # fmt: skip
    for name, value in (("num_threads", num_threads), ("shard_examples", shard_examples),
                        ("shard_bytes", shard_bytes)):  # fmt: skip
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def dataset_dir(out_dir: str | os.PathLike) -> str:
    """Where `build_dataset(..., out_dir)` publishes the dataset (the directory the loader opens)."""
    return paths.join(out_dir, DATASET_NAME, VERSION)


def build_dataset(
    annotations: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_skip_fraction: float = 0.05,
    max_aspect_ratio: float = 20.0,
    num_threads: int = 8,
    overwrite: bool = False,
    shard_examples: int = SHARD_EXAMPLES,
    shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
) -> tuple[str, dict]:
    """Builds the dataset (or resumes an interrupted build of it); returns (dataset directory, report dict).

    Args:
      annotations: reference JSON list or COCO captions file.
      image_root: folder the image paths are relative to (paths leaving it are skipped as `outside_root`).
      out_dir: output folder; the dataset lands in `dataset_dir(out_dir)`, the report in
        `out_dir/build_report.json`.
      max_skip_fraction: in [0, 1]; the build fails (BuildError, nothing published) once more entries are skipped.
      max_aspect_ratio: >= 1; images with long/short side above this are skipped (the shortest-side resize of a
        1000:1 strip would need gigabytes).
      num_threads: threads decoding images (PIL releases the GIL while decoding).
      overwrite: replace an existing dataset, and discard a partial build made with other settings; otherwise
        either is an error.
      shard_examples, shard_bytes: a shard closes at this many examples or bytes of records.
      progress: show a progress bar.

    The returned report lists at most `build_report.RETURNED_EXAMPLES` skipped / converted entries each; the
    report file lists all of them.
    """
    _validate(max_skip_fraction, max_aspect_ratio, num_threads, shard_examples, shard_bytes)
    options = dict(max_skip_fraction=max_skip_fraction, max_aspect_ratio=max_aspect_ratio, num_threads=num_threads,
                   shard_examples=shard_examples, shard_bytes=shard_bytes, progress=progress)  # fmt: skip
    if paths.is_remote(out_dir):  # built in the local mirror, then uploaded with dataset_info.json last
        remote, mirror = os.fspath(out_dir), bucket_staging.mirror(out_dir)
        with locks.locked(remote, LOCK_NAME, "`data build`"):
            if paths.exists(dataset_dir(remote)) and not overwrite:
                raise FileExistsError(f"{dataset_dir(remote)} exists; pass overwrite=True (--overwrite) to rebuild it")
            shutil.rmtree(dataset_dir(mirror), ignore_errors=True)  # the local copy of an earlier upload
            local, report = build_dataset(annotations, image_root, mirror, overwrite=overwrite, **options)
            return shards.upload_dataset(local, remote, os.path.join(mirror, REPORT_NAME)), report
    annotations = bucket_staging.stage_down(annotations, what="annotations", progress=progress)
    image_root = bucket_staging.stage_down(image_root, what="images", progress=progress)
    out_dir, image_root, annotations = os.fspath(out_dir), os.fspath(image_root), os.fspath(annotations)
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{image_root}: the image folder does not exist; likely cause: a wrong --root")
    final_dir = dataset_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with locks.locked(out_dir, LOCK_NAME, "`data build`"):
        if os.path.exists(final_dir) and not overwrite:
            raise FileExistsError(f"{final_dir} exists; pass overwrite=True (--overwrite) to rebuild it")
        scan = scan_annotations(annotations)
        if scan.total == 0:
            raise BuildError(f"{annotations}: nothing could be written: the file holds no entries; likely cause: "
                             "an empty list, or a COCO file without annotations")  # fmt: skip
        settings = {"format": 1, "annotations_sha256": scan.sha256, "annotations_bytes": scan.size,
                    "image_root": os.path.realpath(image_root), "max_aspect_ratio": float(max_aspect_ratio),
                    "shard_examples": int(shard_examples), "shard_bytes": int(shard_bytes)}  # fmt: skip
        face_embed_dim = face_embeds.face_embed_dim(scan, image_root)
        if face_embed_dim is not None:  # only then: earlier partial builds without identity embeddings still resume
            settings["face_embed_dim"] = face_embed_dim
        staging = shards.Staging.open(out_dir, settings, overwrite)
        report = build_report.BuildReport(annotations, image_root, scan.total, float(max_skip_fraction), SKIP_REASONS)
        report.restore(staging.shards, staging.next_entry)
        if staging.next_entry:
            logger.warning("warning: resuming the interrupted build in %s after entry %d of %d (%d shards done)",
                           staging.root, staging.next_entry, scan.total, len(staging.shards))  # fmt: skip
        report_path = os.path.join(out_dir, REPORT_NAME)
        try:
            _write_shards(scan, staging, report, report_path, image_root, max_aspect_ratio, num_threads,
                          (shard_examples, shard_bytes), progress, face_embed_dim)  # fmt: skip
            version_dir = staging.finish(face_embed_dim)
        except BuildError:
            report.status = "failed"
            report.write(report_path, staging.items)
            staging.discard()
            raise
        except BaseException:
            report.status = "interrupted"  # the staging folder stays: a rerun resumes it
            staging.abandon()
            report.write(report_path, staging.items)
            raise
        report.status = "complete"
        report.write(report_path, staging.items)
        shutil.copy(report_path, os.path.join(version_dir, REPORT_NAME))
        shards.publish(out_dir, version_dir, final_dir)
        staging.discard()
        return final_dir, build_report.returned(report_path)


def _write_shards(scan: Any, staging: shards.Staging, report: build_report.BuildReport, report_path: str,
                  image_root: str, max_aspect_ratio: float, num_threads: int, limits: tuple[int, int],
                  progress: bool, face_embed_dim: int | None) -> None:  # fmt: skip
    """Checks and writes the entries after the last complete shard, committing a shard at each limit."""
    shard_examples, shard_bytes = limits
    results = _checked_in_order(scan.entries(staging.next_entry), image_root, max_aspect_ratio, num_threads,
                                shards.Encoder(face_embed_dim), face_embed_dim)  # fmt: skip
    bar = tqdm.tqdm(total=scan.total, initial=staging.next_entry, desc="data build", unit=" entries",
                    disable=not progress, mininterval=1.0)  # fmt: skip
    try:
        _check_skips(report, report_path)
        for checked, record in results:
            report.add(checked)
            _check_skips(report, report_path)
            if record is not None:
                staging.write(record)
            if (staging.examples >= shard_examples or staging.bytes >= shard_bytes
                    or report.pending() >= SHARD_REPORT_ENTRIES):  # fmt: skip
                staging.commit(checked.entry.index + 1, report.take())
            bar.update()
        if staging.next_entry < scan.total:
            staging.commit(scan.total, report.take())
    finally:
        results.close()
        bar.close()
    if report.written == 0:
        raise BuildError(
            f"{report.annotations}: nothing could be written: all {report.total} entries were skipped "
            f"({_counts(report)}); see {report_path}; likely cause: a wrong --root or unreadable images"
        )


def _check_skips(report: build_report.BuildReport, report_path: str) -> None:
    if report.too_many_skipped():
        raise BuildError(
            f"{report.annotations}: {report.skipped} of {report.total} entries skipped, more than "
            f"max_skip_fraction={report.max_skip_fraction} ({_counts(report)}); see {report_path}"
        )


def _counts(report: build_report.BuildReport) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in report.skip_counts.most_common())


def raw_source(path: str | os.PathLike, split: str = "train") -> Any:
    """Random-access source over a built dataset (`dataset_dir(out_dir)`): `len()`, `[i]` -> record dict
    with `image` as encoded bytes (decoded later by the loader's preprocessing, not by TFDS), `text` and
    `image_file` as UTF-8 bytes, `width`, `height`, `annotation_index` as numpy ints. Picklable (grain
    workers). A bucket dataset (gs://) is read from a local copy (`staging.stage_down`): array_record's reader would
    hang on the URL."""
    if paths.is_remote(path) and not paths.exists(paths.join(path, "dataset_info.json")):
        raise FileNotFoundError(f"{path}: no complete dataset there (no dataset_info.json)")
    builder = tfds.builder_from_directory(bucket_staging.stage_down(path, what="dataset"))
    return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
