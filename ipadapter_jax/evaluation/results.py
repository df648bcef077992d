"""An evaluation run's folder: its files, the rows of results.csv, and the run's identity (run.json)."""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ipadapter_jax.weights.atomic_write import atomic_output

RUN_NAME = "run.json"
RESULTS_NAME = "results.csv"
SUMMARY_NAME = "summary.json"
SHEET_NAME = "contact_sheet.png"
SAMPLES_DIR = "samples"
RESULT_FIELDS = ("index", "image_file", "caption", "sample", "seed", "clip_i", "clip_t")
# What must agree between two runs for their rows to be paired: the same prompt images, noise and scorer.
PAIRING_KEYS = ("annotations", "image_root", "eval_clip", "seed", "num_samples", "height", "width")


@dataclasses.dataclass(frozen=True)
class Row:
    """One scored generated image (a line of results.csv)."""

    index: int
    image_file: str
    caption: str
    sample: int
    seed: int
    clip_i: float
    clip_t: float

    def csv_fields(self) -> list:
        """The row as results.csv writes it (`RESULT_FIELDS` order)."""
        return [
            self.index,
            self.image_file,
            self.caption,
            self.sample,
            self.seed,
            f"{self.clip_i:.8f}",
            f"{self.clip_t:.8f}",
        ]


def read_results(path: Path, num_samples: int) -> dict[int, list[Row]]:
    """The complete prompts of a results.csv: index -> its `num_samples` rows. A torn last line (no newline:
    the writer was killed mid-line) and prompts with missing or unreadable rows are dropped, and the file is
    rewritten without them so that appending continues from whole prompts."""
    if not path.is_file():
        return {}
    text = path.read_text()
    kept_text = text[: text.rfind("\n") + 1]
    groups: dict[int, list[Row]] = collections.defaultdict(list)
    broken = set()
    for record in csv.DictReader(kept_text.splitlines(keepends=True)):
        try:
            row = Row(
                int(record["index"]),
                record["image_file"],
                record["caption"],
                int(record["sample"]),
                int(record["seed"]),
                float(record["clip_i"]),
                float(record["clip_t"]),
            )
        except (TypeError, ValueError, KeyError):
            broken.add(record.get("index"))
            continue
        groups[row.index].append(row)
    complete = {
        index: sorted(rows, key=lambda r: r.sample)
        for index, rows in groups.items()
        if str(index) not in broken and sorted(r.sample for r in rows) == list(range(num_samples))
    }
    if len(complete) != len(groups) or broken or kept_text != text:
        write_rows(path, [row for index in sorted(complete) for row in complete[index]])
    return complete


def check_or_write_run(path: Path, run: dict) -> None:
    """First run: writes run.json. Later runs: refuse to mix results of different settings into one folder."""
    if not path.is_file():
        write_json(path, run)
        return
    stored = json.loads(path.read_text())
    differences = [
        f"{section}.{key}: {stored.get(section, {}).get(key)!r} -> {value!r}"
        for section in ("identity", "settings")
        for key, value in json.loads(json.dumps(run[section])).items()
        if stored.get(section, {}).get(key) != value
    ]
    if differences:
        raise ValueError(
            f"{path.parent} holds a run with other settings ({'; '.join(differences)}): use another output folder"
        )


def read_run(folder: Path) -> dict:
    """run.json flattened to the keys `PAIRING_KEYS` name (and every other identity/settings key)."""
    path = folder / RUN_NAME
    if not path.is_file():
        raise ValueError(f"{folder}: not an evaluation run folder (no {RUN_NAME})")
    stored = json.loads(path.read_text())
    return {**stored["identity"], **stored["settings"]}


def write_rows(path: Path, rows: Sequence[Row]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(RESULT_FIELDS)
        writer.writerows(row.csv_fields() for row in rows)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
