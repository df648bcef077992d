"""`ipadapter-jax eval`: the paper's CLIP-I / CLIP-T evaluation (Table 1), and paired comparisons of runs.

    ipadapter-jax eval run --annotations captions_val2017.json --image-root val2017/ --base SD15_DIR \\
        --adapter ip-adapter_sd15.safetensors --image-encoder IMAGE_ENCODER_DIR --eval-clip CLIP_L14_DIR \\
        --out eval/sd15 [--limit N] [--scale 1.0 [--scale 0.5 ...]] [--steps 50] [--guidance-scale 7.5] \\
        [--num-samples 4] [--seed 0] [--weight-type style-transfer]
    ipadapter-jax eval compare eval/adapter_a eval/adapter_b [...] --out comparison.json

`run` writes run.json, results.csv, summary.json, contact_sheet.png (and samples/) into --out and resumes when
rerun with the same arguments. Several --scale values make a sweep on the same prompts and seeds: one run per
scale in `--out/scale_<s>/` and `--out/comparison.json` (each scale vs the first). `compare` pairs runs made
with the same annotations, image root, eval CLIP, seed, sample count and size. A bad input ends in one
"error: ..." line and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipadapter_jax.choices import ATTENTION_IMPLEMENTATIONS, SCHEDULERS, WEIGHT_TYPES
from ipadapter_jax.cli.main import ArgumentParser, UsageError, report_errors


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="ipadapter-jax eval", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="generate and score (CLIP-I / CLIP-T) on a captioned image set")
    data = run.add_argument_group("data")
    data.add_argument("--annotations", required=True, help="COCO captions file or training JSON list")
    data.add_argument("--image-root", required=True, help="folder the annotations' image paths are relative to")
    data.add_argument("--limit", type=int, help="evaluate the first N distinct images only")
    models = run.add_argument_group("models")
    models.add_argument("--base", required=True, help="diffusers pipeline folder (unet/, vae/, text_encoder/, ...)")
    models.add_argument("--adapter", required=True, help="IP-Adapter file: .safetensors/.bin (official) or .msgpack")
    models.add_argument("--image-encoder", required=True, help="the adapter's CLIPVisionModelWithProjection folder")
    models.add_argument("--eval-clip", required=True, help="CLIPModel folder with its tokenizer (paper: ViT-L/14)")
    models.add_argument("--scheduler", choices=SCHEDULERS, default="ddim", help="default ddim (the paper's)")
    models.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="generation dtype")
    models.add_argument("--cache-dir", help="keep converted Flax params of the base model here")
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
    sampling = run.add_argument_group("sampling (defaults: the paper's)")
    sampling.add_argument(
        "--scale", type=float, action="append", help="IP-Adapter scale (default 1.0); repeat for a sweep"
    )
    sampling.add_argument(
        "--weight-type", choices=WEIGHT_TYPES, help="per-layer scale preset (style-transfer, ...), times --scale"
    )
    sampling.add_argument(
        "--composition-weight", type=float, help="composition layers' weight of the style-and-composition presets"
    )
    sampling.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    sampling.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    sampling.add_argument("--num-samples", type=int, default=4, help="images per prompt image (default 4)")
    sampling.add_argument("--seed", type=int, default=0, help="prompt image i uses seed SEED + i (default 0)")
    sampling.add_argument("--height", type=int, help="default: the base model's size")
    sampling.add_argument("--width", type=int, help="default: the base model's size")
    sampling.add_argument("--prompt", default="", help='text prompt (default "": image-only, as the paper)')
    output = run.add_argument_group("output")
    output.add_argument("--out", required=True, help="output folder (a rerun resumes it)")
    output.add_argument(
        "--batch-images",
        type=int,
        default=8,
        help="prompt images per generation call (each "
        "--num-samples images; sharded over the devices), scoring batch and flush (default 8)",
    )
    output.add_argument("--score-batch", type=int, default=32, help="images per evaluation-CLIP call")
    output.add_argument("--contact-sheet", type=int, default=8, help="prompts shown in contact_sheet.png")
    output.add_argument("--save-images", action="store_true", help="keep every generated image in samples/")
    output.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    output.add_argument(
        "--compile-cache",
        default=os.environ.get("JAX_COMPILATION_CACHE_DIR"),
        help="XLA compilation cache folder (default $JAX_COMPILATION_CACHE_DIR or "
        "~/.cache/ipadapter-jax/xla; 'none' leaves JAX's setting alone)",
    )
    output.add_argument("--quiet", action="store_true", help="no progress bar")

    compare = commands.add_parser("compare", help="paired differences of runs on the same prompts and seeds")
    compare.add_argument("baseline", help="run folder every other run is compared with")
    compare.add_argument("others", nargs="+", help="run folders")
    compare.add_argument("--out", required=True, help="JSON file to write")
    compare.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    return parser


def dispatch(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "compare":
        from ipadapter_jax.evaluation.statistics import write_comparison

        result = write_comparison(args.out, args.baseline, args.others, args.bootstrap)
        for comparison in result["comparisons"]:
            print(_difference_line(comparison), file=sys.stderr)
        print(args.out)
    else:
        print(run(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `ipadapter-jax eval` with the arguments after `eval`; returns the exit status."""
    return report_errors(dispatch, list(sys.argv[1:] if argv is None else argv))


def run(args: argparse.Namespace) -> Path | str:
    """Loads the models once, evaluates each scale (a sweep: one run folder per scale + comparison.json).

    A bucket --out (gs://) is evaluated in its local copy (staged down first, so a rerun resumes) and uploaded at
    the end; bucket annotations and image folders are read from local copies."""
    from ipadapter_jax import paths, staging

    paths.check_storage([args.out, args.annotations, args.image_root, args.base, args.adapter, args.image_encoder,
                         args.eval_clip, args.cache_dir])  # fmt: skip
    import jax

    if args.compile_cache != "none":
        jax.config.update(
            "jax_compilation_cache_dir", args.compile_cache or str(Path.home() / ".cache" / "ipadapter-jax" / "xla")
        )
    # After the log filter (`import ipadapter_jax` via these modules) the loaders import the Flax classes.
    from ipadapter_jax.evaluation.clip_score import CLIPScorer, load_eval_clip
    from ipadapter_jax.evaluation.evaluate import SamplingSettings, eval_prompts, run_evaluation
    from ipadapter_jax.evaluation.statistics import write_comparison
    from ipadapter_jax.pipelines.pipeline import IPAdapterPipeline

    for name in ("limit", "steps", "num_samples", "batch_images", "score_batch", "bootstrap"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    scales = args.scale or [1.0]
    scale_specs = [_scale_spec(args, scale) for scale in scales]
    annotations = staging.stage_down(args.annotations, what="annotations", progress=not args.quiet)
    image_root = staging.stage_down(args.image_root, what="images", progress=not args.quiet)
    prompts, skipped = eval_prompts(annotations, args.limit)
    if not prompts:
        raise ValueError(f"{args.annotations}: no usable image-caption entry ({skipped} skipped)")
    out = Path(staging.stage_down(args.out, what="evaluation") if paths.exists(args.out) else staging.mirror(args.out))
    pipe = IPAdapterPipeline.from_pretrained(
        args.base,
        args.adapter,
        args.image_encoder,
        scheduler=args.scheduler,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        progress=not args.quiet,
        attention_implementation=args.attention,
        pytorch_numerics=not args.flax_numerics,
    )
    eval_clip = staging.stage_down(args.eval_clip, what="evaluation CLIP", progress=not args.quiet)
    scorer = CLIPScorer(load_eval_clip(eval_clip), batch_size=args.score_batch)
    identity = {
        "annotations": _absolute(args.annotations),
        "image_root": _absolute(args.image_root),
        "base": _absolute(args.base),
        "adapter": _absolute(args.adapter),
        "image_encoder": _absolute(args.image_encoder),
        "eval_clip": _absolute(args.eval_clip),
        "scheduler": args.scheduler,
        "dtype": args.dtype,
    }
    base_settings = SamplingSettings(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        num_samples=args.num_samples,
        seed=args.seed,
        height=args.height,
        width=args.width,
        prompt=args.prompt,
    )
    folders = [out / f"scale_{scale:g}" for scale in scales] if len(scales) > 1 else [out]
    for scale, scale_spec, folder in zip(scales, scale_specs, folders):
        summary = run_evaluation(
            pipe,
            scorer,
            prompts,
            image_root,
            dataclasses.replace(base_settings, scale=scale_spec),
            folder,
            identity=identity,
            batch_images=args.batch_images,
            contact_sheet=args.contact_sheet,
            save_images=args.save_images,
            num_resamples=args.bootstrap,
            progress=not args.quiet,
        )
        metrics = summary["metrics"]
        print(
            f"{folder}: scale {scale:g}, {summary['images']} images x {args.num_samples}: "
            f"CLIP-I {_interval(metrics['clip_i'])}, CLIP-T {_interval(metrics['clip_t'])}",
            file=sys.stderr,
        )
    if len(folders) > 1:
        result = write_comparison(out / "comparison.json", folders[0], folders[1:], args.bootstrap)
        for comparison in result["comparisons"]:
            print(_difference_line(comparison), file=sys.stderr)
    if paths.is_remote(args.out):
        staging.upload(out, args.out, what="evaluation", last=("summary.json", "comparison.json"))
        return args.out
    return out


def _scale_spec(args: argparse.Namespace, scale: float) -> Any:
    """--scale, or the --weight-type preset weighted by it."""
    from ipadapter_jax.models.scale_presets import ScalePreset

    if args.weight_type is None:
        if args.composition_weight is not None:
            raise UsageError("--composition-weight needs --weight-type")
        return scale
    return ScalePreset(args.weight_type, scale, args.composition_weight)


def _absolute(path: str) -> str:
    """A URL as given, a local path resolved (what the run folder records of its inputs)."""
    from ipadapter_jax import paths

    return path if paths.is_remote(path) else str(Path(path).resolve())


def _interval(metric: dict) -> str:
    low, high = metric["ci95"]
    return f"{metric['mean']:.4f} [{low:.4f}, {high:.4f}]"


def _difference_line(comparison: dict) -> str:
    parts = []
    for name in ("clip_i", "clip_t"):
        m = comparison["metrics"][name]
        parts.append(f"{name} {m['difference']:+.4f} [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]")
    pair = f"{comparison['other']} - {comparison['baseline']} ({comparison['paired_images']} images)"
    return f"{pair}: " + ", ".join(parts)
