"""Time and peak memory of converting an SD1.5-sized UNet folder to Flax, and of the Flax cache.

Writes random fp32 weights with the real SD1.5 UNet's keys and shapes (runwayml/stable-diffusion-v1-5
`unet/config.json`, 859.5M params, 3.44 GB `diffusion_pytorch_model.safetensors`) to a temp folder, then runs
each measurement in a fresh process (so one's memory does not count against the next):

  convert        load_unet(folder): eval_shape + key/shape check + tensor-by-tensor conversion to device arrays
  convert+save   the same with cache_dir: also saves the params with orbax (fp32)
  restore        load_unet(folder, cache_dir=...) again: restores from the cache, no conversion
  bf16 save / bf16 restore   the same with cache_dtype=bfloat16 (half the disk)

Peak memory is the process's peak RSS (`resource.getrusage`, which counts numpy and XLA buffers alike) minus
its RSS just before the weights are touched (imports, module, abstract params): the ratio to the weight
file's size must stay <= ~2 (one copy of the params, plus reading/transfer overhead).

Usage: python bench/conversion_bench.py [--dir /tmp/x] [--json bench/conversion_bench.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ipadapter_jax  # noqa: E402,F401  (the Flax deprecation log filter, before diffusers is imported)

# isort: split
from ipadapter_jax.weights import known_models  # noqa: E402

SD15_UNET_CONFIG = known_models.SD15["unet"]  # runwayml/stable-diffusion-v1-5 unet/config.json

MAX_RATIO = 2.0  # peak memory beyond the baseline, in copies of the weights

MEASUREMENTS = {
    "convert": {},
    "convert+save": {"cache": "cache_fp32"},
    "restore": {"cache": "cache_fp32"},
    "bf16 save": {"cache": "cache_bf16", "cache_dtype": "bfloat16"},
    "bf16 restore": {"cache": "cache_bf16", "cache_dtype": "bfloat16"},
}


def write_random_unet(folder: str) -> int:
    """config.json + a safetensors file of random fp32 weights with the real UNet's keys and shapes.

    Shapes come from diffusers' PyTorch UNet built on the meta device (no memory); the file is written tensor
    by tensor (our own writer of the safetensors layout: 8-byte header length, JSON header, data), so writing
    needs no more memory than the largest tensor. Returns the file size in bytes.
    """
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
    model.save_config(folder)
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = math.prod(shape) * 4
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    rng = np.random.default_rng(0)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for shape in shapes.values():
            f.write((rng.standard_normal(shape, dtype=np.float32) * 0.02).tobytes())
    with safe_open(path, framework="numpy") as f:  # the safetensors library accepts the file (header only)
        assert set(f.keys()) == set(shapes)
    return os.path.getsize(path)


def measure(folder: str, name: str) -> dict:
    """One measurement, run in this (fresh) process: prints nothing, returns numbers."""
    import jax
    import jax.numpy as jnp

    from ipadapter_jax.weights import diffusers_models

    options = MEASUREMENTS[name]
    cache_dir = os.path.join(folder, options["cache"]) if "cache" in options else None
    cache_dtype = jnp.bfloat16 if options.get("cache_dtype") == "bfloat16" else None

    # Baseline: the process after its imports (jax, diffusers, transformers, torch). The module's eval_shape
    # trace inside load_unet counts as conversion memory (a few hundred MB for SD1.5: conservative).
    baseline = _rss_now()
    start = time.perf_counter()
    loaded = diffusers_models.load_unet(os.path.join(folder, "unet"), cache_dir=cache_dir, cache_dtype=cache_dtype)
    jax.block_until_ready(loaded.params)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = loaded.report
    return {
        "seconds": seconds,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "cache": report.cache,
        "convert_s": report.convert_s,
        "cache_s": report.cache_s,
        "num_params": report.num_params,
        "param_bytes": report.param_bytes,
        "stored_dtype": report.stored_dtype,
        "stored_bytes": report.stored_bytes,
    }


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="work folder (default: a temp folder, removed afterwards)")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "conversion_bench.json"))
    parser.add_argument("--measure", choices=list(MEASUREMENTS), help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.dir, args.measure)))
        return

    folder = args.dir or tempfile.mkdtemp(prefix="conversion_bench_")
    try:
        start = time.perf_counter()
        os.makedirs(os.path.join(folder, "unet"), exist_ok=True)
        file_bytes = write_random_unet(os.path.join(folder, "unet"))
        write_s = time.perf_counter() - start
        print(f"wrote {file_bytes / 1e9:.2f} GB of random fp32 SD1.5 UNet weights in {write_s:.1f} s")
        rows = {}
        for name in MEASUREMENTS:
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--dir", folder, "--measure", name],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
            rows[name]["extra_rss"] = rows[name]["peak_rss"] - rows[name]["baseline_rss"]
            rows[name]["ratio"] = rows[name]["extra_rss"] / file_bytes
            print(f"  {name}: done in {rows[name]['seconds']:.1f} s")
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)

    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        # Timings on a shared machine: the 1-minute load average when the run ended.
        "load_average": os.getloadavg()[0],
        "weights": "random fp32, real SD1.5 UNet keys/shapes (safetensors)",
        "file_bytes": file_bytes,
        "write_s": write_s,
        "measurements": rows,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)

    gb = 1e9
    print(f"\nSD1.5 UNet: {rows['convert']['num_params'] / 1e6:.1f}M params, file {file_bytes / gb:.2f} GB fp32")
    columns = ("total s", "convert s", "cache s", "on disk GB", "peak RSS GB", "extra GB", "x weights")
    print(f"{'step':<14}" + "".join(f"{c:>12}" for c in columns))
    for name, row in rows.items():
        disk = f"{row['stored_bytes'] / gb:.2f}" if row["stored_bytes"] else "-"
        convert = f"{row['convert_s']:.1f}" if row["convert_s"] is not None else "-"
        cache = f"{row['cache_s']:.1f}" if row["cache_s"] is not None else "-"
        values = (
            f"{row['seconds']:.1f}",
            convert,
            cache,
            disk,
            f"{row['peak_rss'] / gb:.2f}",
            f"{row['extra_rss'] / gb:.2f}",
            f"{row['ratio']:.2f}",
        )
        print(f"{name:<14}" + "".join(f"{v:>12}" for v in values))
    print(f"wrote {args.json}")
    worst = max(rows.values(), key=lambda row: row["ratio"])["ratio"]
    if worst > MAX_RATIO:
        sys.exit(f"FAIL: peak memory {worst:.2f}x the weights > {MAX_RATIO}x")


if __name__ == "__main__":
    main()
