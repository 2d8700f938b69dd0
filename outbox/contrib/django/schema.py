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
