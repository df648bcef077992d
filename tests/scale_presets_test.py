"""Scale presets (`models/scale_presets.py`) vs tables hand-written from their published definitions.

Reference: ComfyUI_IPAdapter_plus (IPAdapterPlus.py `ipadapter_execute`: the per-index weight dicts;
CrossAttentionPatch.py `ipadapter_attention`: the ease / weak formulas, index t = ComfyUI's `transformer_index`,
n = 16 for SD1.5, 11 for SDXL) and InstantStyle (README, infer_style_sd15.py: `target_blocks`). The tables below
list, per preset, the scale of each Transformer2D in ComfyUI's index order, at weight 1 and composition weight 1,
computed by hand. The layers come from diffusers' PyTorch UNets of SD1.5's and SDXL's layouts (tiny channels):
every attn2 diffusers registers must get its Transformer2D's number.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from flax import traverse_util

from ipadapter_jax.choices import WEIGHT_TYPES
from ipadapter_jax.models.scale_presets import ScalePreset, preset_scales
from ipadapter_jax.models.scales import ip_scale_tree

# ComfyUI's transformer_index t -> diffusers' Transformer2D (execution order: down, mid, up).
SD15_TRANSFORMERS = [
    *(f"down_blocks.{b}.attentions.{a}" for b in (0, 1, 2) for a in (0, 1)),
    "mid_block.attentions.0",
    *(f"up_blocks.{b}.attentions.{a}" for b in (1, 2, 3) for a in (0, 1, 2)),
]
SDXL_TRANSFORMERS = [
    *(f"down_blocks.{b}.attentions.{a}" for b in (1, 2) for a in (0, 1)),
    "mid_block.attentions.0",
    *(f"up_blocks.{b}.attentions.{a}" for b in (0, 1) for a in (0, 1, 2)),
]

# name -> (SD1.5 scales for t = 0..15, SDXL scales for t = 0..10), weight 1, composition weight 1.
_ = 0.0
TABLES = {
    "linear": ([1.0] * 16, [1.0] * 11),
    "ease-in": (
        [1.0, 0.940625, 0.88125, 0.821875, 0.7625, 0.703125, 0.64375, 0.584375,
         0.525, 0.465625, 0.40625, 0.346875, 0.2875, 0.228125, 0.16875, 0.109375],
        [1.0, 0.913636, 0.827273, 0.740909, 0.654545, 0.568182, 0.481818, 0.395455, 0.309091, 0.222727, 0.136364],
    ),
    "ease-out": (
        [0.05, 0.109375, 0.16875, 0.228125, 0.2875, 0.346875, 0.40625, 0.465625,
         0.525, 0.584375, 0.64375, 0.703125, 0.7625, 0.821875, 0.88125, 0.940625],
        [0.05, 0.136364, 0.222727, 0.309091, 0.395455, 0.481818, 0.568182, 0.654545, 0.740909, 0.827273, 0.913636],
    ),
    "ease-in-out": (
        [0.05, 0.16875, 0.2875, 0.40625, 0.525, 0.64375, 0.7625, 0.88125,
         1.0, 0.88125, 0.7625, 0.64375, 0.525, 0.40625, 0.2875, 0.16875],
        [0.05, 0.222727, 0.395455, 0.568182, 0.740909, 0.913636, 0.913636, 0.740909, 0.568182, 0.395455, 0.222727],
    ),
    "reverse-in-out": (
        [1.0, 0.88125, 0.7625, 0.64375, 0.525, 0.40625, 0.2875, 0.16875,
         0.05, 0.16875, 0.2875, 0.40625, 0.525, 0.64375, 0.7625, 0.88125],
        [1.0, 0.827273, 0.654545, 0.481818, 0.309091, 0.136364, 0.136364, 0.309091, 0.481818, 0.654545, 0.827273],
    ),
    "weak-input": ([0.2] * 6 + [1.0] * 10, [0.2] * 4 + [1.0] * 7),
    "weak-middle": ([1.0] * 6 + [0.2] + [1.0] * 9, [1.0] * 4 + [0.2] + [1.0] * 6),
    "weak-output": ([1.0] * 7 + [0.2] * 9, [1.0] * 5 + [0.2] * 6),
    "strong-middle": ([0.2] * 6 + [1.0] + [0.2] * 9, [0.2] * 4 + [1.0] + [0.2] * 6),
    "style-transfer": ([1, 1, 1, 1, _, _, _, _, _, 1, 1, 1, 1, 1, 1, 1], [_, _, _, _, _, _, 1, _, _, _, _]),
    "composition": ([_, _, _, _, 0.25, 1, _, _, _, _, _, _, _, _, _, _], [_, _, _, 1, _, _, _, _, _, _, _]),
    "strong-style-transfer": ([1, 1, 1, 1, _, _, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, _, 1, 1, 1, 1, 1, 1, 1]),
    "style-and-composition": (
        [1, 1, 1, 1, 0.25, 1, _, _, _, 1, 1, 1, 1, 1, 1, 1],
        [_, _, _, 1, _, _, 1, _, _, _, _],
    ),
    "strong-style-and-composition": ([1.0] * 16, [1.0] * 11),
    "style-transfer-precise": (
        [1, 1, 1, 1, 0.25, 1, _, _, _, 1, 1, 1, 1, 1, 1, 1],
        [_, _, _, 1, _, _, 1, _, _, _, _],
    ),
    "composition-precise": (
        [1, 1, 1, 1, 0.25, 1, 0.1, 0.1, 0.1, 1, 1, 1, 1, 1, 1, 1],
        [0.1, 0.1, 0.1, 1, 0.1, 0.1, 1, 0.1, 0.1, 0.1, 0.1],
    ),
    "instantstyle-style": ([_, _, _, _, _, _, _, 1, 1, 1, _, _, _, _, _, _], [_, _, _, _, _, _, 1, _, _, _, _]),
    "instantstyle-style-layout": (
        [_, _, _, _, 1, 1, 1, 1, 1, 1, _, _, _, _, _, _],
        [_, _, _, 1, _, _, 1, _, _, _, _],
    ),
}  # fmt: skip
# The two presets with a composition weight, at weight 0.5 and composition weight 3 (the other layers: weight 0.5
# where the table has 1).
WEIGHTED = {
    "style-and-composition": (
        [0.5, 0.5, 0.5, 0.5, 0.75, 3, _, _, _, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        [_, _, _, 3, _, _, 0.5, _, _, _, _],
    ),
    "strong-style-and-composition": ([0.5] * 4 + [3, 3] + [0.5] * 10, [0.5] * 3 + [3] + [0.5] * 7),
}  # fmt: skip
# The precise types at weight 0.5 and boost 3 (ComfyUI's style_boost / composition_boost), and the Transformer2Ds
# whose image tokens go to the negative branch (CrossAttentionPatch.py: `uncond = cond; cond = cond * 0`).
BOOSTED = {
    "style-transfer-precise": (
        [0.5, 0.5, 0.5, 0.5, 0.75, 3, _, _, _, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        [_, _, _, 3, _, _, 0.5, _, _, _, _],
    ),
    "composition-precise": (
        [3, 3, 3, 3, 0.125, 0.5, 0.3, 0.3, 0.3, 3, 3, 3, 3, 3, 3, 3],
        [0.3, 0.3, 0.3, 0.5, 0.3, 0.3, 3, 0.3, 0.3, 0.3, 0.3],
    ),
}  # fmt: skip
SWAPPED = {
    "style-transfer-precise": ({4, 5}, {3}),
    "composition-precise": (set(range(16)) - {4, 5}, set(range(11)) - {3}),
}


def diffusers_attn2_layers(model: str) -> dict[tuple[str, ...], str]:
    """Our path of every attn2 of diffusers' PyTorch UNet of `model`'s layout -> its Transformer2D's name."""
    from diffusers import UNet2DConditionModel

    common = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=8, cross_attention_dim=8, attention_head_dim=2)
    if model == "sd15":
        unet = UNet2DConditionModel(**common, layers_per_block=2)  # diffusers' defaults: SD1.5's block types
    else:
        unet = UNet2DConditionModel(
            **{**common, "block_out_channels": (8, 8, 8)},
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
        )
    layers = {}
    for name in unet.attn_processors:
        if name.endswith(".attn2.processor"):
            module = name.removesuffix(".processor")  # down_blocks.1.attentions.0.transformer_blocks.1.attn2
            layers[tuple(re.sub(r"\.(\d+)", r"_\1", module).split("."))] = module.split(".transformer_blocks")[0]
    return layers


@pytest.fixture(scope="module")
def layers() -> dict[str, dict[tuple[str, ...], str]]:
    return {"sd15": diffusers_attn2_layers("sd15"), "sdxl": diffusers_attn2_layers("sdxl")}


def expected(model: str, table: list[float], layers: dict) -> dict[tuple[str, ...], float]:
    order = SD15_TRANSFORMERS if model == "sd15" else SDXL_TRANSFORMERS
    return {path: float(table[order.index(transformer)]) for path, transformer in layers.items()}


def test_the_layouts_have_the_published_layer_counts(layers):
    assert len(layers["sd15"]) == 16 and len(set(layers["sd15"].values())) == 16
    assert len(layers["sdxl"]) == 70 and len(set(layers["sdxl"].values())) == 11
    assert sorted(TABLES) == sorted(WEIGHT_TYPES)


@pytest.mark.parametrize("name", WEIGHT_TYPES)
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_preset_matches_its_published_table(name, model, layers):
    table = TABLES[name][0 if model == "sd15" else 1]
    want = expected(model, table, layers[model])
    got = preset_scales(name, list(layers[model]), weight=1.0)
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[p] for p in want], list(want.values()), rtol=0, atol=1e-6)
    # The weights multiply every layer.
    halved = preset_scales(name, list(layers[model]), 0.5, composition_weight=0.5 if name in WEIGHTED else None)
    np.testing.assert_allclose([halved[p] for p in want], [0.5 * v for v in want.values()], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(WEIGHTED))
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_composition_weight_sets_the_composition_layers(name, model, layers):
    want = expected(model, WEIGHTED[name][0 if model == "sd15" else 1], layers[model])
    got = preset_scales(name, list(layers[model]), weight=0.5, composition_weight=3.0)
    np.testing.assert_allclose([got[p] for p in want], list(want.values()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(BOOSTED))
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_precise_types_boost_and_swap_their_published_layers(name, model, layers):
    which = 0 if model == "sd15" else 1
    want = expected(model, BOOSTED[name][which], layers[model])
    got = preset_scales(name, list(layers[model]), weight=0.5, boost=3.0)
    np.testing.assert_allclose([got[p] for p in want], list(want.values()), rtol=0, atol=1e-6)
    swapped = [float(t in SWAPPED[name][which]) for t in range(16 if model == "sd15" else 11)]
    swaps = ScalePreset(name, 0.5, boost=3.0).layer_swaps(list(layers[model]))
    assert swaps == expected(model, swapped, layers[model])
    assert set(ScalePreset("style-transfer").layer_swaps(list(layers[model])).values()) == {0.0}


def test_a_preset_times_its_weight_reaches_the_ip_scale_collection(layers):
    ip_layers = traverse_util.unflatten_dict(
        {path + ("to_k_ip", "kernel"): np.zeros((1, 1), np.float32) for path in layers["sdxl"]}
    )
    tree = traverse_util.flatten_dict(ip_scale_tree(ip_layers, ScalePreset("style and composition", 0.5, 3.0)))
    want = expected("sdxl", WEIGHTED["style-and-composition"][1], layers["sdxl"])
    assert {path[:-1] for path in tree} == set(want)
    for path, value in want.items():
        assert tree[path + ("scale",)].dtype == np.float32
        assert float(tree[path + ("scale",)]) == pytest.approx(value, abs=1e-6)


def test_comfyui_spelling_is_accepted():
    assert ScalePreset("Ease In-Out").name == "ease-in-out"
    assert ScalePreset("strong style transfer", 0.7).settings() == {
        "weight_type": "strong-style-transfer",
        "weight": 0.7,
        "composition_weight": None,
        "boost": None,
    }
    assert ScalePreset("composition precise", 0.5, boost=2).settings()["boost"] == 2.0


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown weight type 'sharp'; valid: linear, ease-in, .*instantstyle-style"):
        ScalePreset("sharp")


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="composition_weight is used by .*style-and-composition.*not 'ease-in'"):
        ScalePreset("ease-in", composition_weight=0.5)
    with pytest.raises(ValueError, match="boost is used by .*style-transfer-precise.*not 'style-transfer'"):
        ScalePreset("style-transfer", boost=2.0)
    with pytest.raises(ValueError, match="weight must be a finite number, got nan"):
        ScalePreset("linear", math.nan)


def test_a_layer_table_preset_on_another_layout_names_both():
    # The tiny SD1.5-like UNet of the tests: 11 Transformer2Ds like SDXL, but in other blocks.
    tiny = [
        *((f"down_blocks_{b}", f"attentions_{a}", "transformer_blocks_0", "attn2") for b in (0, 1) for a in (0, 1)),
        *((f"up_blocks_{b}", f"attentions_{a}", "transformer_blocks_0", "attn2") for b in (1, 2) for a in (0, 1, 2)),
        ("mid_block", "attentions_0", "transformer_blocks_0", "attn2"),
    ]
    with pytest.raises(ValueError) as err:
        preset_scales("style-transfer", tiny)
    message = str(err.value)
    assert "SD1.5/SD2's 16" in message and "SDXL's 11" in message and "this UNet has 11: down_blocks.0" in message
    # Formula presets fit any layout: n = 11 here, t in execution order (down, mid, up).
    eased = preset_scales("ease-out", tiny)
    assert eased[tiny[0]] == pytest.approx(0.05)
    assert eased[tiny[-1]] == pytest.approx(0.05 + 0.95 * 4 / 11)  # the mid block is t = 4
    assert eased[tiny[4]] == pytest.approx(0.05 + 0.95 * 5 / 11)  # up_blocks.1.attentions.0 is t = 5
