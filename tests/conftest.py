"""Shared fixtures: a real PostgreSQL, one fresh database per test, the capture endpoint.

The server is ``DATABASE_URL`` when set (CI uses the machine's PostgreSQL service),
else an embedded PostgreSQL started for this test session in a temporary directory.
A template database is migrated once; each test gets ``CREATE DATABASE … TEMPLATE``.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import outbox
from worker.database import downgrade, libpq_url, migrate, start_embedded, with_database
from worker.settings import Settings
from worker.testing import FLAGS_PATHS, CaptureServer, ReceivedRequest


@pytest.fixture(scope="session")
def server_url() -> str:
    """A URL to a database on the test server, used to create and drop test databases."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return libpq_url(url)
    # Not under pytest's basetemp: a concurrent pytest run may prune that.
    data_dir = Path(tempfile.mkdtemp(prefix="outbox-test-pg-"))
    return start_embedded(data_dir, announce=False, delete_at_exit=True)


def _admin(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


def create_database(server_url: str, name: str, template: str | None = None) -> str:
    """Create a database on the test server and return its URL."""
    with _admin(server_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        if template:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
        else:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """Drop a test database, disconnecting whoever is still on it."""
    with _admin(server_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    """A migrated template database for this test session."""
    name = f"outbox_tmpl_{os.getpid()}"
    url = create_database(server_url, name)
    migrate(url)
    yield name
    drop_database(server_url, name)


@pytest.fixture
def empty_database(server_url: str) -> Iterator[str]:
    """A fresh database with no outbox tables (for migration and setup tests)."""
    name = f"outbox_empty_{uuid.uuid4().hex[:12]}"
    url = create_database(server_url, name)
    yield url
    drop_database(server_url, name)


@pytest.fixture
def database_url(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"outbox_t_{uuid.uuid4().hex[:12]}"
    url = create_database(server_url, name, template=template_db)
    yield url
    drop_database(server_url, name)


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit psycopg connection to the test database, for looking at tables."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    """The project's PostHog-compatible capture endpoint, over real HTTP."""
    with CaptureServer() as srv:
        yield srv


@pytest.fixture
def settings_for(database_url: str) -> Callable[..., Settings]:
    """Worker settings against the test database with fast retries; override as needed."""

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "database_url": database_url,
            "backoff_base": 0.0,
            "backoff_max": 0.05,
            "poll_interval": 0.05,
            "lease_seconds": 30.0,
            "request_timeout": 5.0,
            "shutdown_grace": 5.0,
            "worker_id": f"test-{os.getpid()}",
        }
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture
def in_process_workers(
    settings_for: Callable[..., Settings],
) -> Iterator[Callable[..., Any]]:
    """Start a scheduled worker (``Worker.start``) in this process with
    ``settings_for(**overrides)``; every one is stopped when the test ends."""
    from worker.app import Worker

    workers: list[Worker] = []

    def start(**overrides: Any) -> Worker:
        worker = Worker(settings_for(**overrides))
        worker.start()
        workers.append(worker)
        return worker

    yield start
    for w in workers:
        w.stop()


def worker_env(
    database_url: str, capture: CaptureServer | None = None, **extra: str
) -> dict[str, str]:
    """Environment for an ``outbox-worker`` subprocess against the test database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "POSTHOG_"))}
    env["DATABASE_URL"] = database_url
    env["OUTBOX_LOG_LEVEL"] = "INFO"
    if capture is not None:
        env["POSTHOG_API_KEY"] = "phc_test"
        env["POSTHOG_HOST"] = capture.url
    env.update(extra)
    return env


def capture_requests(srv: CaptureServer) -> list[ReceivedRequest]:
    """The capture requests ``srv`` received: not the worker's API key checks (``/flags/``)."""
    return [r for r in srv.requests if r.path not in FLAGS_PATHS]


#: The CHECK constraints migration 0004 adds to outbox_events.
CHECKS_0004 = (
    "outbox_events_properties_check",
    "outbox_events_timestamp_check",
    "outbox_events_event_check",
    "outbox_events_distinct_id_check",
)


def pend_a_migration_that_alters_outbox_events(url: str) -> None:
    """Make ``migrate`` have work that locks the outbox tables: the database as revision
    0006 left it (0007's downgrade: the old ``outbox_events`` table back, holding the
    undelivered events), so that ``migrate`` applies 0007 again, which locks that
    table, moves its rows into the snapshot engine's tables and makes the view. (A
    worker of this version needs 0007: it does not run on such a database.)"""
    downgrade(url, "0006")


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it is truthy (returning its value) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- the snapshot engine, seen from a test -------------------------------------------
#
# Events wait in the insert-only tables outbox_events_0 .. outbox_events_3 and, once a
# delivery failed, in outbox_retry; the view ``outbox_events`` shows every event not
# yet delivered. A worker holds nothing across a POST: a batch is *leased* (a row of
# outbox_batches with ``lease`` and ``leased_until``, or retry rows with ``lease`` and
# ``next_attempt_at`` at the lease's end), so a killed worker's batch comes back when
# its lease runs out, not when its session ends.

#: How many event tables there are (outbox_events_0 .. outbox_events_{N-1}).
EVENT_TABLES = 4


def _one(url: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def undelivered(url: str, where: str = "true") -> int:
    """Events not yet delivered (rows of the view ``outbox_events``) matching the SQL
    condition ``where`` over its columns (``status``, ``attempts``, ``retry_id``, ...)."""
    return int(_one(url, f"SELECT count(*) FROM outbox_events WHERE {where}"))


#: Live leases: each leased snapshot batch, and each set of retry rows claimed together.
_LEASES = """
SELECT (SELECT count(*) FROM outbox_batches
        WHERE lease IS NOT NULL AND leased_until > now())
     + (SELECT count(DISTINCT lease) FROM outbox_retry
        WHERE lease IS NOT NULL AND status = 'pending' AND next_attempt_at > now())
"""


def batches_in_flight(url: str) -> int:
    """Batches a worker holds now: leased snapshot batches and leased sets of retry
    rows whose lease has not run out (a killed worker's stay held until then)."""
    return int(_one(url, _LEASES))


def _held_part(t: int) -> str:
    """Rows of event table ``t`` in a snapshot batch under a live lease, after the
    batch's progress (the membership test of the engine's read)."""
    return f"""
SELECT count(*) FROM outbox_batches AS b
JOIN outbox_ticks AS t1 ON t1.tick_id = b.from_tick
JOIN outbox_ticks AS t2 ON t2.tick_id = b.to_tick
JOIN outbox_events_{t} AS e ON (
    (e.txid >= b.txid_lo AND e.txid < b.txid_hi
     AND txid_visible_in_snapshot(e.txid, t2.snapshot::txid_snapshot)
     AND NOT txid_visible_in_snapshot(e.txid, t1.snapshot::txid_snapshot))
    OR e.txid = ANY(b.txid_extra))
WHERE b.lease IS NOT NULL AND b.leased_until > now()
  AND (b.progress_table < {t} OR (b.progress_table = {t} AND e.ctid > b.progress_ctid::tid))"""


_CLAIMABLE = (
    "SELECT (SELECT count(*) FROM outbox_events WHERE retry_id IS NULL)"
    + "".join(f" - ({_held_part(t)})" for t in range(EVENT_TABLES))
    + " + (SELECT count(*) FROM outbox_retry"
    " WHERE status = 'pending' AND next_attempt_at <= now())"
)


def claimable(url: str) -> int:
    """Events a worker could claim right now: those of the event tables in no live
    lease (not yet in a batch, or in a batch nobody holds or whose lease ran out) and
    the due retries."""
    return int(_one(url, _CLAIMABLE))


def make_retries_due(url: str) -> int:
    """Make every pending retry nobody holds due now (what waiting out the backoff
    would do); returns how many. Leased rows are left to their lease."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(
            "UPDATE outbox_retry SET next_attempt_at = now()"
            " WHERE status = 'pending' AND lease IS NULL"
        )
        return cur.rowcount


def move_to_retry(
    url: str | psycopg.Connection[Any],
    uuids: Any,
    *,
    status: str = "dead",
    attempts: int = 1,
    last_error: str | None = None,
    due_in: float = 0.0,
    **columns: Any,
) -> int:
    """Move the events ``uuids`` from the event tables into ``outbox_retry``, as a
    failed delivery leaves them: ``status`` (``dead`` or ``pending``), ``attempts``,
    ``last_error``, due in ``due_in`` seconds. ``columns`` (``event``, ``distinct_id``)
    overwrite theirs, for what older versions, other writers or a server's answer may
    have stored. Returns how many moved.

    On a URL the events must be committed and in no batch yet (call it before a
    worker starts); on a connection it runs in the caller's transaction (commit it),
    so events enqueued in that transaction are in ``outbox_retry`` when they commit
    and a running worker never sees them in an event table. (A test shortcut: the
    engine itself never deletes from an event table; it files a batch's failed
    events into outbox_retry.)"""
    names = [u if isinstance(u, str) else str(u) for u in uuids]
    event = columns.pop("event", None)
    distinct_id = columns.pop("distinct_id", None)
    if columns:
        raise TypeError(f"move_to_retry: unknown columns {sorted(columns)}")
    if not isinstance(url, str):
        return _move_to_retry(url, names, event, distinct_id, status, attempts, last_error, due_in)
    with psycopg.connect(url) as conn:
        return _move_to_retry(conn, names, event, distinct_id, status, attempts, last_error, due_in)


def _move_to_retry(
    conn: psycopg.Connection[Any],
    names: list[str],
    event: str | None,
    distinct_id: str | None,
    status: str,
    attempts: int,
    last_error: str | None,
    due_in: float,
) -> int:
    moved = 0
    for t in range(EVENT_TABLES):
        cur = conn.execute(
            f"""
            WITH gone AS (
                DELETE FROM outbox_events_{t} WHERE uuid = ANY(%(uuids)s::uuid[])
                RETURNING *
            )
            INSERT INTO outbox_retry (uuid, "timestamp", event, distinct_id, destination,
                dedup_key, properties, status, attempts, next_attempt_at, last_error)
            SELECT uuid, "timestamp", coalesce(%(event)s, event),
                coalesce(%(distinct_id)s, distinct_id), destination, dedup_key,
                properties, %(status)s, %(attempts)s,
                now() + %(due_in)s * interval '1 second', %(last_error)s
            FROM gone
            """,
            {
                "uuids": names,
                "event": event,
                "distinct_id": distinct_id,
                "status": status,
                "attempts": attempts,
                "due_in": due_in,
                "last_error": last_error,
            },
        )
        moved += cur.rowcount
    return moved


def event_table_bytes(url: str) -> list[int]:
    """Each event table's size on disk (``pg_relation_size``): 0 once rotation has
    truncated it."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT ARRAY["
            + ", ".join(f"pg_relation_size('outbox_events_{t}')" for t in range(EVENT_TABLES))
            + "]"
        ).fetchone()
    assert row is not None
    return [int(n) for n in row[0]]


# What every event is stamped with under the default configuration (pinned by the
# ``default_config`` fixture, so the machine's APP_ENV or ANALYTICS_* variables cannot
# change the tests that use it).
STAMP = {
    "environment": "dev",
    "event_schema_version": 1,
    "$lib": "posthog-outbox",
    "$lib_version": outbox.__version__,
}


@pytest.fixture
def default_config() -> Iterator[None]:
    """The default analytics configuration for the test, whatever was set before."""
    previous = outbox.get_config()
    outbox.configure(outbox.AnalyticsConfig())
    yield
    outbox.configure(previous)


def record_statements(engine: Any) -> list[str]:
    """Every SQL statement ``engine``'s connections send from now on, appended as it goes.

    Recorded in psycopg's cursors, not in SQLAlchemy's ``before_cursor_execute``: the
    library runs its statements on the psycopg connection under a SQLAlchemy session
    (outbox._db), where SQLAlchemy's events do not see them.
    """
    from sqlalchemy import event

    statements: list[str] = []

    class Recording(psycopg.Cursor[Any]):
        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            statements.append(query if isinstance(query, str) else repr(query))
            return super().execute(query, *args, **kwargs)

        def executemany(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            statements.append(query if isinstance(query, str) else repr(query))
            return super().executemany(query, *args, **kwargs)

    @event.listens_for(engine, "checkout")
    def record(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        proxy.driver_connection.cursor_factory = Recording

    return statements
