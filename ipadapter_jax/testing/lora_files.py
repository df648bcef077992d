"""Random LoRAs for the tiny PyTorch models, saved in the formats diffusers' `load_lora_weights` reads.

`random_lora` picks the target modules off the *PyTorch* models (diffusers' UNet, transformers' CLIP text encoder)
by their own module names, so the files are independent of our Flax naming; `save_lora` writes them as
diffusers/peft (`lora_A`/`lora_B`, alphas in the `lora_adapter_metadata` header), kohya (`lora_unet_...lora_down`,
`.alpha` tensors) or the pre-peft diffusers format (`processor.to_q_lora.down`, `.lora.down`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.numpy

# Linear layers of attention and feed-forward, a 1x1 conv (SD1.5's proj_in), 3x3 convs (resnets, samplers).
UNET_TARGETS = ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v", "ff.net.2", "proj_in", "resnets.0.conv1",
                "resnets.1.conv2", "downsamplers.0.conv", "upsamplers.0.conv")  # fmt: skip
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1")
FORMATS = ("peft", "kohya", "diffusers")
# kohya's SDXL files: UNet modules named after the original SD UNet (`input_blocks_4_1_...`), `lora_te1_`/`lora_te2_`.
KOHYA_SGM = "kohya-sgm"

Layers = dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (component, module) -> (down, up)


def random_lora(models: dict, rank: int = 4, seed: int = 0, std: float = 0.2) -> Layers:
    """Random down/up weights for every target module of `models` ({"unet": torch UNet, "text_encoder": ...})."""
    import torch

    rng = np.random.default_rng(seed)
    layers = {}
    for component, model in models.items():
        targets = UNET_TARGETS if component == "unet" else TEXT_TARGETS
        for name, module in model.named_modules():
            if not name.endswith(targets):
                continue
            weight = module.weight
            if isinstance(module, torch.nn.Linear):
                down_shape, up_shape = (rank, weight.shape[1]), (weight.shape[0], rank)
            elif isinstance(module, torch.nn.Conv2d):
                down_shape, up_shape = (rank, weight.shape[1], *weight.shape[2:]), (weight.shape[0], rank, 1, 1)
            else:
                continue
            down = (std * rng.standard_normal(down_shape)).astype(np.float32)
            layers[(component, name)] = (down, (std * rng.standard_normal(up_shape)).astype(np.float32))
    return layers


def save_lora(path: Path, layers: Layers, fmt: str, alphas: dict[str, float], special: tuple[str, float] | None = None,
              unet_config: dict | None = None):  # fmt: skip
    """Writes `layers` in `fmt` with per-component `alphas` (and, with `special`, one module's own alpha);
    KOHYA_SGM needs the UNet's config."""
    state: dict[str, np.ndarray] = {}
    metadata = {}
    for (component, module), (down, up) in layers.items():
        alpha = special[1] if special and module == special[0] else alphas[component]
        if fmt == "peft":
            state[f"{component}.{module}.lora_A.weight"] = down
            state[f"{component}.{module}.lora_B.weight"] = up
        elif fmt in ("kohya", KOHYA_SGM):
            te1 = "lora_te1_" if fmt == KOHYA_SGM else "lora_te_"
            prefix = {"unet": "lora_unet_", "text_encoder": te1, "text_encoder_2": "lora_te2_"}[component]
            renamed = _sgm_name(module, unet_config) if fmt == KOHYA_SGM and component == "unet" else module
            name = prefix + renamed.replace(".", "_")
            state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
            state[f"{name}.alpha"] = np.asarray(alpha, np.float32)
        else:
            base = f"{component}.{_pre_peft_name(component, module)}"
            state[f"{base}.down.weight"], state[f"{base}.up.weight"] = down, up
    if fmt == "peft":
        for component in {c for c, _ in layers}:
            modules = sorted(m for c, m in layers if c == component)
            rank = next(d.shape[0] for (c, _), (d, _) in layers.items() if c == component)
            metadata.update({f"{component}.r": rank, f"{component}.lora_alpha": alphas[component],
                             f"{component}.target_modules": modules, f"{component}.rank_pattern": {},
                             f"{component}.alpha_pattern": {}})  # fmt: skip
            if special and special[0] in modules:
                metadata[f"{component}.alpha_pattern"] = {special[0]: special[1]}
        metadata = {"lora_adapter_metadata": json.dumps(metadata)}
    safetensors.numpy.save_file(state, str(path), metadata=metadata or None)
    return path


def _sgm_name(module: str, config: dict) -> str:
    """A diffusers UNet module path -> the original SD UNet's (what kohya's SDXL files are named after)."""
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}  # fmt: skip
    entries = config["layers_per_block"] + 1
    kind, *rest = module.split(".")
    if kind == "mid_block":
        part, layer, inner = rest[0], rest[1], rest[2:]
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(part, layer)]
        head = f"middle_block.{index}"
    else:
        block, part, layer, inner = int(rest[0]), rest[1], int(rest[2]), rest[3:]
        if kind == "down_blocks":
            index = 1 + block * entries + (entries - 1 if part == "downsamplers" else layer)
            head = f"input_blocks.{index}.{0 if part != 'attentions' else 1}"
            inner = ["op"] if part == "downsamplers" else inner
        else:
            attention = "CrossAttn" in config["up_block_types"][block]
            index = block * entries + (entries - 1 if part == "upsamplers" else layer)
            position = {"resnets": 0, "attentions": 1, "upsamplers": 2 if attention else 1}[part]
            head = f"output_blocks.{index}.{position}"
    if part == "resnets":
        inner = [resnet.get(".".join(inner), ".".join(inner))]
    return ".".join([head, *inner])


def _pre_peft_name(component: str, module: str) -> str:
    """diffusers' format before peft: attention projections as processor LoRAs, other modules' `.lora`."""
    projections = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
    if component == "unet":
        for torch_name, lora_name in projections.items():
            if module.endswith(f".{torch_name}") and ".attn" in module:
                return f"{module[: -len(torch_name) - 1]}.processor.{lora_name}_lora"
        return f"{module}.lora"
    text = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
    head, _, last = module.rpartition(".")
    if last in text:
        return f"{head}.{text[last]}_lora"
    return f"{module}.lora_linear_layer"
