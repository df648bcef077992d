"""Counting what JAX compiles, through jax.monitoring (public API; no private jit caches)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

# The event of lowering a jaxpr to MLIR: every compilation starts with it, also one that the persistent
# compilation cache then answers.
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def lowerings() -> Iterator[list[float]]:
    """Yields a list that collects one duration (s) per function lowered inside the block.

    Checks first that the listener sees a new function's lowering, so an empty list really means nothing was
    compiled (a renamed event would otherwise make every "no recompilation" assertion pass)."""
    lowered: list[float] = []

    def listener(event: str, duration: float, **kwargs: object) -> None:
        if event == LOWERING_EVENT:
            lowered.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda x: x + 1)(1.0)  # a function never seen before
        if not lowered:
            raise AssertionError(f"no {LOWERING_EVENT} event from jax.monitoring: cannot count compilations")
        lowered.clear()
        yield lowered
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
