"""A real Django project (tests/django_project) writing events with Django's own
connection: commit, rollback, savepoints, cursors, a connection Django has not opened
yet, the batch, the first-time guards and the identity calls; and the app's migration,
which gives ``manage.py migrate`` and Django's test databases the outbox tables.

Django runs in this process (settings from the project, the ``default`` database
pointed at each test's own database), and in subprocesses for ``manage.py migrate``
and ``manage.py test`` (Django's own test runner).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any
from unittest import mock

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import outbox
from outbox import install
from tests.conftest import STAMP, create_database, drop_database

pytest.importorskip("django", reason="Django is a test dependency: pip install -e '.[test]'")

from django.db import connection, connections, transaction

PROJECT = Path(__file__).resolve().parents[1] / "django_project"
#: The newest outbox migration.
HEAD = install.head()


@pytest.fixture(scope="module")
def django_project(server_url: str) -> Iterator[None]:
    """Django set up in this process with the project's settings (once)."""
    import django
    from django.conf import settings

    if not settings.configured:
        sys.path.insert(0, str(PROJECT))
        env = {"DJANGO_SETTINGS_MODULE": "project.settings", "DATABASE_URL": server_url}
        with mock.patch.dict(os.environ, env):
            django.setup()
    yield
    connections.close_all()


def _point_at(alias: str, url: str) -> None:
    """Make Django's ``alias`` connection reach ``url``'s database from now on."""
    from project.settings import database

    connections[alias].close()
    connections[alias].settings_dict.update(database(url))


@pytest.fixture
def django_db(django_project: None, database_url: str) -> Iterator[Any]:
    """Django's ``default`` connection on this test's database (its outbox tables made by
    the template, the shop's by ``migrate``), not connected yet."""
    from django.core.management import call_command

    _point_at("default", database_url)
    call_command("migrate", verbosity=0)
    connection.close()
    yield connection
    connections.close_all()


class Rollback(Exception):
    """Raised inside an atomic block to roll it back."""


def events(url: str) -> list[tuple[str, str, dict[str, Any]]]:
    """The committed events, as another connection sees them (without the stamp)."""
    with psycopg.connect(url, autocommit=True) as conn:
        return [
            (e, d, {k: v for k, v in p.items() if k not in STAMP})
            for e, d, p in conn.execute(
                "SELECT event, distinct_id, properties FROM outbox_events ORDER BY uuid"
            )
        ]


def names(url: str) -> list[str]:
    return [e for e, _, _ in events(url)]


def test_an_event_commits_with_the_atomic_block(django_db: Any, database_url: str) -> None:
    from shop.models import Order

    with transaction.atomic():
        order = Order.objects.create(user_id="user-42", total_cents=1250)
        # Django's connection binds parameters on the client: a % in a value stays one.
        outbox.enqueue(django_db, "order_placed", "user-42", {"order_id": order.id, "off": "10%"})
        # Written in the transaction, so not there for anyone else yet; nothing waits
        # for on_commit.
        assert events(database_url) == []
        assert django_db.run_on_commit == []
    assert events(database_url) == [
        ("order_placed", "user-42", {"order_id": order.id, "off": "10%"})
    ]


def test_an_event_rolls_back_with_the_atomic_block(django_db: Any, database_url: str) -> None:
    from shop.models import Order

    with suppress(Rollback), transaction.atomic():
        Order.objects.create(user_id="user-42", total_cents=1250)
        outbox.enqueue(django_db, "order_placed", "user-42")
        raise Rollback
    assert events(database_url) == []
    assert not Order.objects.exists()


def test_an_inner_rollback_drops_only_the_inner_event(django_db: Any, database_url: str) -> None:
    with transaction.atomic():
        outbox.enqueue(django_db, "outer_before", "u")
        with suppress(Rollback), transaction.atomic():
            outbox.enqueue(django_db, "inner_rolled_back", "u")
            with transaction.atomic():
                outbox.enqueue(django_db, "innermost_rolled_back", "u")
            raise Rollback
        with transaction.atomic():
            outbox.enqueue(django_db, "inner_kept", "u")
        outbox.enqueue(django_db, "outer_after", "u")
    assert names(database_url) == ["outer_before", "inner_kept", "outer_after"]


def test_a_savepoint_rolled_back_by_hand_drops_its_event(django_db: Any, database_url: str) -> None:
    with transaction.atomic():
        outbox.enqueue(django_db, "kept", "u")
        sid = transaction.savepoint()
        outbox.enqueue(django_db, "dropped", "u")
        transaction.savepoint_rollback(sid)
    assert names(database_url) == ["kept"]


def test_django_cursors_are_accepted(django_db: Any, database_url: str) -> None:
    with transaction.atomic(), django_db.cursor() as cursor:
        cursor.execute("SELECT 1")
        outbox.enqueue(cursor, "from_a_cursor", "u")
    with suppress(Rollback), transaction.atomic(), django_db.cursor() as cursor:
        outbox.enqueue(cursor, "rolled_back", "u")
        raise Rollback
    assert names(database_url) == ["from_a_cursor"]


def test_a_connection_django_has_not_opened_yet_is_connected(
    django_db: Any, database_url: str
) -> None:
    assert django_db.connection is None
    # Outside atomic(): Django's autocommit, so the event is committed at once.
    outbox.enqueue(django_db, "first_request", "u")
    assert django_db.connection is not None
    assert names(database_url) == ["first_request"]


def test_the_database_wrapper_itself_is_accepted(django_db: Any, database_url: str) -> None:
    # django.db.connection is a proxy in front of connections["default"].
    wrapper = connections["default"]
    assert type(wrapper).__name__ == "DatabaseWrapper"
    with transaction.atomic():
        outbox.enqueue(wrapper, "from_the_wrapper", "u")
        outbox.enqueue_many(wrapper, [{"event": "many", "distinct_id": "u"}] * 2)
    assert names(database_url) == ["from_the_wrapper", "many", "many"]


def test_a_guard_outside_atomic_is_refused_and_django_carries_on(
    django_db: Any, database_url: str
) -> None:
    with django_db.cursor() as cursor:
        cursor.execute("CREATE TABLE workspace (id text PRIMARY KEY)")
    with pytest.raises(
        outbox.UnsupportedConnectionError,
        match=r"Django.s connection is in autocommit mode.*transaction\.atomic\(\)",
    ):
        outbox.upsert_first(
            django_db, "workspace", {"id": "w1"}, conflict=["id"], event="e", distinct_id="u"
        )
    with transaction.atomic():
        outbox.enqueue(django_db, "still_fine", "u")
    assert names(database_url) == ["still_fine"]


def test_server_side_binding_works_too(django_db: Any, database_url: str) -> None:
    # Django binds parameters on the client (psycopg's ClientCursor) unless
    # OPTIONS["server_side_binding"] is set.
    django_db.close()
    django_db.settings_dict["OPTIONS"]["server_side_binding"] = True
    with transaction.atomic():
        outbox.enqueue(django_db, "bound_on_the_server", "u", {"percent": "100%"})
        assert type(django_db.connection.cursor()).__name__ == "ServerBindingCursor"
    assert events(database_url) == [("bound_on_the_server", "u", {"percent": "100%"})]


def test_batch_guards_and_identity_take_djangos_connection(
    django_db: Any, database_url: str
) -> None:
    with django_db.cursor() as cursor:
        cursor.execute("CREATE TABLE workspace (id text PRIMARY KEY, name text)")
    with transaction.atomic():
        with outbox.batch(django_db) as batch:
            batch.enqueue("item_added", "u", {"sku": "a"})
            batch.enqueue("item_added", "u", {"sku": "b"})
        first = outbox.upsert_first(
            django_db,
            "workspace",
            {"id": "w1", "name": "Acme"},
            conflict=["id"],
            event="workspace_created",
            distinct_id="u",
        )
        again = outbox.upsert_first(
            django_db,
            "workspace",
            {"id": "w1", "name": "Acme"},
            conflict=["id"],
            event="workspace_created",
            distinct_id="u",
        )
        outbox.identify(django_db, "u", set={"plan": "pro"}, privacy="id")
        outbox.group_identify(django_db, "organization", "o1", {"name": "Acme"})
        outbox.alias(django_db, "u", "anon-1")
    assert first.first and not again.first
    assert names(database_url) == [
        "item_added",
        "item_added",
        "workspace_created",
        "$identify",
        "$groupidentify",
        "$create_alias",
    ]


def test_the_posthog_client_writes_on_djangos_connection(django_db: Any, database_url: str) -> None:
    posthog = outbox.Posthog(django_db)  # made before Django connects
    assert django_db.connection is None
    with transaction.atomic():
        posthog.capture("kept", distinct_id="user-42", properties={"n": 1})
        with suppress(Rollback), transaction.atomic():
            posthog.capture("dropped", distinct_id="user-42")
            raise Rollback
    assert events(database_url) == [("kept", "user-42", {"n": 1})]


def test_a_view_enqueues_in_its_atomic_block(django_db: Any, database_url: str) -> None:
    from django.test import Client

    client = Client(raise_request_exception=False)
    ok = client.post(
        "/orders/", {"user_id": "user-42", "total_cents": 1250}, content_type="application/json"
    )
    assert ok.status_code == 201
    refused = client.post(
        "/orders/", {"user_id": "user-43", "total_cents": 0}, content_type="application/json"
    )
    assert refused.status_code == 500
    order_id = ok.json()["order_id"]
    assert events(database_url) == [
        ("order_placed", "user-42", {"order_id": order_id, "total_cents": 1250})
    ]


def test_the_testing_helpers_read_what_the_atomic_block_enqueued(
    django_db: Any, database_url: str
) -> None:
    from outbox.testing import assert_enqueued, assert_not_enqueued, enqueued

    with transaction.atomic():
        outbox.enqueue(django_db, "kept", "user-42", {"n": 1})
        with suppress(Rollback), transaction.atomic():
            outbox.enqueue(django_db, "dropped", "user-42")
            assert [e.event for e in enqueued(django_db)] == ["kept", "dropped"]
            raise Rollback
        [kept] = assert_enqueued(
            django_db, "kept", distinct_id="user-42", properties={"n": 1}, count=1
        )
        assert kept.in_transaction
        assert_not_enqueued(django_db, "dropped")
        with django_db.cursor() as cursor:
            assert [e.event for e in enqueued(cursor)] == ["kept"]
        with pytest.raises(AssertionError, match="dropped"):
            assert_enqueued(django_db, "dropped")
        transaction.set_rollback(True)
    assert events(database_url) == []


# --- the migration -------------------------------------------------------------------


def manage(
    *args: str,
    database_url: str,
    other_url: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python manage.py ARGS`` in the test project, against ``database_url`` (and
    with the project's settings variables ``env``)."""
    given = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "OUTBOX_"))}
    env.update(given)
    env["DATABASE_URL"] = database_url
    if other_url:
        env["OTHER_DATABASE_URL"] = other_url
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PROJECT.parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def revision(url: str) -> str | None:
    """The outbox migration ``url``'s database is at, or None without the tables."""
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('outbox_events')").fetchone() == (None,):
            return None
        row = conn.execute("SELECT version_num FROM outbox_alembic_version").fetchone()
    return None if row is None else str(row[0])


def test_manage_py_migrate_creates_the_outbox_tables(empty_database: str) -> None:
    result = manage("migrate", "-v", "2", database_url=empty_database)
    assert result.returncode == 0, result.stderr
    assert "Applying posthog_outbox.0001_outbox_tables... OK" in result.stdout
    assert revision(empty_database) == HEAD
    # The tables work: an event written on them is there.
    with psycopg.connect(empty_database) as conn:
        outbox.enqueue(conn, "after_migrate", "u")
    assert names(empty_database) == ["after_migrate"]
    again = manage("migrate", database_url=empty_database)
    assert again.returncode == 0, again.stderr
    assert "No migrations to apply." in again.stdout


def test_manage_py_migrate_after_outbox_worker_migrate(database_url: str) -> None:
    # The template's tables, made by `outbox-worker migrate`; one migration behind.
    from tests.conftest import pend_a_migration_that_alters_outbox_events

    pend_a_migration_that_alters_outbox_events(database_url)
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, "before_django", "u")
    result = manage("migrate", database_url=database_url)
    assert result.returncode == 0, result.stderr
    assert revision(database_url) == HEAD
    assert names(database_url) == ["before_django"]


def test_migrate_database_other_migrates_that_database_only(
    server_url: str, empty_database: str
) -> None:
    name = f"outbox_other_{uuid.uuid4().hex[:12]}"
    other = create_database(server_url, name)
    try:
        result = manage(
            "migrate", "--database", "other", database_url=empty_database, other_url=other
        )
        assert result.returncode == 0, result.stderr
        assert revision(other) == HEAD
        assert revision(empty_database) is None
    finally:
        drop_database(server_url, name)


def test_reversing_the_migration_leaves_the_tables_and_their_events(empty_database: str) -> None:
    assert manage("migrate", database_url=empty_database).returncode == 0
    with psycopg.connect(empty_database) as conn:
        outbox.enqueue(conn, "undelivered", "u")
    back = manage("migrate", "posthog_outbox", "zero", "-v", "2", database_url=empty_database)
    assert back.returncode == 0, back.stderr
    assert "Unapplying posthog_outbox.0001_outbox_tables... OK" in back.stdout
    assert revision(empty_database) == HEAD
    assert names(empty_database) == ["undelivered"]
    forward = manage("migrate", "posthog_outbox", database_url=empty_database)
    assert forward.returncode == 0, forward.stderr
    assert revision(empty_database) == HEAD


def test_the_newest_django_migration_brings_the_newest_outbox_revision() -> None:
    # A release adding an Alembic migration adds a Django migration too, so
    # `manage.py migrate` upgrades the tables of a project that upgraded the package.
    migrations = sorted((Path(outbox.__file__).parent / "contrib/django/migrations").glob("0*.py"))
    newest = migrations[-1].read_text()
    assert f'OUTBOX_REVISION = "{HEAD}"' in newest, migrations[-1].name


def test_djangos_test_runner_gives_its_test_database_the_tables(
    server_url: str, empty_database: str
) -> None:
    # The project's database has no outbox tables: the test database Django builds
    # (test_<NAME>) gets them from the migration.
    test_db = "test_" + conninfo_to_dict(empty_database)["dbname"]
    try:
        result = manage("test", "shop", "-v", "2", "--noinput", database_url=empty_database)
    finally:
        drop_database(server_url, test_db)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"Creating test database for alias 'default' ('{test_db}')" in output
    assert "Applying posthog_outbox.0001_outbox_tables... OK" in output
    assert "Ran 6 tests" in output and "\nOK" in output, output
    assert revision(empty_database) is None


def test_the_migration_runs_in_the_role_django_assumes(
    django_project: None, empty_database: str
) -> None:
    from django.core.management import call_command

    role = f"outbox_app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(empty_database, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}"')
        admin.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
    try:
        _point_at("default", empty_database)
        connection.settings_dict["OPTIONS"]["assume_role"] = role
        call_command("migrate", "posthog_outbox", verbosity=0)
        connections.close_all()
        with psycopg.connect(empty_database, autocommit=True) as admin:
            owners = admin.execute(
                "SELECT tableowner FROM pg_tables WHERE tablename LIKE 'outbox_events_%'"
                " UNION ALL SELECT viewowner FROM pg_views WHERE viewname = 'outbox_events'"
            ).fetchall()
        assert owners == [(role,)] * 5  # the event tables and the view
    finally:
        connections.close_all()
        with psycopg.connect(empty_database, autocommit=True) as admin:
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')


def test_the_migration_refuses_a_database_that_is_not_postgresql(django_project: None) -> None:
    from django.db.backends.sqlite3.base import DatabaseWrapper

    from outbox.contrib.django.schema import upgrade

    lite = DatabaseWrapper({"NAME": ":memory:"}, alias="lite")
    with pytest.raises(outbox.UnsupportedConnectionError) as refused:
        upgrade(lite)
    assert str(refused.value) == (
        "DATABASES['lite'] is a sqlite database; the outbox tables need PostgreSQL"
    )
