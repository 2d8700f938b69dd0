"""The drain loop: claim a leased batch, ship it to the sink, record the outcome.

No database transaction is open while a batch is on the wire: the claim commits
before the send, and the outcome is written after it, fenced by the lease token so a
worker that lost its lease changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.settings import Settings
from worker.sinks.base import (
    RateLimitedError,
    RejectedError,
    RetryableSinkError,
    Sink,
    UnauthorizedError,
)
from worker.store import ClaimedEvent, DatabaseUnavailable, Lease, Store

log = logging.getLogger("outbox.worker")

#: Sink states, as shown by ``status``, ``/readyz`` and the ``outbox_sink_state`` metric.
SINK_OK = "ok"
SINK_BACKING_OFF = "backing_off"
SINK_RATE_LIMITED = "rate_limited"
SINK_UNAUTHORIZED = "unauthorized"


def to_payload(event: ClaimedEvent) -> dict[str, Any]:
    """The PostHog capture event for an outbox row (same uuid and timestamp on every send)."""
    properties = event.properties
    properties["$ignore_sent_at"] = True
    return {
        "event": event.event,
        "distinct_id": event.distinct_id,
        "properties": properties,
        "uuid": str(event.uuid),
        "timestamp": event.timestamp.isoformat(),
    }


@dataclass
class Outcome:
    """What happened to each event of one leased batch."""

    shipped: list[int] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    retry_error: str = ""
    defer: list[int] = field(default_factory=list)
    defer_delay: float = 0.0
    defer_error: str | None = None
    requests: int = 0


@dataclass
class DrainStats:
    """Totals over a drain run."""

    batches: int = 0
    shipped: int = 0
    retried: int = 0
    dead: int = 0
    deferred: int = 0
    #: Events that died because a retryable failure used their last attempt.
    dead_by_retry: int = 0
    #: The run stopped early because the database went away.
    interrupted: bool = False

    @property
    def clean(self) -> bool:
        """Everything claimed was shipped and the run was not cut short."""
        return not (self.retried or self.deferred or self.dead or self.interrupted)

    def add(self, other: DrainStats) -> None:
        """Accumulate another run's totals."""
        self.batches += other.batches
        self.shipped += other.shipped
        self.retried += other.retried
        self.dead += other.dead
        self.deferred += other.deferred
        self.dead_by_retry += other.dead_by_retry


class Drainer:
    """Moves events from the outbox table to a sink, one leased batch at a time."""

    def __init__(
        self,
        store: Store,
        sink: Sink,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        observer: DrainObserver | None = None,
    ) -> None:
        self.store = store
        self.sink = sink
        self.settings = settings
        self.clock = clock
        self.observer = observer or DrainObserver()
        self.stop_event = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self.paused_until = 0.0
        self.sink_state = SINK_OK
        self.last_error: str | None = None
        self._inflight: Lease | None = None
        self._abandoned: set[Any] = set()
        self._lock = threading.Lock()

    # -- driving ----------------------------------------------------------------------

    def drain(self) -> DrainStats:
        """Ship batches until nothing is due, the sink fails (the next poll tries again),
        the sink is paused, or :attr:`stop_event` is set. Returns what happened."""
        stats = DrainStats()
        while not self.stop_event.is_set():
            try:
                batch = self.drain_once()
            except DatabaseUnavailable:
                stats.interrupted = True
                break
            if batch is None:
                break
            stats.add(batch)
            if batch.retried or batch.deferred or batch.dead_by_retry:
                break
        return stats

    def pause_remaining(self) -> float:
        """Seconds until the sink may be called again (0 when not paused)."""
        return max(0.0, self.paused_until - self.clock())

    def drain_once(self) -> DrainStats | None:
        """Claim and ship one batch; None when nothing is due."""
        if self.stop_event.is_set() or self.pause_remaining() > 0:
            return None
        self.idle.clear()
        try:
            lease = self.store.claim(
                self.settings.batch_size, self.settings.max_batch_bytes, self.settings.lease_seconds
            )
            if lease is None:
                return None
            started = self.clock()
            with self._lock:
                self._inflight = lease
            outcome = self._ship(lease, started)
            self.observer.batch_sent(self, lease, outcome, self.clock() - started)
            with self._lock:
                abandoned = lease.token in self._abandoned
                self._inflight = None
            if abandoned:
                log.warning(
                    "a batch released at shutdown finished its requests; its outcome is not "
                    "recorded and its events will be sent again with the same uuids",
                    extra={"action": "abandoned_batch_finished", "events": len(lease.events)},
                )
                return None
            return self._record(lease, outcome, started)
        finally:
            self.idle.set()

    # -- shipping ---------------------------------------------------------------------

    def _ship(self, lease: Lease, claimed_at: float) -> Outcome:
        payloads = {e.id: to_payload(e) for e in lease.events}
        outcome = Outcome()
        chunks: list[list[ClaimedEvent]] = [lease.events]
        # Splitting a refused batch takes many requests; stop at half the lease so the
        # outcome is written while the rows are still ours, and release the rest.
        budget = claimed_at + self.settings.lease_seconds / 2
        while chunks:
            chunk = chunks.pop(0)
            rest = [e.id for c in [chunk, *chunks] for e in c]
            if self.pause_remaining() > 0:  # a 429 earlier in this batch: no more requests
                outcome.defer.extend(rest)
                outcome.defer_delay = self.pause_remaining()
                break
            if outcome.requests and self.clock() > budget:
                outcome.defer.extend(rest)
                outcome.defer_delay = 0.0
                log.info(
                    "batch took half its lease; releasing %d unsent events",
                    len(rest),
                    extra={"action": "batch_released", "events": len(rest)},
                )
                break
            outcome.requests += 1
            try:
                self.sink.send([payloads[e.id] for e in chunk])
            except RejectedError as exc:
                if len(chunk) == 1:
                    outcome.dead.append((chunk[0].id, str(exc)))
                    log.warning(
                        "event refused by the sink: %s",
                        exc,
                        extra={"action": "event_rejected", "uuid": str(chunk[0].uuid)},
                    )
                else:
                    mid = len(chunk) // 2
                    chunks[0:0] = [chunk[:mid], chunk[mid:]]
                    log.info(
                        "batch of %d refused (%s); splitting to find the bad event",
                        len(chunk),
                        exc,
                        extra={"action": "batch_split", "events": len(chunk)},
                    )
                continue
            except RateLimitedError as exc:
                delay = (
                    exc.retry_after
                    if exc.retry_after is not None
                    else self.settings.rate_limit_pause
                )
                self._pause(delay, SINK_RATE_LIMITED, str(exc))
                log.warning(
                    "rate limited by the sink (%s); pausing all sends for %.1fs",
                    exc,
                    delay,
                    extra={"action": "sink_rate_limited", "pause_seconds": delay},
                )
                outcome.defer.extend(rest)
                outcome.defer_delay = delay
                outcome.defer_error = str(exc)
                break
            except UnauthorizedError as exc:
                self._pause(self.settings.unauthorized_pause, SINK_UNAUTHORIZED, str(exc))
                log.error(
                    "the sink refused the API key (%s): check POSTHOG_API_KEY; every event "
                    "stays pending and sending resumes in %.0fs",
                    exc,
                    self.settings.unauthorized_pause,
                    extra={"action": "sink_unauthorized"},
                )
                outcome.defer.extend(rest)
                outcome.defer_delay = self.settings.unauthorized_pause
                outcome.defer_error = str(exc)
                break
            except RetryableSinkError as exc:
                self._failed(str(exc))
                outcome.retry.extend(rest)
                outcome.retry_error = str(exc)
                break
            except Exception as exc:  # a sink bug must not lose the batch
                log.exception("sink raised unexpectedly", extra={"action": "sink_error"})
                self._failed(f"{type(exc).__name__}: {exc}")
                outcome.retry.extend(rest)
                outcome.retry_error = f"{type(exc).__name__}: {exc}"
                break
            else:
                outcome.shipped.extend(e.id for e in chunk)
        if outcome.shipped and not outcome.retry and not outcome.defer:
            self.sink_state = SINK_OK
        return outcome

    def _pause(self, seconds: float, state: str, error: str) -> None:
        self.paused_until = max(self.paused_until, self.clock() + max(0.0, seconds))
        self.sink_state = state
        self.last_error = error

    def _failed(self, error: str) -> None:
        self.sink_state = SINK_BACKING_OFF
        self.last_error = error

    # -- recording --------------------------------------------------------------------

    def _record(self, lease: Lease, outcome: Outcome, claimed_at: float) -> DrainStats:
        s = self.settings
        stats = DrainStats(batches=1)

        def write() -> None:
            stats.shipped = self.store.ack(lease.token, outcome.shipped, s.dedup_window)
            for event_id, error in outcome.dead:
                self.store.bury(lease.token, [event_id], error)
            if outcome.retry:
                retried, dead = self.store.retry(
                    lease.token,
                    outcome.retry,
                    outcome.retry_error,
                    max_attempts=s.max_attempts,
                    backoff_base=s.backoff_base,
                    backoff_max=s.backoff_max,
                )
                stats.retried, stats.dead, stats.dead_by_retry = retried, dead, dead
            stats.dead += len(outcome.dead)
            if outcome.defer:
                self.store.defer(
                    lease.token, outcome.defer, outcome.defer_delay, outcome.defer_error
                )
                stats.deferred = len(outcome.defer)

        self._write_until_lease_ends(write, lease, claimed_at)
        if outcome.shipped:
            log.info(
                "shipped %d events",
                stats.shipped,
                extra={
                    "action": "batch_shipped",
                    "events": stats.shipped,
                    "requests": outcome.requests,
                },
            )
        if outcome.retry:
            log.warning(
                "batch failed: %s (%d events will be retried, %d used their last attempt)",
                outcome.retry_error,
                stats.retried,
                stats.dead_by_retry,
                extra={"action": "batch_failed", "events": len(outcome.retry)},
            )
        if stats.dead:
            log.error(
                "%d events are dead",
                stats.dead,
                extra={"action": "events_dead", "events": stats.dead},
            )
        self.observer.batch_recorded(self, stats)
        return stats

    def _write_until_lease_ends(
        self, write: Callable[[], None], lease: Lease, claimed_at: float
    ) -> None:
        """Run ``write``, retrying while the database is away and the lease still holds.

        Past the lease another worker may own the rows; the fenced writes would change
        nothing, and the rows will be shipped again with the same uuids.
        """
        deadline = claimed_at + self.settings.lease_seconds
        delay = 0.2
        while True:
            try:
                write()
                return
            except DatabaseUnavailable:
                if self.clock() + delay >= deadline:
                    log.error(
                        "could not record a batch's outcome before its lease ended; "
                        "its events will be shipped again with the same uuids",
                        extra={"action": "outcome_lost", "events": len(lease.events)},
                    )
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- shutdown ---------------------------------------------------------------------

    def abandon_inflight(self) -> int:
        """Release the in-flight batch's rows at once (for shutdown); returns how many."""
        with self._lock:
            lease = self._inflight
            if lease is None:
                return 0
            self._abandoned.add(lease.token)
        ids = [e.id for e in lease.events]
        try:
            self.store.defer(lease.token, ids, 0.0, None)
        except DatabaseUnavailable:
            return 0  # the lease will expire by itself
        return len(ids)


class DrainObserver:
    """Hooks for metrics; the default does nothing."""

    def batch_sent(self, drainer: Drainer, lease: Lease, outcome: Outcome, seconds: float) -> None:
        """A batch's requests are done (before its outcome is written)."""

    def batch_recorded(self, drainer: Drainer, stats: DrainStats) -> None:
        """A batch's outcome is in the database."""
