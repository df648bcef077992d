"""TPU plans of the presets: `ipadapter-jax plan` compiled on this CPU host for v5e, v5p and v6e topologies.

    python bench/tpu_plan.py                    # every case not yet in bench/tpu_plan.json, in priority order
    python bench/tpu_plan.py --cases a1,b1      # some cases (ids below); --redo recompiles cases already there
    python bench/tpu_plan.py --table            # only print the tables of bench/tpu_plan.json

Each case is one `ipadapter-jax plan` subprocess (the user's command, with its JSON report), run one at a time with
a time limit; results are merged into bench/tpu_plan.json after every case, so an interrupted run keeps what it
finished, and prints three tables: one row per case, then the README's two (a matrix of model x kernel by topology,
and one row per compile). Each case records how busy the host was while it compiled (`host_load`): a compile that
shared the 2 cores with other work is marked `*`. Cases, in priority order (SD1.5 at 512 px and SDXL at 1024 px,
bf16 compute, fp32 params, embedding-cache batches):

  a   SD1.5 base, batch 8/chip, splash, v5e 8 chips: does it fit with >= 25% headroom?
  b   largest batch per chip, default (diffusers) vs splash attention, SD1.5 base on v5e 8 chips (single batches;
      `--batch-per-chip auto` bisects: several compiles each)
  c   SDXL base, batch 8/chip on v5p 8 chips with the frozen params FSDP-split (the sdxl preset's rules), and
      what it takes on v5e
  d   the rest: SD1.5 base and Plus, SDXL, both kernels, on v5e / v5p / v6e at 8 and 256 chips
  e   SD1.5 with every param FSDP-split over 8 chips, on 8 and 256 chips: the same step's FLOPs with and without
      XLA's collective-matmul loops

Needs libtpu (`pip install "jax[tpu]==0.10.2"`). Compiles take minutes each on 2 cores (REFERENCE.md s.7).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "tpu_plan.json"
GiB = 2**30

SPLASH = ["--config.model.attention_implementation=splash"]
FSDP8 = ["--config.mesh.fsdp=8"]
REMAT = ["--config.model.remat=True"]
SPLIT_ALL = ['--config.sharding_rules=((".*", "fsdp"),)']  # frozen params FSDP-split too (sd15 replicates them)


def _sd15_v5e(batch: int, *attention: str) -> list[str]:
    """SD1.5 on v5e:2x4 at `batch` per chip: the largest-batch search's compiles."""
    return ["--config", "sd15", "--topology", "v5e:2x4", "--batch-per-chip", str(batch), *attention]


def _sdxl(topology: str, batch: int, *options: str) -> list[str]:
    """SDXL with fsdp 8 on `topology` at `batch` per chip (default attention unless `options` say otherwise)."""
    return ["--config", "sdxl", "--topology", topology, "--batch-per-chip", str(batch), *FSDP8, *options]


# the README matrix's columns: (chip, number of chips)
COLUMNS = [("v5e", 8), ("v5e", 256), ("v5p", 8), ("v5p", 256), ("v6e", 8), ("v6e", 256)]

# id -> (description, plan arguments)
CASES: dict[str, tuple[str, list[str]]] = {
    "a1": ("SD1.5 base 512px b8 splash, v5e 8 chips", ["--config", "sd15", "--topology", "v5e:2x4", *SPLASH]),
    "b1": ("SD1.5 base 512px b18 splash, v5e 8", _sd15_v5e(18, *SPLASH)),
    "b2": ("SD1.5 base 512px b10 diffusers, v5e 8", _sd15_v5e(10)),
    "b3": ("SD1.5 base 512px b18 diffusers, v5e 8", _sd15_v5e(18)),
    "b4": ("SD1.5 base 512px b16 diffusers, v5e 8", _sd15_v5e(16)),
    "b5": ("SD1.5 base 512px b20 splash, v5e 8", _sd15_v5e(20, *SPLASH)),
    "b6": ("SD1.5 base 512px b17 diffusers, v5e 8", _sd15_v5e(17)),
    "b7": ("SD1.5 base 512px b34 splash, v5e 8", _sd15_v5e(34, *SPLASH)),
    "b8": ("SD1.5 base 512px b33 splash, v5e 8", _sd15_v5e(33, *SPLASH)),
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
    "d26": (
        "SD1.5 base 512px b64 splash, v5p 8",
        ["--config", "sd15", "--topology", "v5p:2x2x2", "--batch-per-chip", "64", *SPLASH],
    ),
    "d27": (
        "SD1.5 base 512px b32 splash, v6e 8",
        ["--config", "sd15", "--topology", "v6e:2x4", "--batch-per-chip", "32", *SPLASH],
    ),
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
}


def run_case(case: str, timeout: float) -> dict:
    """One `ipadapter-jax plan` subprocess; its JSON report plus the command, wall time, exit status and how busy
    the host was (`host_load`, see `_HostLoad`)."""
    _, args = CASES[case]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
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


def table(results: dict) -> str:
    """Markdown table of the results, in case order."""
    rows = [
        "| case | what | fits | GiB/chip (headroom) | batch/chip | max batch/chip | MFU bound | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, (what, _) in CASES.items():
        if case not in results:
            rows.append(f"| {case} | {what} | not run | | | | | |")
            continue
        result = results[case]
        report = result.get("report")
        if not report:
            rows.append(
                f"| {case} | {what} | {result.get('error', result['exit_status'])} | | | | | "
                f"{result['wall_s']:.0f} (wall) |"
            )
            continue
        memory, roof = report["memory_per_chip"], report["roofline"]
        used = memory.get("footprint", memory["total"])
        size = "-" if used is None else f"{used / GiB:.2f} ({memory['headroom_pct']:.0f}%)"
        auto = report.get("auto", {}).get("max_batch_per_chip", "")
        mfu = "-" if roof["mfu_upper_bound"] is None else f"{100 * roof['mfu_upper_bound']:.0f}%"
        compiles = report.get("auto", {}).get("tried") or [{"compile_s": report["compile_s"]}]
        seconds = "+".join(f"{t['compile_s']:.0f}" for t in compiles)
        rows.append(
            f"| {case} | {what} | {'yes' if memory['fits'] else 'no'} | {size} | "
            f"{report['batch']['per_chip']} | {auto} | {mfu} | {seconds} |"
        )
    return "\n".join(rows)


def compiles(results: dict) -> str:
    """Markdown table for the README, one row per compiled case: model, topology, attention, batch, HBM per chip
    (arguments + temporaries), fits, the roofline bound and the compile time (`*`: the host was shared)."""
    rows = [
        "| model | topology | attention | batch/chip | HBM per chip (args + temps) | fits | "
        "roofline bound (not a measurement) | compile |",
        "|---|---|---|---|---|---|---|---|",
    ]
    reports = [(result["report"], result["host_load"]) for result in results.values() if "report" in result]
    for report, load in sorted(reports, key=lambda item: _compile_order(item[0])):
        topology, memory, roof = report["topology"], report["memory_per_chip"], report["roofline"]
        chips, hosts = topology["chips"] * topology["num_slices"], topology["hosts"] * topology["num_slices"]
        where = f"{topology['name']} ({chips} chips" + (f", {hosts} hosts)" if hosts > 1 else ")")
        if memory["fits"]:
            size = (
                f"{memory['footprint'] / GiB:.1f} GiB ({memory['arguments'] / GiB:.1f} + "
                f"{memory['temporaries'] / GiB:.1f}) of {memory['capacity'] / GiB:.0f}"
            )
            fits = f"yes, {memory['headroom_pct']:.0f}% headroom"
            bound = "memory-bound" if roof["bound"] == "memory bandwidth" else "compute-bound"
            roofline = (
                f"{bound}: >= {1000 * roof['step_s_lower_bound']:.0f} ms/step, <= "
                f"{roof['images_per_s_upper_bound']:.0f} img/s, MFU <= {100 * roof['mfu_upper_bound']:.0f}%"
                + _undercount_mark(report)
            )
        else:
            size, fits, roofline = f"XLA: {memory['required'] / GiB:.2f} GiB required", "no", ""
        minutes = f"{report['compile_s'] / 60:.1f} min" + ("*" if load["shared"] else "")
        rows.append(
            f"| {_setting(report)} | {where} | `{report['model']['attention_implementation']}` | "
            f"{report['batch']['per_chip']} | {size} | {fits} | {roofline} | {minutes} |"
        )
    return "\n".join(rows)


def matrix(results: dict) -> str:
    """Markdown table for the README: a row per model and kernel as the presets run them (remat off; remat's
    compiles are in `compiles`), a column per chip at 8 and 256 chips (`COLUMNS`); each cell the preset's batch
    (8/chip): fits or not, HBM per chip and headroom, the roofline-bound MFU (‡: XLA's count, `_undercount_mark`),
    and the largest batch per chip as far as the compiled batches bracket it. A data-parallel row's 256-chip cell
    not compiled whose 8-chip cell is reads "as 8 chips†": data parallelism gives each chip the 8-chip program (the
    README's footnote, from the compiled pairs). FSDP rows do not: their 256-chip program differs."""
    cells: dict[tuple[str, str], dict[tuple[str, int], dict[int, dict]]] = {}
    fsdp: dict[tuple[str, str], int] = {}
    for result in results.values():
        report = result.get("report")
        if not report or report["model"]["remat"]:
            continue
        row = (_setting(report), report["model"]["attention_implementation"])
        cells.setdefault(row, {}).setdefault(_chip(report), {})[report["batch"]["per_chip"]] = report
        fsdp[row] = report["topology"]["mesh"]["fsdp"]
    lines = [
        "| model | attention | " + " | ".join(f"{chip}, {chips} chips" for chip, chips in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for setting, attention in sorted(cells):
        row = cells[setting, attention]
        texts = []
        for chip, chips in COLUMNS:
            if (chip, chips) not in row and chips == 256 and (chip, 8) in row and fsdp[setting, attention] == 1:
                texts.append("as 8 chips†")
            else:
                texts.append(_cell(row.get((chip, chips), {})))
        lines.append(f"| {setting} | `{attention}` | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def _compile_order(report: dict) -> tuple:
    """Model and setting, chip, number of chips, attention, batch."""
    return _setting(report), _chip(report), report["model"]["attention_implementation"], report["batch"]["per_chip"]


def _chip(report: dict) -> tuple[str, int]:
    """("v5e", 256): the chip generation and the number of chips over all slices."""
    topology = report["topology"]
    return topology["name"].split(":")[0], topology["chips"] * topology["num_slices"]


def _setting(report: dict) -> str:
    """ "SD1.5 512 px, base" or "SDXL 1024 px, base, fsdp 8, remat": the model and what was done to fit it."""
    model, fsdp = report["model"], report["topology"]["mesh"]["fsdp"]
    name = f"{'SDXL' if model['architecture'] == 'sdxl' else 'SD1.5'} {model['resolution']} px, {model['adapter_kind']}"
    return name + (f", fsdp {fsdp}" if fsdp > 1 else "") + (", remat" if model["remat"] else "")


def _undercount_mark(report: dict) -> str:
    """ "‡" where FLOPs and bytes may leave out loop trips: loops whose trip count the HLO did not state
    (`unknown_trip_counts`), or a report from before loops were counted per trip (`loop_trips`) whose program runs
    loops or, older still, is an FSDP program (where XLA makes collective-matmul loops)."""
    cost = report["cost_per_chip"]
    if "loop_trips" in cost:
        return "‡" if cost["unknown_trip_counts"] else ""
    loops = cost.get("while_loops")
    return "‡" if (loops if loops is not None else report["topology"]["mesh"]["fsdp"] > 1) else ""


def _cell(by_batch: dict[int, dict]) -> str:
    """One topology's compiles of one row: the batch-8 report (else the smallest batch's) and the max-batch bracket."""
    if not by_batch:
        return "not compiled"
    batch = 8 if 8 in by_batch else min(by_batch)
    memory, roof = by_batch[batch]["memory_per_chip"], by_batch[batch]["roofline"]
    if memory["fits"]:
        text = f"b{batch}: {memory['footprint'] / GiB:.1f} GiB ({memory['headroom_pct']:.0f}% free), MFU <= "
        text += f"{100 * roof['mfu_upper_bound']:.0f}%{_undercount_mark(by_batch[batch])}"
    else:
        text = f"b{batch}: no ({memory['required'] / GiB:.1f} GiB needed)"
    fitting = [b for b, r in by_batch.items() if r["memory_per_chip"]["fits"]]
    if fitting:
        low = max(fitting)
        failing = [b for b, r in by_batch.items() if not r["memory_per_chip"]["fits"] and b > low]
        if not failing:
            text += f"; max batch >= {low}"
        elif min(failing) == low + 1:
            text += f"; max batch {low}"
        else:
            text += f"; max batch {low}-{min(failing) - 1}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case ids (default: all)")
    parser.add_argument("--redo", action="store_true", help="recompile cases already in the JSON")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    parser.add_argument("--table", action="store_true", help="only print the table of the JSON")
    args = parser.parse_args()
    results = json.loads(OUT.read_text())["cases"] if OUT.is_file() else {}
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
            tmp = OUT.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"host": os.uname().nodename, "cases": results}, indent=1) + "\n")
            os.replace(tmp, OUT)
    print(table(results))
    print()
    print(matrix(results))
    print()
    print(compiles(results))


if __name__ == "__main__":
    main()
