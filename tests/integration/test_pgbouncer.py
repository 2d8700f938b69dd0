"""Through a real PgBouncer in transaction pooling mode (tests/pgbouncer.py).

With psycopg's defaults (``prepare_threshold=5``) a statement a connection has run
five times is prepared on the server session it happens to hold; behind a transaction
pooler the next transaction runs on another session, where that statement is missing
or another one has its name (PgBouncer 1.18, Debian 12's, cannot carry prepared
statements; 1.21 and later can, with ``max_prepared_statements``). The outbox's
event statements are prepared exactly when the connection would prepare one of the
application's own, so the rule is the application's: connect with
``prepare_threshold=None``. Then applications (psycopg and SQLAlchemy, sync and
async) enqueue, batch and run first-time guards many times over through PgBouncer
without a single error; with psycopg's default the outbox statement fails as the
application's own does, with an error that says what to set. A worker in pooler mode
drains through it, each event exactly once.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import outbox
from tests.conftest import capture_requests, wait_for
from tests.pgbouncer import bounced_url, pgbouncer  # noqa: F401 (fixtures)
from worker.app import Worker
from worker.database import connect, sqlalchemy_url
from worker.settings import Settings
from worker.sinks import MemorySink
from worker.testing import CaptureServer
from worker.testing.pgbouncer import PgBouncer

# The module, not the function ``outbox.enqueue`` that shadows it.
enqueue_module = importlib.import_module("outbox.enqueue")

#: Concurrent application connections: more than PgBouncer's server pool
#: (tests.pgbouncer.POOL_SIZE), so they keep trading server sessions.
CLIENTS = 6
#: Transactions per connection: each outbox statement runs this many times on one
#: connection, well past psycopg's default prepare_threshold of 5 (and, over the four
#: driver tests, 2,160 application transactions).
ROUNDS = 90
#: Events each transaction enqueues: enqueue (1), enqueue_many (2), outbox.batch (2).
PER_TRANSACTION = 5
#: Keys each client's first-time guard cycles through: one event for each, the first time.
FIRST_TIMES = 3

EXPECTED = CLIENTS * (ROUNDS * PER_TRANSACTION + FIRST_TIMES)


@pytest.fixture
def accounts(database_url: str) -> None:
    """The application's own table, for the first-time guard."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id text PRIMARY KEY, seen integer NOT NULL)")


def stored_uuids(database_url: str) -> set[uuid.UUID]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return {row[0] for row in conn.execute("SELECT uuid FROM outbox_events")}


def _sync_transaction(conn: Any, client: int, n: int) -> list[Any]:
    """One application transaction's outbox calls on ``conn``; the uuids written."""
    written: list[Any] = [outbox.enqueue(conn, "order_placed", f"user-{client}", {"n": n})]
    written += outbox.enqueue_many(
        conn,
        [
            {"event": "item_added", "distinct_id": f"user-{client}", "properties": {"n": n}},
            {"event": "item_added", "distinct_id": f"user-{client}", "dedup_key": f"{client}-{n}"},
        ],
    )
    first = outbox.upsert_first(
        conn,
        "accounts",
        {"id": f"{client}-{n % FIRST_TIMES}", "seen": n},
        conflict=["id"],
        update=["seen"],
        event="account_created",
        distinct_id=lambda row: f"user-{client}",
    )
    written += first.event_uuids
    with outbox.batch(conn) as events:
        events.enqueue("step", f"user-{client}", {"n": n})
        events.enqueue("step", f"user-{client}", {"n": n, "last": True})
    return written + events.results


async def _async_transaction(conn: Any, client: int, n: int) -> list[Any]:
    """:func:`_sync_transaction` with the async calls."""
    written: list[Any] = [await outbox.aenqueue(conn, "order_placed", f"user-{client}", {"n": n})]
    written += await outbox.aenqueue_many(
        conn,
        [
            {"event": "item_added", "distinct_id": f"user-{client}", "properties": {"n": n}},
            {"event": "item_added", "distinct_id": f"user-{client}", "dedup_key": f"{client}-{n}"},
        ],
    )
    first = await outbox.aupsert_first(
        conn,
        "accounts",
        {"id": f"{client}-{n % FIRST_TIMES}", "seen": n},
        conflict=["id"],
        update=["seen"],
        event="account_created",
        distinct_id=lambda row: f"user-{client}",
    )
    written += first.event_uuids
    async with outbox.batch(conn) as events:
        events.enqueue("step", f"user-{client}", {"n": n})
        events.enqueue("step", f"user-{client}", {"n": n, "last": True})
    return written + events.results


def _run_threads(client: Callable[[int], list[Any]]) -> tuple[list[Any], list[BaseException]]:
    written: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        try:
            mine = client(index)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                written.extend(mine)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return written, errors


def _check(database_url: str, written: list[Any], errors: list[BaseException]) -> None:
    assert errors == [], [f"{type(e).__name__}: {e}" for e in errors]
    uuids = [u for u in written if u is not None]
    assert len(uuids) == EXPECTED
    assert stored_uuids(database_url) == set(uuids)


def test_the_rig_breaks_a_default_connections_own_prepared_statement(
    pgbouncer: PgBouncer,  # noqa: F811
    database_url: str,
) -> None:
    # The control: through this PgBouncer, psycopg's defaults do break a statement the
    # library does not own. So the zero errors below are the library's doing.
    url = pgbouncer.url(database_url)
    with psycopg.connect(url) as app, psycopg.connect(url) as other:
        for i in range(8):  # past prepare_threshold: prepared on this server session
            app.execute("SELECT %s::int AS n", (i,))
        app.commit()
        other.execute("SELECT 1")  # takes that session (the pool reuses it first)...
        with pytest.raises(psycopg.errors.InvalidSqlStatementName, match="does not exist"):
            app.execute("SELECT %s::int AS n", (9,))  # ...so this runs on another one
        other.rollback()


def test_with_psycopgs_default_threshold_the_outbox_statement_breaks_as_the_apps_own(
    pgbouncer: PgBouncer,  # noqa: F811
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same rig as above, with enqueue() in the place of the application's own
    # statement: its INSERT is prepared from the sixth run, like any other, and breaks
    # the same way; the error is one line that says what to set.
    clock = SimpleNamespace(time=lambda: 1_700_000_000.0, monotonic=time.monotonic)
    monkeypatch.setattr(enqueue_module, "time", clock)  # one event table: one statement
    url = pgbouncer.url(database_url)
    with psycopg.connect(url) as app, psycopg.connect(url) as other:
        assert app.prepare_threshold == 5  # psycopg's default, untouched
        for _ in range(8):
            outbox.enqueue(app, "order_placed", "user-1")
        app.commit()
        other.execute("SELECT 1")  # takes that server session...
        with pytest.raises(outbox.OutboxDatabaseError) as broken:
            outbox.enqueue(app, "order_placed", "user-1")  # ...so this runs on another one
        other.rollback()
    message = str(broken.value)
    assert "does not exist" in message and "prepare_threshold=None" in message
    assert "\n" not in message


@pytest.mark.usefixtures("accounts")
def test_psycopg_sync_without_prepared_statements(
    bounced_url: str,  # noqa: F811
    database_url: str,
) -> None:
    def client(index: int) -> list[Any]:
        written: list[Any] = []
        with psycopg.connect(bounced_url, prepare_threshold=None) as conn:
            for n in range(ROUNDS):
                written += _sync_transaction(conn, index, n)
                conn.commit()
        return written

    _check(database_url, *_run_threads(client))


@pytest.mark.usefixtures("accounts")
def test_sqlalchemy_sync_without_prepared_statements(
    bounced_url: str,  # noqa: F811
    database_url: str,
) -> None:
    engine = create_engine(
        sqlalchemy_url(bounced_url),
        pool_size=CLIENTS,
        connect_args={"prepare_threshold": None},
    )

    def client(index: int) -> list[Any]:
        written: list[Any] = []
        for n in range(ROUNDS):
            with Session(engine) as session, session.begin():
                written += _sync_transaction(session, index, n)
        return written

    try:
        _check(database_url, *_run_threads(client))
    finally:
        engine.dispose()


@pytest.mark.usefixtures("accounts")
async def test_psycopg_async_without_prepared_statements(
    bounced_url: str,  # noqa: F811
    database_url: str,
) -> None:
    async def client(index: int) -> list[Any]:
        written: list[Any] = []
        async with await psycopg.AsyncConnection.connect(
            bounced_url, prepare_threshold=None
        ) as conn:
            for n in range(ROUNDS):
                written += await _async_transaction(conn, index, n)
                await conn.commit()
        return written

    results = await asyncio.gather(*(client(i) for i in range(CLIENTS)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    written = [u for r in results if not isinstance(r, BaseException) for u in r]
    _check(database_url, written, errors)


@pytest.mark.usefixtures("accounts")
async def test_sqlalchemy_async_without_prepared_statements(
    bounced_url: str,  # noqa: F811
    database_url: str,
) -> None:
    engine = create_async_engine(
        sqlalchemy_url(bounced_url),
        pool_size=CLIENTS,
        connect_args={"prepare_threshold": None},
    )

    async def client(index: int) -> list[Any]:
        written: list[Any] = []
        for n in range(ROUNDS):
            async with AsyncSession(engine) as session, session.begin():
                written += await _async_transaction(session, index, n)
        return written

    try:
        results = await asyncio.gather(*(client(i) for i in range(CLIENTS)), return_exceptions=True)
    finally:
        await engine.dispose()
    errors = [r for r in results if isinstance(r, BaseException)]
    written = [u for r in results if not isinstance(r, BaseException) for u in r]
    _check(database_url, written, errors)


def test_pooler_mode_connects_without_prepared_statements(
    bounced_url: str,  # noqa: F811
) -> None:
    with connect(bounced_url, pooler="transaction") as conn:
        assert conn.prepare_threshold is None
    with connect(bounced_url) as conn:
        assert conn.prepare_threshold == 5


def test_a_worker_in_pooler_mode_drains_through_pgbouncer_exactly_once(
    bounced_url: str,  # noqa: F811
    database_url: str,
    settings_for: Callable[..., Settings],
    capture: CaptureServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="outbox")
    settings = settings_for(
        database_url=bounced_url,
        pooler="transaction",
        poll_interval=None,  # the pooler mode's default
        batch_size=25,
        posthog_api_key="phc_test",
        posthog_host=capture.url,
        gzip=False,
    )
    assert not settings.listen
    assert settings.poll_seconds == 0.1
    worker = Worker(settings)
    worker.start()
    total = 0
    try:
        # Producers through PgBouncer too, in rounds, so the worker claims and acks
        # many times over (past any prepare threshold) while the server sessions are
        # shared with the application's.
        with psycopg.connect(bounced_url, prepare_threshold=None) as conn:
            for round_ in range(12):
                outbox.enqueue_many(
                    conn,
                    [
                        {"event": "e", "distinct_id": f"u{round_}", "properties": {"i": i}}
                        for i in range(30)
                    ],
                )
                outbox.enqueue(conn, "e", f"u{round_}")
                conn.commit()
                total += 31
                wait_for(
                    lambda t=total: len(capture.uuids()) >= t,
                    timeout=30,
                    what=f"{total} events delivered",
                )
        assert wait_for(lambda: not stored_uuids(database_url), what="an empty outbox")
    finally:
        worker.stop()
    counts = Counter(capture.uuids())
    assert len(counts) == total
    assert set(counts.values()) == {1}, "an event was delivered more than once"
    assert capture_requests(capture)
    problems = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("outbox")
        and (r.levelno >= logging.WARNING or "prepared statement" in r.getMessage())
    ]
    assert problems == []


def test_notify_on_behind_a_pooler_is_ignored_with_a_warning(
    bounced_url: str,  # noqa: F811
    settings_for: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def actions_of(**overrides: Any) -> list[Any]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="outbox"):
            worker = Worker(
                settings_for(database_url=bounced_url, pooler="transaction", **overrides)
            )
        try:
            assert worker._listener is None
        finally:
            worker.close()
        return [getattr(r, "action", None) for r in caplog.records]

    assert "notify_ignored_behind_pooler" in actions_of(notify=True)
    assert "notify_ignored_behind_pooler" not in actions_of()  # unset: off, no warning
    assert "notify_ignored_behind_pooler" not in actions_of(notify=False)


def test_an_idle_worker_behind_a_pooler_polls_once_per_interval_without_reading_a_batch(
    bounced_url: str,  # noqa: F811
    settings_for: Callable[..., Settings],
) -> None:
    from worker.storage import snapshot_sql

    sent: list[str] = []

    class Recording(psycopg.Cursor[Any]):
        def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
            sent.append(str(query))
            return super().execute(query, *args, **kwargs)

    worker = Worker(
        settings_for(database_url=bounced_url, pooler="transaction", poll_interval=None),
        sink=MemorySink(),
    )
    worker.start()
    try:
        conn = wait_for(lambda: worker.store._conn, what="the worker's batch connection")
        conn.cursor_factory = Recording
        wait_for(lambda: snapshot_sql.CLAIM_RETRIES in sent, what="a first idle poll")
        started = time.monotonic()
        first = sent.count(snapshot_sql.CLAIM_RETRIES)
        wait_for(
            lambda: sent.count(snapshot_sql.CLAIM_RETRIES) >= first + 10, what="ten idle polls"
        )
        # Ten polls 0.1 s apart take at least 0.9 s. A poll that lingered, looking
        # again every 20 ms, would make ten in a fifth of that.
        assert time.monotonic() - started >= 0.85
        # Each poll asks for due retries and a batch (ticking when none waits):
        # nothing was committed, so no batch is made and none is read.
        assert not [q for q in sent if "FROM outbox_events_" in q]
        polls = sent.count(snapshot_sql.CLAIM_RETRIES)
        assert sent.count(snapshot_sql.TICK) <= polls
    finally:
        worker.stop()
