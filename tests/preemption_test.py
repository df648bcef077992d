"""SIGTERM before the first training step is never lost, also when a library swallows the exception its handler
raised (jax does, while reading its persistent compilation cache: seen as a trainer that ignored SIGTERM)."""

import os
import signal

import pytest

from ipadapter_jax.training.loop import Preempted, _Preemption


def test_a_sigterm_swallowed_by_a_library_before_the_first_step_still_preempts():
    with _Preemption() as preemption:
        try:  # a library's broad `except` around what the main thread was doing when the signal came
            os.kill(os.getpid(), signal.SIGTERM)
        except Exception:  # noqa: BLE001
            pass
        with pytest.raises(Preempted, match="SIGTERM before the first step"):
            preemption.defer()


def test_after_the_first_step_sigterm_only_asks_the_loop_to_stop():
    with _Preemption() as preemption:
        preemption.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested
    assert signal.getsignal(signal.SIGTERM) is not preemption._handle
