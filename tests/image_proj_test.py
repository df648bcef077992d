"""Image projections and their official-checkpoint conversion, checked against diffusers' PyTorch modules.

diffusers' modules are built from official-layout state dicts by diffusers' own loader
(`_convert_ip_adapter_image_proj_to_diffusers`, strict `load_state_dict`), so the official key names we
write are the ones diffusers reads.
"""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders.unet import UNet2DConditionLoadersMixin
from diffusers.models.embeddings import (
    ImageProjection,
    IPAdapterFullImageProjection,
    IPAdapterPlusImageProjection,
    MultiIPAdapterImageProjection,
)
from flax import traverse_util

from ipadapter_jax.models.image_proj import ImageProjModel, MLPProjModel, Resampler
from ipadapter_jax.models.random_init import numpy_init
from ipadapter_jax.weights.image_proj_keys import (
    ConversionError,
    build_image_proj,
    detect_kind,
    flax_to_official,
    load_image_proj,
    official_key,
    official_to_flax,
    param_shapes,
)

pytestmark = pytest.mark.parity

# diffusers' loader reads heads as to_q rows / 64 and renames exactly layers 0..3: dim_head 64, depth 4.
TINY = {
    "base": ImageProjModel(cross_attention_dim=24, clip_embeddings_dim=32, num_tokens=4),
    "plus": Resampler(dim=128, depth=4, heads=2, num_queries=4, embedding_dim=32, output_dim=48),
    "full": MLPProjModel(cross_attention_dim=24, clip_embeddings_dim=32),
}
# Per-image input shapes: CLIP image_embeds (D,) for base, hidden_states[-2] (257, E) for plus/full.
PER_IMAGE = {"base": (32,), "plus": (257, 32), "full": (257, 32)}


def random_official_state(module, seed=0):
    """Official-layout state with every leaf random (LayerNorm scales near 1, biases near 0)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(numpy_init(param_shapes(module), seed))
    for path, value in flat.items():
        if path[-1] in ("scale", "bias"):
            flat[path] = (value + 0.2 * rng.standard_normal(value.shape)).astype(np.float32)
    return flax_to_official(traverse_util.unflatten_dict(flat))


def diffusers_projection(state):
    """diffusers' PyTorch module, built and loaded (strictly) by diffusers from an official-layout state."""
    tensors = {key: torch.from_numpy(value) for key, value in state.items()}
    convert = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers  # uses `self` only on meta
    return convert(None, tensors, low_cpu_mem_usage=False).eval()


def assert_close(ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    err = np.max(np.abs(ours - theirs))
    assert err <= 1e-4 * np.max(np.abs(theirs)), f"max abs diff {err} vs max |output| {np.max(np.abs(theirs))}"


@pytest.mark.parametrize("num_images", [None, 3])
@pytest.mark.parametrize("kind", ["base", "plus", "full"])
def test_matches_diffusers(kind, num_images):
    state = random_official_state(TINY[kind])
    spec, module, params = load_image_proj(state)
    assert spec.kind == kind
    torch_module = diffusers_projection(state)
    expected_class = {"base": ImageProjection, "plus": IPAdapterPlusImageProjection}.get(
        kind, IPAdapterFullImageProjection
    )
    assert type(torch_module) is expected_class

    batch = (2,) if num_images is None else (2, num_images)
    x = np.random.default_rng(1).standard_normal(batch + PER_IMAGE[kind]).astype(np.float32)
    ours = jax.jit(module.apply)({"params": params}, x)
    with torch.no_grad():
        if num_images is None:
            theirs = torch_module(torch.from_numpy(x)).numpy()
        else:  # diffusers: (B, num_images, N, cross); its attention processors attend to the N * num_images tokens
            theirs = MultiIPAdapterImageProjection([torch_module])([torch.from_numpy(x)])[0].numpy()
            theirs = theirs.reshape(2, -1, theirs.shape[-1])
    assert ours.shape == (2, (num_images or 1) * spec.num_tokens, theirs.shape[-1])
    assert_close(ours, theirs)


def test_loading_compiles_and_runs_nothing(caplog):
    """Shapes come from `jax.eval_shape` of the init: a concrete (random) init would compile its ops."""
    state = random_official_state(TINY["plus"])
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        load_image_proj(state)
    assert not [record.getMessage() for record in caplog.records if "Compiling" in record.getMessage()]


def test_resampler_bfloat16_computation():
    state = random_official_state(TINY["plus"])
    spec, module32, params = load_image_proj(state)
    module16 = build_image_proj(spec, jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(param_shapes(module16)))
    x = np.random.default_rng(1).standard_normal((2, 257, 32)).astype(np.float32)
    out16 = jax.jit(module16.apply)({"params": params}, x)
    out32 = jax.jit(module32.apply)({"params": params}, x)
    assert out16.dtype == jnp.bfloat16
    assert np.max(np.abs(np.asarray(out16, np.float32) - out32)) <= 0.05 * np.max(np.abs(out32))


# The official models at real size: (diffusers PyTorch module, ours). CLIP ViT-H/14: image_embeds 1024,
# hidden 1280; SDXL base (ip-adapter_sdxl) uses ViT-bigG's 1280-d image_embeds.
REAL_SIZE = {
    "sd15 base": (
        lambda: ImageProjection(image_embed_dim=1024, cross_attention_dim=768, num_image_text_embeds=4),
        ImageProjModel(cross_attention_dim=768, clip_embeddings_dim=1024, num_tokens=4),
    ),
    "sdxl base": (
        lambda: ImageProjection(image_embed_dim=1280, cross_attention_dim=2048, num_image_text_embeds=4),
        ImageProjModel(cross_attention_dim=2048, clip_embeddings_dim=1280, num_tokens=4),
    ),
    "sd15 plus": (
        lambda: IPAdapterPlusImageProjection(
            embed_dims=1280, output_dims=768, hidden_dims=768, depth=4, dim_head=64, heads=12, num_queries=16
        ),
        Resampler(dim=768, depth=4, heads=12, num_queries=16, embedding_dim=1280, output_dim=768),
    ),
    "sdxl plus": (
        lambda: IPAdapterPlusImageProjection(
            embed_dims=1280, output_dims=2048, hidden_dims=1280, depth=4, dim_head=64, heads=20, num_queries=16
        ),
        Resampler(dim=1280, depth=4, heads=20, num_queries=16, embedding_dim=1280, output_dim=2048),
    ),
    "sd15 full": (
        lambda: IPAdapterFullImageProjection(image_embed_dim=1280, cross_attention_dim=768),
        MLPProjModel(cross_attention_dim=768, clip_embeddings_dim=1280),
    ),
}


@pytest.mark.parametrize("name", list(REAL_SIZE))
def test_param_count_at_real_size(name):
    make_torch, ours = REAL_SIZE[name]
    with torch.device("meta"):  # shapes only, no memory
        expected = sum(p.numel() for p in make_torch().parameters())
    if name == "sd15 base":
        assert expected == 1024 * 4 * 768 + 4 * 768 + 2 * 768 == 3_150_336  # REFERENCE s.1: "3.15M"
    shapes = param_shapes(ours)
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == expected

    # Kind detection reads shapes only: a zero-stride stand-in for every official tensor suffices.
    state = {
        official_key(path): np.broadcast_to(np.float32(0), leaf.shape[::-1] if path[-1] == "kernel" else leaf.shape)
        for path, leaf in traverse_util.flatten_dict(shapes).items()
    }
    spec = detect_kind(state)
    assert build_image_proj(spec) == ours
    assert spec.num_tokens == {"base": 4, "plus": 16, "full": 257}[spec.kind]


def test_official_key_names():
    module = Resampler(dim=64, depth=1, heads=1, num_queries=2, embedding_dim=16, output_dim=8)
    keys = set(flax_to_official(numpy_init(param_shapes(module))))
    layer = [f"layers.0.0.{name}" for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")]
    layer += ["layers.0.0.to_q.weight", "layers.0.0.to_kv.weight", "layers.0.0.to_out.weight"]
    layer += ["layers.0.1.0.weight", "layers.0.1.0.bias", "layers.0.1.1.weight", "layers.0.1.3.weight"]
    outer = [f"{name}.{leaf}" for name in ("proj_in", "proj_out", "norm_out") for leaf in ("weight", "bias")]
    assert keys == {"latents", *layer, *outer}
    base_keys = {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert set(flax_to_official(numpy_init(param_shapes(TINY["base"])))) == base_keys
    assert set(flax_to_official(numpy_init(param_shapes(TINY["full"])))) == {
        f"proj.{i}.{leaf}" for i in (0, 2, 3) for leaf in ("weight", "bias")
    }


@pytest.mark.parametrize(
    "module",
    [
        *TINY.values(),
        ImageProjModel(cross_attention_dim=8, clip_embeddings_dim=12, num_tokens=16),
        Resampler(dim=192, depth=2, heads=3, num_queries=5, embedding_dim=16, output_dim=8, ff_mult=2),
    ],
    ids=["base", "plus", "full", "base-16-tokens", "plus-depth-2"],
)
def test_round_trip_and_detection(module):
    state = random_official_state(module, seed=3)
    spec = detect_kind(state)
    assert build_image_proj(spec) == module
    back = flax_to_official(official_to_flax(state, module))
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_float16_state_is_loaded_as_float32():
    state = {key: value.astype(np.float16) for key, value in random_official_state(TINY["base"]).items()}
    params = official_to_flax(state, TINY["base"])
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    assert np.array_equal(params["proj"]["kernel"], state["proj.weight"].T.astype(np.float32))


def test_conversion_errors_name_key_and_shapes():
    module = TINY["plus"]
    good = random_official_state(module)

    state = dict(good)
    del state["layers.1.0.to_kv.weight"]
    with pytest.raises(ConversionError, match=re.escape("missing (1): 'layers.1.0.to_kv.weight' (256, 128)")):
        official_to_flax(state, module, source="ip.bin")

    state = dict(good, **{"proj_out.weight": np.zeros((48, 100), np.float32)})
    with pytest.raises(ConversionError, match=re.escape("'proj_out.weight': expected (48, 128), found (48, 100)")):
        official_to_flax(state, module, source="ip.bin")

    state = dict(good, **{"layers.0.0.to_k.weight": np.zeros((128, 128), np.float32)})
    with pytest.raises(ConversionError, match=r"ip\.bin does not fit Resampler: unexpected \(1\): 'layers\.0\.0\.to_k"):
        official_to_flax(state, module, source="ip.bin")

    # A hidden layer removed: detection finds depth 1, the orphaned layers are reported as unexpected.
    state = {key: value for key, value in good.items() if not key.startswith("layers.1.")}
    with pytest.raises(ConversionError, match=r"unexpected \(22\): .*'layers\.2\.0\.norm1\.weight'"):
        load_image_proj(state)


@pytest.mark.parametrize(
    "state, message",
    [
        ({"image_proj.proj.weight": np.zeros((8, 4))}, "strip it first"),
        (
            {"proj.0.weight": np.zeros((8, 4)), "proj.2.weight": np.zeros((10, 8)), "norm.weight": np.zeros(4)},
            "are not FaceID's identity MLP",
        ),
        ({"proj.0.weight": np.zeros((8, 4))}, "'norm.weight' with 'proj.2.weight' (FaceID)"),
        ({"proj.weight": np.zeros((10, 4)), "norm.weight": np.zeros(4)}, "'proj.weight' has 10 rows"),
        ({"proj.weight": np.zeros((8, 4))}, "missing key 'norm.weight'"),
        ({"latents": np.zeros((1, 4, 32)), "proj_in.weight": np.zeros((32, 8))}, "missing key 'proj_out.weight'"),
        (
            {
                "latents": np.zeros((1, 4, 32)),
                "proj_in.weight": np.zeros((32, 8)),
                "proj_out.weight": np.zeros((16, 32)),
                "layers.0.0.to_q.weight": np.zeros((48, 32)),
                "layers.0.1.1.weight": np.zeros((128, 32)),
            },
            "'layers.0.0.to_q.weight' has 48 rows",
        ),
        ({"latents": np.zeros((4, 32))}, "'latents' expected a 3-d array, found shape (4, 32)"),
    ],
    ids=[
        "prefixed",
        "faceid-rows",
        "no-kind",
        "base-rows",
        "base-no-norm",
        "plus-no-proj-out",
        "plus-heads",
        "latents-rank",
    ],
)
def test_detect_variant_errors(state, message):
    with pytest.raises(ConversionError, match=re.escape(message)):
        detect_kind(state)


@pytest.mark.parametrize(
    "kind, shape", [("base", (2, 31)), ("base", (2, 1, 1, 32)), ("plus", (2, 32)), ("full", (257, 32, 2))]
)
def test_wrong_input_shape(kind, shape):
    module = TINY[kind]
    params = numpy_init(param_shapes(module))
    with pytest.raises(ValueError, match=re.escape(f"got shape {shape}")):
        module.apply({"params": params}, np.zeros(shape, np.float32))
