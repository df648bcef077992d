"""`ipadapter-jax plan`: compile a config's training step for a TPU topology on this host; memory, FLOPs, bounds.

    ipadapter-jax plan --config sd15 --topology v5e:2x4 [--config.model.attention_implementation=splash]
    ipadapter-jax plan --config sdxl --topology v5p:2x2x2 --config.mesh.fsdp=8 --batch-per-chip auto --json plan.json
    ipadapter-jax plan --config sd15 --topology v5e:16x16 --num-slices 2

The step is the one `ipadapter-jax train` runs with the same flags (`ipadapter_jax.training.plan`), built from
shapes alone: the config's folders' config.json files, or `model.architecture`'s published shapes when
`model.base` / `model.image_encoder` are empty. Needs libtpu (`pip install "jax[tpu]==0.10.2"`); runs on the CPU
(JAX_PLATFORMS=cpu unless set), so it never touches a TPU a training job is using. Sizes are per chip; a batch that
does not fit is reported (exit status 0); with `--batch-per-chip auto`, batch 1 not fitting is an error (1).
The TPU compiler's flags in LIBTPU_INIT_ARGS (as a TPU VM's training job would have them) apply to the compile and
are in the report.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from ipadapter_jax.cli import run_flags
from ipadapter_jax.cli.main import UsageError, report_errors

GiB = 2**30


def run(argv: list[str]) -> int:
    argv = [_dashes(arg) for arg in argv]
    flag_values = flags.FlagValues()
    run_flags.define(flag_values, "plan", argv)
    flags.DEFINE_string(
        "topology",
        None,
        "TPU topology, e.g. v5e:2x4, v5e:16x16, v5p:2x2x2, v6e:16x16, v4:2x2x2",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "num_slices", 1, "slices joined by the data-center network (the data axis spans them)", flag_values=flag_values
    )
    flags.DEFINE_string(
        "batch_per_chip",
        None,
        "N, or auto: bisect for the largest that fits (default: the config's data.batch_size_per_device)",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "max_batch_per_chip", 64, "the largest batch --batch-per-chip auto tries", flag_values=flag_values
    )
    flags.DEFINE_bool(
        "raw",
        False,
        "the step encodes raw batches (default: embedding-cache batches, unless data.path is a raw dataset)",
        flag_values=flag_values,
    )
    flags.DEFINE_string("json", None, "also write the report to this JSON file", flag_values=flag_values)
    run_flags.parse(flag_values, "plan", argv)
    if not flag_values.topology:
        raise UsageError("--topology is required (e.g. --topology v5e:2x4)")
    batch = _batch_per_chip(flag_values.batch_per_chip)
    if flag_values.max_batch_per_chip < 1:
        raise UsageError(f"--max-batch-per-chip must be >= 1, got {flag_values.max_batch_per_chip}")
    config = run_flags.train_config(flag_values)  # validated before anything is built

    import jax

    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")  # compile only: leave any TPU of this host to training jobs
    from ipadapter_jax.training.accelerators import tpu_topology

    topology = tpu_topology(flag_values.topology, flag_values.num_slices)  # an unknown name: before the models load
    import ipadapter_jax  # noqa: F401  (the log filter, before the models are imported)
    from ipadapter_jax.training.plan import plan

    report = plan(
        config,
        topology,
        batch,
        cached=False if flag_values.raw else None,
        limit=flag_values.max_batch_per_chip,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(format_report(report))
    if flag_values.json:
        from ipadapter_jax.weights.atomic_write import atomic_output

        with atomic_output(flag_values.json) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def format_report(report: dict) -> str:
    """The report as lines a person reads (sizes in GiB per chip; bounds marked as bounds)."""
    from ipadapter_jax.training.plan import out_of_memory  # jax is loaded by now: `plan` made the report

    topo, model, batch = report["topology"], report["model"], report["batch"]
    memory, roof, cost = report["memory_per_chip"], report["roofline"], report["cost_per_chip"]
    mesh = " x ".join(f"{axis} {size}" for axis, size in topo["mesh"].items())
    lines = [
        f"topology  {topo['name']} x{topo['num_slices']} slice(s): {topo['chips']} chips ({topo['device_kind']}), "
        f"{topo['hosts']} hosts of {topo['chips_per_host']}; mesh {mesh}"
        + (f"; LIBTPU_INIT_ARGS {topo['libtpu_init_args']}" if topo.get("libtpu_init_args") else ""),
        f"model     {model['base'] or model['architecture']} {model['adapter_kind']} adapter, "
        f"{model['resolution']} px, "
        f"{model['dtype']}, attention {model['attention_implementation']}"
        f"{' (chunked)' if model['memory_efficient_attention'] else ''}, remat {model['remat']}, "
        f"{model['data']} batches",
        f"batch     {batch['per_chip']} per chip, {batch['global']} global, {batch['per_host']} per host",
    ]
    if memory["footprint"] is None:
        lines.append(f"memory    does not fit: {out_of_memory(memory)}")
    else:
        lines.append(
            f"memory    {_gib(memory['footprint'])} of {_gib(memory['capacity'])} GiB per chip "
            f"({'fits' if memory['fits'] else 'DOES NOT FIT'}, headroom {memory['headroom_pct']}%): arguments "
            f"{_gib(memory['arguments'])} + temporaries {_gib(memory['temporaries'])} + outputs "
            f"{_gib(memory['outputs'])} - aliased {_gib(memory['aliased'])} = {_gib(memory['total'])}; "
            f"XLA peak {_gib(memory['xla_peak'])}"
        )
    if roof["step_s_lower_bound"]:
        lines += [
            f"cost      {cost['flops'] / 1e12:.2f} TFLOP and {cost['bytes_accessed'] / GiB:.1f} GiB accessed per chip "
            f"per step (XLA's cost analysis{_loops(cost)})",
            f"bounds    step >= {roof['step_s_lower_bound'] * 1e3:.1f} ms ({roof['bound']}-bound at datasheet "
            f"peaks), so images/s <= {roof['images_per_s_upper_bound']:.0f} and MFU <= "
            f"{100 * roof['mfu_upper_bound']:.0f}% (bounds, not measurements)",
        ]
        if cost.get("unknown_trip_counts"):
            lines.append(
                f"note      {cost['unknown_trip_counts']} while loops state no trip count: counted once, so FLOPs, "
                "bytes and the bounds above undercount"
            )
    if "auto" in report:
        tried = ", ".join(f"{t['batch_per_chip']}{'' if t['fits'] else ' (no)'}" for t in report["auto"]["tried"])
        lines.append(
            f"auto      largest batch per chip that fits: {report['auto']['max_batch_per_chip']} "
            f"(tried {tried}; limit {report['auto']['limit']}); the best images/s bound of those that fit: batch "
            f"{report['auto']['fastest_batch_per_chip']} (near full HBM XLA recomputes to fit larger batches)"
        )
    lines.append(f"compile   {report['compile_s']:.0f}s for the reported batch; {report['total_s']:.0f}s in all")
    return "\n".join(lines)


def _loops(cost: dict) -> str:
    """How the while loops were counted (XLA counts a loop's body once; `loop_costs` once per trip)."""
    if not cost.get("while_loops"):
        return ""
    return (
        f"; its {cost['while_loops']} while loops' bodies counted once per trip, {cost['loop_trips']} trips: "
        f"XLA alone counts {cost['xla_flops'] / 1e12:.2f} TFLOP"
    )


def _gib(size: int | None) -> str:
    return "?" if size is None else f"{size / GiB:.2f}"


def _batch_per_chip(value: str | None) -> int | None:
    """--batch-per-chip: None (the config's), "auto" (0) or a positive integer."""
    if value is None:
        return None
    if value == "auto":
        return 0
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--batch-per-chip must be a positive integer or auto, got {value!r}")
    return int(value)


def _dashes(arg: str) -> str:
    """--num-slices -> --num_slices (absl flag names use underscores); --config.* overrides are left alone."""
    if not arg.startswith("--") or arg.startswith("--config"):
        return arg
    name, sep, value = arg[2:].partition("=")
    return f"--{name.replace('-', '_')}{sep}{value}"


def main(argv: list[str] | None = None) -> int:
    """`ipadapter-jax plan` entry point; returns the exit status."""
    return report_errors(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
