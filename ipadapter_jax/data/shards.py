"""The dataset's files, written as TFDS writes them but one shard at a time, resumably, without TensorFlow.

Records are TFDS's own encoding (`FeaturesDict.encode_example` + `ExampleSerializer`), written with array_record's
`ArrayRecordWriter(path, "group_size:1")` (TFDS's array_record options); `dataset_info.json` and `features.json`
come from TFDS's `DatasetInfo.write_to_directory`, so `tfds.builder_from_directory` reads the result as it
reads a `GeneratorBasedBuilder`'s output. Why not TFDS's builders, see `builder.py`.

Staging (`out/.building-ip_adapter_captions/`), one build at a time (the output lock):

  settings.json         what the build depends on (annotations file hash, image root, limits); a rerun with other
                        settings is refused (or starts over with --overwrite)
  shard-00003.array_record.partial   the shard being written (deleted by a rerun)
  shard-00002.array_record           complete: closed, fsynced, renamed, then listed in progress.jsonl
  progress.jsonl        one line per complete shard: its entry range [start, end), examples, bytes and the
                        skipped / converted entries of that range (the report is assembled from these lines)
  ip_adapter_captions/1.0.0/         the finished dataset (shards renamed `...-00000-of-00042`), then published

A rerun continues after the last shard listed in progress.jsonl; listed shards are checked (file and size).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer, naming
from tensorflow_datasets.core import splits as splits_lib

from ipadapter_jax import paths, staging

DATASET_NAME = "ip_adapter_captions"
VERSION = "1.0.0"
STAGING_NAME = f".building-{DATASET_NAME}"
SETTINGS_NAME = "settings.json"
PROGRESS_NAME = "progress.jsonl"
_DESCRIPTION = "Image-caption pairs for IP-Adapter training (see ipadapter_jax/data/builder.py)."
_MODULE = "ipadapter_jax.data.builder"  # the `moduleName` TFDS records; what earlier builds recorded


def features(face_embed_dim: int | None = None) -> tfds.features.FeaturesDict:
    """The dataset's features (`builder.py`), with float32 `face_embeds` (face_embed_dim,) when the annotations name
    identity embeddings (`face_embeds.py`)."""
    spec = {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "text": tfds.features.Text(),
        "image_file": tfds.features.Text(),
        "width": np.int32,
        "height": np.int32,
        "annotation_index": np.int64,
    }
    if face_embed_dim is not None:
        spec["face_embeds"] = tfds.features.Tensor(shape=(face_embed_dim,), dtype=np.float32)
    return tfds.features.FeaturesDict(spec)


class Encoder:
    """Example dict -> the serialized record TFDS would write (thread-safe)."""

    def __init__(self, face_embed_dim: int | None = None):
        self.features = features(face_embed_dim)
        self._serializer = example_serializer.ExampleSerializer(self.features.get_serialized_info())

    def __call__(self, example: dict[str, Any]) -> bytes:
        return self._serializer.serialize_example(self.features.encode_example(example))


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.array_record"


def _final_name(index: int, count: int) -> str:
    return f"{DATASET_NAME}-train.array_record-{index:05d}-of-{count:05d}"


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagingMismatchError(ValueError):
    """The staging folder holds a partial build made with other settings."""


class Staging:
    """The partial build of one output folder: complete shards, the one being written, the progress file."""

    def __init__(self, root: str, shards: list[dict]):
        self.root, self.shards = root, shards
        self.version_dir = os.path.join(root, DATASET_NAME, VERSION)
        self._writer: Any = None
        self.examples = self.bytes = 0  # of the shard being written

    @classmethod
    def open(cls, out_dir: str, settings: dict, overwrite: bool) -> Staging:
        """The staging folder for `settings`: resumed when it holds a partial build with the same settings,
        created otherwise. A partial build with other settings is discarded with `overwrite`, refused without."""
        root = os.path.join(out_dir, STAGING_NAME)
        for name in os.listdir(out_dir):  # leftovers of earlier builds' temporary folders
            if name.startswith(".building-") and name != STAGING_NAME:
                shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
        if os.path.isdir(root):
            try:
                with open(os.path.join(root, SETTINGS_NAME)) as f:
                    found = json.load(f)
            except (OSError, ValueError):
                found = None  # interrupted while starting: nothing worth keeping
            if found == settings:
                return cls(root, _valid_shards(root))
            if found is not None and not overwrite:
                changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
                raise StagingMismatchError(
                    f"{root}: holds a partial build with other settings (changed: {', '.join(changed)}); "
                    "likely cause: the annotations file, --root or a limit changed since that build was "
                    "interrupted: rerun it with the same settings to resume it, or pass --overwrite to discard it"
                )
            shutil.rmtree(root)
        os.makedirs(root)
        _write_json(os.path.join(root, SETTINGS_NAME), settings)
        return cls(root, [])

    @property
    def next_entry(self) -> int:
        """The first entry not covered by a complete shard."""
        return self.shards[-1]["end"] if self.shards else 0

    def write(self, record: bytes) -> None:
        """Appends a record to the shard being written."""
        if self._writer is None:
            from array_record.python import array_record_module

            self._writer = array_record_module.ArrayRecordWriter(self._path(len(self.shards)) + ".partial",
                                                                 "group_size:1")  # fmt: skip
        self._writer.write(record)
        self.examples += 1
        self.bytes += len(record)

    def _path(self, index: int) -> str:
        return os.path.join(self.root, _shard_name(index))

    def commit(self, end: int, items: dict) -> None:
        """Completes the shard being written: it covers the entries up to `end` (exclusive); `items` holds the
        report's entries of that range (`skipped`, `converted`, `skip_counts`)."""
        index = len(self.shards)
        record = {"shard": index, "start": self.next_entry, "end": end, "examples": self.examples,
                  "bytes": self.bytes, "file": None, "file_bytes": 0, **items}  # fmt: skip
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            path = self._path(index)
            _fsync_file(path + ".partial")
            os.replace(path + ".partial", path)
            record["file"], record["file_bytes"] = _shard_name(index), os.path.getsize(path)
        with open(os.path.join(self.root, PROGRESS_NAME), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.shards.append({k: v for k, v in record.items() if k not in ("skipped", "converted")})
        self.examples = self.bytes = 0

    def abandon(self) -> None:
        """Closes the shard being written (it is rewritten by the next run)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def items(self, kind: str) -> Iterator[dict]:
        """The report entries of one kind (`skipped` or `converted`) of the complete shards, in order."""
        for record in _progress(self.root)[: len(self.shards)]:
            yield from record[kind]

    def finish(self, face_embed_dim: int | None = None) -> str:
        """Names the shards as TFDS does and writes TFDS's metadata (`features(face_embed_dim)`); returns the dataset
        folder."""
        os.makedirs(self.version_dir, exist_ok=True)
        files = [shard for shard in self.shards if shard["file"]]
        for i, shard in enumerate(files):
            source = os.path.join(self.root, shard["file"])
            if os.path.exists(source):
                os.replace(source, os.path.join(self.version_dir, _final_name(i, len(files))))
        ident = tfds.core.DatasetIdentity(name=DATASET_NAME, version=tfds.core.Version(VERSION),
                                          data_dir=self.version_dir, module_name=_MODULE)  # fmt: skip
        info = tfds.core.DatasetInfo(
            builder=ident,
            description=_DESCRIPTION,
            features=features(face_embed_dim),
            disable_shuffling=True,
        )  # fmt: skip  (records stay in annotation order)
        info.set_file_format("array_record")
        template = naming.ShardedFileTemplate(data_dir=self.version_dir, dataset_name=DATASET_NAME, split="train",
                                              filetype_suffix="array_record")  # fmt: skip
        split = splits_lib.SplitInfo(name="train", shard_lengths=[s["examples"] for s in files],
                                     num_bytes=sum(s["bytes"] for s in files), filename_template=template)  # fmt: skip
        info.set_splits(splits_lib.SplitDict([split]))
        info.write_to_directory(self.version_dir)
        return self.version_dir

    def discard(self) -> None:
        self.abandon()
        shutil.rmtree(self.root, ignore_errors=True)


def _progress(root: str) -> list[dict]:
    """The progress file's records; a last line cut short by a kill is ignored."""
    records = []
    try:
        with open(os.path.join(root, PROGRESS_NAME)) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    break
    except FileNotFoundError:
        pass
    return records


def _valid_shards(root: str) -> list[dict]:
    """The complete shards a resumed build keeps: the progress file's records while they chain and their files
    are there; anything after the first gap (and every partial or unlisted file) is removed."""
    records, kept = _progress(root), []
    version_dir = os.path.join(root, DATASET_NAME, VERSION)
    count = sum(1 for r in records if r.get("file"))
    for record in records:
        if record.get("shard") != len(kept) or record.get("start") != (kept[-1]["end"] if kept else 0):
            break
        if record.get("file"):
            candidates = [
                os.path.join(root, record["file"]),  # or already renamed by an interrupted finish
                os.path.join(version_dir, _final_name(sum(1 for k in kept if k["file"]), count)),
            ]
            if not any(os.path.exists(p) and os.path.getsize(p) == record["file_bytes"] for p in candidates):
                break
        kept.append(record)
    if len(kept) < len(records):
        if os.path.isdir(version_dir):  # a finish started, so every shard was complete: the folder was altered
            kept = []
            shutil.rmtree(version_dir)
        with open(os.path.join(root, PROGRESS_NAME) + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(os.path.join(root, PROGRESS_NAME) + ".tmp", os.path.join(root, PROGRESS_NAME))
    listed = {r["file"] for r in kept if r["file"]}
    for name in os.listdir(root):
        if name.startswith("shard-") and name not in listed:
            os.remove(os.path.join(root, name))
    return [{k: v for k, v in r.items() if k not in ("skipped", "converted")} for r in kept]


def _write_json(path: str, data: dict) -> None:
    """Writes `data` to `path` atomically (temporary file + rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def publish(out_dir: str, version_dir: str, final_dir: str) -> None:
    """Moves the finished dataset into place; the old one (if overwriting) stays readable until then."""
    old = None
    if os.path.exists(final_dir):
        old = tempfile.mkdtemp(prefix=".building-old-", dir=out_dir)
        os.replace(final_dir, os.path.join(old, VERSION))
    os.makedirs(os.path.dirname(final_dir), exist_ok=True)
    os.replace(version_dir, final_dir)
    if old:
        shutil.rmtree(old)


def upload_dataset(local_dir: str, remote_out: str, report: str) -> str:
    """Uploads a dataset built locally to `remote_out/<name>/<version>` (an older one there is deleted first;
    `dataset_info.json` and `features.json` go last: readers take the dataset as complete once they exist) and its
    report to `remote_out/build_report.json`; returns the dataset's URL."""
    remote_dir = paths.join(remote_out, DATASET_NAME, VERSION)
    paths.rmtree(remote_dir)
    staging.upload(local_dir, remote_dir, what="dataset", last=("dataset_info.json", "features.json"))
    staging.upload(report, paths.join(remote_out, os.path.basename(report)), what="build report", progress=False)
    return remote_dir
