"""The storage protocol: what the drainer, the commands and housekeeping ask of an
engine, and the engine-neutral types they see.

An engine keeps events until they are shipped or purged, hands them out in leased
batches and records what happened to each. Three protocols, one per caller:

- :class:`DrainStorage`, the drainer's: :meth:`~DrainStorage.claim` a batch,
  :meth:`~DrainStorage.finish` it with its outcome, or
  :meth:`~DrainStorage.release` it unsent.
- :class:`Inspection`, the operator's (``status``, ``dead``, ``retry``, ``purge``,
  metrics).
- :class:`Housekeeping`, the periodic jobs.

(:class:`WorkerStates`, each worker's reported state, sits beside them: one table
whatever the engine.)

:class:`Storage` is all three. An engine promises what the docstrings here say and
nothing about how: a batch may be a leased row read again in short transactions
(:class:`worker.storage.snapshot_storage.SnapshotStorage`) or a list in memory. The
behaviour suite ``tests/storage`` checks every engine against these promises.

Event ids (:attr:`ClaimedEvent.id`, and the ids in :class:`BatchOutcome`) are opaque
integers the engine chooses; only the engine that handed them out reads them.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from outbox.exceptions import OutboxDatabaseError
from worker.sinks.base import Outbound

_dumps = json.JSONEncoder(ensure_ascii=False).encode


# -- errors -----------------------------------------------------------------------------


class DatabaseUnavailable(OutboxDatabaseError):
    """The database cannot be reached right now; the worker will reconnect."""


class ConnectionReset(DatabaseUnavailable):
    """A connection that worked was closed under a statement; the next call connects
    again at once (only if that fails is the database unavailable)."""


class DatabaseTimeout(OutboxDatabaseError):
    """PostgreSQL cut a statement short; the database itself is up."""

    #: The PostgreSQL setting that ended the statement.
    setting = ""


class StatementTimeout(DatabaseTimeout):
    """A statement ran longer than ``statement_timeout`` and was canceled."""

    setting = "statement_timeout"


class LockTimeout(DatabaseTimeout):
    """A statement waited longer than ``lock_timeout`` for a lock another session holds
    (an outbox table locked by a migration, ``LOCK TABLE`` or ``VACUUM FULL``)."""

    setting = "lock_timeout"


class BatchLostError(OutboxDatabaseError):
    """The batch ended before its outcome was written (the connection was lost, its
    lease ran out, it was released, or a statement of the outcome was cut short by a
    timeout): nothing of it was written, and its events will be claimed and shipped
    again with the same uuids."""


# -- what a batch holds -----------------------------------------------------------------


# Not frozen: building a frozen dataclass costs twice as much (each field through
# object.__setattr__), and the drain builds one per event.
@dataclass(slots=True)
class ClaimedEvent:
    """A claimed event, as the drainer ships it.

    Every field is plain text, integers or a uuid, so reading an event cannot fail on
    what it holds. An event PostHog could not use has ``problem`` set (the column and
    what is wrong, e.g. ``timestamp: infinity is not a finite time``); the drainer
    buries it with that error instead of sending it.
    """

    #: The engine's opaque id for the event (what :class:`BatchOutcome` names).
    id: int
    uuid: uuid.UUID
    event: str
    distinct_id: str
    #: The stored properties as PostgreSQL renders jsonb (never decoded here), without
    #: ``$ignore_sent_at`` and (unless ``has_ip``) ``$geoip_disable``, which
    #: :meth:`outbound` sets itself.
    properties_json: str
    #: The stored timestamp as PostgreSQL writes it in UTC, ISO style
    #: (``2026-03-04 05:06:07.890123+00``, or ``infinity`` in a row with a problem).
    timestamp: str
    attempts: int
    #: ``posthog``, or ``metrics`` for a metrics-only event (counted, never sent).
    destination: str = "posthog"
    #: The properties have a top-level ``$ip`` string.
    has_ip: bool = False
    #: Why the event cannot be sent as it is stored, or None.
    problem: str | None = None

    def outbound(self) -> Outbound:
        """The PostHog capture event, as JSON text: the event's uuid and timestamp, and
        ``$ignore_sent_at`` so PostHog keeps the timestamp on every re-send.

        ``$geoip_disable`` is added too (as posthog-python does), because the request
        comes from the worker, whose address says nothing about the user; an event
        whose properties have a top-level ``$ip`` keeps GeoIP (and its own
        ``$geoip_disable``, if it has one). Each key is in the object once.

        Meant for events without a ``problem`` (the drainer never sends the others).
        """
        props = self.properties_json
        extra = _EXTRA_WITH_IP if self.has_ip else _EXTRA
        # The object without its closing brace; "{}" takes the extra keys alone.
        head = "{" + extra[2:] if props == "{}" else props[:-1] + extra
        # '2026-03-04 05:06:07.89+00' -> '2026-03-04T05:06:07.890000+00:00', as
        # datetime.isoformat() writes it (no fraction at all when it is zero).
        ts = self.timestamp
        clock = ts[11:19] if len(ts) == 22 else ts[11:-3].ljust(15, "0")
        # One f-string: a chain of + copies the growing text once per piece.
        return Outbound(
            f'{{"event": {_dumps(self.event)}, "distinct_id": {_dumps(self.distinct_id)}, '
            f'"properties": {head}}}, "uuid": "{self.uuid}", '
            f'"timestamp": "{ts[:10]}T{clock}+00:00"}}'
        )


_EXTRA_WITH_IP = ', "$ignore_sent_at": true'
_EXTRA = _EXTRA_WITH_IP + ', "$geoip_disable": true'


@dataclass(eq=False, slots=True)
class Batch:
    """A claimed batch: its events are the claimer's alone until
    :meth:`DrainStorage.finish` or :meth:`DrainStorage.release` ends it, or its lease
    runs out."""

    #: The engine that claimed it (and the only one that can finish or release it).
    store: DrainStorage
    events: list[ClaimedEvent]
    #: The engine's own handle on the batch (a connection, a batch id); nobody else
    #: reads it.
    handle: Any = None
    #: When the drainer asked for it (its clock): the lease runs from about then.
    claimed_at: float = 0.0
    #: Set once the batch is over (finished, released or lost).
    closed: bool = False


@dataclass
class BatchOutcome:
    """What happened to the events of a batch, and so what
    :meth:`DrainStorage.finish` writes. Each list holds :attr:`ClaimedEvent.id`\\ s."""

    #: Delivered: never handed out again.
    shipped: list[int] = field(default_factory=list)
    #: Dead at once (refused for good), each with its own error; counts an attempt.
    dead: list[tuple[int, str]] = field(default_factory=list)
    #: Failed for now: counts an attempt and backs off, or dies on its last attempt.
    retry: list[int] = field(default_factory=list)
    retry_error: str = ""
    #: Events to try again after ``defer_delay`` seconds, counting no attempt.
    defer: list[int] = field(default_factory=list)
    defer_delay: float = 0.0
    #: Stored as the deferred events' last error when set (else theirs stays).
    defer_error: str | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """What :meth:`DrainStorage.finish` wrote."""

    shipped: int = 0
    retried: int = 0
    #: Events that used their last attempt in this retry.
    dead_by_retry: int = 0
    #: What the finish added to the delivery ledger, summed over days and events:
    #: ``(destination, outcome, count)`` with outcome ``delivered`` or ``dead``.
    ledger: tuple[tuple[str, str, int], ...] = ()


#: The outcomes the delivery ledger counts (its columns).
LEDGER_OUTCOMES = ("delivered", "dead", "purged")


@dataclass(frozen=True)
class LedgerRow:
    """One line of the delivery ledger (``outbox_ledger``): how many events of one
    name, for one destination, whose timestamp falls on one UTC day, were delivered,
    died, or were purged dead. Each count grows in the transaction that wrote the
    outcome, so an outcome that was lost (and the event sent again) is counted once."""

    day: datetime.date
    event: str
    #: ``posthog``, or ``metrics`` for metrics-only events.
    destination: str
    delivered: int
    dead: int
    purged: int


@dataclass(frozen=True, slots=True)
class Requeued:
    """What :meth:`Inspection.requeue_dead` did."""

    requeued: int
    #: Dead events it left dead: their stored content could never be sent (migration
    #: 0004's constraints refuse it in a pending row). Purge them.
    unsendable: int


@dataclass(frozen=True, slots=True)
class Backlog:
    """Counts of the stored events."""

    pending: int
    #: Pending events whose time has come, including those in a batch in flight.
    due: int
    #: Pending events that have used at least one attempt.
    retrying: int
    dead: int
    oldest_pending_age_seconds: float


# -- the protocols ----------------------------------------------------------------------


class DrainStorage(Protocol):
    """The drainer's side: leased batches of due events.

    One engine object holds at most one batch at a time (the drainer uses two objects
    to claim ahead). Every method may raise :class:`DatabaseUnavailable` (the next call
    tries again), :class:`DatabaseTimeout`, or another
    :class:`~outbox.exceptions.OutboxDatabaseError`.
    """

    def claim(self, limit: int, max_bytes: int, lease_seconds: float) -> Batch | None:
        """Take up to ``limit`` due events, oldest due first, as a new :class:`Batch`;
        None when none are due.

        The events' JSON adds up to at most ``max_bytes``, except that a batch always
        holds at least one event. No other claimer gets any of them while the batch
        is held. If the batch is neither finished nor released within about
        ``lease_seconds``, the lease runs out: its events are due again as they were
        (no attempt counted), and finishing it raises :class:`BatchLostError`.
        Raises :class:`RuntimeError` if this object already holds a batch.
        """
        ...

    def finish(
        self,
        batch: Batch,
        outcome: BatchOutcome,
        *,
        dedup_window: float,
        max_attempts: int,
        backoff_base: float,
        backoff_max: float,
    ) -> Finished:
        """Write ``outcome`` for the batch, all of it or none, and end the batch.

        - ``shipped`` events are gone for good (their dedup keys are kept for
          ``dedup_window`` seconds more);
        - ``dead`` events are dead with their own error, one attempt counted;
        - ``retry`` events count an attempt and are due again after a jittered backoff
          of ``backoff_base * 2**attempts`` seconds, at most ``backoff_max``; one that
          reaches ``max_attempts`` is dead instead, with ``retry_error`` as its last
          error either way;
        - ``defer`` events count no attempt and are due after ``defer_delay`` seconds
          (a zero delay with no ``defer_error`` leaves them as they were);
        - events the outcome does not name come back unchanged, due at once.

        Raises :class:`BatchLostError`, having written nothing, when the batch is
        already over (its lease ran out, it was released or finished, the connection
        was lost) or its outcome could not be written; its events are then claimed
        again with the same uuids.
        """
        ...

    def release(self, batch: Batch) -> bool:
        """Hand the batch back unsent: its events are due again at once, with no
        attempt counted. False when the batch was already over."""
        ...

    def ping(self) -> bool:
        """True when the storage answers."""
        ...

    def ping_or_raise(self) -> None:
        """Raise what keeps the storage from answering (unreachable, not installed)."""
        ...

    def close(self) -> None:
        """Let go of the engine's resources; a batch still held comes back as if
        released."""
        ...


class Inspection(Protocol):
    """The operator's side: counts and dead letters (``status``, ``dead``, ``retry``,
    ``purge``, the backlog metrics)."""

    def backlog(self) -> Backlog:
        """Exact counts of pending, due, retrying and dead events, and the age of the
        oldest pending one."""
        ...

    def backlog_capped(self, cap: int = 100_000) -> Backlog:
        """Like :meth:`backlog`, at a cost that does not grow with the backlog: counts
        are exact up to ``cap``; past it, pending may be an estimate."""
        ...

    def top_events(self, status: str, limit: int = 10) -> list[tuple[str, int]]:
        """The most frequent event names among events of ``status`` (``pending`` or
        ``dead``), with their counts, most frequent first."""
        ...

    def top_errors(self, limit: int = 10) -> list[dict[str, Any]]:
        """Events with a last error, grouped by status and error text, most frequent
        first: ``status``, ``error``, ``count``, ``since`` (the oldest one's creation
        time, ISO 8601 text in UTC)."""
        ...

    def dead(self, limit: int = 100, event: str | None = None) -> list[dict[str, Any]]:
        """Dead events, oldest first (of one name if ``event``): ``id``, ``uuid``,
        ``event``, ``distinct_id``, ``attempts``, ``last_error``, ``created_at`` (ISO
        8601 text in UTC)."""
        ...

    def requeue_dead(self, ids: Sequence[int] | None = None, event: str | None = None) -> Requeued:
        """Make dead events (all, those ``ids``, or those named ``event``) pending and
        due again with no attempts and no error, but for those that could never be
        sent as stored (they stay dead); says how many of each."""
        ...

    def purge_dead(self, older_than_seconds: float) -> int:
        """Delete dead events created more than ``older_than_seconds`` ago; returns
        how many."""
        ...

    def in_flight(self) -> list[dict[str, Any]]:
        """Batches held by workers now: ``worker``, ``held_seconds``, ``state``."""
        ...

    def ledger(self, since: datetime.date, event: str | None = None) -> list[LedgerRow]:
        """The delivery ledger's rows of the days from ``since`` on (of one name if
        ``event``), ordered by day, event and destination.

        :meth:`DrainStorage.finish` adds its delivered (``shipped``) and dead events
        (``dead``, and ``retry`` events that used their last attempt) in the
        transaction that writes the outcome, grouped by the UTC day of each event's
        timestamp, its name and its destination; :meth:`purge_dead` adds the events
        it deletes to ``purged`` in its own statement. A finish that raises
        :class:`BatchLostError` adds nothing. The counts are of outcomes, not of
        states: an event requeued after it died and delivered later counts in
        ``dead`` and in ``delivered``."""
        ...


class Housekeeping(Protocol):
    """The periodic jobs' side."""

    def expire_dedup_keys(self, limit: int = 10_000) -> int:
        """Forget up to ``limit`` dedup keys whose window has passed; returns how
        many."""
        ...

    def expire_ledger(self, retention_days: int) -> int:
        """Delete the delivery ledger's rows of days more than ``retention_days``
        before today (UTC); returns how many."""
        ...

    def maintain(self) -> None:
        """One step of the engine's own upkeep, called periodically by one worker's
        housekeeping (where the snapshot engine ticks and rotates its tables). Safe
        to call at any time, from any worker."""
        ...


class Storage(DrainStorage, Inspection, Housekeeping, Protocol):
    """All of an engine: what the worker and the commands use."""


class WorkerStates(Protocol):
    """Each worker's own line on what it is doing (``outbox_worker_state``, see
    :mod:`worker.worker_state`): not part of :class:`Storage`, since it is one table
    whatever engine keeps the events. Each method raises
    :class:`worker.worker_state.WorkerStateUnavailable` when the table cannot be used."""

    def write_worker_state(self, host: str, state: str, reason: str) -> None:
        """Write this worker's row: the host it sends to, its state and why."""
        ...

    def delete_worker_state(self) -> None:
        """Delete this worker's row."""
        ...

    def expire_worker_states(self, older_than_seconds: float) -> int:
        """Delete rows not written for ``older_than_seconds``; returns how many."""
        ...

    def worker_states(self) -> list[dict[str, Any]]:
        """Every worker's row: worker, host, state, reason, updated_at, age_seconds."""
        ...
