"""Alembic environment for the posthog-outbox schema.

:func:`outbox.install.upgrade` (behind ``outbox-worker migrate``) passes its own
connection in ``config.attributes["connection"]``. Without one, the URL is, in
order: the ``sqlalchemy.url`` the caller put on the Alembic config, else
``DATABASE_URL``, else the embedded PostgreSQL that ``outbox-worker`` uses by
default. Versions are recorded in ``outbox_alembic_version`` so they never collide
with the application's own Alembic history in the same database.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from outbox.install import MIGRATE_LOCK_TIMEOUT, sqlalchemy_url
from outbox.schema import VERSION_TABLE, metadata

MIGRATE_LOCK_TIMEOUT_MS = round(MIGRATE_LOCK_TIMEOUT * 1000)

config = context.config


def _url() -> str:
    configured = config.get_main_option("sqlalchemy.url")
    if configured:
        return sqlalchemy_url(configured)
    # `alembic upgrade head` from the repository root: DATABASE_URL, else the embedded
    # PostgreSQL (both the worker's, so imported only here; outbox.install always
    # passes its connection).
    from worker.database import resolve_database_url

    return sqlalchemy_url(resolve_database_url())


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=metadata,
        literal_binds=True,
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        # Run by hand (`alembic upgrade`): a lock another session holds (a worker's
        # batch in flight) makes the migration fail after a second instead of waiting,
        # with the application's INSERTs queued behind it. outbox.install.upgrade (and
        # so `outbox-worker migrate`) passes its own connection, with the same
        # timeout, and tries again.
        connection.execute(text(f"SET lock_timeout = '{MIGRATE_LOCK_TIMEOUT_MS}ms'"))
        connection.commit()
        _run(connection)
    engine.dispose()


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
