"""outbox.Posthog / AsyncPosthog, the async identity calls and the contexts, against a
real PostgreSQL with psycopg (sync and async) and SQLAlchemy (Session and AsyncSession).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

import outbox
from outbox import UnsupportedCallError, UnsupportedConnectionError
from worker.app import Worker
from worker.settings import Settings
from worker.testing import CaptureServer

Rows = list[tuple[str, str, dict[str, Any], str]]


def sa_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def rows(db: psycopg.Connection[Any]) -> Rows:
    """(event, distinct_id, properties without the standard stamps, uuid) in order."""
    standard = {"environment", "release", "event_schema_version", "$lib", "$lib_version"}
    result = db.execute(
        "SELECT event, distinct_id, properties, uuid::text FROM outbox_events ORDER BY uuid"
    )
    return [(e, d, {k: v for k, v in p.items() if k not in standard}, u) for e, d, p, u in result]


@contextmanager
def sync_conn(kind: str, url: str, *, commit: bool = True) -> Iterator[Any]:
    """A connection of ``kind`` in an open transaction, committed (or rolled back) at exit."""
    if kind == "psycopg":
        with psycopg.connect(url) as conn:
            yield conn
            if not commit:
                conn.rollback()
        return
    engine = create_engine(sa_url(url))
    try:
        with Session(engine) as session:
            yield session
            session.commit() if commit else session.rollback()
    finally:
        engine.dispose()


@asynccontextmanager
async def async_conn(kind: str, url: str, *, commit: bool = True) -> AsyncIterator[Any]:
    if kind == "psycopg":
        async with await psycopg.AsyncConnection.connect(url) as conn:
            yield conn
            if not commit:
                await conn.rollback()
        return
    engine = create_async_engine(sa_url(url))
    try:
        async with AsyncSession(engine) as session:
            yield session
            await (session.commit() if commit else session.rollback())
    finally:
        await engine.dispose()


KINDS = ["psycopg", "sqlalchemy"]


def every_method(client: Any) -> list[Any]:
    """Each posthog-python writing method once; returns what each returned (or the
    awaitables, for the async client)."""
    try:
        raise LookupError("cart-9 is gone")
    except LookupError as exc:
        caught = exc
    return [
        client.capture("order_placed", distinct_id="user-42", properties={"total": 12}),
        client.set(distinct_id="user-42", properties={"plan": "team"}),
        client.set_once(distinct_id="user-42", properties={"first_seen": "2026-12-01"}),
        client.group_identify("organization", "org-7", {"name": "Acme"}, distinct_id="user-42"),
        client.alias("legacy-1007", "user-42"),
        client.capture_exception(caught, distinct_id="user-42", properties={"where": "cart"}),
    ]


def check_every_method(returned: list[Any], db: psycopg.Connection[Any]) -> None:
    written = rows(db)
    assert [(e, d) for e, d, _, _ in written] == [
        ("order_placed", "user-42"),
        ("$set", "user-42"),
        ("$set_once", "user-42"),
        ("$groupidentify", "user-42"),
        ("$create_alias", "legacy-1007"),
        ("$exception", "user-42"),
    ]
    # The event's uuid as a str, as posthog-python returns it.
    assert all(isinstance(r, str) for r in returned)
    assert returned == [u for _, _, _, u in written]
    props = [p for _, _, p, _ in written]
    assert props[0] == {"total": 12}
    assert props[1] == {"$set": {"plan": "team"}}
    assert props[2] == {"$set_once": {"first_seen": "2026-12-01"}}
    assert props[3] == {
        "$group_type": "organization",
        "$group_key": "org-7",
        "$group_set": {"name": "Acme"},
    }
    assert props[4] == {"distinct_id": "legacy-1007", "alias": "user-42"}
    assert props[5]["$exception_type"] == "LookupError"
    assert props[5]["$exception_message"] == "cart-9 is gone"
    assert props[5]["where"] == "cart"


@pytest.mark.parametrize("kind", KINDS)
def test_every_method_writes_in_the_callers_transaction(
    kind: str, database_url: str, db: psycopg.Connection[Any]
) -> None:
    with sync_conn(kind, database_url) as conn:
        returned = every_method(outbox.Posthog(conn))
        assert rows(db) == []  # not committed by the client
    check_every_method(returned, db)


@pytest.mark.parametrize("kind", KINDS)
async def test_every_method_of_the_async_client(
    kind: str, database_url: str, db: psycopg.Connection[Any]
) -> None:
    async with async_conn(kind, database_url) as conn:
        returned = [await pending for pending in every_method(outbox.AsyncPosthog(conn))]
        assert rows(db) == []
    check_every_method(returned, db)


@pytest.mark.parametrize("kind", KINDS)
def test_a_rollback_drops_the_clients_events(
    kind: str, database_url: str, db: psycopg.Connection[Any]
) -> None:
    with sync_conn(kind, database_url, commit=False) as conn:
        every_method(outbox.Posthog(conn))
    assert rows(db) == []


@pytest.mark.parametrize("kind", KINDS)
async def test_a_rollback_drops_the_async_clients_events(
    kind: str, database_url: str, db: psycopg.Connection[Any]
) -> None:
    async with async_conn(kind, database_url, commit=False) as conn:
        for pending in every_method(outbox.AsyncPosthog(conn)):
            await pending
    assert rows(db) == []


@pytest.mark.parametrize("kind", KINDS)
async def test_the_async_identity_calls(
    kind: str, database_url: str, db: psycopg.Connection[Any]
) -> None:
    bot = outbox.automation_actor("a-17", name="Nightly triage", owner_id="user-42")
    async with async_conn(kind, database_url) as conn:
        returned = [
            await outbox.aidentify(conn, "user-42", email="ada@example.com", name="Ada"),
            await outbox.aidentify_actor(conn, bot),
            await outbox.aset_person_properties(conn, "user-42", set={"plan": "team"}),
            await outbox.agroup_identify(conn, "organization", "org-7", {"name": "Acme"}),
            await outbox.aalias(conn, "legacy-1007", "user-42"),
        ]
    written = rows(db)
    assert [(e, d) for e, d, _, _ in written] == [
        ("$identify", "user-42"),
        ("$identify", bot.distinct_id),
        ("$set", "user-42"),
        ("$groupidentify", "$organization_org-7"),
        ("$create_alias", "legacy-1007"),
    ]
    assert returned == [uuid.UUID(u) for _, _, _, u in written]
    assert written[0][2]["$set_once"] == {"email": "ada@example.com"}
    assert written[1][2]["$set"]["name"] == "Nightly triage"


async def test_the_async_identity_calls_roll_back(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    async with async_conn("sqlalchemy", database_url, commit=False) as session:
        await outbox.aidentify(session, "user-42", email="ada@example.com")
        await outbox.aalias(session, "legacy-1007", "user-42")
    assert rows(db) == []


# -- wrong connection kinds: every writer names the call to use -------------------------


def sync_writers() -> list[tuple[str, str, Callable[[Any], object]]]:
    """(the call, the one its message must name instead, a call of it)."""
    ws = outbox.workspace_actor("w-1")

    def batched(conn: Any) -> None:
        with outbox.batch(conn) as events:
            events.enqueue("e", "u")

    return [
        ("enqueue()", "aenqueue()", lambda c: outbox.enqueue(c, "e", "u")),
        ("enqueue_many()", "aenqueue_many()", lambda c: outbox.enqueue_many(c, [_ITEM])),
        ("identify()", "aidentify()", lambda c: outbox.identify(c, "u", email="a@b.co")),
        ("identify_actor()", "aidentify_actor()", lambda c: outbox.identify_actor(c, ws)),
        (
            "set_person_properties()",
            "aset_person_properties()",
            lambda c: outbox.set_person_properties(c, "u", set={"a": 1}),
        ),
        ("group_identify()", "agroup_identify()", lambda c: outbox.group_identify(c, "o", "k")),
        ("alias()", "aalias()", lambda c: outbox.alias(c, "a", "b")),
        ("`with outbox.batch(conn)`", "`async with outbox.batch(conn)`", batched),
        ("outbox.Posthog()", "outbox.AsyncPosthog()", outbox.Posthog),
    ]


def async_writers() -> list[tuple[str, str, Callable[[Any], Awaitable[object]]]]:
    ws = outbox.workspace_actor("w-1")

    async def batched(conn: Any) -> None:
        async with outbox.batch(conn) as events:
            events.enqueue("e", "u")

    async def client(conn: Any) -> None:
        outbox.AsyncPosthog(conn)

    return [
        ("aenqueue()", "enqueue()", lambda c: outbox.aenqueue(c, "e", "u")),
        ("aenqueue_many()", "enqueue_many()", lambda c: outbox.aenqueue_many(c, [_ITEM])),
        ("aidentify()", "identify()", lambda c: outbox.aidentify(c, "u", email="a@b.co")),
        ("aidentify_actor()", "identify_actor()", lambda c: outbox.aidentify_actor(c, ws)),
        (
            "aset_person_properties()",
            "set_person_properties()",
            lambda c: outbox.aset_person_properties(c, "u", set={"a": 1}),
        ),
        ("agroup_identify()", "group_identify()", lambda c: outbox.agroup_identify(c, "o", "k")),
        ("aalias()", "alias()", lambda c: outbox.aalias(c, "a", "b")),
        ("`async with outbox.batch(conn)`", "`with outbox.batch(conn)`", batched),
        ("outbox.AsyncPosthog()", "outbox.Posthog()", client),
    ]


_ITEM = {"event": "e", "distinct_id": "u"}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_sync_writer_on_an_async_connection_names_its_async_form(
    kind: str, database_url: str
) -> None:
    async with async_conn(kind, database_url) as conn:
        for call, instead, write in sync_writers():
            with pytest.raises(UnsupportedConnectionError) as caught:
                write(conn)
            message = str(caught.value)
            assert message.startswith(f"{call} got "), message
            assert message.endswith(f"(use {instead} for async connections)"), message
        with pytest.raises(UnsupportedConnectionError, match=r"use aupsert_first"):
            outbox.upsert_first(conn, "t", {"a": 1}, conflict=["a"], event="e", distinct_id="u")


@pytest.mark.parametrize("kind", KINDS)
async def test_an_async_writer_on_a_sync_connection_names_its_sync_form(
    kind: str, database_url: str
) -> None:
    with sync_conn(kind, database_url) as conn:
        for call, instead, write in async_writers():
            with pytest.raises(UnsupportedConnectionError) as caught:
                await write(conn)
            message = str(caught.value)
            assert message.startswith(f"{call} got "), message
            assert message.endswith(f"(use {instead} for sync connections)"), message


async def test_a_method_of_the_client_names_the_other_clients_method(
    database_url: str,
) -> None:
    # A client whose connection is swapped for the other kind after construction
    # (the constructor refuses it otherwise): the method's own message.
    async with async_conn("psycopg", database_url) as aconn:
        with sync_conn("psycopg", database_url) as conn:
            client = outbox.Posthog(conn)
            client.conn = aconn
            with pytest.raises(UnsupportedConnectionError) as caught:
                client.set(distinct_id="u", properties={"a": 1})
    assert str(caught.value).startswith("Posthog.set() got psycopg.AsyncConnection;")
    assert str(caught.value).endswith("(use AsyncPosthog.set() for async connections)")


# -- refused calls leave the transaction usable ------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_old_argument_order_is_refused_and_the_transaction_still_commits(
    kind: str, database_url: str, db: psycopg.Connection[Any]
) -> None:
    with sync_conn(kind, database_url) as conn:
        client = outbox.Posthog(conn)
        with pytest.raises(UnsupportedCallError, match=r"capture\(event, distinct_id="):
            client.capture("user-42", "signed_up")  # type: ignore[misc]
        with pytest.raises(UnsupportedCallError, match="feature-flag"):
            client.feature_enabled("new-checkout", "user-42")
        client.capture("signed_up", distinct_id="user-42")
    assert [(e, d) for e, d, _, _ in rows(db)] == [("signed_up", "user-42")]


# -- person-less captures and GeoIP, as the worker ships them -----------------------------


def test_person_less_capture_and_disable_geoip_reach_posthog_as_posthog_python_sends_them(
    database_url: str, capture: CaptureServer, settings_for: Callable[..., Settings]
) -> None:
    with sync_conn("psycopg", database_url) as conn:
        client = outbox.Posthog(conn)
        anonymous = client.capture("page_rendered")
        located = client.capture("login", distinct_id="u", properties={"$ip": "203.0.113.7"})
        unlocated = client.capture(
            "login", distinct_id="u", properties={"$ip": "203.0.113.7"}, disable_geoip=True
        )
    Worker(settings_for(posthog_api_key="phc_test", posthog_host=capture.url)).run_until_empty()
    sent = {e["uuid"]: e for e in capture.events}
    assert sent[anonymous]["properties"]["$process_person_profile"] is False
    uuid.UUID(sent[anonymous]["distinct_id"])  # a generated id
    assert "$geoip_disable" not in sent[located]["properties"]  # located by the user's $ip
    assert sent[unlocated]["properties"]["$geoip_disable"] is True


# -- contexts across threads and tasks ----------------------------------------------------


def test_contexts_in_threads_attribute_each_threads_events(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def request(user: str) -> None:
        try:
            with outbox.new_context(), psycopg.connect(database_url) as conn:
                outbox.identify_context(user)
                outbox.tag("request_user", user)
                barrier.wait(timeout=20)  # every context is open at once
                outbox.Posthog(conn).capture("page_viewed")
                outbox.enqueue(conn, "api_called", None)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(f"user-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    written = rows(db)
    assert len(written) == 8
    for event, distinct_id, props, _ in written:
        assert event in ("page_viewed", "api_called")
        assert props == {"request_user": distinct_id, "$context_tags": ["request_user"]}


async def test_contexts_in_tasks_attribute_each_tasks_events(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    engine = create_async_engine(sa_url(database_url))
    sessions = async_sessionmaker(engine)
    started = asyncio.Barrier(3)

    @outbox.scoped()
    async def request(user: str) -> None:
        outbox.identify_context(user)
        outbox.tag("request_user", user)
        await started.wait()  # every task's context is set before any writes
        async with sessions() as session, session.begin():
            await outbox.AsyncPosthog(session).capture("page_viewed")
            await outbox.aenqueue(session, "api_called", None)

    try:
        with outbox.new_context():
            outbox.tag("deploy", "d-1")
            await asyncio.gather(*(request(f"user-{i}") for i in range(3)))
            assert outbox.get_tags() == {"deploy": "d-1"}  # the tasks' tags stayed theirs
    finally:
        await engine.dispose()
    written = rows(db)
    assert len(written) == 6
    for _, distinct_id, props, _ in written:
        assert props == {
            "deploy": "d-1",
            "request_user": distinct_id,
            "$context_tags": ["deploy", "request_user"],
        }


# -- an async FastAPI-style application ----------------------------------------------------


SIGNUP_TABLES = """
CREATE TABLE app_user (id text PRIMARY KEY, email text NOT NULL, org_id text NOT NULL);
"""


class App:
    """A minimal asyncio web application in the shape FastAPI gives one: a session per
    request (a dependency), a middleware that opens a context for the request, and
    async handlers that write their rows and their analytics in one transaction."""

    def __init__(self, url: str) -> None:
        self.engine = create_async_engine(sa_url(url))
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def handle(
        self,
        handler: Callable[..., Awaitable[dict[str, Any]]],
        headers: dict[str, str],
        **body: Any,
    ) -> tuple[int, dict[str, Any]]:
        with outbox.new_context(fresh=True):  # the middleware
            if "x-user" in headers:
                outbox.identify_context(headers["x-user"])
            outbox.tag("request_id", headers["x-request-id"])
            try:
                async with self.sessions() as session, session.begin():  # the dependency
                    return 200, await handler(session, **body)
            except ValueError as exc:
                return 400, {"detail": str(exc)}

    async def signup(
        self, session: AsyncSession, *, user_id: str, email: str, org_id: str, anon_id: str
    ) -> dict[str, Any]:
        await session.execute(
            text("INSERT INTO app_user (id, email, org_id) VALUES (:id, :email, :org)"),
            {"id": user_id, "email": email, "org": org_id},
        )
        if email.endswith("@invalid.example"):
            raise ValueError("email domain refused")  # after the writes: all roll back
        posthog = outbox.AsyncPosthog(session)
        await outbox.aidentify(session, user_id, email=email)
        await outbox.agroup_identify(session, "organization", org_id, {"plan": "trial"})
        await posthog.alias(anon_id, user_id)
        await posthog.capture("signed_up", distinct_id=user_id, groups={"organization": org_id})
        return {"id": user_id}

    async def rename_org(self, session: AsyncSession, *, org_id: str, name: str) -> dict[str, Any]:
        uid = await outbox.AsyncPosthog(session).group_identify(
            "organization", org_id, {"name": name}
        )  # by the requesting user, from the context
        return {"event": uid}


async def test_an_async_app_identifies_groups_and_aliases_its_users(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    db.execute(SIGNUP_TABLES)
    app = App(database_url)
    try:
        answers = await asyncio.gather(
            *(
                app.handle(
                    app.signup,
                    {"x-request-id": f"r-{i}"},
                    user_id=f"user-{i}",
                    email=f"u{i}@example.com",
                    org_id=f"org-{i % 2}",
                    anon_id=f"anon-{i}",
                )
                for i in range(4)
            ),
            app.handle(
                app.signup,
                {"x-request-id": "r-bad"},
                user_id="user-bad",
                email="x@invalid.example",
                org_id="org-0",
                anon_id="anon-bad",
            ),
        )
        renamed = await app.handle(
            app.rename_org, {"x-request-id": "r-9", "x-user": "user-1"}, org_id="org-1", name="Acme"
        )
    finally:
        await app.engine.dispose()
    assert [status for status, _ in answers] == [200, 200, 200, 200, 400]
    assert renamed[0] == 200
    users = [r[0] for r in db.execute("SELECT id FROM app_user ORDER BY id")]
    assert users == ["user-0", "user-1", "user-2", "user-3"]  # the refused signup rolled back
    written = rows(db)
    assert not [r for r in written if "bad" in r[1] or r[2].get("request_id") == "r-bad"]
    by_request: dict[str, list[tuple[str, str]]] = {}
    for event, distinct_id, props, _ in written:
        by_request.setdefault(props["request_id"], []).append((event, distinct_id))
    for i in range(4):
        assert by_request[f"r-{i}"] == [
            ("$identify", f"user-{i}"),
            ("$groupidentify", f"$organization_org-{i % 2}"),
            ("$create_alias", f"anon-{i}"),
            ("signed_up", f"user-{i}"),
        ]
    assert by_request["r-9"] == [("$groupidentify", "user-1")]
    [rename] = [r for r in written if r[2]["request_id"] == "r-9"]
    assert rename[3] == renamed[1]["event"]
    assert rename[2]["$group_set"] == {"name": "Acme"}
