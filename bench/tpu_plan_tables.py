"""The tables of bench/tpu_plan.py's results (bench/tpu_plan.json): one row per case, and the README's two (a matrix
of model x kernel by topology, and one row per compile)."""

from __future__ import annotations

GiB = 2**30

# the README matrix's columns: (chip, number of chips)
COLUMNS = [("v5e", 8), ("v5e", 256), ("v5p", 8), ("v5p", 256), ("v6e", 8), ("v6e", 256)]


def table(cases: dict[str, tuple[str, list[str]]], results: dict) -> str:
    """Markdown table of the results, in the order of `cases` (id -> (description, plan arguments))."""
    rows = [
        "| case | what | fits | GiB/chip (headroom) | batch/chip | max batch/chip | MFU bound | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, (what, _) in cases.items():
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
        if memory["footprint"]:  # compiled: it fits, or XLA's buffers exceed the chip's HBM
            size = (
                f"{memory['footprint'] / GiB:.1f} GiB ({memory['arguments'] / GiB:.1f} + "
                f"{memory['temporaries'] / GiB:.1f}) of {memory['capacity'] / GiB:.0f}"
            )
        if memory["fits"]:
            fits = f"yes, {memory['headroom_pct']:.0f}% headroom"
            bound = "memory-bound" if roof["bound"] == "memory bandwidth" else "compute-bound"
            roofline = (
                f"{bound}: >= {1000 * roof['step_s_lower_bound']:.0f} ms/step, <= "
                f"{roof['images_per_s_upper_bound']:.0f} img/s, MFU <= {100 * roof['mfu_upper_bound']:.0f}%"
                + _undercount_mark(report)
            )
        elif memory["footprint"]:
            fits, roofline = f"no, {-memory['headroom_pct']:.1f}% over", ""
        elif memory.get("memory_space"):
            size, fits, roofline = f"XLA: out of {memory['memory_space']} memory (not HBM)", "no", ""
        else:
            size, fits, roofline = f"XLA: {memory['required'] / GiB:.2f} GiB required", "no", ""
        minutes = f"{report['compile_s'] / 60:.1f} min" + ("*" if load["shared"] else "")
        rows.append(
            f"| {_setting(report)} | {where} | `{report['model']['attention_implementation']}` | "
            f"{report['batch']['per_chip']} | {size} | {fits} | {roofline} | {minutes} |"
        )
    return "\n".join(rows)


def matrix(results: dict) -> str:
    """Markdown table for the README: a row per model and kernel as the presets run them (remat off, libtpu's
    default flags; the other compiles are in `compiles`), a column per chip at 8 and 256 chips (`COLUMNS`); each cell
    the preset's batch (8/chip): fits or not, HBM per chip and headroom, the roofline-bound MFU (‡: XLA's count,
    `_undercount_mark`), and the largest batch per chip as far as the compiled batches bracket it. A data-parallel
    row's 256-chip cell not compiled whose 8-chip cell is reads "as 8 chips†": data parallelism gives each chip the
    8-chip program (the README's footnote, from the compiled pairs), and a compiled one brackets its largest batch
    with the 8-chip compiles too. FSDP rows do not: their 256-chip program differs."""
    cells: dict[tuple[str, str], dict[tuple[str, int], dict[int, dict]]] = {}
    fsdp: dict[tuple[str, str], int] = {}
    for result in results.values():
        report = result.get("report")
        if not report or report["model"]["remat"] or report["topology"].get("libtpu_init_args"):
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
            slice_program = chips == 256 and (chip, 8) in row and fsdp[setting, attention] == 1
            if (chip, chips) not in row and slice_program:
                texts.append("as 8 chips†")
            else:
                texts.append(_cell(row.get((chip, chips), {}), row[chip, 8] if slice_program else {}))
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
    flags = report["topology"].get("libtpu_init_args")
    name += (f", fsdp {fsdp}" if fsdp > 1 else "") + (", remat" if model["remat"] else "")
    return name + (f", `LIBTPU_INIT_ARGS={flags}`" if flags else "")


def _undercount_mark(report: dict) -> str:
    """ "‡" where FLOPs and bytes may leave out loop trips: loops whose trip count the HLO did not state
    (`unknown_trip_counts`), or a report from before loops were counted per trip (`loop_trips`) whose program runs
    loops or, older still, is an FSDP program (where XLA makes collective-matmul loops)."""
    cost = report["cost_per_chip"]
    if "loop_trips" in cost:
        return "‡" if cost["unknown_trip_counts"] else ""
    loops = cost.get("while_loops")
    return "‡" if (loops if loops is not None else report["topology"]["mesh"]["fsdp"] > 1) else ""


def _cell(by_batch: dict[int, dict], slice_batches: dict[int, dict]) -> str:
    """One topology's compiles of one row: the batch-8 report (else the smallest batch's) and the max-batch bracket;
    a data-parallel 256-chip cell brackets with its 8-chip slice's compiles too (`slice_batches`; † where they
    narrow it)."""
    if not by_batch:
        return "not compiled"
    batch = 8 if 8 in by_batch else min(by_batch)
    memory, roof = by_batch[batch]["memory_per_chip"], by_batch[batch]["roofline"]
    if memory["fits"]:
        text = f"b{batch}: {memory['footprint'] / GiB:.1f} GiB ({memory['headroom_pct']:.0f}% free), MFU <= "
        text += f"{100 * roof['mfu_upper_bound']:.0f}%{_undercount_mark(by_batch[batch])}"
    elif memory["footprint"]:
        text = f"b{batch}: no ({memory['footprint'] / GiB:.1f} GiB of {memory['capacity'] / GiB:.0f})"
    elif memory.get("memory_space"):
        text = f"b{batch}: no (out of {memory['memory_space']} memory)"
    else:
        text = f"b{batch}: no ({memory['required'] / GiB:.1f} GiB needed)"
    bracket, with_slice = _max_batch(by_batch), _max_batch({**slice_batches, **by_batch})
    if bracket and with_slice != bracket:
        bracket = with_slice + "†"
    return text + (f"; max batch {bracket}" if bracket else "")


def _max_batch(by_batch: dict[int, dict]) -> str:
    """ "17", "2-7" or ">= 8": the largest batch that fits as far as the compiled batches bracket it ("" if none
    fits)."""
    fitting = [b for b, r in by_batch.items() if r["memory_per_chip"]["fits"]]
    if not fitting:
        return ""
    low = max(fitting)
    failing = [b for b, r in by_batch.items() if not r["memory_per_chip"]["fits"] and b > low]
    if not failing:
        return f">= {low}"
    return f"{low}" if min(failing) == low + 1 else f"{low}-{min(failing) - 1}"
