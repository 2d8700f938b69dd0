"""Exactly-once emission for "the first time" events, in the caller's transaction.

Some events mean *the first time something happened*: a runtime registered, an
issue executed, onboarding completed. Code that reaches them runs many times
(heartbeats re-register, retries complete again, two workers finish at once), and
"check, then write, then emit" races. These helpers let the database decide, in
the same statement that writes the application's row, and enqueue the event in
the same transaction only when this statement was the first:

:func:`upsert_first`
    ``INSERT ... ON CONFLICT (...) DO UPDATE ... RETURNING (xmax = 0) AS inserted``.
    A row PostgreSQL really inserted has no deleting or locking transaction yet, so
    its ``xmax`` is 0; a row that already existed and was updated has ``xmax`` set
    to the updating transaction. One statement, no extra query, and concurrent
    upserts of one key are serialised by the unique index: exactly one sees
    ``inserted = true``. (``xmax`` is a system column whose meaning here is an
    implementation detail PostgreSQL has kept for many major versions; the tests
    check it on every run.)
:func:`mark_first`
    ``UPDATE t SET col = now() WHERE <key> AND col IS NULL RETURNING ...``. Under
    READ COMMITTED a concurrent second update waits for the first to commit, then
    re-checks ``col IS NULL`` on the new row version, finds it false, and updates
    nothing. Under REPEATABLE READ or SERIALIZABLE the second transaction fails
    with a serialization error instead; retry it and it updates nothing.
:func:`emit_if_first`
    Your own statement, for anything the two above do not cover.

All three take SQLAlchemy ``Session`` (ORM) and ``Connection`` (Core) objects, and
psycopg connections, and never begin, commit or roll back the caller's
transaction. :func:`aupsert_first`, :func:`amark_first` and :func:`aemit_if_first`
are the same for ``AsyncSession``, ``AsyncConnection`` and
``psycopg.AsyncConnection``. The event is validated before the statement runs when it can be: when
``distinct_id`` or ``properties`` are functions of the returned row, the statement
and the event run inside a savepoint, so an event refused by validation undoes the
statement too, and the caller's transaction stays usable and consistent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import uuid as uuid_module
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql as psycopg_sql
from sqlalchemy import Table, text
from sqlalchemy.sql import Executable

from outbox._db import (
    PSYCOPG_ASYNC,
    PSYCOPG_SYNC,
    SQLALCHEMY_ASYNC,
    SQLALCHEMY_SYNC,
    aexecute,
    execute,
    resolve,
)
from outbox.actors import Actor
from outbox.config import AnalyticsConfig, get_config
from outbox.enqueue import aenqueue_prepared, enqueue_prepared, prepare_enqueue
from outbox.exceptions import OutboxValidationError, UnsupportedConnectionError
from outbox.validation import PreparedEvent, new_event_uuid

__all__ = [
    "FirstTime",
    "aemit_if_first",
    "amark_first",
    "aupsert_first",
    "emit_if_first",
    "mark_first",
    "upsert_first",
]

Row = Mapping[str, Any]
DistinctIdArg = str | int | uuid_module.UUID | Actor | Callable[[Row], Any]
PropertiesArg = Mapping[str, Any] | Callable[[Row], Mapping[str, Any] | None] | None

_INSERTED = "inserted"
_SAVEPOINT = "outbox_first_time"
_IDENTIFIER = re.compile(r"[^\x00]+")


@dataclass(frozen=True)
class FirstTime:
    """What a guard did. True (``bool(result)``) when this call was the first time.

    ``rows`` are all rows the statement returned, as mappings of column name to
    value (for :func:`upsert_first`, the row whether it was inserted or updated,
    with its ``inserted`` flag). ``first_rows`` are the rows that were a first time,
    and ``event_uuids`` the uuids of the events enqueued for them, in the same order
    (``None`` where analytics is disabled). ``row`` and ``event_uuid`` are the first
    of each, for the usual single-row case.
    """

    rows: tuple[Row, ...]
    first_rows: tuple[Row, ...]
    event_uuids: tuple[uuid_module.UUID | None, ...]

    @property
    def first(self) -> bool:
        """Whether at least one row was a first time (and its event was enqueued)."""
        return bool(self.first_rows)

    @property
    def row(self) -> Row | None:
        """The first returned row, or ``None`` when the statement returned none."""
        return self.rows[0] if self.rows else None

    @property
    def event_uuid(self) -> uuid_module.UUID | None:
        """The uuid of the first enqueued event, or ``None``."""
        return self.event_uuids[0] if self.event_uuids else None

    def __bool__(self) -> bool:
        return self.first


# --------------------------------------------------------------------------- SQL building


def _quote(name: object, field: str) -> str:
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise OutboxValidationError(field, f"must be a non-empty identifier str, got {name!r}")
    # Braces are doubled for str.format (undone by _Statement); see _Statement for % and :.
    return '"' + name.replace('"', '""').replace("{", "{{").replace("}", "}}") + '"'


def _table_name(table: object) -> str:
    if isinstance(table, str):
        return ".".join(_quote(part, "table") for part in table.split("."))
    local = getattr(table, "__table__", table)
    if isinstance(local, Table):
        parts = [local.schema, local.name] if local.schema else [local.name]
        return ".".join(_quote(p, "table") for p in parts)
    raise OutboxValidationError(
        "table", f"must be a table name, a SQLAlchemy Table or a mapped class, got {table!r}"
    )


def _names(values: object, field: str, *, allow_empty: bool = True) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise OutboxValidationError(field, "must be a sequence of column names")
    if not values and not allow_empty:
        raise OutboxValidationError(field, "must name at least one column")
    return [_quote(v, f"{field}[{i}]") for i, v in enumerate(values)]


class _Statement:
    """One SQL text with named parameters, in psycopg's and SQLAlchemy's styles."""

    def __init__(self, template: str, params: Mapping[str, Any]) -> None:
        # The template's only placeholders are {name}; anything else came from a
        # quoted identifier and must reach the server as written.
        self.psycopg = template.replace("%", "%%").format(**{k: f"%({k})s" for k in params})
        self.sqlalchemy = template.replace(":", "\\:").format(**{k: f":{k}" for k in params})
        self.params = dict(params)


def _upsert_sql(
    table: object,
    values: object,
    conflict: object,
    update: object,
    returning: object,
) -> _Statement:
    if not isinstance(values, Mapping) or not values:
        raise OutboxValidationError("values", "must be a non-empty mapping of column to value")
    columns = _names(list(values), "values")
    params = {f"v{i}": value for i, value in enumerate(values.values())}
    targets = _names(conflict, "conflict", allow_empty=False)
    updates = _names(update, "update") or targets[:1]
    extra = _names(returning, "returning")
    template = (
        f"INSERT INTO {_table_name(table)} ({', '.join(columns)}) "
        f"VALUES ({', '.join('{' + p + '}' for p in params)}) "
        f"ON CONFLICT ({', '.join(targets)}) DO UPDATE SET "
        + ", ".join(f"{c} = EXCLUDED.{c}" for c in updates)
        + f" RETURNING (xmax = 0) AS {_INSERTED}"
        + "".join(f", {c}" for c in extra)
    )
    return _Statement(template, params)


def _mark_sql(table: object, column: object, where: object, returning: object) -> _Statement:
    if not isinstance(where, Mapping) or not where:
        raise OutboxValidationError("where", "must be a non-empty mapping of column to value")
    marked = _quote(column, "column")
    conditions = []
    params: dict[str, Any] = {}
    for i, (name, value) in enumerate(where.items()):
        if value is None:
            raise OutboxValidationError(f"where.{name}", "must not be None")
        conditions.append(f"{_quote(name, 'where')} = {{w{i}}}")
        params[f"w{i}"] = value
    extra = _names(returning, "returning") or [_quote(n, "where") for n in where]
    template = (
        f"UPDATE {_table_name(table)} SET {marked} = now() "
        f"WHERE {' AND '.join(conditions)} AND {marked} IS NULL "
        f"RETURNING {', '.join(extra)}"
    )
    return _Statement(template, params)


# --------------------------------------------------------------------------- running
#
# The guard itself (_guard_steps) is a generator that says what to run and gets the
# results back; _drive runs it on a sync connection and _adrive on an async one, so
# the logic (validation first, savepoint, which rows are first, undo on error) is
# written once for both.


def _check_connection(conn: Any, *, sync: bool, call: str, django: bool = False) -> None:
    """Refuse a connection the guard ``call`` (its sync name) cannot run on, naming
    what to use instead; ``django`` when the caller gave Django's connection."""
    if isinstance(conn, PSYCOPG_SYNC + PSYCOPG_ASYNC):
        connection = (
            conn.connection if isinstance(conn, psycopg.Cursor | psycopg.AsyncCursor) else conn
        )
        if isinstance(connection, psycopg.Connection) != sync:
            raise UnsupportedConnectionError(_wrong_kind(conn, sync=sync, call=call))
        idle = connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if connection.autocommit and idle:
            where, fix = (
                ("Django's connection is", "wrap the call in `with transaction.atomic():`")
                if django
                else ("this psycopg connection is", "use `with conn.transaction():`")
            )
            raise UnsupportedConnectionError(
                "first-time guards need a transaction, so that the row and its event "
                f"commit together; {where} in autocommit mode outside a transaction "
                f"({fix})"
            )
        return
    if isinstance(conn, SQLALCHEMY_SYNC):
        if sync:
            return
        raise UnsupportedConnectionError(_wrong_kind(conn, sync=sync, call=call))
    if isinstance(conn, SQLALCHEMY_ASYNC):
        if not sync:
            return
        raise UnsupportedConnectionError(_wrong_kind(conn, sync=sync, call=call))
    name = f"{type(conn).__module__}.{type(conn).__qualname__}"
    raise UnsupportedConnectionError(
        f"first-time guards got {name}; they need a SQLAlchemy Session or Connection, or "
        "a psycopg Connection (AsyncSession, AsyncConnection or psycopg.AsyncConnection "
        "for the a* functions)"
    )


def _wrong_kind(conn: Any, *, sync: bool, call: str) -> str:
    name = f"{type(conn).__module__}.{type(conn).__qualname__}"
    if sync:
        return f"{name} is asynchronous: use a{call}()"
    return f"{name} is synchronous: use {call}()"


@dataclass(frozen=True)
class _Exec:
    """Run a statement; the result is its rows as mappings."""

    statement: Any
    params: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class _Enqueue:
    """Enqueue prepared events; the result is their uuids."""

    events: list[PreparedEvent]


_Step = _Exec | _Enqueue
_Steps = Generator[_Step, Any, "FirstTime"]


def _statement_for(conn: Any, step: _Exec) -> tuple[Any, Any, Mapping[str, Any] | None]:
    """The step's statement as (psycopg form, SQLAlchemy form, params) for ``conn``.

    The guards' own statements (:class:`_Statement`, savepoints) have both forms and
    run unprepared on psycopg, also under SQLAlchemy (see :mod:`outbox._db`). A
    caller's own statement for :func:`emit_if_first` is in the driver's style: on a
    psycopg connection it is psycopg's form; on SQLAlchemy (text or a Core/ORM
    statement) it goes through SQLAlchemy as written.
    """
    statement: Any = step.statement
    params = step.params
    if isinstance(statement, _Statement):
        return statement.psycopg, statement.sqlalchemy, statement.params
    if isinstance(conn, PSYCOPG_SYNC + PSYCOPG_ASYNC):
        return statement, None, params
    if isinstance(statement, str):
        statement = text(statement)
    return None, statement, params


def _perform(conn: Any, step: _Step) -> Any:
    if isinstance(step, _Enqueue):
        return enqueue_prepared(conn, step.events)
    psycopg_form, sqlalchemy_form, params = _statement_for(conn, step)
    return execute(conn, psycopg_form, params, sqlalchemy=sqlalchemy_form)


async def _aperform(conn: Any, step: _Step) -> Any:
    if isinstance(step, _Enqueue):
        return await aenqueue_prepared(conn, step.events)
    psycopg_form, sqlalchemy_form, params = _statement_for(conn, step)
    return await aexecute(conn, psycopg_form, params, sqlalchemy=sqlalchemy_form)


def _is_django(conn: Any) -> bool:
    return type(conn).__module__.startswith("django.")


def _drive(conn: Any, steps: _Steps, call: str) -> FirstTime:
    """Run the guard ``call``'s steps on a sync connection."""
    django = _is_django(conn)
    conn = resolve(conn)
    _check_connection(conn, sync=True, call=call, django=django)
    try:
        step = next(steps)
        while True:
            try:
                result = _perform(conn, step)
            except BaseException as exc:  # the guard undoes its savepoint, then re-raises
                step = steps.throw(exc)
            else:
                step = steps.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def _adrive(conn: Any, steps: _Steps, call: str) -> FirstTime:
    """Run the guard ``call``'s steps (``call`` its sync name) on an async connection."""
    django = _is_django(conn)
    conn = resolve(conn)
    _check_connection(conn, sync=False, call=call, django=django)
    try:
        step = next(steps)
        while True:
            try:
                result = await _aperform(conn, step)
            except BaseException as exc:
                step = steps.throw(exc)
            else:
                step = steps.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Emit:
    event: str
    distinct_id: DistinctIdArg
    properties: PropertiesArg
    set: Mapping[str, Any] | None
    set_once: Mapping[str, Any] | None
    groups: Mapping[str, Any] | None
    timestamp: datetime | str | None
    config: AnalyticsConfig

    @property
    def depends_on_row(self) -> bool:
        return callable(self.distinct_id) or callable(self.properties)

    def prepare(self, row: Row | None) -> PreparedEvent | None:
        distinct_id = self.distinct_id
        properties = self.properties
        if row is not None:
            if callable(distinct_id):
                distinct_id = distinct_id(row)
            if callable(properties):
                properties = properties(row)
        return prepare_enqueue(
            self.event,
            distinct_id,
            properties,  # type: ignore[arg-type]
            set=self.set,
            set_once=self.set_once,
            groups=self.groups,
            timestamp=self.timestamp,
            config=self.config,
        )


def _guard_steps(run: _Exec, is_first: Callable[[Row], bool], emit: _Emit) -> _Steps:
    disabled = emit.config.disabled
    template: PreparedEvent | None = None
    if not disabled and not emit.depends_on_row:
        template = emit.prepare(None)  # refuse a bad event before the statement runs
    savepoint = not disabled and emit.depends_on_row
    if savepoint:
        yield _Exec(_Statement(f"SAVEPOINT {_SAVEPOINT}", {}))
    try:
        rows: list[Row] = yield run
        first_rows = [row for row in rows if is_first(row)]
        uuids: list[uuid_module.UUID | None] = [None] * len(first_rows)
        if not disabled and first_rows:
            prepared: list[PreparedEvent] = []
            for index, row in enumerate(first_rows):
                if template is None:
                    event = emit.prepare(row)
                elif index == 0:
                    event = template
                else:
                    event = dataclasses.replace(template, uuid=new_event_uuid())
                if event is not None:
                    prepared.append(event)
            uuids = yield _Enqueue(prepared)
    except BaseException:
        if savepoint:
            # If the connection is gone, the original error says more than this one.
            with contextlib.suppress(Exception):
                yield _Exec(_Statement(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}", {}))
                yield _Exec(_Statement(f"RELEASE SAVEPOINT {_SAVEPOINT}", {}))
        raise
    if savepoint:
        yield _Exec(_Statement(f"RELEASE SAVEPOINT {_SAVEPOINT}", {}))
    return FirstTime(tuple(rows), tuple(first_rows), tuple(uuids))


def _emit(
    event: str,
    distinct_id: DistinctIdArg,
    properties: PropertiesArg,
    set: Mapping[str, Any] | None,
    set_once: Mapping[str, Any] | None,
    groups: Mapping[str, Any] | None,
    timestamp: datetime | str | None,
    config: AnalyticsConfig | None,
) -> _Emit:
    return _Emit(
        event, distinct_id, properties, set, set_once, groups, timestamp, config or get_config()
    )


def _is_upserted(row: Row) -> bool:
    return row[_INSERTED] is True


def _is_returned(row: Row) -> bool:
    return True


def _is_first_row(row: Row) -> bool:
    return bool(row[_INSERTED]) if _INSERTED in row else True


def upsert_first(
    conn: Any,
    table: str | Table | type,
    values: Mapping[str, Any],
    *,
    conflict: Sequence[str],
    update: Sequence[str] = (),
    returning: Sequence[str] = (),
    event: str,
    distinct_id: DistinctIdArg,
    properties: PropertiesArg = None,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> FirstTime:
    """Insert or update a row; enqueue ``event`` only if the row was really inserted.

    Runs ``INSERT INTO table (values...) ON CONFLICT (conflict...) DO UPDATE SET
    col = EXCLUDED.col (for each of update...) RETURNING (xmax = 0) AS inserted,
    returning...``. ``conflict`` names the columns of a unique index or constraint.
    ``update`` names the columns to refresh on conflict (e.g. ``last_seen_at``);
    with none, the first conflict column is set to itself, which still returns the
    existing row. ``returning`` names extra columns to read back, such as the id.

    ``table`` is a name (``"agent_runtime"``, ``"app.agent_runtime"``; each part is
    quoted, so write it as stored), a SQLAlchemy ``Table`` or a mapped class.
    ``distinct_id`` and ``properties`` may be functions of the returned row (a
    mapping of column name to value), e.g. ``lambda row: {"runtime_id":
    row["id"]}``. The other event arguments (``set``, ``set_once``, ``groups``,
    ``timestamp``, ``config``) are those of :func:`outbox.enqueue`.

    The statement runs even when analytics is disabled (it is your data); only the
    event is skipped. Returns a :class:`FirstTime`.
    """
    statement = _upsert_sql(table, values, conflict, update, returning)
    emit = _emit(event, distinct_id, properties, set, set_once, groups, timestamp, config)
    return _drive(conn, _guard_steps(_Exec(statement), _is_upserted, emit), "upsert_first")


def mark_first(
    conn: Any,
    table: str | Table | type,
    column: str,
    *,
    where: Mapping[str, Any],
    returning: Sequence[str] = (),
    event: str,
    distinct_id: DistinctIdArg,
    properties: PropertiesArg = None,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> FirstTime:
    """Set ``column`` to ``now()`` where it is still NULL; enqueue ``event`` if it was.

    Runs ``UPDATE table SET column = now() WHERE k = v AND ... AND column IS NULL
    RETURNING returning...`` (by default the ``where`` columns). ``where`` should
    identify one row, such as ``{"id": issue_id}``; if it matches several, each row
    marked now is a first time and gets its own event. ``column`` is a nullable
    timestamp such as ``first_executed_at``. See :func:`upsert_first` for
    ``table``, ``distinct_id``, ``properties`` and the rest.

    Under READ COMMITTED (PostgreSQL's default) concurrent callers wait for each
    other and exactly one sees the row; under REPEATABLE READ the losers get a
    serialization error and must retry. Returns a :class:`FirstTime`.
    """
    statement = _mark_sql(table, column, where, returning)
    emit = _emit(event, distinct_id, properties, set, set_once, groups, timestamp, config)
    return _drive(conn, _guard_steps(_Exec(statement), _is_returned, emit), "mark_first")


def emit_if_first(
    conn: Any,
    statement: str | Executable | psycopg_sql.Composable,
    params: Mapping[str, Any] | None = None,
    *,
    event: str,
    distinct_id: DistinctIdArg,
    properties: PropertiesArg = None,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> FirstTime:
    """Run your own guard statement; enqueue ``event`` for each row that is a first time.

    ``statement`` is SQL text in your driver's parameter style (``:name`` for
    SQLAlchemy, ``%(name)s`` for psycopg), a SQLAlchemy Core or ORM statement (with
    a ``RETURNING`` clause), or a psycopg ``sql.Composable``. A returned row is a
    first time when it has a column named ``inserted`` that is true (write
    ``RETURNING (xmax = 0) AS inserted, ...`` in an upsert), or, when it has no
    such column, simply because it was returned (an ``UPDATE ... WHERE ... IS NULL
    RETURNING ...``). Returns a :class:`FirstTime`.
    """
    emit = _emit(event, distinct_id, properties, set, set_once, groups, timestamp, config)
    return _drive(
        conn, _guard_steps(_Exec(statement, params), _is_first_row, emit), "emit_if_first"
    )


async def aupsert_first(
    conn: Any,
    table: str | Table | type,
    values: Mapping[str, Any],
    *,
    conflict: Sequence[str],
    update: Sequence[str] = (),
    returning: Sequence[str] = (),
    event: str,
    distinct_id: DistinctIdArg,
    properties: PropertiesArg = None,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> FirstTime:
    """:func:`upsert_first` on a SQLAlchemy ``AsyncSession`` or ``AsyncConnection``, or
    a ``psycopg.AsyncConnection``."""
    statement = _upsert_sql(table, values, conflict, update, returning)
    emit = _emit(event, distinct_id, properties, set, set_once, groups, timestamp, config)
    return await _adrive(conn, _guard_steps(_Exec(statement), _is_upserted, emit), "upsert_first")


async def amark_first(
    conn: Any,
    table: str | Table | type,
    column: str,
    *,
    where: Mapping[str, Any],
    returning: Sequence[str] = (),
    event: str,
    distinct_id: DistinctIdArg,
    properties: PropertiesArg = None,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> FirstTime:
    """:func:`mark_first` on a SQLAlchemy ``AsyncSession`` or ``AsyncConnection``, or a
    ``psycopg.AsyncConnection``."""
    statement = _mark_sql(table, column, where, returning)
    emit = _emit(event, distinct_id, properties, set, set_once, groups, timestamp, config)
    return await _adrive(conn, _guard_steps(_Exec(statement), _is_returned, emit), "mark_first")


async def aemit_if_first(
    conn: Any,
    statement: str | Executable | psycopg_sql.Composable,
    params: Mapping[str, Any] | None = None,
    *,
    event: str,
    distinct_id: DistinctIdArg,
    properties: PropertiesArg = None,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> FirstTime:
    """:func:`emit_if_first` on a SQLAlchemy ``AsyncSession`` or ``AsyncConnection``, or
    a ``psycopg.AsyncConnection``."""
    emit = _emit(event, distinct_id, properties, set, set_once, groups, timestamp, config)
    return await _adrive(
        conn, _guard_steps(_Exec(statement, params), _is_first_row, emit), "emit_if_first"
    )
