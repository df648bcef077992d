"""Decoupled cross-attention vs diffusers' PyTorch IP-Adapter (IPAdapterAttnProcessor2_0), fp32 on CPU.

For a tiny SD1.5-shaped and a tiny SDXL-shaped UNet: random PyTorch weights, a random adapter in the official
layout loaded into the PyTorch UNet with diffusers' own loader, the same weights converted into our Flax
IP-UNet (the UNet with the generic layout rules, the adapter with our official-layout mapping), then the
noise predictions compared for several scales, a per-block scale dict and two image prompts at once.
Tolerance: max |flax - torch| <= 1e-5 * max |torch|. Measured: 1.6e-6 to 2.3e-6 on both configs, with our
default PyTorch numerics (exact GELU in GEGLU, GroupNorm epsilon 1e-6 in Transformer2D: `pytorch_numerics`);
diffusers' Flax numerics (tanh GELU, 1e-5) sit at ~6e-5, the same at scale 0 (diffusers' Flax UNet vs its
PyTorch twin, not the adapter). PyTorch fp32 vs fp64 differs by ~1e-6.
"""

from __future__ import annotations

import copy
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders.ip_adapter import IPAdapterMixin

from ipadapter_jax.models.adapter import merge_unet_params, split_unet_params
from ipadapter_jax.models.random_init import abstract_params
from ipadapter_jax.models.scales import ip_scale_tree
from ipadapter_jax.models.unet import IPUNet2DConditionModel
from ipadapter_jax.testing import tiny
from ipadapter_jax.testing.compilations import lowerings
from ipadapter_jax.weights.official_layout import (
    adapter_from_official,
    ip_layers_from_official,
    ip_layers_to_official,
    official_layer_ids,
)
from ipadapter_jax.weights.torch_layout import torch_key_to_flax_module_path, torch_state_to_flax

pytestmark = pytest.mark.parity

BATCH, TEXT_TOKENS, CLIP_DIM, NUM_TOKENS = 2, 7, 48, 4
RTOL = 1e-5


class Case:
    """One tiny config: the PyTorch UNet with the adapter loaded, and our Flax model with the same weights."""

    def __init__(self, name: str):
        config = tiny.CONFIGS[name]
        self.name, self.config = name, config
        pristine = tiny.torch_unet(config)
        base_state = {k: v.numpy() for k, v in pristine.state_dict().items()}
        # One PyTorch UNet per adapter kind, each loaded by diffusers' own loader.
        self.officials, self.torch_unets = {}, {}
        for kind in ("base", "plus"):
            official = tiny.random_official_adapter(pristine, clip_dim=CLIP_DIM, num_tokens=NUM_TOKENS, kind=kind)
            torch_unet = copy.deepcopy(pristine)
            torch_unet._load_ip_adapter_weights(
                [{s: {k: torch.from_numpy(v) for k, v in d.items()} for s, d in official.items()}]
            )
            self.officials[kind], self.torch_unets[kind] = official, torch_unet
        self.official, self.torch_unet = self.officials["base"], self.torch_unets["base"]

        rng = np.random.default_rng(0)
        cross = config["cross_attention_dim"]
        self.sample = rng.standard_normal((BATCH, 4, 16, 16)).astype(np.float32)
        self.timesteps = np.array([3, 700], dtype=np.int32)
        self.text = rng.standard_normal((BATCH, TEXT_TOKENS, cross)).astype(np.float32)
        self.added = None
        if config.get("addition_embed_type") == "text_time":
            self.added = {
                "text_embeds": rng.standard_normal((BATCH, tiny.SDXL_TEXT_EMBEDS_DIM)).astype(np.float32),
                "time_ids": np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (BATCH, 1)),
            }

        self.unet = IPUNet2DConditionModel(**config)
        abstract = abstract_params(
            self.unet,
            jnp.zeros((1, 4, 16, 16)),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 1, cross)),
            added_cond_kwargs=None
            if self.added is None
            else {k: jnp.zeros((1,) + v.shape[1:]) for k, v in self.added.items()},
            image_tokens=jnp.zeros((1, NUM_TOKENS, cross)),
        )
        self.abstract = abstract
        frozen_abstract, _ = split_unet_params(abstract)
        self.frozen = torch_state_to_flax(base_state, frozen_abstract, source=f"torch {name} UNet")
        self.ip_layers = ip_layers_from_official(self.official["ip_adapter"], abstract)
        self.params = merge_unet_params(self.frozen, self.ip_layers)

        def predict(params, ip_scale, sample, timesteps, text, image_tokens, added):
            variables = {"params": params, "ip_scale": ip_scale}
            return self.unet.apply(
                variables, sample, timesteps, text, added_cond_kwargs=added, image_tokens=image_tokens
            ).sample

        self.predict = jax.jit(predict)

    def image_embeds(self, num_images: int, seed: int = 5, kind: str = "base") -> np.ndarray:
        """base: (B, num_images, CLIP_DIM) embeddings; plus: (B, num_images, PLUS_TOKENS, PLUS_HIDDEN)."""
        per_image = (CLIP_DIM,) if kind == "base" else (tiny.PLUS_TOKENS, tiny.PLUS_HIDDEN)
        return np.random.default_rng(seed).standard_normal((BATCH, num_images) + per_image).astype(np.float32)

    def torch_predict(self, image_embeds: np.ndarray, scale, kind: str = "base") -> np.ndarray:
        torch_unet = self.torch_unets[kind]
        # diffusers' pipeline method, applied to a stand-in object that only has the UNet.
        IPAdapterMixin.set_ip_adapter_scale(types.SimpleNamespace(unet=torch_unet), scale)
        added = {"image_embeds": [torch.from_numpy(image_embeds)]}
        if self.added is not None:
            added.update({k: torch.from_numpy(v) for k, v in self.added.items()})
        with torch.no_grad():
            out = torch_unet(
                torch.from_numpy(self.sample),
                torch.from_numpy(self.timesteps).long(),
                torch.from_numpy(self.text),
                added_cond_kwargs=added,
            ).sample
        return out.numpy()

    def torch_image_tokens(self, image_embeds: np.ndarray) -> np.ndarray:
        """diffusers' projection of the embeddings: (B, num_images * NUM_TOKENS, cross)."""
        with torch.no_grad():
            tokens = self.torch_unet.encoder_hid_proj([torch.from_numpy(image_embeds)])[0].numpy()
        return tokens.reshape(BATCH, -1, tokens.shape[-1])

    def flax_predict(self, image_tokens, scale, params=None) -> np.ndarray:
        params = self.params if params is None else params
        added = None if self.added is None else {k: jnp.asarray(v) for k, v in self.added.items()}
        return np.asarray(
            self.predict(
                params,
                ip_scale_tree(params, scale),
                jnp.asarray(self.sample),
                jnp.asarray(self.timesteps),
                jnp.asarray(self.text),
                None if image_tokens is None else jnp.asarray(image_tokens),
                added,
            )
        )


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def case(request) -> Case:
    return Case(request.param)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL) -> None:
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"max abs diff {err:.2e} x max|expected| > {rtol}"


SCALES = {
    "scale0": 0.0,
    "scale0.5": 0.5,
    "scale1": 1.0,
    # InstantStyle-like: style layers only; blocks not named get 0, as in diffusers.
    "per_block": {"down": {"block_1": 0.4}, "up": {"block_1": [0.0, 1.0, 0.0]}, "mid": 0.7},
}


@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.parametrize("scale_name", list(SCALES))
def test_noise_prediction_matches_diffusers(case: Case, scale_name: str, num_images: int):
    scale = SCALES[scale_name]
    if case.name == "sdxl" and scale_name == "per_block":
        scale = {"down": {"block_2": 0.5}, "up": {"block_0": [0.0, 1.0]}}
    embeds = case.image_embeds(num_images)
    expected = case.torch_predict(embeds, scale)
    actual = case.flax_predict(case.torch_image_tokens(embeds), scale)
    assert_close(actual, expected)


@pytest.mark.parametrize("kind", ["base", "plus"])
def test_projection_and_unet_end_to_end_match_diffusers(case: Case, kind: str):
    """Our image projection + UNet, loaded from the official state by our mapping, vs diffusers' whole path
    (MultiIPAdapterImageProjection + IPAdapterAttnProcessor2_0), two images per prompt."""
    embeds = case.image_embeds(2, kind=kind)
    expected = case.torch_predict(embeds, 0.6, kind)
    spec, image_proj, adapter = adapter_from_official(case.officials[kind], case.abstract)
    assert spec.kind == kind and spec.num_tokens == NUM_TOKENS
    tokens = image_proj.apply({"params": adapter["image_proj"]}, jnp.asarray(embeds))
    assert tokens.shape == (BATCH, 2 * NUM_TOKENS, case.config["cross_attention_dim"])
    actual = case.flax_predict(tokens, 0.6, merge_unet_params(case.frozen, adapter["ip_layers"]))
    assert_close(actual, expected)


def test_image_branch_is_not_negligible(case: Case):
    """Guards the parity tests' power: the image branch moves the output far beyond the tolerance."""
    embeds = case.image_embeds(1)
    assert (
        np.abs(case.torch_predict(embeds, 0.7) - case.torch_predict(embeds, 0.0)).max()
        > 100 * RTOL * np.abs(case.torch_predict(embeds, 0.0)).max()
    )


def test_layer_ids_match_diffusers_loader(case: Case):
    """Every PyTorch attn2 processor holds exactly the kernels of the Flax layer our mapping gave its id."""
    flat = {"/".join(k): v for k, v in _flat(case.ip_layers).items()}
    checked = 0
    for name, processor in case.torch_unet.attn_processors.items():
        if not name.endswith("attn2.processor"):
            continue
        path = "/".join(torch_key_to_flax_module_path(name[: -len(".processor")]))
        np.testing.assert_array_equal(flat[f"{path}/to_k_ip/kernel"], processor.to_k_ip[0].weight.detach().numpy().T)
        np.testing.assert_array_equal(flat[f"{path}/to_v_ip/kernel"], processor.to_v_ip[0].weight.detach().numpy().T)
        checked += 1
    assert checked == len(official_layer_ids(case.ip_layers)) == len(case.official["ip_adapter"]) // 2


def test_official_round_trip_is_exact(case: Case):
    section = ip_layers_to_official(case.ip_layers)
    assert section.keys() == case.official["ip_adapter"].keys()
    for key, value in case.official["ip_adapter"].items():
        np.testing.assert_array_equal(section[key], value)


def test_diffusers_flax_numerics_at_scale_zero_are_its_flax_unet_bit_for_bit(case: Case):
    """`pytorch_numerics=False` at scale 0 (or without image tokens) is diffusers' own Flax UNet, bit for bit."""
    from diffusers import FlaxUNet2DConditionModel

    base = FlaxUNet2DConditionModel(**case.config)
    frozen, _ = split_unet_params(case.params)
    added = None if case.added is None else {k: jnp.asarray(v) for k, v in case.added.items()}
    base_out = jax.jit(lambda p, x, t, c: base.apply({"params": p}, x, t, c, added_cond_kwargs=added).sample)(
        frozen, jnp.asarray(case.sample), jnp.asarray(case.timesteps), jnp.asarray(case.text)
    )
    flax_numerics = IPUNet2DConditionModel(**case.config, pytorch_numerics=False)
    tokens = case.torch_image_tokens(case.image_embeds(1))
    np.testing.assert_array_equal(predict_with(case, flax_numerics, tokens, scale=0.0), np.asarray(base_out))
    np.testing.assert_array_equal(predict_with(case, flax_numerics, None), np.asarray(base_out))


def test_pytorch_numerics_are_what_closes_the_gap(case: Case):
    """The default (exact GELU, PyTorch's GroupNorm epsilons) vs diffusers' Flax numerics: the latter sit an
    order of magnitude further from PyTorch, so the tight tolerance above is owed to the option."""
    embeds = case.image_embeds(1)
    expected = case.torch_predict(embeds, 1.0)
    tokens = case.torch_image_tokens(embeds)
    flax_numerics = predict_with(case, IPUNet2DConditionModel(**case.config, pytorch_numerics=False), tokens)
    ours = case.flax_predict(tokens, 1.0)
    gap, err = (np.abs(np.asarray(x) - expected).max() / np.abs(expected).max() for x in (flax_numerics, ours))
    assert err <= RTOL and gap > 10 * err, f"PyTorch numerics {err:.1e} vs diffusers' Flax numerics {gap:.1e}"


def test_changing_scale_does_not_recompile(case: Case):
    tokens = case.torch_image_tokens(case.image_embeds(1))
    case.flax_predict(tokens, 0.3)
    with lowerings() as lowered:
        for scale in (0.0, 0.9, {"up": {"block_1": 0.5}}):
            case.flax_predict(tokens, scale)
    assert lowered == [], f"{len(lowered)} functions were compiled again"


def predict_with(
    case: Case, unet: IPUNet2DConditionModel, image_tokens: np.ndarray | None, dtype=jnp.float32, scale: float = 1.0
) -> jax.Array:
    """`unet` (another module over the case's params) at `scale`, text and image tokens cast to `dtype`."""
    added = None if case.added is None else {k: jnp.asarray(v) for k, v in case.added.items()}
    return jax.jit(
        lambda p, s, x, t, c, i: (
            unet.apply({"params": p, "ip_scale": s}, x, t, c, added_cond_kwargs=added, image_tokens=i).sample
        )
    )(
        case.params,
        ip_scale_tree(case.params, scale),
        jnp.asarray(case.sample),
        jnp.asarray(case.timesteps),
        jnp.asarray(case.text, dtype),
        None if image_tokens is None else jnp.asarray(image_tokens, dtype),
    )


def test_bf16_compute_stays_close_to_fp32(case: Case):
    """`dtype=bfloat16` computes in bf16 with the same fp32 params; noise prediction within 2e-2 relative."""
    tokens = case.torch_image_tokens(case.image_embeds(1))
    out = predict_with(case, IPUNet2DConditionModel(**case.config, dtype=jnp.bfloat16), tokens, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    assert_close(np.asarray(out, np.float32), case.flax_predict(tokens, 1.0), rtol=2e-2)


@pytest.mark.parametrize("kernel", ["xla", "splash"])
def test_attention_kernels_match_diffusers(case: Case, kernel: str):
    """`attention_implementation="xla"` (jax.nn.dot_product_attention in attn1 and attn2) and "splash" (Pallas TPU
    splash attention in attn1, run here in interpret mode) == diffusers PyTorch (SD1.5 and SDXL head dims)."""
    embeds = case.image_embeds(1)
    unet = IPUNet2DConditionModel(**case.config, attention_implementation=kernel)
    out = predict_with(case, unet, case.torch_image_tokens(embeds))
    assert_close(np.asarray(out), case.torch_predict(embeds, 1.0))


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"attention_implementation": "flash"},
            r"attention_implementation must be one of \('diffusers', 'xla', "
            r"'cudnn', 'splash'\), got 'flash'",
        ),
        (
            {"attention_implementation": "xla", "use_memory_efficient_attention": True},
            r"use_memory_efficient_attention .* cannot be combined with attention_implementation='xla'",
        ),
    ],
)
def test_bad_attention_options_are_one_clear_error(options: dict, message: str):
    unet = IPUNet2DConditionModel(**tiny.SD15_TINY, **options)
    with pytest.raises(ValueError, match=message):
        abstract_params(
            unet,
            jnp.zeros((1, 4, 8, 8)),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 2, 32)),
            image_tokens=jnp.zeros((1, 4, 32)),
        )


def _flat(tree) -> dict:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree)
