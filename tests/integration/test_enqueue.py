"""enqueue() writes in the caller's transaction, with every supported connection kind."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import outbox
from outbox.enqueue import prepare_enqueue
from outbox.validation import MAX_EVENT_BYTES
from tests.capture_record import record_size
from tests.conftest import STAMP, record_statements
from worker.database import sqlalchemy_url
from worker.storage.base import ClaimedEvent
from worker.storage.snapshot_storage import SnapshotStorage

pytestmark = pytest.mark.usefixtures("default_config")


def rows(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT uuid, event, distinct_id, properties, status, dedup_key"
        " FROM outbox_events ORDER BY uuid"
    ).fetchall()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = create_engine(sqlalchemy_url(database_url))
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE domain (id int PRIMARY KEY, note text)"))
    yield eng
    eng.dispose()


# -- the sync connection kinds -----------------------------------------------------------


def _session_commit(engine: Engine, database_url: str, commit: bool) -> uuid.UUID | None:
    with Session(engine) as session:
        session.execute(text("INSERT INTO domain VALUES (1, 'x')"))
        result = outbox.enqueue(session, "signup", "user-1", {"plan": "free"})
        session.commit() if commit else session.rollback()
    return result


def _connection_commit(engine: Engine, database_url: str, commit: bool) -> uuid.UUID | None:
    with engine.connect() as conn:
        conn.execute(text("INSERT INTO domain VALUES (1, 'x')"))
        result = outbox.enqueue(conn, "signup", "user-1", {"plan": "free"})
        conn.commit() if commit else conn.rollback()
    return result


def _psycopg_commit(engine: Engine, database_url: str, commit: bool) -> uuid.UUID | None:
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO domain VALUES (1, 'x')")
        result = outbox.enqueue(conn, "signup", "user-1", {"plan": "free"})
        conn.commit() if commit else conn.rollback()
    return result


SYNC_KINDS = {
    "sqlalchemy-session": _session_commit,
    "sqlalchemy-connection": _connection_commit,
    "psycopg-connection": _psycopg_commit,
}


@pytest.mark.parametrize("kind", SYNC_KINDS)
@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_event_commits_and_rolls_back_with_the_caller(
    kind: str, commit: bool, engine: Engine, database_url: str, db: psycopg.Connection[Any]
) -> None:
    result = SYNC_KINDS[kind](engine, database_url, commit)
    assert isinstance(result, uuid.UUID)
    domain = db.execute("SELECT count(*) FROM domain").fetchone()
    found = rows(db)
    if commit:
        assert domain == (1,)
        assert [(r[0], r[1], r[2], r[3], r[4]) for r in found] == [
            (result, "signup", "user-1", {**STAMP, "plan": "free"}, "pending")
        ]
    else:
        assert domain == (0,)
        assert found == []


# -- the async connection kinds ----------------------------------------------------------


async def _async_session(database_url: str, commit: bool) -> uuid.UUID | None:
    eng = create_async_engine(sqlalchemy_url(database_url))
    try:
        async with AsyncSession(eng) as session:
            await session.execute(text("INSERT INTO domain VALUES (1, 'x')"))
            result = await outbox.aenqueue(session, "signup", "user-1", {"plan": "free"})
            await (session.commit() if commit else session.rollback())
    finally:
        await eng.dispose()
    return result


async def _async_connection(database_url: str, commit: bool) -> uuid.UUID | None:
    eng = create_async_engine(sqlalchemy_url(database_url))
    try:
        async with eng.connect() as conn:
            await conn.execute(text("INSERT INTO domain VALUES (1, 'x')"))
            result = await outbox.aenqueue(conn, "signup", "user-1", {"plan": "free"})
            await (conn.commit() if commit else conn.rollback())
    finally:
        await eng.dispose()
    return result


async def _async_psycopg(database_url: str, commit: bool) -> uuid.UUID | None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute("INSERT INTO domain VALUES (1, 'x')")
        result = await outbox.aenqueue(conn, "signup", "user-1", {"plan": "free"})
        await (conn.commit() if commit else conn.rollback())
    return result


ASYNC_KINDS: dict[str, Callable[[str, bool], Awaitable[uuid.UUID | None]]] = {
    "sqlalchemy-async-session": _async_session,
    "sqlalchemy-async-connection": _async_connection,
    "psycopg-async-connection": _async_psycopg,
}


@pytest.mark.parametrize("kind", ASYNC_KINDS)
@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
async def test_async_event_commits_and_rolls_back_with_the_caller(
    kind: str, commit: bool, engine: Engine, database_url: str, db: psycopg.Connection[Any]
) -> None:
    result = await ASYNC_KINDS[kind](database_url, commit)
    assert isinstance(result, uuid.UUID)
    assert db.execute("SELECT count(*) FROM domain").fetchone() == ((1,) if commit else (0,))
    assert [r[0] for r in rows(db)] == ([result] if commit else [])


async def test_aenqueue_many_async(
    database_url: str, engine: Engine, db: psycopg.Connection[Any]
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        out = await outbox.aenqueue_many(
            conn, [{"event": "a", "distinct_id": "u"}, {"event": "b", "distinct_id": "u"}]
        )
        await conn.commit()
    assert [r[0] for r in rows(db)] == out


def test_sync_enqueue_refuses_an_async_connection_and_other_objects() -> None:
    with pytest.raises(outbox.UnsupportedConnectionError, match="aenqueue"):
        outbox.enqueue(object(), "e", "u")


# -- what is written ----------------------------------------------------------------------


def test_uuid_timestamp_and_defaults(database_url: str, db: psycopg.Connection[Any]) -> None:
    given = uuid.uuid4()
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with psycopg.connect(database_url) as conn:
        got = outbox.enqueue(conn, "e", "u", uuid=given, timestamp=when)
        default = outbox.enqueue(conn, "e", "u")
        tx_now = conn.execute("SELECT now()").fetchone()
        conn.commit()
    assert got == given
    stored = dict(db.execute("SELECT uuid, timestamp FROM outbox_events").fetchall())
    assert stored[given] == when
    # The default timestamp is the transaction's now(), not the moment of the INSERT.
    assert tx_now is not None and stored[default] == tx_now[0]


def test_enqueue_many_is_one_statement(engine: Engine, db: psycopg.Connection[Any]) -> None:
    statements = record_statements(engine)

    items = [
        {"event": "issue_created", "distinct_id": f"user-{i}", "properties": {"i": i}}
        for i in range(50)
    ]
    with Session(engine) as session, session.begin():
        statements.clear()
        result = outbox.enqueue_many(session, items)
        assert len(statements) == 1
    stored = rows(db)
    assert [r[0] for r in stored] == result
    assert [r[3]["i"] for r in stored] == list(range(50))


def test_enqueue_many_with_one_bad_item_writes_nothing(
    engine: Engine, db: psycopg.Connection[Any]
) -> None:
    items: list[dict[str, Any]] = [
        {"event": "ok", "distinct_id": "u"},
        {"event": "ok", "distinct_id": "null"},
    ]
    with (
        Session(engine) as session,
        session.begin(),
        pytest.raises(outbox.OutboxValidationError) as info,
    ):
        outbox.enqueue_many(session, items)
    assert info.value.field == "events[1].distinct_id"
    assert rows(db) == []


# -- dedup ---------------------------------------------------------------------------------


def test_dedup_key_refuses_while_undelivered(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(database_url) as conn:
        first = outbox.enqueue(conn, "e", "u", dedup_key="k1")
        conn.commit()
    with psycopg.connect(database_url) as conn:
        second = outbox.enqueue(conn, "e", "u", dedup_key="k1")
        other = outbox.enqueue(conn, "e", "u", dedup_key="k2")
        conn.commit()
    assert first is not None and second is None and other is not None
    assert len(rows(db)) == 2


def test_dedup_key_is_free_again_when_the_holder_rolled_back(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(database_url) as conn:
        assert outbox.enqueue(conn, "e", "u", dedup_key="k") is not None
        conn.rollback()
        assert outbox.enqueue(conn, "e", "u", dedup_key="k") is not None
        conn.commit()
    assert len(rows(db)) == 1


def test_dedup_key_repeated_within_one_call(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        out = outbox.enqueue_many(
            conn,
            [
                {"event": "e", "distinct_id": "u", "dedup_key": "same"},
                {"event": "e", "distinct_id": "u", "dedup_key": "same"},
                {"event": "e", "distinct_id": "u"},
            ],
        )
        conn.commit()
    assert out[0] is not None and out[1] is None and out[2] is not None


def test_dedup_window_after_delivery(database_url: str, db: psycopg.Connection[Any]) -> None:
    """Delivered within the window: refused. Window over: accepted again."""
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, "e", "u", dedup_key="k")
        conn.commit()
    # What the worker does at delivery: start the key's window (the row itself stays
    # in its event table until the table is truncated).
    db.execute("UPDATE outbox_dedup_keys SET expires_at = now() + interval '1 hour'")
    with psycopg.connect(database_url) as conn:
        assert outbox.enqueue(conn, "e", "u", dedup_key="k") is None
        conn.commit()
    db.execute("UPDATE outbox_dedup_keys SET expires_at = now() - interval '1 second'")
    with psycopg.connect(database_url) as conn:
        assert outbox.enqueue(conn, "e", "u", dedup_key="k") is not None
        conn.commit()
    assert db.execute("SELECT expires_at = 'infinity' FROM outbox_dedup_keys").fetchone() == (True,)


# -- bad input never breaks the caller's transaction --------------------------------------

BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("empty event", {"event": "", "distinct_id": "u"}, "event"),
    ("long event", {"event": "x" * 201, "distinct_id": "u"}, "event"),
    ("empty distinct_id", {"event": "e", "distinct_id": "  "}, "distinct_id"),
    ("long distinct_id", {"event": "e", "distinct_id": "u" * 201}, "distinct_id"),
    ("reserved distinct_id", {"event": "e", "distinct_id": "anonymous"}, "distinct_id"),
    ("reserved null", {"event": "e", "distinct_id": "null"}, "distinct_id"),
    (
        "bytes property",
        {"event": "e", "distinct_id": "u", "properties": {"b": b"x"}},
        "properties.b",
    ),
    (
        "object property",
        {"event": "e", "distinct_id": "u", "properties": {"o": object()}},
        "properties.o",
    ),
    (
        # 300,000 quotes: 600 kB stored, 1.2 MB in PostHog's capture.
        "too big",
        {"event": "e", "distinct_id": "u", "properties": {"s": '"' * 300_000}},
        "properties",
    ),
    ("bad timestamp", {"event": "e", "distinct_id": "u", "timestamp": "yesterday"}, "timestamp"),
    (
        "timestamp before 1970",
        {"event": "e", "distinct_id": "u", "timestamp": datetime(1, 1, 1, tzinfo=UTC)},
        "timestamp",
    ),
    ("timestamp never", {"event": "e", "distinct_id": "u", "timestamp": datetime.max}, "timestamp"),
    ("bad uuid", {"event": "e", "distinct_id": "u", "uuid": "not-a-uuid"}, "uuid"),
    ("zero-width distinct_id", {"event": "e", "distinct_id": "\u200b"}, "distinct_id"),
    ("quoted placeholder", {"event": "e", "distinct_id": "'null'"}, "distinct_id"),
    ("zero-width event", {"event": "\u200b\u200b", "distinct_id": "u"}, "event"),
    (
        "$set as a str",
        {"event": "e", "distinct_id": "u", "properties": {"$set": "plan=pro"}},
        "properties.$set",
    ),
    (
        "$unset as a str",
        {"event": "e", "distinct_id": "u", "properties": {"$unset": "plan"}},
        "properties.$unset",
    ),
    (
        "$groups without a key",
        {"event": "e", "distinct_id": "u", "properties": {"$groups": {"company": None}}},
        "properties.$groups.company",
    ),
    (
        "integer past f64",
        {"event": "e", "distinct_id": "u", "properties": {"n": [1, 2**1100]}},
        "properties.n[1]",
    ),
]


def _refused_in_a_transaction(
    kind: str,
    engine: Engine,
    database_url: str,
    refused: Callable[[Any], object],
    then: Callable[[Any], Any] = lambda conn: None,
) -> tuple[outbox.OutboxValidationError, Any]:
    """Between two writes of the caller's own in one transaction, run ``refused(conn)``
    (it must raise) and then ``then(conn)``, and commit; returns the error and what
    ``then`` returned."""
    with contextlib.ExitStack() as stack:
        if kind == "sqlalchemy":
            conn: Any = stack.enter_context(Session(engine))
            conn.execute(text("INSERT INTO domain VALUES (1, 'before')"))
        else:
            conn = stack.enter_context(psycopg.connect(database_url))
            conn.execute("INSERT INTO domain VALUES (1, 'before')")
        with pytest.raises(outbox.OutboxValidationError) as info:
            refused(conn)
        result = then(conn)
        if kind == "sqlalchemy":
            conn.execute(text("INSERT INTO domain VALUES (2, 'after')"))
        else:
            conn.execute("INSERT INTO domain VALUES (2, 'after')")
        conn.commit()
    return info.value, result


@pytest.mark.parametrize(("case", "kwargs", "field"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("kind", ["sqlalchemy", "psycopg"])
def test_bad_input_names_the_field_and_the_transaction_still_commits(
    case: str,
    kwargs: dict[str, Any],
    field: str,
    kind: str,
    engine: Engine,
    database_url: str,
    db: psycopg.Connection[Any],
) -> None:
    kwargs = dict(kwargs)
    event_name = kwargs.pop("event")
    distinct_id = kwargs.pop("distinct_id")
    error, _ = _refused_in_a_transaction(
        kind,
        engine,
        database_url,
        lambda conn: outbox.enqueue(conn, event_name, distinct_id, **kwargs),
    )
    assert error.field == field
    assert isinstance(error, outbox.OutboxError)
    assert db.execute("SELECT count(*) FROM domain").fetchone() == (2,)
    assert rows(db) == []


def test_nul_and_non_finite_values_are_normalised_not_sent_to_the_server(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(
            conn, "e\x00vt", "u\x00", {"k\x00": "v\x00", "nan": float("nan"), "inf": float("inf")}
        )
        conn.commit()
    (_, event_name, distinct_id, props, _, _) = rows(db)[0]
    assert "\x00" not in event_name and "\x00" not in distinct_id
    assert props == {**STAMP, "k\ufffd": "v\ufffd", "nan": None, "inf": None}


@pytest.mark.parametrize(
    "call",
    [
        lambda conn: outbox.enqueue(conn, "e", "u"),
        lambda conn: outbox.enqueue(conn, "e", "u", dedup_key="k"),
        lambda conn: outbox.enqueue_many(conn, [{"event": "e", "distinct_id": "u"}] * 2),
        lambda conn: outbox.enqueue_many(
            conn, [{"event": "e", "distinct_id": "u", "dedup_key": f"k{i}"} for i in range(2)]
        ),
    ],
    ids=["one", "one-keyed", "many", "many-keyed"],
)
def test_missing_table_is_a_clear_error(empty_database: str, call: Callable[[Any], Any]) -> None:
    with (
        psycopg.connect(empty_database) as conn,
        pytest.raises(outbox.OutboxNotInstalledError) as info,
    ):
        call(conn)
    assert "outbox-worker migrate" in str(info.value)
    assert isinstance(info.value.__cause__, psycopg.Error)  # raise ... from the driver's


def test_another_database_error_is_an_outbox_database_error_from_the_drivers(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    role = f"outbox_nothing_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {role}")
    db.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
    try:
        for items in (
            [{"event": "e", "distinct_id": "u"}],
            [{"event": "e", "distinct_id": "u"}] * 2,
        ):
            with psycopg.connect(database_url) as conn:
                conn.execute(f"SET ROLE {role}")  # no right on the event tables
                with pytest.raises(outbox.OutboxDatabaseError) as info:
                    outbox.enqueue_many(conn, items)
                conn.rollback()
            assert not isinstance(info.value, outbox.OutboxNotInstalledError)
            assert str(info.value).startswith("the outbox INSERT failed: permission denied")
            assert isinstance(info.value.__cause__, psycopg.errors.InsufficientPrivilege)
    finally:
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")


# -- enqueue_many: a uuid given twice ----------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlalchemy", "psycopg"])
def test_a_repeated_uuid_is_refused_and_the_transaction_still_commits(
    kind: str, engine: Engine, database_url: str, db: psycopg.Connection[Any]
) -> None:
    given = uuid.uuid4()
    items: list[dict[str, Any]] = [
        {"event": "a", "distinct_id": "u", "uuid": given},
        {"event": "b", "distinct_id": "u"},
        {"event": "c", "distinct_id": "u", "uuid": given},
    ]
    error, written = _refused_in_a_transaction(
        kind,
        engine,
        database_url,
        lambda conn: outbox.enqueue_many(conn, items),
        lambda conn: outbox.enqueue_many(conn, items[:2]),  # the transaction is still usable
    )
    assert error.field == "events[2].uuid"
    assert "events[0]" in error.problem
    assert db.execute("SELECT count(*) FROM domain").fetchone() == (2,)
    assert sorted(r[0] for r in rows(db)) == sorted(written)
    assert written[0] == given


@pytest.mark.parametrize("kind", ["sqlalchemy", "psycopg"])
def test_a_uuid_enqueued_again_by_a_later_call_is_written_again(
    kind: str, engine: Engine, database_url: str, db: psycopg.Connection[Any]
) -> None:
    # No unique index refuses it (PostHog merges the copies); the transaction goes on.
    given = uuid.uuid4()
    if kind == "sqlalchemy":
        with Session(engine) as session, session.begin():
            first = outbox.enqueue(session, "a", "u", uuid=given)
            again = outbox.enqueue_many(
                session, [{"event": "b", "distinct_id": "u", "uuid": given}]
            )
            session.execute(text("INSERT INTO domain VALUES (1, 'after')"))
    else:
        with psycopg.connect(database_url) as conn:
            first = outbox.enqueue(conn, "a", "u", uuid=given)
            again = outbox.enqueue_many(conn, [{"event": "b", "distinct_id": "u", "uuid": given}])
            conn.execute("INSERT INTO domain VALUES (1, 'after')")
            conn.commit()
    assert first == given and again == [given]
    assert sorted((r[0], r[1]) for r in rows(db)) == [(given, "a"), (given, "b")]
    assert db.execute("SELECT count(*) FROM domain").fetchone() == (1,)


# -- the size bound, through PostgreSQL and the worker's own outbound ----------------------


def _claimed(db: psycopg.Connection[Any]) -> dict[uuid.UUID, ClaimedEvent]:
    """The rows, read back by the worker's own claim, by uuid."""
    store = SnapshotStorage(db.info.dsn)
    try:
        batch = store.claim(10, 10**9, 30.0)
        assert batch is not None
        store.release(batch)
        return {e.uuid: e for e in batch.events}
    finally:
        store.close()


def _heavy(count: int) -> dict[str, Any]:
    """Properties heavy in quotes, backslashes, non-ASCII and growing numbers."""
    return {
        "text": 'a "quoted" \\path\\ é 🚀 \x01 ' * count,
        "numbers": [1e-300, 1e300, 1.5] * (count // 40),
        "$set": {"note": '"' * (count // 4)},
    }


def test_an_event_at_the_limit_fits_capture_as_the_worker_ships_it(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    event, person = 'checkout "done"', "usér\\42"

    def accepted(count: int) -> bool:
        try:
            prepare_enqueue(event, person, _heavy(count))
        except outbox.OutboxValidationError:
            return False
        return True

    low, high = 1, 100_000
    while low < high:  # the largest accepted count
        mid = (low + high + 1) // 2
        low, high = (mid, high) if accepted(mid) else (low, mid - 1)
    assert 10_000 < low < 20_000
    with pytest.raises(outbox.OutboxValidationError) as info:
        prepare_enqueue(event, person, _heavy(low + 1))
    assert info.value.field == "properties"

    with psycopg.connect(database_url) as conn:
        plain = outbox.enqueue(conn, event, person, _heavy(low))
        keyed = outbox.enqueue(conn, event, person, _heavy(low), dedup_key="at-the-limit")
        conn.commit()
    claimed = _claimed(db)
    assert plain is not None and keyed is not None and set(claimed) == {plain, keyed}
    # A plain event's properties are stored as the json text enqueue wrote; a keyed one
    # goes through outbox_enqueue_keyed's jsonb parameter, and PostgreSQL writes its
    # numbers back in positional notation (1e-300: 302 characters), the case the size
    # bound is made for.
    sizes = {u: record_size(e.outbound().json) for u, e in claimed.items()}
    assert sizes[plain] <= sizes[keyed] <= MAX_EVENT_BYTES
    # Close, not just safe: one more count adds about 70 bytes, one more 40th 600.
    assert sizes[keyed] > MAX_EVENT_BYTES - 1_000
