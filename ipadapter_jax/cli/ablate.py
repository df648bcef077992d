"""`ipadapter-jax ablate`: the paper's ablations on the embedded world (tiny base, procedural images), on a CPU.

    ipadapter-jax ablate --preset tokens --seeds 3 --out out/ablate_tokens
    ipadapter-jax ablate --variants base plus:model.adapter_kind=plus,model.num_tokens=16,model.resampler_width=64 \\
        --seeds 2 --out out/ablate_mine [--steps 500] [--scales 0,0.5,1]

Trains every variant x seed on the same data in the same order, scores each on held-out image prompts at the
scales (CLIP-I, CLIP-T, text controllability) and writes report.md / report.json (means and paired differences
with 95% bootstrap intervals), clip_i_vs_scale.png, loss_curves.png and grid.png into --out
(`ipadapter_jax.training.ablation`). A rerun skips finished runs. Presets: `ipadapter_jax.training.ablation_presets`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ipadapter_jax.cli.main import ArgumentParser, UsageError, exit_process, finite_float, positive_int, report_errors


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(finite_float(part) for part in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, e.g. 0,0.5,1; got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    from ipadapter_jax.training.ablation_presets import ABLATION_PRESETS

    parser = ArgumentParser(prog="ipadapter-jax ablate", description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=sorted(ABLATION_PRESETS), help="one of the paper's comparisons")
    which.add_argument(
        "--variants", nargs="+", metavar="NAME[:KEY=VALUE,...]", help="variants: a name + overrides of the demo preset"
    )
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 per variant (default 3)")
    parser.add_argument("--out", required=True, help="report folder (a rerun skips its finished runs)")
    parser.add_argument("--steps", type=positive_int, help="training steps per run (default 500)")
    parser.add_argument("--scales", type=_scales, help="IP scales to evaluate (default 0,0.5,1)")
    parser.add_argument("--images", type=positive_int, help="procedural training images (default 512)")
    parser.add_argument("--prompts", type=positive_int, help="held-out image prompts (default 8)")
    parser.add_argument("--samples", type=positive_int, help="samples per prompt and scale (default 2)")
    parser.add_argument("--inference-steps", type=positive_int, help="DDIM steps (default 20)")
    parser.add_argument(
        "--compile-cache",
        default=os.environ.get("JAX_COMPILATION_CACHE_DIR"),
        help="XLA compilation cache folder, shared by runs of the same shapes (default $JAX_COMPILATION_CACHE_DIR "
        "or ~/.cache/ipadapter-jax/xla; 'none' leaves JAX's setting alone)",
    )
    return parser


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import jax

    import ipadapter_jax  # noqa: F401  (the log filter, before the models are imported)

    if args.compile_cache != "none":
        cache = args.compile_cache or str(Path.home() / ".cache" / "ipadapter-jax" / "xla")
        jax.config.update("jax_compilation_cache_dir", cache)
    from ipadapter_jax.training import ablation

    variants = (
        ablation.preset_variants(args.preset) if args.preset else [ablation.parse_variant(v) for v in args.variants]
    )
    given = {
        "steps": args.steps,
        "scales": args.scales,
        "num_images": args.images,
        "num_prompts": args.prompts,
        "samples_per_prompt": args.samples,
        "inference_steps": args.inference_steps,
    }
    settings = dataclasses.replace(ablation.AblationSettings(), **{k: v for k, v in given.items() if v is not None})
    if len(set(settings.scales)) != len(settings.scales):
        raise UsageError(f"--scales must be distinct, got {settings.scales}")
    report = ablation.run_ablation(variants, list(range(args.seeds)), args.out, settings)
    _print_table(report)
    print(report["files"]["report.md"])
    return 0


def _print_table(report: dict) -> None:
    scales = report["scales"]
    print(f"{'variant':<18}" + "".join(f"CLIP-I @ {s:<18}" for s in scales), file=sys.stderr)
    for variant in report["variants"]:
        cells = report["table"][variant["name"]]["clip_i"]
        row = "".join(f"{c['mean']:.3f} [{c['ci95'][0]:.3f},{c['ci95'][1]:.3f}]   " for c in (cells[s] for s in scales))
        print(f"{variant['name']:<18}{row}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """`ipadapter-jax ablate` entry point; returns the exit status."""
    return report_errors(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    exit_process(main())
