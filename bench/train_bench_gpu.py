"""Training step speed on one NVIDIA GPU: the PyTorch reference step vs ours with each attention kernel, with MFU.

Measures the SD1.5 UNet at 512 px (64x64 latents), bf16
compute, batch `--gpu-batch` (the reference's 8 per device): PyTorch (CUDA autocast bf16, diffusers' default
SDPA attention) vs our step with diffusers' attention, with `config.model.attention_implementation="cudnn"`
("jax-cudnn-attn": cuDNN flash attention for self-attention) and chunked. Reported: images/s, device peak
memory, achieved TFLOP/s and MFU = model FLOPs per step / step time / the chip's dense bf16 peak (H100/H200:
989 TFLOP/s datasheet; `--peak-tflops`). Model FLOPs, the same work for every row: XLA's count of our lowered
step with XLA attention where the backend gives one, else REFERENCE.md s.4's 1666 GFLOP per example (jax 0.11
on GPU gives none for the lowered step, and its count after compilation misses cuDNN/cuBLAS calls).
Measured on an H200: bench/train_bench_gpu.json (ours, both attention kernels) and train_bench_gpu_run1.json
(PyTorch vs ours side by side; its cuDNN row predates the cross-attention fix).

    python bench/train_bench_gpu.py [--steps 10] [--gpu-batch 8] [--deadline-s 480] [--frameworks torch,jax,...]

Each measurement is `bench/train_bench.py --measure ...` in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from train_bench import DENSE_BF16_TFLOPS, JAX_CHUNKED, JAX_CUDNN, measure_in_subprocess  # noqa: E402


def gpu_bench(args: argparse.Namespace) -> None:
    """SD1.5 at 512 px, bf16, on one GPU: PyTorch reference vs our step's attention kernels, with MFU.

    Every measurement is its own process with a time limit inside `--deadline-s`; one that fails or runs out
    of time is recorded with its error and the rest still run. The JSON is rewritten after each row."""
    import torch

    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or next((v for k, v in DENSE_BF16_TFLOPS.items() if k in kind), None)
    result = {
        "machine": f"{kind}, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores",
        "config": f"SD1.5 UNet, 512 px (64x64 latents), batch {args.gpu_batch}, bf16 compute, fp32 params",
        "peak_dense_bf16_tflops": peak,
        "runs": [],
    }
    start = time.monotonic()
    for framework in args.frameworks.split(","):
        left = args.deadline_s - (time.monotonic() - start)
        row = {"framework": framework}
        if left < 30:
            row["error"] = "skipped: --deadline-s reached"
        else:
            try:
                row = measure_in_subprocess(framework, "sd15_512", "bfloat16", args.gpu_batch, args.steps, timeout=left)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                row["error"] = str(error)[-2000:]
        result["runs"].append(row)
        _gpu_summary(result)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"  {framework}: {row.get('images_per_s', row.get('error', ''))}", flush=True)
    print(
        f"\n{'framework':<18} {'step ms':>8} {'images/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'compile s':>9}"
    )
    for r in result["runs"]:
        if "error" in r:
            lines = r["error"].strip().splitlines()
            reason = next((line for line in reversed(lines) if re.match(r"[\w.]+(Error|Exception)\b", line)), lines[-1])
            print(f"{r['framework']:<18} failed: {reason[:110]}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        tflops = f"{r['achieved_tflops']:.1f}" if r.get("achieved_tflops") is not None else "-"
        print(
            f"{r['framework']:<18} {r['step_s'] * 1e3:>8.1f} {r['images_per_s']:>9.2f} {tflops:>8} {mfu:>6} "
            f"{(r['device_peak_mib'] or 0) / 1024:>9.1f} {r['compile_s']:>9.1f}"
        )
    for key, value in result.items():
        if key.endswith("_over_torch_images_per_s") or key == "model_gflop_per_step":
            print(f"{key:<45}  {value:.3f}")
    print(f"wrote {args.out}")


def _gpu_summary(result: dict) -> None:
    """Adds the model FLOPs (see the module docstring), achieved TFLOP/s, MFU and ratios to torch's row."""
    rows = [r for r in result["runs"] if "error" not in r]
    model_flops = next((r["xla_flops"] for r in rows if r["framework"] == "jax"), None)
    if model_flops is None:  # no XLA-attention row: REFERENCE.md s.4's count, 1666 GFLOP per 512 px example
        model_flops = 1666e9 * next((r["batch"] for r in rows), 0) or None
    result["model_gflop_per_step"] = model_flops / 1e9 if model_flops else None
    torch_row = next((r for r in rows if r["framework"] == "torch"), None)
    for r in rows:
        r["achieved_tflops"] = model_flops / r["step_s"] / 1e12 if model_flops else None
        r["mfu"] = (
            r["achieved_tflops"] / result["peak_dense_bf16_tflops"]
            if (r["achieved_tflops"] and result["peak_dense_bf16_tflops"])
            else None
        )
        if torch_row is not None and r is not torch_row:
            result[f"{r['framework']}_over_torch_images_per_s"] = r["images_per_s"] / torch_row["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gpu-batch", type=int, default=8)
    parser.add_argument("--frameworks", default=f"torch,{JAX_CUDNN},jax,{JAX_CHUNKED}", help="rows, in order")
    parser.add_argument("--deadline-s", type=float, default=480.0, help="time for all the measurements")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak (default by kind)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "train_bench_gpu.json"))
    gpu_bench(parser.parse_args())


if __name__ == "__main__":
    main()
