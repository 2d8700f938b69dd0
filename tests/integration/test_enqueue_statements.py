"""The enqueue statements, every shape of them, against the real server.

A call sends one event as one parameter per column, or several as one JSON array;
either may claim dedup keys and may wake the workers: eight statements, in psycopg's
and SQLAlchemy's placeholder styles. Each must store exactly what was validated.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import psycopg.types.string
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import outbox
from outbox import schema
from outbox.install import migrations_dir
from outbox.schema import NOTIFY_CHANNEL
from outbox.validation import MAX_EVENT_BYTES, PreparedEvent, new_event_uuid
from tests.conftest import STAMP, record_statements
from tests.integration.test_roles import APP_GRANTS
from worker.database import sqlalchemy_url

# The module, not the function ``outbox.enqueue`` that shadows it.
enqueue_module = importlib.import_module("outbox.enqueue")


pytestmark = pytest.mark.usefixtures("default_config")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = create_engine(sqlalchemy_url(database_url))
    yield eng
    eng.dispose()


def stored(db: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    cur = db.execute(
        'SELECT uuid, event, distinct_id, properties, "timestamp", dedup_key, destination'
        " FROM outbox_events ORDER BY uuid"
    )
    names = [c.name for c in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def write(kind: str, database_url: str, engine: Engine, events: list[dict[str, Any]]) -> Any:
    """enqueue() for one item, enqueue_many() for several; committed."""

    def run(conn: Any) -> Any:
        if len(events) == 1:
            return [outbox.enqueue(conn, **events[0])]
        return outbox.enqueue_many(conn, events)

    if kind == "psycopg":
        with psycopg.connect(database_url) as conn:
            out = run(conn)
            conn.commit()
        return out
    with Session(engine) as session, session.begin():
        return run(session)


KINDS = ["psycopg", "sqlalchemy"]
SHAPES = {"one": 1, "many": 3}


# --------------------------------------------------------------------------- all eight


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keys", [False, True], ids=["plain", "dedup"])
@pytest.mark.parametrize("wake", [False, True], ids=["quiet", "wake"])
def test_every_statement_stores_exactly_the_events(
    kind: str,
    shape: str,
    keys: bool,
    wake: bool,
    database_url: str,
    engine: Engine,
    db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(enqueue_module, "_wake_now", lambda: wake)
    db.execute(f"LISTEN {NOTIFY_CHANNEL}")
    when = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
    events: list[dict[str, Any]] = [
        {
            "event": f"event_{i}",
            "distinct_id": f"user-{i}",
            "properties": {"i": i, "tags": ["a", "b"], "nested": {"x": None, "y": 1.5}},
            "timestamp": when if i % 2 else None,
            "dedup_key": f"key-{i}" if keys else None,
        }
        for i in range(SHAPES[shape])
    ]
    before = db.execute("SELECT now()").fetchone()
    out = write(kind, database_url, engine, events)
    rows = stored(db)
    assert [r["uuid"] for r in rows] == out and all(isinstance(u, uuid.UUID) for u in out)
    for i, row in enumerate(rows):
        assert row["event"] == f"event_{i}"
        assert row["distinct_id"] == f"user-{i}"
        assert row["properties"] == {
            **STAMP,
            "i": i,
            "tags": ["a", "b"],
            "nested": {"x": None, "y": 1.5},
        }
        assert row["dedup_key"] == (f"key-{i}" if keys else None)
        assert row["destination"] == "posthog"
        if i % 2:
            assert row["timestamp"] == when
        else:  # the transaction's now()
            assert before is not None and row["timestamp"] >= before[0]
    assert db.execute("SELECT count(*) FROM outbox_dedup_keys").fetchone() == (
        (len(events),) if keys else (0,)
    )
    notified = list(db.notifies(timeout=0.2, stop_after=1))
    assert len(notified) == (1 if wake else 0)
    if keys:  # the same keys again: nothing written, None for each
        assert write(kind, database_url, engine, events) == [None] * len(events)
        assert len(stored(db)) == len(events)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_statement_runs_with_insert_only_privileges(
    shape: str, database_url: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    role = f"outbox_app_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {role}")
    db.execute(APP_GRANTS.format(app=role))  # the documented grants: no right on the keys
    try:
        with psycopg.connect(database_url) as conn:
            conn.execute(f"SET ROLE {role}")
            for keys in (False, True):
                for wake in (False, True):
                    monkeypatch.setattr(enqueue_module, "_wake_now", lambda w=wake: w)
                    items = [
                        {
                            "event": "e",
                            "distinct_id": "u",
                            "dedup_key": f"{keys}-{wake}-{i}" if keys else None,
                        }
                        for i in range(SHAPES[shape])
                    ]
                    assert all(outbox.enqueue_many(conn, items))
            conn.commit()
        assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (4 * SHAPES[shape],)
    finally:
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")


# --------------------------------------------------------------------------- what travels


AWKWARD_TEXT = 'quote " backslash \\ slash / newline \n tab \t bell \x07 sep \u2028 é 中 🚀'


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_unicode_and_json_special_characters_round_trip(
    kind: str, shape: str, database_url: str, engine: Engine, db: psycopg.Connection[Any]
) -> None:
    props = {
        "text": AWKWARD_TEXT,
        AWKWARD_TEXT: "as a key",
        "ключ": ["значение", {"вложенный": "🚀"}],
        "😀": "four-byte key",
        "é": "two-byte key",
        **{f"filler_{i}": i for i in range(10)},  # enough keys to be reordered
    }
    events = [
        {
            "event": f"achat effectué {AWKWARD_TEXT} {i}",
            "distinct_id": f"utilisateur-é-{i}-🚀",
            "properties": props,
            "dedup_key": f"clé-{i}-\"'\\",
        }
        for i in range(SHAPES[shape])
    ]
    out = write(kind, database_url, engine, events)
    rows = stored(db)
    assert [r["uuid"] for r in rows] == out
    for i, row in enumerate(rows):
        assert row["event"] == f"achat effectué {AWKWARD_TEXT} {i}"
        assert row["distinct_id"] == f"utilisateur-é-{i}-🚀"
        assert row["properties"] == {**STAMP, **props}
        assert row["dedup_key"] == f"clé-{i}-\"'\\"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_properties_near_the_size_limit(
    kind: str, shape: str, database_url: str, engine: Engine, db: psycopg.Connection[Any]
) -> None:
    big = "é" * ((MAX_EVENT_BYTES - 2_000) // 2)  # two bytes each: just under the limit
    events = [
        {"event": "big", "distinct_id": f"u{i}", "properties": {"blob": big, "i": i}}
        for i in range(SHAPES[shape])
    ]
    write(kind, database_url, engine, events)
    rows = stored(db)
    assert len(rows) == SHAPES[shape]
    for i, row in enumerate(rows):
        assert row["properties"] == {**STAMP, "blob": big, "i": i}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_nulls_empty_properties_and_metrics_destination(
    kind: str, shape: str, database_url: str, engine: Engine, db: psycopg.Connection[Any]
) -> None:
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=1)
    prepared = [
        PreparedEvent(
            uuid=new_event_uuid(),
            event="runtime_ready",
            distinct_id="runtime-1",
            properties_json="{}",
            timestamp=when if i else None,
            dedup_key=None,
            destination="metrics" if i == 0 else "posthog",
        )
        for i in range(SHAPES[shape])
    ]
    if kind == "psycopg":
        with psycopg.connect(database_url) as conn:
            out = enqueue_module.enqueue_prepared(conn, prepared)
            conn.commit()
    else:
        with Session(engine) as session, session.begin():
            out = enqueue_module.enqueue_prepared(session, prepared)
    rows = stored(db)
    assert [r["uuid"] for r in rows] == out == [p.uuid for p in prepared]
    assert [r["destination"] for r in rows] == [p.destination for p in prepared]
    assert [r["properties"] for r in rows] == [{}] * len(prepared)
    assert all(r["dedup_key"] is None for r in rows)
    assert [r["timestamp"] == when for r in rows[1:]] == [True] * (len(rows) - 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wake", [False, True], ids=["quiet", "wake"])
def test_one_event_with_and_without_timestamp_and_destination(
    kind: str,
    wake: bool,
    database_url: str,
    engine: Engine,
    db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The one-event INSERT names only the columns it has values for: four shapes.
    monkeypatch.setattr(enqueue_module, "_wake_now", lambda: wake)
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=1)
    shapes = [(None, "posthog"), (when, "posthog"), (None, "metrics"), (when, "metrics")]
    prepared = [
        PreparedEvent(new_event_uuid(), "e", "u", '{"a":1}', ts, None, destination)
        for ts, destination in shapes
    ]
    before = db.execute("SELECT now()").fetchone()
    for p in prepared:
        if kind == "psycopg":
            with psycopg.connect(database_url) as conn:
                assert enqueue_module.enqueue_prepared(conn, [p]) == [p.uuid]
                conn.commit()
        else:
            with Session(engine) as session, session.begin():
                assert enqueue_module.enqueue_prepared(session, [p]) == [p.uuid]
    rows = stored(db)
    assert [r["uuid"] for r in rows] == [p.uuid for p in prepared]
    assert [r["destination"] for r in rows] == [d for _, d in shapes]
    assert [r["properties"] for r in rows] == [{"a": 1}] * 4
    assert before is not None
    assert [
        r["timestamp"] == when if ts else r["timestamp"] >= before[0]
        for r, (ts, _) in zip(rows, shapes, strict=True)
    ] == [True] * 4
    raw = db.execute(
        "SELECT destination FROM ("
        + " UNION ALL ".join(f"SELECT uuid, destination FROM outbox_events_{n}" for n in range(4))
        + ") AS e ORDER BY uuid"
    ).fetchall()
    assert raw == [(None,), (None,), ("metrics",), ("metrics",)]  # NULL for posthog


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_every_statement_works_when_str_is_sent_typed_as_text(
    binary: bool, database_url: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # psycopg sends a str untyped by default; a connection may register a dumper that
    # types it as text, and the statements must not depend on the server's inference.
    when = datetime(2026, 1, 1, tzinfo=UTC)
    with psycopg.connect(database_url) as conn:
        dumper = psycopg.types.string.StrBinaryDumper if binary else psycopg.types.string.StrDumper
        conn.adapters.register_dumper(str, dumper)
        for wake in (False, True):
            monkeypatch.setattr(enqueue_module, "_wake_now", lambda w=wake: w)
            for n in (1, 3):
                for extra in ({}, {"timestamp": when}, {"dedup_key": f"k-{wake}-{n}"}):
                    items = [{"event": "e", "distinct_id": "u", **extra}] * n
                    if "dedup_key" in extra:
                        items = [
                            {**item, "dedup_key": f"{extra['dedup_key']}-{i}"}
                            for i, item in enumerate(items)
                        ]
                    assert all(outbox.enqueue_many(conn, items))
        conn.commit()
    assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (2 * 3 * 4,)


def test_the_slot_rule_in_python_is_the_databases(db: psycopg.Connection[Any]) -> None:
    # outbox_snapshot_slot() reads now(); enqueue computes the same from its clock.
    row = db.execute("SELECT extract(epoch FROM now())::float8, outbox_snapshot_slot()").fetchone()
    assert row is not None and schema.event_table_slot(row[0]) == row[1]
    for at, slot in ((0.0, 0), (599.999, 0), (600.0, 1), (2399.0, 3), (2400.0, 0)):
        assert schema.event_table_slot(at) == slot
    # Migration 0006 keeps its own copies of the constants: they must agree.
    path = migrations_dir() / "versions" / "0006_snapshot_engine.py"
    spec = importlib.util.spec_from_file_location("outbox_migration_0006", path)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    assert (migration.SLOT_SECONDS, migration.EVENT_TABLES) == (
        schema.SLOT_SECONDS,
        schema.EVENT_TABLES,
    )


def test_a_thousand_events_keep_their_order(database_url: str, db: psycopg.Connection[Any]) -> None:
    items = [
        {"event": "e", "distinct_id": f"user-{i}", "properties": {"i": i}} for i in range(1000)
    ]
    with psycopg.connect(database_url) as conn:
        out = outbox.enqueue_many(conn, items)
        conn.commit()
    rows = stored(db)
    assert [r["uuid"] for r in rows] == out
    assert [r["properties"]["i"] for r in rows] == list(range(1000))
    assert [r["distinct_id"] for r in rows] == [f"user-{i}" for i in range(1000)]


def test_one_event_is_one_statement(engine: Engine) -> None:
    statements = record_statements(engine)

    with Session(engine) as session, session.begin():
        statements.clear()
        assert outbox.enqueue(session, "e", "u", {"a": 1}, dedup_key="k") is not None
        assert len(statements) == 1


def _prepared_after_calls(conn: psycopg.Connection[Any]) -> list[str]:
    """Every kind of enqueue call, a first-time guard and a statement of the caller's
    own, then the statements the server session holds prepared (rolled back)."""
    for i in range(12):
        outbox.enqueue(
            conn,
            "e",
            "u",
            timestamp=datetime.now(UTC) if i % 2 else None,
            dedup_key=f"k{i}" if i % 3 == 0 else None,
        )
        outbox.enqueue_many(conn, [{"event": "e", "distinct_id": "u"}] * (2 + i))
    outbox.upsert_first(
        conn,
        "outbox_dedup_keys",
        {"dedup_key": "guard", "expires_at": datetime.now(UTC)},
        conflict=["dedup_key"],
        event="e",
        distinct_id=lambda row: "u",
    )
    conn.execute("SELECT 1")  # the caller's own statement
    prepared = [row[0] for row in conn.execute("SELECT statement FROM pg_prepared_statements")]
    conn.rollback()
    return prepared


def test_the_event_statements_are_prepared_when_the_connection_prepares(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare_threshold=0 makes psycopg prepare every query on its first run: the
    # event statements are prepared as the caller's own are, one per shape of call.
    monkeypatch.setattr(enqueue_module, "_wake_now", lambda: False)  # one shape at a time
    with psycopg.connect(database_url, prepare_threshold=0) as conn:
        prepared = _prepared_after_calls(conn)
    assert any("SELECT 1" in s for s in prepared)
    ours = [s for s in prepared if "outbox" in s]
    many = [s for s in ours if "json_array_elements(" in s]
    assert len(many) == 1, many  # enqueue_many of 2 to 13 events: one statement text
    assert any("VALUES (CAST($1 AS uuid)" in s for s in ours), ours  # enqueue(), plain
    assert any("outbox_enqueue_keyed(" in s for s in ours), ours  # enqueue(), dedup key
    # The first-time guard's own statement (its text is the caller's table) and its
    # savepoints are never prepared; the event it wrote went through enqueue's.
    assert not [s for s in prepared if "ON CONFLICT" in s or "SAVEPOINT" in s.upper()]


def test_nothing_is_prepared_on_a_connection_that_prepares_nothing(database_url: str) -> None:
    # prepare_threshold=None (what a transaction pooler without prepared statements
    # needs), or a client-side binding cursor (Django's default), prepares nothing.
    with psycopg.connect(database_url, prepare_threshold=None) as conn:
        assert _prepared_after_calls(conn) == []
    with psycopg.connect(
        database_url, prepare_threshold=0, cursor_factory=psycopg.ClientCursor
    ) as client_side:
        assert _prepared_after_calls(client_side) == []


PREPARED = "SELECT statement FROM pg_prepared_statements"


def _outbox(rows: Sequence[Any]) -> list[str]:
    """The outbox statements among pg_prepared_statements' rows (not the query that
    read them, prepared too where the threshold is 0)."""
    return [r[0] for r in rows if "outbox_" in r[0] and "pg_prepared_statements" not in r[0]]


@pytest.mark.parametrize("threshold", [0, None])
def test_sqlalchemy_and_psycopg_pools_follow_the_connections_threshold(
    database_url: str, threshold: int | None
) -> None:
    # SQLAlchemy's psycopg dialect leaves prepare_threshold to connect_args (psycopg's
    # default otherwise); a psycopg_pool pool to its kwargs.
    from psycopg_pool import ConnectionPool

    engine = create_engine(
        sqlalchemy_url(database_url), connect_args={"prepare_threshold": threshold}
    )
    try:
        with Session(engine) as session, session.begin():
            outbox.enqueue(session, "e", "u")
            outbox.enqueue_many(session, [{"event": "e", "distinct_id": "u"}] * 3)
            found = _outbox(session.connection().exec_driver_sql(PREPARED).all())
        assert len(found) == (2 if threshold == 0 else 0), found
    finally:
        engine.dispose()
    with (
        ConnectionPool(
            database_url, kwargs={"prepare_threshold": threshold}, min_size=1, open=True
        ) as pool,
        pool.connection() as conn,
    ):
        outbox.enqueue(conn, "e", "u")
        found = _outbox(conn.execute(PREPARED).fetchall())
        conn.rollback()
    assert len(found) == (1 if threshold == 0 else 0), found


async def test_async_psycopg_follows_the_connections_threshold(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, prepare_threshold=0) as conn:
        await outbox.aenqueue(conn, "e", "u")
        await outbox.aenqueue_many(conn, [{"event": "e", "distinct_id": "u"}] * 3)
        found = _outbox(await (await conn.execute(PREPARED)).fetchall())
        await conn.rollback()
    assert len(found) == 2, found
    async with await psycopg.AsyncConnection.connect(database_url, prepare_threshold=None) as plain:
        await outbox.aenqueue(plain, "e", "u")
        assert _outbox(await (await plain.execute(PREPARED)).fetchall()) == []
        await plain.rollback()


# --------------------------------------------------------------------------- async


@pytest.mark.parametrize("shape", SHAPES)
async def test_async_psycopg_and_sqlalchemy(
    shape: str, database_url: str, db: psycopg.Connection[Any]
) -> None:
    n = SHAPES[shape]
    items = [
        {"event": "e", "distinct_id": f"u{i}", "properties": {"i": i}, "dedup_key": f"k{i}"}
        for i in range(n)
    ]
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        if n == 1:
            first = [await outbox.aenqueue(conn, **items[0])]
        else:
            first = await outbox.aenqueue_many(conn, items)
        await conn.commit()
    eng = create_async_engine(sqlalchemy_url(database_url))
    try:
        async with AsyncSession(eng) as session:
            again = await outbox.aenqueue_many(session, items)  # the keys are held
            fresh = await outbox.aenqueue_many(
                session, [{**item, "dedup_key": None} for item in items]
            )
            await session.commit()
    finally:
        await eng.dispose()
    assert again == [None] * n
    rows = stored(db)
    assert [r["uuid"] for r in rows] == first + fresh
    assert [r["properties"]["i"] for r in rows] == list(range(n)) * 2


def test_notify_is_delivered_at_commit_for_both_shapes(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        for n in (1, 2):
            time.sleep(enqueue_module.NOTIFY_INTERVAL)
            with psycopg.connect(database_url) as conn:
                outbox.enqueue_many(conn, [{"event": "e", "distinct_id": "u"}] * n)
                assert list(listener.notifies(timeout=0.1, stop_after=1)) == []
                conn.commit()
            assert len(list(listener.notifies(timeout=0.5, stop_after=1))) == 1
