"""Silence exactly diffusers' and transformers' "Flax is deprecated" log lines.

diffusers 0.39 logs one such warning from every Flax module's `setup` (134 lines per SD1.5 trace) and
transformers 4.57 one per Flax model. We pin those releases on purpose (the last with Flax), so the lines
carry no information for our users; every other warning of both libraries must still reach them. A
`logging.Filter` drops only records whose message matches the deprecation notices. A logger's filters see
every record logged on that very logger, whatever handlers (the library's, the root's, pytest's) later
receive it, so the filter goes on each logger that emits a notice: one per Flax module file of diffusers
(created here, before those modules are imported) and transformers' Flax base class. Installed by
`import ipadapter_jax`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
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


@functools.cache
def _emitting_loggers() -> tuple[str, ...]:
    """Names of the loggers that log the notices: diffusers' `*flax*` modules, transformers' Flax base."""
    names = ["transformers.modeling_flax_utils"]
    spec = importlib.util.find_spec("diffusers")  # locates the package without importing it
    for root in spec.submodule_search_locations if spec else ():
        for folder, _, files in os.walk(root):
            for file in files:
                if "flax" in file and file.endswith(".py"):
                    module = os.path.relpath(os.path.join(folder, file[:-3]), os.path.dirname(root))
                    names.append(module.replace(os.sep, "."))
    return tuple(names)


def install() -> None:
    """Attaches the filter to every logger that emits the notices (idempotent)."""
    for name in _emitting_loggers():
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
