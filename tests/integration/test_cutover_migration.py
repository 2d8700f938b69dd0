"""Migration 0007: a backlog of the old table, left by a stopped worker of the old kind,
is delivered by the snapshot engine after the upgrade, each event exactly once; the
dead stay dead with their errors; dedup keys stay held. And back down again."""

from __future__ import annotations

import threading
import uuid
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

import outbox
from tests.conftest import wait_for
from worker.database import downgrade, migrate
from worker.drain import Drainer
from worker.settings import Settings
from worker.sinks import MemorySink
from worker.storage.snapshot_storage import SnapshotStorage

#: The old table's columns a row of the backlog sets (the rest are defaults).
_COLUMNS = (
    "uuid",
    "event",
    "distinct_id",
    "properties",
    "destination",
    "dedup_key",
    "status",
    "attempts",
    "next_attempt_at",
    "last_error",
)


def _row(event: str, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "uuid": uuid.uuid4(),
        "event": event,
        "distinct_id": "user-1",
        "properties": '{"n": 1}',
        "destination": "posthog",
        "dedup_key": None,
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": None,
        "last_error": None,
    }
    row.update(values)
    return row


#: What a worker of before 0007 can leave behind when it is stopped.
BACKLOG = [
    *(_row("fresh", distinct_id=f"user-{i}") for i in range(5)),
    _row("fresh_keyed", dedup_key="signup:a"),
    _row("fresh_metric", destination="metrics", properties='{"kind": "a"}'),
    _row("retrying", attempts=2, last_error="HTTP 503 from PostHog"),
    _row("retrying_keyed", attempts=1, last_error="timeout", dedup_key="signup:b"),
    _row("deferred", next_attempt_at="1 hour", last_error="PostHog asked to wait"),
    _row("dead", status="dead", attempts=5, last_error="HTTP 400: bad event"),
    _row("dead_keyed", status="dead", attempts=5, last_error="HTTP 400", dedup_key="signup:c"),
    _row("dead_array", status="dead", attempts=1, last_error="not an object", properties="[1]"),
    # Pending rows the event tables refuse (a database whose 0004 CHECKs were dropped
    # by hand, or rows written before them): dead, never lost.
    _row("bad_string", properties='"text"'),
    _row("bad_array", properties="[1, 2]", attempts=3, last_error="HTTP 503"),
    _row("bad_number", properties="7", next_attempt_at="1 hour"),
    _row("", distinct_id="user-empty"),
]
#: Why each broken pending row is dead after 0007.
BROKEN = {
    "bad_string": "properties: is a JSON string, not an object (found by migration 0007)",
    "bad_array": "properties: is a JSON array, not an object (found by migration 0007)",
    "bad_number": "properties: is a JSON number, not an object (found by migration 0007)",
    "": "event: is empty (found by migration 0007)",
}


def _write_backlog(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for name in (
            "outbox_events_properties_check",
            "outbox_events_event_check",
        ):
            conn.execute(f"ALTER TABLE outbox_events DROP CONSTRAINT {name}")
        for row in BACKLOG:
            values = {**row}
            delay = values.pop("next_attempt_at")
            conn.execute(
                f"INSERT INTO outbox_events ({', '.join(_COLUMNS[:-2])}, last_error,"
                " next_attempt_at)"
                " VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s,"
                " now() + coalesce(%s::interval, '0'))",
                (*(values[c] for c in _COLUMNS[:-2]), values["last_error"], delay),
            )
        # Keys: those of undelivered events held (infinity); one delivered a minute
        # ago, still in its window.
        conn.execute(
            "INSERT INTO outbox_dedup_keys SELECT dedup_key, 'infinity' FROM outbox_events"
            " WHERE dedup_key IS NOT NULL"
        )
        conn.execute(
            "INSERT INTO outbox_dedup_keys VALUES ('signup:delivered', now() + interval '1 day')"
        )


def _view(url: str) -> dict[uuid.UUID, tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT uuid, retry_id IS NULL, event, destination, status, attempts, last_error,"
            " properties::text, dedup_key FROM outbox_events"
        ).fetchall()
    assert len(rows) == len({r[0] for r in rows}), "a uuid shows twice"
    return {r[0]: r[1:] for r in rows}


def test_a_backlog_of_the_old_table_is_delivered_once_after_the_upgrade(
    empty_database: str,
) -> None:
    migrate(empty_database, "0006")
    _write_backlog(empty_database)
    assert migrate(empty_database) == ["0007", "0008", "0009", "0010"]

    view = _view(empty_database)
    assert len(view) == len(BACKLOG)  # every event, nothing lost
    by_event = {row["event"]: view[row["uuid"]] for row in BACKLOG}
    # (in an event table, event, destination, status, attempts, last_error, properties, key)
    assert by_event["fresh_keyed"] == (
        True,
        "fresh_keyed",
        "posthog",
        "pending",
        0,
        None,
        '{"n": 1}',
        "signup:a",
    )
    assert by_event["fresh_metric"][:4] == (True, "fresh_metric", "metrics", "pending")
    assert by_event["retrying"][:6] == (
        False,
        "retrying",
        "posthog",
        "pending",
        2,
        "HTTP 503 from PostHog",
    )
    assert by_event["deferred"][:6] == (
        False,
        "deferred",
        "posthog",
        "pending",
        0,
        "PostHog asked to wait",
    )
    assert by_event["dead"][:6] == (False, "dead", "posthog", "dead", 5, "HTTP 400: bad event")
    assert by_event["dead_array"][4:7] == (1, "not an object", "[1]")
    for event, error in BROKEN.items():
        assert by_event[event][0] is False and by_event[event][3] == "dead", event
        assert by_event[event][5] == error, event
    with psycopg.connect(empty_database) as conn:
        # The keys stay held: an event with one of them is still a duplicate.
        for key in ("signup:a", "signup:b", "signup:c", "signup:delivered"):
            assert outbox.enqueue(conn, "again", "user-1", dedup_key=key) is None, key
        conn.rollback()
        stuck = dict(conn.execute("SELECT uuid, reason FROM outbox_stuck").fetchall())
        deferred = conn.execute(
            "SELECT next_attempt_at > now() + interval '50 minutes' FROM outbox_retry"
            " WHERE event = 'deferred'"
        ).fetchone()
        assert deferred == (True,)  # still held back
        # The deferred and retrying ones are due now (as if their time had come).
        conn.execute("UPDATE outbox_retry SET next_attempt_at = now()")
        conn.commit()
    dead_events = {"dead", "dead_keyed", "dead_array", *BROKEN}
    for row in BACKLOG:
        if row["event"] in dead_events:
            assert stuck[row["uuid"]].startswith("dead after "), row["event"]

    sink, metrics = MemorySink(), MemorySink()
    storage = SnapshotStorage(empty_database)
    try:
        stats = Drainer(
            storage, sink, Settings(database_url=empty_database), metrics_sink=metrics
        ).drain()
    finally:
        storage.close()
    delivered = [uuid.UUID(e["uuid"]) for e in [*sink.events, *metrics.events]]
    expected = [row["uuid"] for row in BACKLOG if row["event"] not in dead_events]
    assert sorted(delivered) == sorted(expected)  # each exactly once
    assert stats.dead == 0
    assert {e["event"] for e in metrics.events} == {"fresh_metric"}

    left = _view(empty_database)
    assert {row[1] for row in left.values()} == dead_events  # only the dead are left
    assert all(row[3] == "dead" for row in left.values())
    for row in BACKLOG:
        if row["event"] in dead_events:
            assert left[row["uuid"]][5] == (BROKEN.get(row["event"]) or row["last_error"]), row[
                "event"
            ]
    with psycopg.connect(empty_database) as conn:
        keys = dict(
            conn.execute(
                "SELECT dedup_key, expires_at = 'infinity' FROM outbox_dedup_keys"
            ).fetchall()
        )
    # Delivered: the window started; dead: still held, as before the cutover.
    assert keys == {
        "signup:a": False,
        "signup:b": False,
        "signup:c": True,
        "signup:delivered": False,
    }


def test_an_old_workers_batch_in_flight_makes_the_upgrade_wait_then_it_moves_all(
    empty_database: str,
) -> None:
    """A worker of the old kind still running holds its batch's rows locked: the
    migration waits (at most its lock timeout per try) and moves everything once the
    batch's transaction ends; nothing is written to the old table after the copy."""
    migrate(empty_database, "0006")
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox_events (uuid, event, distinct_id)"
            " SELECT gen_random_uuid(), 'e', 'u' || g FROM generate_series(1, 3) AS g"
        )
    batch = psycopg.connect(empty_database)
    batch.execute("SELECT id FROM outbox_events FOR UPDATE")
    try:
        with pytest.raises(outbox.OutboxDatabaseError, match="could not take its locks"):
            migrate(empty_database, lock_timeout=0.1, retry_for=0.3)
    finally:
        batch.rollback()
        batch.close()
    assert migrate(empty_database, lock_timeout=0.1) == ["0007", "0008", "0009", "0010"]
    assert len(_view(empty_database)) == 3


def test_downgrade_moves_the_undelivered_events_back(empty_database: str) -> None:
    migrate(empty_database, "0006")
    _write_backlog(empty_database)
    migrate(empty_database)
    before = _view(empty_database)
    with psycopg.connect(empty_database) as conn:
        # Written after the cutover: one by the keyed function, one by a plain INSERT.
        assert outbox.enqueue(conn, "after", "user-9", dedup_key="signup:after") is not None
        conn.execute(
            "INSERT INTO outbox_events_0 (uuid, event, distinct_id, properties, destination)"
            " VALUES (gen_random_uuid(), 'after_plain', 'user-9', '{}', 'metrics')"
        )
        conn.commit()
    assert downgrade(empty_database, "0006") == ["0010", "0009", "0008", "0007"]
    with psycopg.connect(empty_database) as conn:
        rows = conn.execute(
            "SELECT uuid, event, destination, status, attempts, last_error, properties::text"
            " FROM outbox_events"
        ).fetchall()
        assert conn.execute("SELECT count(*) FROM outbox_retry").fetchone() == (0,)
        for t in range(4):
            empty = conn.execute(f"SELECT count(*) FROM outbox_events_{t}").fetchone()
            assert empty == (0,)
        kinds = conn.execute(
            "SELECT relkind FROM pg_class WHERE relname IN ('outbox_events', 'outbox_stuck')"
            " ORDER BY relname"
        ).fetchall()
        assert kinds == [("r",), ("v",)]
    old = {r[0]: r[1:] for r in rows}
    assert len(old) == len(BACKLOG) + 2
    assert {r[0] for r in old.values()} >= {"after", "after_plain"}
    for key, row in before.items():
        # (event, destination, status, attempts, last_error, properties) as in the view
        assert old[key][:3] == (row[1], row[2], row[3]), row[1]
        assert old[key][3:5] == (row[4], row[5]), row[1]
    assert old[next(k for k, r in old.items() if r[0] == "after_plain")][1] == "metrics"
    # ... and up again: the same events, now in the snapshot engine's tables.
    assert migrate(empty_database) == ["0007", "0008", "0009", "0010"]
    again = _view(empty_database)
    assert set(again) == set(old)
    assert {k: r[1:5] for k, r in again.items() if k in before} == {
        k: r[1:5] for k, r in before.items()
    }


#: The grants documented before 0007 (frozen copies).
OLD_APP_GRANTS = """
GRANT USAGE ON SCHEMA public TO {app};
GRANT INSERT (uuid, event, distinct_id, properties, "timestamp", destination)
    ON outbox_events TO {app};
GRANT EXECUTE ON FUNCTION
    outbox_enqueue_keyed(uuid, text, text, jsonb, text, timestamptz, text),
    outbox_enqueue_keyed_rows(jsonb)
    TO {app};
"""
OLD_WORKER_GRANTS = """
GRANT USAGE ON SCHEMA public TO {worker};
GRANT SELECT ON outbox_events TO {worker};
GRANT UPDATE (status, attempts, next_attempt_at, last_error) ON outbox_events TO {worker};
GRANT EXECUTE ON FUNCTION
    outbox_ack(bigint[], double precision),
    outbox_purge_dead(double precision),
    outbox_expire_dedup_keys(integer)
    TO {worker};
GRANT SELECT ON outbox_stuck TO {worker};
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_worker_state TO {worker};
"""


#: enqueue's plain INSERT before 0007 (its shape: jsonb properties, the destination
#: spelled out).
OLD_PLAIN_INSERT = """
INSERT INTO outbox_events (uuid, event, distinct_id, properties, "timestamp", destination)
SELECT uuid, event, distinct_id, properties, coalesce("timestamp", now()),
       coalesce(destination, 'posthog')
FROM (SELECT gen_random_uuid() AS uuid, CAST(%s AS text) AS event, 'u' AS distinct_id,
             CAST('{"n": 1}' AS jsonb) AS properties, NULL::text AS destination,
             NULL::timestamptz AS "timestamp", 1 AS n) AS input ORDER BY n
"""


def test_an_insert_into_the_view_is_a_new_event_or_refused_in_one_line(
    empty_database: str,
) -> None:
    migrate(empty_database)
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(OLD_PLAIN_INSERT, ("via_view",))
        row = conn.execute(
            "SELECT retry_id, event, destination, status, attempts, properties::text"
            " FROM outbox_events"
        ).fetchall()
        assert row == [(None, "via_view", "posthog", "pending", 0, '{"n": 1}')]
        # A keyed enqueue function of before 0007 whose call waited for the migration
        # writes its (already claimed) key with the event.
        conn.execute(
            "INSERT INTO outbox_events (uuid, event, distinct_id, dedup_key)"
            " VALUES (gen_random_uuid(), 'keyed_via_view', 'u', 'k')"
        )
        keyed = conn.execute(
            "SELECT dedup_key FROM outbox_events WHERE event = 'keyed_via_view'"
        ).fetchall()
        assert keyed == [("k",)]
        for column, value in (("retry_id", "1"), ("status", "'dead'"), ("txid", "1")):
            with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
                conn.execute(
                    f"INSERT INTO outbox_events (uuid, event, distinct_id, {column})"
                    f" VALUES (gen_random_uuid(), 'e', 'u', {value})"
                )
            assert "outbox_events is a view" in str(refused.value).splitlines()[0]
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO outbox_events (uuid, event, distinct_id, properties)"
                " VALUES (gen_random_uuid(), 'e', 'u', '[1]')"
            )


def test_the_grants_documented_before_0007_keep_working(empty_database: str) -> None:
    migrate(empty_database, "0006")
    suffix = uuid.uuid4().hex[:8]
    app, worker = f"outbox_app_{suffix}", f"outbox_worker_{suffix}"
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {app}; CREATE ROLE {worker}")
        conn.execute(OLD_APP_GRANTS.format(app=app))
        conn.execute(OLD_WORKER_GRANTS.format(worker=worker))
    separator = "&" if "?" in empty_database else "?"
    as_worker = f"{empty_database}{separator}options={quote(f'-c role={worker}')}"
    try:
        migrate(empty_database)
        with psycopg.connect(empty_database) as conn:
            conn.execute(f"SET ROLE {app}")
            assert outbox.enqueue(conn, "keyed", "u", dedup_key="k") is not None
            row = conn.execute("SELECT outbox_snapshot_slot()").fetchone()
            assert row is not None
            conn.execute(
                f"INSERT INTO outbox_events_{row[0]}"
                ' (uuid, event, distinct_id, properties, "timestamp", destination)'
                " VALUES (gen_random_uuid(), 'plain', 'u', '{}', now(), NULL)"
            )
            # An application not redeployed yet: its plain INSERT into outbox_events
            # (the view now) still writes an event.
            conn.execute(OLD_PLAIN_INSERT, ("old_app",))
            conn.commit()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM outbox_events")
            conn.rollback()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # no key unclaimed
                conn.execute(
                    "INSERT INTO outbox_events (uuid, event, distinct_id, dedup_key)"
                    " VALUES (gen_random_uuid(), 'e', 'u', 'unclaimed')"
                )
        with psycopg.connect(as_worker) as conn:
            assert conn.execute("SELECT count(*) FROM outbox_events").fetchone() == (3,)
            assert conn.execute("SELECT count(*) FROM outbox_stuck").fetchone() == (0,)
        sink = MemorySink()
        storage = SnapshotStorage(as_worker)
        try:
            Drainer(storage, sink, Settings(database_url=as_worker)).drain()
            assert storage.purge_dead(0.0) == 0
            assert storage.expire_dedup_keys() == 0
        finally:
            storage.close()
        assert sorted(e["event"] for e in sink.events) == ["keyed", "old_app", "plain"]
    finally:
        with psycopg.connect(empty_database, autocommit=True) as conn:
            for role in (app, worker):
                conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_outbox_stuck_over_the_new_tables(empty_database: str) -> None:
    """An event table row is stuck when it waits for over 5 minutes, counted from the
    later of its timestamp and the tick before its interval (it records no creation
    time); outbox_retry's rows as the old table's were."""
    migrate(empty_database)
    with psycopg.connect(empty_database, autocommit=True) as conn:
        slot = conn.execute("SELECT outbox_snapshot_slot()").fetchone()
        assert slot is not None
        insert = (
            f'INSERT INTO outbox_events_{slot[0]} (uuid, event, distinct_id, "timestamp")'
            " VALUES (gen_random_uuid(), %s, 'u', now() - %s::interval)"
        )
        # A backfilled timestamp, just enqueued: the newest tick is recent, not stuck.
        conn.execute(insert, ("backfill", "1 day"))
        assert conn.execute("SELECT count(*) FROM outbox_stuck").fetchone() == (0,)
        # No tick for 10 minutes, an event enqueued 10 minutes ago: nobody ticks.
        conn.execute("UPDATE outbox_ticks SET taken_at = now() - interval '10 minutes'")
        conn.execute(insert, ("waiting", "10 minutes"))
        conn.execute(
            'INSERT INTO outbox_retry (uuid, "timestamp", event, distinct_id, properties,'
            " attempts, last_error) VALUES (gen_random_uuid(), now(), 'retrying', 'u', '{}',"
            " 2, 'HTTP 503')"
        )
        rows = conn.execute(
            "SELECT event, id IS NULL, status, attempts, reason, age > interval '9 minutes'"
            " FROM outbox_stuck ORDER BY event"
        ).fetchall()
    assert rows == [
        (
            "backfill",
            True,
            "pending",
            0,
            "pending for over 5 minutes: is an outbox-worker running against this database?"
            " (outbox-worker status lists the batches in flight)",
            True,
        ),
        (
            "retrying",
            False,
            "pending",
            2,
            "retrying after 2 failed attempts: HTTP 503",
            False,
        ),
        (
            "waiting",
            True,
            "pending",
            0,
            "pending for over 5 minutes: is an outbox-worker running against this database?"
            " (outbox-worker status lists the batches in flight)",
            True,
        ),
    ]


def test_enqueues_waiting_behind_the_migration_land_in_the_new_tables(
    empty_database: str,
) -> None:
    """An application's keyed call (the function of before 0007) and plain INSERT into
    the old table, made while 0007 holds its lock, wait for it and then write their
    events into the snapshot engine's tables (the view's trigger)."""
    migrate(empty_database, "0006")
    blocker = psycopg.connect(empty_database)
    row = blocker.execute("SELECT outbox_snapshot_slot()").fetchone()
    assert row is not None
    # Holds the migration up after it has locked the old table (its first insert into
    # the event table waits for this).
    blocker.execute(f"LOCK TABLE outbox_events_{row[0]} IN ACCESS EXCLUSIVE MODE")
    failures: list[BaseException] = []
    results: dict[str, Any] = {}

    def in_thread(name: str, run: Any) -> threading.Thread:
        def target() -> None:
            try:
                results[name] = run()
            except BaseException as exc:  # pragma: no cover - reported below
                failures.append(exc)

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    def app() -> Any:
        with psycopg.connect(empty_database) as conn:
            key = conn.execute(
                "SELECT outbox_enqueue_keyed(gen_random_uuid(), 'keyed', 'u', '{}',"
                " NULL, NULL, 'k')"
            ).fetchone()
            conn.execute(OLD_PLAIN_INSERT, ("plain",))
            conn.commit()
            return key

    def waiting(pattern: str) -> bool:
        row = watcher.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE %s",
            (pattern,),
        ).fetchone()
        return bool(row and row[0])

    threads = []
    with psycopg.connect(empty_database, autocommit=True) as watcher:
        try:
            threads.append(in_thread("migrate", lambda: migrate(empty_database, lock_timeout=60)))
            wait_for(lambda: waiting("%EXECUTE format($q$%"), what="the migration's move")
            threads.append(in_thread("app", app))
            wait_for(lambda: waiting("SELECT outbox_enqueue_keyed%"), what="the app's call")
        finally:
            blocker.rollback()
            blocker.close()
            for thread in threads:
                thread.join(90)
    assert not failures, failures
    assert results == {"migrate": ["0007", "0008", "0009", "0010"], "app": ("k",)}
    events = {(r[1], r[7], r[0]) for r in _view(empty_database).values()}
    assert events == {("keyed", "k", True), ("plain", None, True)}


def test_an_upgrade_from_0005_in_one_transaction_batches_every_moved_event(
    empty_database: str,
) -> None:
    """0006's first tick and 0007's move of the old table run in one transaction when
    an outbox of revision 0005 is upgraded to the head at once. Another session's
    transaction that began after the migration's and committed before the tick makes
    the migration's own transaction look finished to a snapshot taken inside it: the
    tick must still count it as in progress, or the moved events get no batch."""
    import alembic.command
    from sqlalchemy import create_engine, text

    from outbox.install import alembic_config, sqlalchemy_url

    migrate(empty_database, "0005")
    ids = [uuid.uuid4() for _ in range(5)]
    with psycopg.connect(empty_database, autocommit=True) as conn:
        for i in ids:
            conn.execute(
                "INSERT INTO outbox_events (uuid, event, distinct_id, properties)"
                " VALUES (%s, 'moved', 'user-1', '{}')",
                (i,),
            )
    engine = create_engine(sqlalchemy_url(empty_database))
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT txid_current()"))  # the migration's id
            with psycopg.connect(empty_database, autocommit=True) as other:
                other.execute("SELECT txid_current()")  # a later id, committed first
            config = alembic_config()
            config.attributes["connection"] = connection
            alembic.command.upgrade(config, "head")
            connection.commit()
    finally:
        engine.dispose()

    sink = MemorySink()
    storage = SnapshotStorage(empty_database)
    try:
        Drainer(storage, sink, Settings(database_url=empty_database)).drain()
        storage.maintain()  # a rotation must not truncate them unsent either
    finally:
        storage.close()
    assert sorted(uuid.UUID(e["uuid"]) for e in sink.events) == sorted(ids)
    assert _view(empty_database) == {}
