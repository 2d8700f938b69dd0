"""The outbox tables in a Django database, made by the outbox's own Alembic migrations.

The Django migrations of this app hold no schema: each runs :func:`upgrade`, which
applies the outbox's Alembic migrations (the one source of the schema) up to the
newest. They run on a new psycopg connection built from the Django connection's
settings, not on Django's connection itself: Alembic needs a SQLAlchemy connection
whose transactions it begins and commits, and one outbox migration commits part of
its work on its own (a constraint is validated after the transaction that added it),
which Django's migration transaction could not allow. The new connection reaches the
same database Django migrates: the test database (``test_<NAME>``) when Django's test
runner builds one, the alias of ``migrate --database``.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox.exceptions import UnsupportedConnectionError

#: What ``get_connection_params()`` returns that is Django's, not libpq's: Django's
#: cursor class and its type adapters stay with Django's own connection.
_DJANGO_ONLY = ("cursor_factory", "context")


def connection_params(connection: Any) -> dict[str, Any]:
    """The ``psycopg.connect()`` arguments that reach the database of Django's
    ``connection`` (a ``DatabaseWrapper``) as its own user."""
    vendor = getattr(connection, "vendor", None)
    if vendor != "postgresql":
        raise UnsupportedConnectionError(
            f"DATABASES[{connection.alias!r}] is a {vendor} database; "
            "the outbox tables need PostgreSQL"
        )
    params = dict(connection.get_connection_params())
    for key in _DJANGO_ONLY:
        params.pop(key, None)
    return params


def conninfo(connection: Any) -> str:
    """The libpq connection string of the database Django's ``connection`` reaches, as
    its own user (the test database in a test), for ``psycopg.connect()`` or
    ``worker.testing.deliver()``. Django's own
    ``OPTIONS`` (``pool``, ``server_side_binding``, ``assume_role``,
    ``isolation_level``) are left out; libpq's are kept."""
    params = connection_params(connection)
    params.pop("prepare_threshold", None)  # psycopg's, not libpq's
    return make_conninfo(**{key: value for key, value in params.items() if value is not None})


def open_connection(connection: Any) -> psycopg.Connection[Any]:
    """A new psycopg connection to the database of Django's ``connection``, in the
    role Django's own migrations run as (``OPTIONS["assume_role"]`` when set)."""
    conn = psycopg.connect(**connection_params(connection))
    role = connection.settings_dict.get("OPTIONS", {}).get("assume_role")
    if role:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        conn.commit()
    return conn


def upgrade(connection: Any) -> list[str]:
    """Create the outbox tables in the database of Django's ``connection``, or
    upgrade them to the newest outbox migration; returns the revisions applied
    (none when they were up to date, e.g. made by ``outbox-worker migrate``)."""
    from sqlalchemy import create_engine, pool

    from outbox import install

    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: open_connection(connection),
        poolclass=pool.NullPool,
    )
    try:
        return install.upgrade(engine)
    finally:
        engine.dispose()


#: The databases (host, port, name) this process gave the tables with migrations off.
_created_unmigrated: set[tuple[str, str, str]] = set()


def create_when_unmigrated(sender: Any, using: str = "default", **kwargs: Any) -> None:
    """``post_migrate`` of this app: when its migrations are turned off, which is what
    Django's test runner does for a test database with ``TEST["MIGRATE"] = False``
    (and ``MIGRATION_MODULES = {"posthog_outbox": None}`` does), create the tables
    as ``migrate --run-syncdb`` creates those of apps without migrations.

    With migrations on it does nothing: this app's migration made the tables. Django
    also sends ``post_migrate`` after each ``flush`` (the end of every
    ``TransactionTestCase`` test); a database this process gave the tables is not
    checked again.
    """
    from django.db import connections
    from django.db.migrations.loader import MigrationLoader

    module, _ = MigrationLoader.migrations_module(sender.label)
    if module is not None:
        return
    connection = connections[using]
    if connection.vendor != "postgresql":
        return
    s = connection.settings_dict
    key = (str(s.get("HOST") or ""), str(s.get("PORT") or ""), str(s["NAME"]))
    if key not in _created_unmigrated:
        upgrade(connection)
        _created_unmigrated.add(key)
