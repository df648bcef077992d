"""TPU plans of the presets: `ipadapter-jax plan` compiled on this CPU host for v5e, v5p and v6e topologies.

    python bench/tpu_plan.py                    # every case not yet in bench/tpu_plan.json, in priority order
    python bench/tpu_plan.py --cases a1,b1      # some cases (ids below); --redo recompiles cases already there
    python bench/tpu_plan.py --table            # only print the tables of bench/tpu_plan.json

Each case is one `ipadapter-jax plan` subprocess (the user's command, with its JSON report), run one at a time with
a time limit; results are merged into bench/tpu_plan.json after every case, so an interrupted run keeps what it
finished, and two queues run side by side (a compile takes one core) keep each other's: a compile takes up to 10 GB
of host memory for SD1.5 and 15 GB for SDXL, so on a 24 GB host an SDXL compile runs alone. It prints three tables:
one row per case, then the README's two (a matrix of model x kernel by topology, and one row per compile). Each
case records how busy the host was while it compiled (`host_load`): a compile that shared the 2 cores with other
work is marked `*`. Cases, in priority order (SD1.5 at 512 px and SDXL at 1024 px,
bf16 compute, fp32 params, embedding-cache batches):

  a   SD1.5 base, batch 8/chip, splash, v5e 8 chips: does it fit with >= 25% headroom?
  b   largest batch per chip, default (diffusers) vs splash attention, SD1.5 base on v5e 8 chips (single batches;
      `--batch-per-chip auto` bisects: several compiles each)
  c   SDXL base, batch 8/chip on v5p 8 chips with the frozen params FSDP-split (the sdxl preset's rules), and
      what it takes on v5e
  d   the rest: SD1.5 base and Plus, SDXL, both kernels, on v5e / v5p / v6e at 8 and 256 chips
  e   SD1.5 with every param FSDP-split over 8 chips, on 8 and 256 chips: the same step's FLOPs with and without
      XLA's collective-matmul loops
  f   largest batches per chip where the d cases only bound them: from a batch past the line through the sizes
      down to the first that fits (a failing compile takes 1-3 min, one that fits 5-40)
  g   e2 with the TPU compiler's flags (`LIBTPU_FLAGS`) that keep collective-matmul loops at 256 chips

Needs libtpu (`pip install "jax[tpu]==0.10.2"`). Compiles take minutes each on 2 cores (REFERENCE.md s.7).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tpu_plan_tables import compiles, matrix, table

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "tpu_plan.json"

SPLASH = ["--config.model.attention_implementation=splash"]
FSDP8 = ["--config.mesh.fsdp=8"]
REMAT = ["--config.model.remat=True"]
SPLIT_ALL = ['--config.sharding_rules=((".*", "fsdp"),)']  # frozen params FSDP-split too (sd15 replicates them)


def _plan(preset: str, topology: str, batch: int, *options: str) -> list[str]:
    """`preset` on `topology` at `batch` per chip."""
    return ["--config", preset, "--topology", topology, "--batch-per-chip", str(batch), *options]


def _sdxl(topology: str, batch: int, *options: str) -> list[str]:
    """SDXL with fsdp 8 on `topology` at `batch` per chip (default attention unless `options` say otherwise)."""
    return _plan("sdxl", topology, batch, *FSDP8, *options)


# id -> (description, plan arguments)
CASES: dict[str, tuple[str, list[str]]] = {
    "a1": ("SD1.5 base 512px b8 splash, v5e 8 chips", ["--config", "sd15", "--topology", "v5e:2x4", *SPLASH]),
    "b1": ("SD1.5 base 512px b18 splash, v5e 8", _plan("sd15", "v5e:2x4", 18, *SPLASH)),
    "b2": ("SD1.5 base 512px b10 diffusers, v5e 8", _plan("sd15", "v5e:2x4", 10)),
    "b3": ("SD1.5 base 512px b18 diffusers, v5e 8", _plan("sd15", "v5e:2x4", 18)),
    "b4": ("SD1.5 base 512px b16 diffusers, v5e 8", _plan("sd15", "v5e:2x4", 16)),
    "b5": ("SD1.5 base 512px b20 splash, v5e 8", _plan("sd15", "v5e:2x4", 20, *SPLASH)),
    "b6": ("SD1.5 base 512px b17 diffusers, v5e 8", _plan("sd15", "v5e:2x4", 17)),
    "b7": ("SD1.5 base 512px b34 splash, v5e 8", _plan("sd15", "v5e:2x4", 34, *SPLASH)),
    "b8": ("SD1.5 base 512px b33 splash, v5e 8", _plan("sd15", "v5e:2x4", 33, *SPLASH)),
    "c1": ("SDXL base 1024px b8 splash fsdp8, v5p 8", _sdxl("v5p:2x2x2", 8, *SPLASH)),
    "c2": ("SDXL base 1024px b3 splash fsdp8 remat, v5e 8", _sdxl("v5e:2x4", 3, *SPLASH, *REMAT)),
    "c3": ("SDXL base 1024px b8 splash fsdp8 remat, v5e 8", _sdxl("v5e:2x4", 8, *SPLASH, *REMAT)),
    "d1": ("SD1.5 base 512px b8 diffusers, v5e 8", ["--config", "sd15", "--topology", "v5e:2x4"]),
    "d2": ("SD1.5 Plus 512px b8 splash, v5e 8", ["--config", "sd15_plus", "--topology", "v5e:2x4", *SPLASH]),
    "d3": ("SD1.5 base 512px b8 splash, v5e 256", ["--config", "sd15", "--topology", "v5e:16x16", *SPLASH]),
    "d4": ("SD1.5 base 512px b8 splash, v6e 8", ["--config", "sd15", "--topology", "v6e:2x4", *SPLASH]),
    "d5": ("SD1.5 base 512px b8 splash, v5p 8", ["--config", "sd15", "--topology", "v5p:2x2x2", *SPLASH]),
    "d6": ("SD1.5 Plus 512px b8 diffusers, v5e 8", ["--config", "sd15_plus", "--topology", "v5e:2x4"]),
    "d7": ("SDXL base 1024px b8 diffusers fsdp8, v5p 8", _sdxl("v5p:2x2x2", 8)),
    "d8": ("SD1.5 base 512px b8 splash, v6e 256", ["--config", "sd15", "--topology", "v6e:16x16", *SPLASH]),
    "d9": ("SD1.5 base 512px b8 splash, v5p 256", ["--config", "sd15", "--topology", "v5p:4x8x8", *SPLASH]),
    "d10": ("SDXL base 1024px b8 splash fsdp8, v6e 8", _sdxl("v6e:2x4", 8, *SPLASH)),
    "d11": ("SDXL base 1024px b8 splash fsdp8, v5p 256", _sdxl("v5p:4x8x8", 8, *SPLASH)),
    "d12": ("SD1.5 base 512px b8 diffusers, v5p 8", ["--config", "sd15", "--topology", "v5p:2x2x2"]),
    "d13": ("SD1.5 base 512px b8 diffusers, v6e 8", ["--config", "sd15", "--topology", "v6e:2x4"]),
    "d14": ("SD1.5 base 512px b8 diffusers, v5e 256", ["--config", "sd15", "--topology", "v5e:16x16"]),
    "d15": ("SD1.5 Plus 512px b8 splash, v5p 8", ["--config", "sd15_plus", "--topology", "v5p:2x2x2", *SPLASH]),
    "d16": ("SD1.5 Plus 512px b8 splash, v6e 8", ["--config", "sd15_plus", "--topology", "v6e:2x4", *SPLASH]),
    "d17": ("SDXL base 1024px b7 splash fsdp8, v6e 8", _sdxl("v6e:2x4", 7, *SPLASH)),
    "d18": ("SDXL base 1024px b8 diffusers fsdp8, v6e 8", _sdxl("v6e:2x4", 8)),
    "d19": ("SDXL base 1024px b8 diffusers fsdp8, v5e 8", _sdxl("v5e:2x4", 8)),
    "d20": ("SDXL base 1024px b8 splash fsdp8, v5e 8", _sdxl("v5e:2x4", 8, *SPLASH)),
    "d21": ("SD1.5 Plus 512px b8 splash, v5e 256", ["--config", "sd15_plus", "--topology", "v5e:16x16", *SPLASH]),
    "d22": ("SD1.5 Plus 512px b8 diffusers, v5e 256", ["--config", "sd15_plus", "--topology", "v5e:16x16"]),
    "d23": ("SD1.5 Plus 512px b8 diffusers, v5p 8", ["--config", "sd15_plus", "--topology", "v5p:2x2x2"]),
    "d24": ("SD1.5 Plus 512px b8 diffusers, v6e 8", ["--config", "sd15_plus", "--topology", "v6e:2x4"]),
    "d25": ("SDXL base 1024px b2 splash fsdp8, v5e 8", _sdxl("v5e:2x4", 2, *SPLASH)),
    "d26": ("SD1.5 base 512px b64 splash, v5p 8", _plan("sd15", "v5p:2x2x2", 64, *SPLASH)),
    "d27": ("SD1.5 base 512px b32 splash, v6e 8", _plan("sd15", "v6e:2x4", 32, *SPLASH)),
    "d28": ("SDXL base 1024px b2 splash fsdp8, v5e 256", _sdxl("v5e:16x16", 2, *SPLASH)),
    "d29": ("SDXL base 1024px b7 splash fsdp8, v6e 256", _sdxl("v6e:16x16", 7, *SPLASH)),
    "d30": ("SDXL base 1024px b8 diffusers fsdp8, v5e 256", _sdxl("v5e:16x16", 8)),
    "d31": ("SDXL base 1024px b8 diffusers fsdp8, v5p 256", _sdxl("v5p:4x8x8", 8)),
    "d32": ("SDXL base 1024px b8 diffusers fsdp8, v6e 256", _sdxl("v6e:16x16", 8)),
    "d33": ("SDXL base 1024px b6 splash fsdp8, v6e 256", _sdxl("v6e:16x16", 6, *SPLASH)),
    "d34": ("SDXL base 1024px b5 splash fsdp8, v6e 256", _sdxl("v6e:16x16", 5, *SPLASH)),
    "e1": (
        "SD1.5 base 512px b8 splash fsdp8, v5e 8",
        ["--config", "sd15", "--topology", "v5e:2x4", *SPLASH, *FSDP8, *SPLIT_ALL],
    ),
    "e2": (
        "SD1.5 base 512px b8 splash fsdp8, v5e 256",
        ["--config", "sd15", "--topology", "v5e:16x16", *SPLASH, *FSDP8, *SPLIT_ALL],
    ),
    "f1": ("SDXL base 1024px b3 splash fsdp8, v5e 8", _sdxl("v5e:2x4", 3, *SPLASH)),
    "f2": ("SDXL base 1024px b9 diffusers fsdp8, v6e 8", _sdxl("v6e:2x4", 9)),
    "f5": ("SD1.5 base 512px b38 splash, v6e 8", _plan("sd15", "v6e:2x4", 38, *SPLASH)),
    "f6": ("SD1.5 Plus 512px b33 splash, v5e 8", _plan("sd15_plus", "v5e:2x4", 33, *SPLASH)),
    "f7": ("SD1.5 Plus 512px b17 diffusers, v5e 8", _plan("sd15_plus", "v5e:2x4", 17)),
    "f8": ("SD1.5 Plus 512px b32 splash, v5e 8", _plan("sd15_plus", "v5e:2x4", 32, *SPLASH)),
    "f9": ("SD1.5 Plus 512px b16 diffusers, v5e 8", _plan("sd15_plus", "v5e:2x4", 16)),
    "f10": ("SD1.5 Plus 512px b31 splash, v5e 8", _plan("sd15_plus", "v5e:2x4", 31, *SPLASH)),
    "f11": ("SDXL base 1024px b12 diffusers fsdp8, v5p 8", _sdxl("v5p:2x2x2", 12)),
    "f12": ("SDXL base 1024px b24 splash fsdp8, v5p 8", _sdxl("v5p:2x2x2", 24, *SPLASH)),
    "f13": ("SD1.5 base 512px b128 splash, v5p 8", _plan("sd15", "v5p:2x2x2", 128, *SPLASH)),
    "f14": ("SD1.5 base 512px b64 diffusers, v5p 8", _plan("sd15", "v5p:2x2x2", 64)),
    "f15": ("SD1.5 base 512px b16 diffusers, v6e 8", _plan("sd15", "v6e:2x4", 16)),
    "f16": ("SD1.5 Plus 512px b128 splash, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 128, *SPLASH)),
    "f17": ("SD1.5 Plus 512px b64 diffusers, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 64)),
    "f18": ("SD1.5 Plus 512px b32 splash, v6e 8", _plan("sd15_plus", "v6e:2x4", 32, *SPLASH)),
    "f19": ("SD1.5 Plus 512px b16 diffusers, v6e 8", _plan("sd15_plus", "v6e:2x4", 16)),
    "f20": ("SDXL base 1024px b13 diffusers fsdp8, v5p 8", _sdxl("v5p:2x2x2", 13)),
    "f22": ("SD1.5 base 512px b40 splash, v6e 8", _plan("sd15", "v6e:2x4", 40, *SPLASH)),
    "f23": ("SD1.5 base 512px b19 diffusers, v6e 8", _plan("sd15", "v6e:2x4", 19)),
    "f24": ("SD1.5 base 512px b76 diffusers, v5p 8", _plan("sd15", "v5p:2x2x2", 76)),
    "f25": ("SD1.5 base 512px b144 splash, v5p 8", _plan("sd15", "v5p:2x2x2", 144, *SPLASH)),
    "f26": ("SDXL base 1024px b28 splash fsdp8, v5p 8", _sdxl("v5p:2x2x2", 28, *SPLASH)),
    "f27": ("SDXL base 1024px b16 diffusers fsdp8, v5p 8", _sdxl("v5p:2x2x2", 16)),
    "f28": ("SD1.5 base 512px b18 diffusers, v6e 8", _plan("sd15", "v6e:2x4", 18)),
    "f29": ("SD1.5 base 512px b36 splash, v6e 8", _plan("sd15", "v6e:2x4", 36, *SPLASH)),
    "f30": ("SD1.5 base 512px b160 splash, v5p 8", _plan("sd15", "v5p:2x2x2", 160, *SPLASH)),
    "f31": ("SD1.5 base 512px b96 diffusers, v5p 8", _plan("sd15", "v5p:2x2x2", 96)),
    "f32": ("SD1.5 Plus 512px b144 splash, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 144, *SPLASH)),
    "f33": ("SD1.5 Plus 512px b80 diffusers, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 80)),
    "f34": ("SD1.5 base 512px b44 splash, v6e 8", _plan("sd15", "v6e:2x4", 44, *SPLASH)),
    "f35": ("SD1.5 base 512px b24 diffusers, v6e 8", _plan("sd15", "v6e:2x4", 24)),
    "f36": ("SD1.5 Plus 512px b39 splash, v6e 8", _plan("sd15_plus", "v6e:2x4", 39, *SPLASH)),
    "f37": ("SD1.5 Plus 512px b21 diffusers, v6e 8", _plan("sd15_plus", "v6e:2x4", 21)),
    "f38": ("SDXL base 1024px b26 splash fsdp8, v5p 8", _sdxl("v5p:2x2x2", 26, *SPLASH)),
    "f39": ("SD1.5 base 512px b150 splash, v5p 8", _plan("sd15", "v5p:2x2x2", 150, *SPLASH)),
    "f40": ("SD1.5 base 512px b153 splash, v5p 8", _plan("sd15", "v5p:2x2x2", 153, *SPLASH)),
    "f41": ("SDXL base 1024px b25 splash fsdp8, v5p 8", _sdxl("v5p:2x2x2", 25, *SPLASH)),
    "f42": ("SD1.5 base 512px b156 splash, v5p 8", _plan("sd15", "v5p:2x2x2", 156, *SPLASH)),
    "f43": ("SD1.5 base 512px b128 diffusers, v5p 8", _plan("sd15", "v5p:2x2x2", 128)),
    "f44": ("SD1.5 base 512px b52 splash, v6e 8", _plan("sd15", "v6e:2x4", 52, *SPLASH)),
    "f45": ("SD1.5 base 512px b32 diffusers, v6e 8", _plan("sd15", "v6e:2x4", 32)),
    "f46": ("SD1.5 Plus 512px b152 splash, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 152, *SPLASH)),
    "f47": ("SD1.5 Plus 512px b112 diffusers, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 112)),
    "f48": ("SD1.5 base 512px b155 splash, v5p 8", _plan("sd15", "v5p:2x2x2", 155, *SPLASH)),
    "f49": ("SD1.5 base 512px b154 splash, v5p 8", _plan("sd15", "v5p:2x2x2", 154, *SPLASH)),
    "f50": ("SD1.5 base 512px b112 diffusers, v5p 8", _plan("sd15", "v5p:2x2x2", 112)),
    "f51": ("SD1.5 base 512px b28 diffusers, v6e 8", _plan("sd15", "v6e:2x4", 28)),
    "f52": ("SD1.5 base 512px b64 splash, v6e 8", _plan("sd15", "v6e:2x4", 64, *SPLASH)),
    "f53": ("SD1.5 Plus 512px b154 splash, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 154, *SPLASH)),
    "f54": ("SD1.5 base 512px b27 diffusers, v6e 8", _plan("sd15", "v6e:2x4", 27)),
    "f55": ("SD1.5 base 512px b120 diffusers, v5p 8", _plan("sd15", "v5p:2x2x2", 120)),
    "f56": ("SD1.5 Plus 512px b155 splash, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 155, *SPLASH)),
    "f57": ("SD1.5 base 512px b119 diffusers, v5p 8", _plan("sd15", "v5p:2x2x2", 119)),
    "f58": ("SD1.5 Plus 512px b120 diffusers, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 120)),
    "f59": ("SD1.5 base 512px b80 splash, v6e 8", _plan("sd15", "v6e:2x4", 80, *SPLASH)),
    "f60": ("SD1.5 base 512px b72 splash, v6e 8", _plan("sd15", "v6e:2x4", 72, *SPLASH)),
    "f61": ("SD1.5 base 512px b68 splash, v6e 8", _plan("sd15", "v6e:2x4", 68, *SPLASH)),
    "f62": ("SD1.5 Plus 512px b116 diffusers, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 116)),
    "f63": ("SD1.5 base 512px b116 diffusers, v5p 8", _plan("sd15", "v5p:2x2x2", 116)),
    "f64": ("SD1.5 base 512px b66 splash, v6e 8", _plan("sd15", "v6e:2x4", 66, *SPLASH)),
    "f65": ("SD1.5 Plus 512px b118 diffusers, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 118)),
    "f66": ("SD1.5 base 512px b65 splash, v6e 8", _plan("sd15", "v6e:2x4", 65, *SPLASH)),
    "f67": ("SD1.5 Plus 512px b117 diffusers, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 117)),
    "f68": ("SD1.5 base 512px b118 diffusers, v5p 8", _plan("sd15", "v5p:2x2x2", 118)),
    "f69": ("SD1.5 Plus 512px b64 splash, v6e 8", _plan("sd15_plus", "v6e:2x4", 64, *SPLASH)),
    "f70": ("SD1.5 Plus 512px b62 splash, v6e 8", _plan("sd15_plus", "v6e:2x4", 62, *SPLASH)),
    "f71": ("SD1.5 Plus 512px b27 diffusers, v6e 8", _plan("sd15_plus", "v6e:2x4", 27)),
    "f72": ("SD1.5 Plus 512px b158 splash, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 158, *SPLASH)),
    "f73": ("SD1.5 Plus 512px b24 diffusers, v6e 8", _plan("sd15_plus", "v6e:2x4", 24)),
    "f74": ("SD1.5 Plus 512px b164 splash, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 164, *SPLASH)),
    "f75": ("SD1.5 Plus 512px b160 splash, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 160, *SPLASH)),
    "f76": ("SDXL base 1024px b20 diffusers fsdp8, v5p 8", _sdxl("v5p:2x2x2", 20)),
    "f77": ("SD1.5 Plus 512px b26 diffusers, v6e 8", _plan("sd15_plus", "v6e:2x4", 26)),
    "f78": ("SD1.5 Plus 512px b159 splash, v5p 8", _plan("sd15_plus", "v5p:2x2x2", 159, *SPLASH)),
    "f79": ("SD1.5 Plus 512px b63 splash, v6e 8", _plan("sd15_plus", "v6e:2x4", 63, *SPLASH)),
    "f80": ("SD1.5 Plus 512px b56 splash, v6e 8", _plan("sd15_plus", "v6e:2x4", 56, *SPLASH)),
    "f81": ("SD1.5 Plus 512px b48 splash, v6e 8", _plan("sd15_plus", "v6e:2x4", 48, *SPLASH)),
    "f82": ("SDXL base 1024px b24 diffusers fsdp8, v5p 8", _sdxl("v5p:2x2x2", 24)),
    "f83": ("SDXL base 1024px b32 diffusers fsdp8, v5p 8", _sdxl("v5p:2x2x2", 32)),
    "f84": ("SDXL base 1024px b28 diffusers fsdp8, v5p 8", _sdxl("v5p:2x2x2", 28)),
    "f85": ("SDXL base 1024px b30 diffusers fsdp8, v5p 8", _sdxl("v5p:2x2x2", 30)),
    "f86": ("SDXL base 1024px b31 diffusers fsdp8, v5p 8", _sdxl("v5p:2x2x2", 31)),
    "f87": ("SD1.5 base 512px b8 splash fsdp8, v5p 8", _plan("sd15", "v5p:2x2x2", 8, *SPLASH, *FSDP8, *SPLIT_ALL)),
    "f88": ("SD1.5 base 512px b8 splash fsdp8, v5p 256", _plan("sd15", "v5p:4x8x8", 8, *SPLASH, *FSDP8, *SPLIT_ALL)),
    "f89": ("SDXL base 1024px b22 splash fsdp8, v5p 256", _sdxl("v5p:4x8x8", 22, *SPLASH)),
    "f90": ("SD1.5 base 512px b42 splash fsdp8, v5e 8", _plan("sd15", "v5e:2x4", 42, *SPLASH, *FSDP8, *SPLIT_ALL)),
    "f91": ("SD1.5 base 512px b25 splash fsdp8, v5e 8", _plan("sd15", "v5e:2x4", 25, *SPLASH, *FSDP8, *SPLIT_ALL)),
    "f92": ("SDXL base 1024px b24 splash fsdp8, v5p 256", _sdxl("v5p:4x8x8", 24, *SPLASH)),
    "f93": ("SDXL base 1024px b25 splash fsdp8, v5p 256", _sdxl("v5p:4x8x8", 25, *SPLASH)),
    "f94": ("SDXL base 1024px b28 diffusers fsdp8, v5p 256", _sdxl("v5p:4x8x8", 28)),
    "f95": ("SDXL base 1024px b18 diffusers fsdp8, v5p 256", _sdxl("v5p:4x8x8", 18)),
    "f96": ("SDXL base 1024px b23 diffusers fsdp8, v5p 256", _sdxl("v5p:4x8x8", 23)),
    "f97": ("SDXL base 1024px b25 diffusers fsdp8, v5p 256", _sdxl("v5p:4x8x8", 25)),
    "f98": ("SDXL base 1024px b26 diffusers fsdp8, v5p 256", _sdxl("v5p:4x8x8", 26)),
    "f99": ("SDXL base 1024px b27 diffusers fsdp8, v5p 256", _sdxl("v5p:4x8x8", 27)),
    "f100": ("SDXL base 1024px b3 splash fsdp8, v5e 256", _sdxl("v5e:16x16", 3, *SPLASH)),
    "f101": ("SD1.5 Plus 512px b60 splash, v6e 8", _plan("sd15_plus", "v6e:2x4", 60, *SPLASH)),
    "f102": ("SD1.5 Plus 512px b61 splash, v6e 8", _plan("sd15_plus", "v6e:2x4", 61, *SPLASH)),
    "f103": ("SD1.5 base 512px b8 splash fsdp8, v6e 8", _plan("sd15", "v6e:2x4", 8, *SPLASH, *FSDP8, *SPLIT_ALL)),
    "f104": ("SD1.5 base 512px b8 splash fsdp8, v6e 256", _plan("sd15", "v6e:16x16", 8, *SPLASH, *FSDP8, *SPLIT_ALL)),
    "f105": ("SDXL base 1024px b2 diffusers fsdp8, v5e 8", _sdxl("v5e:2x4", 2)),
    "f106": ("SDXL base 1024px b6 diffusers fsdp8, v6e 256", _sdxl("v6e:16x16", 6)),
    "f107": ("SDXL base 1024px b7 diffusers fsdp8, v6e 256", _sdxl("v6e:16x16", 7)),
    "f108": ("SDXL base 1024px b2 diffusers fsdp8, v5e 256", _sdxl("v5e:16x16", 2)),
    "f109": ("SDXL base 1024px b3 diffusers fsdp8, v5e 256", _sdxl("v5e:16x16", 3)),
    "f110": ("SDXL base 1024px b3 diffusers fsdp8, v5e 8", _sdxl("v5e:2x4", 3)),
    "f111": ("SDXL base 1024px b5 diffusers fsdp8, v5e 8", _sdxl("v5e:2x4", 5)),
    "f112": ("SDXL base 1024px b4 diffusers fsdp8, v5e 8", _sdxl("v5e:2x4", 4)),
    "f113": ("SDXL base 1024px b4 diffusers fsdp8, v5e 256", _sdxl("v5e:16x16", 4)),
    "g1": (
        "SD1.5 base 512px b8 splash fsdp8, v5e 256, all-gather collective matmul post_spmd",
        ["--config", "sd15", "--topology", "v5e:16x16", *SPLASH, *FSDP8, *SPLIT_ALL],
    ),
}

# LIBTPU_INIT_ARGS of the cases that set the TPU compiler's flags (the rest: libtpu's defaults)
LIBTPU_FLAGS = {"g1": "--xla_tpu_all_gather_collective_matmul_mode=post_spmd"}


def run_case(case: str, timeout: float) -> dict:
    """One `ipadapter-jax plan` subprocess; its JSON report plus the command, wall time, exit status and how busy
    the host was (`host_load`, see `_HostLoad`)."""
    _, args = CASES[case]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", LIBTPU_INIT_ARGS=LIBTPU_FLAGS.get(case, ""))
    with tempfile.TemporaryDirectory() as tmp, _HostLoad() as load:
        out = Path(tmp) / "plan.json"
        command = [sys.executable, "-m", "ipadapter_jax.cli.main", "plan", *args, "--json", str(out)]
        start = time.time()
        try:
            done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            status, stderr = done.returncode, done.stderr
        except subprocess.TimeoutExpired as err:
            status, stderr = "timeout", (err.stderr or b"").decode() if isinstance(err.stderr, bytes) else ""
        result = {"args": args, "exit_status": status, "wall_s": round(time.time() - start, 1)}
        if out.is_file():
            result["report"] = json.loads(out.read_text())
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        if errors:
            result["error"] = errors[-1]
    result["host_load"] = load.summary(result["wall_s"])
    return result


class _HostLoad:
    """How much of the host other work took while a case compiled: the 1-minute load average sampled every 15 s,
    less the compile's own CPU seconds per wall second. `other` >= 0.5 (half a core busy elsewhere) marks the
    compile time as shared (`*` in the tables)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.wait(15):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> _HostLoad:
        self.cpu_start = _children_cpu_s()
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join()
        self.cpu_s = _children_cpu_s() - self.cpu_start

    def summary(self, wall_s: float) -> dict:
        """{"load_mean", "own_cores", "other", "shared"}: mean load, the compile's cores, the rest, other >= 0.5."""
        mean = sum(self.samples) / len(self.samples) if self.samples else os.getloadavg()[0]
        own = self.cpu_s / max(wall_s, 1e-9)
        other = max(0.0, mean - own)
        return {
            "load_mean": round(mean, 2),
            "own_cores": round(own, 2),
            "other": round(other, 2),
            "shared": other >= 0.5,
        }


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _saved_cases() -> dict:
    """The cases bench/tpu_plan.json holds now (none before the first run)."""
    return json.loads(OUT.read_text())["cases"] if OUT.is_file() else {}


def _merge(case: str, result: dict) -> dict:
    """Writes one case's result into bench/tpu_plan.json as the file is now (another queue may have added cases
    since this one started), under a lock, atomically; returns the merged cases."""
    with open(OUT.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = _saved_cases()
        results[case] = result
        tmp = OUT.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"host": os.uname().nodename, "cases": results}, indent=1) + "\n")
        os.replace(tmp, OUT)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case ids (default: all)")
    parser.add_argument("--redo", action="store_true", help="recompile cases already in the JSON")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    parser.add_argument("--table", action="store_true", help="only print the table of the JSON")
    args = parser.parse_args()
    results = _saved_cases()
    if not args.table:
        for case in args.cases.split(","):
            if case in results and not args.redo:
                continue
            print(f"{case}: {CASES[case][0]} ...", flush=True)
            results[case] = run_case(case, args.timeout)
            report = results[case].get("report", {})
            print(
                f"{case}: exit {results[case]['exit_status']} in {results[case]['wall_s']:.0f}s; "
                f"fits {report.get('memory_per_chip', {}).get('fits')}",
                flush=True,
            )
            results = _merge(case, results[case])
    print(table(CASES, results))
    print()
    print(matrix(results))
    print()
    print(compiles(results))


if __name__ == "__main__":
    main()
