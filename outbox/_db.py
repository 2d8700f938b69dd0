"""The one place the library runs SQL on a caller's connection.

Every statement the library sends on a caller's connection (the enqueue INSERT, the
first-time guards' statements and savepoints) goes through :func:`execute` or
:func:`aexecute`. On psycopg 3, plain or under SQLAlchemy, whether a statement may be
a server-side prepared statement is the caller's ``prepare`` argument, psycopg's own:

- ``FOLLOW`` (``None``, psycopg's default): the connection decides, exactly as for a
  statement of the application's own on it. psycopg prepares a statement from its
  ``prepare_threshold``-th run (5 by default) unless the connection has
  ``prepare_threshold=None``, and a client-side binding cursor (``ClientCursor``,
  Django's default) never prepares. The statements that write events use it: their
  text is fixed for each shape of call (never one text per number of events), so a
  connection keeps at most a few of them prepared.
- ``NEVER`` (``False``, the default here): never prepared, whatever the connection
  says; for the first-time guards' statements (their text is the caller's table and
  columns) and savepoints, and for outbox.testing's reads.

Behind a transaction pooler (PgBouncer in ``pool_mode = transaction``, Supabase's
pooler, RDS Proxy, Neon's pooler), each transaction gets whichever server connection
is free, so a statement psycopg prepared on one is missing on the next (``prepared
statement "_pg3_2" does not exist``) unless the pooler carries prepared statements
across (PgBouncer 1.21 and later with ``max_prepared_statements``). An application
behind a pooler that does not must connect with ``prepare_threshold=None`` for its
own statements already; its outbox statements then are never prepared either.

What runs where:

- a psycopg ``Connection`` or ``AsyncConnection`` (or a cursor: the statement runs
  on its connection, in a cursor of its own from the connection's
  ``cursor_factory``, so the caller's cursor keeps its results);
- a SQLAlchemy ``Session``, ``Connection``, ``AsyncSession`` or ``AsyncConnection``
  whose driver is psycopg 3 (``postgresql+psycopg://``): the statement runs on the
  psycopg connection underneath (``Connection.connection.driver_connection``, whose
  ``prepare_threshold`` is ``connect_args``' or psycopg's default), inside
  SQLAlchemy's transaction, which is begun first if it has not been, so it commits or
  rolls back with whatever else the session writes. SQLAlchemy's
  ``before_cursor_execute`` events do not see these statements; a database error is
  raised as the SQLAlchemy exception SQLAlchemy itself would raise
  (``sqlalchemy.exc.IntegrityError`` and so on), with the psycopg error as its
  ``orig``;
- a SQLAlchemy connection on any other driver: the statement goes through
  SQLAlchemy as it always did, and whether it is prepared is that driver's choice.
  psycopg2 never prepares. asyncpg (``postgresql+asyncpg://``) prepares every
  statement it runs, this library's too, and this module cannot change that: behind
  a transaction pooler, configure asyncpg as SQLAlchemy's asyncpg notes on PgBouncer
  say (its statement caches and prepared statement names);
- Django's ``django.db.connection`` (or a database wrapper from
  ``django.db.connections``) and Django cursors: :func:`resolve` connects it if
  Django has not yet and uses the psycopg 3 connection underneath (in async code,
  where Django refuses its connection, it raises ``UnsupportedConnectionError``).
  Django connects with ``prepare_threshold=None`` and client-side binding cursors
  unless its ``OPTIONS`` say otherwise (``server_side_binding``,
  ``prepare_threshold``), so by default nothing is prepared there.

Rows come back as a list of dicts (column name to value), ``[]`` for a statement
that returns none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql as psycopg_sql
from psycopg.rows import dict_row
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Connection as SAConnection
from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session
from sqlalchemy.orm import Session, scoped_session
from sqlalchemy.sql import Executable

from outbox.exceptions import UnsupportedConnectionError

__all__ = [
    "DJANGO_ASYNC",
    "FOLLOW",
    "NEVER",
    "PSYCOPG_ASYNC",
    "PSYCOPG_SYNC",
    "SQLALCHEMY_ASYNC",
    "SQLALCHEMY_SYNC",
    "Row",
    "Sql",
    "aexecute",
    "execute",
    "execute_args",
    "is_async",
    "is_sync",
    "resolve",
]

# The connections the library writes on, by driver and by sync/async.
PSYCOPG_SYNC = (psycopg.Connection, psycopg.Cursor)
PSYCOPG_ASYNC = (psycopg.AsyncConnection, psycopg.AsyncCursor)
SQLALCHEMY_SYNC = (Session, SAConnection, scoped_session)
SQLALCHEMY_ASYNC = (AsyncSession, SAAsyncConnection, async_scoped_session)

#: ``prepare=FOLLOW``: prepared if and when the connection would prepare a statement of
#: the caller's own (psycopg's ``prepare=None``).
FOLLOW: None = None
#: ``prepare=NEVER``: never a server-side prepared statement (psycopg's ``prepare=False``).
NEVER = False

Row = dict[str, Any]
Sql = str | psycopg_sql.SQL | psycopg_sql.Composed
"""A statement in psycopg's style: ``%(name)s`` placeholders, ``%%`` for a literal %."""

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%|:")

#: Django's connection used from async code: what to do instead.
DJANGO_ASYNC = (
    "Django's connection cannot be used from async code (an async view): Django's "
    "transactions are sync-only, so write your rows and call outbox.enqueue() in one sync "
    "function under transaction.atomic() and await it through "
    "asgiref.sync.sync_to_async(...) (docs/django.md, Async views)"
)


def resolve(conn: Any) -> Any:
    """The connection the library should write on, for ``conn`` as the caller gave it.

    Django's connection (``django.db.connection``, a ``DatabaseWrapper``) is
    connected if Django has not connected it yet, and its psycopg connection is
    returned; a Django cursor resolves to its connection's. Anything else comes back
    unchanged. Django is recognised by the module of ``conn``'s type, so this module
    imports it only for such a ``conn``.

    In async code (an async view, a running event loop in this thread) Django refuses
    its connection to every caller; that is raised as :data:`DJANGO_ASYNC`, before
    anything is sent, so the caller's transaction is untouched. Django's
    ``DJANGO_ALLOW_ASYNC_UNSAFE`` lifts the refusal, here as everywhere in Django.
    """
    if not type(conn).__module__.startswith("django."):
        return conn
    ensure = getattr(conn, "ensure_connection", None)
    if ensure is not None:  # DatabaseWrapper, or the ConnectionProxy in front of one
        from django.core.exceptions import SynchronousOnlyOperation

        try:
            ensure()
        except SynchronousOnlyOperation as exc:
            raise UnsupportedConnectionError(DJANGO_ASYNC) from exc
        return conn.connection
    db = getattr(conn, "db", None)  # CursorWrapper
    if db is not None:
        return resolve(db)
    return conn


def is_sync(conn: Any) -> bool:
    """Whether ``conn`` (after :func:`resolve`) is a connection the sync calls write on."""
    return isinstance(conn, PSYCOPG_SYNC + SQLALCHEMY_SYNC)


def is_async(conn: Any) -> bool:
    """Whether ``conn`` (after :func:`resolve`) is one the async (``a*``) calls write on."""
    return isinstance(conn, PSYCOPG_ASYNC + SQLALCHEMY_ASYNC)


def execute(
    conn: Any,
    sql: Sql | None,
    params: Mapping[str, Any] | None = None,
    *,
    sqlalchemy: Executable | None = None,
    prepare: bool | None = NEVER,
) -> list[Row]:
    """Run one statement on a sync connection; its rows as dicts.

    ``sql`` is the statement in psycopg's style. ``sqlalchemy`` is the same statement
    as a SQLAlchemy executable, used only for SQLAlchemy connections on drivers other
    than psycopg (by default it is made from ``sql``). Pass ``sql=None`` for a
    statement that exists only as a SQLAlchemy executable (a caller's own ORM
    statement): it then always goes through SQLAlchemy. Database errors propagate
    (psycopg's, or SQLAlchemy's for a SQLAlchemy connection). ``prepare`` is
    :data:`NEVER` or :data:`FOLLOW` (see the module's docstring); it applies on
    psycopg connections only.
    """
    if type(conn) is psycopg.Connection:  # the common case, first
        return _run_psycopg(conn, sql, params, prepare)
    conn = resolve(conn)
    if isinstance(conn, PSYCOPG_SYNC):
        return _run_psycopg(_psycopg_connection(conn), sql, params, prepare)
    if isinstance(conn, Session | scoped_session):
        conn = conn.connection()
    if not isinstance(conn, SAConnection):
        raise TypeError(f"not a sync connection: {type(conn).__module__}.{type(conn).__name__}")
    if sql is not None:
        driver = conn.connection.driver_connection
        if isinstance(driver, psycopg.Connection):
            if not conn.in_transaction():
                conn.begin()
            try:
                return _run_psycopg(driver, sql, params, prepare)
            except psycopg.Error as exc:
                raise _sqlalchemy_error(conn, sql, params, exc) from exc
    result = conn.execute(_sqlalchemy_form(sql, sqlalchemy), dict(params or {}))
    return [dict(m) for m in result.mappings().all()] if result.returns_rows else []


def execute_args(
    conn: psycopg.Connection[Any], sql: str, args: Sequence[Any], prepare: bool | None = NEVER
) -> list[Row]:
    """:func:`execute` of a statement in psycopg's positional style (``%s``) on a plain
    psycopg ``Connection``: a shortcut for the hottest statement."""
    return _run_psycopg(conn, sql, args, prepare)


async def aexecute(
    conn: Any,
    sql: Sql | None,
    params: Mapping[str, Any] | None = None,
    *,
    sqlalchemy: Executable | None = None,
    prepare: bool | None = NEVER,
) -> list[Row]:
    """:func:`execute` on an async connection (psycopg ``AsyncConnection``, SQLAlchemy
    ``AsyncSession`` or ``AsyncConnection``)."""
    if type(conn) is psycopg.AsyncConnection:
        return await _arun_psycopg(conn, sql, params, prepare)
    conn = resolve(conn)
    if isinstance(conn, PSYCOPG_ASYNC):
        return await _arun_psycopg(_psycopg_connection(conn), sql, params, prepare)
    if isinstance(conn, AsyncSession | async_scoped_session):
        conn = await conn.connection()
    if not isinstance(conn, SAAsyncConnection):
        raise TypeError(f"not an async connection: {type(conn).__module__}.{type(conn).__name__}")
    if sql is not None:
        driver = (await conn.get_raw_connection()).driver_connection
        if isinstance(driver, psycopg.AsyncConnection):
            if not conn.in_transaction():
                await conn.begin()
            try:
                return await _arun_psycopg(driver, sql, params, prepare)
            except psycopg.Error as exc:
                sync_connection = conn.sync_connection
                assert sync_connection is not None  # started by get_raw_connection
                raise _sqlalchemy_error(sync_connection, sql, params, exc) from exc
    result = await conn.execute(_sqlalchemy_form(sql, sqlalchemy), dict(params or {}))
    return [dict(m) for m in result.mappings().all()] if result.returns_rows else []


def _psycopg_connection(conn: Any) -> Any:
    return conn.connection if isinstance(conn, psycopg.Cursor | psycopg.AsyncCursor) else conn


def _run_psycopg(
    conn: psycopg.Connection[Any], sql: Sql | None, params: Any, prepare: bool | None
) -> list[Row]:
    if sql is None:
        raise TypeError("a SQLAlchemy statement cannot run on a psycopg connection")
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(sql, params, prepare=prepare)
        return cursor.fetchall() if cursor.description is not None else []


async def _arun_psycopg(
    conn: psycopg.AsyncConnection[Any], sql: Sql | None, params: Any, prepare: bool | None
) -> list[Row]:
    if sql is None:
        raise TypeError("a SQLAlchemy statement cannot run on a psycopg connection")
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(sql, params, prepare=prepare)
        return await cursor.fetchall() if cursor.description is not None else []


def _sqlalchemy_form(sql: Sql | None, given: Executable | None) -> Executable:
    if given is not None:
        return given
    if sql is None:
        raise TypeError("no statement given")
    source = sql if isinstance(sql, str) else sql.as_string(None)

    def convert(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            return ":" + match.group(1)
        return "%" if match.group(0) == "%%" else "\\:"

    return text(_PLACEHOLDER.sub(convert, source))


def _sqlalchemy_error(
    conn: SAConnection, sql: Sql, params: Mapping[str, Any] | None, exc: psycopg.Error
) -> BaseException:
    """The exception SQLAlchemy raises for ``exc`` (``IntegrityError`` and friends)."""
    statement = sql if isinstance(sql, str) else repr(sql)
    return sa_exc.DBAPIError.instance(
        statement,
        dict(params or {}),
        exc,
        psycopg.Error,
        hide_parameters=conn.engine.hide_parameters,
        dialect=conn.dialect,
    )
