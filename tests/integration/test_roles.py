"""Least privilege: the application may only INSERT events (keys through a function);
the worker may not write anything but the outbox, nor lock it whole. (Grants are those
documented in docs/operations.md.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import outbox
from tests.conftest import create_database, drop_database
from worker.commands import status_report
from worker.drain import Drainer
from worker.settings import Settings
from worker.sinks import MemorySink
from worker.storage.base import BatchOutcome
from worker.storage.snapshot_storage import SnapshotStorage

EVENT_TABLES = "outbox_events_0, outbox_events_1, outbox_events_2, outbox_events_3"
APP_GRANTS = f"""
GRANT USAGE ON SCHEMA public TO {{app}};
GRANT INSERT (uuid, event, distinct_id, properties, "timestamp", destination)
    ON {EVENT_TABLES} TO {{app}};
GRANT EXECUTE ON FUNCTION
    outbox_enqueue_keyed(uuid, text, text, jsonb, text, timestamptz, text),
    outbox_enqueue_keyed_rows(jsonb),
    outbox_snapshot_slot()
    TO {{app}};
"""
WORKER_GRANTS = f"""
GRANT USAGE ON SCHEMA public TO {{worker}};
GRANT SELECT ON {EVENT_TABLES}, outbox_ticks, outbox_event_tables TO {{worker}};
GRANT SELECT, UPDATE, DELETE ON outbox_batches TO {{worker}};
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_retry TO {{worker}};
GRANT EXECUTE ON FUNCTION
    outbox_snapshot_tick(integer),
    outbox_snapshot_rotate(boolean),
    outbox_snapshot_slot(),
    outbox_expire_dedup_keys(integer),
    outbox_start_dedup_window(text[], double precision),
    outbox_free_dedup_keys(text[])
    TO {{worker}};
GRANT SELECT ON outbox_events, outbox_stuck TO {{worker}};
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_worker_state TO {{worker}};
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_ledger TO {{worker}};
"""


@pytest.fixture
def roles(db: psycopg.Connection[Any]) -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    app, worker = f"outbox_app_{suffix}", f"outbox_worker_{suffix}"
    db.execute(f"CREATE ROLE {app} LOGIN")
    db.execute(f"CREATE ROLE {worker} LOGIN")
    db.execute(APP_GRANTS.format(app=app))
    db.execute(WORKER_GRANTS.format(worker=worker))
    yield app, worker
    for role in (app, worker):
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")


def test_the_application_role_can_only_insert(
    database_url: str, db: psycopg.Connection[Any], roles: tuple[str, str]
) -> None:
    app, _ = roles
    with psycopg.connect(database_url) as conn:
        conn.execute(f"SET ROLE {app}")
        plain = outbox.enqueue(conn, "signup", "user-1", {"plan": "free"})
        keyed = outbox.enqueue(conn, "signup", "user-1", dedup_key="signup:user-1")
        duplicate = outbox.enqueue(conn, "signup", "user-1", dedup_key="signup:user-1")
        many = outbox.enqueue_many(conn, [{"event": "a", "distinct_id": "u"}] * 3)
        conn.commit()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM outbox_events")
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM outbox_events_0")
    assert plain is not None and keyed is not None and duplicate is None
    assert all(many)
    assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (5,)


def test_the_worker_role_can_drain(
    database_url: str, db: psycopg.Connection[Any], roles: tuple[str, str]
) -> None:
    _, worker = roles
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, "signup", "user-1", dedup_key="k")
        outbox.enqueue(conn, "signup", "user-2")
        conn.commit()
    separator = "&" if "?" in database_url else "?"
    as_worker = f"{database_url}{separator}options={quote(f'-c role={worker}')}"
    sink = MemorySink()
    settings = Settings(database_url=as_worker)
    storage = SnapshotStorage(as_worker)
    try:
        Drainer(storage, sink, settings).drain()
    finally:
        storage.close()
    assert len(sink.events) == 2
    assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,)
    with psycopg.connect(as_worker) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (worker,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE nope (id int)")


# --------------------------------------------------------------------------- what each
# role cannot do (migrations 0004 and 0007 and the documented grants)

# The database-level part of the documented setup: PostgreSQL lets PUBLIC connect to
# every database and create temporary tables in it unless told otherwise.
DATABASE_GRANTS = """
REVOKE CONNECT, TEMPORARY ON DATABASE {database} FROM PUBLIC;
GRANT CONNECT ON DATABASE {database} TO {app}, {worker};
"""
OTHER_DATABASE = "REVOKE CONNECT ON DATABASE {other} FROM PUBLIC"


def _as(database_url: str, role: str) -> str:
    separator = "&" if "?" in database_url else "?"
    return f"{database_url}{separator}options={quote(f'-c role={role}')}"


def _refused(conn: psycopg.Connection[Any], statement: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


LOCK_MODES = ("ACCESS SHARE", "ROW EXCLUSIVE", "SHARE", "EXCLUSIVE", "ACCESS EXCLUSIVE")


def test_what_the_application_role_cannot_do(
    database_url: str, db: psycopg.Connection[Any], roles: tuple[str, str]
) -> None:
    app, _ = roles
    with psycopg.connect(database_url) as owner:
        outbox.enqueue(owner, "signup", "user-1", dedup_key="signup:alice@example.com")
        owner.commit()
    with psycopg.connect(_as(database_url, app), autocommit=True) as conn:
        # Read no event and no key.
        _refused(conn, "SELECT uuid FROM outbox_events")
        for t in range(4):
            _refused(conn, f"SELECT uuid FROM outbox_events_{t}")
        _refused(conn, "SELECT uuid FROM outbox_retry")
        _refused(conn, "SELECT dedup_key FROM outbox_dedup_keys")
        # Change nothing written; no transaction id of its choosing (which could hide
        # an event from the batches), no key without claiming it.
        _refused(conn, "UPDATE outbox_events_0 SET event = 'x'")
        _refused(conn, "DELETE FROM outbox_events_0")
        _refused(conn, "TRUNCATE outbox_events_0")
        for column, value in (("txid", "1"), ("dedup_key", "'k'")):
            _refused(
                conn,
                f"INSERT INTO outbox_events_0 (uuid, event, distinct_id, {column})"
                f" VALUES (gen_random_uuid(), 'e', 'u', {value})",
            )
        _refused(
            conn,
            'INSERT INTO outbox_retry (uuid, "timestamp", event, distinct_id, properties)'
            " VALUES (gen_random_uuid(), now(), 'e', 'u', '{}')",
        )
        _refused(conn, "UPDATE outbox_batches SET lease = NULL")
        _refused(conn, "UPDATE outbox_ticks SET snapshot = snapshot")
        # No key without its event: the table is closed, the function writes both.
        _refused(conn, "INSERT INTO outbox_dedup_keys VALUES ('k', 'infinity')")
        _refused(conn, "UPDATE outbox_dedup_keys SET expires_at = now()")
        _refused(conn, "DELETE FROM outbox_dedup_keys")
        row = conn.execute(
            "SELECT outbox_enqueue_keyed(gen_random_uuid(), 'e', 'u', '{}', NULL, NULL, 'k')"
        ).fetchone()
        assert row == ("k",)
        # None of the worker's functions; no lock that could stop the others.
        _refused(conn, "SELECT outbox_snapshot_tick(5000)")
        _refused(conn, "SELECT outbox_snapshot_rotate(true)")
        _refused(conn, "SELECT outbox_expire_dedup_keys(10)")
        for mode in ("SHARE", "EXCLUSIVE", "ACCESS EXCLUSIVE"):
            for t in range(4):
                with conn.transaction():
                    _refused(conn, f"LOCK TABLE outbox_events_{t} IN {mode} MODE")
        for mode in LOCK_MODES:
            with conn.transaction():
                _refused(conn, f"LOCK TABLE outbox_dedup_keys IN {mode} MODE")
    keyed = db.execute("SELECT count(*) FROM outbox_events WHERE dedup_key = 'k'").fetchone()
    assert keyed == (1,)  # the key came with its event


def test_what_the_worker_role_cannot_do(
    server_url: str, database_url: str, db: psycopg.Connection[Any], roles: tuple[str, str]
) -> None:
    app, worker = roles
    database = conninfo_to_dict(database_url)["dbname"]
    other = f"outbox_other_{uuid.uuid4().hex[:8]}"
    create_database(server_url, other)
    try:
        db.execute(DATABASE_GRANTS.format(database=database, app=app, worker=worker))
        db.execute(OTHER_DATABASE.format(other=other))
        with psycopg.connect(make_conninfo(database_url, user=worker), autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (worker,)
            # No event of its own, no change to one written: the event tables are
            # read-only to it (emptied only by outbox_snapshot_rotate's TRUNCATE).
            for t in range(4):
                _refused(
                    conn,
                    f"INSERT INTO outbox_events_{t} (uuid, event, distinct_id)"
                    " VALUES (gen_random_uuid(), 'e', 'u')",
                )
                _refused(conn, f"DELETE FROM outbox_events_{t}")
                _refused(conn, f"TRUNCATE outbox_events_{t}")
                _refused(conn, f"UPDATE outbox_events_{t} SET event = event")
                # Nothing that would stop enqueue's INSERTs.
                for mode in ("ROW EXCLUSIVE", "SHARE", "EXCLUSIVE", "ACCESS EXCLUSIVE"):
                    with conn.transaction():
                        _refused(conn, f"LOCK TABLE outbox_events_{t} IN {mode} MODE")
            _refused(
                conn,
                "INSERT INTO outbox_ticks (tick_id, snapshot, pages) VALUES (99, '1:1:', '{}')",
            )
            _refused(
                conn,
                "INSERT INTO outbox_batches (from_tick, to_tick, txid_lo, txid_hi)"
                " VALUES (1, 1, 1, 1)",
            )
            _refused(conn, "SELECT outbox_enqueue_keyed_rows('[]')")
            # The dedup keys only through the functions (migration 0010): no key read,
            # none claimed or changed by hand, and no lock that would hold up enqueues
            # with a key.
            _refused(conn, "SELECT dedup_key FROM outbox_dedup_keys")
            _refused(conn, "INSERT INTO outbox_dedup_keys VALUES ('k', 'infinity')")
            _refused(conn, "UPDATE outbox_dedup_keys SET expires_at = now()")
            _refused(conn, "DELETE FROM outbox_dedup_keys")
            with conn.transaction():
                _refused(conn, "LOCK TABLE outbox_dedup_keys IN ACCESS EXCLUSIVE MODE")
            _refused(conn, "CREATE TABLE nope (id int)")
            _refused(conn, "CREATE TEMP TABLE nope (id int)")
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(make_conninfo(database_url, user=worker, dbname=other)).close()
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(make_conninfo(database_url, user=app, dbname=other)).close()
        with psycopg.connect(make_conninfo(database_url, user=app)) as conn:
            _refused(conn, "CREATE TEMP TABLE nope (id int)")
    finally:
        drop_database(server_url, other)


def test_a_delete_right_would_let_a_role_lock_the_whole_table(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    """Why the worker truncates through a function and has no right but SELECT on the
    event tables: PostgreSQL lets DELETE (or UPDATE) take any table lock, and ACCESS
    EXCLUSIVE stops every enqueue."""
    role = f"outbox_deleter_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {role}")
    db.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
    db.execute(f"GRANT SELECT, DELETE ON outbox_events_0 TO {role}")
    try:
        with psycopg.connect(_as(database_url, role)) as conn:
            conn.execute("LOCK TABLE outbox_events_0 IN ACCESS EXCLUSIVE MODE")
            conn.rollback()
    finally:
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")


def test_the_worker_role_runs_every_command(
    database_url: str, db: psycopg.Connection[Any], roles: tuple[str, str]
) -> None:
    _, worker = roles
    with psycopg.connect(database_url) as conn:
        outbox.enqueue_many(
            conn, [{"event": "e", "distinct_id": f"u{i}", "dedup_key": f"k{i}"} for i in (2, 3)]
        )
        conn.commit()
    # Two dead ones, as a worker leaves them, with their keys held.
    db.execute(
        'INSERT INTO outbox_retry (uuid, "timestamp", event, distinct_id, dedup_key,'
        " properties, status, attempts, last_error)"
        " SELECT gen_random_uuid(), now(), 'e', 'u' || k, k, '{}', 'dead', 5, 'HTTP 400'"
        " FROM unnest(ARRAY['k0', 'k1']) AS k"
    )
    db.execute("INSERT INTO outbox_dedup_keys VALUES ('k0', 'infinity'), ('k1', 'infinity')")
    db.execute(
        "UPDATE outbox_dedup_keys SET expires_at = now() - interval '1 day' WHERE dedup_key = 'k3'"
    )
    store = SnapshotStorage(_as(database_url, worker))
    try:
        assert status_report(store)["dead"] == 2
        assert len(store.dead()) == 2
        assert store.backlog_capped().pending == 2
        assert store.requeue_dead(event="e").requeued == 2
        db.execute("UPDATE outbox_retry SET status = 'dead' WHERE dedup_key = 'k0'")
        assert store.purge_dead(0.0) == 1
        assert store.expire_dedup_keys() == 1
        # Delivered, k1 (a retry) and k2 (in a batch) start their dedup window.
        for _ in range(2):
            batch = store.claim(100, 4 * 1024 * 1024, 60.0)
            assert batch is not None
            keyed = [e.id for e in batch.events if e.distinct_id in ("uk1", "u2")]
            store.finish(
                batch,
                BatchOutcome(
                    shipped=keyed,
                    defer=[e.id for e in batch.events if e.id not in keyed],
                    defer_delay=3600.0,
                ),
                dedup_window=600.0,
                max_attempts=5,
                backoff_base=1.0,
                backoff_max=60.0,
            )
    finally:
        store.close()
    keys = db.execute(
        "SELECT dedup_key, expires_at < 'infinity' FROM outbox_dedup_keys ORDER BY 1"
    ).fetchall()
    # k0 purged with its event, k3 expired; k1 and k2 delivered: their window runs.
    assert keys == [("k1", True), ("k2", True)]
