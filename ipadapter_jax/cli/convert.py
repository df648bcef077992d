"""`ipadapter-jax convert ...` commands (also `python -m ipadapter_jax.cli.convert ...`).

  to-flax  --adapter ip-adapter_sd15.safetensors --unet-config unet/config.json --out adapter.msgpack
           official IP-Adapter file (.safetensors or .bin) -> our Flax adapter file (see flax_adapter_file.py),
           checked against the UNet the config describes (and the image encoder's widths, if given)
  to-torch --adapter adapter.msgpack --out ip-adapter.safetensors [--format bin] [--dtype fp16] [--unet-config ...]
           our Flax adapter file -> official file that diffusers' `load_ip_adapter` reads
  inspect  FILE
           kind, tokens, layers, dtypes, param counts and metadata of any of these files

Progress and timings go to stderr, results to stdout; a bad input ends in one "error: ..." line and status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ipadapter_jax.cli.main import ArgumentParser, UsageError, exit_process, report_errors


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
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


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from ipadapter_jax import paths

    paths.check_storage([getattr(args, name, None) for name in ("adapter", "out", "file")])
    {"to-flax": _to_flax, "to-torch": _to_torch, "inspect": _inspect}[args.command](args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a convert command; returns the exit status (`ipadapter_jax.cli.main`: 1 a bad file, 2 bad usage)."""
    return report_errors(run, list(sys.argv[1:] if argv is None else argv))


def _check_output(args: argparse.Namespace, suffixes: tuple[str, ...], what: str) -> None:
    """The output must not be the input, and its suffix must say its format (readers choose by suffix)."""
    from ipadapter_jax import paths

    out, source = Path(args.out), Path(args.adapter)
    if paths.is_remote(args.out) or paths.is_remote(args.adapter):
        same = args.out.rstrip("/") == args.adapter.rstrip("/")
    else:
        same = out.resolve() == source.resolve() or (out.exists() and source.exists() and out.samefile(source))
    if same:
        raise UsageError(f"--out {args.out} is the input file: write the converted adapter to another path")
    if out.suffix not in suffixes:
        raise UsageError(
            f"--out {args.out}: {what} files end in {' or '.join(suffixes)} (readers, diffusers' included, choose the "
            f"format by the suffix); got {out.suffix or 'no suffix'!r}"
        )


@contextlib.contextmanager
def _step(label: str) -> Iterator[None]:
    print(f"{label} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"  done in {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)


def _metadata(args: argparse.Namespace, stored: dict[str, str]) -> dict[str, str]:
    """Stored metadata updated by --base-model/--image-encoder; kind and num_tokens are re-derived on save."""
    metadata = {k: v for k, v in stored.items() if k not in ("adapter_kind", "num_tokens")}
    for key in ("base_model", "image_encoder"):
        if getattr(args, key):
            metadata[key] = getattr(args, key)
    return metadata


def _unet_params(config_path: str) -> Any:
    from ipadapter_jax.weights import unet_config

    with _step(f"tracing UNet shapes from {config_path}"):
        unet = unet_config.ip_unet_from_config(unet_config.read_unet_config(config_path))
        return unet_config.abstract_ip_unet_params(unet)


def _to_flax(args: argparse.Namespace) -> None:
    from ipadapter_jax.weights import adapter_files as ip_adapter_files
    from ipadapter_jax.weights import flax_adapter_file

    _check_output(args, (flax_adapter_file.SUFFIX,), "Flax adapter")
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
    from ipadapter_jax.weights import adapter_files as ip_adapter_files
    from ipadapter_jax.weights import flax_adapter_file
    from ipadapter_jax.weights.official_layout import (
        adapter_from_official,
        adapter_to_official,
        check_official_layout,
        check_weights,
    )

    file_format = args.format or ("safetensors" if Path(args.out).suffix == ".safetensors" else "bin")
    suffixes = (".safetensors",) if file_format == "safetensors" else ip_adapter_files.BIN_SUFFIXES
    _check_output(args, suffixes, file_format)
    with _step(f"reading {args.adapter}"):
        adapter, stored = flax_adapter_file.read_flax_adapter(args.adapter)
        design = flax_adapter_file.adapter_design(stored)
        check_official_layout(design, args.out)
        check_weights(adapter_to_official(adapter), source=args.adapter)
    if args.unet_config:
        unet_params = _unet_params(args.unet_config)
        with _step("checking the adapter against the UNet"):
            adapter_from_official(adapter_to_official(adapter), unet_params, source=args.adapter)
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
    from ipadapter_jax import paths
    from ipadapter_jax.weights import adapter_files as ip_adapter_files
    from ipadapter_jax.weights import flax_adapter_file
    from ipadapter_jax.weights.image_proj_keys import detect_kind
    from ipadapter_jax.weights.official_layout import adapter_to_official

    if Path(path).suffix == flax_adapter_file.SUFFIX:
        adapter, metadata = flax_adapter_file.read_flax_adapter(path)
        state, file_format = adapter_to_official(adapter), "Flax msgpack (ipadapter-jax)"
    else:
        state, metadata = ip_adapter_files.read_ip_adapter(path), ip_adapter_files.read_metadata(path)
        file_format = "official IP-Adapter " + Path(path).suffix.lstrip(".")
    spec = detect_kind(state["image_proj"], source=f"{path} [image_proj]")
    k_ip = {key: v for key, v in state["ip_adapter"].items() if key.endswith(".to_k_ip.weight")}
    ids = sorted({int(key.split(".", 1)[0]) for key in k_ip if key.split(".", 1)[0].isdigit()})
    counts = {name: sum(v.size for v in part.values()) for name, part in state.items()}
    dtypes = sorted({str(v.dtype) for part in state.values() for v in part.values()})
    cross = next(iter(k_ip.values())).shape[1] if k_ip else 0
    lora = [v for key, v in state["ip_adapter"].items() if key.endswith("_lora.down.weight")]
    summary = {
        "file": f"{path} ({paths.size(path) / 2**20:.1f} MiB, {file_format})",
        "adapter_kind": spec.kind,
        "tokens": str(spec.num_tokens),
        "image_proj": ", ".join(f"{k}={v}" for k, v in spec.hparams.items()),
        "cross-attention layers": f"{len(ids)} (ids {ids[0]}..{ids[-1]}), cross_attention_dim {cross}" if ids else "0",
        "dtypes": ", ".join(dtypes),
        **({"UNet LoRA": f"rank {lora[0].shape[0]} on {len(lora) // 4} attention processors"} if lora else {}),
        "params": f"{sum(counts.values()):,} (" + ", ".join(f"{k} {n:,}" for k, n in counts.items()) + ")",
    }
    summary.update({f"metadata {k}": v for k, v in sorted(metadata.items())})
    return summary


def _describe(path: str) -> str:
    """One line about a file just written; reading it back also proves it is readable."""
    from ipadapter_jax import paths

    s = _summary(path)
    size = paths.size(path) / 2**20
    layers = s["cross-attention layers"]
    return f"{s['adapter_kind']}, {s['tokens']} tokens, {layers}; {s['params']} params; {s['dtypes']}; {size:.1f} MiB"


if __name__ == "__main__":
    exit_process(main())
