"""An in-memory sink for tests: records batches and fails on command."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from worker.sinks.base import Event, Outbound, SinkError


class MemorySink:
    """Keeps every accepted event; ``fail_with`` scripts the next failures.

    ``reject`` is a predicate over one event: a batch holding any matching event is
    refused whole with the error it returns (like PostHog's ``/batch/`` does with one
    malformed event).
    """

    name = "memory"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.batches: list[list[dict[str, Any]]] = []
        self.calls = 0
        self._failures: list[SinkError] = []
        self.reject: Callable[[Event], SinkError | None] | None = None
        self._lock = threading.Lock()

    def fail_with(self, *errors: SinkError) -> None:
        """Make the next ``len(errors)`` sends raise these, in order."""
        with self._lock:
            self._failures.extend(errors)

    def send(self, events: Sequence[Outbound]) -> None:
        """Record the batch, or raise the next scripted or predicate failure."""
        with self._lock:
            self.calls += 1
            if self._failures:
                raise self._failures.pop(0)
            if self.reject is not None:
                for event in events:
                    error = self.reject(event.data)
                    if error is not None:
                        raise error
            batch = [dict(e.data) for e in events]
            self.batches.append(batch)
            self.events.extend(batch)

    def uuids(self) -> list[str]:
        """The uuids of accepted events, in order."""
        with self._lock:
            return [str(e["uuid"]) for e in self.events]

    def close(self) -> None:
        """Nothing to release."""
