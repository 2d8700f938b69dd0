"""The storage behaviour suite's engines: one harness per engine.

A harness makes engine objects over one shared store of events (as connections to one
database), puts events in the way the application would, and lets time pass. Adding
an engine is one entry in :data:`ENGINES`: its name and a function that builds its
harness for a test.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import psycopg
import pytest

import outbox
from tests.pgbouncer import bounced_url, pgbouncer  # noqa: F401 (fixtures)
from worker.storage.base import Storage
from worker.storage.memory import MemoryEvents, MemoryStorage
from worker.storage.snapshot import insert_events
from worker.storage.snapshot_storage import SnapshotStorage


class Harness(Protocol):
    """What the behaviour suite needs beyond the protocol itself."""

    def new(self, *, for_batches: bool = True) -> Storage:
        """Another engine object over the same events (closed when the test ends);
        ``for_batches`` False for one that only inspects."""
        ...

    def put(self, events: list[Mapping[str, Any]]) -> list[uuid.UUID]:
        """Add events (``outbox.enqueue_many``'s items: ``timestamp`` an aware
        datetime, ``destination`` ``metrics`` for a metrics-only event), committed,
        due at once."""
        ...

    def tick(self) -> None:
        """Let a little time pass (a fake clock moves on; real time needs nothing)."""
        ...


class PostgresHarness:
    """An engine over a fresh test database; events go in through ``outbox``."""

    def __init__(self, database_url: str, make: Callable[..., Storage]) -> None:
        self.url = database_url
        self.make = make
        self.made: list[Storage] = []

    def new(self, *, for_batches: bool = True) -> Storage:
        engine = self.make(self.url, worker_id="suite", for_batches=for_batches)
        self.made.append(engine)
        return engine

    def put(self, events: list[Mapping[str, Any]]) -> list[uuid.UUID]:
        with psycopg.connect(self.url) as conn:
            out = outbox.enqueue_many(conn, events)
            conn.commit()
        return [u for u in out if u is not None]

    def tick(self) -> None:
        time.sleep(0.02)

    def close(self) -> None:
        for engine in self.made:
            engine.close()


#: Claim a dedup key as enqueue does (migration 0004's outbox_enqueue_keyed): free when
#: new, or when the event that held it was delivered longer ago than the window.
_CLAIM_KEY = """
INSERT INTO outbox_dedup_keys AS k (dedup_key, expires_at) VALUES (%s, 'infinity')
ON CONFLICT (dedup_key) DO UPDATE SET expires_at = 'infinity' WHERE k.expires_at <= now()
RETURNING k.dedup_key
"""


class SnapshotHarness(PostgresHarness):
    """The snapshot engine; events go in through its own ``insert_events`` (enqueue
    does not write its tables yet), dedup keys claimed as enqueue claims them."""

    def put(self, events: list[Mapping[str, Any]]) -> list[uuid.UUID]:
        rows: list[dict[str, Any]] = []
        with psycopg.connect(self.url) as conn:
            for e in events:
                key = e.get("dedup_key")
                if key is not None and conn.execute(_CLAIM_KEY, (key,)).fetchone() is None:
                    continue
                rows.append(
                    {
                        "uuid": uuid.uuid4(),
                        "event": e["event"],
                        "distinct_id": str(e["distinct_id"]),
                        "properties": e.get("properties"),
                        "dedup_key": key,
                        "timestamp": e.get("timestamp"),
                        "destination": e.get("destination"),
                    }
                )
            if rows:
                insert_events(conn, rows)
            conn.commit()
        return [r["uuid"] for r in rows]


class FakeClock:
    """Wall-clock seconds that move only when told."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class MemoryHarness:
    """The in-memory engine, on a clock that moves a quarter second each tick."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.events = MemoryEvents(clock=self.clock)

    def new(self, *, for_batches: bool = True) -> Storage:
        return MemoryStorage(self.events, worker_id="suite")

    def put(self, events: list[Mapping[str, Any]]) -> list[uuid.UUID]:
        out = [
            self.events.put(
                e["event"],
                str(e["distinct_id"]),
                e.get("properties"),
                dedup_key=e.get("dedup_key"),
                destination=e.get("destination") or "posthog",
                timestamp=e["timestamp"].timestamp() if e.get("timestamp") else None,
            )
            for e in events
        ]
        return [u for u in out if u is not None]

    def tick(self) -> None:
        self.clock.now += 0.25

    def close(self) -> None:
        pass


def _snapshot(request: pytest.FixtureRequest) -> SnapshotHarness:
    return SnapshotHarness(request.getfixturevalue("database_url"), SnapshotStorage)


class BouncedHarness(SnapshotHarness):
    """The snapshot engine through a real PgBouncer in transaction pooling mode, as
    ``OUTBOX_POOLER=transaction`` runs it (no prepared statements; the timeouts and
    planner settings set for each transaction, never left on a server session);
    events go in directly."""

    def __init__(self, database_url: str, through_pgbouncer: str) -> None:
        super().__init__(database_url, functools.partial(SnapshotStorage, pooler="transaction"))
        self.bounced_url = through_pgbouncer

    def new(self, *, for_batches: bool = True) -> Storage:
        engine = self.make(self.bounced_url, worker_id="suite", for_batches=for_batches)
        self.made.append(engine)
        return engine


def _snapshot_pooled(request: pytest.FixtureRequest) -> SnapshotHarness:
    return BouncedHarness(
        request.getfixturevalue("database_url"), request.getfixturevalue("bounced_url")
    )


def _memory(request: pytest.FixtureRequest) -> MemoryHarness:
    return MemoryHarness()


#: Every engine the suite runs against: name -> its harness for one test.
ENGINES: dict[str, Callable[[pytest.FixtureRequest], Any]] = {
    "memory": _memory,
    "snapshot": _snapshot,
    "snapshot-pooled": _snapshot_pooled,
}


@pytest.fixture(params=list(ENGINES))
def engine(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """A harness for each engine in turn."""
    harness = ENGINES[request.param](request)
    yield harness
    harness.close()


#: The dedup window, attempts and backoff the engine tests finish batches with.
POLICY: dict[str, Any] = {
    "dedup_window": 60.0,
    "max_attempts": 5,
    "backoff_base": 0.0,
    "backoff_max": 0.0,
}


@pytest.fixture
def harness(database_url: str) -> Iterator[SnapshotHarness]:
    """A SnapshotStorage harness over a fresh test database (the engine's own tests)."""
    h = SnapshotHarness(database_url, SnapshotStorage)
    yield h
    h.close()
