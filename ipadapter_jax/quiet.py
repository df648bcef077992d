"""Silence exactly diffusers' and transformers' "Flax is deprecated" log lines.

diffusers 0.39 logs one such warning from every Flax module's `setup` (134 lines per SD1.5 trace) and
transformers 4.57 one per Flax model. We pin those releases on purpose (the last with Flax), so the lines
carry no information for our users; every other warning of both libraries must still reach them. A
`logging.Filter` on the libraries' root loggers and on their handlers drops only records whose message
matches the deprecation notices. It is installed by `import ipadapter_jax`, before any Flax class is
imported.
"""

from __future__ import annotations

import logging
import re

# The two notices, as worded in diffusers 0.39.0 and transformers 4.57.x.
_DEPRECATION = re.compile(
    r"Flax classes are deprecated and will be removed in Diffusers"
    r"|TensorFlow and JAX classes are deprecated and will be removed in Transformers"
)


class FlaxDeprecationFilter(logging.Filter):
    """Drops the Flax deprecation notices of diffusers and transformers; passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _DEPRECATION.search(record.getMessage())


_FILTER = FlaxDeprecationFilter()


def install() -> None:
    """Attaches the filter to both libraries' root loggers and their handlers (idempotent)."""
    for name in ("diffusers", "transformers"):
        try:
            library_logging = __import__(f"{name}.utils.logging", fromlist=["get_logger"])
        except ImportError:  # the library is not installed: nothing to silence
            continue
        # Loggers filter only records logged on themselves; records of child loggers (one per diffusers
        # module) reach the handlers through propagation, so the handlers get the filter too.
        root = library_logging.get_logger(name)
        if _FILTER not in root.filters:
            root.addFilter(_FILTER)
        for handler in root.handlers + logging.getLogger().handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
