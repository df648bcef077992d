"""The evaluation CLIP of the embedded tiny base: the stand-in for the paper's ViT-L/14 in the demo and the tests."""

from __future__ import annotations

import numpy as np

from ipadapter_jax import quiet
from ipadapter_jax.data import synthetic
from ipadapter_jax.evaluation.clip_score import EvalCLIP
from ipadapter_jax.models.base_model import BaseModel
from ipadapter_jax.models.image_encoder import ImageEncoder
from ipadapter_jax.models.text_encoder import tokenize
from ipadapter_jax.weights import tiny_base

quiet.install()

from transformers import CLIPConfig  # noqa: E402  (after the log filter)
from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule  # noqa: E402


def tiny_eval_clip(base: BaseModel, image_encoder: ImageEncoder, num_images: int = 2048, seed: int = 1) -> EvalCLIP:
    """An evaluation CLIP (`ipadapter_jax.evaluation.clip_score.EvalCLIP`) for samples of the tiny base
    (`load_base("tiny")`, `load_image_encoder("tiny")`): the stand-in for the paper's ViT-L/14 in the demo's and the
    tests' CLIP-I / CLIP-T.

    Vision: the trained tiny image encoder (tower + projection). Text: the trained tiny text encoder; its
    projection (a training-only head that `tiny_base_train` does not keep) is refitted here by least squares,
    mapping each distinct caption's end-of-text state to the mean unit image embedding of `num_images`
    procedural images of seed `seed` with that caption. Deterministic; a few seconds on a CPU.
    """
    text = base.text_encoders[0]
    images, captions = synthetic.sample(num_images, tiny_base.VAE["sample_size"], seed)
    chunks = np.array_split(images, max(1, num_images // 256))
    embeds = np.concatenate([np.asarray(image_encoder.features(list(chunk), "base")) for chunk in chunks])
    embeds /= np.linalg.norm(embeds, axis=-1, keepdims=True)
    distinct = sorted(set(captions))
    owner = np.array([distinct.index(c) for c in captions])
    targets = np.stack([embeds[owner == k].mean(axis=0) for k in range(len(distinct))])
    ids = tokenize(text.tokenizer, distinct)
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    pooled = np.asarray(text.module.apply({"params": text.params}, ids, np.ones_like(ids), positions).pooler_output)
    text_projection = np.linalg.lstsq(pooled, targets, rcond=None)[0].astype(np.float32)  # (text width, dim)

    config = CLIPConfig(
        text_config=text.module.config.to_dict(),
        vision_config=image_encoder.config.to_dict(),
        projection_dim=image_encoder.config.projection_dim,
    )
    params = {
        "text_model": text.params["text_model"],
        "text_projection": {"kernel": text_projection},
        "vision_model": image_encoder.params["vision_model"],
        "visual_projection": image_encoder.params["visual_projection"],
        "logit_scale": np.float32(np.log(1 / 0.07)),  # unused by the metrics; the module declares it
    }
    return EvalCLIP(module=FlaxCLIPModule(config), params=params, tokenizer=text.tokenizer, max_length=ids.shape[1])
