"""Small generated datasets and a local CLIP tokenizer for the data tests (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
from PIL import Image


def write_png_rgb16(path: str, pixels: np.ndarray) -> None:
    """Writes a 16-bit-per-channel RGB PNG (PIL cannot write one): pixels uint16 (H, W, 3)."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # Each scanline: filter byte 0, then big-endian samples.
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def smooth_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A natural-ish uint8 image: smooth gradients plus mild noise (pure noise exaggerates resampling error)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    base = np.stack([np.sin(x / (7 + 3 * c) + y / (11 + 2 * c) + phase[c]) for c in range(3)], -1)
    return np.clip(127.5 + 100 * base + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)


def make_dataset(root: str, num_good: int = 12, seed: int = 0) -> dict:
    """Writes images of varied sizes and modes plus broken ones into `root/images`, and `root/captions.json`.

    Returns a dict with the JSON path, the image root, the number of entries, the indices expected to be
    written, and the expected skip reason of each skipped index.
    """
    rng = np.random.default_rng(seed)
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    entries: list = []
    expected_skips: dict[int, str] = {}

    def add(image_file, text, skip=None):
        if skip:
            expected_skips[len(entries)] = skip
        entries.append({"image_file": image_file, "text": text})

    # Good RGB images of varied sizes, JPEG and PNG.
    for i in range(num_good):
        height, width = (int(v) for v in rng.integers(20, 120, 2))
        name = f"good_{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(smooth_rgb(rng, height, width)).save(os.path.join(images, name), quality=95)
        add(name, f"a photo number {i}")
    # Modes that must be converted to RGB, not skipped.
    rgb = smooth_rgb(rng, 40, 56)
    Image.fromarray(rgb[..., 0]).save(os.path.join(images, "gray.png"))
    Image.fromarray(rgb).convert("CMYK").save(os.path.join(images, "cmyk.jpg"), quality=95)
    Image.fromarray(np.dstack([rgb, rng.integers(0, 255, (40, 56, 1), dtype=np.uint8)])).save(
        os.path.join(images, "rgba.png")
    )
    Image.fromarray(rgb).convert("P").save(os.path.join(images, "palette.png"))
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(os.path.join(images, "gray16.png"))
    write_png_rgb16(os.path.join(images, "rgb16.png"), rgb.astype(np.uint16) * 257 + 100)
    for name in ("gray.png", "cmyk.jpg", "rgba.png", "palette.png", "gray16.png", "rgb16.png"):
        add(name, f"converted {name}")
    # Broken files.
    Image.fromarray(rgb).save(os.path.join(images, "truncated.jpg"), quality=95)
    with open(os.path.join(images, "truncated.jpg"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    with open(os.path.join(images, "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + rng.bytes(300))
    open(os.path.join(images, "zero.png"), "wb").close()
    Image.fromarray(rgb[..., 0].astype(np.float32) / 255).save(os.path.join(images, "float.tiff"))
    Image.fromarray(smooth_rgb(rng, 4, 200)).save(os.path.join(images, "strip.png"))
    add("truncated.jpg", "truncated", "unreadable_image")
    add("corrupt.png", "corrupt", "unreadable_image")
    add("zero.png", "zero bytes", "empty_file")
    add("does_not_exist.png", "missing", "missing_file")
    add("float.tiff", "float image", "unsupported_mode")
    add("strip.png", "a 50:1 strip", "extreme_aspect_ratio")
    # Bad captions and entries.
    add("good_0.png", "", "empty_caption")
    add("good_1.jpg", "   ", "empty_caption")
    add("good_2.png", 123, "invalid_caption")
    add("good_3.jpg", "NONUTF8", "non_utf8_caption")  # placeholder, replaced by raw bytes below
    add("good_0.png", "a photo number 0", "duplicate")
    add(None, "no file", "malformed_entry")
    entries.append("not an object")
    expected_skips[len(entries) - 1] = "malformed_entry"

    text = json.dumps(entries, indent=1).encode("utf-8")
    text = text.replace(b'"NONUTF8"', b'"caf\xe9 latin-1"')  # invalid UTF-8 byte inside a caption
    path = os.path.join(root, "captions.json")
    with open(path, "wb") as f:
        f.write(text)
    return {
        "json": path,
        "root": images,
        "total": len(entries),
        "written": [i for i in range(len(entries)) if i not in expected_skips],
        "skips": expected_skips,
        "converted": {num_good + k for k in range(5)},  # rgb16.png decodes as RGB: stored as is
    }


def tiny_clip_tokenizer(directory: str):
    """A CLIPTokenizer over a byte-level vocabulary plus a few merges, written to `directory`."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    import ipadapter_jax  # noqa: F401  (log filter before transformers)

    chars = list(bytes_to_unicode().values())
    words = ["ph", "pho", "phot", "photo</w>", "do", "dog</w>"]
    vocab = chars + [c + "</w>" for c in chars] + words + ["<|startoftext|>", "<|endoftext|>"]
    merges = ["p h", "ph o", "pho t", "phot o</w>", "d o", "do g</w>"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
