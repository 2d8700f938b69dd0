"""Create or upgrade the outbox tables from Python, without the worker.

:func:`upgrade` applies the Alembic migrations that ship with posthog-outbox (the
same ones ``outbox-worker migrate`` and ``alembic upgrade head`` apply) to a
database URL, a SQLAlchemy ``Engine`` or a SQLAlchemy ``Connection``;
:func:`current` says which revision a database is at. They need Alembic:
``pip install 'posthog-outbox[migrate]'`` (the ``worker`` extra includes it).
Without it, they raise :class:`~outbox.exceptions.OutboxMissingExtraError`, and
importing this module still works.

Each try of a migration waits at most ``lock_timeout`` seconds for a lock (the
session's ``lock_timeout``): while a DDL statement waits for a table's lock, every
``INSERT`` into that table waits behind it, so this bounds how long a migration can
hold up the application's enqueues. A try that timed out is rolled back and made
again after a pause about as long, for up to ``retry_for`` seconds; every migration
can be run again after an interruption.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from outbox import _locks
from outbox.exceptions import (
    OutboxDatabaseError,
    OutboxError,
    OutboxMissingExtraError,
    UnsupportedConnectionError,
)
from outbox.schema import VERSION_TABLE

__all__ = [
    "MIGRATE_LOCK_TIMEOUT",
    "MIGRATE_RETRY_FOR",
    "alembic_config",
    "current",
    "downgrade",
    "head",
    "libpq_url",
    "migrations_dir",
    "sqlalchemy_url",
    "upgrade",
]

log = logging.getLogger("outbox.install")

#: Each try of a migration waits at most this long (seconds) for a lock on a table.
MIGRATE_LOCK_TIMEOUT = 1.0
#: A try that timed out is made again, after a pause about as long as the lock
#: timeout, until this many seconds have passed; then :func:`upgrade` gives up.
MIGRATE_RETRY_FOR = 120.0

#: A database URL (``postgresql://``, ``postgresql+psycopg://``, ``postgres://``) or
#: a SQLAlchemy ``Engine`` (the migrations take connections from it), or a SQLAlchemy
#: ``Connection`` with no transaction open.
Target = str | Engine | Connection

_DRIVER_PREFIXES = ("postgresql+psycopg://", "postgresql+psycopg2://", "postgres://")


def libpq_url(url: str) -> str:
    """The URL as libpq (and ``psycopg.connect``) wants it: no SQLAlchemy driver suffix."""
    url = url.strip()
    for prefix in _DRIVER_PREFIXES:
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def sqlalchemy_url(url: str) -> str:
    """The URL as SQLAlchemy wants it, with the psycopg 3 driver."""
    return "postgresql+psycopg://" + libpq_url(url).removeprefix("postgresql://")


def migrations_dir() -> Path:
    """The Alembic scripts: ``outbox/_migrations`` in an installed wheel, else the
    repository's ``migrations/`` (a checkout, or an editable install)."""
    packaged = Path(__file__).parent / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def _alembic(needed_by: str) -> Any:
    try:
        import alembic.command
        import alembic.config
        import alembic.migration
        import alembic.script
        import alembic.util.exc
    except ModuleNotFoundError as exc:
        raise OutboxMissingExtraError(needed_by, "alembic", "migrate") from exc
    return alembic


def alembic_config(url: str | None = None) -> Any:
    """An Alembic ``Config`` for the outbox migrations (against ``url`` if given), for
    Alembic's own commands (``alembic.command.check(alembic_config(url))``)."""
    alembic = _alembic("outbox.install.alembic_config()")
    config = alembic.config.Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return config


def head() -> str:
    """The latest revision this version of posthog-outbox ships."""
    alembic = _alembic("outbox.install.head()")
    revision: str = alembic.script.ScriptDirectory.from_config(alembic_config()).get_current_head()
    return revision


def current(target: Target) -> str | None:
    """The outbox revision ``target``'s database is at, or None before the first
    migration (no ``outbox_alembic_version`` table, or an empty one). On a
    ``Connection`` inside a transaction, it reads in that transaction and leaves it
    open."""
    alembic = _alembic("outbox.install.current()")
    with _connections(target, idle=False) as connections:
        connection = next(connections)
        began = not connection.in_transaction()
        context = alembic.migration.MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE}
        )
        revision: str | None = context.get_current_revision()
        if began:
            connection.rollback()
    return revision


def upgrade(
    target: Target,
    revision: str = "head",
    *,
    lock_timeout: float = MIGRATE_LOCK_TIMEOUT,
    retry_for: float = MIGRATE_RETRY_FOR,
) -> list[str]:
    """Apply the outbox migrations up to ``revision`` (the same as ``alembic upgrade``)
    and return the revisions applied, oldest first: empty when the database was
    already there.

    ``target`` is a database URL, a SQLAlchemy ``Engine`` (each try takes a new
    connection from it), or a SQLAlchemy ``Connection`` with no transaction open:
    the migrations commit as they go (0004 validates its constraints outside
    the transaction that added them), so they cannot run inside the caller's
    transaction. The connection's ``lock_timeout`` is set back as it was afterwards.
    Every lock waits at most ``lock_timeout`` seconds; a try that timed out is rolled
    back and made again for up to ``retry_for`` seconds, then
    :class:`~outbox.exceptions.OutboxDatabaseError` names the sessions holding the
    locks.
    """
    alembic = _alembic("outbox.install.upgrade()")
    return _migrate(
        target,
        lambda config: alembic.command.upgrade(config, revision),
        lock_timeout,
        retry_for,
        up=True,
    )


def downgrade(
    target: Target,
    revision: str,
    *,
    lock_timeout: float = MIGRATE_LOCK_TIMEOUT,
    retry_for: float = MIGRATE_RETRY_FOR,
) -> list[str]:
    """Revert the outbox migrations down to ``revision`` (``"base"`` removes
    everything), taking its locks as :func:`upgrade` does; return the revisions
    reverted, newest first."""
    alembic = _alembic("outbox.install.downgrade()")
    return _migrate(
        target,
        lambda config: alembic.command.downgrade(config, revision),
        lock_timeout,
        retry_for,
        up=False,
    )


def _migrate(
    target: Target,
    run: Callable[[Any], None],
    lock_timeout: float,
    retry_for: float,
    *,
    up: bool,
) -> list[str]:
    """Run an Alembic command on ``target`` under ``lock_timeout``, again after a lock
    timeout until ``retry_for`` has passed; the revisions it moved across."""
    alembic = _alembic("outbox.install")
    deadline = time.monotonic() + retry_for
    tries = 0
    before: str | None = None
    with _connections(target) as connections:
        for connection in connections:
            tries += 1
            if tries == 1:  # a try that timed out may have committed some revisions
                before = _current(alembic, connection)
            previous = connection.execute(text("SELECT current_setting('lock_timeout')"))
            restore = previous.scalar_one()
            try:
                # For the session, not one transaction: a migration may commit part
                # of its work in an autocommit block.
                _set_lock_timeout(connection, str(max(1, round(lock_timeout * 1000))))
                config = alembic_config()
                config.attributes["connection"] = connection  # env.py runs on it
                run(config)
                connection.commit()
                after = _current(alembic, connection)
                return _moved(alembic, before, after, up=up)
            except alembic.util.exc.CommandError as exc:  # e.g. an unknown revision
                raise OutboxError(f"migrate failed: {_first_line(exc)}") from exc
            except DBAPIError as exc:
                if not isinstance(exc.orig, psycopg.errors.LockNotAvailable):
                    raise OutboxDatabaseError(_refused(exc)) from exc
                connection.rollback()
                holders = _holders(connection)
                pause = lock_timeout * random.uniform(0.5, 1.5)
                if time.monotonic() + pause > deadline:
                    raise OutboxDatabaseError(
                        f"the migration could not take its locks in {tries} tries over "
                        f"{retry_for:.0f}s (each waited {lock_timeout:g}s): {holders}; "
                        "run it again when the workers' batches are quick, or stop them first"
                    ) from exc
                log.warning(
                    "the migration waited %gs for a lock (%s); trying again in %.1fs",
                    lock_timeout,
                    holders,
                    pause,
                    extra={"action": "migrate_lock_timeout", "tries": tries},
                )
                time.sleep(pause)
            finally:
                # The caller's connection gets its own lock_timeout back (a broken
                # connection cannot take it, and the error in flight says why).
                with contextlib.suppress(DBAPIError):
                    if connection.in_transaction():
                        connection.rollback()
                    if not connection.closed and not connection.invalidated:
                        _set_lock_timeout(connection, restore)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _refused(exc: DBAPIError) -> str:
    """One line for a statement of a migration that the database refused."""
    hint = ""
    if isinstance(exc.orig, psycopg.errors.InsufficientPrivilege):
        hint = (
            "; the role lacks a privilege the migrations need "
            "(see Database roles in docs/operations.md)"
        )
    return f"migrate failed: the database refused it: {_first_line(exc.orig or exc)}{hint}"


def _set_lock_timeout(connection: Connection, value: str) -> None:
    connection.execute(text("SELECT set_config('lock_timeout', :value, false)"), {"value": value})
    connection.commit()


def _current(alembic: Any, connection: Connection) -> str | None:
    context = alembic.migration.MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE}
    )
    revision: str | None = context.get_current_revision()
    connection.commit()
    return revision


def _moved(alembic: Any, before: str | None, after: str | None, *, up: bool) -> list[str]:
    """The revisions between ``before`` and ``after``: applied (oldest first) or
    reverted (newest first)."""
    if before == after:
        return []
    upper, lower = (after, before) if up else (before, after)
    script = alembic.script.ScriptDirectory.from_config(alembic_config())
    revisions = [r.revision for r in script.iterate_revisions(upper, lower)]
    return list(reversed(revisions)) if up else revisions


def _holders(connection: Connection) -> str:
    try:
        rows = connection.exec_driver_sql(_locks.LOCK_HOLDERS, {"modes": _locks.ALL_MODES})
        return _locks.describe(rows.all())
    except DBAPIError as exc:
        return f"could not list the sessions holding locks ({_first_line(exc.orig or exc)})"
    finally:
        connection.rollback()


@contextmanager
def _connections(target: Target, *, idle: bool = True) -> Iterator[Iterator[Connection]]:
    """Connections to ``target`` to try on, one after another: a new one each time for
    a URL or an ``Engine`` (closed after), the caller's own for a ``Connection`` (left
    open; with ``idle``, refused inside a transaction)."""
    if isinstance(target, Connection):
        if idle and target.in_transaction():
            raise UnsupportedConnectionError(
                "outbox.install needs a SQLAlchemy Connection with no transaction open "
                "(the migrations commit as they go): commit or roll back first, or pass "
                "a database URL"
            )

        def same() -> Iterator[Connection]:
            while True:
                yield target

        yield same()
        return
    if isinstance(target, Engine):
        tries = _fresh(target)
        try:
            yield tries
        finally:
            tries.close()
        return
    if not isinstance(target, str):
        raise UnsupportedConnectionError(
            f"outbox.install takes a database URL, a SQLAlchemy Engine or a SQLAlchemy "
            f"Connection, not {type(target).__module__}.{type(target).__qualname__}"
        )
    try:
        engine = create_engine(sqlalchemy_url(target), poolclass=pool.NullPool)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is no number
        raise OutboxDatabaseError(
            "the database URL given to outbox.install is not a valid PostgreSQL URL; "
            "expected e.g. postgresql://user@host:5432/dbname"
        ) from exc
    tries = _fresh(engine)
    try:
        yield tries
    finally:
        tries.close()
        engine.dispose()


def _fresh(engine: Engine) -> Generator[Connection, None, None]:
    """A new connection from ``engine`` for each try, closed when the next is taken."""
    while True:
        try:
            connection = engine.connect()
        except OperationalError as exc:
            raise OutboxDatabaseError(
                f"cannot connect to PostgreSQL to migrate the outbox tables: "
                f"{_first_line(exc.orig or exc)}"
            ) from exc
        with connection:
            yield connection


def _first_line(exc: BaseException) -> str:
    message = str(exc).strip()
    return message.splitlines()[0].strip() if message else type(exc).__name__
