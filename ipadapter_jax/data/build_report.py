"""The build report: what the build kept, converted and skipped (every skipped entry with its reason).

Memory does not grow with the dataset: counts are kept in memory, the entries of the shard being written too,
and those of complete shards live in the staging's progress file, from which `write` streams the JSON.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

RETURNED_EXAMPLES = 100_000  # `returned()` lists at most this many skipped / converted entries each ...
SMALL_REPORT_BYTES = 64 << 20  # ... of a report file above this size (a smaller one is returned whole)


def printable(value: Any) -> Any:
    """`value` for the JSON report: undecodable bytes of a string shown as \\xNN escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


class BuildReport:
    """Counts of the whole build, entries of the shard being written (`take()` hands them to the progress file)."""

    def __init__(self, annotations: str, image_root: str, total: int, max_skip_fraction: float, reasons: dict):
        self.annotations, self.image_root, self.total = annotations, image_root, total
        self.max_skip_fraction, self.reasons = max_skip_fraction, reasons
        self.written = self.converted = self.resumed_from_entry = 0
        self.skip_counts: collections.Counter = collections.Counter()
        self.status = "running"
        self._skipped: list[dict] = []
        self._converted: list[dict] = []
        self._shard_counts: collections.Counter = collections.Counter()

    def restore(self, shards: list[dict], next_entry: int) -> None:
        """Counts of the complete shards of a resumed build."""
        for shard in shards:
            self.written += shard["examples"]
            self.converted += shard["converted_count"]
            self.skip_counts.update(shard["skip_counts"])
        self.resumed_from_entry = next_entry

    @property
    def skipped(self) -> int:
        return sum(self.skip_counts.values())

    def add(self, checked: Any) -> None:
        """Counts a checked entry (`builder.Checked`)."""
        entry = checked.entry
        if checked.reason:
            self.skip_counts[checked.reason] += 1
            self._shard_counts[checked.reason] += 1
            self._skipped.append({"index": entry.index, "image_file": printable(entry.image_file),
                                  "text": printable(entry.text), "reason": checked.reason,
                                  "detail": checked.detail})  # fmt: skip
            return
        self.written += 1
        if checked.converted_from:
            self.converted += 1
            self._converted.append({"index": entry.index, "image_file": entry.image_file,
                                    "from": checked.converted_from})  # fmt: skip

    def pending(self) -> int:
        """Entries held for the shard being written."""
        return len(self._skipped) + len(self._converted)

    def take(self) -> dict:
        """The entries of the shard being written, for its progress record; starts the next shard."""
        items = {"skipped": self._skipped, "converted": self._converted, "converted_count": len(self._converted),
                 "skip_counts": dict(self._shard_counts)}  # fmt: skip
        self._skipped, self._converted, self._shard_counts = [], [], collections.Counter()
        return items

    def too_many_skipped(self) -> bool:
        return self.skipped > self.max_skip_fraction * self.total

    def summary(self) -> dict:
        return {
            "status": self.status,
            "annotations": self.annotations,
            "image_root": self.image_root,
            "total": self.total,
            "written": self.written,
            "skipped": self.skipped,
            "skip_counts": dict(self.skip_counts),
            "converted": self.converted,
            "max_skip_fraction": self.max_skip_fraction,
            "resumed_from_entry": self.resumed_from_entry,
            "skip_reasons": self.reasons,
        }

    def write(self, path: str, committed: Callable[[str], Iterator[dict]]) -> None:
        """Writes the report to `path` atomically; `committed(kind)` yields the complete shards' entries."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(json.dumps(self.summary(), indent=1)[:-2])  # without the closing "\n}"
            for kind, pending in (("skipped", self._skipped), ("converted", self._converted)):
                f.write(f',\n "{kind}_examples": [')
                for i, item in enumerate(_chain(committed(kind), pending)):
                    f.write(("\n  " if i == 0 else ",\n  ") + json.dumps(item))
                f.write("\n ]")
            f.write("\n}\n")
        os.replace(tmp, path)


def _chain(first: Iterator[dict], second: list[dict]) -> Iterator[dict]:
    yield from first
    yield from second


def returned(path: str) -> dict:
    """The report file as a dict, with at most `RETURNED_EXAMPLES` entries in each list (the file has all;
    `examples_truncated` says when the dict has fewer)."""
    if os.path.getsize(path) <= SMALL_REPORT_BYTES:
        with open(path) as f:
            report = json.load(f)
        report["examples_truncated"] = False
        return report
    head, lists = [], {"skipped_examples": [], "converted_examples": []}
    current = None
    with open(path) as f:  # the layout `write` produces: the summary, then one list entry per line
        for line in f:
            if line.startswith((' "skipped_examples"', ' "converted_examples"')):
                current = lists[line.split('"')[1]]
            elif current is None:
                head.append(line)
            elif line.startswith("  {") and len(current) < RETURNED_EXAMPLES:
                current.append(json.loads(line.strip().rstrip(",")))
    report = json.loads("".join(head).rstrip().rstrip(",") + "}")
    return {**report, **lists, "examples_truncated": True}
