"""The Django setups beyond a plain sync view (tests/django_project, the real
PostgreSQL): async views through Django's AsyncClient, Django's psycopg connection pool
(``OPTIONS["pool"]``), and test databases built without migrations
(``TEST["MIGRATE"] = False``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import outbox
from outbox.testing import enqueued
from tests.conftest import drop_database
from tests.integration import test_django
from tests.integration.test_django import HEAD, Rollback, events, manage, names, revision
from worker.database import with_database

pytest.importorskip("django", reason="Django is a test dependency: pip install -e '.[test]'")

from asgiref.sync import sync_to_async
from django.db import connection, connections, transaction

# The fixtures of test_django: Django set up with tests/django_project, its ``default``
# connection on this test's database.
django_project = test_django.django_project
django_db = test_django.django_db

ASYNC_REFUSAL = (
    "Django's connection cannot be used from async code (an async view): Django's "
    "transactions are sync-only, so write your rows and call outbox.enqueue() in one sync "
    "function under transaction.atomic() and await it through "
    "asgiref.sync.sync_to_async(...) (docs/django.md, Async views)"
)


# --- async views -----------------------------------------------------------------------


@pytest.fixture
async def async_django_db(django_db: Any) -> AsyncIterator[Any]:
    """``django_db``, with the connection of the thread that sync_to_async runs Django on
    closed before and after the test (it may still be on an earlier test's database)."""
    await sync_to_async(connections.close_all)()
    yield django_db
    await sync_to_async(connections.close_all)()


async def test_an_async_view_commits_the_order_and_its_event_together(
    async_django_db: Any, database_url: str
) -> None:
    from django.test import AsyncClient
    from shop.models import Order

    client = AsyncClient(raise_request_exception=False)
    ok = await client.post(
        "/async/orders/", {"user_id": "user-42", "total_cents": 1250}, "application/json"
    )
    assert ok.status_code == 201
    refused = await client.post(
        "/async/orders/", {"user_id": "user-43", "total_cents": 0}, "application/json"
    )
    assert refused.status_code == 500  # raised inside the atomic block: both rolled back
    order_id = ok.json()["order_id"]
    assert events(database_url) == [
        ("order_placed", "user-42", {"order_id": order_id, "total_cents": 1250})
    ]
    assert [o.user_id async for o in Order.objects.all()] == ["user-42"]


async def test_djangos_connection_in_async_code_is_one_clear_refusal(
    async_django_db: Any, database_url: str
) -> None:
    from django.test import AsyncClient

    with pytest.raises(outbox.UnsupportedConnectionError) as refused:
        await AsyncClient().post("/async/wrong/")
    assert str(refused.value) == ASYNC_REFUSAL
    guard = {"table": "workspace", "values": {"id": "w1"}, "conflict": ["id"], "event": "e"}
    for acall in (
        lambda: outbox.aenqueue(connection, "e", "u"),
        lambda: outbox.aenqueue(connections["default"], "e", "u"),
        lambda: outbox.aenqueue_many(connection, [{"event": "e", "distinct_id": "u"}]),
        lambda: outbox.aidentify(connection, "u", set={"plan": "pro"}),
        lambda: outbox.aupsert_first(connection, **guard, distinct_id="u"),
    ):
        with pytest.raises(outbox.UnsupportedConnectionError, match=r"^Django's connection cannot"):
            await acall()
    for call in (
        lambda: outbox.Posthog(connection).capture("e", distinct_id="u"),
        lambda: outbox.identify(connection, "u", set={"plan": "pro"}),
        lambda: outbox.upsert_first(connection, **guard, distinct_id="u"),
        lambda: enqueued(connection),
    ):
        with pytest.raises(outbox.UnsupportedConnectionError, match=r"^Django's connection cannot"):
            call()
    # AsyncPosthog refuses Django's connection when it is made, naming Posthog.
    with pytest.raises(outbox.UnsupportedConnectionError, match=r"use outbox\.Posthog\(\)"):
        outbox.AsyncPosthog(connection)
    assert events(database_url) == []

    # Django's connection is untouched: the pattern the message names still works.
    @sync_to_async
    def place() -> None:
        with transaction.atomic():
            outbox.enqueue(connection, "after_the_refusal", "u")

    await place()
    assert names(database_url) == ["after_the_refusal"]


async def test_enqueue_wrapped_alone_in_sync_to_async_commits_on_its_own(
    async_django_db: Any, database_url: str
) -> None:
    # The async ORM and a lone sync_to_async(enqueue) each run in autocommit: the order
    # and the event are two transactions, and an error after them undoes neither.
    from shop.models import Order

    with suppress(Rollback):
        await Order.objects.acreate(user_id="user-42", total_cents=1250)
        await sync_to_async(outbox.enqueue)(connection, "order_placed", "user-42")
        raise Rollback
    assert await Order.objects.acount() == 1
    assert names(database_url) == ["order_placed"]


# --- OPTIONS["pool"] -------------------------------------------------------------------


@pytest.fixture
def pooled_django_db(django_db: Any) -> Iterator[Any]:
    """Django's ``default`` connection with its psycopg pool on (Django 5.1+), psycopg
    told to prepare every statement it may (``prepare_threshold = 0``) and parameters
    bound on the server, so that any statement not sent with ``prepare=False`` is
    prepared: the outbox's INSERT is, as Django's own are."""
    import django

    if django.VERSION < (5, 1):
        pytest.skip(f"OPTIONS['pool'] needs Django 5.1 or later; Django {django.__version__}")
    pytest.importorskip("psycopg_pool", reason="Django's pool needs psycopg-pool")
    django_db.close()
    django_db.settings_dict["OPTIONS"].update(
        {"pool": {"min_size": 1, "max_size": 1}, "prepare_threshold": 0},
        server_side_binding=True,
    )
    yield django_db
    django_db.close()
    django_db.close_pool()


def prepared_statements(django_db: Any) -> list[str]:
    with django_db.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [statement for (statement,) in cursor.fetchall()]


def test_the_pool_commits_and_rolls_back_the_event_with_the_order(
    pooled_django_db: Any, database_url: str
) -> None:
    from django.test import Client
    from shop.models import Order

    with transaction.atomic():
        order = Order.objects.create(user_id="user-42", total_cents=1250)
        outbox.enqueue(pooled_django_db, "order_placed", "user-42", {"order_id": order.id})
        assert events(database_url) == []
        pooled = pooled_django_db.connection
        assert pooled._pool is pooled_django_db.pool  # a connection of Django's pool
    with suppress(Rollback), transaction.atomic():
        Order.objects.create(user_id="user-43", total_cents=700)
        outbox.enqueue(pooled_django_db, "rolled_back", "user-43")
        raise Rollback
    # Through views: each request takes a connection from the pool and gives it back.
    client = Client(raise_request_exception=False)
    for total in (300, 0, 400):
        body = {"user_id": "user-44", "total_cents": total}
        response = client.post("/orders/", body, content_type="application/json")
        assert response.status_code == (201 if total else 500)
    assert names(database_url) == ["order_placed", "order_placed", "order_placed"]
    assert sorted(Order.objects.values_list("total_cents", flat=True)) == [300, 400, 1250]

    # Django's own statements were prepared, and so was the outbox's INSERT: it follows
    # the connection's settings (Django's default, prepare_threshold None and
    # client-side binding, prepares neither).
    statements = prepared_statements(pooled_django_db)
    assert any("shop_order" in s for s in statements), statements
    assert any("INSERT INTO outbox_events_" in s for s in statements), statements


def test_djangos_default_connection_prepares_no_outbox_statement(django_db: Any) -> None:
    # Django connects with prepare_threshold None and client-side binding cursors: the
    # outbox's INSERT, which follows the connection, is never prepared there, so
    # Django's default works behind a transaction pooler as it is.
    from shop.models import Order

    with suppress(Rollback), transaction.atomic():
        for n in range(8):  # past psycopg's default threshold of 5
            Order.objects.create(user_id="user-42", total_cents=n)
            outbox.enqueue(django_db, "order_placed", "user-42", {"n": n})
            outbox.enqueue_many(django_db, [{"event": "item", "distinct_id": "user-42"}] * 3)
        assert django_db.connection.prepare_threshold is None
        assert prepared_statements(django_db) == []
        raise Rollback


# --- TEST["MIGRATE"] = False -----------------------------------------------------------


def test_a_database_without_the_tables_is_one_clear_line(
    django_db: Any, empty_database: str
) -> None:
    test_django._point_at("default", empty_database)
    with pytest.raises(outbox.OutboxNotInstalledError) as missing, transaction.atomic():
        outbox.enqueue(connection, "e", "u")
    assert str(missing.value) == (
        "The outbox tables do not exist in this database: run `outbox-worker migrate` "
        "first (in Django, `python manage.py migrate` with outbox.contrib.django in "
        "INSTALLED_APPS)."
    )
    assert isinstance(missing.value.__cause__, psycopg.errors.UndefinedTable)


@pytest.mark.parametrize(
    ("pool", "parallel"),
    [(False, False), (True, False), (False, True)],
    ids=["no-pool", "pool", "parallel"],
)
def test_a_test_database_built_without_migrations_gets_the_tables(
    server_url: str, empty_database: str, pool: bool, parallel: bool
) -> None:
    # TEST["MIGRATE"] = False: Django turns every app's migrations off and creates the
    # models' tables directly; the outbox app creates its tables then too, so the
    # project's tests (the view's event, the TransactionTestCase delivery) pass, also
    # in the clones of the test database that --parallel makes.
    test_db = "test_" + conninfo_to_dict(empty_database)["dbname"]
    env = {"SHOP_TEST_MIGRATE": "false", "SHOP_DB_POOL": "true" if pool else "false"}
    args = ["test", "shop", "-v", "2", "--noinput", "--keepdb"]
    if parallel:
        args += ["--parallel", "2"]
    try:
        result = manage(*args, database_url=empty_database, env=env)
        # The test database Django kept (--keepdb) has the newest tables.
        tables = revision(with_database(empty_database, test_db))
    finally:
        drop_database(server_url, test_db)
        for clone in (1, 2):
            drop_database(server_url, f"{test_db}_{clone}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Applying posthog_outbox" not in output
    assert tables == HEAD
    assert "Ran 6 tests" in output and "\nOK" in output, output
    if parallel:
        assert f"Preserving test database for alias 'default' ('{test_db}_2')" in output
    assert revision(empty_database) is None


def test_migrate_with_the_apps_migrations_turned_off_creates_the_tables(
    empty_database: str,
) -> None:
    # MIGRATION_MODULES = {"posthog_outbox": None}: no Django migration of the app runs,
    # and post_migrate creates the tables as the migration would.
    env = {"SHOP_OUTBOX_MIGRATIONS": "off"}
    result = manage("migrate", "-v", "2", database_url=empty_database, env=env)
    assert result.returncode == 0, result.stderr
    assert "Applying posthog_outbox" not in result.stdout
    assert "Applying shop.0001_initial... OK" in result.stdout
    assert revision(empty_database) == HEAD
