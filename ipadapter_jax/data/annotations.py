"""Image-caption annotations for the dataset build: reading (streamed for the reference JSON list), the checks
that need no image (captions, paths, duplicates) and the file's identity for resuming a build.

Formats: the reference's JSON list `[{"image_file": "1.png", "text": "A dog"}, ...]`, read item by item so that
memory does not grow with the file (LAION-sized lists), or a COCO captions file
(`{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`, one entry per caption), loaded
whole (its `images` may come after its `annotations`; COCO's own files are ~100 MB). Files are decoded as UTF-8
with surrogate escapes, so that a caption with invalid bytes becomes one skipped entry, not an unreadable file.

Duplicates (same image_file and caption as an earlier entry; the first is kept) are found in one pass before
the build (`scan_annotations`) with 16-byte hashes in numpy arrays: 24 bytes per entry, no Python objects.
"""

from __future__ import annotations

import array
import codecs
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

_CHUNK = 1 << 20  # bytes read at a time while streaming a JSON list
_MAX_ITEM = 64 << 20  # an undecodable item longer than this is a syntax error, not a cut one


@dataclasses.dataclass
class Entry:
    """One image-caption pair as the annotations state it (values not yet validated)."""

    index: int
    image_file: Any
    text: Any
    problem: str | None = None  # a skip reason known from the annotations alone
    face_embeds: Any = None  # the entry's identity-embedding .npy file, if it names one (`face_embeds.py`)


def _not_json(path: str, err: json.JSONDecodeError, offset: int = 0) -> ValueError:
    return ValueError(
        f"{path}: not valid JSON ({err.msg} at character {offset + err.pos}); likely cause: not a captions file "
        '(a JSON list of {"image_file", "text"} or COCO captions), or a truncated or corrupted copy'
    )


class _Chunks:
    """The file's text in chunks (UTF-8 with surrogate escapes), hashing the raw bytes on the way."""

    def __init__(self, path: str):
        self.path, self.sha256, self.size = path, hashlib.sha256(), 0
        self._file = open(path, "rb")  # noqa: SIM115  (closed by close())
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")

    def read(self) -> str:
        """The next piece of text ('' at the end)."""
        while True:
            data = self._file.read(_CHUNK)
            self.sha256.update(data)
            self.size += len(data)
            text = self._decoder.decode(data, final=not data)
            if text or not data:
                return text

    def close(self) -> None:
        self._file.close()


def _iter_list(chunks: _Chunks, buffer: str, pos: int) -> Iterator[Any]:
    """Items of a top-level JSON list whose `[` is at buffer[pos], reading more text as needed."""
    decoder, consumed, eof = json.JSONDecoder(), 0, False
    pos += 1
    expect_item = None  # None: an item or `]`; True: an item; False: `,` or `]`
    while True:
        while pos < len(buffer) and buffer[pos] in " \t\n\r":
            pos += 1
        if pos == len(buffer):
            if eof:
                raise _not_json(chunks.path, json.JSONDecodeError("unterminated list", buffer, pos), consumed)
            more = chunks.read()
            eof = not more
            consumed, buffer, pos = consumed + pos, buffer[pos:] + more, 0
            continue
        char = buffer[pos]
        if expect_item is not True and char == "]":
            rest = buffer[pos + 1 :]
            while not rest.strip() and not eof:  # only whitespace may follow (and the hash covers it all)
                rest = chunks.read()
                eof = not rest
            if rest.strip():
                raise _not_json(chunks.path, json.JSONDecodeError("extra data", buffer, pos + 1), consumed)
            return
        if expect_item is False:
            if char != ",":
                raise _not_json(chunks.path, json.JSONDecodeError("expecting ',' or ']'", buffer, pos), consumed)
            pos, expect_item = pos + 1, True
            continue
        try:
            item, end = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError as err:
            if eof or len(buffer) - pos > _MAX_ITEM:
                raise _not_json(chunks.path, err, consumed) from None
            end = len(buffer)  # maybe cut by the chunk boundary: read more and retry
        if end == len(buffer) and not eof:  # a number may continue in the next chunk
            more = chunks.read()
            eof = not more
            consumed, buffer, pos = consumed + pos, buffer[pos:] + more, 0
            continue
        yield item
        pos, expect_item = end, False


def _entries(path: str, chunks: _Chunks) -> Iterator[Entry]:
    buffer = chunks.read()
    pos = len(buffer) - len(buffer.lstrip())
    while pos == len(buffer) and buffer:  # only whitespace so far
        buffer = chunks.read()
        pos = len(buffer) - len(buffer.lstrip())
    if buffer[pos : pos + 1] == "[":
        for i, item in enumerate(_iter_list(chunks, buffer, pos)):
            yield _list_entry(i, item)
        return
    text = buffer + "".join(iter(chunks.read, ""))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise _not_json(path, err) from None
    del text
    if not (isinstance(data, dict) and isinstance(data.get("images"), list) and "annotations" in data):
        raise ValueError(
            f"{path}: neither a JSON list of entries nor a COCO file with `images` and `annotations`; likely cause: "
            'a different annotation format (convert it to [{"image_file": ..., "text": ...}, ...])'
        )
    files = {image.get("id"): image.get("file_name") for image in data["images"] if isinstance(image, dict)}
    annotations = data["annotations"] if isinstance(data["annotations"], list) else []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            yield Entry(i, None, None, "malformed_entry")
        elif ann.get("image_id") not in files:
            yield Entry(i, None, ann.get("caption"), "unknown_image_id")
        else:
            yield Entry(i, files[ann["image_id"]], ann.get("caption"))


def _list_entry(index: int, item: Any) -> Entry:
    if isinstance(item, dict):
        return Entry(index, item.get("image_file"), item.get("text"), face_embeds=item.get("face_embeds"))
    return Entry(index, None, None, "malformed_entry")


def iter_annotations(path: str | os.PathLike, start: int = 0) -> Iterator[Entry]:
    """Entries of a reference JSON list or of a COCO captions file, in file order, from index `start`.

    Raises ValueError naming the file when it is not JSON or not one of the two formats."""
    path = os.fspath(path)
    chunks = _Chunks(path)
    try:
        for entry in _entries(path, chunks):
            if entry.index >= start:
                yield entry
    finally:
        chunks.close()


def read_annotations(path: str | os.PathLike) -> list[Entry]:
    """All entries of the file (`iter_annotations`), as a list."""
    return list(iter_annotations(path))


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates: undecodable bytes or "\udcXX" escapes
        return False


def outside_root(image_file: str) -> bool:
    """True for a path that does not stay inside the image root: absolute, or escaping it with `..`."""
    if os.path.isabs(image_file) or image_file.startswith(("/", "\\")):
        return True
    return os.path.normpath(image_file.replace("\\", "/")).split("/")[0] == ".."


def screen(entry: Entry) -> str | None:
    """The skip reason of an entry that is bad without looking at its image (duplicates aside), or None."""
    if entry.problem:
        return entry.problem
    if not isinstance(entry.image_file, str) or not entry.image_file or not _utf8(entry.image_file):
        return "malformed_entry"
    if outside_root(entry.image_file):
        return "outside_root"
    if not isinstance(entry.text, str):
        return "invalid_caption"
    if not _utf8(entry.text):
        return "non_utf8_caption"
    if not entry.text.strip():
        return "empty_caption"
    return None


def screen_entries(entries: Sequence[Entry]) -> None:
    """Sets `problem` on entries that are bad without looking at the image (caption, path, duplicates).

    The first of several identical (image_file, caption) entries is kept."""
    seen: set[tuple[str, str]] = set()
    for entry in entries:
        entry.problem = screen(entry)
        if entry.problem:
            continue
        if (entry.image_file, entry.text) in seen:
            entry.problem = "duplicate"
        else:
            seen.add((entry.image_file, entry.text))


@dataclasses.dataclass
class Scan:
    """What one pass over the annotations found: the entry count, the file's identity, the duplicates, and which of
    the entries not skipped name a face_embeds file (the count, the first one's (index, file), the first without)."""

    path: str
    total: int
    size: int
    sha256: str
    duplicates: np.ndarray  # bool per entry index
    with_face_embeds: int = 0
    first_face_embeds: tuple[int, Any] | None = None
    without_face_embeds: int | None = None

    def entries(self, start: int = 0) -> Iterator[Entry]:
        """The entries from index `start` with `problem` set (`screen` and duplicates)."""
        for entry in iter_annotations(self.path, start):
            entry.problem = screen(entry) or ("duplicate" if self.duplicates[entry.index] else None)
            yield entry


def _key(entry: Entry) -> bytes:
    file, text = entry.image_file.encode("utf-8"), entry.text.encode("utf-8")
    return hashlib.blake2b(b"%d:" % len(file) + file + text, digest_size=16).digest()


def scan_annotations(path: str | os.PathLike) -> Scan:
    """Counts the entries, hashes the file and marks every repeat of an earlier (image_file, caption)."""
    path = os.fspath(path)
    chunks = _Chunks(path)
    indices, keys, total = array.array("q"), bytearray(), 0
    faces: dict[str, Any] = {"with_face_embeds": 0, "first_face_embeds": None, "without_face_embeds": None}
    try:
        for entry in _entries(path, chunks):
            total = entry.index + 1
            if screen(entry) is None:
                indices.append(entry.index)
                keys += _key(entry)
                _count_face_embeds(entry, faces)
        while chunks.read():  # the hash covers the whole file
            pass
    finally:
        chunks.close()
    duplicates = np.zeros(total, bool)
    if indices:
        pairs = np.frombuffer(bytes(keys), np.uint64).reshape(-1, 2)
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))  # stable: equal keys stay in file order
        ordered = pairs[order]
        repeat = np.zeros(len(order), bool)
        repeat[1:] = np.all(ordered[1:] == ordered[:-1], axis=1)
        duplicates[np.frombuffer(indices, np.int64)[order[repeat]]] = True
    return Scan(path, total, chunks.size, chunks.sha256.hexdigest(), duplicates, **faces)


def _count_face_embeds(entry: Entry, faces: dict[str, Any]) -> None:
    if entry.face_embeds is None:
        if faces["without_face_embeds"] is None:
            faces["without_face_embeds"] = entry.index
        return
    faces["with_face_embeds"] += 1
    if faces["first_face_embeds"] is None:
        faces["first_face_embeds"] = (entry.index, entry.face_embeds)
