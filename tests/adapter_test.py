"""Adapter params: counts at real SD1.5/SDXL size (no weights), layer numbering, init, split/merge, scales."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ipadapter_jax.models.adapter import (
    count_params,
    ip_layer_paths,
    ip_layers_from_unet,
    merge_unet_params,
    split_unet_params,
)
from ipadapter_jax.models.random_init import abstract_params, numpy_init
from ipadapter_jax.models.scales import ip_scale_tree
from ipadapter_jax.models.unet import IPUNet2DConditionModel
from ipadapter_jax.testing import tiny
from ipadapter_jax.weights.official_layout import official_layer_ids

# runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields
# that shape the params).
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def _abstract_unet(config: dict) -> dict:
    unet = IPUNet2DConditionModel(**config)
    cross = config["cross_attention_dim"]
    added = None
    if config.get("addition_embed_type") == "text_time":
        added = {"text_embeds": jnp.zeros((1, 1280)), "time_ids": jnp.zeros((1, 6))}
    return abstract_params(
        unet,
        jnp.zeros((1, 4, 8, 8)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, 1, cross)),
        added_cond_kwargs=added,
        image_tokens=jnp.zeros((1, 4, cross)),
    )


@pytest.mark.slow
def test_sd15_adapter_layers_are_19_17m_params_in_16_layers():
    params = _abstract_unet(SD15_UNET)
    frozen, ip_layers = split_unet_params(params)
    # Hand count: 16 cross-attention layers (down 2+2+2 at 320/640/1280 channels, up 3+3+3 at 1280/640/320,
    # mid 1 at 1280), each with K' and V' of shape 768 x channels.
    inner = 2 * 320 + 2 * 640 + 2 * 1280 + 3 * 1280 + 3 * 640 + 3 * 320 + 1280
    assert len(ip_layer_paths(ip_layers)) == 16
    assert count_params(ip_layers) == 2 * 768 * inner == 19_169_280
    assert count_params(frozen) == 859_520_964  # SD1.5 UNet, as reported for the released weights
    # The base projection (Linear 1024 -> 4 x 768, LayerNorm 768) completes the paper's 22M.
    image_proj = 1024 * 4 * 768 + 4 * 768 + 2 * 768
    assert round((count_params(ip_layers) + image_proj) / 1e6, 1) == 22.3


@pytest.mark.slow
def test_sdxl_has_70_cross_attention_layers_numbered_1_to_139_mid_last():
    params = _abstract_unet(SDXL_UNET)
    ids = official_layer_ids(params)
    assert sorted(ids.values()) == list(range(1, 140, 2))
    mid_ids = sorted(i for path, i in ids.items() if path[0] == "mid_block")
    assert mid_ids == list(range(121, 140, 2))
    inner = 2 * 2 * 640 + 2 * 10 * 1280 + 3 * 10 * 1280 + 3 * 2 * 640 + 10 * 1280
    assert count_params(split_unet_params(params)[1]) == 2 * 2048 * inner


def test_sd15_numbering_follows_registration_order_down_up_mid():
    ids = official_layer_ids(_abstract_unet(SD15_UNET))
    by_block = {}
    for path, layer_id in ids.items():
        by_block.setdefault(path[0], []).append(layer_id)
    assert by_block == {
        "down_blocks_0": [1, 3],
        "down_blocks_1": [5, 7],
        "down_blocks_2": [9, 11],
        "up_blocks_1": [13, 15, 17],
        "up_blocks_2": [19, 21, 23],
        "up_blocks_3": [25, 27, 29],
        "mid_block": [31],
    }


@pytest.fixture(scope="module")
def tiny_params() -> dict:
    return numpy_init(_abstract_unet(tiny.SD15_TINY), seed=0)


def test_init_copies_frozen_to_k_to_v(tiny_params):
    ip_layers = ip_layers_from_unet(split_unet_params(tiny_params)[0])
    paths = ip_layer_paths(ip_layers)
    assert paths == ip_layer_paths(tiny_params)
    for path in paths:
        layer = tiny_params
        for part in path:
            layer = layer[part]
        ip = ip_layers
        for part in path:
            ip = ip[part]
        np.testing.assert_array_equal(ip["to_k_ip"]["kernel"], layer["to_k"]["kernel"])
        np.testing.assert_array_equal(ip["to_v_ip"]["kernel"], layer["to_v"]["kernel"])


def test_split_merge_round_trip(tiny_params):
    frozen, ip_layers = split_unet_params(tiny_params)
    assert not any(p[-2] in ("to_k_ip", "to_v_ip") for p in _flat(frozen))
    assert all(p[-2] in ("to_k_ip", "to_v_ip") for p in _flat(ip_layers))
    merged = _flat(merge_unet_params(frozen, ip_layers))
    flat = _flat(tiny_params)
    assert merged.keys() == flat.keys() and all(merged[p] is flat[p] for p in flat)


class TestScaleTree:
    def test_number_sets_every_layer(self, tiny_params):
        tree = ip_scale_tree(tiny_params, 0.25)
        leaves = [v for p, v in _flat(tree).items()]
        assert len(leaves) == len(ip_layer_paths(tiny_params)) and all(float(v) == 0.25 for v in leaves)

    def test_block_dict_follows_diffusers_convention(self, tiny_params):
        tree = _flat(ip_scale_tree(tiny_params, {"up": {"block_1": [0.0, 1.0, 0.5]}, "mid": 0.75}))
        got = {p[:2]: float(v) for p, v in tree.items()}
        assert got[("up_blocks_1", "attentions_1")] == 1.0
        assert got[("up_blocks_1", "attentions_2")] == 0.5
        assert got[("mid_block", "attentions_0")] == 0.75
        assert got[("down_blocks_0", "attentions_0")] == 0.0  # not named -> 0, as in diffusers
        assert got[("up_blocks_2", "attentions_0")] == 0.0

    @pytest.mark.parametrize(
        "spec, message",
        [
            ({"up": {"block_0": 1.0}}, "up.block_0 has no cross-attention"),
            ({"up": {"block_1": [1.0, 0.0]}}, "has 3 attention layers, got 2 scales"),
            ({"middle": 1.0}, "unknown key"),
            ({"down": {"first": 1.0}}, "not of the form 'block_<index>'"),
            ({"mid": [1.0, 2.0]}, "mid takes one scale"),
        ],
    )
    def test_bad_specs_raise_clear_errors(self, tiny_params, spec, message):
        with pytest.raises(ValueError, match=message):
            ip_scale_tree(tiny_params, spec)


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)
