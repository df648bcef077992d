"""Builds a TFDS dataset (array_record files, no TensorFlow) from image-caption annotations, with a skip report.

Inputs: the reference's JSON list `[{"image_file": "1.png", "text": "A dog"}, ...]` or a COCO captions file
(`{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`, one example per caption),
plus the image root folder. One example per kept entry, in annotation order:

  image       encoded bytes: the original file when it is an RGB JPEG/PNG, otherwise the image converted to
              8-bit RGB (`preprocess.to_rgb`) and stored as PNG
  text        the caption (UTF-8)
  image_file  the path as written in the annotations
  width, height     int32 size of the image
  annotation_index  int64 position of the entry in the annotations (COCO: of the annotation)

Bad entries are skipped with a reason (`SKIP_REASONS`) and the build fails only when more than
`max_skip_fraction` of all entries are skipped. The report (`build_report.json` in `out_dir`, copied into
the dataset) lists every skipped entry and every converted image.

Interruptions lose nothing already published: the dataset is generated in `out_dir/.building-*` and moved
into place only when complete. A new build after an interruption discards that partial work and starts clean.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ipadapter_jax.data import preprocess

DATASET_NAME = "ip_adapter_captions"
VERSION = "1.0.0"
REPORT_NAME = "build_report.json"

SKIP_REASONS = {
    "malformed_entry": "the entry is not an object with a string image_file and a caption",
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

# Formats kept byte for byte when already RGB; anything else is re-encoded losslessly as PNG.
_KEPT_FORMATS = ("JPEG", "PNG")


class BuildError(RuntimeError):
    """Raised when more than `max_skip_fraction` of the entries are skipped."""


@dataclasses.dataclass
class Entry:
    """One image-caption pair as the annotations state it (values not yet validated)."""

    index: int
    image_file: Any
    text: Any
    problem: str | None = None  # a skip reason known from the annotations alone


@dataclasses.dataclass
class Checked:
    """An entry after reading its image: either the stored fields or a skip reason."""

    entry: Entry
    image: bytes = b""
    width: int = 0
    height: int = 0
    converted_from: str | None = None
    reason: str | None = None
    detail: str = ""


def read_annotations(path: str | os.PathLike) -> list[Entry]:
    """Entries of a reference JSON list or of a COCO captions file, in file order.

    The file is decoded as UTF-8 with surrogate escapes so that a caption with invalid bytes becomes one
    skipped entry instead of an unreadable file.
    """
    with open(path, "rb") as f:
        data = json.loads(f.read().decode("utf-8", errors="surrogateescape"))
    if isinstance(data, list):
        return [
            Entry(i, item.get("image_file"), item.get("text"))
            if isinstance(item, dict)
            else Entry(i, None, None, "malformed_entry")
            for i, item in enumerate(data)
        ]
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        files = {image.get("id"): image.get("file_name") for image in data["images"] if isinstance(image, dict)}
        entries = []
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict):
                entries.append(Entry(i, None, None, "malformed_entry"))
            elif ann.get("image_id") not in files:
                entries.append(Entry(i, None, ann.get("caption"), "unknown_image_id"))
            else:
                entries.append(Entry(i, files[ann["image_id"]], ann.get("caption")))
        return entries
    raise ValueError(f"{path}: neither a JSON list of entries nor a COCO file with `images` and `annotations`")


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates: undecodable bytes or "\udcXX" escapes
        return False


def _printable(value: Any) -> Any:
    """`value` for the JSON report: undecodable bytes of a string shown as \\xNN escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def screen_entries(entries: Sequence[Entry]) -> None:
    """Sets `problem` on entries that are bad without looking at the image (caption, shape, duplicates).

    The first of several identical (image_file, caption) entries is kept.
    """
    seen: set[tuple[str, str]] = set()
    for entry in entries:
        if entry.problem:
            continue
        if not isinstance(entry.image_file, str) or not entry.image_file or not _utf8(entry.image_file):
            entry.problem = "malformed_entry"
        elif not isinstance(entry.text, str):
            entry.problem = "invalid_caption"
        elif not _utf8(entry.text):
            entry.problem = "non_utf8_caption"
        elif not entry.text.strip():
            entry.problem = "empty_caption"
        elif (entry.image_file, entry.text) in seen:
            entry.problem = "duplicate"
        else:
            seen.add((entry.image_file, entry.text))


def check_image(entry: Entry, image_root: str, max_aspect_ratio: float) -> Checked:
    """Reads and fully decodes the entry's image; returns what to store or why to skip it."""
    if entry.problem:
        return Checked(entry, reason=entry.problem)
    path = os.path.join(image_root, entry.image_file)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Checked(entry, reason="missing_file", detail=path)
    except OSError as e:
        return Checked(entry, reason="unreadable_image", detail=f"{path}: {type(e).__name__}: {e}")
    if not data:
        return Checked(entry, reason="empty_file", detail=path)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes everything: catches truncation past the header
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        return Checked(entry, reason="unreadable_image", detail=f"{path}: {type(e).__name__}: {e}")
    try:
        rgb = preprocess.to_rgb(image)
    except ValueError as e:
        return Checked(entry, reason="unsupported_mode", detail=f"{path}: {e}")
    width, height = rgb.size
    if max(width, height) > max_aspect_ratio * min(width, height):
        return Checked(entry, reason="extreme_aspect_ratio", detail=f"{path}: {width}x{height}")
    if image.mode == "RGB" and image.format in _KEPT_FORMATS:
        return Checked(entry, image=data, width=width, height=height)
    png = io.BytesIO()
    rgb.save(png, "PNG")
    return Checked(
        entry, image=png.getvalue(), width=width, height=height, converted_from=f"{image.format} {image.mode}"
    )


@dataclasses.dataclass
class BuildReport:
    """What the build kept, converted and skipped (every skipped entry with its reason)."""

    annotations: str
    image_root: str
    total: int
    max_skip_fraction: float
    written: int = 0
    skipped: list[dict] = dataclasses.field(default_factory=list)
    converted: list[dict] = dataclasses.field(default_factory=list)
    status: str = "running"

    def add(self, checked: Checked) -> None:
        entry = checked.entry
        if checked.reason:
            self.skipped.append(
                {
                    "index": entry.index,
                    "image_file": _printable(entry.image_file),
                    "text": _printable(entry.text),
                    "reason": checked.reason,
                    "detail": checked.detail,
                }
            )
        else:
            self.written += 1
            if checked.converted_from:
                self.converted.append(
                    {"index": entry.index, "image_file": entry.image_file, "from": checked.converted_from}
                )

    def too_many_skipped(self) -> bool:
        return len(self.skipped) > self.max_skip_fraction * self.total

    def to_json(self) -> dict:
        return {
            "status": self.status,
            "annotations": self.annotations,
            "image_root": self.image_root,
            "total": self.total,
            "written": self.written,
            "skipped": len(self.skipped),
            "skip_counts": dict(collections.Counter(s["reason"] for s in self.skipped)),
            "converted": len(self.converted),
            "max_skip_fraction": self.max_skip_fraction,
            "skip_reasons": SKIP_REASONS,
            "skipped_examples": self.skipped,
            "converted_examples": self.converted,
        }


def _write_json(path: str, data: dict) -> None:
    """Writes `data` to `path` atomically (temporary file + rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


class IpAdapterCaptions(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over checked entries: `train` split, in annotation order (TFDS shuffling disabled)."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, checked: Iterator[Checked], report: BuildReport, report_path: str, **kwargs: Any):
        self._checked = checked
        self._report = report
        self._report_path = report_path
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: `dataset_info_from_configs` needs files that only exist next to a registered builder.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image-caption pairs for IP-Adapter training (see training/builder.py).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "text": tfds.features.Text(),
                    "image_file": tfds.features.Text(),
                    "width": np.int32,
                    "height": np.int32,
                    "annotation_index": np.int64,
                }
            ),
            disable_shuffling=True,  # keys are annotation indices: records stay in annotation order
        )

    def _split_generators(self, dl_manager: Any) -> dict:
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        for checked in self._checked:
            self._report.add(checked)
            if self._report.too_many_skipped():
                self._report.status = "failed"
                _write_json(self._report_path, self._report.to_json())
                raise BuildError(
                    f"{len(self._report.skipped)} of {self._report.total} entries skipped, more than "
                    f"max_skip_fraction={self._report.max_skip_fraction}; see {self._report_path}"
                )
            if checked.reason:
                continue
            entry = checked.entry
            yield (
                entry.index,
                {
                    "image": checked.image,
                    "text": entry.text,
                    "image_file": entry.image_file,
                    "width": checked.width,
                    "height": checked.height,
                    "annotation_index": entry.index,
                },
            )


def dataset_dir(out_dir: str | os.PathLike) -> str:
    """Where `build_dataset(..., out_dir)` publishes the dataset (the directory the loader opens)."""
    return os.path.join(os.fspath(out_dir), DATASET_NAME, VERSION)


def build_dataset(
    annotations: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_skip_fraction: float = 0.05,
    max_aspect_ratio: float = 20.0,
    num_threads: int = 8,
    overwrite: bool = False,
) -> tuple[str, dict]:
    """Builds the dataset; returns (dataset directory, report dict).

    Args:
      annotations: reference JSON list or COCO captions file.
      image_root: folder the image paths are relative to.
      out_dir: output folder; the dataset lands in `dataset_dir(out_dir)`, the report in
        `out_dir/build_report.json`.
      max_skip_fraction: the build fails (BuildError, nothing published) once more entries are skipped.
      max_aspect_ratio: images with long/short side above this are skipped (the shortest-side resize of a
        1000:1 strip would need gigabytes).
      num_threads: threads decoding images (PIL releases the GIL while decoding).
      overwrite: replace an existing dataset; otherwise an existing one is an error.
    """
    out_dir, image_root = os.fspath(out_dir), os.fspath(image_root)
    final_dir = dataset_dir(out_dir)
    if os.path.exists(final_dir) and not overwrite:
        raise FileExistsError(f"{final_dir} exists; pass overwrite=True (--overwrite) to rebuild it")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # partial work of an interrupted build: start clean
        if name.startswith(".building-"):
            shutil.rmtree(os.path.join(out_dir, name))

    entries = read_annotations(annotations)
    screen_entries(entries)
    report = BuildReport(os.fspath(annotations), image_root, len(entries), max_skip_fraction)
    report_path = os.path.join(out_dir, REPORT_NAME)
    # Threads decode ahead of the writer; grain keeps the output in annotation order.
    checked = iter(
        grain.MapDataset.source(entries)
        .map(lambda entry: check_image(entry, image_root, max_aspect_ratio))
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * num_threads))
    )

    build_root = tempfile.mkdtemp(prefix=".building-", dir=out_dir)
    builder = IpAdapterCaptions(
        checked=checked, report=report, report_path=report_path, data_dir=build_root, file_format="array_record"
    )
    try:
        builder.download_and_prepare()
    except BaseException:
        if report.status == "running":  # interrupted or crashed, not failed on the skip fraction
            report.status = "interrupted"
            _write_json(report_path, report.to_json())
        shutil.rmtree(build_root)
        raise
    report.status = "complete"
    _write_json(report_path, report.to_json())
    shutil.copy(report_path, os.path.join(builder.data_dir, REPORT_NAME))

    # Publish: the old dataset (if overwriting) stays readable until the new one is complete.
    if os.path.exists(final_dir):
        old = tempfile.mkdtemp(prefix=".building-old-", dir=out_dir)
        os.replace(final_dir, os.path.join(old, VERSION))
    os.makedirs(os.path.dirname(final_dir), exist_ok=True)
    os.replace(builder.data_dir, final_dir)
    for name in os.listdir(out_dir):
        if name.startswith(".building-"):
            shutil.rmtree(os.path.join(out_dir, name))
    return final_dir, report.to_json()


def raw_source(path: str | os.PathLike, split: str = "train") -> Any:
    """Random-access source over a built dataset (`dataset_dir(out_dir)`): `len()`, `[i]` -> record dict
    with `image` as encoded bytes (decoded later by the loader's preprocessing, not by TFDS), `text` and
    `image_file` as UTF-8 bytes, `width`, `height`, `annotation_index` as numpy ints. Picklable (grain
    workers)."""
    builder = tfds.builder_from_directory(os.fspath(path))
    return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
