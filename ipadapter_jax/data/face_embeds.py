"""Per-example identity embeddings, for training FaceID adapters: read from `.npy` files named in the annotations.

Annotations (the reference JSON list only): an entry may name `"face_embeds": "faces/1.npy"`, a `.npy` file relative
to the image root (as `image_file` is, so that both travel together when a bucket's root is staged) holding one
float32 vector (D,): the face model's identity embedding of that image (insightface's ArcFace `normed_embedding`,
D = 512; any D, the same for every entry). Either every entry names one or none does.

The dataset stores it as the float32 feature `face_embeds` (D,) (`shards.features`); the loader, the embedding cache
(stored as is) and the batches carry it as `face_embeds` (B, D), which a FaceID adapter's training step projects to
tokens (`ipadapter_jax.training.step`). A file that is missing, not a .npy, not float32 or not (D,) fails the build
with one line naming the file, the expected and the found shape/dtype.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ipadapter_jax.data.annotations import Entry, Scan, outside_root

KEY = "face_embeds"


def face_embeds_file(entry: Entry, image_root: str) -> str:
    """The path of the entry's `.npy` file under `image_root`.

    Raises:
      ValueError: the entry's `face_embeds` is not a relative path inside the root.
    """
    name = entry.face_embeds
    if not isinstance(name, str) or not name or outside_root(name):
        raise ValueError(
            f"annotation entry {entry.index}: face_embeds must name a .npy file relative to the image root "
            f"{image_root}, got {name!r}"
        )
    return os.path.join(image_root, name)


def read_face_embeds(path: str, dim: int | None = None) -> np.ndarray:
    """The float32 vector (D,) stored in the `.npy` file `path`; `dim` (when given) is the D every entry must have.

    Raises:
      ValueError: the file is missing or unreadable, or holds another dtype or shape (one line naming the file,
        the expected and the found dtype and shape).
    """
    expected = f"float32 ({dim if dim is not None else 'D'},)"
    try:
        value = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{path}: face_embeds file not found; likely cause: a wrong path in the annotations") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a .npy array of {expected} ({type(err).__name__}: {err})") from None
    if value.dtype != np.float32 or value.ndim != 1 or (dim is not None and value.shape[0] != dim):
        raise ValueError(
            f"{path}: face_embeds must be {expected}, found {value.dtype} {tuple(value.shape)}; likely cause: "
            "an embedding saved as float64 or with a batch axis (save `np.float32(face.normed_embedding)`)"
        )
    return value


def face_embed_dim(scan: Scan, image_root: str) -> int | None:
    """D of the annotations' identity embeddings (read from the first entry's file), or None when no entry names
    one.

    Raises:
      ValueError: some entries name a face_embeds file and others do not, or the first file is not float32 (D,).
    """
    if not scan.with_face_embeds:
        return None
    if scan.without_face_embeds is not None:
        raise ValueError(
            f"{scan.path}: {scan.with_face_embeds} entries name a face_embeds file but entry "
            f"{scan.without_face_embeds} does not; either every entry names its .npy file or none does"
        )
    first = Entry(scan.first_face_embeds[0], None, None, face_embeds=scan.first_face_embeds[1])
    return int(read_face_embeds(face_embeds_file(first, image_root)).shape[0])


def example_face_embeds(record: dict[str, Any]) -> dict[str, np.ndarray]:
    """{"face_embeds": float32 (D,)} of a stored record that has one, else {} (what preprocessing passes on)."""
    return {KEY: np.asarray(record[KEY], np.float32)} if KEY in record else {}
