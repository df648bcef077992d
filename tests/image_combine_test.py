"""Combine modes (`pipelines/image_combine.py`) on small cases computed by hand from ComfyUI_IPAdapter_plus's
`combine_embeds` definitions (IPAdapterPlus.py `ipadapter_execute`)."""

from __future__ import annotations

import numpy as np
import pytest

from ipadapter_jax.pipelines.image_combine import combine_features, combine_mode_name, combine_negative_features
from ipadapter_jax.pipelines.image_prompt import ImagePrompt

# Two prompts (P = 2) of three images (K = 3) with 2-d features.
FEATURES = np.array(
    [
        [[1.0, 2.0], [3.0, -2.0], [5.0, 6.0]],
        [[0.0, 1.0], [2.0, 2.0], [-2.0, 3.0]],
    ],
    np.float32,
)


@pytest.mark.parametrize(
    "mode, want",
    [
        ("add", [[[9.0, 6.0]], [[0.0, 6.0]]]),
        # x1 - mean(x2, x3)
        ("subtract", [[[-3.0, 0.0]], [[0.0, -1.5]]]),
        ("average", [[[3.0, 2.0]], [[0.0, 2.0]]]),
    ],
)
def test_modes_that_give_one_input(mode, want):
    got = np.asarray(combine_features(FEATURES, mode))
    assert got.shape == (2, 1, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_norm_average_divides_by_the_norm_over_the_images_at_each_position():
    # Position 0: (3, 4) has norm 5 -> mean(3/5, 4/5) = 0.7; position 1: (2, 0), norm 2 -> mean(1, 0) = 0.5.
    features = np.array([[[3.0, 2.0], [4.0, 0.0]]], np.float32)
    np.testing.assert_allclose(np.asarray(combine_features(features, "norm average")), [[[0.7, 0.5]]], atol=1e-6)


def test_concat_and_a_single_image_are_unchanged():
    np.testing.assert_array_equal(np.asarray(combine_features(FEATURES, "concat")), FEATURES)
    for mode in ("add", "subtract", "average", "norm-average"):
        np.testing.assert_array_equal(np.asarray(combine_features(FEATURES[:, :1], mode)), FEATURES[:, :1])


def test_combined_images_keep_the_first_negative():
    negative = np.array([[7.0, 8.0], [9.0, 10.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(combine_negative_features(negative, "average", 2)), [[7.0, 8.0]])
    np.testing.assert_array_equal(np.asarray(combine_negative_features(negative, "concat", 2)), negative)
    np.testing.assert_array_equal(np.asarray(combine_negative_features(negative, "add", 1)), negative)


def test_unknown_mode_lists_the_valid_ones():
    assert combine_mode_name("Norm Average") == "norm-average"
    with pytest.raises(ValueError, match=r"unknown image combine mode 'mix'; valid: concat, add, subtract, average, "):
        combine_features(FEATURES, "mix")
    with pytest.raises(ValueError, match="unknown image combine mode 'max'"):
        ImagePrompt.of(image_embeds=FEATURES[0], combine="max")
