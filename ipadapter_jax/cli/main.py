"""The `ipadapter-jax` command: one entry point, one module per subcommand in this folder.

    ipadapter-jax convert ...      IP-Adapter files <-> Flax, inspect a file            (cli/convert.py)
    ipadapter-jax data build ...   build a TFDS dataset from captions + images         (cli/data.py)
    ipadapter-jax cache ...        precompute VAE/CLIP/text encodings                  (cli/cache.py)
    ipadapter-jax train ...        train an adapter                                    (cli/train.py)
    ipadapter-jax generate ...     image-prompted generation (SD1.5/SDXL/ControlNet)   (cli/generate.py)
    ipadapter-jax eval ...         CLIP-I / CLIP-T evaluation, the paper's protocol    (cli/evaluate.py)
    ipadapter-jax ablate ...       the paper's ablations on the embedded world         (cli/ablate.py)

Each subcommand module exposes `main(argv) -> int` (its work wrapped in `report_errors`) and is imported only
when used, so `ipadapter-jax data` does not pay for importing the models.

One error style for every subcommand: a failure prints one line `error: <what>, <where>, <likely cause>` on stderr
(`--debug`, anywhere on the command line, prints the traceback instead), and the exit status says what happened:

    0   success
    1   a runtime failure (a bad or missing file, a model that does not fit, a non-finite loss, ...)
    2   bad usage or configuration (unknown flags, invalid config values), found before any work starts
    75  preempted (SIGTERM during training): the last state is checkpointed; rerun the same command to resume
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import math
import os
import sys
import threading
import traceback
from typing import NoReturn

EXIT_RUNTIME_ERROR = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry"

SUBCOMMANDS = {
    "convert": ("ipadapter_jax.cli.convert", "convert IP-Adapter weights (to-flax, to-torch, inspect)"),
    "data": ("ipadapter_jax.cli.data", "build TFDS datasets from captions + images"),
    "cache": ("ipadapter_jax.cli.cache", "encode a built dataset once with a config's frozen encoders"),
    "train": ("ipadapter_jax.cli.train", "train an IP-Adapter (--config PRESET_OR_FILE --workdir DIR)"),
    "plan": ("ipadapter_jax.cli.plan", "compile a config's train step for a TPU topology: memory, FLOPs, bounds"),
    "generate": ("ipadapter_jax.cli.generate", "generate images from image (+ text) prompts"),
    "eval": ("ipadapter_jax.cli.evaluate", "CLIP-I / CLIP-T evaluation (run, compare)"),
    "ablate": ("ipadapter_jax.cli.ablate", "train + score variants x seeds on the embedded world, with intervals"),
}


class UsageError(ValueError):
    """Bad command-line usage or configuration, detected before any work: exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors raised as `UsageError` (one `error:` line, exit status 2) instead of printed."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN and inf refused)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def report_errors(run: object, argv: list[str]) -> int:
    """Calls `run(argv)` (a subcommand's work) and turns its exceptions into the exit statuses above."""
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    if not debug:
        threading.excepthook = _one_line_from_thread
        sys.excepthook = _one_line_from_callback  # exceptions in native callbacks (tensorstore's) come here
        sys.unraisablehook = _one_line_unraisable  # ... or here (a callback into a closed asyncio loop)
        for name in ("absl", "asyncio"):  # orbax and tensorstore log their worker threads' failures with tracebacks
            logging.getLogger(name).addFilter(_drop_traceback)
    try:
        return int(run(argv) or 0)  # type: ignore[operator]
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the one place that turns any failure into one line)
        if debug:
            traceback.print_exc()
        else:
            print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE if _is_usage_error(err) else EXIT_RUNTIME_ERROR


def _one_line_from_thread(args: threading.ExceptHookArgs) -> None:
    """A failure in a background thread (orbax's asynchronous checkpoint writer, say) as one warning line; the
    main thread reports what it means for the command (orbax re-raises it there)."""
    message = _one_line(args.exc_value) if isinstance(args.exc_value, Exception) else repr(args.exc_value)
    print(f"warning: in background thread {args.thread.name if args.thread else '?'}: {message}", file=sys.stderr)


def _one_line_from_callback(kind: type, value: BaseException, traceback_: object) -> None:
    print(
        f"warning: in a library callback: {_one_line(value) if isinstance(value, Exception) else kind}", file=sys.stderr
    )


def _one_line_unraisable(args: object) -> None:
    value = getattr(args, "exc_value", None)
    message = _one_line(value) if isinstance(value, Exception) else repr(value)
    print(f"warning: in a library callback: {message}", file=sys.stderr)


def _drop_traceback(record: logging.LogRecord) -> bool:
    """Keeps the log record, without its traceback (the command's own `error:` line says what failed)."""
    record.exc_info, record.exc_text = None, None
    return True


def _is_usage_error(err: Exception) -> bool:
    from ipadapter_jax.paths import BadURL  # light: the standard library only
    from ipadapter_jax.training.config import ConfigError  # light: dataclasses only

    return isinstance(err, (UsageError, ConfigError, BadURL))


def _one_line(err: Exception) -> str:
    message = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
        message = f"{err.filename}: {message}"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        message += "; likely cause: the disk is full (free space, or give a folder on a larger disk); rerun to resume"
    if not isinstance(err, (ValueError, OSError, RuntimeError)):
        message = f"{type(err).__name__}: {message}"
    return " ".join(message.split("\n"))


def main(argv: list[str] | None = None) -> int:
    """`ipadapter-jax SUBCOMMAND ...`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
        usage = "usage: ipadapter-jax SUBCOMMAND [args] [--debug]\n\nsubcommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown subcommand {argv[0]!r}\n\n{usage}", file=sys.stderr)
            return EXIT_USAGE
        print(usage)
        return 0 if argv else EXIT_USAGE
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


def exit_process(status: int) -> NoReturn:
    """Ends the process with `status`; after a failure at once (`os._exit`), once the `error:` line is out: the
    libraries' background threads (orbax's asynchronous writers, tensorstore) may still be unwinding and would
    print their tracebacks under it. What the command owns (locks, checkpoint managers, files) is released by
    then, in its own `finally` blocks."""
    sys.stdout.flush()
    sys.stderr.flush()
    if status:
        os._exit(status)
    sys.exit(0)


def console() -> NoReturn:
    """The `ipadapter-jax` console script."""
    exit_process(main())


if __name__ == "__main__":
    console()
