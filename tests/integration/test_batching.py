"""outbox.batch(): many events from one transaction, one statement."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import outbox
from tests.conftest import record_statements
from worker.database import sqlalchemy_url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = create_engine(sqlalchemy_url(database_url))
    yield eng
    eng.dispose()


def test_ten_events_one_statement(engine: Engine, db: psycopg.Connection[Any]) -> None:
    statements = record_statements(engine)

    with Session(engine) as session, session.begin():
        statements.clear()
        with outbox.batch(session) as events:
            uuids = [events.enqueue("step", "user-1", {"i": i}) for i in range(9)]
            uuids.append(events.enqueue("step", "user-1", {"i": 9}, dedup_key="once"))
            assert statements == []  # nothing written yet
        assert len(statements) == 1
    assert events.results == uuids
    # The view outbox_events has no insertion order: the events share the
    # transaction's timestamp, so they are matched by their "i".
    rows = db.execute(
        "SELECT uuid, properties->>'i' FROM outbox_events ORDER BY (properties->>'i')::int"
    ).fetchall()
    assert [r[0] for r in rows] == uuids
    assert [r[1] for r in rows] == [str(i) for i in range(10)]


def test_a_bad_event_raises_where_it_is_made_and_nothing_is_written(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(database_url) as conn:
        with (  # noqa: PT012 - the error comes from the second call inside the batch
            pytest.raises(outbox.OutboxValidationError) as info,
            outbox.batch(conn) as events,
        ):
            events.enqueue("ok", "u")
            events.enqueue("bad", "anonymous")
        conn.commit()
    assert info.value.field == "distinct_id"
    assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,)


def test_duplicate_keys_in_a_batch(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        with outbox.batch(conn) as events:
            events.enqueue("e", "u", dedup_key="k")
            events.enqueue("e", "u", dedup_key="k")
        conn.commit()
    assert events.results[0] is not None and events.results[1] is None


async def test_async_batch(database_url: str, db: psycopg.Connection[Any]) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        async with outbox.batch(conn) as events:
            events.enqueue("a", "u")
            events.enqueue("b", "u")
        await conn.commit()
    assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (2,)


def test_a_uuid_given_twice_in_a_batch_is_refused_and_the_transaction_survives(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    chosen = uuid.uuid4()
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE mine (n int)")
        conn.execute("INSERT INTO mine VALUES (1)")
        with outbox.batch(conn) as events:
            events.enqueue("a", "u", uuid=chosen)
            with pytest.raises(outbox.OutboxValidationError) as info:
                events.enqueue("b", "u", uuid=chosen)
            events.enqueue("c", "u")
        conn.commit()  # the caller's own write and the batch commit
    assert info.value.field == "uuid" and str(chosen) in str(info.value)
    assert db.execute("SELECT count(*) FROM mine").fetchone() == (1,)
    events = [r[0] for r in db.execute("SELECT event FROM outbox_events ORDER BY event")]
    assert events == ["a", "c"]
