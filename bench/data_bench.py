"""Input-pipeline throughput: examples/s of the grain loader on raw and cached data, and what it costs a step.

Generates COCO-like data (640x480 RGB JPEGs, quality 90, captions of ~10 words), builds the TFDS dataset and
two embedding caches with record shapes of the tiny and SD1.5 configurations, then times `DataIterator`
(steady state, after a warm-up) on this machine:

  raw     decode JPEG + target resize/crop + CLIP resize/crop + tokenise   (what a step without cache needs)
  cached  read + msgpack-decode latents mean/std, image embedding, text states (what a cached step needs)

and relates it to a training step:
  tiny   the tiny UNet's frozen forward+backward on this 2-core CPU (REFERENCE.md s.5: 3.17 s per batch of 4,
         32x32 latents = 256 px images); share = loader time per step / step time, if run serially.
  SD1.5  1,666 GFLOP per example for forward+backward (REFERENCE.md s.4) at an assumed model-FLOP
         utilisation of the accelerator's peak: examples/s one accelerator consumes, and how many host cores
         of this machine's speed the loader needs to keep it fed.

Usage: python bench/data_bench.py [--examples 96] [--threads 2] [--json bench/data_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ipadapter_jax  # noqa: E402,F401  (log filter first)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ipadapter_jax.data import (
    builder,  # noqa: E402
    embedding_cache,  # noqa: E402
    loader,  # noqa: E402
    preprocess,  # noqa: E402
)
from ipadapter_jax.models.image_encoder import preprocess as clip_preprocess  # noqa: E402
from ipadapter_jax.testing import data_files  # noqa: E402

TINY_STEP_S, TINY_STEP_BATCH = 3.17, 4  # REFERENCE.md s.5, measured on this kind of machine
SD15_GFLOP_PER_EXAMPLE = 1666  # REFERENCE.md s.4, frozen-UNet adapter training forward+backward
SD15_ENCODER_GFLOP = 1114 + 340  # REFERENCE.md s.4: VAE encoder at 512^2 + CLIP ViT-H/14, per raw example
ACCELERATORS = {"TPU v5e": 197, "TPU v4": 275, "TPU v5p": 459, "H100 (measured peak)": 800}  # TFLOP/s bf16
ASSUMED_MFU = 0.4

# Record shapes: latents of a 4-channel VAE at /8, one image embedding, text-encoder states of 77 tokens.
CONFIGS = {
    "tiny": dict(resolution=256, latent=32, embed=256, text_dim=256),
    "sd15": dict(resolution=512, latent=64, embed=1024, text_dim=768),
}
WORDS = "a the dog cat photo of on in with red small large street table man woman sitting standing near".split()


def sd15_examples_per_s(peak_tflops: float) -> float:
    """Examples/s one accelerator trains SD1.5 at `ASSUMED_MFU` of `peak_tflops`."""
    return peak_tflops * 1e12 * ASSUMED_MFU / (SD15_GFLOP_PER_EXAMPLE * 1e9)


def make_images(root: str, count: int) -> str:
    rng = np.random.default_rng(0)
    images = os.path.join(root, "images")
    os.makedirs(images)
    entries = []
    for i in range(count):
        pixels = data_files.smooth_rgb(rng, 480, 640)
        Image.fromarray(pixels).save(os.path.join(images, f"{i}.jpg"), quality=90)
        entries.append({"image_file": f"{i}.jpg", "text": " ".join(rng.choice(WORDS, 10))})
    path = os.path.join(root, "captions.json")
    with open(path, "w") as f:
        json.dump(entries, f)
    return path


def stand_in_encoders(config: dict) -> dict:
    """Encoders with the output shapes of the configuration. Their values are random normal: high-entropy
    floats like real latents and embeddings, so zstd compression does not flatter the read speed."""
    latent, embed, text_dim = config["latent"], config["embed"], config["text_dim"]

    def fn(_, batch):
        b = batch["pixel_values"].shape[0]
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        return {
            "latent_mean": jax.random.normal(keys[0], (b, latent, latent, 4)),
            "latent_std": jnp.exp(jax.random.normal(keys[1], (b, latent, latent, 4))),
            "image_embeds": jax.random.normal(keys[2], (b, embed)),
            "text_states": jax.random.normal(keys[3], (b, 77, text_dim)).astype(jnp.bfloat16),
        }

    return {"stand_in": (fn, {})}


def time_loader(data, examples: int, threads: int, workers: int, batch: int = 8) -> float:
    """Steady-state examples/s of DataIterator (first 2 batches are warm-up)."""
    it = loader.DataIterator(
        data,
        global_batch_size=batch,
        seed=0,
        num_threads=threads,
        prefetch_buffer_size=2 * threads,
        worker_count=workers,
    )
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    steps = max(1, examples // batch)
    for _ in range(steps):
        next(it)
    elapsed = time.perf_counter() - start
    it.close()
    return steps * batch / elapsed


def time_stages(data, pre: preprocess.Preprocessor, count: int = 16) -> dict:
    """Single-thread milliseconds per example of each raw preprocessing stage."""
    records = [data.source[i] for i in range(count)]
    stages = {}
    start = time.perf_counter()
    images = [preprocess.decode_rgb(r["image"]) for r in records]
    stages["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    for image in images:
        preprocess.target_image(image, pre.resolution)
    stages["target resize+crop"] = time.perf_counter() - start
    start = time.perf_counter()
    for image in images:
        clip_preprocess(image, pre.clip_size)
    stages["clip resize+crop"] = time.perf_counter() - start
    start = time.perf_counter()
    for r in records:
        preprocess.tokenize(pre.tokenizers[0], r["text"].decode())
    stages["tokenize"] = time.perf_counter() - start
    return {k: 1000 * v / count for k, v in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="distinct images generated")
    parser.add_argument("--examples", type=int, default=256, help="examples timed per measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_bench.json"))
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="data_bench-")
    annotations = make_images(root, args.images)
    raw_dir, _ = builder.build_dataset(annotations, os.path.join(root, "images"), os.path.join(root, "out"))
    tokenizer = data_files.tiny_clip_tokenizer(os.path.join(root, "tokenizer"))

    rows, stages = [], {}
    for name, config in CONFIGS.items():
        pre = preprocess.Preprocessor([tokenizer], resolution=config["resolution"])
        raw = loader.open_dataset(raw_dir, pre)
        stages[name] = time_stages(raw, pre)
        cache_dir = os.path.join(root, f"cache-{name}")
        embedding_cache.build_embedding_cache(
            raw_dir, cache_dir, pre, stand_in_encoders(config), batch_size=8, num_threads=args.threads, progress=False
        )
        cached = loader.open_dataset(cache_dir)
        for kind, data in (("raw", raw), ("cached", cached)):
            rate = time_loader(data, args.examples, args.threads, args.workers)
            row = {"config": name, "resolution": config["resolution"], "data": kind, "examples_per_s": rate}
            if name == "tiny":
                loader_s = TINY_STEP_BATCH / rate
                row["share_of_cpu_step"] = loader_s / TINY_STEP_S
            else:
                per_core = rate / min(os.cpu_count(), args.threads * max(1, args.workers))
                row["cores_per_accelerator"] = {
                    acc: sd15_examples_per_s(peak) / per_core for acc, peak in ACCELERATORS.items()
                }
            rows.append(row)

    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "threads": args.threads, "workers": args.workers, "jax_backend": jax.default_backend()},
        "images": "640x480 JPEG q90",
        "assumptions": {"tiny_step_s_batch4": TINY_STEP_S, "sd15_gflop_per_example": SD15_GFLOP_PER_EXAMPLE,
                        "mfu": ASSUMED_MFU, "peak_tflops": ACCELERATORS},
        "sd15_raw_extra_device_gflop_per_example": SD15_ENCODER_GFLOP,
        "sd15_examples_per_s_per_accelerator": {acc: sd15_examples_per_s(p) for acc, p in ACCELERATORS.items()},
        "stage_ms_per_example": stages,
        "results": rows,
    }  # fmt: skip
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    shutil.rmtree(root)

    print(f"loader on {os.cpu_count()} CPUs, {args.threads} threads, {args.workers} workers; images 640x480 JPEG")
    print(f"{'config':6} {'data':7} {'ex/s':>8} {'ms/ex':>7}  cost of a training step")
    for row in rows:
        if "share_of_cpu_step" in row:
            share = 100 * row["share_of_cpu_step"]
            cost = f"{share:.1f}% of the tiny CPU step ({TINY_STEP_S} s / {TINY_STEP_BATCH} ex)"
        else:
            cost = "host cores per accelerator: " + ", ".join(
                f"{acc} {n:.2f}" for acc, n in row["cores_per_accelerator"].items()
            )
        rate = row["examples_per_s"]
        print(f"{row['config']:6} {row['data']:7} {rate:8.1f} {1000 / rate:7.2f}  {cost}")
    print(
        "SD1.5 step consumes (ex/s per accelerator at "
        f"{ASSUMED_MFU:.0%} MFU): "
        + ", ".join(f"{acc} {sd15_examples_per_s(p):.0f}" for acc, p in ACCELERATORS.items())
    )
    print(
        f"SD1.5 raw data also runs the VAE encoder and CLIP on the accelerator: {SD15_ENCODER_GFLOP:,} GFLOP "
        f"per example, +{SD15_ENCODER_GFLOP / SD15_GFLOP_PER_EXAMPLE:.0%} over the step; cached data does not."
    )
    for name, stage in stages.items():
        print(f"{name} raw stages, ms/example single-thread: " + ", ".join(f"{k} {v:.2f}" for k, v in stage.items()))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
