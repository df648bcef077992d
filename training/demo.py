"""The main job on the embedded tiny default: procedural data -> IP-Adapter training -> export -> samples.

    make demo            # = python training/demo.py --out out/demo   (a few minutes on 2 CPU cores)

1. components  the `tiny` preset's base model: CLIP text and image encoders, VAE and UNet trained on procedural
               images (`training/tiny_base_train.py`; weights in ipadapter_jax/weights/assets/tiny_base)
2. data        procedural images with captions (`ipadapter_jax.data.synthetic`) -> a TFDS dataset (`data.builder`)
3. cache       VAE posteriors, text states and CLIP image embeddings, computed once (`training.cache_encodings`)
4. train       the adapter (image projection + K'/V' of every cross-attention layer) on all local devices, with
               checkpoints (`training.loop.train`, the `demo` preset); it exports ip-adapter.safetensors in the
               official layout
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

import jax
import numpy as np
from flax import traverse_util

import ipadapter_jax  # noqa: F401  (log filter before any Flax model import)

# isort: split
from ipadapter_jax.evaluation.clip_score import CLIPScorer
from ipadapter_jax.evaluation.plots import draw_grid, draw_loss_curve, read_losses
from ipadapter_jax.evaluation.tiny_clip import tiny_eval_clip
from ipadapter_jax.presets import get_preset
from ipadapter_jax.training.cache_encodings import build_cache
from ipadapter_jax.training.config import TrainConfig
from ipadapter_jax.training.embedded_world import build_data, clip_i, generate, held_out_prompts, make_pipeline
from ipadapter_jax.training.loop import train
from ipadapter_jax.weights import load_base, load_image_encoder, tiny_base
from ipadapter_jax.weights.torch_layout import torch_key_to_flax_module_path

ADAPTER_FILE = "ip-adapter.safetensors"
REPORT_FILES = ("loss_curve.png", "grid.png", "metrics.json", ADAPTER_FILE)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults are `make demo`'s, the test shrinks them."""

    num_images: int = 512  # procedural training images (64 px)
    steps: int | None = None  # adapter training steps (None: the demo preset's, training/configs/demo.py)
    checkpoint_every: int | None = None  # also the export interval (None: the preset's)
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


def training_config(settings: DemoSettings, data_path: str, eval_path: str) -> TrainConfig:
    """The `demo` preset (training/configs/demo.py) with the demo's datasets, seed and size overrides."""
    config = get_preset("demo")
    config.seed = settings.seed
    config.data.path = data_path
    config.data.eval_path = eval_path
    if settings.steps is not None:
        config.total_steps = settings.steps
    if settings.checkpoint_every is not None:
        config.checkpoint_every = config.export_every = settings.checkpoint_every
    return TrainConfig.from_config_dict(config)


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
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=UNet2DConditionModel(**tiny_base.UNET).eval(),
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
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
        raise RuntimeError(f"diffusers loaded {layers}/{expected} adapter layers from {export}, max difference {worst}")
    print(f"diffusers' load_ip_adapter read {export}: {layers} cross-attention layers + image projection, identical")
    return {"status": "ok", "cross_attention_layers": layers, "max_abs_difference": worst}


def run(settings: DemoSettings, out: str) -> dict:
    """Runs every step; writes the report into `out` and returns the metrics."""
    progress = Progress(total=7)
    out = os.path.abspath(out)
    work = os.path.join(out, "work")
    if os.path.exists(work):  # the demo's own scratch folder: each run starts clean
        shutil.rmtree(work)
    os.makedirs(work)

    progress.phase("components", "tiny base model (trained weights from ipadapter_jax/weights/assets/tiny_base)")
    base, image_encoder = load_base("tiny", progress=False), load_image_encoder("tiny")
    params = {
        "unet": base.unet_params,
        "vae": base.vae_params,
        "text_encoder": base.text_encoders[0].params,
        "image_encoder": image_encoder.params,
    }
    for name, tree in params.items():
        print(f"  {name:14s} {sum(x.size for x in jax.tree.leaves(tree)) / 1e3:8.1f}k params")

    config = training_config(settings, os.path.join(work, "cache"), os.path.join(work, "held_out_cache"))
    devices = jax.device_count()
    global_batch = config.data.batch_size_per_device * devices
    progress.phase("data", f"{settings.num_images} procedural images (+{global_batch} held out) -> TFDS datasets")
    dataset = build_data(os.path.join(work, "data"), settings.num_images, settings.seed)
    # One global batch of other images: its loss, with fixed noise and timesteps, is the smooth training curve.
    held_out = build_data(os.path.join(work, "held_out_data"), global_batch, settings.seed + 2)

    progress.phase("cache", "embedding caches (VAE posteriors, text states, CLIP image embeddings)")
    for raw, cache in ((dataset, config.data.path), (held_out, config.data.eval_path)):
        build_cache(config, raw, cache, os.path.join(work, "components"), batch_size=32 * jax.local_device_count())

    progress.phase(
        "train",
        f"IP-Adapter, {config.total_steps} steps x {global_batch} images on "
        f"{devices} {jax.devices()[0].platform} device(s), checkpoints every {config.checkpoint_every}",
    )
    train_dir = os.path.join(work, "train")
    last = train(config, train_dir)
    export = os.path.join(out, ADAPTER_FILE)
    shutil.copyfile(os.path.join(train_dir, ADAPTER_FILE), export)

    progress.phase("diffusers", "diffusers' load_ip_adapter (PyTorch) reads the export")
    pipe, adapter = make_pipeline(base, image_encoder, export)
    diffusers_check = verify_in_diffusers(export, adapter.params)
    if diffusers_check["status"] != "ok":
        print(diffusers_check["status"])

    prompts, _ = held_out_prompts(settings.num_prompts, settings.seed + 1)
    progress.phase(
        "generate",
        f"{len(prompts)} held-out image prompts x scales {list(settings.scales)} x "
        f"{settings.samples_per_prompt} samples, {settings.inference_steps} DDIM steps",
    )
    samples = generate(
        pipe,
        prompts,
        settings.scales,
        samples_per_prompt=settings.samples_per_prompt,
        inference_steps=settings.inference_steps,
        guidance_scale=settings.guidance_scale,
        seed=settings.seed,
    )

    progress.phase("report", f"report in {out}")
    scores = clip_i(CLIPScorer(tiny_eval_clip(base, image_encoder)), prompts, samples)
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
            "steps": config.total_steps,
            "global_batch": global_batch,
            "devices": devices,
            "held_out_loss": losses["held_out"],
            "train_loss": losses["train"],
            "last_log": last,
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
    print(
        f"  margin scale {high} - scale {low}: {metrics['clip_i_margin']:+.3f}"
        f" (unrelated image prompts: {scores['unrelated_prompts_mean']:.3f})"
    )
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
        defaults,
        num_images=args.images,
        steps=args.steps,
        num_prompts=args.prompts,
        samples_per_prompt=args.samples,
        inference_steps=args.inference_steps,
        seed=args.seed,
    )
    run(settings, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
