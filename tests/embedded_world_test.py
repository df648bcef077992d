"""What the embedded world's evaluation CLIP (the shipped tiny base's image encoder, `tiny_eval_clip`) sees beyond
colour. For scenes drawn at random, two renderings of the same scene (exact place and size redrawn) must be closer
than the scene and the scene with one attribute changed; and the text side must rank an image's own caption above
the caption with that attribute changed.

Measured on the shipped weights (48 scenes): image-embedding gap (cos same scene - cos one attribute changed)
colour 0.45, background 0.49, texture 0.34, size 0.33, shape 0.086, place 0.004; own caption preferred: colour,
background, texture, size 1.0, shape 0.73, place 0.60. The weights trained on the earlier world (colours, shape and
stripes only) gave size 0.05 and texture 0.29 on this world. Place is not seen: the tiny encoder's pooled embedding
is close to translation invariant, so no bound is asserted for it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ipadapter_jax.data import synthetic
from ipadapter_jax.evaluation.clip_score import CLIPScorer
from ipadapter_jax.evaluation.tiny_clip import tiny_eval_clip
from ipadapter_jax.weights import load_base, load_image_encoder, tiny_base

SCENES = 48
SIZE = tiny_base.VAE["sample_size"]
# Lower bounds below the measured values (module docstring); place has none.
MIN_GAP = {"colour": 0.3, "background": 0.3, "texture": 0.2, "size": 0.2, "shape": 0.03}
MIN_TEXT_HITS = {"colour": 0.9, "background": 0.9, "texture": 0.9, "size": 0.9, "shape": 0.6}


@pytest.fixture(scope="module")
def scorer() -> CLIPScorer:
    return CLIPScorer(tiny_eval_clip(load_base("tiny", progress=False), load_image_encoder("tiny")), batch_size=64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_every_attribute_moves_the_image_embedding(scorer):
    rng = np.random.default_rng(0)
    scenes = [synthetic.random_scene(rng) for _ in range(SCENES)]
    first = _unit(scorer.image_embeddings([synthetic.render(s, SIZE, rng) for s in scenes]))
    again = _unit(scorer.image_embeddings([synthetic.render(s, SIZE, rng) for s in scenes]))
    same = np.sum(first * again, axis=-1)
    gaps = {}
    for attribute in synthetic.ATTRIBUTES:
        other = _unit(
            scorer.image_embeddings([synthetic.render(synthetic.edit(s, attribute), SIZE, rng) for s in scenes])
        )
        gaps[attribute] = float(np.mean(same - np.sum(first * other, axis=-1)))
    print("same scene:", round(float(same.mean()), 3), "gap per changed attribute:", gaps)
    for attribute, bound in MIN_GAP.items():
        assert gaps[attribute] > bound, (attribute, gaps)


def test_the_text_side_prefers_the_own_caption_to_each_one_attribute_edit(scorer):
    rng = np.random.default_rng(1)
    scenes = [synthetic.random_scene(rng) for _ in range(SCENES)]
    images = _unit(scorer.image_embeddings([synthetic.render(s, SIZE, rng) for s in scenes]))
    own = np.sum(images * _unit(scorer.text_embeddings([s.caption for s in scenes])), axis=-1)
    hits = {}
    for attribute in synthetic.ATTRIBUTES:
        edited = _unit(scorer.text_embeddings([synthetic.edit(s, attribute).caption for s in scenes]))
        hits[attribute] = float(np.mean(own > np.sum(images * edited, axis=-1)))
    print("own caption preferred to the edited one:", hits)
    for attribute, bound in MIN_TEXT_HITS.items():
        assert hits[attribute] >= bound, (attribute, hits)


def test_scenes_round_trip_through_their_captions():
    rng = np.random.default_rng(2)
    for _ in range(200):
        scene = synthetic.random_scene(rng)
        assert synthetic.Scene.parse(scene.caption) == scene
        assert scene.colour != scene.background
    assert dataclasses.replace(scene, texture="plain").caption.count("plain") == 0
