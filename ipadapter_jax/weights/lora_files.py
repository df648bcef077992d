"""LoRA `.safetensors` files for Stable Diffusion (SD1.5/SD2 family, SDXL) in the formats diffusers'
`load_lora_weights` reads, parsed into one `LoraLayer` per adapted module.

- diffusers / peft: `unet.<module>.lora_A.weight` and `.lora_B.weight` (`text_encoder.`, `text_encoder_2.`); alphas
  from the header's `lora_adapter_metadata` (peft's LoraConfig per component: `unet.lora_alpha`,
  `unet.alpha_pattern`, `use_rslora`), else alpha = rank.
- diffusers before peft: `unet.<module>.lora.down.weight` / `.up.weight`; attention processors'
  `<attention>.processor.to_q_lora.down.weight` (`to_k`, `to_v`, `to_out`); text encoders'
  `<attention>.to_q_lora.down.weight` and `<mlp>.lora_linear_layer.down.weight`; `<module>.alpha` if present.
- kohya (sd-scripts): `lora_unet_<module, "_" for ".">.lora_down.weight` / `.lora_up.weight` / `.alpha`;
  `lora_te_` / `lora_te1_` for the text encoder, `lora_te2_` for SDXL's second; SDXL files name the UNet's modules
  after the original UNet (`lora_unet_input_blocks_4_1_...`, see `ipadapter_jax.weights.sgm_names`).

`<module>` is the PyTorch module path inside the component (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.
to_q`, `text_model.encoder.layers.0.self_attn.q_proj`); a kohya name is resolved against the target model's modules
when the LoRA is applied (`ipadapter_jax.weights.lora`). A layer's weight delta is `(alpha / rank) * up @ down`
(times the user's scale); `down` is (rank, in) for a Linear, (rank, in, kh, kw) for a Conv2d; `up` (out, rank) or
(out, rank, 1, 1).

Not supported (each a clear error naming the file and key): DoRA (`dora_scale`, `lora_magnitude_vector`), LoRA
biases (`lora_B.bias`), LyCORIS variants (`hada_`, `lokr_`, `lora_mid`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from ipadapter_jax import staging
from ipadapter_jax.weights.adapter_files import read_safetensors
from ipadapter_jax.weights.torch_layout import ConversionError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}  # fmt: skip
# Suffix of a down/up weight key after the module path -> which weight it is.
_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
}
_PROCESSOR = re.compile(r"(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TEXT_ATTENTION = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNSUPPORTED = ("dora_scale", "lora_magnitude_vector", "hada_", "lokr_", "lora_B.bias", "lora_mid")


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One adapted module: its delta is `alpha / rank * up @ down` (see the module docstring for shapes).

    component: "unet", "text_encoder" or "text_encoder_2". module: the PyTorch module path in it
    (dotted), or for kohya files the name with "_" for "." (`kohya=True`). key: the file's down-weight key.
    """

    component: str
    module: str
    down: np.ndarray
    up: np.ndarray
    alpha: float
    key: str
    kohya: bool = False

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def read_lora(path: str | os.PathLike) -> list[LoraLayer]:
    """Reads a LoRA `.safetensors` (any format in the module docstring) into its layers (float32 numpy).

    Raises:
      FileNotFoundError: no such file.
      ConversionError: not a safetensors file, an unsupported variant, a key of no known format, a down weight
        without its up weight (or the reverse), or ranks that disagree; the message names the file and key.
    """
    local = Path(staging.stage_down(path, what="LoRA file"))
    if not local.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if local.suffix != ".safetensors":
        raise ConversionError(f"{path}: a LoRA must be a .safetensors file, got '{local.suffix}'")
    tensors, metadata = read_safetensors(local)
    for key in tensors:
        if any(marker in key for marker in _UNSUPPORTED):
            raise ConversionError(
                f"{path}: key '{key}': DoRA, LoRA biases and LyCORIS variants are not supported (plain LoRA only)"
            )
    if tensors and all(key.startswith(tuple(_KOHYA_PREFIXES)) for key in tensors):
        return _kohya_layers(str(path), tensors)
    return _diffusers_layers(str(path), tensors, _peft_alphas(str(path), metadata))


def _kohya_layers(source: str, tensors: dict[str, np.ndarray]) -> list[LoraLayer]:
    layers, used = [], set()
    for key in sorted(tensors):
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        prefix = next(p for p in _KOHYA_PREFIXES if name.startswith(p))
        module = name[len(prefix) :]
        up_key, alpha_key = f"{name}.lora_up.weight", f"{name}.alpha"
        down, up = tensors[key], _partner(source, tensors, key, up_key)
        alpha = float(np.asarray(tensors[alpha_key]).reshape(())) if alpha_key in tensors else float(down.shape[0])
        used.update((key, up_key, alpha_key))
        layers.append(_layer(source, _KOHYA_PREFIXES[prefix], module, down, up, alpha, key, kohya=True))
    _check_all_used(source, tensors, used)
    return layers


def _diffusers_layers(source: str, tensors: dict[str, np.ndarray], alphas: _PeftAlphas) -> list[LoraLayer]:
    downs: dict[tuple[str, str], str] = {}
    ups: dict[tuple[str, str], str] = {}
    for key in tensors:
        component, dot, rest = key.partition(".")
        if not dot or component not in COMPONENTS or key.endswith(".alpha"):
            continue
        parsed = _diffusers_module(component, rest)
        if parsed is not None:
            which, module = parsed
            (downs if which == "down" else ups)[(component, module)] = key
    layers, used = [], set()
    for (component, module), key in sorted(downs.items()):
        if (component, module) not in ups:
            raise ConversionError(f"{source}: key '{key}' has no matching up (lora_B) weight")
        up_key, alpha_key = ups[(component, module)], f"{component}.{module}.alpha"
        down = tensors[key]
        if alpha_key in tensors:
            alpha = float(np.asarray(tensors[alpha_key]).reshape(()))
        else:
            alpha = alphas.alpha(component, module, down.shape[0])
        used.update((key, up_key, alpha_key))
        layers.append(_layer(source, component, module, down, tensors[up_key], alpha, key))
    stray_ups = [key for cm, key in ups.items() if cm not in downs]
    if stray_ups:
        raise ConversionError(f"{source}: key '{stray_ups[0]}' has no matching down (lora_A) weight")
    _check_all_used(source, tensors, used)
    return layers


def _diffusers_module(component: str, rest: str) -> tuple[str, str] | None:
    """`<module>.lora_A.weight` (and the other diffusers spellings) -> ("down" | "up", PyTorch module path)."""
    for suffix, which in _DIFFUSERS_SUFFIXES.items():
        if rest.endswith(suffix):
            return which, rest[: -len(suffix)]
    match = _PROCESSOR.search(rest)
    if match is None:
        return None
    attention = rest[: match.start()]
    projection = match[2]
    if component == "unet":
        module = f"{attention}.{'to_out.0' if projection == 'to_out' else projection}"
    else:
        module = f"{attention}.{_TEXT_ATTENTION[projection]}"
    return match[3], module


@dataclasses.dataclass(frozen=True)
class _PeftAlphas:
    """peft's LoraConfig fields per component from the header (diffusers' `lora_adapter_metadata`)."""

    configs: dict[str, dict]

    def alpha(self, component: str, module: str, rank: int) -> float:
        config = self.configs.get(component)
        if not config:
            return float(rank)  # diffusers without metadata: lora_alpha = r, scale 1
        if config.get("use_dora"):
            raise ConversionError(f"{component}: DoRA LoRAs are not supported (plain LoRA only)")
        alpha = float(config.get("lora_alpha", config.get("r", rank)))
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):  # peft's get_pattern_key rule
                alpha = float(value)
                break
        # With rsLoRA peft scales by alpha / sqrt(r); the delta is `alpha / rank * up @ down`.
        return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _peft_alphas(source: str, metadata: dict[str, str]) -> _PeftAlphas:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return _PeftAlphas({})
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConversionError(f"{source}: header entry '{METADATA_KEY}' is not valid JSON ({err})") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return _PeftAlphas(configs)


def _partner(source: str, tensors: dict[str, np.ndarray], key: str, partner: str) -> np.ndarray:
    if partner not in tensors:
        raise ConversionError(f"{source}: key '{key}' has no matching '{partner}'")
    return tensors[partner]


def _layer(source: str, component: str, module: str, down: np.ndarray, up: np.ndarray, alpha: float, key: str,
           *, kohya: bool = False) -> LoraLayer:  # fmt: skip
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    if (
        down.ndim not in (2, 4)
        or up.ndim != down.ndim
        or up.shape[1] != down.shape[0]
        or up.shape[2:]
        not in (
            (),
            (1, 1),
        )
    ):
        raise ConversionError(
            f"{source}: key '{key}': down {tuple(down.shape)} and up {tuple(up.shape)} are not a LoRA pair "
            "(expected down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]))"
        )
    return LoraLayer(component, module, down, up, alpha, key, kohya)


def _check_all_used(source: str, tensors: dict[str, np.ndarray], used: set[str]) -> None:
    unknown = sorted(set(tensors) - used)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConversionError(
            f"{source}: key '{unknown[0]}'{more} is not part of a LoRA in a known format (diffusers/peft "
            "`<component>.<module>.lora_A/lora_B.weight`, kohya `lora_unet_<module>.lora_down/lora_up.weight`)"
        )
