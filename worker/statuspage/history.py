"""The backlog over the last hour, as the worker sampled it (no Prometheus needed)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from worker.storage.base import Backlog

#: Seconds of history the page draws.
HISTORY_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Sample:
    """The backlog at one moment (``at``: seconds since the epoch)."""

    at: float
    pending: int
    due: int
    retrying: int
    dead: int
    oldest_pending_age_seconds: float


class BacklogHistory:
    """A ring buffer of backlog samples covering ``window`` seconds.

    Filled by the worker's backlog refresh (every ``interval`` seconds); its size is
    fixed by the two, so memory does not grow however long the worker runs. Safe to
    use from several threads (the refresh job writes, the page's handler reads).
    """

    def __init__(
        self,
        interval: float,
        window: float = HISTORY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.window = window
        self.clock = clock
        # One spare slot per minute: a refresh may run a little early or late.
        capacity = int(window / max(interval, 0.001)) + int(window / 60) + 2
        self._samples: deque[Sample] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def record(self, backlog: Backlog, at: float | None = None) -> None:
        """Add the backlog as of ``at`` (default: now)."""
        sample = Sample(
            at=self.clock() if at is None else at,
            pending=backlog.pending,
            due=backlog.due,
            retrying=backlog.retrying,
            dead=backlog.dead,
            oldest_pending_age_seconds=backlog.oldest_pending_age_seconds,
        )
        with self._lock:
            self._samples.append(sample)

    def samples(self, now: float | None = None) -> list[Sample]:
        """The samples of the last ``window`` seconds, oldest first."""
        since = (self.clock() if now is None else now) - self.window
        with self._lock:
            return [s for s in self._samples if s.at >= since]
