"""`ipadapter-jax data ...` commands (also `python -m ipadapter_jax.cli.data ...`).

build --json captions.json --root images/ --out DIR   build the TFDS dataset (see ipadapter_jax/data/builder.py)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ipadapter_jax.cli.main import ArgumentParser, report_errors


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="ipadapter-jax data", description="IP-Adapter training data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build",
        help="build a TFDS (array_record) dataset from image-caption annotations",
        description="Builds DIR/ip_adapter_captions/1.0.0 from a reference JSON list "
        '([{"image_file": ..., "text": ...}]) or a COCO captions file, skipping bad entries; '
        "every skipped entry and its reason is listed in DIR/build_report.json.",
    )
    build.add_argument("--json", required=True, help="annotations: reference JSON list or COCO captions file")
    build.add_argument("--root", required=True, help="folder the image paths are relative to")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument(
        "--max-skip-fraction", type=float, default=0.05, help="fail when more entries are skipped (default 0.05)"
    )
    build.add_argument(
        "--max-aspect-ratio", type=float, default=20.0, help="skip images with long/short side above (default 20)"
    )
    build.add_argument("--threads", type=int, default=8, help="image decoding threads (default 8)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    return parser


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from ipadapter_jax.data import builder  # after parsing: `--help` stays fast

    path, report = builder.build_dataset(
        args.json,
        args.root,
        args.out,
        max_skip_fraction=args.max_skip_fraction,
        max_aspect_ratio=args.max_aspect_ratio,
        num_threads=args.threads,
        overwrite=args.overwrite,
    )
    print(f"dataset: {path}")
    print(f"entries: {report['total']}  written: {report['written']}  converted to RGB: {report['converted']}")
    print(f"skipped: {report['skipped']}" + "".join(f"\n  {k}: {n}" for k, n in sorted(report["skip_counts"].items())))
    print(f"report: {path}/{builder.REPORT_NAME}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a data command; returns the exit status (`ipadapter_jax.cli.main`'s codes)."""
    return report_errors(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
