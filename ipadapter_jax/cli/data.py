"""`ipadapter-jax data ...` commands (also `python -m ipadapter_jax.cli.data ...`).

build --json captions.json --root images/ --out DIR   build the TFDS dataset (see ipadapter_jax/data/builder.py)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ipadapter_jax.cli.main import ArgumentParser, exit_process, finite_float, positive_int, report_errors


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def aspect_ratio(text: str) -> float:
    """argparse type: a finite number >= 1 (long side / short side)."""
    value = finite_float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (long side / short side), got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="ipadapter-jax data", description="IP-Adapter training data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build",
        help="build a TFDS (array_record) dataset from image-caption annotations",
        description="Builds DIR/ip_adapter_captions/1.0.0 from a reference JSON list "
        '([{"image_file": ..., "text": ...}]) or a COCO captions file, skipping bad entries; '
        "every skipped entry and its reason is listed in DIR/build_report.json. Streams to disk shard by shard "
        "with bounded memory; an interrupted build (even killed) resumes when the same command is run again. "
        "One build at a time per DIR (a lock file).",
    )
    build.add_argument("--json", required=True, help="annotations: reference JSON list or COCO captions file")
    build.add_argument("--root", required=True, help="folder the image paths are relative to")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument(
        "--max-skip-fraction", type=fraction, default=0.05, help="fail when more entries are skipped (default 0.05)"
    )
    build.add_argument(
        "--max-aspect-ratio",
        type=aspect_ratio,
        default=20.0,
        help="skip images with long/short side above (>= 1, default 20)",
    )
    build.add_argument("--threads", type=positive_int, default=8, help="image decoding threads (default 8)")
    build.add_argument(
        "--shard-examples", type=positive_int, default=10_000, help="examples per shard at most (default 10000)"
    )
    build.add_argument(
        "--shard-mib", type=positive_float, default=128.0, help="MiB of records per shard at most (default 128)"
    )
    build.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing dataset in --out, and discard a partial build made with other settings",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from ipadapter_jax import paths

    paths.check_storage([args.json, args.root, args.out])
    from ipadapter_jax.data import builder  # after parsing: `--help` stays fast

    path, report = builder.build_dataset(
        args.json,
        args.root,
        args.out,
        max_skip_fraction=args.max_skip_fraction,
        max_aspect_ratio=args.max_aspect_ratio,
        num_threads=args.threads,
        overwrite=args.overwrite,
        shard_examples=args.shard_examples,
        shard_bytes=max(1, int(args.shard_mib * 2**20)),
        progress=not args.no_progress,
    )
    print(f"dataset: {path}")
    if report["resumed_from_entry"]:
        print(f"resumed an interrupted build after entry {report['resumed_from_entry']}")
    print(f"entries: {report['total']}  written: {report['written']}  converted to RGB: {report['converted']}")
    print(f"skipped: {report['skipped']}" + "".join(f"\n  {k}: {n}" for k, n in sorted(report["skip_counts"].items())))
    print(f"report: {paths.join(path, builder.REPORT_NAME)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a data command; returns the exit status (`ipadapter_jax.cli.main`'s codes)."""
    return report_errors(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    exit_process(main())
