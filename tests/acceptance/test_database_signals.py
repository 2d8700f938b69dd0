"""What the running worker says about its database (/readyz, /metrics, logs, status)
when a connection is dropped, statements time out, or the outbox tables are locked;
and that a slow batch holds no lock a migration (or the application) would wait for."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

import outbox
from tests.acceptance.test_probes import free_port, get, metric
from tests.acceptance.test_worker_process import count, enqueue_n, run_cli, start_worker
from tests.conftest import (
    batches_in_flight,
    move_to_retry,
    wait_for,
    worker_env,
)
from worker.database import MIGRATE_LOCK_TIMEOUT
from worker.storage.connection import LOCK_TIMEOUT
from worker.testing import CaptureServer, Reply


class Probes:
    """The worker's probe port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"

    def ready(self) -> tuple[int, str]:
        return get(self.base + "/readyz")

    def metric(self, name: str) -> float | None:
        return metric(get(self.base + "/metrics")[1], name)


@pytest.fixture
def probes() -> Probes:
    return Probes()


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM the worker; its stderr once it has exited 0 (killed if it does not)."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the worker did not stop on SIGTERM:\n{err}") from None
    assert proc.returncode == 0, err
    return err


def set_database(db: psycopg.Connection[Any], name: str, value: str | None) -> None:
    """ALTER DATABASE <the test database> SET (or, with None, RESET) for new sessions."""
    dbname = sql.Identifier(db.info.dbname)
    if value is None:
        db.execute(sql.SQL("ALTER DATABASE {} RESET {}").format(dbname, sql.Identifier(name)))
    else:
        db.execute(
            sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                dbname, sql.Identifier(name), sql.Literal(value)
            )
        )


def add_dead(url: str, n: int) -> None:
    """``n`` dead rows: counted by the backlog refresh, never shipped (they are in
    outbox_retry, dead, when they commit, so a running worker never sees them pending)."""
    with psycopg.connect(url) as conn:
        uuids = outbox.enqueue_many(
            conn, [{"event": "gave_up", "distinct_id": "u", "properties": {}}] * n
        )
        assert move_to_retry(conn, uuids, last_error="HTTP 400: gave up") == n


def test_a_dropped_idle_connection_is_not_an_outage(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer, probes: Probes
) -> None:
    add_dead(database_url, 5)
    proc = start_worker(worker_env(database_url, capture, OUTBOX_METRICS_PORT=str(probes.port)))
    try:
        wait_for(lambda: probes.ready()[0] == 200, what="/readyz")
        wait_for(
            lambda: probes.metric('outbox_backlog_events{state="dead"}') == 5,
            what="the first backlog refresh",
        )
        sessions = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'outbox-worker %%'"
        ).fetchall()
        assert sessions
        for (pid,) in sessions:
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(
            lambda: (
                not db.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)",
                    ([p for (p,) in sessions],),
                ).fetchone()
            ),
            what="the worker's sessions to end",
        )
        # The next probe finds its connection closed: a reconnect, not an outage.
        assert probes.ready() == (200, "ok (sink ok)\n")

        # Nor for the metric: the refresh after the drop (every 15 s) sees the two new
        # dead rows, and outbox_database_up reads 1 all along.
        add_dead(database_url, 2)
        seen: list[float | None] = []

        def refreshed() -> bool:
            seen.append(probes.metric("outbox_database_up"))
            return probes.metric('outbox_backlog_events{state="dead"}') == 7

        wait_for(refreshed, timeout=60, what="a backlog refresh after the drop")
        assert set(seen) == {1.0}, seen
        shipped = enqueue_n(database_url, 10)
        capture.wait_for_events(10, timeout=30)
        assert set(capture.uuids()) == shipped
    finally:
        err = stop(proc)
    assert "[db_unavailable]" not in err, err
    assert "[db_connection_reset]" in err, err


def test_a_statement_timeout_makes_the_worker_unready_and_says_so(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer, probes: Probes
) -> None:
    uuids = enqueue_n(database_url, 2000)
    set_database(db, "statement_timeout", "1ms")  # for the sessions that start from now
    proc = start_worker(worker_env(database_url, capture, OUTBOX_METRICS_PORT=str(probes.port)))
    try:

        def unready(text: str) -> Callable[[], str | None]:
            def check() -> str | None:
                status, body = probes.ready()
                return body if status == 503 and text in body else None

            return check

        # Before: 200 "ok", and db_unavailable in the log.
        wait_for(unready("statement timeout"), timeout=60, what="/readyz to fail")
        # The claims time out (the readiness check's own SELECT 1 may too, and a
        # statement that times out while connecting may not learn the value).
        body = wait_for(
            unready("batches cannot be claimed or recorded: canceling statement due to "),
            timeout=60,
            what="/readyz to say the batches cannot be claimed",
        )
        wait_for(unready("statement_timeout is 1ms"), timeout=60, what="/readyz to name 1ms")
        assert "statement timeout" in body
        wait_for(
            lambda: probes.metric("outbox_database_up") is not None,
            what="the first backlog refresh",
        )
        assert probes.metric("outbox_database_up") == 1  # the database is up
        set_database(db, "statement_timeout", None)
        # The worker's next sessions start without it, and everything ships.
        wait_for(lambda: count(db) == 0, timeout=60, what="the backlog to drain")
        wait_for(lambda: probes.ready()[0] == 200, what="/readyz to recover")
        assert set(capture.uuids()) == uuids
    finally:
        set_database(db, "statement_timeout", None)
        err = stop(proc)
    assert "[db_unavailable]" not in err, err
    assert err.count("[db_statement_timeout]") >= 1, err
    assert "[db_timeouts_over]" in err, err


def test_a_locked_table_is_reported_by_the_worker_and_by_status(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer, probes: Probes
) -> None:
    uuids = enqueue_n(database_url, 20)
    env = worker_env(database_url, capture, OUTBOX_METRICS_PORT=str(probes.port))
    holder = psycopg.connect(database_url, application_name="nightly maintenance")
    # The view: PostgreSQL locks every outbox table it reads (the event tables and
    # outbox_retry), as an operator's maintenance on "the outbox" would.
    holder.execute("LOCK TABLE outbox_events IN ACCESS EXCLUSIVE MODE")
    locked_at = time.monotonic()
    proc = start_worker(env)
    try:

        def unready() -> str | None:
            status, body = probes.ready()
            return body if status == 503 and "lock timeout" in body else None

        body = wait_for(unready, timeout=60, what="/readyz to name the lock")
        assert "(nightly maintenance) holds AccessExclusiveLock on outbox_" in body
        started = time.monotonic()
        status = run_cli(env, "status", timeout=60)  # before: it waited for the lock
        took = time.monotonic() - started
        assert status.returncode == 2, status.stderr
        assert status.stderr.startswith(
            "outbox-worker: error: status could not read the outbox tables: "
            "canceling statement due to lock timeout (2s): pid "
        ), status.stderr
        assert "(nightly maintenance) holds AccessExclusiveLock" in status.stderr
        assert status.stderr.count("\n") == 1, status.stderr
        assert took < LOCK_TIMEOUT + 20  # a process start plus one lock wait
        assert capture.uuids() == []
        held = time.monotonic() - locked_at
        holder.rollback()
        capture.wait_for_events(20, timeout=60)
        wait_for(lambda: probes.ready()[0] == 200, what="/readyz to recover")
    finally:
        holder.close()
        err = stop(proc)
    assert set(capture.uuids()) == uuids
    assert held > LOCK_TIMEOUT
    assert "[db_lock_timeout]" in err, err
    assert err.index("[db_lock_timeout]") < err.index("[db_timeouts_over]"), err
    assert "[db_unavailable]" not in err, err


SLOW = 12.0  # seconds: the capture endpoint's answer to the batch in flight


class Application:
    """Enqueues one event per transaction, timing each commit, until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.waits: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.url) as conn:
            while not self._stop.is_set():
                started = time.monotonic()
                outbox.enqueue(conn, "app_event", "user-1", {})
                conn.commit()
                self.waits.append(time.monotonic() - started)
                self._stop.wait(0.05)

    def __enter__(self) -> Application:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def worker_transactions(db: psycopg.Connection[Any]) -> int:
    """The worker's sessions that are inside a transaction between two statements."""
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'outbox-worker %%' AND state LIKE 'idle in transaction%%'"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_slow_batch_holds_no_lock_so_a_migration_does_not_wait_for_it(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    """Before the snapshot engine, a batch on the wire held its rows' locks, so a
    migration's ACCESS EXCLUSIVE lock waited for it (and the application's INSERTs
    behind the migration): hence migrate's short lock_timeout and retries. Now a batch
    is a lease, a row: while it is on the wire no transaction of the worker is open,
    and a lock on every outbox table (what a migration that alters them takes) is
    granted at its first try, the application waiting only for as long as it is held."""
    capture.enqueue_reply(Reply(status=200, delay=SLOW))  # the first request only
    env = worker_env(
        database_url,
        capture,
        OUTBOX_REQUEST_TIMEOUT="60",
        OUTBOX_LEASE_SECONDS="600",
        OUTBOX_BATCH_SIZE="100",
    )
    enqueue_n(database_url, 10)
    proc = start_worker(env)
    try:
        wait_for(lambda: batches_in_flight(database_url) == 1, what="the slow batch in flight")
        sent = time.monotonic()
        with Application(database_url) as app:
            wait_for(lambda: app.waits, what="the application's first enqueue")
            assert worker_transactions(db) == 0  # the batch is on the wire, nothing open
            with psycopg.connect(database_url, application_name="a migration") as migration:
                migration.execute(
                    sql.SQL("SET lock_timeout = {}").format(
                        sql.Literal(f"{int(MIGRATE_LOCK_TIMEOUT * 1000)}ms")
                    )
                )
                started = time.monotonic()
                # The view: every table it reads (the event tables, outbox_retry,
                # outbox_batches, outbox_ticks).
                migration.execute("LOCK TABLE outbox_events IN ACCESS EXCLUSIVE MODE")
                granted = time.monotonic() - started
                assert batches_in_flight(database_url) == 1  # it did not wait for the batch
                migration.commit()
            wait_for(lambda: len(app.waits) >= 3, what="enqueues after the lock")
        assert time.monotonic() - sent < SLOW  # all of it while the batch was on the wire
        longest = max(app.waits)
        print(f"lock granted in {granted:.3f}s; the longest enqueue beside it: {longest:.3f}s")
        # Before: the migration met the batch (10.6 and 11.0 s measured for one enqueue
        # without migrate's lock_timeout, at most MIGRATE_LOCK_TIMEOUT per try with it).
        assert granted < MIGRATE_LOCK_TIMEOUT
        assert longest < SLOW / 2, sorted(app.waits)[-5:]
        wait_for(lambda: count(db) == 0, timeout=60, what="every event shipped")
    finally:
        err = stop(proc)
    assert "Traceback" not in err
    assert len(capture.uuids()) == 10 + len(app.waits)
    assert MIGRATE_LOCK_TIMEOUT < SLOW / 2
