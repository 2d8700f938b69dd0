"""The drain loop: claim a batch, ship it to the sink, record the outcome.

The drainer sees its storage only through :class:`worker.storage.base.DrainStorage`.
With the snapshot engine (:class:`worker.storage.snapshot_storage.SnapshotStorage`)
a batch is a leased chunk of the events committed between two ticks (or of due
retries): no transaction stays open while it is on the wire, and its outcome is
written in one short transaction fenced on the lease. If the worker dies, hangs past
its lease or loses the database, the outcome is never written and the events are
claimed again once the lease runs out, to be sent with the same uuids and timestamps.
PostHog keeps both copies at first; ClickHouse collapses them when it merges the
parts that hold them (docs/design.md, "Deduplication").

With two connections the next batch is claimed while the current one is on the wire,
and the outcome of the one before is written meanwhile too (see :meth:`Drainer.drain`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from outbox.exceptions import OutboxDatabaseError
from worker.settings import Settings
from worker.sinks.base import (
    BillingLimitedError,
    EventResultsError,
    Outbound,
    RateLimitedError,
    RedirectError,
    RejectedError,
    RequestRejectedError,
    RetryableSinkError,
    Sink,
    UnauthorizedError,
)
from worker.sinks.metrics import MetricsSink
from worker.storage.base import (
    Batch,
    BatchLostError,
    BatchOutcome,
    ClaimedEvent,
    DatabaseUnavailable,
    DrainStorage,
)

log = logging.getLogger("outbox.worker")

DESTINATION_METRICS = "metrics"

#: Sink states, as shown by ``status``, ``/readyz`` and the ``outbox_sink_state`` metric.
SINK_OK = "ok"
SINK_BACKING_OFF = "backing_off"
SINK_RATE_LIMITED = "rate_limited"
SINK_UNAUTHORIZED = "unauthorized"
#: The endpoint answered with a redirect, which is never followed.
SINK_REDIRECTED = "redirected"
#: The endpoint refused requests as such (a 400 about the request, or the breaker).
SINK_REQUEST_REJECTED = "request_rejected"
SINK_STATES = (
    SINK_OK,
    SINK_BACKING_OFF,
    SINK_RATE_LIMITED,
    SINK_UNAUTHORIZED,
    SINK_REDIRECTED,
    SINK_REQUEST_REJECTED,
)
#: States only a configuration change ends: ``/readyz`` answers 503 with this
#: reason, followed by the last error.
SINK_NOT_READY = {
    SINK_UNAUTHORIZED: "sink refuses the API key",
    SINK_REDIRECTED: "sink answers with a redirect, which is not followed",
    SINK_REQUEST_REJECTED: "sink refuses the worker's requests",
}
#: serde's position of a parse error, which differs between otherwise equal answers.
_POSITION = re.compile(r" at line \d+ column \d+")


@dataclass
class Outcome(BatchOutcome):
    """What happened to each event of one claimed batch, and how it went."""

    #: Why the deferred events were not sent: ``rate_limited``, ``unauthorized``,
    #: ``redirected``, ``request_rejected``, or ``released`` (handed back unsent: half
    #: the lease used).
    defer_reason: str = ""
    requests: int = 0
    #: Requests the sink accepted (metrics-only events make none).
    accepted: int = 0
    #: How many of ``shipped`` are metrics-only events (never sent to the sink).
    metrics_only: int = 0


@dataclass
class DrainStats:
    """Totals over a drain run."""

    batches: int = 0
    shipped: int = 0
    #: How many of ``shipped`` were metrics-only events, counted by the metrics sink.
    metrics_only: int = 0
    retried: int = 0
    dead: int = 0
    deferred: int = 0
    #: Events that died because a retryable failure used their last attempt.
    dead_by_retry: int = 0
    #: The run stopped early because the database went away.
    interrupted: bool = False
    #: What the batch's outcome added to the delivery ledger:
    #: ``(destination, outcome, count)`` (see
    #: :attr:`worker.storage.base.Finished.ledger`); not summed by :meth:`add`.
    ledger: tuple[tuple[str, str, int], ...] = ()

    @property
    def sink_failed(self) -> bool:
        """The sink failed for some events: stop draining until the next poll."""
        return bool(self.retried or self.deferred or self.dead_by_retry)

    @property
    def clean(self) -> bool:
        """Everything claimed was shipped and the run was not cut short."""
        return not (self.retried or self.deferred or self.dead or self.interrupted)

    def add(self, other: DrainStats) -> None:
        """Accumulate another run's totals."""
        self.batches += other.batches
        self.shipped += other.shipped
        self.metrics_only += other.metrics_only
        self.retried += other.retried
        self.dead += other.dead
        self.deferred += other.deferred
        self.dead_by_retry += other.dead_by_retry
        self.interrupted = self.interrupted or other.interrupted


class Drainer:
    """Moves events from the outbox table to a sink, one claimed batch at a time."""

    def __init__(
        self,
        store: DrainStorage,
        sink: Sink,
        settings: Settings,
        *,
        claim_store: DrainStorage | None = None,
        metrics_sink: Sink | None = None,
        clock: Callable[[], float] = time.monotonic,
        observer: DrainObserver | None = None,
    ) -> None:
        self.store = store
        #: With a second connection for claims, the next batch is claimed while the
        #: current one is on the wire; the two connections take turns.
        self.claim_store = claim_store or store
        self.sink = sink
        #: Where metrics-only events go (never to ``sink``).
        self.metrics_sink = metrics_sink or MetricsSink(CollectorRegistry())
        self.settings = settings
        self.clock = clock
        self.observer = observer or DrainObserver()
        self.stop_event = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self.paused_until = 0.0
        self.sink_state = SINK_OK
        self.last_error: str | None = None
        self._held: set[Batch] = set()
        self._abandoned: set[Batch] = set()
        self._lock = threading.Lock()
        #: Payloads built on the claiming thread (see _prepare), until the batch ships.
        self._payloads: dict[Batch, dict[int, Outbound]] = {}

    # -- driving ----------------------------------------------------------------------

    def drain(self) -> DrainStats:
        """Ship batches until nothing is due, the sink fails (the next poll tries again),
        the sink is paused, or :attr:`stop_event` is set. Returns what happened.

        With two connections the main thread only sends: each connection has a thread
        of its own that writes the outcome of the batch it claimed and then claims its
        next one, while the main thread sends the batch the other connection claimed.
        A connection runs one statement at a time, so its outcome is always written
        before its next claim; nothing of a batch is sent before it is claimed."""
        stats = DrainStats()
        self.idle.clear()
        lanes: dict[int, ThreadPoolExecutor] = {}
        recording: list[Future[DrainStats | None]] = []
        ahead: Future[Batch | None] | None = None

        def lane(store: DrainStorage) -> ThreadPoolExecutor:
            """The thread that runs ``store``'s statements, one after the other."""
            key = id(store)
            if key not in lanes:
                lanes[key] = ThreadPoolExecutor(1, thread_name_prefix=f"outbox-lane{len(lanes)}")
            return lanes[key]

        def settle(*, wait: bool) -> None:
            """Add the outcomes written so far (all of them, with ``wait``) to ``stats``;
            a lost database (DatabaseUnavailable) is raised here."""
            while recording and (wait or recording[0].done()):
                done = recording.pop(0).result()
                if done is not None:
                    stats.add(done)

        try:
            batch = self._claim(self.store)
            while batch is not None:
                full = len(batch.events) >= self.settings.batch_size
                other = self.claim_store if batch.store is self.store else self.store
                pipelined = other is not batch.store
                if full and pipelined:
                    # Queued behind the outcome of the batch ``other`` holds, if any.
                    ahead = lane(other).submit(self._claim, other)
                sent = self._send(batch)
                if sent is None:  # shutdown abandoned it: its outcome is not written
                    failed = True
                else:
                    outcome = sent
                    failed = bool(outcome.retry or outcome.defer)
                    if pipelined:
                        recording.append(lane(batch.store).submit(self._record, batch, outcome))
                    else:
                        stats.add(self._record(batch, outcome))
                settle(wait=False)
                next_batch: Batch | None = None
                if ahead is not None:
                    future, ahead = ahead, None
                    next_batch = future.result()
                if failed or not self._may_send():
                    if next_batch is not None:
                        self._release(next_batch)
                    break
                if next_batch is not None and self._stale(next_batch):
                    # It waited through a slow send: sending it now could outlast its
                    # lease. Hand it back and claim afresh.
                    self._release(next_batch)
                    next_batch = self._claim_on(lane, next_batch.store, pipelined)
                if next_batch is None and pipelined and not full:
                    # Nothing was claimed ahead (the batch was not full: the backlog's
                    # end, or events trickling in): the other connection is idle, so it
                    # looks for what committed since (ticking) while this batch's
                    # outcome is written, instead of after it.
                    next_batch = self._claim_on(lane, other, pipelined)
                # A claim ahead that found nothing is not the end: the snapshot engine
                # leases a batch whole, so the rest of the batch just sent is claimable
                # only once its chunk is finished. Ask the store that sent it (after
                # its outcome is written: its lane runs in order).
                batch = (
                    next_batch
                    if next_batch is not None
                    else self._claim_on(lane, batch.store, pipelined)
                )
            settle(wait=True)
        except DatabaseUnavailable:
            stats.interrupted = True
        finally:
            if ahead is not None:  # the batch in hand failed: hand back the one ahead
                with contextlib.suppress(OutboxDatabaseError):
                    late = ahead.result()
                    if late is not None:
                        self._release(late)
            for pending in recording:
                try:
                    done = pending.result()
                except DatabaseUnavailable:
                    stats.interrupted = True
                    continue
                if done is not None:
                    stats.add(done)
            for executor in lanes.values():
                executor.shutdown(wait=True)
            self.idle.set()
        return stats

    def _claim_on(
        self,
        lane: Callable[[DrainStorage], ThreadPoolExecutor],
        store: DrainStorage,
        pipelined: bool,
    ) -> Batch | None:
        """Claim on ``store`` now: on its lane (after the outcome queued there), or here."""
        if not pipelined:
            return self._claim(store)
        return lane(store).submit(self._claim, store).result()

    def pause_remaining(self) -> float:
        """Seconds until the sink may be called again (0 when not paused)."""
        return max(0.0, self.paused_until - self.clock())

    def _may_send(self) -> bool:
        return not self.stop_event.is_set() and self.pause_remaining() <= 0

    def _claim(self, store: DrainStorage) -> Batch | None:
        """Claim the next batch on ``store``, unless stopping or paused; None when
        nothing is due."""
        if not self._may_send():
            return None
        started = self.clock()  # the lease runs from (a little after) this moment
        batch = store.claim(
            self.settings.batch_size, self.settings.max_batch_bytes, self.settings.lease_seconds
        )
        if batch is None:
            return None
        batch.claimed_at = started
        with self._lock:
            self._held.add(batch)
        self._prepare(batch)
        return batch

    def _prepare(self, batch: Batch) -> None:
        """Build the payloads as soon as the batch is claimed (a batch claimed ahead:
        while the one before is on the wire), and let a sink that can start on the
        request bodies (``prepare``: the PostHog sink compresses them) do so."""
        payloads = {e.id: e.outbound() for e in batch.events if e.problem is None}
        with self._lock:
            self._payloads[batch] = payloads
        prepare = getattr(self.sink, "prepare", None)
        to_sink = [
            e for e in batch.events if e.id in payloads and e.destination != DESTINATION_METRICS
        ]
        if prepare is not None and to_sink:
            for chunk in self._by_size(to_sink, payloads):
                prepare([payloads[e.id] for e in chunk])

    def _stale(self, batch: Batch) -> bool:
        """A batch claimed ahead has used a quarter of its lease waiting its turn."""
        return self.clock() - batch.claimed_at > self.settings.lease_seconds / 4

    def _release(self, batch: Batch) -> None:
        """Hand a claimed but unsent batch back at once, counting no attempt."""
        with self._lock:
            self._held.discard(batch)
            self._payloads.pop(batch, None)
        batch.store.release(batch)

    def _send(self, batch: Batch) -> Outcome | None:
        """Ship one batch; its outcome, to be recorded, or None if shutdown abandoned
        it (then nothing may be written for it)."""
        started = self.clock()
        outcome = self._ship(batch, batch.claimed_at)
        self.observer.batch_sent(self, batch, outcome, self.clock() - started)
        with self._lock:
            abandoned = batch in self._abandoned
            self._abandoned.discard(batch)
            self._held.discard(batch)
        if abandoned:
            log.warning(
                "a batch released at shutdown finished its requests; its outcome is not "
                "recorded and its events will be sent again with the same uuids",
                extra={"action": "abandoned_batch_finished", "events": len(batch.events)},
            )
            return None
        return outcome

    # -- shipping ---------------------------------------------------------------------

    def _ship(self, batch: Batch, claimed_at: float) -> Outcome:
        outcome = Outcome()
        events = self._sendable(batch.events, outcome)
        with self._lock:
            built = self._payloads.pop(batch, None)
        payloads = built if built is not None else {e.id: e.outbound() for e in events}
        metrics_only = [e for e in events if e.destination == DESTINATION_METRICS]
        if metrics_only:
            self._count_metrics(metrics_only, payloads, outcome)
        to_sink = [e for e in events if e.destination != DESTINATION_METRICS]
        chunks = self._by_size(to_sink, payloads) if to_sink else []
        # Splitting a refused batch takes many requests; stop at half the lease so the
        # outcome is written while the lease still holds the events, and release the
        # rest.
        budget = claimed_at + self.settings.lease_seconds / 2
        # The single events refused in a row with the same answer (the breaker).
        streak: list[ClaimedEvent] = []
        streak_key = ""
        while chunks:
            chunk = chunks.pop(0)
            rest = [e.id for c in [chunk, *chunks] for e in c]
            if self.pause_remaining() > 0:  # a 429 earlier in this batch: no more requests
                outcome.defer.extend(rest)
                outcome.defer_delay = self.pause_remaining()
                outcome.defer_reason = self.sink_state
                break
            if outcome.requests and self.clock() > budget:
                outcome.defer.extend(rest)
                outcome.defer_delay = 0.0
                outcome.defer_reason = "released"
                log.info(
                    "batch took half its lease; releasing %d unsent events",
                    len(rest),
                    extra={"action": "batch_released", "events": len(rest)},
                )
                break
            outcome.requests += 1
            try:
                self.sink.send([payloads[e.id] for e in chunk])
            except EventResultsError as exc:  # an answer per event (capture v1): no split
                outcome.shipped.extend(chunk[i].id for i in exc.accepted)
                outcome.dead.extend((chunk[i].id, why) for i, why in exc.dropped)
                if exc.retry:
                    outcome.retry.extend(chunk[i].id for i in exc.retry)
                    outcome.retry_error = exc.retry_error
                    self._failed(exc.retry_error)
                log.warning(
                    "%s",
                    exc,
                    extra={
                        "action": "events_partly_accepted",
                        "accepted": len(exc.accepted),
                        "retry": len(exc.retry),
                        "dropped": len(exc.dropped),
                    },
                )
                continue
            except BillingLimitedError as exc:  # before RetryableSinkError, its base
                delay = min(
                    max(exc.retry_after or 0.0, self.settings.rate_limit_pause),
                    self.settings.retry_after_max,
                )
                self._pause(delay, SINK_RATE_LIMITED, str(exc))
                log.error(
                    "PostHog refused the batch: the project is over its billing limit (%s); "
                    "pausing all sends for %.0fs; each refused event counts an attempt",
                    exc,
                    delay,
                    extra={"action": "sink_billing_limited", "pause_seconds": delay},
                )
                outcome.retry.extend(e.id for e in chunk)
                outcome.retry_error = str(exc)
                break
            except RejectedError as exc:
                if len(chunk) > 1:
                    mid = len(chunk) // 2
                    chunks[0:0] = [chunk[:mid], chunk[mid:]]
                    log.info(
                        "batch of %d refused (%s); splitting to find the bad event",
                        len(chunk),
                        exc,
                        extra={"action": "batch_split", "events": len(chunk)},
                    )
                    continue
                key = _POSITION.sub("", exc.detail).strip()
                if key != streak_key:
                    streak, streak_key = [], key
                streak.append(chunk[0])
                outcome.dead.append((chunk[0].id, str(exc)))
                if len(streak) < self.settings.rejection_breaker:
                    continue
                # The endpoint gives every single event the same answer: it refuses
                # requests, not events. Nothing of this run is buried.
                held = {e.id for e in streak}
                outcome.dead = [(i, error) for i, error in outcome.dead if i not in held]
                waiting = [e.id for e in streak] + [e.id for c in chunks for e in c]
                self._hold(outcome, waiting, SINK_REQUEST_REJECTED, str(exc))
                log.error(
                    "%d single events in a row were refused with the same answer (%s): "
                    "the endpoint refuses requests, not events; the batch is held, "
                    "nothing is buried, and sending resumes in %.0fs",
                    len(streak),
                    exc,
                    self.settings.unauthorized_pause,
                    extra={"action": "rejection_breaker", "events": len(waiting)},
                )
                break
            except RequestRejectedError as exc:
                self._hold(outcome, rest, SINK_REQUEST_REJECTED, str(exc))
                log.error(
                    "the sink refused the request itself, not an event (%s): every event "
                    "stays pending and sending resumes in %.0fs",
                    exc,
                    self.settings.unauthorized_pause,
                    extra={"action": "request_rejected", "events": len(rest)},
                )
                break
            except RedirectError as exc:
                self._hold(outcome, rest, SINK_REDIRECTED, str(exc))
                log.error(
                    "the sink answered with a redirect to %s, which is not followed: set "
                    "POSTHOG_HOST to the address events should go to; every event stays "
                    "pending and sending resumes in %.0fs",
                    exc.location or "(no Location header)",
                    self.settings.unauthorized_pause,
                    extra={
                        "action": "sink_redirected",
                        "location": exc.location,
                        "status": exc.status,
                    },
                )
                break
            except RateLimitedError as exc:
                delay = (
                    exc.retry_after
                    if exc.retry_after is not None
                    else self.settings.rate_limit_pause
                )
                if exc.retry_after is not None and delay > self.settings.retry_after_max:
                    log.warning(
                        "Retry-After asks for %.0fs, more than OUTBOX_RETRY_AFTER_MAX; "
                        "pausing %.0fs instead",
                        delay,
                        self.settings.retry_after_max,
                        extra={
                            "action": "retry_after_clamped",
                            "retry_after": delay,
                            "pause_seconds": self.settings.retry_after_max,
                        },
                    )
                    delay = self.settings.retry_after_max
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
                outcome.defer_reason = SINK_RATE_LIMITED
                break
            except UnauthorizedError as exc:
                self._hold(outcome, rest, SINK_UNAUTHORIZED, str(exc))
                log.error(
                    "the sink refused the API key (%s): check POSTHOG_API_KEY; every event "
                    "stays pending and sending resumes in %.0fs",
                    exc,
                    self.settings.unauthorized_pause,
                    extra={"action": "sink_unauthorized"},
                )
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
                outcome.accepted += 1
                streak, streak_key = [], ""
        by_id = {e.id: e for e in batch.events}
        for event_id, error in outcome.dead:
            log.warning(
                "event refused by the sink: %s",
                error,
                extra={"action": "event_rejected", "uuid": str(by_id[event_id].uuid)},
            )
        # Only an answer from the sink says it works again: a batch of metrics-only
        # events (or one the sink refused) leaves the state as it was.
        if outcome.accepted and not outcome.retry and not outcome.defer:
            self.sink_state = SINK_OK
        return outcome

    def _hold(self, outcome: Outcome, ids: list[int], state: str, error: str) -> None:
        """A configuration error: pause, and defer ``ids`` without counting an attempt."""
        self._pause(self.settings.unauthorized_pause, state, error)
        outcome.defer.extend(ids)
        outcome.defer_delay = self.settings.unauthorized_pause
        outcome.defer_error = error
        outcome.defer_reason = state

    def _sendable(self, events: list[ClaimedEvent], outcome: Outcome) -> list[ClaimedEvent]:
        """The events that can be sent; the others (a row PostHog could not use, as
        the claim found) die in this batch's outcome with the claim's error."""
        sendable = []
        for event in events:
            if event.problem is None:
                sendable.append(event)
                continue
            outcome.dead.append((event.id, event.problem))
            log.warning(
                "event cannot be sent as stored: %s",
                event.problem,
                extra={"action": "event_invalid", "uuid": str(event.uuid), "id": event.id},
            )
        return sendable

    def _count_metrics(
        self, events: list[ClaimedEvent], payloads: dict[int, Outbound], outcome: Outcome
    ) -> None:
        """Count metrics-only events, one at a time: one the metrics sink cannot read
        (a row written by hand may hold anything) dies alone."""
        for event in events:
            try:
                self.metrics_sink.send([payloads[event.id]])
            except Exception as exc:
                detail = ascii(str(exc)[:200])[1:-1]  # escaped: it may quote the event
                error = f"metrics-only event cannot be counted: {type(exc).__name__}: {detail}"
                outcome.dead.append((event.id, error))
                log.warning(
                    "%s",
                    error,
                    extra={"action": "event_invalid", "uuid": str(event.uuid), "id": event.id},
                )
            else:
                outcome.shipped.append(event.id)
                outcome.metrics_only += 1

    def _by_size(
        self, events: list[ClaimedEvent], payloads: dict[int, Outbound]
    ) -> list[list[ClaimedEvent]]:
        """Split a batch into requests of at most ``max_batch_bytes`` of event JSON."""
        limit = self.settings.max_batch_bytes
        chunks: list[list[ClaimedEvent]] = []
        current: list[ClaimedEvent] = []
        size = 0
        for event in events:
            n = len(payloads[event.id].json) + 1
            if current and size + n > limit:
                chunks.append(current)
                current, size = [], 0
            current.append(event)
            size += n
        if current:
            chunks.append(current)
        return chunks

    def _pause(self, seconds: float, state: str, error: str) -> None:
        self.paused_until = max(self.paused_until, self.clock() + max(0.0, seconds))
        self.sink_state = state
        self.last_error = error

    def _failed(self, error: str) -> None:
        self.sink_state = SINK_BACKING_OFF
        self.last_error = error

    # -- recording --------------------------------------------------------------------

    def _record(self, batch: Batch, outcome: Outcome) -> DrainStats:
        s = self.settings
        stats = DrainStats(batches=1)
        try:
            finished = batch.store.finish(
                batch,
                outcome,
                dedup_window=s.dedup_window,
                max_attempts=s.max_attempts,
                backoff_base=s.backoff_base,
                backoff_max=s.backoff_max,
            )
        except BatchLostError as exc:
            log.error(
                "could not record a batch's outcome (%s); its events will be shipped again "
                "with the same uuids",
                exc,
                extra={"action": "outcome_lost", "events": len(batch.events)},
            )
            stats.interrupted = True
            self.observer.batch_recorded(self, stats)
            return stats
        stats.shipped = finished.shipped
        stats.metrics_only = min(outcome.metrics_only, finished.shipped)
        stats.retried = finished.retried
        stats.dead = finished.dead_by_retry + len(outcome.dead)
        stats.dead_by_retry = finished.dead_by_retry
        stats.deferred = len(outcome.defer)
        stats.ledger = finished.ledger
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

    # -- shutdown ---------------------------------------------------------------------

    def abandon_inflight(self) -> int:
        """Release every batch this drainer holds, at once (for shutdown); returns how
        many events were released. A send still in flight is fenced off: its outcome
        is not written."""
        with self._lock:
            batches = list(self._held)
            self._abandoned.update(batches)
            self._held.clear()
            self._payloads.clear()
        released = 0
        for batch in batches:
            if batch.store.release(batch):
                released += len(batch.events)
        return released


class DrainObserver:
    """Hooks for metrics; the default does nothing."""

    def batch_sent(self, drainer: Drainer, batch: Batch, outcome: Outcome, seconds: float) -> None:
        """A batch's requests are done (before its outcome is written)."""

    def batch_recorded(self, drainer: Drainer, stats: DrainStats) -> None:
        """A batch's outcome is in the database."""
