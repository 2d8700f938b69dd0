"""No single row stops the queue: whatever a row holds, it is delivered as PostHog takes
it or buried with an error naming the problem, and every other event keeps flowing.

Odd rows are written by raw SQL under the application's documented grants, in a
database whose TimeZone is not UTC (where a timestamp near 9999-12-31 reads back as
year 10000). The event tables' constraints (migration 0006) refuse nearly all of it;
what they let in (a timestamp days ahead, control characters, a blank name) is
delivered or buried alone. What no constraint of an event table holds, the dead rows
of ``outbox_retry`` may (migration 0007 files there the old table's rows it could not
move, with hand-made or pre-0004 contents): every command reads them, and ``retry``
leaves the ones that could never be sent dead.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import outbox
from tests.integration.test_roles import APP_GRANTS, WORKER_GRANTS
from worker.app import Worker
from worker.commands import status_report
from worker.drain import Drainer
from worker.settings import Settings
from worker.sinks.base import Outbound
from worker.storage.snapshot_storage import SnapshotStorage
from worker.testing import CaptureServer

# Each odd row: the columns it sets by raw SQL (as SQL expressions), and what the
# event tables' constraints say when they refuse it.
ODD_ROWS: dict[str, dict[str, str]] = {
    "datetime.max": {"timestamp": "'9999-12-31 23:59:59.999999+00'"},
    "infinity": {"timestamp": "'infinity'"},
    "-infinity": {"timestamp": "'-infinity'"},
    "before 1970": {"timestamp": "'1969-12-31 23:59:59+00'"},
    "year 1 BC": {"timestamp": "'0001-06-01 00:00:00+00 BC'"},
    "properties array": {"properties": "'[1, 2]'"},
    "properties string": {"properties": "'\"$ip\"'"},
    "properties null": {"properties": "'null'"},
    "properties number": {"properties": "'1e400'"},
    "empty event": {"event": "''"},
    "long event": {"event": "repeat('x', 201)"},
    "empty distinct_id": {"distinct_id": "''"},
    "long distinct_id": {"distinct_id": "repeat('é', 300)"},
}
# Let in by the constraints (a CHECK cannot hold now()); buried by the claim.
AHEAD = ({"timestamp": "now() + interval '2 days'"}, "is more than 23 hours ahead")

# Dead rows of outbox_retry holding what an event table refuses (their stored content
# could never be sent): the columns, by SQL expression.
ODD_DEAD: dict[str, dict[str, str]] = {
    "properties array": {"properties": "'[1, 2]'"},
    "properties null": {"properties": "'null'"},
    "infinity": {"timestamp": "'infinity'"},
    "before 1970": {"timestamp": "'1969-12-31 23:59:59+00'"},
    "empty event": {"event": "''"},
    "blank distinct_id": {"distinct_id": "E' \\t'"},
    "long event": {"event": "repeat('x', 201)"},
}


def slot(conn: psycopg.Connection[Any]) -> int:
    """The event table enqueue writes to now."""
    row = conn.execute("SELECT outbox_snapshot_slot()").fetchone()
    assert row is not None
    return int(row[0])


def insert_sql(columns: dict[str, str], table: int) -> str:
    values = {
        "uuid": "gen_random_uuid()",
        "event": "'odd'",
        "distinct_id": "'user-odd'",
        "properties": "'{}'",
        **columns,
    }
    names = ", ".join(f'"{name}"' for name in values)
    return f"INSERT INTO outbox_events_{table} ({names}) VALUES ({', '.join(values.values())})"


def dead_sql(columns: dict[str, str], error: str) -> str:
    values = {
        "uuid": "gen_random_uuid()",
        "timestamp": "now()",
        "event": "'odd'",
        "distinct_id": "'user-odd'",
        "properties": "'{}'",
        "status": "'dead'",
        "attempts": "1",
        "last_error": f"'{error}'",
        **columns,
    }
    names = ", ".join(f'"{name}"' for name in values)
    return f"INSERT INTO outbox_retry ({names}) VALUES ({', '.join(values.values())})"


def as_role(url: str, role: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-c role={role}')}"


@pytest.fixture
def roles(db: psycopg.Connection[Any]) -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    app, worker = f"outbox_app_{suffix}", f"outbox_worker_{suffix}"
    for role in (app, worker):
        db.execute(f"CREATE ROLE {role} LOGIN")
    db.execute(APP_GRANTS.format(app=app))
    db.execute(WORKER_GRANTS.format(worker=worker))
    yield app, worker
    for role in (app, worker):
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")


def set_timezone(db: psycopg.Connection[Any], database_url: str, zone: str) -> None:
    """Every new session on the test database uses ``zone`` (as ALTER DATABASE does)."""
    name = conninfo_to_dict(database_url)["dbname"]
    db.execute(f"ALTER DATABASE \"{name}\" SET timezone = '{zone}'")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SHOW timezone").fetchone() == (zone,)


def enqueue_ordinary(database_url: str, n: int, tag: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        out = outbox.enqueue_many(
            conn,
            [
                {"event": "page_viewed", "distinct_id": f"user-{i}", "properties": {"tag": tag}}
                for i in range(n)
            ],
        )
        conn.commit()
    return {str(u) for u in out}


@pytest.mark.parametrize("zone", ["Europe/Berlin", "Asia/Tokyo", "America/New_York"])
def test_the_application_role_cannot_write_odd_rows(
    zone: str, database_url: str, db: psycopg.Connection[Any], roles: tuple[str, str]
) -> None:
    app, _ = roles
    set_timezone(db, database_url, zone)
    with psycopg.connect(as_role(database_url, app), autocommit=True) as conn:
        table = slot(db)
        for name, columns in ODD_ROWS.items():
            with pytest.raises(psycopg.errors.CheckViolation) as refused:
                conn.execute(insert_sql(columns, table))
            assert f"outbox_events_{table}_" in str(refused.value), name
        # NUL cannot be stored in text at all.
        with pytest.raises(psycopg.DataError):
            conn.execute(insert_sql({"event": "E'a\\x00b'"}, table))
        # The worker's tables are not the application's to write.
        for statement in (
            'INSERT INTO outbox_retry (uuid, "timestamp", event, distinct_id, properties)'
            " VALUES (gen_random_uuid(), now(), 'e', 'u', '{}')",
            "DELETE FROM outbox_batches",
            "UPDATE outbox_dedup_keys SET expires_at = now()",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        conn.execute(insert_sql({}, table))  # an ordinary row goes in
    assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (1,)


@pytest.mark.parametrize("zone", ["Europe/Berlin", "Asia/Tokyo", "America/New_York", "UTC"])
def test_no_odd_row_stops_delivery(
    zone: str,
    database_url: str,
    db: psycopg.Connection[Any],
    roles: tuple[str, str],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    app, worker = roles
    set_timezone(db, database_url, zone)
    uuids = enqueue_ordinary(database_url, 50, "before")
    ahead = str(uuid.uuid4())
    # Odd but sendable: control characters and astral code points travel escaped.
    awkward = str(uuid.uuid4())
    # A blank name passes the constraints: PostHog takes it or refuses it alone.
    blank = str(uuid.uuid4())
    with psycopg.connect(as_role(database_url, app), autocommit=True) as conn:
        table = slot(db)
        conn.execute(insert_sql({**AHEAD[0], "uuid": f"'{ahead}'"}, table))
        conn.execute(
            insert_sql(
                {
                    "uuid": f"'{awkward}'",
                    "event": "E'page\\x01viewed\\x1b[2J'",
                    "distinct_id": "'ユーザー🚀'",
                    "properties": '\'{"$ip": "203.0.113.7", "nested": {"$ip": 1}}\'',
                },
                table,
            )
        )
        conn.execute(insert_sql({"uuid": f"'{blank}'", "event": "E' \\t\\n'"}, table))
    uuids.add(awkward)
    uuids |= enqueue_ordinary(database_url, 50, "between")
    # Dead rows as migration 0007 files the old table's rows it could not move.
    for name, columns in ODD_DEAD.items():
        db.execute(dead_sql(columns, f"moved by 0007: {name}"))
    uuids |= enqueue_ordinary(database_url, 50, "after")
    store = SnapshotStorage(as_role(database_url, worker))
    try:  # the backlog reads every row too
        report = status_report(store)
        assert report["pending"] == 153 and report["dead"] == len(ODD_DEAD)
        assert store.backlog_capped().pending == 153
    finally:
        store.close()

    settings = settings_for(
        database_url=as_role(database_url, worker),
        posthog_api_key="phc_test",
        posthog_host=capture.url,
        batch_size=40,
    )
    stats = Worker(settings).run_until_empty()
    sent = set(capture.uuids()) - {blank}
    assert sent == uuids and len(capture.uuids()) == len(set(capture.uuids()))
    dead = dict(
        db.execute(
            "SELECT uuid::text, last_error FROM outbox_events WHERE status = 'dead'"
            " AND last_error NOT LIKE 'moved by 0007: %%'"
        )
    )
    assert set(dead) <= {ahead, blank} and ahead in dead
    assert AHEAD[1] in dead[ahead]
    assert stats.dead == len(dead)
    assert db.execute("SELECT count(*) FROM outbox_events WHERE status = 'pending'").fetchone() == (
        0,
    )
    for event in capture.events:  # ordinary values, as PostHog takes them
        assert event["timestamp"].endswith("+00:00")
        if event["uuid"] == awkward:
            assert event["event"] == "page\x01viewed\x1b[2J"
            assert event["distinct_id"] == "ユーザー🚀"
            assert "$geoip_disable" not in event["properties"]  # its own $ip
        else:
            assert event["properties"]["$geoip_disable"] is True

    # Every command reaches and shows every row, whatever it holds.
    store = SnapshotStorage(as_role(database_url, worker))
    try:
        listed = store.dead(limit=100)
        assert len(listed) == len(ODD_DEAD) + len(dead)
        report = status_report(store)
        assert report["dead"] == len(listed) and report["pending"] == 0
        done = store.requeue_dead()
        # Only the one two days ahead (and a refused blank name) could be sent: the
        # rest stay dead, whatever they hold.
        assert done.unsendable == len(ODD_DEAD)
        assert done.requeued == len(dead)
        assert Worker(settings).run_until_empty().dead == 1  # two days ahead, again
        # Created "in the future" (by hand): year 10000 in this TimeZone, or never.
        db.execute(
            "UPDATE outbox_retry SET created_at = CASE WHEN id % 2 = 0"
            " THEN timestamptz 'infinity' ELSE timestamptz '9999-12-31 23:59:59+00' END"
        )
        assert status_report(store)["dead"] == len(listed)
        created = {r["created_at"] for r in store.dead(limit=100)}
        assert created == {"infinity", "9999-12-31T23:59:59.000000+00:00"}
        assert store.purge_dead(3600.0) == len(listed)  # a future created_at counts as old
    finally:
        store.close()
    assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,)


def test_a_metrics_only_row_the_metrics_sink_cannot_read_dies_alone(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    huge = "1" + "0" * 5000  # valid json; Python refuses to decode an int this long
    table = slot(db)
    db.execute(
        insert_sql({"destination": "'metrics'", "properties": f"'{{\"n\": {huge}}}'"}, table)
    )
    db.execute(insert_sql({"destination": "'metrics'", "event": "'runtime_ready'"}, table))
    stats = Worker(settings_for()).run_until_empty()
    assert (stats.shipped, stats.dead) == (1, 1)
    [(error,)] = db.execute("SELECT last_error FROM outbox_events").fetchall()
    assert error.startswith("metrics-only event cannot be counted: ValueError")


class RawSink:
    """Keeps the JSON text of every event, as it goes on the wire."""

    name = "raw"

    def __init__(self) -> None:
        self.texts: list[str] = []

    def send(self, events: Sequence[Outbound]) -> None:
        self.texts.extend(e.json for e in events)

    def close(self) -> None:
        pass


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys in {keys}"
    return dict(pairs)


@pytest.mark.parametrize(
    ("properties", "geoip_disable"),
    [
        ({}, True),
        ({"plan": "free"}, True),
        ({"$ip": "203.0.113.7"}, None),  # PostHog locates the user by their own $ip
        ({"$ip": 42}, True),  # not an address
        ({"request": {"$ip": "203.0.113.7"}, "note": '"$ip": "x"'}, True),  # not top-level
        ({"$ignore_sent_at": False, "$geoip_disable": False}, True),
        ({"$ignore_sent_at": True}, True),
        ({"$ip": "203.0.113.7", "$geoip_disable": False}, False),  # theirs, kept
        ({"$ip": "203.0.113.7", "$geoip_disable": True, "$ignore_sent_at": False}, True),
    ],
)
def test_each_key_the_worker_sets_is_sent_once(
    properties: dict[str, Any],
    geoip_disable: bool | None,
    database_url: str,
    settings_for: Callable[..., Settings],
) -> None:
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, "e", "u", properties)
        conn.commit()
    sink = RawSink()
    Drainer(SnapshotStorage(database_url), sink, settings_for()).drain()
    [text] = sink.texts
    event = json.loads(text, object_pairs_hook=no_duplicate_keys)
    sent = event["properties"]
    assert sent["$ignore_sent_at"] is True
    assert sent.get("$geoip_disable") is geoip_disable
    for key, value in properties.items():
        if key not in ("$ignore_sent_at", "$geoip_disable"):
            assert sent[key] == value
