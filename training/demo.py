"""The main job on the embedded tiny default: procedural data -> IP-Adapter training -> export -> samples.

    make demo            # = python -m training.demo --out out/demo   (a few minutes on 2 CPU cores)

1. components  the `tiny` preset's base model: CLIP text and image encoders, VAE and UNet trained on procedural
               images (`training.tiny_base_train`; weights shipped in training/assets/tiny_base)
2. data        procedural images with captions (`training.synthetic_data`) -> a TFDS dataset (`data_build`)
3. cache       VAE posteriors, text states and CLIP image embeddings, computed once (`cache_cli.build_cache`)
4. train       the adapter (image projection + K'/V' of every cross-attention layer) on all local devices, with
               checkpoints (`train.train`); it exports ip-adapter.safetensors in the official layout
5. diffusers   (when torch is importable) diffusers' `load_ip_adapter` reads the export into a PyTorch UNet of
               the tiny config and holds exactly our weights
6. generate    held-out image prompts, empty text, the same noise at each IP scale (`IPAdapterPipeline`
               loaded from the exported file)
7. report      loss_curve.png, grid.png, metrics.json and ip-adapter.safetensors in --out

CLIP-I is the paper's image-alignment metric, here with the tiny CLIP image encoder: the cosine between the
image embeddings of a sample and of its image prompt, averaged. At scale 0 the adapter is off (the base model
alone, from the same noise), so CLIP-I(1.0) - CLIP-I(0.0) measures what the image prompt adds.
Intermediate files (dataset, cache, checkpoints, metrics.jsonl) go to --out/work, which each run replaces.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from PIL import Image, ImageDraw, ImageFont

import ipadapter_jax  # noqa: F401  (log filter before any Flax model import)
from conversion.ip_adapter_files import load_ip_adapter
from evaluation.clip_score import CLIPScorer, cosine
from conversion.torch_layout import torch_key_to_flax_module_path
from conversion.unet_config import abstract_ip_unet_params
from ipadapter_jax.adapter import split_unet_params
from ipadapter_jax.pipeline import BaseModel, IPAdapterPipeline
from ipadapter_jax.text_conditioning import TextEncoder
from training import cache_cli, data_build, synthetic_data, tiny_components, train
from training.components import SD_SCHEDULE
from training.config import get_config

from diffusers import FlaxDDIMScheduler  # noqa: E402  (after the log filter)

ADAPTER_FILE = "ip-adapter.safetensors"
REPORT_FILES = ("loss_curve.png", "grid.png", "metrics.json", ADAPTER_FILE)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults are `make demo`'s, the test shrinks them."""

    num_images: int = 512  # procedural training images (64 px)
    steps: int = 500  # adapter training steps
    batch_per_device: int = 16
    learning_rate: float = 1e-3  # 10x the paper's 1e-4: a few hundred steps instead of a million
    # Condition drops (image only, text only, both). The paper drops the caption for 10% of the examples; the
    # demo generates from image prompts alone (empty text, as the paper's image-only generation), so with a
    # few hundred steps it trains mostly in that regime: 90% of the examples see the image prompt without text.
    drop_rates: tuple[float, float, float] = (0.05, 0.85, 0.05)
    checkpoint_every: int = 100
    num_prompts: int = 8  # held-out image prompts: the grid's rows
    samples_per_prompt: int = 3
    inference_steps: int = 30  # DDIM
    guidance_scale: float = 5.0
    scales: tuple[float, ...] = (0.0, 0.5, 1.0)
    seed: int = 0


class Progress:
    """Numbered phase headers with the time since the start."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()
        self.times: dict[str, float] = {}
        self._phase: tuple[str, float] | None = None

    def phase(self, name: str, what: str) -> None:
        self._close()
        self.done += 1
        print(f"\n[{self.done}/{self.total}] {what}  (t={time.time() - self.start:.0f} s)", flush=True)
        self._phase = (name, time.time())

    def _close(self) -> None:
        if self._phase is not None:
            name, started = self._phase
            self.times[f"{name}_s"] = round(time.time() - started, 1)
            self._phase = None

    def finish(self) -> dict[str, float]:
        self._close()
        self.times["total_s"] = round(time.time() - self.start, 1)
        return self.times


def training_config(settings: DemoSettings, data_path: str, eval_path: str) -> Any:
    """The `tiny` preset with the demo's data, steps and optimisation settings."""
    config = get_config("tiny")
    config.seed = settings.seed
    config.data.path = data_path
    config.data.eval_path = eval_path
    config.eval_every = 25
    config.data.batch_size_per_device = settings.batch_per_device
    config.data.drop_rates = tuple(settings.drop_rates)
    config.optim.lr = settings.learning_rate
    config.total_steps = settings.steps
    config.log_every = 10
    config.checkpoint_every = settings.checkpoint_every
    config.export_every = settings.checkpoint_every
    return config


def build_data(root: str, num_images: int, seed: int) -> str:
    """Procedural images + captions in `root` -> a built TFDS dataset; returns its directory."""
    source = os.path.join(root, "source")
    captions = synthetic_data.write_dataset(source, num_images, tiny_components.VAE["sample_size"], seed)
    path, report = data_build.build_dataset(captions, os.path.join(source, "images"), os.path.join(root, "built"))
    print(f"{report['written']} examples ({report['skipped']} skipped) -> {path}")
    return path


def verify_in_diffusers(export: str, adapter: dict) -> dict:
    """Loads `export` with diffusers' PyTorch `load_ip_adapter` into a pipeline around a UNet of the tiny config
    and compares every tensor it loaded with `adapter`, the same file as our loader reads it (Flax layout).
    Skipped without torch."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return {"status": "skipped: torch is not importable"}
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    # load_ip_adapter only touches the UNet (and an image encoder, not asked for here): other parts stay empty.
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=UNet2DConditionModel(**tiny_components.UNET).eval(),
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1), safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    folder, name = os.path.split(os.path.abspath(export))
    # Its notices (install accelerate, no image encoder loaded, dtype advice) are for PyTorch users, not this check.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.load_ip_adapter(folder, subfolder="", weight_name=name, image_encoder_folder=None, local_files_only=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)

    ip_layers = traverse_util.flatten_dict(adapter["ip_layers"])
    worst, layers = 0.0, 0
    for processor_name, processor in pipe.unet.attn_processors.items():
        if not hasattr(processor, "to_k_ip"):
            continue
        path = torch_key_to_flax_module_path(processor_name[: -len(".processor")])
        for kind in ("to_k_ip", "to_v_ip"):
            theirs = getattr(processor, kind)[0].weight.detach().numpy().T  # PyTorch Linear (out, in)
            worst = max(worst, float(np.abs(theirs - ip_layers[path + (kind, "kernel")]).max()))
        layers += 1
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    ours = adapter["image_proj"]
    pairs = [
        (projection.image_embeds.weight.detach().numpy().T, ours["proj"]["kernel"]),
        (projection.image_embeds.bias.detach().numpy(), ours["proj"]["bias"]),
        (projection.norm.weight.detach().numpy(), ours["norm"]["scale"]),
        (projection.norm.bias.detach().numpy(), ours["norm"]["bias"]),
    ]
    worst = max([worst] + [float(np.abs(a - b).max()) for a, b in pairs])
    expected = len(ip_layers) // 2
    if layers != expected or worst != 0.0:
        raise RuntimeError(
            f"diffusers loaded {layers}/{expected} adapter layers from {export}, max difference {worst}"
        )
    print(f"diffusers' load_ip_adapter read {export}: {layers} cross-attention layers + image projection, identical")
    return {"status": "ok", "cross_attention_layers": layers, "max_abs_difference": worst}


def make_pipeline(tiny: tiny_components.TinyBase, export: str) -> tuple[IPAdapterPipeline, dict]:
    """Our pipeline on the tiny base with the adapter read back from the exported file (SD1.5's DDIM settings)."""
    frozen_unet, _ = split_unet_params(tiny.params["unet"])
    scheduler = FlaxDDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    base = BaseModel(
        unet=tiny.unet, unet_params=frozen_unet, vae=tiny.vae, vae_params=tiny.params["vae"],
        text_encoders=(TextEncoder(tiny.tokenizer, tiny.text_encoder, tiny.params["text_encoder"]),),
        scheduler=scheduler, scheduler_state=scheduler.create_state(),
    )
    _, image_proj, adapter = load_ip_adapter(
        export, abstract_ip_unet_params(tiny.unet), encoder_projection_dim=tiny.image_encoder.config.projection_dim
    )
    pipe = IPAdapterPipeline(base, tiny.image_encoder, tiny.params["image_encoder"], image_proj, adapter)
    return pipe, adapter


Samples = dict[float, list[list[Image.Image]]]  # {scale: [the samples of image prompt i]}


def generate(pipe: IPAdapterPipeline, prompts: Sequence[Image.Image], settings: DemoSettings) -> Samples:
    """Image-only generation (empty text) from every prompt at each scale: one batched call per scale, image
    prompt i with seed `seed + i`, so every scale starts from the same noise."""
    samples: Samples = {}
    count = settings.samples_per_prompt
    for scale in settings.scales:
        out = pipe(
            list(prompts), per_prompt_images=True, prompt=[""] * len(prompts), scale=scale,
            guidance_scale=settings.guidance_scale, num_inference_steps=settings.inference_steps,
            num_images_per_prompt=count, seed=[settings.seed + i for i in range(len(prompts))],
            progress=scale == settings.scales[0],
        )
        samples[scale] = [out.images[i * count : (i + 1) * count] for i in range(len(prompts))]
        print(f"scale {scale:g}: {len(prompts)} image prompts x {count} samples", flush=True)
    return samples


def clip_i(scorer: CLIPScorer, prompts: Sequence[Image.Image], samples: Samples) -> dict:
    """CLIP-I as the evaluation protocol computes it (`evaluation.clip_score`, here with the tiny evaluation CLIP):
    mean per scale and per prompt, and for reference the mean cosine between different image prompts."""
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


def read_losses(metrics_file: str) -> dict[str, list[tuple[int, float]]]:
    """The training script's metrics.jsonl -> {"train": [(step, mean loss of the logging interval)],
    "held_out": [(step, loss of the held-out batch with fixed noise and timesteps)]}."""
    with open(metrics_file) as f:
        records = [json.loads(line) for line in f]
    return {
        "train": [(m["step"], m["loss"]) for m in records if "loss" in m],
        "held_out": [(m["step"], m["eval_loss"]) for m in records if "eval_loss" in m],
    }


def draw_loss_curve(losses: dict[str, list[tuple[int, float]]], path: str) -> None:
    """Both curves of `read_losses` against step, drawn with PIL. The training loss is noisy by nature (random
    timesteps and noise per batch); the held-out batch's is not, so it shows the trend."""
    width, height, left, right, top, bottom = 760, 440, 70, 20, 60, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(13)
    colours = {"train": (150, 180, 230), "held_out": (200, 40, 40)}
    labels = {"train": "training loss (mean per logging interval)", "held_out": "held-out batch, fixed noise"}
    draw.text((left, 10), "IP-Adapter training: epsilon-prediction MSE", fill="black", font=font)
    for k, name in enumerate(labels):
        x = left + k * 330
        draw.line([x, 40, x + 24, 40], fill=colours[name], width=3)
        draw.text((x + 30, 33), labels[name], fill="black", font=font)
    values = [v for points in losses.values() for _, v in points]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    low, high = low - pad, high + pad
    x_max = max(step for points in losses.values() for step, _ in points)

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = left + (width - left - right) * step / x_max
        return x, top + (height - top - bottom) * (high - loss) / (high - low)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):
        value = low + (high - low) * k / 4
        _, y = xy(0, value)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((8, y - 7), f"{value:.4f}", fill="black", font=font)
        step = x_max * k / 4
        x, _ = xy(step, low)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{step:.0f}", fill="black", font=font)
    draw.text((width // 2 - 15, height - 20), "step", fill="black", font=font)
    for name in ("train", "held_out"):  # held-out on top
        points = [xy(step, value) for step, value in losses[name]]
        if len(points) > 1:
            draw.line(points, fill=colours[name], width=2)
        for x, y in points if name == "held_out" else ():
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[name])
    image.save(path)


def draw_grid(prompts: Sequence[Image.Image], samples: Samples, scores: dict, path: str, cell: int = 128) -> None:
    """Rows: image prompts. Columns: the prompt | its samples at each scale (same noise across scales)."""
    scales = list(samples)
    per_scale = len(samples[scales[0]][0])
    gap, header = 12, 44
    width = cell + len(scales) * (gap + per_scale * cell)
    height = header + len(prompts) * cell
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(14)
    draw.text((8, 6), "image prompt", fill="black", font=font)
    for j, scale in enumerate(scales):
        x = cell + j * (gap + per_scale * cell) + gap
        draw.text((x + 4, 6), f"scale {scale:g}", fill="black", font=font)
        draw.text((x + 4, 24), f"CLIP-I {scores['mean'][str(scale)]:.3f}", fill="black", font=font)
    for i, prompt in enumerate(prompts):
        y = header + i * cell
        grid.paste(prompt.resize((cell, cell), Image.Resampling.NEAREST), (0, y))
        for j, scale in enumerate(scales):
            x = cell + j * (gap + per_scale * cell) + gap
            for k, image in enumerate(samples[scale][i]):
                grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x + k * cell, y))
    grid.save(path)


def run(settings: DemoSettings, out: str) -> dict:
    """Runs every step; writes the report into `out` and returns the metrics."""
    progress = Progress(total=7)
    out = os.path.abspath(out)
    work = os.path.join(out, "work")
    if os.path.exists(work):  # the demo's own scratch folder: each run starts clean
        shutil.rmtree(work)
    os.makedirs(work)

    progress.phase("components", "tiny base model (trained weights from training/assets/tiny_base)")
    tiny = tiny_components.build(os.path.join(work, "components"), seed=settings.seed)
    for name in tiny_components.FROZEN:
        count = sum(x.size for x in jax.tree.leaves(tiny.params[name]))
        print(f"  {name:14s} {count / 1e3:8.1f}k params")

    devices = jax.device_count()
    global_batch = settings.batch_per_device * devices
    progress.phase("data", f"{settings.num_images} procedural images (+{global_batch} held out) -> TFDS datasets")
    dataset = build_data(os.path.join(work, "data"), settings.num_images, settings.seed)
    # One global batch of other images: its loss, with fixed noise and timesteps, is the smooth training curve.
    held_out = build_data(os.path.join(work, "held_out_data"), global_batch, settings.seed + 2)

    progress.phase("cache", "embedding caches (VAE posteriors, text states, CLIP image embeddings)")
    config = training_config(settings, os.path.join(work, "cache"), os.path.join(work, "held_out_cache"))
    for raw, cache in ((dataset, config.data.path), (held_out, config.data.eval_path)):
        cache_cli.build_cache(
            config, raw, cache, os.path.join(work, "components"), batch_size=32 * jax.local_device_count()
        )

    progress.phase("train", f"IP-Adapter, {settings.steps} steps x {global_batch} images on "
                   f"{devices} {jax.devices()[0].platform} device(s), checkpoints every {settings.checkpoint_every}")
    train_dir = os.path.join(work, "train")
    last = train.train(config, train_dir)
    export = os.path.join(out, ADAPTER_FILE)
    shutil.copyfile(os.path.join(train_dir, ADAPTER_FILE), export)

    progress.phase("diffusers", "diffusers' load_ip_adapter (PyTorch) reads the export")
    pipe, adapter = make_pipeline(tiny, export)
    diffusers_check = verify_in_diffusers(export, adapter)
    if diffusers_check["status"] != "ok":
        print(diffusers_check["status"])

    prompts = [Image.fromarray(a) for a in synthetic_data.sample(
        settings.num_prompts, tiny_components.VAE["sample_size"], seed=settings.seed + 1)[0]]
    progress.phase("generate", f"{len(prompts)} held-out image prompts x scales {list(settings.scales)} x "
                   f"{settings.samples_per_prompt} samples, {settings.inference_steps} DDIM steps")
    samples = generate(pipe, prompts, settings)

    progress.phase("report", f"report in {out}")
    scores = clip_i(CLIPScorer(tiny_components.eval_clip(tiny)), prompts, samples)
    losses = read_losses(os.path.join(train_dir, "metrics.jsonl"))
    draw_loss_curve(losses, os.path.join(out, "loss_curve.png"))
    draw_grid(prompts, samples, scores, os.path.join(out, "grid.png"))
    low, high = str(settings.scales[0]), str(settings.scales[-1])
    metrics = {
        "clip_i": scores["mean"],
        "clip_i_margin": scores["mean"][high] - scores["mean"][low],
        "clip_i_per_prompt": scores["per_prompt"],
        "clip_i_unrelated_prompts": scores["unrelated_prompts_mean"],
        "training": {
            "steps": settings.steps, "global_batch": global_batch, "devices": devices,
            "held_out_loss": losses["held_out"], "train_loss": losses["train"], "last_log": last,
        },
        "diffusers_load_ip_adapter": diffusers_check,
        "settings": dataclasses.asdict(settings),
        "files": {name: os.path.join(out, name) for name in REPORT_FILES},
        "work": work,
    }
    metrics["timings"] = progress.finish()
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)

    print("\nCLIP-I (tiny CLIP image encoder, sample vs image prompt):")
    for scale, value in scores["mean"].items():
        print(f"  scale {float(scale):<4g} {value:.3f}")
    print(f"  margin scale {high} - scale {low}: {metrics['clip_i_margin']:+.3f}"
          f" (unrelated image prompts: {scores['unrelated_prompts_mean']:.3f})")
    print(f"\ndone in {metrics['timings']['total_s']:.0f} s. Report:")
    for path in metrics["files"].values():
        print(f"  {path}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/demo", help="report folder (its work/ subfolder is replaced)")
    parser.add_argument("--images", type=int, default=defaults.num_images, help="procedural training images")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="adapter training steps")
    parser.add_argument("--prompts", type=int, default=defaults.num_prompts, help="held-out image prompts")
    parser.add_argument("--samples", type=int, default=defaults.samples_per_prompt, help="samples per prompt and scale")
    parser.add_argument("--inference_steps", type=int, default=defaults.inference_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    settings = dataclasses.replace(
        defaults, num_images=args.images, steps=args.steps, num_prompts=args.prompts, samples_per_prompt=args.samples,
        inference_steps=args.inference_steps, seed=args.seed,
    )
    run(settings, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
