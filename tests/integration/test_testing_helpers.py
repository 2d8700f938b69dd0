"""outbox.testing (what the open transaction enqueued) and worker.testing.deliver, against
a real PostgreSQL and a real CaptureServer over HTTP."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import outbox
from outbox.schema import EVENT_TABLES
from outbox.testing import (
    MAX_LINE,
    MAX_LISTED,
    aassert_enqueued,
    aassert_not_enqueued,
    aenqueued,
    assert_enqueued,
    assert_not_enqueued,
    enqueued,
)
from worker.database import migrate, sqlalchemy_url
from worker.testing import CaptureServer, NotDeliveredError, Reply, deliver

# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A psycopg connection whose transaction the test rolls back."""
    with psycopg.connect(database_url) as c:
        yield c
        c.rollback()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = create_engine(sqlalchemy_url(database_url))
    yield eng
    eng.dispose()


@pytest.fixture
async def async_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(sqlalchemy_url(database_url))
    yield eng
    await eng.dispose()


def commit_one(database_url: str, event: str, distinct_id: str = "someone") -> uuid.UUID:
    with psycopg.connect(database_url) as other:
        event_uuid = outbox.enqueue(other, event, distinct_id)
    assert event_uuid is not None
    return event_uuid


def names(events: list[Any]) -> list[str]:
    return [e.event for e in events]


# --------------------------------------------------------------------------- what is seen


def test_uncommitted_rows_of_this_transaction_are_seen_and_committed_ones_left_out(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    commit_one(database_url, "committed_before")
    placed = outbox.enqueue(conn, "order_placed", "user-42", {"total": 30})

    [event] = enqueued(conn)

    assert event.event == "order_placed" and event.uuid == placed
    assert event.distinct_id == "user-42" and event.properties["total"] == 30
    assert event.in_transaction and event.status == "pending" and event.destination == "posthog"
    assert event.timestamp.tzinfo is UTC
    assert names(enqueued(conn, scope="all")) == ["committed_before", "order_placed"]
    assert [e.in_transaction for e in enqueued(conn, scope="all")] == [False, True]
    # Reading committed nothing: another connection still sees only the committed row.
    with psycopg.connect(database_url) as other:
        assert other.execute("SELECT event FROM outbox_events").fetchall() == [
            ("committed_before",)
        ]


def test_rolled_back_rows_are_not_seen(conn: psycopg.Connection[Any]) -> None:
    outbox.enqueue(conn, "order_placed", "user-42")
    conn.rollback()

    assert enqueued(conn) == []
    assert enqueued(conn, scope="all") == []


def test_savepoints_released_and_open_count_rolled_back_ones_do_not(
    conn: psycopg.Connection[Any],
) -> None:
    outbox.enqueue(conn, "top_level", "u")
    with conn.transaction():  # a savepoint, released
        outbox.enqueue(conn, "released", "u")
        with conn.transaction():  # nested, released
            outbox.enqueue(conn, "nested", "u")
    with contextlib.suppress(ZeroDivisionError), conn.transaction():
        outbox.enqueue(conn, "rolled_back_to", "u")
        raise ZeroDivisionError  # rolls back to the savepoint
    with conn.transaction():
        outbox.enqueue(conn, "still_open", "u")
        assert names(enqueued(conn)) == ["top_level", "released", "nested", "still_open"]
    assert_not_enqueued(conn, "rolled_back_to")


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_rows_written_after_the_snapshot_was_taken_are_seen(
    conn: psycopg.Connection[Any], database_url: str, isolation: str
) -> None:
    conn.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
    assert enqueued(conn) == []  # takes the transaction's snapshot
    commit_one(database_url, "committed_after_the_snapshot")
    with conn.transaction():  # subtransaction ids newer than the snapshot's xmax
        outbox.enqueue(conn, "in_savepoint", "u")
    outbox.enqueue(conn, "top_level", "u")

    assert names(enqueued(conn)) == ["in_savepoint", "top_level"]
    assert names(enqueued(conn, scope="all")) == ["in_savepoint", "top_level"]


def test_another_transactions_uncommitted_rows_are_not_seen(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    with psycopg.connect(database_url) as other:
        outbox.enqueue(other, "theirs", "u")  # open, not committed
        outbox.enqueue(conn, "mine", "u")

        assert names(enqueued(conn, scope="all")) == ["mine"]
        assert names(enqueued(other)) == ["theirs"]
        other.rollback()


def test_committed_rows_waiting_for_a_retry_are_read_as_committed(
    database_url: str, db: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    commit_one(database_url, "committed")
    # What the worker does after a failed delivery: the event waits in outbox_retry.
    db.execute(
        'INSERT INTO outbox_retry (uuid, "timestamp", event, distinct_id, properties,'
        " attempts, next_attempt_at, last_error)"
        " VALUES (gen_random_uuid(), now(), 'retrying', 'u', '{\"a\": 1}', 2,"
        " now() + interval '1 hour', 'HTTP 503')"
    )
    outbox.enqueue(conn, "mine", "u")

    assert names(enqueued(conn)) == ["mine"]
    retrying, committed, mine = enqueued(conn, scope="all")
    assert (retrying.event, retrying.status, retrying.attempts) == ("retrying", "pending", 2)
    assert retrying.retry_id is not None and retrying.properties == {"a": 1}
    assert not retrying.in_transaction and not committed.in_transaction
    assert committed.event == "committed" and committed.retry_id is None
    assert mine.in_transaction and mine.attempts == 0 and mine.retry_id is None


def test_keyed_and_batched_events_are_the_transactions_too(
    conn: psycopg.Connection[Any],
) -> None:
    # A dedup key goes through a SECURITY DEFINER function; its row is still ours.
    outbox.enqueue(conn, "invoice_paid", "u", dedup_key="invoice-1")
    outbox.enqueue_many(
        conn, [{"event": "a", "distinct_id": "u"}, {"event": "b", "distinct_id": "u"}]
    )
    with outbox.batch(conn) as batch:
        batch.enqueue("c", "u")

    events = enqueued(conn)

    assert names(events) == ["invoice_paid", "a", "b", "c"]
    assert events[0].dedup_key == "invoice-1"


def test_an_event_reads_back_as_stored(conn: psycopg.Connection[Any]) -> None:
    when = datetime(2026, 11, 30, 23, 59, 58, 123456, tzinfo=UTC)
    given = uuid.UUID("01900000-0000-7000-8000-000000000042")
    outbox.enqueue(conn, "order_placed", "user-42", {"note": "café ✓"}, timestamp=when, uuid=given)

    [event] = enqueued(conn)
    [row] = conn.execute(
        "SELECT retry_id, txid, properties, txid = txid_current()"
        " FROM outbox_events WHERE uuid = %s",
        [given],
    ).fetchall()

    assert (event.uuid, event.timestamp) == (given, when)
    assert (event.retry_id, event.txid, event.properties, True) == row
    assert event.properties["note"] == "café ✓" and event.attempts == 0


# --------------------------------------------------------------------------- matching


def test_filters_match_the_stored_values(conn: psycopg.Connection[Any]) -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    outbox.enqueue(
        conn,
        "order_placed",
        42,
        {"total": 30, "items": ("book", "pen"), "at": when},
        set={"plan": "pro"},
    )
    outbox.enqueue(conn, "order_placed", "user-7", {"total": 10})

    # int distinct_id, a tuple and a datetime: compared as enqueue() stored them.
    [found] = assert_enqueued(
        conn, "order_placed", distinct_id=42, properties={"items": ("book", "pen"), "at": when}
    )
    assert found.distinct_id == "42"
    assert found.properties["$set"] == {"plan": "pro"}
    assert_enqueued(conn, properties={"$set": {"plan": "pro"}})
    assert_enqueued(conn, "order_placed", count=2)
    assert len(enqueued(conn, properties={"total": 10})) == 1
    assert enqueued(conn, properties={"total": 10, "missing": None}) == []
    assert_not_enqueued(conn, "order_placed", distinct_id="user-8")
    assert_not_enqueued(conn, "refund_issued")


def test_a_failed_assertion_lists_what_was_enqueued(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    commit_one(database_url, "committed_elsewhere")
    outbox.enqueue(conn, "order_placed", "user-41", {"total": 30})

    with pytest.raises(AssertionError) as failed:
        assert_enqueued(conn, "order_placed", distinct_id="user-42", properties={"total": 30})

    message = str(failed.value)
    assert message.splitlines() == [
        "expected at least one event 'order_placed' for distinct_id 'user-42' with properties "
        "including {'total': 30} enqueued by this transaction, found 0.",
        "Enqueued by this transaction (1):",
        message.splitlines()[2],
        "1 committed event(s) are in the outbox too; scope='all' includes them.",
    ]
    assert message.splitlines()[2].startswith(
        "  1. 'order_placed' distinct_id='user-41' (distinct_id differs) properties={"
    )
    assert "'total': 30" in message.splitlines()[2]


def test_each_listed_event_says_how_it_differs(conn: psycopg.Connection[Any]) -> None:
    outbox.enqueue(conn, "order_placed", "user-42", {"total": 25})
    outbox.enqueue(conn, "order_shipped", "user-42", {"total": 30, "currency": "EUR"})

    with pytest.raises(AssertionError) as failed:
        assert_enqueued(
            conn, "order_placed", distinct_id="user-42", properties={"total": 30, "currency": "EUR"}
        )

    first, second = [line.split(" properties=")[0] for line in str(failed.value).splitlines()[2:]]
    assert (
        first == "  1. 'order_placed' distinct_id='user-42' ('total' is 25, not 30; no 'currency')"
    )
    assert second == "  2. 'order_shipped' distinct_id='user-42' (event differs)"


def test_a_wrong_count_lists_the_matches(conn: psycopg.Connection[Any]) -> None:
    outbox.enqueue(conn, "a", "u1")
    outbox.enqueue(conn, "a", "u2")

    with pytest.raises(AssertionError) as failed:
        assert_enqueued(conn, "a", count=1)

    lines = str(failed.value).splitlines()
    assert lines[0] == "expected exactly 1 event 'a' enqueued by this transaction, found 2:"
    assert [line.split(" properties=")[0] for line in lines[1:]] == [
        "  1. 'a' distinct_id='u1'",
        "  2. 'a' distinct_id='u2'",
    ]


def test_nothing_enqueued_says_so(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(
        AssertionError, match=r"found 0\.\nNothing was enqueued by this transaction\.$"
    ):
        assert_enqueued(conn, "a")


def test_assert_not_enqueued_lists_the_matches(conn: psycopg.Connection[Any]) -> None:
    outbox.enqueue(conn, "password_changed", "user-42")
    outbox.enqueue(conn, "login", "user-42")

    with pytest.raises(AssertionError) as failed:
        assert_not_enqueued(conn, distinct_id="user-42")

    lines = str(failed.value).splitlines()
    assert (
        lines[0]
        == "expected no event for distinct_id 'user-42' enqueued by this transaction, found 2:"
    )
    assert lines[1].startswith("  1. 'password_changed' distinct_id='user-42'")


def test_messages_are_bounded_and_terminal_safe(conn: psycopg.Connection[Any]) -> None:
    hostile = "\x1b[2J\x1b]0;owned\x07\u202eevil\r\n" + "x" * 5000
    outbox.enqueue_many(
        conn,
        [
            {"event": "e", "distinct_id": f"u{i}", "properties": {"note": hostile}}
            for i in range(25)
        ],
    )

    with pytest.raises(AssertionError) as failed:
        assert_enqueued(conn, "e", distinct_id=hostile[:50])

    message = str(failed.value)
    lines = message.splitlines()
    assert len(lines) == 2 + MAX_LISTED + 1
    assert lines[-1] == f"  ... and {25 - MAX_LISTED} more"
    assert all(len(line) <= MAX_LINE + 10 for line in lines)  # "  10. " before each event
    assert all(c.isprintable() for c in message.replace("\n", ""))
    assert "\\x1b[2J" in message and "\\u202e" in message


# --------------------------------------------------------------------------- connection kinds


def test_sqlalchemy_session_and_connection(engine: Engine) -> None:
    with Session(engine) as session:
        outbox.enqueue(session, "order_placed", "user-42", {"total": 30})
        with session.begin_nested():
            outbox.enqueue(session, "in_savepoint", "user-42")
        assert_enqueued(session, "order_placed", distinct_id="user-42", properties={"total": 30})
        assert names(enqueued(session)) == ["order_placed", "in_savepoint"]
        session.rollback()
        assert enqueued(session) == []

    with engine.connect() as connection:
        outbox.enqueue(connection, "core", "u")
        assert names(enqueued(connection)) == ["core"]
        assert_not_enqueued(connection, "order_placed")
        connection.rollback()


async def test_sqlalchemy_async_session_and_connection(async_engine: AsyncEngine) -> None:
    async with AsyncSession(async_engine) as session:
        await outbox.aenqueue(session, "order_placed", "user-42", {"total": 30})
        async with session.begin_nested():
            await outbox.aenqueue(session, "in_savepoint", "user-42")
        found = await aassert_enqueued(session, "order_placed", properties={"total": 30})
        assert [e.distinct_id for e in found] == ["user-42"]
        assert names(await aenqueued(session)) == ["order_placed", "in_savepoint"]
        await aassert_not_enqueued(session, "refund_issued")
        with pytest.raises(AssertionError, match="found 2:"):
            await aassert_not_enqueued(session, distinct_id="user-42")
        await session.rollback()

    async with async_engine.connect() as connection:
        await outbox.aenqueue(connection, "core", "u")
        assert names(await aenqueued(connection)) == ["core"]
        await connection.rollback()


async def test_psycopg_async_connection(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as aconn:
        await outbox.aenqueue(aconn, "order_placed", "user-42")
        async with aconn.transaction():
            await outbox.aenqueue(aconn, "in_savepoint", "user-42")
        assert names(await aenqueued(aconn)) == ["order_placed", "in_savepoint"]
        await aassert_enqueued(aconn, "in_savepoint", count=1)
        await aconn.rollback()
        assert await aenqueued(aconn) == []


def test_a_psycopg_cursor_reads_on_its_connection(conn: psycopg.Connection[Any]) -> None:
    cursor = conn.cursor()
    outbox.enqueue(cursor, "order_placed", "u")
    cursor.execute("SELECT 41 + 1")

    assert names(enqueued(cursor)) == ["order_placed"]
    assert cursor.fetchone() == (42,)  # the cursor's own result is untouched


# --------------------------------------------------------------------------- refusals


async def test_the_wrong_kind_of_connection_names_the_right_call(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    with pytest.raises(outbox.UnsupportedConnectionError, match="is synchronous: use enqueued"):
        await aenqueued(conn)
    async with await psycopg.AsyncConnection.connect(database_url) as aconn:
        with pytest.raises(
            outbox.UnsupportedConnectionError, match="is asynchronous: use aenqueued"
        ):
            enqueued(aconn)  # type: ignore[arg-type]
    with pytest.raises(outbox.UnsupportedConnectionError, match=r"got builtins\.str; it reads on"):
        assert_enqueued(database_url)


def test_autocommit_outside_a_transaction_is_refused_unless_reading_all(
    database_url: str,
) -> None:
    with psycopg.connect(database_url, autocommit=True) as auto:
        outbox.enqueue(auto, "committed_at_once", "u")
        with pytest.raises(outbox.UnsupportedConnectionError, match="autocommit mode outside"):
            assert_enqueued(auto, "committed_at_once")
        assert_enqueued(auto, "committed_at_once", scope="all")
        with auto.transaction():
            outbox.enqueue(auto, "in_a_transaction", "u")
            assert names(enqueued(auto)) == ["in_a_transaction"]


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: enqueued(c, properties=["total"]), "properties"),
        (lambda c: enqueued(c, 42), "event"),
        (lambda c: enqueued(c, distinct_id=3.5), "distinct_id"),
        (lambda c: enqueued(c, scope="mine"), "scope"),
        (lambda c: assert_enqueued(c, "a", count=-1), "count"),
        (lambda c: assert_enqueued(c, "a", count=True), "count"),
    ],
)
def test_bad_input_names_the_field_and_keeps_the_transaction(
    conn: psycopg.Connection[Any], call: Any, field: str
) -> None:
    outbox.enqueue(conn, "kept", "u")
    with pytest.raises(outbox.OutboxValidationError) as refused:
        call(conn)
    assert refused.value.field == field
    assert names(enqueued(conn)) == ["kept"]


def test_missing_tables_and_rights_keep_the_callers_transaction(
    empty_database: str, database_url: str, db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(empty_database) as bare:
        bare.execute("CREATE TABLE orders (id int)")
        with pytest.raises(outbox.OutboxNotInstalledError):
            enqueued(bare)
        bare.execute("INSERT INTO orders VALUES (1)")  # the transaction is still usable
        bare.rollback()

    role = f"outbox_insert_only_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {role}")
    tables = ", ".join(f"outbox_events_{n}" for n in range(EVENT_TABLES))
    db.execute(f"GRANT INSERT ON {tables} TO {role}")  # what an application role has
    try:
        with psycopg.connect(database_url) as limited:
            limited.execute(f"SET LOCAL ROLE {role}")
            with pytest.raises(outbox.OutboxDatabaseError, match="GRANT SELECT ON outbox_events"):
                assert_enqueued(limited, "a")
            assert limited.execute("SELECT 1").fetchone() == (1,)
            limited.rollback()
    finally:
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")


def test_tables_of_an_earlier_version_are_reported(empty_database: str) -> None:
    migrate(empty_database, "0006")  # outbox_events is still the old engine's table
    with psycopg.connect(empty_database) as old:
        with pytest.raises(outbox.OutboxNotInstalledError, match="predate this version"):
            enqueued(old, scope="all")
        assert old.execute("SELECT 1").fetchone() == (1,)  # the transaction is still usable
        old.rollback()


def test_an_aborted_transaction_is_reported_not_hidden(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT 1 / 0")
    with pytest.raises(outbox.OutboxDatabaseError, match="current transaction is aborted"):
        enqueued(conn)


# --------------------------------------------------------------------------- deliver


def test_deliver_ships_committed_events_and_returns_what_the_server_accepted(
    database_url: str, capture: CaptureServer
) -> None:
    first = commit_one(database_url, "user_signed_up", "ada")
    second = commit_one(database_url, "order_placed", "ada")
    with psycopg.connect(database_url) as open_tx:
        outbox.enqueue(open_tx, "uncommitted", "ada")
        capture.enqueue_reply(Reply(status=503, times=2))  # retried until accepted

        events = deliver(database_url, capture, gzip=False)

        assert [e["uuid"] for e in events] == [str(first), str(second)]
        assert [e["event"] for e in events] == ["user_signed_up", "order_placed"]
        assert len(capture.flags_requests()) >= 1  # the real worker checked the key
        open_tx.rollback()
    with psycopg.connect(database_url) as check:
        assert check.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,)
    assert deliver(database_url, capture) == []  # nothing left: nothing more accepted


def test_deliver_waits_for_a_deferred_event(database_url: str, capture: CaptureServer) -> None:
    event_uuid = commit_one(database_url, "rate_limited")
    capture.enqueue_reply(Reply(status=429, retry_after=1))

    events = deliver(database_url, capture, timeout=10)

    assert [e["uuid"] for e in events] == [str(event_uuid)]


def test_deliver_gives_up_at_the_deadline_saying_what_is_pending(
    database_url: str, capture: CaptureServer
) -> None:
    commit_one(database_url, "never_accepted")
    capture.default_reply = Reply(status=503)

    with pytest.raises(NotDeliveredError) as failed:
        # deliver retries at once: its 24 attempts can all be used within the second
        # and the event goes dead (the next test's case). 1,000 attempts at least 5 ms
        # apart cannot be.
        deliver(
            database_url,
            capture,
            timeout=1,
            max_attempts=1000,
            backoff_base=0.01,
            backoff_max=0.01,
        )

    message = str(failed.value)
    assert message.startswith("1 event(s) still pending after 1s; the worker's last error")
    assert "503" in message
    assert failed.value.events == []


def test_deliver_reports_a_dead_event(database_url: str, capture: CaptureServer) -> None:
    commit_one(database_url, "good", "ada")
    commit_one(database_url, "malformed", "bob")
    capture.reject_events(lambda e: e["event"] == "malformed", status=400)

    with pytest.raises(NotDeliveredError, match=r"^1 event\(s\) went dead .*'malformed'") as failed:
        deliver(database_url, capture)

    assert [e["event"] for e in failed.value.events] == ["good"]


def test_deliver_reports_a_key_the_server_does_not_verify(
    database_url: str, capture: CaptureServer
) -> None:
    commit_one(database_url, "held")
    capture.project_keys = {"phc_right"}

    with pytest.raises(NotDeliveredError, match="did not verify the API key") as failed:
        deliver(database_url, capture, api_key="phc_wrong")

    assert "phc_wrong" not in str(failed.value)
    assert deliver(database_url, capture, api_key="phc_right")[0]["event"] == "held"


def test_deliver_reports_a_server_that_is_down(database_url: str, capture: CaptureServer) -> None:
    commit_one(database_url, "waiting")
    capture.stop()

    with pytest.raises(NotDeliveredError, match="could not be asked to verify the API key"):
        deliver(database_url, capture, timeout=2)


def test_deliver_without_outbox_tables_says_so(empty_database: str, capture: CaptureServer) -> None:
    with pytest.raises(outbox.OutboxNotInstalledError, match="outbox-worker migrate"):
        deliver(empty_database, capture)
    assert capture.requests == []


def test_deliver_refuses_a_bad_timeout(database_url: str, capture: CaptureServer) -> None:
    with pytest.raises(outbox.OutboxValidationError, match=r"^timeout: must be a number"):
        deliver(database_url, capture, timeout=0)


def test_deliver_takes_a_sqlalchemy_url(database_url: str, capture: CaptureServer) -> None:
    commit_one(database_url, "via_sqlalchemy_url")
    with create_engine(sqlalchemy_url(database_url)).connect() as c:
        assert c.execute(text("SELECT count(*) FROM outbox_events")).scalar() == 1
    assert [e["event"] for e in deliver(sqlalchemy_url(database_url), capture)] == [
        "via_sqlalchemy_url"
    ]


def test_the_reads_are_never_prepared(database_url: str) -> None:
    """Behind a transaction pooler a prepared statement breaks on the next server
    connection: the helpers' statements are never prepared, whatever the driver says."""
    with psycopg.connect(database_url, prepare_threshold=0) as eager:
        outbox.enqueue(eager, "a", "u")
        for _ in range(3):
            assert_enqueued(eager, "a")
            assert_not_enqueued(eager, "b")
        prepared = eager.execute("SELECT statement FROM pg_prepared_statements").fetchall()
        # The enqueue INSERT follows the connection (prepared here); the reads never.
        assert any(s.lstrip().startswith("INSERT INTO outbox_events_") for (s,) in prepared)
        assert not [s for (s,) in prepared if "outbox_events" in s and "INSERT" not in s]
        eager.rollback()
