"""Official IP-Adapter weight files (`ip-adapter_*.safetensors` / `.bin`) <-> our Flax adapter pytree.

On disk (REFERENCE s.2), tensors in PyTorch layout (Linear weight = (out, in)):

  .safetensors  flat keys `image_proj.<name>` and `ip_adapter.<id>.to_k_ip.weight` / `.to_v_ip.weight`, with
                header metadata (str -> str, see `METADATA_KEYS`).
  .bin          `torch.save({"image_proj": {<name>: tensor}, "ip_adapter": {"<id>.to_k_ip.weight": tensor}})`:
                exactly these two sections, the layout of the official files and the one diffusers'
                `load_ip_adapter` expects. The metadata is written to a sidecar JSON next to it
                (`ip-adapter.bin` -> `ip-adapter.bin.json`), which nothing but `read_metadata` reads.

In memory, `read_ip_adapter` returns the two sections as numpy arrays with the prefixes stripped, i.e. the form
`ipadapter_jax.weights.official_layout.adapter_from_official` takes. Reading safetensors needs no torch; `.bin` files
are loaded with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers (a pickle
can run arbitrary code when loaded).

Every problem with a file raises `ConversionError` naming the file, the key, expected and found shapes and the
likely cause, before any Flax param is built. Writing is atomic (`ipadapter_jax.weights.atomic_write`): an
interrupted or failed save leaves no partial file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from ipadapter_jax import paths, staging
from ipadapter_jax.weights import image_proj_keys
from ipadapter_jax.weights.atomic_write import atomic_output
from ipadapter_jax.weights.image_proj_keys import ImageProjSpec, detect_kind
from ipadapter_jax.weights.official_layout import (
    SECTIONS,
    adapter_from_official,
    adapter_to_official,
    check_official_layout,
)
from ipadapter_jax.weights.torch_layout import ConversionError

# Metadata recorded in saved files. kind and num_tokens are derived from the weights on save; base_model
# (e.g. "runwayml/stable-diffusion-v1-5") and image_encoder (e.g. "CLIP ViT-H/14") come from the caller.
METADATA_KEYS = ("adapter_kind", "num_tokens", "base_model", "image_encoder")

FORMATS = ("safetensors", "bin")
BIN_SUFFIXES = (".bin", ".pt", ".pth")  # torch.save files
DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}

# The CLIP image encoders IP-Adapters are trained with: (projection dim, hidden size). Only used to name the
# likely cause when an adapter's input width does not match the encoder it is given.
KNOWN_ENCODERS = {"CLIP ViT-L/14": (768, 1024), "CLIP ViT-H/14": (1024, 1280), "CLIP ViT-bigG/14": (1280, 1664)}

# A safetensors header longer than this is garbage, not a header (real ones are a few hundred KB at most).
_MAX_HEADER_BYTES = 100 * 2**20


def read_ip_adapter(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Reads an official IP-Adapter file into {"image_proj": {name: array}, "ip_adapter": {"<id>.to_k_ip.weight":
    (inner, cross) array, ...}} (numpy, PyTorch layout, stored dtype, section prefixes stripped).

    Raises:
      FileNotFoundError: no such file.
      ConversionError: an unknown suffix; a truncated or corrupt file; a `.bin` holding objects other than
        tensors; a missing section or a key outside the two sections. The message names the file.
    """
    path = Path(staging.stage_down(path, what="adapter file"))  # a bucket object: read from a local copy
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        tensors, _ = read_safetensors(path)
        sections: dict[str, dict[str, np.ndarray]] = {name: {} for name in SECTIONS}
        stray = []
        for key, value in tensors.items():
            section, dot, name = key.partition(".")
            if dot and section in sections:
                sections[section][name] = value
            else:
                stray.append(key)
        _check_sections(path, [name for name in SECTIONS if not sections[name]], stray)
        return sections
    if path.suffix in BIN_SUFFIXES:
        return _read_bin(path)
    raise ConversionError(f"{path}: unknown file type '{path.suffix}': expected .safetensors or .bin")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of an IP-Adapter file: the safetensors header's, or a `.bin`'s sidecar JSON ({} if none)."""
    if Path(path).suffix == ".safetensors":
        return read_safetensors(Path(staging.stage_down(path, what="adapter file")), tensors=False)[1]
    if paths.is_remote(path) and not paths.exists(metadata_sidecar(path)):
        return {}
    sidecar = Path(staging.stage_down(metadata_sidecar(path), what="metadata sidecar"))
    path = Path(path)
    if not sidecar.is_file():
        return {}
    try:
        metadata = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{sidecar}: metadata sidecar of {path.name} is not valid JSON ({err})") from None
    if not isinstance(metadata, dict):
        found = type(metadata).__name__
        raise ConversionError(f"{sidecar}: metadata sidecar of {path.name} holds a {found}, not a JSON object")
    return {str(k): str(v) for k, v in metadata.items()}


def metadata_sidecar(path: str | os.PathLike) -> Any:
    """Where the metadata of a `.bin` file lives: `ip-adapter.bin` -> `ip-adapter.bin.json` (a Path; a URL string
    for a bucket object)."""
    if paths.is_remote(path):
        return os.fspath(path) + ".json"
    path = Path(path)
    return path.with_name(path.name + ".json")


def load_ip_adapter(
    path: str | os.PathLike,
    unet_params: Any,
    *,
    encoder_projection_dim: int | None = None,
    encoder_hidden_size: int | None = None,
) -> tuple[ImageProjSpec, Any, dict]:
    """Reads an official IP-Adapter file and converts it for the UNet whose params are given.

    Args:
      path: `.safetensors` or `.bin` file.
      unet_params: the target IP-UNet's params, concrete or abstract (`jax.eval_shape`); they fix every
        cross-attention layer's id and K'/V' shape.
      encoder_projection_dim: the image encoder's projected embedding width (1024 for ViT-H/14, 1280 for
        bigG/14), checked against a base adapter's input (`image_proj.proj.weight` (N * cross, dim)).
      encoder_hidden_size: the image encoder's hidden width (1280 for ViT-H/14, 1664 for bigG/14), checked
        against a Plus (`proj_in.weight`) or Full (`proj.0.weight`) adapter's input.
    Returns:
      (spec: kind, num_tokens and module arguments; the image projection's Flax module; our adapter pytree
      {"image_proj": ..., "ip_layers": ...} as float32 numpy, Flax layout).
    Raises:
      ConversionError: the file is unreadable (see `read_ip_adapter`), or does not fit the UNet or the image
        encoder; nothing is built then.
    """
    state = read_ip_adapter(path)
    source = str(path)
    spec = detect_kind(state["image_proj"], source=f"{source} [image_proj]")
    _check_image_encoder(spec, state["image_proj"], encoder_projection_dim, encoder_hidden_size, source)
    spec, module, adapter = adapter_from_official(state, unet_params, source=source)
    # The stored dtype may be fp16/bf16; our params are float32 (image_proj already is, by its converter).
    adapter["ip_layers"] = traverse_util.unflatten_dict(
        {k: v.astype(np.float32) for k, v in traverse_util.flatten_dict(adapter["ip_layers"]).items()}
    )
    return spec, module, adapter


def save_ip_adapter(
    adapter: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    format: str = "safetensors",
    dtype: str = "fp32",
    metadata: Mapping[str, str] | None = None,
    design: str = "decoupled",
) -> Path:
    """Writes our adapter {"image_proj", "ip_layers"} as an official IP-Adapter file, atomically.

    Args:
      adapter: our adapter pytree (numpy or jax arrays, any float dtype).
      path: destination; must end in `.safetensors` for format "safetensors" and not for "bin", because
        diffusers' `load_ip_adapter` picks its reader by that suffix.
      format: "safetensors" (flat prefixed keys + header metadata) or "bin" (two-section `torch.save`; metadata
        to the sidecar `metadata_sidecar(path)`). "bin" needs torch.
      design: the adapter's design; one without the official layout (`check_official_layout`) is a ConversionError.
      dtype: "fp32", "fp16" or "bf16": every tensor is cast to it (round to nearest even).
      metadata: str -> str entries to record, e.g. {"base_model": ..., "image_encoder": ...}; "adapter_kind" and
        "num_tokens" are derived from the weights and may only be repeated with the same value.
    Returns:
      `path` (a URL string for a bucket). On any failure nothing is left at `path` (a previous file is kept) or beside
      it; in a bucket the file appears as one complete object.
    """
    target = os.fspath(path)
    path = Path(target)
    check_official_layout(design, target)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if (path.suffix == ".safetensors") != (format == "safetensors"):
        raise ValueError(
            f"{path}: a {format} file must {'' if format == 'safetensors' else 'not '}end in '.safetensors': "
            "diffusers' load_ip_adapter chooses safetensors or torch.load by the file name"
        )
    state = adapter_to_official(adapter)
    header = _metadata_for(state["image_proj"], metadata)
    state = {name: {k: v.astype(DTYPES[dtype], copy=False) for k, v in part.items()} for name, part in state.items()}
    if format == "safetensors":
        flat = {f"{name}.{key}": value for name, part in state.items() for key, value in part.items()}
        with atomic_output(target) as tmp:
            safetensors.numpy.save_file(flat, tmp, metadata=header)
    else:
        with atomic_output(target) as tmp, atomic_output(metadata_sidecar(target)) as tmp_sidecar:
            _torch_save(state, tmp)
            tmp_sidecar.write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
    return target if paths.is_remote(target) else path


def adapter_metadata(adapter: Mapping[str, Any], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metadata to store with `adapter`: its "adapter_kind" and "num_tokens" (from the weights) plus `extra`.

    Raises:
      TypeError: `extra` is not str -> str.  ValueError: `extra` gives a different kind or num_tokens.
    """
    return _metadata_for(image_proj_keys.flax_to_official(adapter["image_proj"]), extra)


def _metadata_for(image_proj: Mapping[str, np.ndarray], extra: Mapping[str, str] | None) -> dict[str, str]:
    spec = detect_kind(image_proj, source="adapter image_proj")
    derived = {"adapter_kind": spec.kind, "num_tokens": str(spec.num_tokens)}
    extra = dict(extra or {})
    not_str = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    if not_str:
        raise TypeError(f"metadata must map str to str (safetensors header metadata); not str: {not_str}")
    conflicts = [f"{k}={extra[k]!r} (weights say {v!r})" for k, v in derived.items() if extra.get(k, v) != v]
    if conflicts:
        raise ValueError(f"metadata contradicts the weights: {', '.join(conflicts)}")
    return {**extra, **derived}


def _check_sections(path: Path, missing: list[str], stray: list[str]) -> None:
    """`missing`: sections absent or empty; `stray`: keys outside both sections."""
    if missing:
        raise ConversionError(
            f"{path}: missing or empty section(s) {missing} (keys 'image_proj.*' and 'ip_adapter.*'). Likely cause: "
            "not an IP-Adapter file (e.g. a model, LoRA or image encoder checkpoint)."
        )
    if stray:
        raise ConversionError(
            f"{path}: unexpected key(s) outside the 'image_proj' and 'ip_adapter' sections ({len(stray)}): "
            f"{sorted(stray)[:8]}. Likely cause: a different kind of checkpoint, or extra entries added to an "
            "IP-Adapter file."
        )


def _check_image_encoder(
    spec: ImageProjSpec,
    image_proj: Mapping[str, np.ndarray],
    projection_dim: int | None,
    hidden_size: int | None,
    source: str,
) -> None:
    """The adapter's input width must be what the image encoder produces (base: projected embeddings;
    Plus/Full/FaceID Plus: hidden states; FaceID reads none)."""
    if spec.kind == "faceid":
        return  # reads identity embeddings, no image encoder output
    if spec.kind == "base":
        key, width, kind, which = "proj.weight", projection_dim, "projected image embeddings", 0
    else:
        key = {"plus": "proj_in.weight", "full": "proj.0.weight"}.get(spec.kind, "perceiver_resampler.proj_in.weight")
        width, kind, which = hidden_size, "hidden states", 1
    found = tuple(image_proj[key].shape)
    if width is None or found[1] == width:
        return
    # Full's first Linear is square (hidden -> hidden); the others map the encoder width to their own.
    expected = (width, width) if spec.kind == "full" else (found[0], width)
    trained = _encoder_name(which, found[1]) or f"an image encoder with {found[1]}-d {kind}"
    given = _encoder_name(which, width) or f"one with {width}-d {kind}"
    raise ConversionError(
        f"{source}: key 'image_proj.{key}': expected {expected} for an image encoder with {width}-d "
        f"{kind}, found {found}. Likely cause: an adapter trained with {trained} used with {given}; use the "
        "encoder the adapter was trained with (official files: ip-adapter_sdxl needs ViT-bigG/14 "
        "(sdxl_models/image_encoder), the SD1.5 and *_vit-h adapters ViT-H/14 (models/image_encoder))."
    )


def _encoder_name(which: int, width: int) -> str | None:
    return next((f"{name} ({width}-d)" for name, dims in KNOWN_ENCODERS.items() if dims[which] == width), None)


def read_safetensors(path: Path, *, tensors: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, header metadata); with `tensors=False` only the header is read."""
    try:
        with safe_open(path, framework="np") as f:
            metadata = dict(f.metadata() or {})
            arrays = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}
    except SafetensorError as err:
        raise ConversionError(f"{path}: {_diagnose_safetensors(path, err)}") from None
    return arrays, metadata


def _diagnose_safetensors(path: Path, err: Exception) -> str:
    size = path.stat().st_size
    needed = _declared_size(path)
    if needed is not None and needed > size:
        return (
            f"truncated: the file has {size} bytes but its header needs at least {needed}. Likely cause: an "
            "interrupted download or copy; fetch the file again."
        )
    return (
        f"not a readable safetensors file ({size} bytes; safetensors: {err}). Likely cause: a corrupt file, or "
        "another format under a .safetensors name."
    )


def _declared_size(path: Path) -> int | None:
    """Bytes the safetensors header accounts for (8 + header + the last tensor's end); None if no header.

    When the header itself is cut off, its declared length is the best lower bound there is.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (header_bytes,) = struct.unpack("<Q", head)
        if header_bytes > _MAX_HEADER_BYTES:
            return None
        if 8 + header_bytes > size:
            return 8 + header_bytes
        raw = f.read(header_bytes)
    try:
        header = json.loads(raw)
        ends = [int(info["data_offsets"][1]) for key, info in header.items() if key != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    return 8 + header_bytes + max(ends, default=0)


def _read_bin(path: Path) -> dict[str, dict[str, np.ndarray]]:
    import torch  # only `.bin` files need torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            message = f"{path}: corrupt pickle ({err}). Likely cause: a truncated or damaged file."
            raise ConversionError(message) from None
        raise ConversionError(
            f"{path}: refused to load: the pickle references {_refused_global(str(err))}, which is not a tensor or "
            "plain container, and unpickling it could run arbitrary code (torch.load weights_only=True). Likely "
            "cause: a checkpoint saved with extra Python objects, or a malicious file. Use the .safetensors version, "
            "or re-save only the two sections from a trusted source."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(
            f"{path}: not a readable PyTorch checkpoint ({path.stat().st_size} bytes; torch: {reason}). Likely cause: "
            "a truncated or corrupt file (interrupted download or copy)."
        ) from None
    if not isinstance(state, dict):
        raise ConversionError(
            f"{path}: holds a {type(state).__name__}, expected a dict {{'image_proj': {{...}}, 'ip_adapter': {{...}}}}"
        )
    sections = {}
    for name in SECTIONS:
        part = state.get(name, {})
        if not isinstance(part, dict):
            raise ConversionError(f"{path}: section '{name}' is a {type(part).__name__}, expected a dict of tensors")
        for key, value in part.items():
            if not isinstance(value, torch.Tensor):
                raise ConversionError(f"{path}: '{name}' key '{key}' is a {type(value).__name__}, not a tensor")
        sections[name] = {key: _tensor_to_numpy(value) for key, value in part.items()}
    _check_sections(path, [name for name in SECTIONS if not sections[name]], [k for k in state if k not in SECTIONS])
    return sections


def _refused_global(message: str) -> str:
    # torch's message is a paragraph of advice; the refused global is the useful part.
    match = re.search(r"GLOBAL (\S+)", message)
    return f"'{match.group(1)}'" if match else "a Python object"


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16 of its own: reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _torch_save(state: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> None:
    import torch

    def to_torch(array: np.ndarray) -> Any:
        if array.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(array))

    torch.save({name: {k: to_torch(v) for k, v in part.items()} for name, part in state.items()}, path)
