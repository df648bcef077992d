"""PyTorch `CLIPVisionModelWithProjection` weights -> `ipadapter_jax.models.image_encoder.CLIPImageEncoder` params.

Input: a folder as transformers' `save_pretrained` writes it (`config.json` plus `model.safetensors`, or shards
listed in `model.safetensors.index.json`), e.g. IP-Adapter's `models/image_encoder`. Read with safetensors'
numpy backend: no torch needed.

transformers' own route, `FlaxCLIPVisionModel.from_pretrained(folder, from_pt=True, _do_init=False)`, is broken
in 4.57 (and would need torch); here the param tree's shapes come from `jax.eval_shape` of the module's init
(no random init is run) and the state dict is converted against them with `ipadapter_jax.weights.torch_layout`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax
import safetensors.numpy
from flax import traverse_util
from safetensors import safe_open
from transformers import CLIPVisionConfig

from ipadapter_jax.models.image_encoder import CLIPImageEncoder
from ipadapter_jax.models.random_init import abstract_params
from ipadapter_jax.weights.torch_layout import torch_key_to_flax_module_path, torch_state_to_flax

# transformers' file names (transformers.utils.SAFE_WEIGHTS_NAME / SAFE_WEIGHTS_INDEX_NAME).
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# A buffer (not a parameter) that checkpoints saved by older transformers contain; Flax recomputes it.
_BUFFERS = frozenset({"vision_model.embeddings.position_ids"})


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file as numpy arrays (bfloat16 as `ml_dtypes.bfloat16`)."""
    with safe_open(str(path), framework="numpy") as f:
        has_bf16 = any(f.get_slice(key).get_dtype() == "BF16" for key in f.keys())
    if not has_bf16:
        return safetensors.numpy.load_file(str(path))
    # numpy has no bfloat16, so safetensors' numpy reader refuses such files; its flax reader returns jax
    # arrays whose numpy view is ml_dtypes.bfloat16. Kept on the CPU, whatever the default device.
    with jax.default_device(jax.devices("cpu")[0]):
        return {key: np.asarray(value) for key, value in safetensors.flax.load_file(str(path)).items()}


def read_weights(folder: str | Path) -> dict[str, np.ndarray]:
    """The state dict of a `save_pretrained` folder: `model.safetensors`, or the shards its index lists."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return read_safetensors(folder / WEIGHTS_NAME)
    if (folder / WEIGHTS_INDEX_NAME).is_file():
        shards = sorted(set(json.loads((folder / WEIGHTS_INDEX_NAME).read_text())["weight_map"].values()))
        return {key: value for shard in shards for key, value in read_safetensors(folder / shard).items()}
    raise FileNotFoundError(f"{folder}: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} found")


def clip_state_to_flax(
    state: Mapping[str, Any], module: CLIPImageEncoder, *, source: str, dtype: Any = np.float32
) -> dict:
    """`CLIPVisionModelWithProjection` state dict (PyTorch layout) -> `module`'s params (numpy, `dtype`).

    Raises:
      ConversionError: naming `source` and every missing, unexpected or misshapen key.
    """
    config = module.config
    example = np.zeros((1, config.image_size, config.image_size, config.num_channels), np.float32)
    target = traverse_util.flatten_dict(abstract_params(module, example))
    # torch_layout names a list member by joining its index to the parent (`layers.0` -> `layers_0`), while
    # transformers' Flax CLIP keeps the index as a level of its own (`layers/0`): convert against the joined
    # form of the target, then split the paths back.
    joined = {_join_indices(path): leaf for path, leaf in target.items()}
    params = torch_state_to_flax(
        {key: value for key, value in state.items() if key not in _BUFFERS},
        traverse_util.unflatten_dict(joined),
        source=source,
        dtype=dtype,
    )
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: flat[_join_indices(path)] for path in target})


def load_clip_image_encoder(
    folder: str | Path, *, dtype: jnp.dtype = jnp.float32, param_dtype: Any = np.float32
) -> tuple[CLIPImageEncoder, dict]:
    """Loads a `save_pretrained` `CLIPVisionModelWithProjection` folder.

    Args:
      folder: holds `config.json` (a `CLIPVisionConfig`) and the safetensors weights, as
        `CLIPVisionModelWithProjection.save_pretrained` writes them (IP-Adapter's `models/image_encoder`).
      dtype: the encoder's computation dtype.
      param_dtype: the numpy dtype the params are cast to (checkpoints are often float16).
    Returns:
      (module, params): `module.apply({"params": params}, pixel_values_nhwc)` gives `CLIPImageFeatures`.
    """
    config = CLIPVisionConfig.from_pretrained(str(folder), local_files_only=True)
    module = CLIPImageEncoder(config, dtype=dtype)
    return module, clip_state_to_flax(read_weights(folder), module, source=str(folder), dtype=param_dtype)


def _join_indices(path: tuple[str, ...]) -> tuple[str, ...]:
    # ('vision_model', 'encoder', 'layers', '0', 'mlp', 'fc1', 'kernel') -> (..., 'layers_0', 'mlp', 'fc1', 'kernel')
    return torch_key_to_flax_module_path(".".join(path[:-1])) + path[-1:]
