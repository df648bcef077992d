"""Official IP-Adapter `image_proj` weights <-> our Flax image projections (`ipadapter_jax.models.image_proj`).

State dicts here are flat {official key: numpy array in PyTorch layout} with keys WITHOUT the `image_proj.`
prefix: exactly the dict stored under "image_proj" in an official `.bin`, or the `image_proj.*` keys of an
official `.safetensors` with the prefix stripped (the form diffusers'
`_convert_ip_adapter_image_proj_to_diffusers` takes). Keys per kind (REFERENCE s.2):

  base  proj.{weight,bias}, norm.{weight,bias}
  plus  latents, proj_in.*, proj_out.*, norm_out.*, layers.{i}.0.{norm1,norm2}.*,
        layers.{i}.0.{to_q,to_kv,to_out}.weight, layers.{i}.1.0.* (LayerNorm), layers.{i}.1.{1,3}.weight
  full  proj.0.*, proj.2.*, proj.3.*
  faceid       proj.0.*, proj.2.*, norm.*
  faceid-plus  proj.0.*, proj.2.*, norm.*, perceiver_resampler.{proj_in,proj_out,norm_out}.*,
               perceiver_resampler.layers.{i}.0.* and .1.{0,1,3}.* (as plus's layers)

Flax path <-> official key: list indices joined with "_" become dots again (`layers_2_0` -> `layers.2.0`), the
Resampler's feed-forward members `norm`/`fc1`/`fc2` are the official `nn.Sequential` indices 0/1/3, and the leaf
follows `ipadapter_jax.weights.torch_layout` (Dense `kernel` = transposed Linear `weight`, LayerNorm `scale` =
`weight`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ipadapter_jax.models.image_proj import (
    AdapterKind,
    FaceIDPlusProjModel,
    FaceIDProjModel,
    ImageProjModel,
    MLPProjModel,
    Resampler,
)
from ipadapter_jax.models.random_init import abstract_params
from ipadapter_jax.weights.torch_layout import (
    ConversionError,
    describe_problems,
    flax_leaf_to_torch,
    torch_leaf_to_flax,
)

PREFIX = "image_proj."

# Neither checkpoint nor diffusers stores the Resampler's head size; both official models use 64.
RESAMPLER_DIM_HEAD = 64

# Full: one token per CLIP hidden state; 257 = 1 + (224 / 14)**2 for the ViT-H/14 (and any /14) encoder at 224 px.
CLIP_TOKENS = 257

# Children of the Resampler's `layers_{i}_1` FeedForward -> official indices in its nn.Sequential.
_FEED_FORWARD_INDEX = {"norm": "0", "fc1": "1", "fc2": "3"}
# Leaf names as `torch_layout.flax_leaf_to_torch` gives them (Dense kernel, LayerNorm scale), without an array.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight"}
_MODULES = {"base": ImageProjModel, "plus": Resampler, "full": MLPProjModel, "faceid": FaceIDProjModel,
            "faceid-plus": FaceIDPlusProjModel}  # fmt: skip
_FACEID_PLUS = "perceiver_resampler."


class ImageProjSpec(NamedTuple):
    """What an official `image_proj` state holds: the kind, its tokens per image, the module's arguments."""

    kind: AdapterKind
    num_tokens: int
    hparams: dict[str, int]  # keyword arguments of the kind's Flax module (all but dtype)


def detect_kind(state: Mapping[str, Any], *, source: str = "image_proj") -> ImageProjSpec:
    """Infers kind and module hyperparameters from the keys and shapes of an official `image_proj` state.

    base: `proj.weight` (num_tokens * cross, clip_dim) with `norm.weight` (cross,) (tokens from their ratio;
    diffusers assumes 4). plus: `latents` (1, num_queries, dim); depth = the number of `layers.{i}`; heads =
    to_q rows / 64. full: `proj.3.weight` (cross,), `proj.0.weight` (clip_dim, clip_dim).

    Raises:
      ConversionError: the state matches no kind, or a key the inference reads is missing or misshapen.
    """
    if "latents" in state:
        _, num_queries, dim = _shape(state, "latents", 3, source)
        embedding_dim = _shape(state, "proj_in.weight", 2, source)[1]
        output_dim = _shape(state, "proj_out.weight", 2, source)[0]
        depth = 0
        while f"layers.{depth}.0.to_q.weight" in state:
            depth += 1
        if depth == 0:
            raise ConversionError(f"{source}: Resampler state (has 'latents') lacks 'layers.0.0.to_q.weight'")
        inner = _shape(state, "layers.0.0.to_q.weight", 2, source)[0]
        ff_inner = _shape(state, "layers.0.1.1.weight", 2, source)[0]
        if inner % RESAMPLER_DIM_HEAD or ff_inner % dim:
            raise ConversionError(
                f"{source}: 'layers.0.0.to_q.weight' has {inner} rows (expected a multiple of the head size "
                f"{RESAMPLER_DIM_HEAD}) and 'layers.0.1.1.weight' {ff_inner} (expected a multiple of dim={dim})"
            )
        hparams = dict(
            dim=dim,
            depth=depth,
            heads=inner // RESAMPLER_DIM_HEAD,
            num_queries=num_queries,
            embedding_dim=embedding_dim,
            output_dim=output_dim,
            dim_head=RESAMPLER_DIM_HEAD,
            ff_mult=ff_inner // dim,
        )
        return ImageProjSpec("plus", num_queries, hparams)
    if f"{_FACEID_PLUS}proj_in.weight" in state:
        return _faceid_plus_spec(state, source)
    if "proj.weight" in state:
        rows, clip_dim = _shape(state, "proj.weight", 2, source)
        (cross,) = _shape(state, "norm.weight", 1, source)
        if rows % cross:
            raise ConversionError(
                f"{source}: 'proj.weight' has {rows} rows, not a multiple of the {cross} of 'norm.weight'"
            )
        hparams = dict(cross_attention_dim=cross, clip_embeddings_dim=clip_dim, num_tokens=rows // cross)
        return ImageProjSpec("base", rows // cross, hparams)
    if "proj.3.weight" in state:
        (cross,) = _shape(state, "proj.3.weight", 1, source)
        clip_dim = _shape(state, "proj.0.weight", 2, source)[1]
        return ImageProjSpec("full", CLIP_TOKENS, dict(cross_attention_dim=cross, clip_embeddings_dim=clip_dim))
    if "norm.weight" in state and "proj.2.weight" in state:
        (cross,) = _shape(state, "norm.weight", 1, source)
        hparams = _identity_mlp(state, cross, source)
        return ImageProjSpec("faceid", hparams["num_tokens"], dict(cross_attention_dim=cross, **hparams))
    hint = ""
    if any(key.startswith(PREFIX) for key in state):
        hint = f" (keys must not carry the '{PREFIX}' prefix: strip it first)"
    raise ConversionError(
        f"{source}: not an IP-Adapter image projection{hint}: expected 'latents' (Plus), 'proj.weight' (base) or "
        f"'proj.3.weight' (Full), 'norm.weight' with 'proj.2.weight' (FaceID) or '{_FACEID_PLUS}proj_in.weight' "
        f"(FaceID Plus). Keys found: {sorted(state)[:12]}"
    )


def _identity_mlp(state: Mapping[str, Any], width: int, source: str) -> dict[str, int]:
    """FaceID's identity MLP `proj.0` (mult * D, D), `proj.2` (num_tokens * width, mult * D) -> its hparams."""
    hidden, id_dim = _shape(state, "proj.0.weight", 2, source)
    rows = _shape(state, "proj.2.weight", 2, source)[0]
    if hidden % id_dim or rows % width:
        raise ConversionError(
            f"{source}: 'proj.0.weight' {(hidden, id_dim)} and 'proj.2.weight' ({rows}, ...) are not FaceID's identity "
            f"MLP (expected (mult * D, D) and (num_tokens * {width}, mult * D))"
        )
    return dict(id_embeddings_dim=id_dim, mult=hidden // id_dim, num_tokens=rows // width)


def _faceid_plus_spec(state: Mapping[str, Any], source: str) -> ImageProjSpec:
    dim, clip_dim = _shape(state, f"{_FACEID_PLUS}proj_in.weight", 2, source)
    output_dim = _shape(state, f"{_FACEID_PLUS}proj_out.weight", 2, source)[0]
    depth = 0
    while f"{_FACEID_PLUS}layers.{depth}.0.to_q.weight" in state:
        depth += 1
    inner = _shape(state, f"{_FACEID_PLUS}layers.0.0.to_q.weight", 2, source)[0]
    ff_inner = _shape(state, f"{_FACEID_PLUS}layers.0.1.1.weight", 2, source)[0]
    if inner % RESAMPLER_DIM_HEAD or ff_inner % dim:
        raise ConversionError(
            f"{source}: '{_FACEID_PLUS}layers.0.0.to_q.weight' has {inner} rows (expected a multiple of the head size "
            f"{RESAMPLER_DIM_HEAD}) and '{_FACEID_PLUS}layers.0.1.1.weight' {ff_inner} (expected a multiple of {dim})"
        )
    hparams = dict(cross_attention_dim=output_dim, dim=dim, heads=inner // RESAMPLER_DIM_HEAD,
                   clip_embeddings_dim=clip_dim, depth=depth, dim_head=RESAMPLER_DIM_HEAD, ff_mult=ff_inner // dim,
                   **_identity_mlp(state, dim, source))  # fmt: skip
    return ImageProjSpec("faceid-plus", hparams["num_tokens"], hparams)


def build_image_proj(spec: ImageProjSpec, dtype: jnp.dtype = jnp.float32) -> nn.Module:
    """The Flax module of `spec.kind` with `spec.hparams`, computing in `dtype`."""
    return _MODULES[spec.kind](**spec.hparams, dtype=dtype)


def param_shapes(module: nn.Module) -> dict:
    """The module's param tree as `jax.ShapeDtypeStruct`s (traced with `jax.eval_shape`; nothing computed)."""
    if isinstance(module, ImageProjModel):
        example = np.zeros((1, module.clip_embeddings_dim), np.float32)
    elif isinstance(module, Resampler):
        example = np.zeros((1, 1, module.embedding_dim), np.float32)
    elif isinstance(module, FaceIDProjModel):
        example = np.zeros((1, module.id_embeddings_dim), np.float32)
    elif isinstance(module, FaceIDPlusProjModel):
        example = np.zeros((1, module.id_embeddings_dim + module.clip_embeddings_dim), np.float32)
    else:
        example = np.zeros((1, 1, module.clip_embeddings_dim), np.float32)
    return abstract_params(module, example)


def official_key(path: tuple[str, ...]) -> str:
    """Flax param path -> official key: ('layers_2_1', 'fc1', 'kernel') -> 'layers.2.1.1.weight' (also under
    FaceID Plus's `perceiver_resampler`)."""
    *modules, leaf = path
    names = [
        _FEED_FORWARD_INDEX[name] if i and re.fullmatch(r"layers_\d+_1", modules[i - 1]) else name
        for i, name in enumerate(modules)
    ]
    return ".".join([re.sub(r"_(\d+)", r".\1", name) for name in names] + [_TORCH_LEAF.get(leaf, leaf)])


def official_to_flax(
    state: Mapping[str, Any], module: nn.Module, *, source: str = "image_proj", dtype: Any = np.float32
) -> dict:
    """Official `image_proj` state (no prefix, PyTorch layout) -> `module`'s param tree (numpy, `dtype`).

    Raises:
      ConversionError: naming `source` and every missing key (with its expected shape), unexpected key and
        shape mismatch (expected vs found, PyTorch layout).
    """
    expected = traverse_util.flatten_dict(param_shapes(module))
    path_of = {official_key(path): path for path in expected}
    converted, unexpected, mismatched = {}, [], []
    for key, value in state.items():
        path = path_of.get(key)
        if path is None:
            unexpected.append(f"'{key}'")
            continue
        value = np.asarray(value)
        want = _torch_shape(path, expected[path].shape)
        if value.shape != want:
            mismatched.append(f"'{key}': expected {want}, found {value.shape}")
            continue
        _, array = torch_leaf_to_flax(key.rpartition(".")[2], value, frozenset({path[-1]}))
        converted[path] = array.astype(dtype)
    missing = [
        f"'{key}' {_torch_shape(path, expected[path].shape)}" for key, path in path_of.items() if key not in state
    ]
    if mismatched or missing or unexpected:
        problems = describe_problems(mismatched, missing, unexpected)
        raise ConversionError(f"{source} does not fit {type(module).__name__}: {problems}")
    return traverse_util.unflatten_dict(converted)


def flax_to_official(params: Any) -> dict[str, np.ndarray]:
    """Our image projection param tree -> official `image_proj` state (no prefix, PyTorch layout, numpy)."""
    params = params.unfreeze() if hasattr(params, "unfreeze") else params
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        _, array = flax_leaf_to_torch(path[-1], np.asarray(value))
        out[official_key(path)] = np.ascontiguousarray(array)
    return out


def load_image_proj(
    state: Mapping[str, Any], *, source: str = "image_proj", dtype: jnp.dtype = jnp.float32
) -> tuple[ImageProjSpec, nn.Module, dict]:
    """Official `image_proj` state -> (its spec, the Flax module computing in `dtype`, float32 params)."""
    spec = detect_kind(state, source=source)
    module = build_image_proj(spec, dtype)
    return spec, module, official_to_flax(state, module, source=source)


def _shape(state: Mapping[str, Any], key: str, ndim: int, source: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"{source}: missing key '{key}'")
    shape = tuple(np.shape(state[key]))
    if len(shape) != ndim:
        raise ConversionError(f"{source}: '{key}' expected a {ndim}-d array, found shape {shape}")
    return shape


def _torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    # Every kernel here is a Dense kernel (in, out), stored by PyTorch as Linear weight (out, in).
    return tuple(reversed(flax_shape)) if path[-1] == "kernel" else tuple(flax_shape)
