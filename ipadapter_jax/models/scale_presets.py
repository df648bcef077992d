"""Named per-layer IP-Adapter scales: ComfyUI_IPAdapter_plus's weight types and InstantStyle's blocks.

A preset is numbers per cross-attention layer, so it reaches the UNet as data (`scales.ip_scale_tree` expands a
`ScalePreset`) and switching presets never recompiles. `w` is the preset's `weight` (the request's global IP
scale), `c` its `composition_weight`, `b` its `boost` (default w).

Layer numbering. ComfyUI_IPAdapter_plus (IPAdapterPlus.py `ipadapter_execute`, CrossAttentionPatch.py
`ipadapter_attention`) picks a layer's weight by ComfyUI's `transformer_index` t: its UNet counts the
SpatialTransformers (diffusers' Transformer2D, our `attentions_<j>`) in execution order, input (down) blocks, the
middle block, output (up) blocks, so every transformer block (attn2) inside one Transformer2D shares its t. In
diffusers' names:

- SD1.5 / SD2 (n = 16): t 0-1 down_blocks.0.attentions.0-1, 2-3 down_blocks.1, 4-5 down_blocks.2, 6 mid_block,
  7-9 up_blocks.1.attentions.0-2, 10-12 up_blocks.2, 13-15 up_blocks.3 (one transformer block each).
- SDXL (n = 11): t 0-1 down_blocks.1.attentions.0-1 (2 transformer blocks each), 2-3 down_blocks.2 (10 each),
  4 mid_block (10), 5-7 up_blocks.0.attentions.0-2 (10 each), 8-10 up_blocks.1 (2 each).

Weight types, as ComfyUI_IPAdapter_plus computes them (its names have spaces where ours have "-"):

- linear: w everywhere.
- ease-in: w * (0.05 + 0.95 * (1 - t/n)); ease-out: w * (0.05 + 0.95 * t/n);
  ease-in-out: w * (0.05 + 0.95 * (1 - |t - n/2| / (n/2))); reverse-in-out: w * (0.05 + 0.95 * |t - n/2| / (n/2)).
- weak-input / weak-middle / weak-output: 0.2 w in the down / mid / up blocks, w elsewhere; strong-middle: w in
  the mid block, 0.2 w in the down and up blocks.
  These six need no particular layout: on another UNet n is its number of Transformer2Ds (ComfyUI knows 16 and 11).
- Layer tables (SD1.5 / SD2 and SDXL layouts only; other layers 0):
  style-transfer: SD1.5 t 0-3, 9-15: w; SDXL t 6: w.
  composition: SD1.5 t 4: 0.25 w, t 5: w; SDXL t 3: w.
  strong-style-transfer: SD1.5 t 0-3, 6-15: w; SDXL t 0-2, 4-10: w.
  style-and-composition: SD1.5 t 0-3, 9-15: w, t 4: 0.25 c, t 5: c; SDXL t 3: c, t 6: w.
  strong-style-and-composition (ComfyUI's style+composition node with expand_style): SD1.5 t 0-3, 6-15: w,
  t 4-5: c; SDXL t 0-2, 4-10: w, t 3: c.
  c (default 1.0, ComfyUI's default weight_composition) is used by the last two only.
- Precise types (ComfyUI's "style transfer precise" / "composition precise"): at their *swapped* layers the image's
  tokens go to the negative (unconditional) branch and the positive branch gets none (zero tokens, so no image
  attention), which pushes the sample away from what those layers carry. b is ComfyUI's style_boost /
  composition_boost: the weight of the swapped layers.
  style-transfer-precise: SD1.5 t 0-3, 9-15: w, t 4: 0.25 b, t 5: b, swapped t 4-5; SDXL t 3: b, t 6: w, swapped
  t 3.
  composition-precise: SD1.5 t 0-3, 9-15: b, t 4: 0.25 w, t 5: w, t 6-8: 0.1 b, swapped all but t 4-5; SDXL t 3: w,
  t 6: b, t 0-2, 4-5, 7-10: 0.1 b, swapped all but t 3.
  The swap is a per-layer 0/1 factor ("swap", `ip_attention.select_tokens`), data like the scales.
- InstantStyle (README and infer_style*.py of instantX-research/InstantStyle; `target_blocks` layers get the
  scale, the others none): instantstyle-style: SDXL up_blocks.0.attentions.1 (t 6), SD1.5 up_blocks.1 (t 7-9);
  instantstyle-style-layout: adds SDXL down_blocks.2.attentions.1 (t 3), SD1.5 down_blocks.2 and mid_block
  (t 4-6). All w.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from ipadapter_jax.choices import WEIGHT_TYPES
from ipadapter_jax.models.adapter import FlaxPath, ip_layer_paths

# A Transformer2D with cross-attention: (container, block index, attention index), e.g. ("up_blocks", 1, 2).
Transformer = tuple[str, int, int]

_EXECUTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _blocks(container: str, blocks: Sequence[int], attentions: int) -> list[Transformer]:
    return [(container, b, a) for b in blocks for a in range(attentions)]


SD15_LAYOUT = (*_blocks("down_blocks", (0, 1, 2), 2), ("mid_block", 0, 0), *_blocks("up_blocks", (1, 2, 3), 3))
SDXL_LAYOUT = (*_blocks("down_blocks", (1, 2), 2), ("mid_block", 0, 0), *_blocks("up_blocks", (0, 1), 3))

_W, _C, _B = "weight", "composition_weight", "boost"
# name -> (SD1.5 table, SDXL table); a table maps t -> (which weight, factor); t not listed: 0.
_Table = dict[int, tuple[str, float]]


def _each(indices: Sequence[int], source: str = _W, factor: float = 1.0) -> _Table:
    return {t: (source, factor) for t in indices}


_LAYER_TABLES: dict[str, tuple[_Table, _Table]] = {
    "style-transfer": (_each([0, 1, 2, 3, *range(9, 16)]), _each([6])),
    "composition": ({4: (_W, 0.25), 5: (_W, 1.0)}, _each([3])),
    "strong-style-transfer": (_each([0, 1, 2, 3, *range(6, 16)]), _each([0, 1, 2, *range(4, 11)])),
    "style-and-composition": (
        {**_each([0, 1, 2, 3, *range(9, 16)]), 4: (_C, 0.25), 5: (_C, 1.0)},
        {3: (_C, 1.0), 6: (_W, 1.0)},
    ),
    "strong-style-and-composition": (
        {**_each([0, 1, 2, 3, *range(6, 16)]), **_each([4, 5], _C)},
        {**_each([0, 1, 2, *range(4, 11)]), 3: (_C, 1.0)},
    ),
    "style-transfer-precise": (
        {**_each([0, 1, 2, 3, *range(9, 16)]), 4: (_B, 0.25), 5: (_B, 1.0)},
        {3: (_B, 1.0), 6: (_W, 1.0)},
    ),
    "composition-precise": (
        {**_each([0, 1, 2, 3, *range(9, 16)], _B), 4: (_W, 0.25), 5: (_W, 1.0), **_each([6, 7, 8], _B, 0.1)},
        {**_each([0, 1, 2, 4, 5, 7, 8, 9, 10], _B, 0.1), 3: (_W, 1.0), 6: (_B, 1.0)},
    ),
    "instantstyle-style": (_each([7, 8, 9]), _each([6])),
    "instantstyle-style-layout": (_each(range(4, 10)), _each([3, 6])),
}
_USES_COMPOSITION = ("style-and-composition", "strong-style-and-composition")
# name -> (SD1.5 swapped t, SDXL swapped t) of the precise types
_SWAPPED = {
    "style-transfer-precise": ({4, 5}, {3}),
    "composition-precise": (set(range(16)) - {4, 5}, set(range(11)) - {3}),
}
_EASE = {
    "ease-in": lambda t, n: 0.05 + 0.95 * (1 - t / n),
    "ease-out": lambda t, n: 0.05 + 0.95 * (t / n),
    "ease-in-out": lambda t, n: 0.05 + 0.95 * (1 - abs(t - n / 2) / (n / 2)),
    "reverse-in-out": lambda t, n: 0.05 + 0.95 * (abs(t - n / 2) / (n / 2)),
}
# name -> the containers whose layers get 0.2 w (the others get w)
_WEAKENED = {
    "weak-input": ("down_blocks",),
    "weak-middle": ("mid_block",),
    "weak-output": ("up_blocks",),
    "strong-middle": ("down_blocks", "up_blocks"),
}


def weight_type_name(name: str) -> str:
    """A weight type in our spelling or ComfyUI's ("ease in" -> "ease-in"); ValueError listing the valid ones."""
    canonical = "-".join(str(name).strip().lower().split())
    if canonical not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {name!r}; valid: {', '.join(WEIGHT_TYPES)}")
    return canonical


@dataclasses.dataclass(frozen=True)
class ScalePreset:
    """A named per-layer scale preset with its weights, usable wherever an IP scale is (`scales.ScaleSpec`).

    name: one of `choices.WEIGHT_TYPES` (ComfyUI's spelling with spaces is accepted).
    weight: w, the global IP scale the preset multiplies.
    composition_weight: c, only for style-and-composition and strong-style-and-composition (None: 1.0).
    boost: b, only for the precise types: the weight of their swapped layers (None: the weight).
    """

    name: str
    weight: float = 1.0
    composition_weight: float | None = None
    boost: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", weight_type_name(self.name))
        if self.composition_weight is not None and self.name not in _USES_COMPOSITION:
            raise ValueError(
                f"composition_weight is used by weight types {', '.join(_USES_COMPOSITION)} only, not {self.name!r}"
            )
        if self.boost is not None and self.name not in _SWAPPED:
            raise ValueError(f"boost is used by weight types {', '.join(_SWAPPED)} only, not {self.name!r}")
        for field in (_W, _C, _B):
            value = getattr(self, field)
            if value is not None and not math.isfinite(float(value)):
                raise ValueError(f"weight type {self.name!r}: {field} must be a finite number, got {value}")

    def layer_scales(self, layers: Sequence[FlaxPath]) -> dict[FlaxPath, float]:
        """attn2 layer paths (`adapter.ip_layer_paths`) -> each layer's scale."""
        transformers = sorted({_transformer(path) for path in layers}, key=_execution_key)
        per_transformer = self._transformer_scales(transformers)
        return {path: per_transformer[_transformer(path)] for path in layers}

    def layer_swaps(self, layers: Sequence[FlaxPath]) -> dict[FlaxPath, float]:
        """attn2 layer paths -> 1.0 where the image's tokens go to the negative branch (precise types), else 0.0."""
        transformers = sorted({_transformer(path) for path in layers}, key=_execution_key)
        swapped = set()
        if self.name in _SWAPPED:
            indices = self._for_layout(_SWAPPED[self.name], transformers)
            swapped = {key for t, key in enumerate(transformers) if t in indices}
        return {path: float(_transformer(path) in swapped) for path in layers}

    def settings(self) -> dict:
        """JSON-able: {"weight_type", "weight", "composition_weight", "boost"}."""
        optional = {field: getattr(self, field) for field in (_C, _B)}
        return {
            "weight_type": self.name,
            "weight": float(self.weight),
            **{field: None if value is None else float(value) for field, value in optional.items()},
        }

    def _transformer_scales(self, transformers: list[Transformer]) -> dict[Transformer, float]:
        w, n = float(self.weight), len(transformers)
        if self.name == "linear":
            return dict.fromkeys(transformers, w)
        if self.name in _EASE:
            return {key: w * _EASE[self.name](t, n) for t, key in enumerate(transformers)}
        if self.name in _WEAKENED:
            return {key: w * (0.2 if key[0] in _WEAKENED[self.name] else 1.0) for key in transformers}
        weights = {
            _W: w,
            _C: 1.0 if self.composition_weight is None else float(self.composition_weight),
            _B: w if self.boost is None else float(self.boost),
        }
        table = self._for_layout(_LAYER_TABLES[self.name], transformers)
        return {key: weights[table[t][0]] * table[t][1] if t in table else 0.0 for t, key in enumerate(transformers)}

    def _for_layout(self, per_layout: tuple[Any, Any], transformers: list[Transformer]) -> Any:
        """The SD1.5/SD2 or the SDXL entry of `per_layout` for this UNet's Transformer2Ds; ValueError naming both
        layouts and this UNet's for any other."""
        if tuple(transformers) == SD15_LAYOUT:
            return per_layout[0]
        if tuple(transformers) == SDXL_LAYOUT:
            return per_layout[1]
        raise ValueError(
            f"weight type {self.name!r} is defined for SD1.5/SD2's {len(SD15_LAYOUT)} cross-attention "
            f"transformers (down_blocks 0-2, mid_block, up_blocks 1-3) and SDXL's {len(SDXL_LAYOUT)} (down_blocks "
            f"1-2, mid_block, up_blocks 0-1); this UNet has {len(transformers)}: {_describe(transformers)}"
        )


def preset_scales(
    name: str,
    unet_params_or_layer_paths: Any,
    weight: float = 1.0,
    composition_weight: float | None = None,
    boost: float | None = None,
) -> dict[FlaxPath, float]:
    """-> {attn2 layer path: scale} of weight type `name` for a UNet: its (IP-)UNet params, an adapter's
    `ip_layers`, or a sequence of attn2 layer paths such as `('up_blocks_0', 'attentions_1',
    'transformer_blocks_0', 'attn2')`."""
    layers = unet_params_or_layer_paths
    if not (isinstance(layers, Sequence) and all(isinstance(path, tuple) for path in layers)):
        layers = ip_layer_paths(layers)
    return ScalePreset(name, weight, composition_weight, boost).layer_scales(layers)


def _transformer(path: FlaxPath) -> Transformer:
    """('up_blocks_1', 'attentions_2', 'transformer_blocks_0', 'attn2') -> ('up_blocks', 1, 2)."""
    if path[0] == "mid_block":
        return ("mid_block", 0, int(path[1].rpartition("_")[2]))
    container, _, block = path[0].rpartition("_")
    return (container, int(block), int(path[1].rpartition("_")[2]))


def _execution_key(key: Transformer) -> tuple[int, int, int]:
    return (_EXECUTION_ORDER[key[0]], key[1], key[2])


def _describe(transformers: list[Transformer]) -> str:
    return ", ".join(f"{c}.{b}.attentions.{a}" if c != "mid_block" else "mid_block" for c, b, a in transformers)
