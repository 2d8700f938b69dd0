"""The async first-time guards against a real PostgreSQL: psycopg's AsyncConnection and
SQLAlchemy's AsyncSession and AsyncConnection, including racing transactions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import NullPool

import outbox
from outbox import FirstTime, OutboxValidationError, UnsupportedConnectionError
from tests.integration.test_guards import (
    CONFIG,
    RACERS,
    REFUSED_REGISTRATION,
    REGISTRATION,
    events,
    execution,
)
from worker.database import sqlalchemy_url


@pytest.fixture
async def engine(schema: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(sqlalchemy_url(schema), poolclass=NullPool)
    yield eng
    await eng.dispose()


async def register(conn: Any) -> FirstTime:
    return await outbox.aupsert_first(conn, **{**REGISTRATION, "config": CONFIG})


async def execute(conn: Any) -> FirstTime:
    return await outbox.amark_first(conn, **execution(1))


AsyncGuard = Callable[[Any], Awaitable[FirstTime]]


async def run_psycopg(url: str, engine: AsyncEngine, guard: AsyncGuard, pause: float) -> FirstTime:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        result = await guard(conn)
        await asyncio.sleep(pause)  # hold the row lock so the others pile up behind it
        await conn.commit()
    return result


async def run_core(url: str, engine: AsyncEngine, guard: AsyncGuard, pause: float) -> FirstTime:
    async with engine.connect() as conn:
        result = await guard(conn)
        await asyncio.sleep(pause)
        await conn.commit()
    return result


async def run_orm(url: str, engine: AsyncEngine, guard: AsyncGuard, pause: float) -> FirstTime:
    async with AsyncSession(engine) as session:
        result = await guard(session)
        await asyncio.sleep(pause)
        await session.commit()
    return result


KINDS = {"psycopg": run_psycopg, "sqlalchemy-core": run_core, "sqlalchemy-orm": run_orm}


@pytest.mark.parametrize("kind", KINDS)
async def test_aupsert_first_emits_only_when_the_row_is_inserted(
    kind: str, schema: str, engine: AsyncEngine, db: psycopg.Connection[Any]
) -> None:
    first = await KINDS[kind](schema, engine, register, 0.0)
    again = await KINDS[kind](schema, engine, register, 0.0)
    assert first.first and first.row is not None and first.row["inserted"] is True
    assert not again and again.row is not None and again.row["id"] == first.row["id"]
    [(event_uuid, distinct_id, props)] = events(db, "runtime_registered")
    assert event_uuid == first.event_uuid and distinct_id == "workspace:w1"
    assert props["runtime_id"] == first.row["id"]


@pytest.mark.parametrize("kind", KINDS)
async def test_racing_async_completions_emit_exactly_one_event(
    kind: str, schema: str, engine: AsyncEngine, db: psycopg.Connection[Any]
) -> None:
    results = await asyncio.gather(
        *(KINDS[kind](schema, engine, execute, 0.05) for _ in range(RACERS))
    )
    assert sum(r.first for r in results) == 1
    [(event_uuid, _, _)] = events(db, "issue_executed")
    assert [r.event_uuid for r in results if r.first] == [event_uuid]


async def test_aemit_if_first_with_sqlalchemy_text(
    engine: AsyncEngine, db: psycopg.Connection[Any]
) -> None:
    statement = text(
        "UPDATE issue SET first_executed_at = now()"
        " WHERE id = :id AND first_executed_at IS NULL RETURNING id"
    )
    for expected in (True, False):
        async with engine.begin() as conn:
            result = await outbox.aemit_if_first(
                conn, statement, {"id": 2}, event="issue_executed", distinct_id="u", config=CONFIG
            )
        assert result.first is expected
    assert len(events(db, "issue_executed")) == 1


async def test_a_refused_event_undoes_the_async_guard_and_keeps_the_transaction(
    schema: str, db: psycopg.Connection[Any]
) -> None:
    async with await psycopg.AsyncConnection.connect(schema) as conn:
        with pytest.raises(OutboxValidationError) as info:
            await outbox.aupsert_first(conn, **REFUSED_REGISTRATION)
        assert info.value.field == "properties.raw"
        await conn.execute("INSERT INTO issue (id, workspace_id) VALUES (3, 'after')")
        await conn.commit()
    assert db.execute("SELECT count(*) FROM agent_runtime").fetchone() == (0,)
    assert db.execute("SELECT workspace_id FROM issue WHERE id = 3").fetchone() == ("after",)
    assert events(db, "runtime_registered") == []


async def test_sync_and_async_guards_name_the_other_when_given_the_wrong_connection(
    schema: str, engine: AsyncEngine
) -> None:
    async with AsyncSession(engine) as session:
        with pytest.raises(UnsupportedConnectionError, match=r"asynchronous: use amark_first\(\)$"):
            outbox.mark_first(
                session,
                "issue",
                "first_executed_at",
                where={"id": 1},
                event="e",
                distinct_id="u",
                config=CONFIG,
            )
    with (
        psycopg.connect(schema) as sync_conn,
        pytest.raises(UnsupportedConnectionError, match=r"synchronous: use mark_first\(\)$"),
    ):
        await execute(sync_conn)
    async with await psycopg.AsyncConnection.connect(schema, autocommit=True) as conn:
        with pytest.raises(UnsupportedConnectionError, match="autocommit"):
            await execute(conn)


@pytest.mark.parametrize(
    ("sync_guard", "async_guard", "args"),
    [
        (
            outbox.upsert_first,
            outbox.aupsert_first,
            {"table": "issue", "values": {"id": 9}, "conflict": ["id"]},
        ),
        (
            outbox.mark_first,
            outbox.amark_first,
            {"table": "issue", "column": "first_executed_at", "where": {"id": 1}},
        ),
        (outbox.emit_if_first, outbox.aemit_if_first, {"statement": "SELECT true AS first"}),
    ],
    ids=["upsert_first", "mark_first", "emit_if_first"],
)
async def test_each_guard_names_its_own_other_form(
    schema: str, sync_guard: Any, async_guard: Any, args: dict[str, Any]
) -> None:
    async_name, sync_name = async_guard.__name__, sync_guard.__name__
    async with await psycopg.AsyncConnection.connect(schema) as aconn:
        with pytest.raises(
            UnsupportedConnectionError, match=rf"asynchronous: use {async_name}\(\)$"
        ):
            sync_guard(aconn, **args, event="e", distinct_id="u", config=CONFIG)
    with psycopg.connect(schema) as conn:
        with pytest.raises(UnsupportedConnectionError, match=rf"synchronous: use {sync_name}\(\)$"):
            await async_guard(conn, **args, event="e", distinct_id="u", config=CONFIG)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the transaction is usable


async def test_an_async_scoped_session_works_like_its_session(
    engine: AsyncEngine, db: psycopg.Connection[Any]
) -> None:
    scoped = async_scoped_session(async_sessionmaker(engine), scopefunc=asyncio.current_task)
    try:
        first = await register(scoped)
        await scoped.commit()
        again = await register(scoped)
        await scoped.commit()
    finally:
        await scoped.remove()
    assert first.first and not again.first
    assert len(events(db, "runtime_registered")) == 1
