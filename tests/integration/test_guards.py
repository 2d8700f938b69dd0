"""First-time guards against a real PostgreSQL, including many racing transactions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    MetaData,
    Table,
    Text,
    create_engine,
    func,
    literal_column,
    text,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

import outbox
from outbox import AnalyticsConfig, FirstTime, OutboxValidationError, UnsupportedConnectionError
from worker.database import sqlalchemy_url

CONFIG = AnalyticsConfig()
RACERS = 20


metadata = MetaData()
runtime_table = Table(
    "agent_runtime",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("workspace_id", Text),
    Column("daemon_id", Text),
    Column("provider", Text),
    Column("last_seen_at", DateTime(timezone=True)),
)


class Base(DeclarativeBase):
    pass


class Issue(Base):
    __tablename__ = "issue"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    workspace_id: Mapped[str] = mapped_column(Text)


@pytest.fixture
def engine(schema: str) -> Iterator[Engine]:
    eng = create_engine(sqlalchemy_url(schema), poolclass=NullPool)
    yield eng
    eng.dispose()


def events(db: psycopg.Connection[Any], name: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT uuid, distinct_id, properties FROM outbox_events WHERE event = %s ORDER BY uuid",
        (name,),
    ).fetchall()


# The runtime row the upsert examples write (shared with test_guards_async.py).
RUNTIME: dict[str, Any] = {
    "table": "agent_runtime",
    "values": {"workspace_id": "w1", "daemon_id": "d1", "provider": "claude"},
    "conflict": ("workspace_id", "daemon_id", "provider"),
    "returning": ("id",),
}
# Its registration event: the first upsert emits it.
REGISTRATION: dict[str, Any] = {
    **RUNTIME,
    "update": ("last_seen_at",),
    "event": "runtime_registered",
    "distinct_id": outbox.workspace_actor("w1"),
    "properties": lambda row: {"runtime_id": row["id"], "provider": "claude"},
}
# An event refused only once the row is known: the guard must undo the upsert.
REFUSED_REGISTRATION: dict[str, Any] = {
    **RUNTIME,
    "event": "runtime_registered",
    "distinct_id": "u",
    "properties": lambda row: {"raw": b"\x00"},
    "config": CONFIG,
}


def execution(issue_id: int = 1) -> dict[str, Any]:
    """mark_first's arguments for the first execution of an issue."""
    return {
        "table": "issue",
        "column": "first_executed_at",
        "where": {"id": issue_id},
        "returning": ("id", "workspace_id"),
        "event": "issue_executed",
        "distinct_id": "user-1",
        "properties": {"issue_id": issue_id},
        "config": CONFIG,
    }


def register(conn: Any, **extra: Any) -> FirstTime:
    return outbox.upsert_first(conn, **{**REGISTRATION, "config": CONFIG, **extra})


def execute(conn: Any, issue_id: int = 1) -> FirstTime:
    return outbox.mark_first(conn, **{**execution(issue_id), "table": Issue})


# -- the three connection kinds --------------------------------------------------------

Guard = Callable[[Any], FirstTime]


def run_psycopg(url: str, engine: Engine, guard: Guard, pause: float = 0.0) -> FirstTime:
    with psycopg.connect(url) as conn:
        result = guard(conn)
        time.sleep(pause)  # hold the row lock so the others pile up behind it
        conn.commit()
    return result


def run_core(url: str, engine: Engine, guard: Guard, pause: float = 0.0) -> FirstTime:
    with engine.connect() as conn:
        result = guard(conn)
        time.sleep(pause)
        conn.commit()
    return result


def run_orm(url: str, engine: Engine, guard: Guard, pause: float = 0.0) -> FirstTime:
    with Session(engine) as session:
        result = guard(session)
        time.sleep(pause)
        session.commit()
    return result


KINDS = {"psycopg": run_psycopg, "sqlalchemy-core": run_core, "sqlalchemy-orm": run_orm}


@pytest.mark.parametrize("kind", KINDS)
def test_upsert_first_emits_only_when_the_row_is_inserted(
    kind: str, schema: str, engine: Engine, db: psycopg.Connection[Any]
) -> None:
    first = KINDS[kind](schema, engine, register)
    again = KINDS[kind](schema, engine, register)
    assert first.first and first.event_uuid is not None
    assert first.row is not None and first.row["inserted"] is True
    assert not again and again.event_uuid is None
    assert again.row is not None and again.row["id"] == first.row["id"]
    [(event_uuid, distinct_id, props)] = events(db, "runtime_registered")
    assert event_uuid == first.event_uuid
    assert distinct_id == "workspace:w1"
    assert props["runtime_id"] == first.row["id"] and props["workspace_id"] == "w1"


@pytest.mark.parametrize("kind", KINDS)
def test_mark_first_emits_once_per_row(
    kind: str, schema: str, engine: Engine, db: psycopg.Connection[Any]
) -> None:
    first = KINDS[kind](schema, engine, execute)
    again = KINDS[kind](schema, engine, execute)
    other = KINDS[kind](schema, engine, lambda conn: execute(conn, 2))
    assert first.first and not again.first and other.first
    assert first.row == {"id": 1, "workspace_id": "w1"}
    assert again.rows == ()
    stored = events(db, "issue_executed")
    assert [p["issue_id"] for _, _, p in stored] == [1, 2]


def race(kind: str, url: str, engine: Engine, guard: Guard) -> list[FirstTime]:
    barrier = threading.Barrier(RACERS)
    results: list[FirstTime] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def racer() -> None:
        try:
            barrier.wait(timeout=30)

            def guarded(conn: Any) -> FirstTime:
                return guard(conn)

            result = KINDS[kind](url, engine, guarded, 0.05)
            with lock:
                results.append(result)
        except BaseException as exc:  # reported below, with the thread's error
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=racer) for _ in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(results) == RACERS
    return results


@pytest.mark.parametrize("kind", KINDS)
def test_racing_registrations_emit_exactly_one_event(
    kind: str, schema: str, engine: Engine, db: psycopg.Connection[Any]
) -> None:
    results = race(kind, schema, engine, register)
    assert sum(r.first for r in results) == 1
    assert len(events(db, "runtime_registered")) == 1
    assert db.execute("SELECT count(*) FROM agent_runtime").fetchone() == (1,)


@pytest.mark.parametrize("kind", KINDS)
def test_racing_completions_emit_exactly_one_event(
    kind: str, schema: str, engine: Engine, db: psycopg.Connection[Any]
) -> None:
    results = race(kind, schema, engine, execute)
    assert sum(r.first for r in results) == 1
    [(event_uuid, _, _)] = events(db, "issue_executed")
    assert [r.event_uuid for r in results if r.first] == [event_uuid]


def test_a_rolled_back_first_time_is_not_a_first_time(
    schema: str, db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(schema) as conn:
        assert register(conn).first
        conn.rollback()
    assert events(db, "runtime_registered") == []
    with psycopg.connect(schema) as conn:
        assert register(conn).first  # the real first time
        conn.commit()
    assert len(events(db, "runtime_registered")) == 1


def test_emit_if_first_with_a_sqlalchemy_core_upsert(
    engine: Engine, db: psycopg.Connection[Any]
) -> None:
    statement = (
        insert(runtime_table)
        .values(workspace_id="w2", daemon_id="d9", provider="codex")
        .on_conflict_do_update(
            index_elements=["workspace_id", "daemon_id", "provider"],
            set_={"last_seen_at": func.now()},
        )
        .returning(runtime_table.c.id, literal_column("xmax = 0").label("inserted"))
    )
    with Session(engine) as session:
        outcomes = [
            outbox.emit_if_first(
                session,
                statement,
                event="runtime_registered",
                distinct_id="workspace:w2",
                properties=lambda row: {"runtime_id": row["id"]},
                config=CONFIG,
            )
            for _ in range(3)
        ]
        session.commit()
    assert [o.first for o in outcomes] == [True, False, False]
    assert len(events(db, "runtime_registered")) == 1


def test_emit_if_first_with_psycopg_sql(schema: str, db: psycopg.Connection[Any]) -> None:
    sql = (
        "UPDATE issue SET first_executed_at = now() "
        "WHERE id = %(id)s AND first_executed_at IS NULL RETURNING id"
    )
    with psycopg.connect(schema) as conn:
        first = outbox.emit_if_first(
            conn, sql, {"id": 2}, event="issue_executed", distinct_id="u", config=CONFIG
        )
        again = outbox.emit_if_first(
            conn, sql, {"id": 2}, event="issue_executed", distinct_id="u", config=CONFIG
        )
        conn.commit()
    assert first.first and not again.first
    assert len(events(db, "issue_executed")) == 1


def test_a_refused_event_undoes_the_guard_and_keeps_the_transaction(
    schema: str, db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(schema) as conn:
        with pytest.raises(OutboxValidationError) as info:
            outbox.upsert_first(conn, **REFUSED_REGISTRATION)
        assert info.value.field == "properties.raw"
        conn.execute("INSERT INTO issue (id, workspace_id) VALUES (3, 'after')")
        conn.commit()
    # The upsert was undone with the event; the caller's own write committed.
    assert db.execute("SELECT count(*) FROM agent_runtime").fetchone() == (0,)
    assert db.execute("SELECT workspace_id FROM issue WHERE id = 3").fetchone() == ("after",)
    assert events(db, "runtime_registered") == []


def test_a_static_bad_event_is_refused_before_the_statement_runs(
    schema: str, db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(schema) as conn:
        with pytest.raises(OutboxValidationError) as info:
            outbox.mark_first(
                conn,
                "issue",
                "first_executed_at",
                where={"id": 1},
                event="issue_executed",
                distinct_id="anonymous",
                config=CONFIG,
            )
        assert info.value.field == "distinct_id"
        conn.commit()
    assert db.execute("SELECT first_executed_at FROM issue WHERE id = 1").fetchone() == (None,)


def test_when_disabled_the_statement_runs_and_no_event_is_written(
    schema: str, db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(schema) as conn:
        result = register(conn, config=AnalyticsConfig(disabled=True))
        conn.commit()
    assert result.first and result.event_uuids == (None,)
    assert db.execute("SELECT count(*) FROM agent_runtime").fetchone() == (1,)
    assert events(db, "runtime_registered") == []


def test_guards_refuse_an_autocommit_connection_outside_a_transaction(schema: str) -> None:
    with psycopg.connect(schema, autocommit=True) as conn:
        with pytest.raises(UnsupportedConnectionError):
            register(conn)
        with conn.transaction():
            assert register(conn).first
    with pytest.raises(UnsupportedConnectionError):
        register(object())


def test_identifiers_are_validated(schema: str) -> None:
    with psycopg.connect(schema) as conn:
        with pytest.raises(OutboxValidationError) as info:
            outbox.upsert_first(
                conn,
                "agent_runtime",
                {},
                conflict=("id",),
                event="e",
                distinct_id="u",
                config=CONFIG,
            )
        assert info.value.field == "values"
        with pytest.raises(OutboxValidationError) as info:
            outbox.mark_first(
                conn, "issue", "first_executed_at", where={"id": None}, event="e", distinct_id="u"
            )
        assert info.value.field == "where.id"


def test_quoted_identifiers_reach_the_server_as_written(
    schema: str, db: psycopg.Connection[Any], engine: Engine
) -> None:
    db.execute('CREATE TABLE "Odd %Table:x" ("Key:1" text PRIMARY KEY, "n%" int)')
    for runner in (run_psycopg, run_core):

        def guard(conn: Any) -> FirstTime:
            return outbox.upsert_first(
                conn,
                "Odd %Table:x",
                {"Key:1": "k", "n%": 1},
                conflict=("Key:1",),
                event="odd",
                distinct_id="u",
                config=CONFIG,
            )

        runner(schema, engine, guard)
    assert len(events(db, "odd")) == 1


def test_sqlalchemy_text_for_emit_if_first(engine: Engine, db: psycopg.Connection[Any]) -> None:
    with engine.connect() as conn:
        result = outbox.emit_if_first(
            conn,
            text(
                "UPDATE issue SET first_executed_at = now() WHERE id = :id "
                "AND first_executed_at IS NULL RETURNING id"
            ),
            {"id": 1},
            event="issue_executed",
            distinct_id="u",
            config=CONFIG,
        )
        conn.commit()
    assert result.first
    assert len(events(db, "issue_executed")) == 1
