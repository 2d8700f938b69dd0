"""No single row stops the queue: whatever a row holds, it is delivered as PostHog takes
it or buried with an error naming the problem, and every other event keeps flowing.

Odd rows are written by raw SQL under the application's documented grants, in a
database whose TimeZone is not UTC (where a timestamp near 9999-12-31 reads back as
year 10000). With migration 0004's constraints in place the application cannot write
them at all; with the constraints dropped (standing for rows written before 0004),
the worker buries them.
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
from worker.store import Store
from worker.testing import CaptureServer

CONSTRAINTS = (
    "outbox_events_properties_check",
    "outbox_events_timestamp_check",
    "outbox_events_event_check",
    "outbox_events_distinct_id_check",
)

# Each odd row: the columns it sets by raw SQL (as SQL expressions), and what its
# error must say once the worker has buried it.
ODD_ROWS: dict[str, tuple[dict[str, str], str]] = {
    "datetime.max": (
        {"timestamp": "'9999-12-31 23:59:59.999999+00'"},
        "timestamp: 9999-12-31 23:59:59.999999 UTC is more than 23 hours ahead",
    ),
    "infinity": ({"timestamp": "'infinity'"}, "timestamp: infinity is not a finite time"),
    "-infinity": ({"timestamp": "'-infinity'"}, "timestamp: -infinity is not a finite time"),
    "before 1970": (
        {"timestamp": "'1969-12-31 23:59:59+00'"},
        "timestamp: 1969-12-31 23:59:59 UTC is before 1970-01-01T00:00:00Z",
    ),
    "year 1 BC": (
        {"timestamp": "'0001-06-01 00:00:00+00 BC'"},
        "timestamp: 0001-06-01 00:00:00 BC UTC is before 1970",
    ),
    "properties array": ({"properties": "'[1, 2]'"}, "properties: is a JSON array, not an object"),
    "properties string": (
        {"properties": "'\"$ip\"'"},
        "properties: is a JSON string, not an object",
    ),
    "properties null": ({"properties": "'null'"}, "properties: is a JSON null, not an object"),
    "properties number": ({"properties": "'1e400'"}, "properties: is a JSON number"),
    "empty event": ({"event": "''"}, "event: is empty or only whitespace"),
    "blank event": ({"event": "E' \\t\\n'"}, "event: is empty or only whitespace"),
    "long event": ({"event": "repeat('x', 201)"}, "event: is 201 characters long, over the 200"),
    "empty distinct_id": ({"distinct_id": "''"}, "distinct_id: is empty or only whitespace"),
    "long distinct_id": (
        {"distinct_id": "repeat('é', 300)"},
        "distinct_id: is 300 characters long, over the 200 limit",
    ),
}
# Refused by the claim though the constraints let it in: a CHECK cannot hold now().
AHEAD = ({"timestamp": "now() + interval '2 days'"}, "UTC is more than 23 hours ahead")


def insert_sql(columns: dict[str, str]) -> str:
    values = {
        "uuid": "gen_random_uuid()",
        "event": "'odd'",
        "distinct_id": "'user-odd'",
        "properties": "'{}'",
        **columns,
    }
    names = ", ".join(f'"{name}"' for name in values)
    return f"INSERT INTO outbox_events ({names}) VALUES ({', '.join(values.values())})"


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


def drop_constraints(db: psycopg.Connection[Any]) -> None:
    """Stand for a database whose rows were written before migration 0004."""
    for name in CONSTRAINTS:
        db.execute(f"ALTER TABLE outbox_events DROP CONSTRAINT {name}")


@pytest.mark.parametrize("zone", ["Europe/Berlin", "Asia/Tokyo", "America/New_York"])
def test_the_application_role_cannot_write_odd_rows(
    zone: str, database_url: str, db: psycopg.Connection[Any], roles: tuple[str, str]
) -> None:
    app, _ = roles
    set_timezone(db, database_url, zone)
    with psycopg.connect(as_role(database_url, app), autocommit=True) as conn:
        for name, (columns, _) in ODD_ROWS.items():
            with pytest.raises(psycopg.errors.CheckViolation) as refused:
                conn.execute(insert_sql(columns))
            assert "outbox_events_" in str(refused.value), name
        # NUL cannot be stored in text or jsonb at all.
        for columns in ({"event": "E'a\\\\x00b'"}, {"properties": '\'{"a": "\\u0000"}\''}):
            with pytest.raises(psycopg.DataError):
                conn.execute(insert_sql(columns).replace("\\\\", "\\"))
        # Worker-owned columns and the dedup key are not the application's to write.
        for column, value in (
            ("status", "'dead'"),
            ("attempts", "5"),
            ("next_attempt_at", "'infinity'"),
            ("last_error", "'x'"),
            ("created_at", "'infinity'"),
            ("dedup_key", "'k'"),
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(insert_sql({column: value}))
        conn.execute(insert_sql({}))  # an ordinary row goes in
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
    drop_constraints(db)
    odd = {**ODD_ROWS, "two days ahead": AHEAD}
    expected: dict[str, str] = {}
    uuids = enqueue_ordinary(database_url, 50, "before")
    with psycopg.connect(as_role(database_url, app), autocommit=True) as conn:
        for columns, error in odd.values():
            row_uuid = str(uuid.uuid4())
            conn.execute(insert_sql({**columns, "uuid": f"'{row_uuid}'"}))
            expected[row_uuid] = error
    uuids |= enqueue_ordinary(database_url, 50, "between")
    # Odd but sendable: control characters and astral code points travel escaped.
    awkward = str(uuid.uuid4())
    with psycopg.connect(as_role(database_url, app), autocommit=True) as conn:
        conn.execute(
            insert_sql(
                {
                    "uuid": f"'{awkward}'",
                    "event": "E'page\\x01viewed\\x1b[2J'",
                    "distinct_id": "'ユーザー🚀'",
                    "properties": '\'{"$ip": "203.0.113.7", "nested": {"$ip": 1}}\'',
                }
            )
        )
    uuids.add(awkward)
    # Worker-owned columns only a hand (or a release before 0004) could have set.
    hand = str(uuid.uuid4())
    db.execute(
        insert_sql(
            {"uuid": f"'{hand}'", "created_at": "'infinity'", "next_attempt_at": "'-infinity'"}
        )
    )
    uuids.add(hand)
    uuids |= enqueue_ordinary(database_url, 50, "after")
    store = Store(as_role(database_url, worker))
    try:  # the backlog reads every row too
        assert status_report(store)["pending"] == 152 + len(odd)
        assert store.backlog_capped().pending == 152 + len(odd)
    finally:
        store.close()

    settings = settings_for(
        database_url=as_role(database_url, worker),
        posthog_api_key="phc_test",
        posthog_host=capture.url,
        batch_size=40,
    )
    stats = Worker(settings).run_until_empty()
    assert set(capture.uuids()) == uuids and len(capture.uuids()) == 152
    assert stats.shipped == 152 and stats.dead == len(odd)
    dead = dict(
        db.execute("SELECT uuid::text, last_error FROM outbox_events WHERE status = 'dead'")
    )
    assert set(dead) == set(expected)
    for row_uuid, error in expected.items():
        assert error in dead[row_uuid], (error, dead[row_uuid])
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
    store = Store(as_role(database_url, worker))
    try:
        listed = store.dead(limit=100)
        assert {str(r["uuid"]) for r in listed} == set(expected)
        report = status_report(store)
        assert report["dead"] == len(odd) and report["pending"] == 0
        done = store.requeue_dead()
        assert done.requeued == 1 and done.unsendable == len(ODD_ROWS)  # two days ahead
        assert Worker(settings).run_until_empty().dead == 1  # buried again
        # Created "in the future" (by hand): year 10000 in this TimeZone, or never.
        db.execute(
            "UPDATE outbox_events SET created_at = CASE WHEN id % 2 = 0 THEN timestamptz 'infinity'"
            " ELSE timestamptz '9999-12-31 23:59:59+00' END"
        )
        assert status_report(store)["dead"] == len(odd)
        created = {r["created_at"] for r in store.dead(limit=100)}
        assert created == {"infinity", "9999-12-31T23:59:59.000000+00:00"}
        assert store.purge_dead(3600.0) == len(odd)  # a future created_at counts as old
    finally:
        store.close()
    assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,)


def test_a_metrics_only_row_the_metrics_sink_cannot_read_dies_alone(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    huge = "1" + "0" * 5000  # valid jsonb; Python refuses to decode an int this long
    db.execute(insert_sql({"destination": "'metrics'", "properties": f"'{{\"n\": {huge}}}'"}))
    db.execute(insert_sql({"destination": "'metrics'", "event": "'runtime_ready'"}))
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
    Drainer(Store(database_url), sink, settings_for()).drain()
    [text] = sink.texts
    event = json.loads(text, object_pairs_hook=no_duplicate_keys)
    sent = event["properties"]
    assert sent["$ignore_sent_at"] is True
    assert sent.get("$geoip_disable") is geoip_disable
    for key, value in properties.items():
        if key not in ("$ignore_sent_at", "$geoip_disable"):
            assert sent[key] == value
