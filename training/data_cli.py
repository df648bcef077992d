"""`ipadapter-jax data ...` commands (also `python -m training.data_cli ...`).

  build --json captions.json --root images/ --out DIR   build the TFDS dataset (see training/data_build.py)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipadapter-jax data", description="IP-Adapter training data tools.")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a data command; returns the process exit status (0 on success)."""
    args = _parser().parse_args(argv)
    from training import data_build  # after parsing: `--help` stays fast

    try:
        path, report = data_build.build_dataset(
            args.json,
            args.root,
            args.out,
            max_skip_fraction=args.max_skip_fraction,
            max_aspect_ratio=args.max_aspect_ratio,
            num_threads=args.threads,
            overwrite=args.overwrite,
        )
    except (data_build.BuildError, OSError, ValueError) as e:  # bad inputs, existing output, too many skips
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"dataset: {path}")
    print(f"entries: {report['total']}  written: {report['written']}  converted to RGB: {report['converted']}")
    print(f"skipped: {report['skipped']}" + "".join(f"\n  {k}: {n}" for k, n in sorted(report["skip_counts"].items())))
    print(f"report: {path}/{data_build.REPORT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
