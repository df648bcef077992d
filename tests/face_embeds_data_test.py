"""Identity embeddings (FaceID training) through the data path: annotations naming `.npy` files -> the TFDS build ->
the raw loader and the embedding cache -> batches whose `face_embeds` are the files' values, bit for bit; and the
one-line errors of bad files and of annotations where only some entries name one."""

import json
import os

import ipadapter_jax  # noqa: F401  (log filter before diffusers/transformers)

# isort: split

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.data import builder, embedding_cache, loader, preprocess
from ipadapter_jax.testing import data_files
from ipadapter_jax.testing import training_runs as runs

NUM_IMAGES, DIM, RESOLUTION = 6, 5, 32


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    path, embeds = runs.build_face_dataset(root, NUM_IMAGES, seed=0, dim=DIM)
    tokenizer = data_files.tiny_clip_tokenizer(str(root / "tokenizer"))
    pre = preprocess.Preprocessor([tokenizer], resolution=RESOLUTION, clip=preprocess.ClipPreprocessing.default(24))
    return root, path, embeds, pre


def _batches(data: loader.Dataset) -> list[dict]:
    """Every record once, in order, in batches of 3 (no shuffle, no condition drop)."""
    batches = loader.DataIterator(data, global_batch_size=3, seed=0, num_epochs=1, shuffle=False,
                                  drop_rates=(0.0, 0.0, 0.0), process_index=0, process_count=1)  # fmt: skip
    return list(batches)


def test_build_stores_the_npy_values(built):
    _, path, embeds, _ = built
    source = builder.raw_source(path)
    stored = np.stack([source[i]["face_embeds"] for i in range(NUM_IMAGES)])
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, embeds)


def test_raw_and_cached_batches_carry_face_embeds(built):
    root, path, embeds, pre = built
    raw = _batches(loader.open_dataset(path, pre))
    np.testing.assert_array_equal(np.concatenate([b["face_embeds"] for b in raw]), embeds)
    assert raw[0]["face_embeds"].shape == (3, DIM) and raw[0]["face_embeds"].dtype == np.float32

    def mean_colour(params, batch):  # stand-in encoder: what the cache stores next to the kept fields
        return {"image_embeds": jnp.mean(batch["clip_pixel_values"], axis=(1, 2))}

    cache = str(root / "cache")
    info = embedding_cache.build_embedding_cache(
        path, cache, pre, {"image": (mean_colour, {})}, batch_size=3, chunk_size=4, progress=False
    )
    assert info["features"]["face_embeds"] == {"shape": [DIM], "dtype": "float32"}
    cached = _batches(loader.open_dataset(cache))
    np.testing.assert_array_equal(np.concatenate([b["face_embeds"] for b in cached]), embeds)
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in cached]), np.arange(NUM_IMAGES))


def test_null_example_has_zero_face_embeds_only_for_faceid(built):
    *_, pre = built
    assert "face_embeds" not in pre.null_example()
    null = preprocess.Preprocessor(pre.tokenizers, resolution=RESOLUTION, clip=pre.clip, face_embed_dim=DIM)
    np.testing.assert_array_equal(null.null_example()["face_embeds"], np.zeros(DIM, np.float32))


def _annotations_with(root, faces: dict[int, object]) -> tuple[str, str]:
    """A 3-image annotations file whose entry i names faces[i] (absent: no face_embeds key); (file, image root)."""
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    entries = []
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(os.path.join(images, f"{i}.png"))
        entries.append({"image_file": f"{i}.png", "text": f"image {i}"})
        if i in faces:
            entries[-1]["face_embeds"] = faces[i]
    path = os.path.join(root, "captions.json")
    with open(path, "w") as f:
        json.dump(entries, f)
    return path, images


def _save(root, name: str, value: np.ndarray) -> str:
    os.makedirs(os.path.join(root, "images", "faces"), exist_ok=True)
    np.save(os.path.join(root, "images", "faces", name), value)
    return f"faces/{name}"


GOOD = np.arange(DIM, dtype=np.float32)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("missing", r"faces/missing\.npy: face_embeds file not found"),
        (np.arange(DIM, dtype=np.float64), r"faces/bad\.npy: face_embeds must be float32 \(5,\), found float64 \(5,\)"),
        (GOOD[None], r"faces/bad\.npy: face_embeds must be float32 \(5,\), found float32 \(1, 5\)"),
        (np.arange(DIM + 1, dtype=np.float32), r"faces/bad\.npy: .* found float32 \(6,\)"),
        ("../outside.npy", r"annotation entry 2: face_embeds must name a \.npy file relative to the image root"),
    ],
    ids=["missing", "float64", "batch_axis", "other_width", "outside_root"],
)
def test_bad_face_embeds_file_is_one_line(tmp_path, bad, message):
    if isinstance(bad, np.ndarray):
        name = _save(tmp_path, "bad.npy", bad)
    else:
        name = "faces/missing.npy" if bad == "missing" else bad
    faces = {0: _save(tmp_path, "0.npy", GOOD), 1: _save(tmp_path, "1.npy", GOOD), 2: name}
    captions, images = _annotations_with(tmp_path, faces)
    with pytest.raises(ValueError, match=message) as err:
        builder.build_dataset(captions, images, str(tmp_path / "out"), progress=False)
    assert "\n" not in str(err.value)


def test_some_entries_without_face_embeds_is_an_error(tmp_path):
    captions, images = _annotations_with(
        tmp_path, {0: _save(tmp_path, "0.npy", GOOD), 2: _save(tmp_path, "2.npy", GOOD)}
    )
    with pytest.raises(ValueError, match=r"captions\.json: 2 entries name a face_embeds file but entry 1 does not"):
        builder.build_dataset(captions, images, str(tmp_path / "out"), progress=False)
