"""The embedding cache with tiny stand-in encoders (diffusers' Flax VAE, transformers' Flax CLIP text model, a
linear image embedding): stored values, chunked resume, simulated processes, and training on cached data."""

import dataclasses
import os

import ipadapter_jax  # noqa: F401  (log filter before diffusers/transformers)

# isort: split

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxAutoencoderKL
from transformers import CLIPTextConfig, FlaxCLIPTextModel

from ipadapter_jax.data import builder, embedding_cache, loader, preprocess
from ipadapter_jax.models.random_init import numpy_init
from ipadapter_jax.testing import data_files

NUM_RECORDS = 18
RESOLUTION = 32


def _encoders(vocab_size: int) -> dict:
    """name -> (encode_fn(params, batch), params), random weights from `numpy_init` (no compile for init)."""
    vae = FlaxAutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        latent_channels=4,
        sample_size=RESOLUTION,
    )
    vae_params = numpy_init(jax.eval_shape(lambda: vae.init_weights(jax.random.PRNGKey(0))), seed=0)

    def vae_fn(params, batch):
        # diffusers' Flax VAE takes NCHW; its latent distribution comes out NHWC.
        x = jnp.transpose(batch["pixel_values"], (0, 3, 1, 2))
        dist = vae.apply({"params": params}, x, method=vae.encode).latent_dist
        return {"latent_mean": dist.mean, "latent_std": dist.std}

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    text = FlaxCLIPTextModel(config, _do_init=False)
    text_params = numpy_init(jax.eval_shape(lambda: text.init_weights(jax.random.PRNGKey(0), (1, 77))), seed=1)

    def text_fn(params, batch):  # stored in bfloat16, as a real cache would to halve its size
        return {"text_states": text(batch["input_ids"], params=params).last_hidden_state.astype(jnp.bfloat16)}

    def image_fn(kernel, batch):  # stand-in for CLIP: mean colour of the CLIP input, projected
        return {"image_embeds": jnp.mean(batch["clip_pixel_values"], axis=(1, 2)) @ kernel}

    image_kernel = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    return {"vae": (vae_fn, vae_params), "text": (text_fn, text_params), "image": (image_fn, image_kernel)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    spec = data_files.make_dataset(root)
    raw_dir, _ = builder.build_dataset(spec["json"], spec["root"], os.path.join(root, "out"), max_skip_fraction=0.5)
    tokenizer = data_files.tiny_clip_tokenizer(os.path.join(root, "tokenizer"))
    pre = preprocess.Preprocessor([tokenizer], resolution=RESOLUTION, clip=preprocess.ClipPreprocessing.default(24))
    encoders = _encoders(len(tokenizer))
    cache_dir = os.path.join(root, "cache")
    # Two simulated processes, one after the other: chunks 0, 2 then 1, 3 (5 records per chunk).
    kwargs = dict(batch_size=4, chunk_size=5, process_count=2, num_threads=2, progress=False)
    assert embedding_cache.build_embedding_cache(raw_dir, cache_dir, pre, encoders, process_index=0, **kwargs) is None
    assert not embedding_cache.is_cache(cache_dir)
    assert sorted(os.listdir(cache_dir)) == [embedding_cache.chunk_name(c, 4) for c in (0, 2)]
    info = embedding_cache.build_embedding_cache(raw_dir, cache_dir, pre, encoders, process_index=1, **kwargs)
    return raw_dir, cache_dir, pre, encoders, info


def _direct(encoders, batch):
    """The encoders applied outside the cache machinery."""
    out = {}
    for fn, params in encoders.values():
        out.update(jax.device_get(jax.jit(fn)(params, batch)))
    return out


def test_cache_holds_the_encoders_outputs(setup):
    raw_dir, cache_dir, pre, encoders, info = setup
    assert info["num_records"] == NUM_RECORDS and len(info["files"]) == 4
    assert info["features"]["latent_mean"] == {"shape": [16, 16, 4], "dtype": "float32"}
    assert info["features"]["text_states"] == {"shape": [77, 32], "dtype": "bfloat16"}
    raw = builder.raw_source(raw_dir)
    cached = embedding_cache.CachedSource(cache_dir)
    assert len(cached) == NUM_RECORDS
    examples = [pre(raw[i]) for i in range(NUM_RECORDS)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    expected = _direct(encoders, batch)
    for i in range(NUM_RECORDS):
        record = cached[i]
        assert int(record["index"]) == i  # cached record i is raw record i
        assert set(record) == {*expected, "index", "original_size", "crop_top_left", "target_size"}
        for key in ("latent_mean", "latent_std", "image_embeds"):
            np.testing.assert_allclose(record[key], expected[key][i], rtol=1e-5, atol=1e-5, err_msg=key)
        assert record["text_states"].dtype == jnp.bfloat16
        np.testing.assert_allclose(
            record["text_states"].astype(np.float32),
            expected["text_states"][i].astype(np.float32),
            rtol=1e-2,
            atol=1e-2,
        )
        for key in ("original_size", "crop_top_left", "target_size"):
            np.testing.assert_array_equal(record[key], examples[i][key])
    # The null example: the encoders on the empty text and zero images.
    null = embedding_cache.CachedSource(cache_dir).null_example()
    null_inputs = {k: v[None] for k, v in pre.null_example().items()}
    expected_null = _direct(encoders, null_inputs)
    np.testing.assert_allclose(null["latent_mean"], expected_null["latent_mean"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        null["text_states"].astype(np.float32), expected_null["text_states"][0].astype(np.float32), rtol=1e-2, atol=1e-2
    )


def test_a_random_crop_is_refused_before_any_work(setup, tmp_path):
    raw_dir, _, pre, encoders, info = setup
    assert info["preprocessor"]["crop"] == "center"
    with pytest.raises(ValueError, match="one encoding per image"):
        embedding_cache.build_embedding_cache(
            raw_dir, tmp_path / "cache", dataclasses.replace(pre, crop="random"), encoders, progress=False
        )
    assert not (tmp_path / "cache").exists()


def test_interrupted_pass_resumes_missing_chunks_only(setup, tmp_path):
    raw_dir, cache_dir, pre, encoders, _ = setup
    copy = tmp_path / "cache"
    copy.mkdir()
    names = [embedding_cache.chunk_name(c, 4) for c in range(4)]
    for name in names:
        (copy / name).write_bytes((open(os.path.join(cache_dir, name), "rb")).read())
    os.remove(copy / names[2])  # chunk 2 never finished: a partial file under a temporary name
    (copy / f"{names[2]}.tmp12345").write_bytes(b"partial")
    mtimes = {n: os.stat(copy / n).st_mtime_ns for n in names if n != names[2]}
    info = embedding_cache.build_embedding_cache(
        raw_dir, copy, pre, encoders, batch_size=4, chunk_size=5, num_threads=2, progress=False
    )
    assert info is not None and not [n for n in os.listdir(copy) if ".tmp" in n]
    assert {n: os.stat(copy / n).st_mtime_ns for n in mtimes} == mtimes  # finished chunks not redone
    original, resumed = embedding_cache.CachedSource(cache_dir), embedding_cache.CachedSource(copy)
    for i in range(10, 15):  # chunk 2
        for key, value in original[i].items():
            np.testing.assert_allclose(np.asarray(resumed[i][key], np.float32), np.asarray(value, np.float32))


def test_loader_reads_raw_or_cached_in_the_same_order(setup):
    raw_dir, cache_dir, pre, encoders, _ = setup
    raw = loader.open_dataset(raw_dir, pre)
    cached = loader.open_dataset(cache_dir)
    assert cached.cached and not raw.cached
    raw_it = loader.DataIterator(raw, global_batch_size=6, seed=4, num_threads=2)
    cached_it = loader.DataIterator(cached, global_batch_size=6, seed=4, num_threads=2)
    for _ in range(4):  # crosses an epoch boundary (18 records)
        raw_batch, cached_batch = next(raw_it), next(cached_it)
        for key in ("index", "drop_image", "drop_text", "original_size", "crop_top_left", "target_size"):
            np.testing.assert_array_equal(raw_batch[key], cached_batch[key])
        assert cached_batch["latent_mean"].shape == (6, 16, 16, 4)
        assert cached_batch["text_states"].shape == (6, 77, 32)
        expected = _direct({"vae": encoders["vae"]}, {"pixel_values": raw_batch["pixel_values"]})
        np.testing.assert_allclose(cached_batch["latent_mean"], expected["latent_mean"], rtol=1e-5, atol=1e-5)
    assert set(cached.null_example) == {"latent_mean", "latent_std", "text_states", "image_embeds"}
