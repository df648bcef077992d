"""PyTorch <-> Flax tensor layout and naming: the rules every converter in this package shares.

Naming: a PyTorch state-dict key `down_blocks.0.attentions.1.proj_in.weight` names the Flax param path
`("down_blocks_0", "attentions_1", "proj_in", "kernel")`: a purely numeric key part (a ModuleList index) is
joined to its predecessor with "_", which is how diffusers' Flax modules name list members. The leaf name
follows the layer kind, read off the Flax target's shape:

| Flax leaf (shape)           | PyTorch leaf | layout                          |
|-----------------------------|--------------|---------------------------------|
| kernel (in, out)            | weight       | Linear (out, in): transpose     |
| kernel (kh, kw, in, out)    | weight       | Conv2d (out, in, kh, kw)        |
| scale                       | weight       | LayerNorm / GroupNorm           |
| embedding                   | weight       | Embedding                       |
| bias / other                | same name    | unchanged                       |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

FlaxPath = tuple[str, ...]


class ConversionError(ValueError):
    """A state dict does not fit its Flax target; the message names the source, key and shapes."""


def torch_key_to_flax_module_path(key: str) -> FlaxPath:
    """`'down_blocks.0.attentions.1.proj_in'` -> `('down_blocks_0', 'attentions_1', 'proj_in')`; '' -> ()."""
    path: list[str] = []
    for part in key.split(".") if key else ():
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def flax_leaf_to_torch(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Flax leaf name and array -> PyTorch leaf name and array (layout per the module docstring)."""
    if name == "kernel":
        if value.ndim == 2:
            return "weight", value.T
        if value.ndim == 4:
            return "weight", value.transpose(3, 2, 0, 1)
        raise ConversionError(f"kernel of rank {value.ndim} has no PyTorch layout rule")
    if name in ("scale", "embedding"):
        return "weight", value
    return name, value


def torch_leaf_to_flax(name: str, value: np.ndarray, flax_leaf_names: frozenset[str]) -> tuple[str, np.ndarray]:
    """PyTorch leaf name and array -> Flax leaf name and array.

    `flax_leaf_names` are the leaf names the Flax module holds (e.g. {"kernel", "bias"}); they decide what a
    PyTorch `weight` is (Linear/Conv kernel, norm scale or embedding).
    """
    if name != "weight":
        return name, value
    if "kernel" in flax_leaf_names:
        if value.ndim == 2:
            return "kernel", value.T
        if value.ndim == 4:
            return "kernel", value.transpose(2, 3, 1, 0)
        raise ConversionError(f"weight of rank {value.ndim} has no Flax kernel layout rule")
    if "scale" in flax_leaf_names:
        return "scale", value
    if "embedding" in flax_leaf_names:
        return "embedding", value
    return name, value


def torch_state_to_flax(
    state: Mapping[str, Any],
    target: Any,
    *,
    source: str,
    rename: Callable[[str], str] | None = None,
    dtype: Any = None,
) -> dict:
    """Converts a PyTorch-layout state dict into a Flax param tree shaped like `target`.

    Args:
      state: PyTorch key -> array (numpy, or anything `np.asarray` takes).
      target: the Flax param tree to fill, concrete or abstract (`jax.eval_shape` output): only shapes used.
      source: where `state` came from (a file name), for error messages.
      rename: optional map applied to each PyTorch key first (model-specific name differences).
      dtype: cast every leaf to this numpy dtype (default: keep the stored dtype).
    Returns:
      A nested dict of numpy arrays with exactly the paths and shapes of `target`.
    Raises:
      ConversionError: naming `source` and listing every missing key, unexpected key and shape mismatch.
    """
    expected = traverse_util.flatten_dict(_unfreeze(target))
    leaves_by_module: dict[FlaxPath, set[str]] = {}
    for path in expected:
        leaves_by_module.setdefault(path[:-1], set()).add(path[-1])

    converted: dict[FlaxPath, np.ndarray] = {}
    unexpected, mismatched = [], {}
    for key, value in state.items():
        renamed = rename(key) if rename else key
        module_key, _, leaf = renamed.rpartition(".")
        module_path = torch_key_to_flax_module_path(module_key)
        leaf_names = frozenset(leaves_by_module.get(module_path, ()))
        array = np.asarray(value)
        torch_shape = array.shape
        try:
            flax_leaf, array = torch_leaf_to_flax(leaf, array, leaf_names)
        except ConversionError as err:
            raise ConversionError(f"{source}: key '{key}': {err}") from None
        path = module_path + (flax_leaf,)
        if path not in expected:
            unexpected.append(key)
            continue
        want = tuple(expected[path].shape)
        if tuple(array.shape) != want:
            mismatched[path] = (
                f"'{key}': expected Flax {'/'.join(path)} {want}, found {tuple(array.shape)} "
                f"(PyTorch {tuple(torch_shape)})"
            )
            continue
        converted[path] = array.astype(dtype, copy=False) if dtype is not None else array

    missing = ["/".join(p) for p in expected if p not in converted and p not in mismatched]
    if mismatched or missing or unexpected:
        raise ConversionError(
            f"{source} does not fit the target model: "
            + describe_problems(list(mismatched.values()), missing, unexpected)
        )
    return traverse_util.unflatten_dict(converted)


def flax_to_torch_state(params: Any, *, rename: Callable[[str], str] | None = None) -> dict[str, np.ndarray]:
    """Flax param tree -> PyTorch state dict (numpy), keys by the naming rule of this module.

    `rename` maps each produced key to the model's real PyTorch key where the rule does not hold.
    Note the naming rule is only invertible when no Flax module name itself ends in `_<digits>` (diffusers'
    `linear_1`, `conv_1` ...): callers with such names pass `rename`.
    """
    out = {}
    for path, value in traverse_util.flatten_dict(_unfreeze(params)).items():
        leaf, array = flax_leaf_to_torch(path[-1], np.asarray(value))
        module = ".".join(_split_index(part) for part in path[:-1])
        key = f"{module}.{leaf}"
        out[rename(key) if rename else key] = np.ascontiguousarray(array)
    return out


def describe_problems(mismatched: list[str], missing: list[str], unexpected: list[str], limit: int = 20) -> str:
    """One line listing shape mismatches, missing and unexpected keys (the first `limit` of each)."""

    def clip(items: list[str], sep: str) -> str:
        return sep.join(items[:limit]) + (" ..." if len(items) > limit else "")

    problems = []
    if mismatched:
        problems.append("shape mismatch: " + clip(mismatched, "; "))
    if missing:
        problems.append(f"missing ({len(missing)}): " + clip(missing, ", "))
    if unexpected:
        problems.append(f"unexpected ({len(unexpected)}): " + clip(unexpected, ", "))
    return " | ".join(problems)


def _split_index(part: str) -> str:
    head, sep, tail = part.rpartition("_")
    return f"{head}.{tail}" if sep and tail.isdigit() else part


def _unfreeze(tree: Any) -> Any:
    return tree.unfreeze() if hasattr(tree, "unfreeze") else tree
