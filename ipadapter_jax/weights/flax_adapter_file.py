"""Our adapter on disk in Flax form: one msgpack file (`flax.serialization`), loaded without conversion.

File layout (a msgpack map):

    {"format": "ipadapter-jax/adapter", "version": 1,
     "metadata": {str: str},            # the keys of `ip_adapter_files.METADATA_KEYS`
     "params": {"image_proj": {...},    # our adapter pytree, Flax layout (Dense kernels (in, out)), float32
                "ip_layers": {"down_blocks_0": {"attentions_0": ... {"attn2": {"to_k_ip": {"kernel": ...}}}}},
                "unet_lora": {...}}}              # FaceID adapters only (`ipadapter_jax.models.adapter`)

Adapters of a design other than the decoupled one (`ipadapter_jax.models.designs`; its per-layer params in
"ip_layers") record it as metadata "adapter_design"; without it a file is of the decoupled design. Designs
without the official layout (the simple and gated ones) are saved in this format only.

msgpack rather than an orbax checkpoint: an adapter is small (SD1.5: 22M params, 89 MB in float32) and one
self-describing file is what users copy around; orbax's directories are for training state. Params are stored
as float32; fp16/bf16 are export options of the PyTorch files (`ip_adapter_files.save_ip_adapter`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import serialization, traverse_util

from ipadapter_jax import paths, staging
from ipadapter_jax.models.adapter import split_unet_params
from ipadapter_jax.models.designs import DESIGNS, get_design
from ipadapter_jax.weights.adapter_files import adapter_metadata
from ipadapter_jax.weights.atomic_write import atomic_output
from ipadapter_jax.weights.image_proj_keys import ImageProjSpec, flax_to_official, load_image_proj
from ipadapter_jax.weights.official_layout import adapter_from_official, adapter_to_official
from ipadapter_jax.weights.torch_layout import ConversionError
from ipadapter_jax.weights.unet_config import abstract_ip_unet_params

FORMAT = "ipadapter-jax/adapter"
VERSION = 1
SUFFIX = ".msgpack"
DESIGN_KEY = "adapter_design"


def save_flax_adapter(
    adapter: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    design: str = "decoupled",
) -> Path:
    """Writes our adapter {"image_proj", "ip_layers"[, "unet_lora"]} (cast to float32) and its metadata, atomically.

    `metadata`: extra str -> str entries (e.g. base_model, image_encoder); kind and num_tokens are added
    from the weights, and "adapter_design" for a `design` other than "decoupled". Returns `path`.
    """
    get_design(design)  # a known design, before writing
    if design != "decoupled":
        metadata = {**(metadata or {}), DESIGN_KEY: design}
    params = {
        section: traverse_util.unflatten_dict(
            {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(dict(adapter[section])).items()}
        )
        for section in ("image_proj", "ip_layers", "unet_lora")
        if section in adapter
    }
    content = {"format": FORMAT, "version": VERSION, "metadata": adapter_metadata(params, metadata), "params": params}
    with atomic_output(path) as tmp:  # a bucket path (gs://): one object upload
        tmp.write_bytes(serialization.msgpack_serialize(content))
    return path if paths.is_remote(path) else Path(path)


def read_flax_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """(our adapter pytree as float32 numpy, its metadata) from a file of `save_flax_adapter`.

    Raises:
      FileNotFoundError: no such file.
      ConversionError: truncated or corrupt, or not an adapter file of this format/version (names the file).
    """
    path = Path(staging.stage_down(path, what="adapter file"))  # a bucket object: read from a local copy
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        content = serialization.msgpack_restore(path.read_bytes())
    except ValueError as err:  # msgpack's ExtraData/FormatError/"incomplete input" are all ValueErrors
        raise ConversionError(
            f"{path}: not a readable msgpack file ({path.stat().st_size} bytes; msgpack: {err}). Likely cause: a "
            "truncated or corrupt file."
        ) from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise ConversionError(
            f"{path}: not an ipadapter-jax adapter file (format {found!r}, expected {FORMAT!r}). Likely cause: a "
            "different msgpack file, e.g. full model params."
        )
    if content.get("version") != VERSION:
        raise ConversionError(f"{path}: adapter file version {content.get('version')!r}; this code reads {VERSION}")
    params = content.get("params")
    if not isinstance(params, dict) or set(params) - {"unet_lora"} != {"image_proj", "ip_layers"}:
        found = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ConversionError(
            f"{path}: 'params' must hold 'image_proj' and 'ip_layers' (FaceID also 'unet_lora'), found {found}"
        )
    return params, {str(k): str(v) for k, v in content.get("metadata", {}).items()}


def adapter_design(metadata: Mapping[str, str]) -> str:
    """The design a file's metadata records ("decoupled" when none)."""
    return metadata.get(DESIGN_KEY, "decoupled")


def load_flax_adapter(path: str | os.PathLike, unet_params: Any) -> tuple[ImageProjSpec, Any, dict]:
    """Reads an adapter file of the decoupled design and checks it against the UNet whose (concrete or abstract)
    params are given (files of any design: `load_design_adapter`).

    Returns (spec, image projection module, adapter pytree) like `ip_adapter_files.load_ip_adapter`.
    Raises:
      ConversionError: unreadable (see `read_flax_adapter`), of another design, or a layer/shape that does not fit
        the UNet; problems are named by their official keys (`ip_adapter.<id>...`, `image_proj...`).
    """
    adapter, metadata = read_flax_adapter(path)
    if adapter_design(metadata) != "decoupled":
        raise ConversionError(
            f"{path}: an adapter of the {adapter_design(metadata)!r} design; load it with load_adapter"
        )
    # Through the official layout: one validation path (layer ids, shapes, kind) for every file format.
    return adapter_from_official(adapter_to_official(adapter), unet_params, source=str(path))


def load_design_adapter(path: str | os.PathLike, unet: Any) -> tuple[ImageProjSpec, Any, dict, str]:
    """Reads an adapter file of any design and checks it against `unet` (an `IPUNet2DConditionModel`, for the param
    shapes of the design it records).

    Returns (spec, image projection module, adapter pytree, design name).
    Raises:
      ConversionError: unreadable (see `read_flax_adapter`), an unknown design, or a layer/shape that does not fit
        the UNet; a decoupled adapter's problems are named by their official keys (`ip_adapter.<id>...`).
    """
    adapter, metadata = read_flax_adapter(path)
    design = adapter_design(metadata)
    if design not in DESIGNS:
        raise ConversionError(f"{path}: adapter_design {design!r} is not one of {tuple(DESIGNS)}")
    unet_params = abstract_ip_unet_params(unet.clone(adapter_design=design))
    if DESIGNS[design].official_layout:
        # Through the official layout: one validation path (layer ids, shapes, kind) for every file format.
        return (*adapter_from_official(adapter_to_official(adapter), unet_params, source=str(path)), design)
    spec, module, image_proj = load_image_proj(flax_to_official(adapter["image_proj"]), source=f"{path} [image_proj]")
    token_dim = spec.hparams.get("cross_attention_dim", spec.hparams.get("output_dim"))
    if token_dim != unet.cross_attention_dim:
        raise ConversionError(
            f"{path}: the image projection makes {token_dim}-d tokens but this UNet's cross-attention takes "
            f"{unet.cross_attention_dim}-d (adapter for a different base model?)"
        )
    expected = traverse_util.flatten_dict(split_unet_params(unet_params, DESIGNS[design].layer_params)[1])
    found = traverse_util.flatten_dict(adapter["ip_layers"])
    for key in sorted(set(expected) | set(found)):
        want, have = (tuple(d[key].shape) if key in d else None for d in (expected, found))
        if want != have:
            raise ConversionError(
                f"{path}: ip_layers/{'/'.join(key)} is {'missing' if have is None else have}, the {design} design on "
                f"this UNet needs {'none' if want is None else want} (adapter for a different base model?)"
            )
    return spec, module, {"image_proj": image_proj, "ip_layers": adapter["ip_layers"]}, design
