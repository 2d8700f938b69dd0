"""What SnapshotStorage's connection (worker.storage.connection) says about the
database: a dropped connection is not an outage, an unreachable database is one, a
timeout is a timeout (naming the setting, logged once), a lock names its holder (the
promises test_database_signals pinned for the old engine's Store)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbox.exceptions import OutboxNotInstalledError
from tests.conftest import wait_for
from tests.storage.conftest import POLICY, SnapshotHarness
from worker.storage import connection as connection_module
from worker.storage.base import (
    BatchLostError,
    BatchOutcome,
    ConnectionReset,
    DatabaseUnavailable,
    LockTimeout,
    StatementTimeout,
)
from worker.storage.connection import LOCK_TIMEOUT, Health
from worker.storage.snapshot_storage import SnapshotStorage


@pytest.fixture
def store(database_url: str) -> Iterator[SnapshotStorage]:
    s = SnapshotStorage(database_url, worker_id="signals")
    yield s
    s.close()


def backend_pid(store: SnapshotStorage) -> int:
    conn = store._conn
    assert conn is not None
    return int(conn.info.backend_pid)


def terminate(db: psycopg.Connection[Any], pid: int) -> None:
    """End a session as pg_terminate_backend does, and wait until it is gone."""
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(
        lambda: not db.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone(),
        what=f"backend {pid} to exit",
    )


def actions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "action", "") for r in caplog.records if getattr(r, "action", "")]


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


def test_its_connections_are_named_like_stores(database_url: str) -> None:
    batches = SnapshotStorage(database_url, worker_id="w1", for_batches=True)
    other = SnapshotStorage(database_url, worker_id="w1")
    assert batches.application_name == "outbox-worker batches w1"
    assert other.application_name == "outbox-worker w1"


def test_a_dropped_idle_connection_is_replaced_without_an_outage(
    store: SnapshotStorage, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    store.ping_or_raise()
    first = backend_pid(store)
    terminate(db, first)
    with caplog.at_level(logging.INFO, logger="outbox.worker"):
        store.ping_or_raise()
        assert store.backlog().pending == 0
    assert backend_pid(store) != first
    assert store.health.problem is None
    assert actions(caplog) == ["db_connection_reset"]


def test_a_connection_that_breaks_under_a_statement_is_replaced_once(
    store: SnapshotStorage,
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
    assert actions(caplog) == ["db_connection_reset"]


def test_a_claim_on_a_connection_that_broke_is_retried_by_the_next_poll_not_an_outage(
    harness: SnapshotHarness,
    db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    put = harness.put([{"event": "e", "distinct_id": f"u{i}"} for i in range(2)])
    store = harness.new()
    assert isinstance(store, SnapshotStorage)
    store.ping_or_raise()
    monkeypatch.setattr(connection_module, "closed_by_peer", lambda conn: False)
    terminate(db, backend_pid(store))
    with caplog.at_level(logging.INFO, logger="outbox.worker"):
        with pytest.raises(ConnectionReset):  # a DatabaseUnavailable: the drain stops
            store.claim(10, 1_000_000, 30.0)
        batch = store.claim(10, 1_000_000, 30.0)  # the next poll: a new connection
    assert batch is not None and {e.uuid for e in batch.events} == set(put)
    store.release(batch)
    assert store.health.problem is None
    assert actions(caplog) == ["db_connection_reset"]


def test_an_unreachable_database_is_an_outage_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = SnapshotStorage("postgresql://postgres@127.0.0.1:1/nowhere", worker_id="signals")
    with caplog.at_level(logging.INFO, logger="outbox.worker"):
        with pytest.raises(DatabaseUnavailable):
            s.ping_or_raise()
        with pytest.raises(DatabaseUnavailable, match="next reconnect in"):
            s.claim(10, 1_000_000, 30.0)  # backing off: not even tried
    assert isinstance(s.health.problem, DatabaseUnavailable)
    assert actions(caplog) == ["db_unavailable"]


def test_no_outage_is_logged_without_log_outages(caplog: pytest.LogCaptureFixture) -> None:
    s = SnapshotStorage("postgresql://postgres@127.0.0.1:1/nowhere", log_outages=False)
    with caplog.at_level(logging.INFO, logger="outbox.worker"), pytest.raises(DatabaseUnavailable):
        s.backlog()
    assert actions(caplog) == []


def test_a_statement_timeout_is_reported_as_one_not_as_an_outage(
    store: SnapshotStorage,
    database_settings: DatabaseSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    database_settings.set("statement_timeout", "1ms")
    with caplog.at_level(logging.INFO, logger="outbox.worker"):
        with pytest.raises(StatementTimeout) as raised:
            store._rows("SELECT pg_sleep(0.2)")
        assert "statement_timeout is 1ms" in str(raised.value)
        assert isinstance(store.health.problem, StatementTimeout)
        with pytest.raises(StatementTimeout):  # the same episode: logged once
            store._rows("SELECT pg_sleep(0.2)")
        database_settings.reset("statement_timeout")
        # The storage reconnected after the timeout, so the corrected setting applies.
        store._rows("SELECT pg_sleep(0.01)")
    assert store.health.problem is None
    assert actions(caplog) == ["db_statement_timeout", "db_timeouts_over"]


@pytest.mark.parametrize("pooler", ["none", "transaction"])
def test_its_own_statement_timeout_says_it_gave_up(database_url: str, pooler: str) -> None:
    s = SnapshotStorage(database_url, statement_timeout=0.05, log_outages=False, pooler=pooler)
    try:
        started = time.monotonic()
        with pytest.raises(StatementTimeout, match=r"\(gave up after 50ms\)$"):
            s._rows("SELECT pg_sleep(5)")
        assert time.monotonic() - started < 4
        assert s.backlog().pending == 0  # and the storage goes on
    finally:
        s.close()


@pytest.mark.parametrize("pooler", ["none", "transaction"])
def test_the_timeouts_and_planner_settings_bound_every_statement(
    database_url: str, pooler: str
) -> None:
    s = SnapshotStorage(database_url, statement_timeout=30.0, pooler=pooler)
    try:
        row = s._rows(
            "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'),"
            " current_setting('enable_seqscan')"
        )[0]
        assert tuple(row) == ("2s", "30s", "off")
        conn = s._conn
        assert conn is not None
        # Behind a transaction pooler nothing is left set on the (shared) server session.
        session = conn.execute("SELECT current_setting('enable_seqscan')").fetchone()
        assert session is not None and session[0] == ("on" if pooler == "transaction" else "off")
    finally:
        s.close()


def test_a_locked_table_makes_statements_give_up_naming_the_holder(
    harness: SnapshotHarness, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = harness.new()
    with psycopg.connect(database_url, application_name="maintenance window") as holder:
        holder.execute("LOCK TABLE outbox_dedup_keys IN ACCESS EXCLUSIVE MODE")
        with caplog.at_level(logging.INFO, logger="outbox.worker"):
            started = time.monotonic()
            with pytest.raises(LockTimeout) as raised:
                store.expire_dedup_keys()
            waited = time.monotonic() - started
        holder.rollback()
    assert LOCK_TIMEOUT <= waited < LOCK_TIMEOUT + 5
    text = str(raised.value)
    assert "canceling statement due to lock timeout (2s): pid " in text, text
    assert "(maintenance window) holds AccessExclusiveLock on outbox_dedup_keys" in text, text
    assert isinstance(store.health.problem, LockTimeout)
    assert store.expire_dedup_keys() == 0  # the lock is gone: statements work again
    assert store.health.problem is None
    assert actions(caplog) == ["db_lock_timeout"]


def test_a_claim_gives_up_on_a_locked_table(harness: SnapshotHarness, database_url: str) -> None:
    harness.put([{"event": "e", "distinct_id": "u"}])
    store = harness.new()
    with psycopg.connect(database_url) as holder:
        holder.execute("LOCK TABLE outbox_retry IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(LockTimeout, match=r"lock timeout \(2s\)"):
            store.claim(10, 1_000_000, 30.0)
        holder.rollback()
    batch = store.claim(10, 1_000_000, 30.0)
    assert batch is not None and len(batch.events) == 1


def test_an_outcome_that_times_out_on_a_lock_is_lost_and_says_why(
    harness: SnapshotHarness, database_url: str
) -> None:
    harness.put([{"event": "k", "distinct_id": "u", "dedup_key": f"k{i}"} for i in range(2)])
    store = harness.new()
    batch = store.claim(10, 1_000_000, 30.0)
    assert batch is not None and len(batch.events) == 2
    with psycopg.connect(database_url, application_name="index build") as builder:
        builder.execute("LOCK TABLE outbox_dedup_keys IN SHARE MODE")
        with pytest.raises(BatchLostError) as raised:
            store.finish(batch, BatchOutcome(shipped=[e.id for e in batch.events]), **POLICY)
        builder.rollback()
    text = str(raised.value)
    assert "lock timeout" in text and "(index build) holds ShareLock" in text, text
    assert isinstance(store.health.problem, LockTimeout)
    look = harness.new(for_batches=False)
    assert look.backlog().pending == 2  # nothing of the outcome was written
    # The lease was handed back: the events are due again at once, not in 30 s.
    again = store.claim(10, 1_000_000, 30.0)
    assert again is not None
    assert {e.uuid for e in again.events} == {e.uuid for e in batch.events}
    assert store.health.problem is None


def test_storages_given_one_health_report_into_it_together(database_url: str) -> None:
    health = Health(log=False)
    a = SnapshotStorage(database_url, health=health, for_batches=True)
    b = SnapshotStorage("postgresql://postgres@127.0.0.1:1/nowhere", health=health)
    try:
        with pytest.raises(DatabaseUnavailable):
            b.ping_or_raise()
        assert isinstance(health.problem, DatabaseUnavailable)
        a.ping_or_raise()
        assert health.problem is None and a.health is health
    finally:
        a.close()
        b.close()


def test_a_database_without_the_tables_is_not_installed_not_an_outage(
    empty_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = SnapshotStorage(empty_database)
    try:
        with caplog.at_level(logging.INFO, logger="outbox.worker"):
            for _ in range(2):  # no backing off: it is not an outage
                with pytest.raises(OutboxNotInstalledError, match="outbox-worker migrate"):
                    s.claim(10, 1_000_000, 30.0)
        assert isinstance(s.health.problem, OutboxNotInstalledError)
        assert not s.ping()
        assert actions(caplog) == []
    finally:
        s.close()


def test_a_claim_cut_short_after_leasing_hands_the_lease_back(
    harness: SnapshotHarness, database_url: str
) -> None:
    put = harness.put([{"event": "e", "distinct_id": f"u{i}"} for i in range(3)])
    store = harness.new()
    store.maintain()  # the batch exists: the claim leases it, then reads it
    with psycopg.connect(database_url) as holder:
        holder.execute("LOCK TABLE outbox_events_3 IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(LockTimeout):
            store.claim(10, 1_000_000, 30.0)
        holder.rollback()
    # Due again at once, not when the 30 s lease would have run out.
    batch = store.claim(10, 1_000_000, 30.0)
    assert batch is not None and {e.uuid for e in batch.events} == set(put)
