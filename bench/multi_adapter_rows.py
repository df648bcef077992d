"""`pipeline_bench.py --multi` rows: two adapters + regional masks vs one adapter, in JAX and in diffusers' PyTorch,
on the bench's SD1.5-shaped model, measured side by side in one run.

One adapter: the bench's request (one image prompt, scale 0.6). Two adapters: the bench's base adapter with two
images, each confined to one half of the image by a mask (scale 0.6), plus a second base adapter (another seed;
4 tokens, the only count diffusers' loader reads for base adapters) and one image everywhere (scale 0.5):
diffusers' `load_ip_adapter([...])` + `cross_attention_kwargs={"ip_adapter_masks": ...}`. The four
configurations alternate `repeats` times after a warm-up; reported: the fastest run per image (JAX: the compiled
sampling function alone and the whole call; PyTorch: the whole call) and the ratios two adapters / one adapter
and PyTorch / JAX.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import torch
from PIL import Image

from ipadapter_jax.testing import pipeline_fixtures, tiny


def bench_two_adapters(
    folder: Path, torch_base: Any, adapter_path: Path, jax_pipe: Any, request: dict, repeats: int
) -> dict:
    """`torch_base`: the bench's PyTorch pipeline without adapters; `jax_pipe`: ours with the bench's adapter;
    `request`: the common call arguments (steps, guidance, size, latents, images per prompt, prompt)."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    from ipadapter_jax.pipelines import IPAdapterPipeline
    from ipadapter_jax.weights import load_adapter

    official = tiny.random_official_adapter(torch_base.unet, clip_dim=256, num_tokens=4, seed=5)
    second = folder / "ip-adapter-second.safetensors"
    safetensors.numpy.save_file({f"{s}.{k}": v for s, part in official.items() for k, v in part.items()}, str(second))
    size = request["height"]
    images = [pipeline_fixtures.test_image(i, (320, 240)) for i in range(3)]
    left = Image.fromarray(np.tile((np.arange(size) < size // 2).astype(np.uint8) * 255, (size, 1)))
    right = Image.fromarray(255 - np.asarray(left))

    base, encoder = jax_pipe.base, jax_pipe.image_encoder
    jax_two = IPAdapterPipeline(base, encoder, [jax_pipe.adapter, load_adapter(second, base, image_encoder=encoder)])
    torch_one, torch_two = copy.deepcopy(torch_base), copy.deepcopy(torch_base)
    torch_one.load_ip_adapter(str(folder), subfolder="", weight_name=adapter_path.name, image_encoder_folder=None)
    torch_two.load_ip_adapter(
        [str(folder)] * 2, subfolder=["", ""], weight_name=[adapter_path.name, second.name], image_encoder_folder=None
    )
    torch_one.set_ip_adapter_scale(0.6)
    torch_two.set_ip_adapter_scale([0.6, 0.5])
    masks = IPAdapterMaskProcessor().preprocess([left, right], height=size, width=size).reshape(1, 2, size, size)
    batch = request["num_images_per_prompt"]

    def run_jax(pipe: Any, **images_and_scales: Any) -> tuple[float, float]:
        start = time.perf_counter()
        out = pipe(**images_and_scales, **request)
        return time.perf_counter() - start, out.timings["sample_s"]

    def run_torch(pipe: Any, **extra: Any) -> float:
        arguments = dict(request, latents=torch.from_numpy(request["latents"]))
        start = time.perf_counter()
        with torch.no_grad():
            pipe(output_type="np", **arguments, **extra)
        return time.perf_counter() - start

    configurations = {
        "jax_one": lambda: run_jax(jax_pipe, image=images[0], scale=0.6),
        "jax_two_masked": lambda: run_jax(
            jax_two, image=[images[:2], images[2]], scale=[0.6, 0.5], mask=[[left, right], None]
        ),
        "torch_one": lambda: run_torch(torch_one, ip_adapter_image=images[0]),
        "torch_two_masked": lambda: run_torch(
            torch_two,
            ip_adapter_image=[images[:2], images[2]],
            cross_attention_kwargs={"ip_adapter_masks": [masks, None]},
        ),
    }
    for run in configurations.values():  # warm-up (and JAX's compile)
        run()
    runs: dict[str, list] = {name: [] for name in configurations}
    for _ in range(repeats):
        for name, run in configurations.items():
            runs[name].append(run())

    def fastest(name: str, index: int | None = None) -> float:
        return min(r if index is None else r[index] for r in runs[name]) / batch

    result = {
        "jax_one_sampling_per_image_s": fastest("jax_one", 1),
        "jax_two_masked_sampling_per_image_s": fastest("jax_two_masked", 1),
        "jax_one_per_image_s": fastest("jax_one", 0),
        "jax_two_masked_per_image_s": fastest("jax_two_masked", 0),
        "torch_one_per_image_s": fastest("torch_one"),
        "torch_two_masked_per_image_s": fastest("torch_two_masked"),
        "runs_s": runs,
    }
    result["jax_two_over_one_sampling"] = (
        result["jax_two_masked_sampling_per_image_s"] / result["jax_one_sampling_per_image_s"]
    )
    result["torch_two_over_one"] = result["torch_two_masked_per_image_s"] / result["torch_one_per_image_s"]
    result["torch_over_jax_two_masked"] = result["torch_two_masked_per_image_s"] / result["jax_two_masked_per_image_s"]
    return result
