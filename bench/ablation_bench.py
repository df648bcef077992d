"""An ablation preset (default `tokens`: base 4 tokens vs Plus 16 vs Full 50) x 3 seeds on the embedded world, timed.

What `ipadapter-jax ablate --preset PRESET --seeds 3 --out OUT` runs, with its default settings
(`ipadapter_jax.training.ablation.AblationSettings`): the goal is under 30 minutes on a 2-core CPU. Prints a table
(variant, CLIP-I at each IP scale with its 95% interval over seeds x prompts, training and evaluation time) and
writes it with the paired differences to --json.

Usage: python bench/ablation_bench.py [--preset tokens|designs|drops] [--out out/ablation_bench] [--seeds 3]
    [--steps N] [--json FILE (default bench/ablation_bench_PRESET.json)]
(--out is removed first: every run trains; XLA's compilation cache is $JAX_COMPILATION_CACHE_DIR or .jax_cache.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ipadapter_jax  # noqa: E402,F401  (the log filter, before the models are imported)

# isort: split
import jax  # noqa: E402

from ipadapter_jax.training import ablation  # noqa: E402
from ipadapter_jax.training.ablation_presets import ABLATION_PRESETS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "ablation_bench"))
    parser.add_argument("--preset", default="tokens", choices=sorted(ABLATION_PRESETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="training steps per run (default: AblationSettings' default)")
    parser.add_argument("--json", help="default: bench/ablation_bench_PRESET.json")
    args = parser.parse_args()
    args.json = args.json or os.path.join(ROOT, "bench", f"ablation_bench_{args.preset}.json")
    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", f"{ROOT}/.jax_cache"))
    settings = ablation.AblationSettings()
    if args.steps:
        settings = dataclasses.replace(settings, steps=args.steps)
    shutil.rmtree(args.out, ignore_errors=True)
    started = time.time()
    report = ablation.run_ablation(ablation.preset_variants(args.preset), list(range(args.seeds)), args.out, settings)
    total = time.time() - started

    rows = []
    for variant in report["variants"]:
        name = variant["name"]
        runs = [r for r in report["runs"] if r["variant"] == name]
        rows.append(
            {
                "variant": name,
                "clip_i": report["table"][name]["clip_i"],
                "control_hit": report["table"][name]["control_hit"],
                "train_seconds": sum(r["train_seconds"] for r in runs),
                "eval_seconds": sum(r["eval_seconds"] for r in runs),
            }
        )
    scales = report["scales"]
    print(f"\n{'variant':<8}" + "".join(f"{'CLIP-I @ ' + s:<26}" for s in scales) + "train s  eval s")
    for row in rows:
        cells = "".join(
            f"{c['mean']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]   " for c in (row["clip_i"][s] for s in scales)
        )
        print(f"{row['variant']:<8}{cells}{row['train_seconds']:7.0f} {row['eval_seconds']:7.0f}")
    print(f"total {total / 60:.1f} min (data, caches and evaluation models included); report: {args.out}/report.md")
    result = {
        "preset": args.preset,
        "seeds": args.seeds,
        "settings": report["settings"],
        "rows": rows,
        "differences": report["differences"],
        "total_seconds": round(total, 1),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "backend": jax.default_backend()},
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(args.json)


if __name__ == "__main__":
    main()
