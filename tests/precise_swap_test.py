"""ComfyUI's precise weight types in the UNet: where a layer's "swap" factor is 1, the negative rows of guidance
attend to the positive image's tokens and the positive rows to none (CrossAttentionPatch.py: `uncond = cond;
cond = cond * 0`). Hand-computed token arrangements, and the UNet with swapped layers against the UNet handed
those tokens directly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ipadapter_jax.models.adapter import ip_layer_paths
from ipadapter_jax.models.ip_attention import select_tokens
from ipadapter_jax.models.ip_variables import ip_variables
from ipadapter_jax.models.unet import IPUNet2DConditionModel
from ipadapter_jax.pipelines.sampling import swapped_tokens
from ipadapter_jax.testing import tiny


def test_swapped_tokens_put_the_positive_image_on_the_negative_rows():
    tokens = jnp.arange(2 * 2 * 1 * 3, dtype=jnp.float32).reshape(2, 2, 1, 3)  # (B, G = (negative, positive), N, D)
    swapped = np.asarray(swapped_tokens(tokens))
    np.testing.assert_array_equal(swapped[:, 0], np.asarray(tokens[:, 1]))  # negative rows: the positive tokens
    np.testing.assert_array_equal(swapped[:, 1], 0.0)  # positive rows: none
    np.testing.assert_array_equal(np.asarray(swapped_tokens(tokens[:, 1:])), 0.0)  # without guidance: none
    mine, other = jnp.ones((2, 1, 3)), jnp.full((2, 1, 3), 7.0)
    np.testing.assert_array_equal(select_tokens(mine, other, {"swap": jnp.float32(1.0)}), other)
    np.testing.assert_array_equal(select_tokens(mine, other, {"swap": jnp.float32(0.0)}), mine)
    np.testing.assert_array_equal(select_tokens(mine, None, {"swap": jnp.float32(1.0)}), mine)


def test_swapped_layers_equal_the_unet_given_the_swapped_tokens():
    config = tiny.SD15_TINY
    cross = config["cross_attention_dim"]
    unet = IPUNet2DConditionModel(**config)
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((2, 4, 16, 16)), jnp.float32)  # rows: (negative, positive)
    text = jnp.asarray(rng.standard_normal((2, 5, cross)), jnp.float32)
    tokens = jnp.asarray(rng.standard_normal((1, 2, 4, cross)), jnp.float32)  # (B, G, N, D)
    params = jax.jit(unet.init)(jax.random.PRNGKey(0), sample, jnp.zeros((2,)), text, image_tokens=tokens[0])
    params = params["params"]
    layers = ip_layer_paths(params)
    swapped_layers = set(layers[: len(layers) // 2])

    # Swapped layers get the scale 0.8, the others 0 (where the tokens they would see differ).
    flat = traverse_util.flatten_dict(ip_variables(params, [0.8], ["v_only"]))
    for path in flat:
        on = path[:-1] in swapped_layers
        if path[-1] == "scale":
            flat[path] = jnp.float32(0.8 if on else 0.0)
        if path[-1] == "swap":
            flat[path] = jnp.float32(float(on))
    with_swap = traverse_util.unflatten_dict(flat)
    no_swap = traverse_util.unflatten_dict({k: (0.0 if k[-1] == "swap" else v) for k, v in flat.items()})

    def apply(variables: dict, image_tokens: jax.Array, swapped: jax.Array | None) -> np.ndarray:
        out = unet.apply(
            {"params": params, "ip_scale": variables},
            sample,
            jnp.array([10, 10]),
            text,
            image_tokens=image_tokens,
            swapped_image_tokens=None if swapped is None else (swapped,),
        )
        return np.asarray(out.sample)

    rows = tokens.reshape(2, 4, cross)
    swapped = swapped_tokens(tokens).reshape(2, 4, cross)  # (positive, zeros)
    got = apply(with_swap, rows, swapped)
    want = apply(no_swap, swapped, None)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.abs(got - apply(no_swap, rows, None)).max() > 1e-3  # the swap changes the prediction
