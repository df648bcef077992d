"""`ipadapter-jax generate`: images from an image prompt (and optional text, ControlNet) with an IP-Adapter.

    ipadapter-jax generate --base MODEL_DIR --adapter ip-adapter_sd15.safetensors --image-encoder ENCODER_DIR \\
        --image a.png [--image b.png] [--prompt "best quality"] [--scale 0.6] [--num-images 4] [--out DIR]
    ipadapter-jax generate --settings settings.json [flags]

Several adapters: each `--adapter FILE` takes the `--image`, `--negative-image`, `--mask`, `--scale`,
`--weight-type`, `--composition-weight`, `--combine` and `--embeds-scaling` flags after it
(`ipadapter_jax.cli.adapter_flags`, which also describes the JSON settings file).

MODEL_DIR is a diffusers pipeline folder (SD1.5/SD2 family or SDXL, PyTorch weights); the adapter is an official
IP-Adapter file (.safetensors/.bin) or our Flax adapter (.msgpack); ENCODER_DIR a `CLIPVisionModelWithProjection`
folder. Writes `image_NN.png` per image, `grid.png` and `settings.json` (every setting, model paths, timings)
into --out (default `outputs/<date>-<time>`; files there are overwritten). Progress goes to stderr; a bad input
ends in one "error: ..." line and exit status 1.

XLA's persistent compilation cache is on (--compile-cache), so a repeated command with the same shapes skips
most of the compile phase; --step-progress (a bar advancing per denoising step) opts that run's sampling
function out of it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipadapter_jax.choices import ATTENTION_IMPLEMENTATIONS, SCHEDULERS
from ipadapter_jax.cli.adapter_flags import adapter_settings, add_per_adapter_flags, expand_settings_file
from ipadapter_jax.cli.main import ArgumentParser, UsageError, finite_float, positive_int, report_errors

DTYPES = ("float32", "bfloat16")


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="ipadapter-jax generate",
        description="Generate images with an IP-Adapter: image prompt, optional text prompt and ControlNet.",
    )
    models = parser.add_argument_group("models")
    models.add_argument("--base", required=True, help="diffusers pipeline folder (unet/, vae/, text_encoder/, ...)")
    models.add_argument("--image-encoder", required=True, help="CLIPVisionModelWithProjection folder")
    models.add_argument("--controlnet", help="diffusers ControlNetModel folder (SD1.5/SD2 family)")
    models.add_argument(
        "--lora",
        action="append",
        type=lora_argument,
        metavar="FILE[:SCALE]",
        help="LoRA .safetensors (diffusers/peft or kohya) merged into the base's UNet and text encoder(s) with "
        "SCALE (default 1); repeat for several",
    )
    models.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim", help="default ddim (the paper's)")
    models.add_argument("--dtype", choices=DTYPES, default="float32", help="computation dtype (params stay float32)")
    models.add_argument("--cache-dir", help="keep converted Flax params here (later runs skip the conversion)")
    models.add_argument(
        "--attention",
        choices=ATTENTION_IMPLEMENTATIONS,
        default="diffusers",
        help="UNet attention kernel; cudnn: cuDNN flash attention (NVIDIA GPUs, bfloat16)",
    )
    models.add_argument(
        "--flax-numerics",
        action="store_true",
        help="compute as diffusers' Flax UNet (tanh GELU) instead of its PyTorch UNet (the default)",
    )

    parser.add_argument("--settings", help="JSON file of settings (flags' long names as keys), before the flags")
    add_per_adapter_flags(parser.add_argument_group("adapters: .safetensors/.bin (official) or .msgpack, each with"))
    prompt = parser.add_argument_group("prompt")
    prompt.add_argument("--prompt", action="append", help="text prompt; repeat for several (default: empty)")
    prompt.add_argument("--negative-prompt", help="negative text prompt")
    prompt.add_argument(
        "--image-step-range",
        type=finite_float,
        nargs=2,
        default=(0.0, 1.0),
        metavar=("START", "END"),
        help="fractions of the steps in which the image prompt acts (default 0 1)",
    )
    prompt.add_argument("--control-image", help="ControlNet conditioning image (with --controlnet)")
    prompt.add_argument(
        "--controlnet-scale", type=finite_float, default=1.0, help="ControlNet residual scale (default 1)"
    )

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--guidance-scale", type=finite_float, default=7.5, help="classifier-free guidance (default 7.5)"
    )
    sampling.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    sampling.add_argument("--height", type=positive_int, help="default: the UNet's sample size x 8")
    sampling.add_argument("--width", type=positive_int, help="default: the UNet's sample size x 8")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--num-images", type=positive_int, default=1, help="images per prompt (default 1)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", help="output folder (default outputs/<date>-<time>)")
    output.add_argument(
        "--compile-cache",
        default=os.environ.get("JAX_COMPILATION_CACHE_DIR"),
        help="XLA compilation cache folder (default $JAX_COMPILATION_CACHE_DIR or "
        "~/.cache/ipadapter-jax/xla; 'none' disables it)",
    )
    output.add_argument("--step-progress", action="store_true", help="advance the sampling bar at every step")
    return parser


def run(argv: list[str]) -> int:
    parser = _parser()
    print(generate(parser.parse_args(expand_settings_file(parser, argv))))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `ipadapter-jax generate` with the arguments after `generate`; returns the exit status."""
    return report_errors(run, list(sys.argv[1:] if argv is None else argv))


def generate(args: argparse.Namespace) -> Path | str:
    """Loads the models, generates, writes images, grid and settings; returns the output folder (a URL for a
    bucket: the files are written locally, then uploaded)."""
    from ipadapter_jax import paths, staging

    adapters = adapter_settings(args.adapters)
    loras = args.lora or []
    files = [
        path
        for a in adapters
        for path in (a["file"], *a["images"], *a["negative_images"], *a["masks"], *a["face_embeds"])
    ]
    paths.check_storage([args.base, args.image_encoder, args.out, args.cache_dir, args.controlnet, args.control_image,
                         *files, *(path for path, _ in loras)])  # fmt: skip
    import jax

    _configure_compile_cache(jax, args.compile_cache)
    # After the log filter (`import ipadapter_jax`): the loaders import diffusers' and transformers' Flax classes.
    from ipadapter_jax.pipelines import IPAdapterPipeline, image_grid
    from ipadapter_jax.pipelines.faceid import faceid_prompt, with_shortcut_scale
    from ipadapter_jax.pipelines.request import one_or_list as per_adapter

    if (args.controlnet is None) != (args.control_image is None):
        raise UsageError("--controlnet and --control-image go together")
    opened = [
        {key: [_open_image(path) for path in a[key]] for key in ("images", "negative_images", "masks")}
        for a in adapters
    ]
    control_image = None if args.control_image is None else _open_image(args.control_image)
    target = args.out or str(Path("outputs") / time.strftime("%Y%m%d-%H%M%S"))
    out_dir = Path(staging.mirror(target))

    start = time.perf_counter()
    pipe = IPAdapterPipeline.from_pretrained(
        args.base,
        per_adapter([a["file"] for a in adapters]),
        args.image_encoder,
        scheduler=args.scheduler,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        controlnet=args.controlnet,
        attention_implementation=args.attention,
        pytorch_numerics=not args.flax_numerics,
        loras=loras,
    )
    for index, a in enumerate(adapters):
        if a.get("s_scale") is not None:
            pipe = with_shortcut_scale(pipe, a["s_scale"], index)
    load_s = time.perf_counter() - start
    prompts = [
        faceid_prompt(pipe, _load_embeddings(a["face_embeds"][0]), o["images"] or None, index)
        if a["face_embeds"]
        else {"image": o["images"], "image_embeds": None, "negative_image_embeds": None}
        for index, (a, o) in enumerate(zip(adapters, opened))
    ]
    image_prompts = {
        key: per_adapter([p.get(key) for p in prompts]) for key in ("image", "image_embeds", "negative_image_embeds")
    }
    result = pipe(
        **image_prompts,
        prompt=args.prompt or "",
        negative_prompt=args.negative_prompt,
        negative_image=per_adapter([o["negative_images"] or None for o in opened]),
        scale=per_adapter([a["scale"] for a in adapters]),
        mask=per_adapter([o["masks"] or None for o in opened]),
        embeds_scaling=per_adapter([a["embeds_scaling"] for a in adapters]),
        combine=per_adapter([a["combine"] for a in adapters]),
        image_step_range=tuple(args.image_step_range),
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        height=args.height,
        width=args.width,
        seed=args.seed,
        num_images_per_prompt=args.num_images,
        control_image=control_image,
        controlnet_conditioning_scale=args.controlnet_scale,
        progress=True,
        step_progress=args.step_progress,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f"image_{i:02d}.png" for i in range(len(result.images))]
    for name, image in zip(names, result.images):
        image.save(out_dir / name)
    image_grid(result.images, cols=args.num_images if len(result.images) > args.num_images else None).save(
        out_dir / "grid.png"
    )
    settings = {
        **result.settings,
        "base": str(args.base),
        "adapter": per_adapter([str(a["file"]) for a in adapters]),
        "image_encoder": str(args.image_encoder),
        "images": per_adapter([list(a["images"]) for a in adapters]),
        "negative_images": per_adapter([list(a["negative_images"]) for a in adapters]),
        "mask_files": per_adapter([list(a["masks"]) for a in adapters]),
        "face_embeds": per_adapter([(a["face_embeds"] or [None])[0] for a in adapters]),
        "s_scale": per_adapter([a.get("s_scale") for a in adapters]),
        "controlnet": args.controlnet,
        "loras": [{"file": path, "scale": lora_scale} for path, lora_scale in loras],
        "control_image": args.control_image,
        "scheduler_option": args.scheduler,
        "dtype": args.dtype,
        "outputs": names,
        "grid": "grid.png",
        "timings": {"load_s": load_s, **result.timings},
        "jax": {"version": jax.__version__, "devices": [str(d) for d in pipe.mesh.devices.flat]},
    }
    (out_dir / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    timings = settings["timings"]
    print(
        f"{len(names)} image(s) -> {out_dir}: load {timings['load_s']:.1f} s, compile {timings['compile_s']:.1f} s, "
        f"sampling {timings['sample_s']:.1f} s",
        file=sys.stderr,
    )
    if paths.is_remote(target):
        staging.upload(out_dir, target, what="images", last=("settings.json",), progress=False)
        return target
    return out_dir


def _configure_compile_cache(jax: Any, folder: str | None) -> None:
    if folder == "none":
        return
    jax.config.update("jax_compilation_cache_dir", folder or str(Path.home() / ".cache" / "ipadapter-jax" / "xla"))


def lora_argument(text: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (FILE, SCALE); SCALE defaults to 1. Only a last `:<number>` is a scale, so paths with
    colons (`gs://...`) stay whole; a non-finite SCALE is refused."""
    path, colon, tail = text.rpartition(":")
    if colon and path:
        try:
            return path, finite_float(tail)
        except ValueError:  # not a number: part of the path
            pass
    return text, 1.0


def _load_embeddings(path: str) -> Any:
    import numpy as np

    from ipadapter_jax import paths

    try:
        return np.load(io.BytesIO(paths.read_bytes(path)) if paths.is_remote(path) else path, allow_pickle=False)
    except (ValueError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a NumPy .npy array of face embeddings ({err})") from None


def _open_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    from ipadapter_jax import paths

    try:
        with Image.open(io.BytesIO(paths.read_bytes(path)) if paths.is_remote(path) else path) as image:
            image.load()
            return image.copy()
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file PIL can read") from None
