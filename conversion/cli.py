"""`ipadapter-jax convert ...` commands (also `python -m conversion.cli ...`).

  to-flax  --adapter ip-adapter_sd15.safetensors --unet-config unet/config.json --out adapter.msgpack
           official IP-Adapter file (.safetensors or .bin) -> our Flax adapter file (see flax_adapter_file.py),
           checked against the UNet the config describes (and the image encoder's widths, if given)
  to-torch --adapter adapter.msgpack --out ip-adapter.safetensors [--format bin] [--dtype fp16] [--unet-config ...]
           our Flax adapter file -> official file that diffusers' `load_ip_adapter` reads
  inspect  FILE
           variant, tokens, layers, dtypes, param counts and metadata of any of these files

Progress and timings go to stderr, results to stdout; a bad input ends in one "error: ..." line and status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipadapter-jax convert", description="Convert IP-Adapter weights between PyTorch files and Flax."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    to_flax = commands.add_parser(
        "to-flax",
        help="official IP-Adapter file (.safetensors/.bin) -> Flax adapter (.msgpack)",
        description="Reads an official IP-Adapter file, checks every layer and shape against the UNet of "
        "--unet-config (and the image encoder widths, if given) and writes our Flax adapter file.",
    )
    to_flax.add_argument("--adapter", required=True, help="ip-adapter_*.safetensors or .bin")
    to_flax.add_argument("--unet-config", required=True, help="the target UNet's config.json, or its folder")
    to_flax.add_argument("--out", required=True, help="output .msgpack")
    to_flax.add_argument(
        "--encoder-projection-dim", type=int, help="image encoder's projected embedding width (ViT-H 1024, bigG 1280)"
    )
    to_flax.add_argument("--encoder-hidden-size", type=int, help="image encoder's hidden width (ViT-H 1280, bigG 1664)")
    _metadata_args(to_flax)

    to_torch = commands.add_parser(
        "to-torch",
        help="Flax adapter (.msgpack) -> official IP-Adapter file for diffusers' load_ip_adapter",
        description="Writes our Flax adapter file as an official IP-Adapter file (.safetensors by default).",
    )
    to_torch.add_argument("--adapter", required=True, help="our .msgpack adapter file")
    to_torch.add_argument("--out", required=True, help="output .safetensors (or .bin with --format bin)")
    to_torch.add_argument(
        "--format", choices=("safetensors", "bin"), help="default: from --out's suffix (.safetensors, else bin)"
    )
    to_torch.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="default fp32")
    to_torch.add_argument("--unet-config", help="check the adapter against this UNet config first (optional)")
    _metadata_args(to_torch)

    inspect = commands.add_parser("inspect", help="describe an adapter file (.safetensors, .bin or .msgpack)")
    inspect.add_argument("file")
    return parser


def _metadata_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", help="metadata: the base model, e.g. runwayml/stable-diffusion-v1-5")
    parser.add_argument("--image-encoder", help="metadata: the image encoder, e.g. 'CLIP ViT-H/14'")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a convert command; returns the process exit status (0 on success, 1 on a bad input)."""
    args = _parser().parse_args(argv)
    command = {"to-flax": _to_flax, "to-torch": _to_torch, "inspect": _inspect}[args.command]
    try:
        command(args)
    except (OSError, ValueError) as err:  # ConversionError is a ValueError: bad files, shapes, arguments
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _step(label: str) -> Iterator[None]:
    print(f"{label} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"  done in {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)


def _metadata(args: argparse.Namespace, stored: dict[str, str]) -> dict[str, str]:
    """Stored metadata updated by --base-model/--image-encoder; variant and num_tokens are re-derived on save."""
    metadata = {k: v for k, v in stored.items() if k not in ("variant", "num_tokens")}
    for key in ("base_model", "image_encoder"):
        if getattr(args, key):
            metadata[key] = getattr(args, key)
    return metadata


def _unet_params(config_path: str) -> Any:
    from conversion import unet_config

    with _step(f"tracing UNet shapes from {config_path}"):
        unet = unet_config.ip_unet_from_config(unet_config.read_unet_config(config_path))
        return unet_config.abstract_ip_unet_params(unet)


def _to_flax(args: argparse.Namespace) -> None:
    from conversion import flax_adapter_file, ip_adapter_files

    unet_params = _unet_params(args.unet_config)
    with _step(f"reading and checking {args.adapter}"):
        stored = ip_adapter_files.read_metadata(args.adapter)
        _, _, adapter = ip_adapter_files.load_ip_adapter(
            args.adapter,
            unet_params,
            encoder_projection_dim=args.encoder_projection_dim,
            encoder_hidden_size=args.encoder_hidden_size,
        )
    with _step(f"writing {args.out}"):
        flax_adapter_file.save_flax_adapter(adapter, args.out, metadata=_metadata(args, stored))
    print(f"wrote {args.out}: {_describe(args.out)}")


def _to_torch(args: argparse.Namespace) -> None:
    from conversion import flax_adapter_file, ip_adapter_files
    from conversion.ip_adapter import adapter_from_official, adapter_to_official

    with _step(f"reading {args.adapter}"):
        adapter, stored = flax_adapter_file.read_flax_adapter(args.adapter)
    if args.unet_config:
        unet_params = _unet_params(args.unet_config)
        with _step("checking the adapter against the UNet"):
            adapter_from_official(adapter_to_official(adapter), unet_params, source=args.adapter)
    file_format = args.format or ("safetensors" if Path(args.out).suffix == ".safetensors" else "bin")
    with _step(f"writing {args.out} ({file_format}, {args.dtype})"):
        ip_adapter_files.save_ip_adapter(
            adapter, args.out, format=file_format, dtype=args.dtype, metadata=_metadata(args, stored)
        )
    print(f"wrote {args.out}: {_describe(args.out)}")


def _inspect(args: argparse.Namespace) -> None:
    summary = _summary(args.file)
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key + ':':<{width + 1}} {value}")


def _summary(path: str) -> dict[str, str]:
    """What an adapter file holds, read from its official-layout tensors (any of the three formats)."""
    from conversion import flax_adapter_file, ip_adapter_files
    from conversion.image_proj import detect_variant
    from conversion.ip_adapter import adapter_to_official

    if Path(path).suffix == flax_adapter_file.SUFFIX:
        adapter, metadata = flax_adapter_file.read_flax_adapter(path)
        state, file_format = adapter_to_official(adapter), "Flax msgpack (ipadapter-jax)"
    else:
        state, metadata = ip_adapter_files.read_ip_adapter(path), ip_adapter_files.read_metadata(path)
        file_format = "official IP-Adapter " + Path(path).suffix.lstrip(".")
    spec = detect_variant(state["image_proj"], source=f"{path} [image_proj]")
    ids = sorted({int(key.split(".", 1)[0]) for key in state["ip_adapter"] if key.split(".", 1)[0].isdigit()})
    counts = {name: sum(v.size for v in part.values()) for name, part in state.items()}
    dtypes = sorted({str(v.dtype) for part in state.values() for v in part.values()})
    cross = next(iter(state["ip_adapter"].values())).shape[1]
    summary = {
        "file": f"{path} ({os.path.getsize(path) / 2**20:.1f} MiB, {file_format})",
        "variant": spec.variant,
        "tokens": str(spec.num_tokens),
        "image_proj": ", ".join(f"{k}={v}" for k, v in spec.hparams.items()),
        "cross-attention layers": f"{len(ids)} (ids {ids[0]}..{ids[-1]}), cross_attention_dim {cross}" if ids else "0",
        "dtypes": ", ".join(dtypes),
        "params": f"{sum(counts.values()):,} (" + ", ".join(f"{k} {n:,}" for k, n in counts.items()) + ")",
    }
    summary.update({f"metadata {k}": v for k, v in sorted(metadata.items())})
    return summary


def _describe(path: str) -> str:
    """One line about a file just written; reading it back also proves it is readable."""
    s = _summary(path)
    size = os.path.getsize(path) / 2**20
    layers = s["cross-attention layers"]
    return f"{s['variant']}, {s['tokens']} tokens, {layers}; {s['params']} params; {s['dtypes']}; {size:.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
