"""The image branch's pure functions (`ipadapter_jax.models.ip_attention`): the embedding scaling modes on
hand-computed small cases, and the regional masks' resampling against diffusers' PyTorch `IPAdapterMaskProcessor`
(preprocessing and `downsample`, i.e. `F.interpolate(mode="bicubic")`)."""

from __future__ import annotations

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image

from ipadapter_jax.models.ip_attention import (
    bicubic_matrix,
    image_attention,
    masks_on_token_grid,
    scaling_factors,
)
from ipadapter_jax.pipelines.adapters import mask_pixels

# One query, two image tokens, one head of width 2. Scores q.k / sqrt(2) = (ln 3, 0): softmax (3/4, 1/4).
QUERY = jnp.array([[[[math.sqrt(2) * math.log(3), 0.0]]]])  # (B=1, L=1, heads=1, dim_head=2)
KEYS = jnp.array([[[1.0, 0.0], [0.0, 0.0]]])  # (1, N=2, 2)
VALUES = jnp.array([[[4.0, 0.0], [0.0, 8.0]]])  # mean over tokens (2, 4)
HALF_KEYS = math.sqrt(3) / (math.sqrt(3) + 1)  # softmax weight of token 0 when the keys are halved: (ln 3) / 2


def branch(mode: str, weight: float, inner_dim: int) -> np.ndarray:
    """The whole image branch of one adapter: scale * image_attention, (2,)."""
    factors = {k: jnp.float32(v) for k, v in scaling_factors(mode, weight, inner_dim).items()}
    return np.asarray(factors["scale"] * image_attention(QUERY, KEYS, VALUES, factors))[0, 0]


@pytest.mark.parametrize(
    "mode, weight, inner_dim, expected",
    [
        # w * (3/4 (4, 0) + 1/4 (0, 8)) = 0.5 * (3, 2)
        ("v_only", 0.5, 2, [1.5, 1.0]),
        # K/2, V/2: weights (a, 1 - a), a = sqrt(3) / (sqrt(3) + 1); values (2, 0), (0, 4)
        ("k_v", 0.5, 2, [2 * HALF_KEYS, 4 * (1 - HALF_KEYS)]),
        # w * C / 1280 = 0.25 * 2560 / 1280 = 0.5: as k_v with 0.5
        ("k_v_c_penalty", 0.25, 2560, [2 * HALF_KEYS, 4 * (1 - HALF_KEYS)]),
        # K/2; V - mean + mean/2 = V - (1, 2): values (3, -2), (-1, 6)
        ("k_mean_v_c_penalty", 0.25, 2560, [3 * HALF_KEYS - (1 - HALF_KEYS), -2 * HALF_KEYS + 6 * (1 - HALF_KEYS)]),
    ],
)
def test_embeds_scaling_modes_match_hand_computed_values(mode, weight, inner_dim, expected):
    np.testing.assert_allclose(branch(mode, weight, inner_dim), expected, rtol=1e-6)


def test_embeds_scaling_factors_and_unknown_mode():
    assert scaling_factors("k_mean_v_c_penalty", 0.8, 640) == {
        "scale": 1.0,
        "key_scale": 0.4,
        "value_scale": 1.0,
        "value_mean_scale": 0.4,
    }
    with pytest.raises(ValueError, match=r"embeds_scaling must be one of \('v_only', .*\), got 'V only'"):
        scaling_factors("V only", 1.0, 320)


def test_masked_images_attend_on_their_own_and_only_in_their_region():
    """Two images of one token each, two queries; image 0 masked to query 0 (weight 1), image 1 to query 1 at half
    weight: with one key per attention the softmax is 1, so each query gets exactly its image's value."""
    query = jnp.ones((1, 2, 1, 2))
    keys = jnp.array([[[1.0, 2.0], [3.0, -1.0]]])
    values = jnp.array([[[5.0, 7.0], [-2.0, 3.0]]])
    masks = jnp.array([[1.0, 0.0], [0.0, 0.5]])
    out = np.asarray(image_attention(query, keys, values, {}, masks))
    np.testing.assert_allclose(out, [[[5.0, 7.0], [-1.0, 1.5]]])
    # Without masks both tokens share one softmax: scores (3, 2) / sqrt(2).
    weights = np.exp(np.array([3.0, 2.0]) / math.sqrt(2))
    weights /= weights.sum()
    unmasked = np.asarray(image_attention(query, keys, values, {}))
    np.testing.assert_allclose(unmasked[0, 0], weights @ np.array([[5.0, 7.0], [-2.0, 3.0]]), rtol=1e-6)


@pytest.mark.parametrize("in_size, out_size", [(64, 8), (96, 12), (96, 3), (37, 5), (5, 11), (7, 7)])
def test_bicubic_matrix_matches_torch_interpolate(in_size: int, out_size: int):
    signal = np.random.default_rng(in_size).standard_normal((3, in_size)).astype(np.float32)
    theirs = torch.nn.functional.interpolate(
        torch.from_numpy(signal)[:, None, :, None], size=(out_size, 1), mode="bicubic"
    )[:, 0, :, 0].numpy()
    np.testing.assert_allclose(signal @ bicubic_matrix(in_size, out_size).T, theirs, atol=1e-5)


@pytest.mark.parametrize(
    "mask_size, num_queries",
    [((64, 96), 96), ((64, 96), 24), ((64, 96), 6), ((64, 64), 64), ((64, 96), 64), ((50, 30), 35)],
)
def test_masks_on_token_grid_match_diffusers_downsample(mask_size: tuple[int, int], num_queries: int):
    """Same grid, same bicubic weights, same zero padding / cut when the mask's aspect ratio differs."""
    masks = (np.random.default_rng(num_queries).random((2, *mask_size)) > 0.5).astype(np.float32)
    with warnings.catch_warnings():  # diffusers warns when the mask's aspect ratio does not fit the layer
        warnings.simplefilter("ignore", UserWarning)
        theirs = [
            IPAdapterMaskProcessor.downsample(torch.from_numpy(masks[i : i + 1]), 1, num_queries, 1)[0, :, 0].numpy()
            for i in range(2)
        ]
    np.testing.assert_allclose(np.asarray(masks_on_token_grid(jnp.asarray(masks), num_queries)), theirs, atol=1e-5)


def test_mask_pixels_match_diffusers_mask_processor():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    gray = Image.fromarray((rng.random((41, 23)) * 255).astype(np.uint8), "L")
    theirs = IPAdapterMaskProcessor().preprocess([rgb, gray], height=64, width=96)  # (2, 1, 64, 96)
    ours = mask_pixels([rgb, np.asarray(gray)], 64, 96)
    assert ours.shape == (2, 64, 96) and 0 < ours.mean() < 1
    np.testing.assert_array_equal(ours, theirs[:, 0].numpy())
