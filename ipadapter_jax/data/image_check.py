"""Reading and checking one annotation entry's image for the dataset build (`builder.py`): the full decode that
catches truncated files, the conversion to 8-bit RGB, the aspect-ratio limit, and a byte budget that keeps the
decoding threads' memory bounded (eight 8000x8000 PNGs do not decode at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
from collections.abc import Iterator

from PIL import Image

from ipadapter_jax.data import rgb
from ipadapter_jax.data.annotations import Entry, outside_root

DECODE_BYTES = 768 << 20  # decoded pixels held by all threads together (one larger image decodes alone)

# Formats kept byte for byte when already RGB; anything else is re-encoded losslessly as PNG.
_KEPT_FORMATS = ("JPEG", "PNG")
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}


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


class ByteBudget:
    """Bytes that threads hold together (decoded pixels); a request above the capacity waits to run alone."""

    def __init__(self, capacity: int):
        self.capacity, self._used, self._cond = capacity, 0, threading.Condition()

    @contextlib.contextmanager
    def hold(self, amount: int) -> Iterator[None]:
        amount = min(amount, self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self._used + amount <= self.capacity)
            self._used += amount
        try:
            yield
        finally:
            with self._cond:
                self._used -= amount
                self._cond.notify_all()


_DECODE_BUDGET = ByteBudget(DECODE_BYTES)


def _decode_cost(image: Image.Image) -> int:
    """Bytes a full decode + RGB conversion (+ PNG re-encoding) may hold, from the header alone."""
    pixels = image.width * image.height
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit: float64 scaling in `to_rgb`
        return pixels * 24
    return pixels * (_BYTES_PER_PIXEL.get(image.mode, 4) + 6)


def check_image(entry: Entry, image_root: str, max_aspect_ratio: float) -> Checked:
    """Reads and fully decodes the entry's image; returns what to store or why to skip it."""
    if entry.problem:
        return Checked(entry, reason=entry.problem)
    if outside_root(entry.image_file):
        return Checked(entry, reason="outside_root", detail=entry.image_file)
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
        with _DECODE_BUDGET.hold(_decode_cost(image)):
            image.load()  # decodes everything: catches truncation past the header
            return _stored(entry, path, data, image, max_aspect_ratio)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        return Checked(entry, reason="unreadable_image", detail=f"{path}: {type(e).__name__}: {e}")


def _stored(entry: Entry, path: str, data: bytes, image: Image.Image, max_aspect_ratio: float) -> Checked:
    try:
        converted = rgb.to_rgb(image)
    except ValueError as e:
        return Checked(entry, reason="unsupported_mode", detail=f"{path}: {e}")
    width, height = converted.size
    if max(width, height) > max_aspect_ratio * min(width, height):
        return Checked(entry, reason="extreme_aspect_ratio", detail=f"{path}: {width}x{height}")
    if image.mode == "RGB" and image.format in _KEPT_FORMATS:
        return Checked(entry, image=data, width=width, height=height)
    png = io.BytesIO()
    converted.save(png, "PNG")
    return Checked(
        entry, image=png.getvalue(), width=width, height=height, converted_from=f"{image.format} {image.mode}"
    )
