"""What the worker's store says about the database: a dropped connection is not an
outage, a timeout is a timeout, a lock names its holder; migrations and the
documented maintenance commands take their locks with a short lock_timeout."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import outbox
from outbox.exceptions import OutboxDatabaseError
from tests.conftest import pend_a_migration_that_alters_outbox_events, wait_for
from worker.database import migrate
from worker.storage import connection as connection_module
from worker.store import (
    LOCK_TIMEOUT,
    BatchLostError,
    BatchOutcome,
    ConnectionReset,
    DatabaseUnavailable,
    LockTimeout,
    StatementTimeout,
    Store,
)

ROOT = Path(__file__).resolve().parents[2]


def terminate(db: psycopg.Connection[Any], pid: int) -> None:
    """End a session as pg_terminate_backend does, and wait until it is gone."""
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(
        lambda: not db.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone(),
        what=f"backend {pid} to exit",
    )


def backend_pid(store: Store) -> int:
    conn = store._conn
    assert conn is not None
    return int(conn.info.backend_pid)


def enqueue(url: str, n: int) -> None:
    with psycopg.connect(url) as conn:
        outbox.enqueue_many(
            conn, [{"event": "e", "distinct_id": f"u{i}", "properties": {}} for i in range(n)]
        )


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    s = Store(database_url, worker_id="signals")
    yield s
    s.close()


class DatabaseSettings:
    """ALTER DATABASE <the test database> SET/RESET, for the sessions that start later."""

    def __init__(self, db: psycopg.Connection[Any]) -> None:
        self.db = db
        self.changed: set[str] = set()

    def set(self, name: str, value: str) -> None:
        self.db.execute(
            sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                sql.Identifier(self.db.info.dbname), sql.Identifier(name), sql.Literal(value)
            )
        )
        self.changed.add(name)

    def reset(self, name: str) -> None:
        self.db.execute(
            sql.SQL("ALTER DATABASE {} RESET {}").format(
                sql.Identifier(self.db.info.dbname), sql.Identifier(name)
            )
        )
        self.changed.discard(name)


@pytest.fixture
def database_settings(db: psycopg.Connection[Any]) -> Iterator[DatabaseSettings]:
    settings = DatabaseSettings(db)
    yield settings
    for name in list(settings.changed):
        settings.reset(name)


def test_a_dropped_idle_connection_is_replaced_without_an_outage(
    store: Store, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    store.ping_or_raise()
    first = backend_pid(store)
    terminate(db, first)
    with caplog.at_level(logging.INFO, logger="outbox.worker"):
        store.ping_or_raise()  # was: DatabaseUnavailable, and 15 s of "down"
        assert store.backlog().pending == 0
    assert backend_pid(store) != first
    assert store.health.problem is None
    actions = [getattr(r, "action", "") for r in caplog.records]
    assert "db_unavailable" not in actions
    assert actions.count("db_connection_reset") == 1


def test_a_connection_that_breaks_under_a_statement_is_replaced_once(
    store: Store,
    db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Without the idle check, the break shows only when the statement is sent.
    monkeypatch.setattr(connection_module, "closed_by_peer", lambda conn: False)
    store.ping_or_raise()
    terminate(db, backend_pid(store))
    with caplog.at_level(logging.INFO, logger="outbox.worker"):
        assert store.backlog().pending == 0
    actions = [getattr(r, "action", "") for r in caplog.records]
    assert "db_unavailable" not in actions and "db_connection_reset" in actions


def test_an_unreachable_database_is_still_an_outage(caplog: pytest.LogCaptureFixture) -> None:
    s = Store("postgresql://postgres@127.0.0.1:1/nowhere", worker_id="signals")
    with caplog.at_level(logging.INFO, logger="outbox.worker"), pytest.raises(DatabaseUnavailable):
        s.ping_or_raise()
    assert isinstance(s.health.problem, DatabaseUnavailable)
    assert [getattr(r, "action", "") for r in caplog.records] == ["db_unavailable"]


def test_a_statement_timeout_is_reported_as_one_not_as_an_outage(
    store: Store, database_settings: DatabaseSettings, caplog: pytest.LogCaptureFixture
) -> None:
    database_settings.set("statement_timeout", "1ms")
    with caplog.at_level(logging.INFO, logger="outbox.worker"):
        with pytest.raises(StatementTimeout) as raised:
            store._execute("SELECT pg_sleep(0.2)")
        assert "statement_timeout is 1ms" in str(raised.value)
        assert isinstance(store.health.problem, StatementTimeout)
        with pytest.raises(StatementTimeout):  # the same episode: logged once
            store._execute("SELECT pg_sleep(0.2)")
        database_settings.reset("statement_timeout")
        # The store reconnected after the timeout, so the corrected setting applies.
        store._execute("SELECT pg_sleep(0.01)")
    assert store.health.problem is None
    actions = [getattr(r, "action", "") for r in caplog.records]
    assert "db_unavailable" not in actions
    assert actions.count("db_statement_timeout") == 1
    assert actions.count("db_timeouts_over") == 1


def test_a_locked_table_makes_statements_give_up_naming_the_holder(
    database_url: str, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue(database_url, 3)
    with psycopg.connect(database_url, application_name="maintenance window") as holder:
        holder.execute("LOCK TABLE outbox_events IN ACCESS EXCLUSIVE MODE")
        with caplog.at_level(logging.INFO, logger="outbox.worker"):
            started = time.monotonic()
            with pytest.raises(LockTimeout) as counting:
                store.backlog()
            waited = time.monotonic() - started
            with pytest.raises(LockTimeout) as claiming:
                store.claim(10, 1_000_000, 30.0)
        holder.rollback()
    assert LOCK_TIMEOUT <= waited < LOCK_TIMEOUT + 5
    for raised in (counting, claiming):
        text = str(raised.value)
        assert "canceling statement due to lock timeout (2s): pid " in text, text
        assert "(maintenance window)" in text, text
        assert "holds AccessExclusiveLock on outbox_events" in text, text
    assert isinstance(store.health.problem, LockTimeout)
    batch = store.claim(10, 1_000_000, 30.0)  # the lock is gone: claims work again
    assert batch is not None and len(batch.events) == 3
    store.release(batch)
    actions = [getattr(r, "action", "") for r in caplog.records]
    assert actions.count("db_lock_timeout") == 1 and "db_unavailable" not in actions


def test_an_outcome_that_times_out_on_a_lock_is_lost_and_says_why(
    database_url: str, store: Store
) -> None:
    enqueue(database_url, 2)
    batch = store.claim(10, 1_000_000, 30.0)
    assert batch is not None
    with psycopg.connect(database_url, application_name="index build") as builder:
        # SHARE (a CREATE INDEX without CONCURRENTLY) is granted beside the batch's
        # row locks, and then blocks the outcome's DELETE.
        builder.execute("LOCK TABLE outbox_events IN SHARE MODE")
        with pytest.raises(BatchLostError) as raised:
            store.finish(
                batch,
                BatchOutcome(shipped=[e.id for e in batch.events]),
                dedup_window=0,
                max_attempts=5,
                backoff_base=0.1,
                backoff_max=1,
            )
        builder.rollback()
    assert "lock timeout" in str(raised.value) and "(index build) holds ShareLock" in str(
        raised.value
    )
    assert isinstance(store.health.problem, LockTimeout)
    assert store.backlog().pending == 2  # nothing of the outcome was written
    assert store.health.problem is None


# -- migrations and maintenance ----------------------------------------------------------


def hold_a_batch(url: str) -> tuple[Store, Any]:
    """A worker's batch in flight: its transaction holds row locks on outbox_events."""
    enqueue(url, 5)
    s = Store(url, worker_id="in-flight", for_batches=True)
    batch = s.claim(10, 1_000_000, 60.0)
    assert batch is not None
    return s, batch


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


def test_migrate_takes_its_locks_with_a_short_timeout_and_retries(database_url: str) -> None:
    held = 6.0  # seconds the batch stays in flight once migrate has started
    pend_a_migration_that_alters_outbox_events(database_url)
    s, batch = hold_a_batch(database_url)
    try:
        release = threading.Timer(held, s.release, args=(batch,))
        with InsertTimer(database_url) as app:
            wait_for(lambda: app.waits, what="the application's first insert")
            release.start()
            started = time.monotonic()
            migrate(database_url, lock_timeout=0.3, retry_for=60)
            took = time.monotonic() - started
        release.join()
    finally:
        s.close()
    assert took >= held - 0.5  # it waited for the batch to end...
    # ...without holding up the INSERTs meanwhile: each waited about 0.3 s at most
    # (before: one of them waited for as long as the batch was held).
    assert max(app.waits) < held / 2, app.longest()


def test_migrate_gives_up_with_one_line_naming_who_holds_the_lock(database_url: str) -> None:
    pend_a_migration_that_alters_outbox_events(database_url)
    s, _batch = hold_a_batch(database_url)
    try:
        started = time.monotonic()
        with pytest.raises(OutboxDatabaseError) as raised:
            migrate(database_url, lock_timeout=0.2, retry_for=1.0)
        assert time.monotonic() - started < 10
    finally:
        s.close()
    text = str(raised.value)
    assert "\n" not in text
    assert "could not take its locks" in text
    assert "(outbox-worker batches in-flight) holds RowShareLock on outbox_events" in text
    migrate(database_url)  # nothing holds it now


def maintenance_sql() -> str:
    """The SQL block of docs/operations.md that sets lock_timeout (the maintenance)."""
    page = (ROOT / "docs" / "operations.md").read_text()
    blocks = re.findall(r"^ *```sql\n(.*?)^ *```", page, re.DOTALL | re.MULTILINE)
    found = [b for b in blocks if "lock_timeout" in b]
    assert len(found) == 1, found
    return found[0]


def test_the_documented_maintenance_commands_do_not_hold_up_the_application(
    database_url: str,
) -> None:
    statements = [s.strip() for s in maintenance_sql().split(";") if s.strip()]
    assert any(s.startswith("VACUUM FULL") for s in statements)
    s, batch = hold_a_batch(database_url)
    try:
        with (
            InsertTimer(database_url) as app,
            psycopg.connect(database_url, autocommit=True) as maintenance,
        ):
            wait_for(lambda: app.waits, what="the application's first insert")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                run_all(maintenance, statements)
            s.release(batch)
            run_all(maintenance, statements)  # as the page says: run it again
    finally:
        s.close()
    # The VACUUM FULL gave up after 1 s: no INSERT waited for the batch to end.
    assert max(app.waits) < 5.0, app.longest()


def run_all(conn: psycopg.Connection[Any], statements: list[str]) -> None:
    for statement in statements:
        conn.execute(statement)


def test_a_claim_on_a_connection_that_broke_is_retried_by_the_next_poll_not_an_outage(
    database_url: str,
    store: Store,
    db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    enqueue(database_url, 2)
    store.ping_or_raise()
    monkeypatch.setattr(connection_module, "closed_by_peer", lambda conn: False)
    terminate(db, backend_pid(store))
    with caplog.at_level(logging.INFO, logger="outbox.worker"):
        with pytest.raises(ConnectionReset):  # a DatabaseUnavailable: the drain stops
            store.claim(10, 1_000_000, 30.0)
        batch = store.claim(10, 1_000_000, 30.0)  # the next poll: a new connection
    assert batch is not None and len(batch.events) == 2
    store.release(batch)
    assert store.health.problem is None
    actions = [getattr(r, "action", "") for r in caplog.records]
    assert actions == ["db_connection_reset"]


def test_a_commands_own_statement_timeout_says_it_gave_up(database_url: str) -> None:
    s = Store(database_url, statement_timeout=0.05, log_outages=False)  # as `status` has
    try:
        started = time.monotonic()
        with pytest.raises(StatementTimeout, match=r"\(gave up after 50ms\)$"):
            s._execute("SELECT pg_sleep(5)")
        assert time.monotonic() - started < 4
        assert s.backlog().pending == 0  # and the store goes on
    finally:
        s.close()
