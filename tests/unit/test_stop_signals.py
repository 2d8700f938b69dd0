"""The worker's wait for SIGTERM/SIGINT takes no lock in a signal handler."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from worker.cli import StopSignals


@pytest.fixture(autouse=True)
def restore_handlers() -> Iterator[None]:
    """StopSignals leaves its handlers in place (as the worker needs): put pytest's back."""
    previous = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    yield
    for number, handler in previous.items():
        signal.signal(number, handler)


def test_a_signal_before_the_wait_is_not_lost() -> None:
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)  # before wait(): kept in the socket
        assert signals.wait() is signal.SIGTERM


def test_a_signal_during_the_wait_ends_it_and_names_itself() -> None:
    with StopSignals() as signals:
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            assert signals.wait() is signal.SIGINT
        finally:
            timer.cancel()


def test_the_handlers_stay_after_the_wait() -> None:
    # A second SIGTERM while the worker shuts down must not kill it mid-shutdown.
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        signals.wait()
    os.kill(os.getpid(), signal.SIGTERM)  # ignored: the test process lives on
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
