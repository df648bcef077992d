"""The embedded world: the procedural images and captions (`ipadapter_jax.data.synthetic`) with the tiny base,
as the demo (`training/demo.py`) and the ablations (`ipadapter_jax.training.ablation`) use it: build the datasets,
generate from held-out image prompts at several IP scales, score CLIP-I with the tiny evaluation CLIP.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ipadapter_jax.data import builder, synthetic
from ipadapter_jax.evaluation.clip_score import CLIPScorer, cosine
from ipadapter_jax.evaluation.plots import Samples
from ipadapter_jax.models.adapter import Adapter
from ipadapter_jax.models.base_model import BaseModel
from ipadapter_jax.models.image_encoder import ImageEncoder
from ipadapter_jax.pipelines import IPAdapterPipeline
from ipadapter_jax.weights import load_adapter, tiny_base

IMAGE_SIZE = tiny_base.VAE["sample_size"]  # 64 px


def build_data(root: str, num_images: int, seed: int, log: Any = print) -> str:
    """Procedural images + captions in `root` -> a built TFDS dataset; returns its directory."""
    source = os.path.join(root, "source")
    captions = synthetic.write_dataset(source, num_images, IMAGE_SIZE, seed)
    path, report = builder.build_dataset(captions, os.path.join(source, "images"), os.path.join(root, "built"))
    log(f"{report['written']} examples ({report['skipped']} skipped) -> {path}")
    return path


def held_out_prompts(count: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """`count` procedural images of `seed` (not the training data's) and their captions: the image prompts."""
    images, captions = synthetic.sample(count, IMAGE_SIZE, seed=seed)
    return [Image.fromarray(a) for a in images], captions


def make_pipeline(base: BaseModel, image_encoder: ImageEncoder, export: str) -> tuple[IPAdapterPipeline, Adapter]:
    """Our pipeline on the tiny base (DDIM, SD1.5's settings) with the adapter read back from the exported file."""
    adapter = load_adapter(export, base, image_encoder=image_encoder)
    return IPAdapterPipeline(base, image_encoder, adapter), adapter


def generate(
    pipe: IPAdapterPipeline,
    prompts: Sequence[Image.Image],
    scales: Sequence[float],
    *,
    samples_per_prompt: int,
    inference_steps: int,
    guidance_scale: float,
    seed: int,
    texts: Sequence[str] | None = None,
    progress: bool = True,
    log: Any = print,
) -> Samples:
    """Generation from every image prompt (with text `texts[i]`, default empty: image only) at each scale: one
    batched call per scale, image prompt i with seed `seed + i`, so every scale starts from the same noise.
    -> {scale: [the `samples_per_prompt` PIL images of prompt i]}."""
    samples: Samples = {}
    count = samples_per_prompt
    texts = list(texts) if texts is not None else [""] * len(prompts)
    for scale in scales:
        out = pipe(
            list(prompts),
            per_prompt_images=True,
            prompt=texts,
            scale=scale,
            guidance_scale=guidance_scale,
            num_inference_steps=inference_steps,
            num_images_per_prompt=count,
            seed=[seed + i for i in range(len(prompts))],
            progress=progress and scale == scales[0],
        )
        samples[scale] = [out.images[i * count : (i + 1) * count] for i in range(len(prompts))]
        log(f"scale {scale:g}: {len(prompts)} image prompts x {count} samples")
    return samples


def clip_i(scorer: CLIPScorer, prompts: Sequence[Image.Image], samples: Samples) -> dict:
    """CLIP-I as the evaluation protocol computes it (`ipadapter_jax.evaluation.clip_score`, here with the tiny
    evaluation CLIP): mean per scale and per prompt (each the mean over its samples), and for reference the mean
    cosine between different image prompts."""
    prompt_embeds = scorer.image_embeddings(list(prompts))
    result: dict[str, Any] = {"mean": {}, "per_prompt": {}}
    for scale, per_prompt in samples.items():
        scores = [
            float(np.mean(cosine(scorer.image_embeddings(images), prompt_embeds[i : i + 1])))
            for i, images in enumerate(per_prompt)
        ]
        result["mean"][str(scale)] = float(np.mean(scores))
        result["per_prompt"][str(scale)] = scores
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(prompts)) if i != j]
    unrelated = cosine(prompt_embeds[[i for i, _ in pairs]], prompt_embeds[[j for _, j in pairs]]) if pairs else []
    result["unrelated_prompts_mean"] = float(np.mean(unrelated)) if pairs else None
    return result
