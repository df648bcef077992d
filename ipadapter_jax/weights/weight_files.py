"""The PyTorch weight files of a diffusers/transformers model folder, read one tensor at a time.

A model folder holds one of (preferred first; `variant` inserts e.g. `.fp16` before the last suffix):

    diffusion_pytorch_model.safetensors   diffusion_pytorch_model.safetensors.index.json (+ shards)
    model.safetensors                     model.safetensors.index.json
    diffusion_pytorch_model.bin           diffusion_pytorch_model.bin.index.json
    pytorch_model.bin                     pytorch_model.bin.index.json

`open_state_dict` returns a `LazyStateDict`: a read-only mapping key -> numpy array that reads a tensor from disk
when it is looked up and keeps nothing, so a converter that consumes it key by key never holds the checkpoint
and its conversion at once. Shapes and dtypes are known before any tensor is read (`placeholders`), so keys
and shapes can be checked against a target model first.

safetensors files are read with this module's own reader (the JSON header, then `np.fromfile` at each
tensor's offset) rather than `safetensors.safe_open`: `safe_open` memory-maps the file, and every page a read
touches stays resident until the file is closed, which doubles peak RSS over a whole-file conversion
(measured here: reading a 1 GiB file tensor by tensor peaks at 2.0 GiB RSS with `safe_open`, 1.0 GiB this way).
The reader also names the tensor and byte counts when a file is truncated.

`.bin` files are pickles: they are loaded only with `torch.load(weights_only=True)`, which refuses any object
other than tensors and plain containers (a pickle can run arbitrary code when loaded), memory-mapped where the
file format allows so tensors are read lazily.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ipadapter_jax.weights.torch_layout import ConversionError

# Preference order when a folder holds several formats (as diffusers and transformers choose).
WEIGHT_FILE_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# safetensors dtype codes (little-endian, as the format specifies) -> numpy.
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}

# A safetensors header larger than this is not a header: the file is corrupt or not safetensors.
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a checkpoint: its file, shape and dtype, and how to read it (a fresh array each call)."""

    file: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]


class LazyStateDict(Mapping[str, np.ndarray]):
    """A PyTorch state dict whose tensors are read from disk on lookup (PyTorch layout, numpy arrays).

    `source` (the weight file, or the shard index) names it in error messages.
    """

    def __init__(self, refs: Mapping[str, TensorRef], source: Path):
        self.refs = dict(refs)
        self.source = source

    def __getitem__(self, key: str) -> np.ndarray:
        return self.refs[key].read()

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def placeholders(self) -> dict[str, np.ndarray]:
        """key -> a read-only array of the stored shape and dtype that occupies no memory (zero strides).

        For checking keys and shapes against a target before a byte of tensor data is read.
        """
        return {key: np.broadcast_to(np.zeros((), ref.dtype), ref.shape) for key, ref in self.refs.items()}

    def without(self, keys: Iterable[str]) -> LazyStateDict:
        """The same state dict minus `keys` (e.g. buffers a checkpoint holds that are not parameters)."""
        drop = set(keys)
        return LazyStateDict({k: v for k, v in self.refs.items() if k not in drop}, self.source)


def with_variant(name: str, variant: str | None) -> str:
    """`'model.safetensors'`, `'fp16'` -> `'model.fp16.safetensors'`; `'x.safetensors.index.json'` ->
    `'x.safetensors.index.fp16.json'` (diffusers' and transformers' variant naming)."""
    if not variant:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def find_weight_file(folder: Path, variant: str | None = None) -> Path:
    """The weight file (or shard index) of a model folder, by `WEIGHT_FILE_NAMES` preference.

    Raises:
      ConversionError: none present; the message lists the weight-like files the folder does hold.
    """
    for name in WEIGHT_FILE_NAMES:
        path = folder / with_variant(name, variant)
        if path.is_file():
            return path
    present = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".json"))
    wanted = ", ".join(with_variant(n, variant) for n in WEIGHT_FILE_NAMES[:4])
    raise ConversionError(
        f"{folder}: no weight file found (looked for {wanted} and the .bin equivalents); the folder holds "
        f"{present or 'no weight files'}. Likely cause: an incomplete download, or weights saved under a "
        f"variant (e.g. 'diffusion_pytorch_model.fp16.safetensors' needs variant='fp16')."
    )


def open_state_dict(folder: str | Path, variant: str | None = None) -> LazyStateDict:
    """The lazy state dict of a model folder's weights (single file or shards; safetensors or `.bin`).

    Raises:
      ConversionError: no weights, a truncated or corrupt file, a missing shard, or a `.bin` that holds
        anything but tensors; the message names the file and the likely cause.
    """
    path = find_weight_file(Path(folder), variant)
    if path.name.endswith(".index.json"):
        return LazyStateDict(_sharded_refs(path), path)
    return LazyStateDict(_file_refs(path), path)


def _file_refs(path: Path) -> dict[str, TensorRef]:
    return _safetensors_refs(path) if path.suffix == ".safetensors" else _bin_refs(path)


def _sharded_refs(index_path: Path) -> dict[str, TensorRef]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ConversionError(f"{index_path}: not a shard index (expected JSON with 'weight_map'): {err!r}") from None
    refs: dict[str, TensorRef] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise ConversionError(
                f"{index_path} lists shard '{shard}', which is missing from {index_path.parent}. "
                "Likely cause: an incomplete download."
            )
        for key, ref in _file_refs(shard_path).items():
            if key in refs:
                raise ConversionError(f"{index_path}: key '{key}' is in both {refs[key].file.name} and {shard}")
            refs[key] = ref
    for key, shard in weight_map.items():
        if key not in refs or refs[key].file.name != shard:
            raise ConversionError(
                f"{index_path}: key '{key}' is listed in shard '{shard}' but that file does not hold it. "
                "Likely cause: shards from different checkpoints mixed in one folder."
            )
    return refs


def _safetensors_refs(path: Path) -> dict[str, TensorRef]:
    """Parses a safetensors header (8-byte little-endian length, JSON) and checks every tensor lies in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        (header_bytes,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
        if header_bytes is None or header_bytes > min(size - 8, _MAX_HEADER_BYTES):
            raise ConversionError(
                f"{path}: not a readable safetensors file ({size} bytes; header length field "
                f"{header_bytes}). Likely cause: a truncated or interrupted download, or a different file format."
            )
        raw_header = f.read(header_bytes)
    try:
        header = json.loads(raw_header)
        entries = {key: _parse_entry(info) for key, info in header.items() if key != "__metadata__"}
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConversionError(f"{path}: corrupt safetensors header ({err!r}). Likely cause: a damaged file.") from None

    data_start = 8 + header_bytes
    refs = {}
    needed = data_start + max((end for _, _, _, end in entries.values()), default=0)
    for key, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda item: item[1][2]):
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ConversionError(
                f"{path}: corrupt safetensors header: tensor '{key}' declares shape {shape} {dtype} "
                f"({math.prod(shape) * dtype.itemsize} bytes) but spans {end - begin} bytes."
            )
        if data_start + end > size:
            raise ConversionError(
                f"{path}: truncated: tensor '{key}' {shape} {dtype} ends at byte {data_start + end}, but the file "
                f"has {size} bytes (the header describes {needed}). Likely cause: an interrupted download or copy."
            )
        refs[key] = TensorRef(path, shape, dtype, _safetensors_reader(path, data_start + begin, dtype, shape))
    return refs


def _parse_entry(info: dict) -> tuple[np.dtype, tuple[int, ...], int, int]:
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported dtype {info['dtype']}")
    begin, end = (int(x) for x in info["data_offsets"])
    shape = tuple(int(n) for n in info["shape"])
    if begin < 0 or end < begin or any(n < 0 for n in shape):
        raise ValueError(f"invalid offsets {begin, end} or shape {shape}")
    return _SAFETENSORS_DTYPES[info["dtype"]], shape, begin, end


def _safetensors_reader(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        count = math.prod(shape)
        array = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        if array.size != count:  # the file shrank after its header was checked
            raise ConversionError(f"{path}: truncated: read {array.size} of {count} values at byte {offset}")
        return array.reshape(shape)

    return read


def _bin_refs(path: Path) -> dict[str, TensorRef]:
    import torch

    try:
        # mmap reads each tensor's bytes only when it is used; the pre-1.6 (non-zip) format cannot be mapped.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise ConversionError(
            f"{path}: refused to load: the pickle holds objects other than tensors "
            f"({_weights_only_reason(str(err))}), and unpickling those could run arbitrary code "
            "(torch.load weights_only=True). Likely cause: a checkpoint saved with extra Python objects, or a "
            "malicious file. Use the .safetensors version, or re-save just the state dict from a trusted source."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ConversionError(
            f"{path}: not a readable PyTorch checkpoint ({first_line}). Likely cause: a truncated or corrupt file."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = type(state).__name__ if not isinstance(state, dict) else "a dict with non-tensor values"
        raise ConversionError(
            f"{path}: holds {found}, not a flat state dict of tensors. Likely cause: a training checkpoint "
            "(e.g. {'state_dict': ...}) rather than model weights."
        )
    return {key: TensorRef(path, tuple(t.shape), _numpy_dtype(t.dtype), _torch_reader(t)) for key, t in state.items()}


def _torch_reader(tensor: Any) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        import torch

        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return tensor.numpy().copy()  # a copy, so nothing keeps the file mapping alive

    return read


def _numpy_dtype(dtype: Any) -> np.dtype:
    import torch

    if dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return torch.empty((), dtype=dtype).numpy().dtype


def _weights_only_reason(message: str) -> str:
    # torch's message is a paragraph of advice; the line naming the refused global is the useful part.
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else message)
