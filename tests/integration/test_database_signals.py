"""Migrations take their locks with a short lock_timeout: they wait for a session that
holds an outbox table (here an old worker's batch during the upgrade to the snapshot
engine, which its upgrade notes say to avoid), retry, never hold up the application's
enqueues meanwhile, and give up with one line naming the holder.

(What the worker's storage says about the database, dropped connections, timeouts,
locked tables naming their holder, is tested on the engine itself, in
tests/storage/test_connection.py. The snapshot engine's worker holds no lock across a
batch, and its event tables need no VACUUM FULL: the documented maintenance that this
file ran beside a batch in flight is gone with the old table.)
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

import outbox
from outbox.exceptions import OutboxDatabaseError
from tests.conftest import wait_for
from worker.database import migrate

#: What an old worker's batch connection was named (so `migrate` names it).
OLD_BATCH_APPLICATION = "outbox-worker batches in-flight"


def hold_an_old_batch(url: str) -> psycopg.Connection[Any]:
    """At revision 0006, a worker of the old kind with a batch in flight: its
    transaction holds row locks on the old outbox_events table."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox_events (uuid, event, distinct_id)"
            " SELECT gen_random_uuid(), 'e', 'u' || g FROM generate_series(1, 5) AS g"
        )
    batch = psycopg.connect(url, application_name=OLD_BATCH_APPLICATION)
    batch.execute("SELECT id FROM outbox_events ORDER BY id LIMIT 10 FOR UPDATE")
    return batch


class InsertTimer:
    """An application enqueueing one event per transaction, timing each commit."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.waits: list[float] = []
        #: (seconds since the timer started, wait) of each insert, to explain a failure.
        self.log: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> InsertTimer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)

    def _run(self) -> None:
        origin = time.monotonic()
        with psycopg.connect(self.url) as conn:
            while not self.stop.is_set():
                started = time.monotonic()
                outbox.enqueue(conn, "app_event", "u", {})
                conn.commit()
                wait = time.monotonic() - started
                self.waits.append(wait)
                self.log.append((round(started - origin, 3), round(wait, 3)))
                self.stop.wait(0.02)

    def longest(self) -> list[tuple[float, float]]:
        return sorted(self.log, key=lambda entry: -entry[1])[:5]


def test_migrate_takes_its_locks_with_a_short_timeout_and_retries(empty_database: str) -> None:
    held = 6.0  # seconds the batch stays in flight once migrate has started
    migrate(empty_database, "0006")
    batch = hold_an_old_batch(empty_database)
    try:
        release = threading.Timer(held, batch.rollback)
        with InsertTimer(empty_database) as app:
            wait_for(lambda: app.waits, what="the application's first insert")
            release.start()
            started = time.monotonic()
            assert migrate(empty_database, lock_timeout=0.3, retry_for=60) == [
                "0007",
                "0008",
                "0009",
                "0010",
            ]
            took = time.monotonic() - started
        release.join()
    finally:
        batch.close()
    assert took >= held - 0.5  # it waited for the batch to end...
    # ...without holding up the INSERTs meanwhile: each waited about 0.3 s at most.
    assert max(app.waits) < held / 2, app.longest()
    with psycopg.connect(empty_database) as conn:  # nothing was lost in the move
        row = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
    assert row is not None and row[0] == 5 + len(app.waits)


def test_migrate_gives_up_with_one_line_naming_who_holds_the_lock(empty_database: str) -> None:
    migrate(empty_database, "0006")
    batch = hold_an_old_batch(empty_database)
    try:
        started = time.monotonic()
        with pytest.raises(OutboxDatabaseError) as raised:
            migrate(empty_database, lock_timeout=0.2, retry_for=1.0)
        assert time.monotonic() - started < 10
    finally:
        batch.close()
    text = str(raised.value)
    assert "\n" not in text
    assert "could not take its locks" in text
    assert f"({OLD_BATCH_APPLICATION}) holds RowShareLock on outbox_events" in text
    assert migrate(empty_database) == ["0007", "0008", "0009", "0010"]  # nothing holds it now
