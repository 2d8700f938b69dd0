"""An in-memory storage engine, for tests of the worker's logic without a database.

:class:`MemoryStorage` keeps what the protocol promises (leased batches, retries with
backoff, dead letters, dedup keys) in a :class:`MemoryEvents` several storage objects
can share, as several connections share one database. Time comes from an injectable
clock (seconds since the epoch), so a test can let a lease or a backoff run out at
once. Nothing survives the process: never use it to run a worker for real.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid as uuid_module
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from worker.storage.base import (
    Backlog,
    Batch,
    BatchLostError,
    BatchOutcome,
    ClaimedEvent,
    Finished,
    LedgerRow,
    Requeued,
    Storage,
)

#: The keys the worker sets itself on every event it sends (see ClaimedEvent.outbound).
_OWN_KEYS = ("$ignore_sent_at", "$geoip_disable")
#: What each event counts for against a claim's ``max_bytes`` beyond its properties
#: (as the SQL claim counts it).
_OVERHEAD = 200


@dataclass(slots=True)
class _Row:
    id: int
    uuid: uuid_module.UUID
    event: str
    distinct_id: str
    properties: dict[str, Any]
    timestamp: float
    destination: str
    created_at: float
    next_attempt_at: float
    dedup_key: str | None = None
    status: str = "pending"
    attempts: int = 0
    last_error: str | None = None
    #: The lease token of the batch holding it, if any.
    held_by: int | None = None


@dataclass(slots=True)
class _Lease:
    token: int
    worker: str
    started: float
    ends: float
    ids: list[int]


class MemoryEvents:
    """The shared state: events, dedup keys, leases and the delivery ledger, behind
    one lock."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.lock = threading.RLock()
        self.rows: dict[int, _Row] = {}
        self.dedup_keys: dict[str, float] = {}
        self.leases: dict[int, _Lease] = {}
        #: (day, event, destination) -> [delivered, dead, purged].
        self.ledger: dict[tuple[date, str, str], list[int]] = {}
        self._next_id = 1
        self._next_token = 1

    def put(
        self,
        event: str,
        distinct_id: str,
        properties: Mapping[str, Any] | None = None,
        *,
        uuid: uuid_module.UUID | None = None,
        destination: str = "posthog",
        timestamp: float | None = None,
        dedup_key: str | None = None,
    ) -> uuid_module.UUID | None:
        """Add one event, due at once; None (and nothing added) when ``dedup_key`` is
        already taken."""
        with self.lock:
            now = self.clock()
            if dedup_key is not None:
                if self.dedup_keys.get(dedup_key, now) > now:
                    return None
                self.dedup_keys[dedup_key] = float("inf")
            row = _Row(
                id=self._next_id,
                uuid=uuid or uuid_module.uuid4(),
                event=event,
                distinct_id=distinct_id,
                properties=dict(properties or {}),
                timestamp=now if timestamp is None else timestamp,
                destination=destination,
                created_at=now,
                next_attempt_at=now,
                dedup_key=dedup_key,
            )
            self._next_id += 1
            self.rows[row.id] = row
            return row.uuid

    def count(self, row: _Row, outcome: int) -> None:
        """Add ``row`` to the ledger (``outcome``: 0 delivered, 1 dead, 2 purged)."""
        day = datetime.fromtimestamp(row.timestamp, UTC).date()
        self.ledger.setdefault((day, row.event, row.destination), [0, 0, 0])[outcome] += 1

    def expire_leases(self) -> None:
        """Let go of the events of every batch whose lease has run out."""
        now = self.clock()
        for token in [t for t, lease in self.leases.items() if lease.ends <= now]:
            self._end(token)

    def _end(self, token: int) -> None:
        lease = self.leases.pop(token, None)
        for event_id in lease.ids if lease else ():
            row = self.rows.get(event_id)
            if row is not None and row.held_by == token:
                row.held_by = None

    def _lease(self, worker: str, ids: list[int], lease_seconds: float) -> int:
        token = self._next_token
        self._next_token += 1
        now = self.clock()
        self.leases[token] = _Lease(token, worker, now, now + lease_seconds, ids)
        for event_id in ids:
            self.rows[event_id].held_by = token
        return token


class MemoryStorage:
    """One "connection" to a :class:`MemoryEvents`: implements
    :class:`worker.storage.base.Storage`. It holds at most one batch at a time."""

    def __init__(self, events: MemoryEvents | None = None, *, worker_id: str = "memory") -> None:
        self.events = events if events is not None else MemoryEvents()
        self.worker_id = worker_id
        self._batch: Batch | None = None

    # -- the batch life cycle ---------------------------------------------------------

    def claim(self, limit: int, max_bytes: int, lease_seconds: float) -> Batch | None:
        """See :meth:`worker.storage.base.DrainStorage.claim`."""
        data = self.events
        with data.lock:
            data.expire_leases()
            if self._batch is not None and self._batch.handle in data.leases:
                raise RuntimeError("this store already holds a batch; finish or release it")
            self._forget()
            now = data.clock()
            due = sorted(
                (
                    r
                    for r in data.rows.values()
                    if r.status == "pending" and r.held_by is None and r.next_attempt_at <= now
                ),
                key=lambda r: (r.next_attempt_at, r.id),
            )
            chosen: list[_Row] = []
            size = 0
            for row in due[:limit]:
                size += len(_properties_json(row.properties)) + _OVERHEAD
                if chosen and size > max_bytes:
                    break
                chosen.append(row)
            if not chosen:
                return None
            token = data._lease(self.worker_id, [r.id for r in chosen], lease_seconds)
            self._batch = Batch(store=self, events=[_claimed(r) for r in chosen], handle=token)
            return self._batch

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
        """See :meth:`worker.storage.base.DrainStorage.finish`."""
        data = self.events
        with data.lock:
            data.expire_leases()
            live = batch.store is self and not batch.closed and batch.handle in data.leases
            if not live or self._batch is not batch:
                batch.closed = True
                self._forget()
                raise BatchLostError("the batch's lease is over")
            token = batch.handle
            now = data.clock()

            done: set[int] = set()

            def held(event_id: int) -> _Row | None:
                """The batch's row, the first time the outcome names it (each event's
                first outcome is the one written, as the snapshot engine writes it)."""
                row = data.rows.get(event_id)
                if row is None or row.held_by != token or event_id in done:
                    return None
                done.add(event_id)
                return row

            counted: Counter[tuple[str, str]] = Counter()
            shipped = 0
            for event_id in outcome.shipped:
                row = held(event_id)
                if row is None:
                    continue
                del data.rows[event_id]
                shipped += 1
                data.count(row, 0)
                counted[row.destination, "delivered"] += 1
                if row.dedup_key is not None:
                    data.dedup_keys[row.dedup_key] = now + dedup_window
            for event_id, error in outcome.dead:
                if (row := held(event_id)) is not None:
                    row.status, row.last_error = "dead", error[:2000]
                    row.attempts += 1
                    data.count(row, 1)
                    counted[row.destination, "dead"] += 1
            retried = dead_by_retry = 0
            for event_id in outcome.retry:
                if (row := held(event_id)) is None:
                    continue
                backoff = min(backoff_max, backoff_base * 2 ** min(row.attempts, 40))
                row.attempts += 1
                row.last_error = outcome.retry_error[:2000]
                row.next_attempt_at = now + backoff * (0.5 + random.random() / 2)
                if row.attempts >= max_attempts:
                    row.status = "dead"
                    dead_by_retry += 1
                    data.count(row, 1)
                    counted[row.destination, "dead"] += 1
                else:
                    retried += 1
            if outcome.defer and (outcome.defer_delay > 0 or outcome.defer_error):
                for event_id in outcome.defer:
                    if (row := held(event_id)) is not None:
                        row.next_attempt_at = now + outcome.defer_delay
                        if outcome.defer_error is not None:
                            row.last_error = outcome.defer_error
            data._end(token)
            batch.closed = True
            self._batch = None
        ledger = tuple((dest, what, n) for (dest, what), n in sorted(counted.items()))
        return Finished(
            shipped=shipped, retried=retried, dead_by_retry=dead_by_retry, ledger=ledger
        )

    def release(self, batch: Batch) -> bool:
        """See :meth:`worker.storage.base.DrainStorage.release`."""
        data = self.events
        with data.lock:
            data.expire_leases()
            live = not batch.closed and self._batch is batch and batch.handle in data.leases
            batch.closed = True
            if self._batch is batch:
                self._forget()
            return live

    def _forget(self) -> None:
        """End the batch this store holds, if any (its events are due again)."""
        if self._batch is not None:
            self._batch.closed = True
            self.events._end(self._batch.handle)
            self._batch = None

    def ping(self) -> bool:
        """Always True: memory always answers."""
        return True

    def ping_or_raise(self) -> None:
        """Never raises."""

    def close(self) -> None:
        """Hand back the batch held, if any."""
        with self.events.lock:
            self._forget()

    # -- inspection -------------------------------------------------------------------

    def backlog(self) -> Backlog:
        """See :meth:`worker.storage.base.Inspection.backlog`."""
        with self.events.lock:
            now = self.events.clock()
            rows = list(self.events.rows.values())
        pending = [r for r in rows if r.status == "pending"]
        oldest = min((r.created_at for r in pending), default=now)
        return Backlog(
            pending=len(pending),
            due=sum(1 for r in pending if r.next_attempt_at <= now),
            retrying=sum(1 for r in pending if r.attempts > 0),
            dead=sum(1 for r in rows if r.status == "dead"),
            oldest_pending_age_seconds=max(0.0, now - oldest),
        )

    def backlog_capped(self, cap: int = 100_000) -> Backlog:
        """Exact, whatever ``cap`` (counting memory is cheap)."""
        return self.backlog()

    def top_events(self, status: str, limit: int = 10) -> list[tuple[str, int]]:
        """See :meth:`worker.storage.base.Inspection.top_events`."""
        with self.events.lock:
            counts = Counter(r.event for r in self.events.rows.values() if r.status == status)
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]

    def top_errors(self, limit: int = 10) -> list[dict[str, Any]]:
        """See :meth:`worker.storage.base.Inspection.top_errors`."""
        groups: dict[tuple[str, str], list[float]] = {}
        with self.events.lock:
            for r in self.events.rows.values():
                if r.last_error is not None:
                    groups.setdefault((r.status, r.last_error[:200]), []).append(r.created_at)
        ordered = sorted(groups.items(), key=lambda item: -len(item[1]))[:limit]
        return [
            {"status": status, "error": error, "count": len(times), "since": _iso(min(times))}
            for (status, error), times in ordered
        ]

    def dead(self, limit: int = 100, event: str | None = None) -> list[dict[str, Any]]:
        """See :meth:`worker.storage.base.Inspection.dead`."""
        with self.events.lock:
            rows = sorted(
                (
                    r
                    for r in self.events.rows.values()
                    if r.status == "dead" and (event is None or r.event == event)
                ),
                key=lambda r: (r.created_at, r.id),
            )[:limit]
            return [
                {
                    "id": r.id,
                    "uuid": r.uuid,
                    "event": r.event,
                    "distinct_id": r.distinct_id,
                    "attempts": r.attempts,
                    "last_error": r.last_error,
                    "created_at": _iso(r.created_at),
                }
                for r in rows
            ]

    def requeue_dead(self, ids: Sequence[int] | None = None, event: str | None = None) -> Requeued:
        """See :meth:`worker.storage.base.Inspection.requeue_dead` (every event held
        here can be sent, so none is left dead)."""
        wanted = set(ids) if ids else None
        with self.events.lock:
            now = self.events.clock()
            requeued = 0
            for r in self.events.rows.values():
                if r.status != "dead" or (wanted is not None and r.id not in wanted):
                    continue
                if event is not None and r.event != event:
                    continue
                r.status, r.attempts, r.last_error, r.next_attempt_at = "pending", 0, None, now
                requeued += 1
        return Requeued(requeued=requeued, unsendable=0)

    def purge_dead(self, older_than_seconds: float) -> int:
        """See :meth:`worker.storage.base.Inspection.purge_dead`."""
        with self.events.lock:
            now = self.events.clock()
            gone = [
                r
                for r in self.events.rows.values()
                if r.status == "dead"
                and (r.created_at < now - older_than_seconds or r.created_at > now)
            ]
            for r in gone:
                del self.events.rows[r.id]
                self.events.count(r, 2)
                if r.dedup_key is not None:
                    self.events.dedup_keys.pop(r.dedup_key, None)
        return len(gone)

    def in_flight(self) -> list[dict[str, Any]]:
        """See :meth:`worker.storage.base.Inspection.in_flight`."""
        with self.events.lock:
            self.events.expire_leases()
            now = self.events.clock()
            leases = sorted(self.events.leases.values(), key=lambda lease: lease.started)
            return [
                {"worker": lease.worker, "held_seconds": now - lease.started, "state": "held"}
                for lease in leases
            ]

    def ledger(self, since: date, event: str | None = None) -> list[LedgerRow]:
        """See :meth:`worker.storage.base.Inspection.ledger`."""
        with self.events.lock:
            return [
                LedgerRow(day, name, destination, counts[0], counts[1], counts[2])
                for (day, name, destination), counts in sorted(self.events.ledger.items())
                if day >= since and (event is None or name == event)
            ]

    # -- housekeeping -----------------------------------------------------------------

    def expire_ledger(self, retention_days: int) -> int:
        """See :meth:`worker.storage.base.Housekeeping.expire_ledger`."""
        with self.events.lock:
            today = datetime.fromtimestamp(self.events.clock(), UTC).date()
            first = today - timedelta(days=retention_days)
            old = [key for key in self.events.ledger if key[0] < first]
            for key in old:
                del self.events.ledger[key]
        return len(old)

    def expire_dedup_keys(self, limit: int = 10_000) -> int:
        """See :meth:`worker.storage.base.Housekeeping.expire_dedup_keys`."""
        with self.events.lock:
            now = self.events.clock()
            old = [key for key, ends in self.events.dedup_keys.items() if ends <= now][:limit]
            for key in old:
                del self.events.dedup_keys[key]
        return len(old)

    def maintain(self) -> None:
        """Let go of the events of batches whose lease has run out."""
        with self.events.lock:
            self.events.expire_leases()


def _properties_json(properties: Mapping[str, Any]) -> str:
    return json.dumps(properties, ensure_ascii=False)


def _claimed(row: _Row) -> ClaimedEvent:
    """A row as the claim hands it out: the properties without the keys the worker
    sets itself (``$geoip_disable`` stays when the event has its own ``$ip``)."""
    has_ip = isinstance(row.properties.get("$ip"), str)
    drop = _OWN_KEYS[:1] if has_ip else _OWN_KEYS
    props = {k: v for k, v in row.properties.items() if k not in drop}
    stamp = datetime.fromtimestamp(row.timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
    return ClaimedEvent(
        id=row.id,
        uuid=row.uuid,
        event=row.event,
        distinct_id=row.distinct_id,
        properties_json=_properties_json(props),
        timestamp=stamp,
        attempts=row.attempts,
        destination=row.destination,
        has_ip=has_ip,
    )


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def _is_an_engine(store: MemoryStorage) -> Storage:
    return store  # mypy checks that MemoryStorage implements the protocol
