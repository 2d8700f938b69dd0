"""Writing events into the outbox, inside the caller's own transaction.

``enqueue`` and friends never begin, commit or roll back: they run one INSERT on the
connection or session they are given, so the event commits or rolls back with
whatever else that transaction writes. Input is validated in Python first, so bad
input raises :class:`~outbox.exceptions.OutboxValidationError` before anything
reaches the database and the caller's transaction stays usable.
"""

from __future__ import annotations

import json
import uuid as uuid_module
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Connection as SAConnection
from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, scoped_session

from outbox.exceptions import (
    OutboxDatabaseError,
    OutboxNotInstalledError,
    OutboxValidationError,
    UnsupportedConnectionError,
)
from outbox.validation import PreparedEvent, prepare_event

__all__ = ["aenqueue", "aenqueue_many", "enqueue", "enqueue_many"]

# One statement for one event or many: the events travel as a single JSON parameter
# (driver-neutral, one round trip). Nothing is read back from outbox_events, so the
# application's role needs only INSERT on it (the uuids are made in Python).
_INPUT = """
    SELECT * FROM jsonb_to_recordset(CAST({rows} AS jsonb))
        AS r(uuid uuid, event text, distinct_id text, properties jsonb,
             "timestamp" timestamptz, dedup_key text, n bigint)
"""
_COLUMNS = """
INSERT INTO outbox_events (uuid, event, distinct_id, properties, "timestamp", dedup_key)
SELECT uuid, event, distinct_id, properties, coalesce("timestamp", now()), dedup_key
"""
_PLAIN_SQL = _COLUMNS + "FROM (" + _INPUT + ") AS input ORDER BY n"

# With dedup keys, the keys are claimed in the same statement and only events whose
# key was free (or that have none) are inserted; the claimed keys come back, which
# tells which events were written. A key is free when it is new, or when the event
# that held it was delivered longer ago than the window (the worker sets expires_at
# at delivery; an undelivered event holds 'infinity').
_DEDUP_SQL = (
    "WITH input AS ("
    + _INPUT
    + """), claimed_keys AS (
    INSERT INTO outbox_dedup_keys (dedup_key, expires_at)
    SELECT dedup_key, 'infinity' FROM input WHERE dedup_key IS NOT NULL
    ON CONFLICT (dedup_key) DO UPDATE SET expires_at = 'infinity'
        WHERE outbox_dedup_keys.expires_at <= now()
    RETURNING dedup_key
), inserted AS ("""
    + _COLUMNS
    + """    FROM input
    WHERE dedup_key IS NULL OR dedup_key IN (SELECT dedup_key FROM claimed_keys)
    ORDER BY n
)
SELECT dedup_key FROM claimed_keys
"""
)


class _Statements:
    """One SQL text in the two placeholder styles: psycopg's and SQLAlchemy's."""

    def __init__(self, sql: str) -> None:
        self.psycopg = sql.format(rows="%(rows)s")
        self.sqlalchemy = text(sql.format(rows=":rows"))


_PLAIN = _Statements(_PLAIN_SQL)
_DEDUP = _Statements(_DEDUP_SQL)


def enqueue(
    conn: Any,
    event: str,
    distinct_id: str | int | uuid_module.UUID,
    properties: Mapping[str, Any] | None = None,
    *,
    timestamp: datetime | str | None = None,
    dedup_key: str | None = None,
    uuid: uuid_module.UUID | str | None = None,
) -> uuid_module.UUID | None:
    """Add one event to the outbox in the caller's transaction.

    ``conn`` is a SQLAlchemy ``Session`` or ``Connection``, or a psycopg
    ``Connection``. The row commits or rolls back with that transaction; this
    function never begins, commits or rolls back. ``timestamp`` defaults to the
    transaction's ``now()``; ``uuid`` to a new UUIDv7, which PostHog uses as the
    event's identity (a re-send is dropped as a duplicate).

    Returns the event's uuid, or ``None`` when ``dedup_key`` is already held by an
    undelivered event or by one delivered within the worker's dedup window.

    Raises :class:`OutboxValidationError` (naming the field) before touching the
    database when the input cannot become a PostHog event.
    """
    prepared = prepare_event(
        event, distinct_id, properties, timestamp=timestamp, dedup_key=dedup_key, uuid=uuid
    )
    return enqueue_prepared(conn, [prepared])[0]


def enqueue_many(conn: Any, events: Iterable[Mapping[str, Any]]) -> list[uuid_module.UUID | None]:
    """Add several events with one statement; each item has ``enqueue``'s parameter names.

    Returns one entry per item, in order: the uuid, or ``None`` for a duplicate
    dedup key (including a key repeated within ``events``). Nothing is written when
    any item is invalid; the error names it, e.g. ``events[3].distinct_id``.
    """
    return enqueue_prepared(conn, _prepare_all(events))


async def aenqueue(
    conn: Any,
    event: str,
    distinct_id: str | int | uuid_module.UUID,
    properties: Mapping[str, Any] | None = None,
    *,
    timestamp: datetime | str | None = None,
    dedup_key: str | None = None,
    uuid: uuid_module.UUID | str | None = None,
) -> uuid_module.UUID | None:
    """The async twin of :func:`enqueue`, for ``AsyncSession``, ``AsyncConnection``
    (SQLAlchemy) and psycopg's ``AsyncConnection``."""
    prepared = prepare_event(
        event, distinct_id, properties, timestamp=timestamp, dedup_key=dedup_key, uuid=uuid
    )
    return (await aenqueue_prepared(conn, [prepared]))[0]


async def aenqueue_many(
    conn: Any, events: Iterable[Mapping[str, Any]]
) -> list[uuid_module.UUID | None]:
    """The async twin of :func:`enqueue_many`."""
    return await aenqueue_prepared(conn, _prepare_all(events))


_ENQUEUE_KEYS = frozenset({"event", "distinct_id", "properties", "timestamp", "dedup_key", "uuid"})


def _prepare_all(events: Iterable[Mapping[str, Any]]) -> list[PreparedEvent]:
    prepared: list[PreparedEvent] = []
    for index, item in enumerate(events):
        prefix = f"events[{index}]."
        if not isinstance(item, Mapping):
            raise OutboxValidationError(
                f"events[{index}]", "must be a mapping of enqueue arguments"
            )
        unknown = set(item) - _ENQUEUE_KEYS
        if unknown:
            raise OutboxValidationError(prefix + sorted(unknown)[0], "is not an enqueue argument")
        for required in ("event", "distinct_id"):
            if required not in item:
                raise OutboxValidationError(prefix + required, "is required")
        prepared.append(
            prepare_event(
                item["event"],
                item["distinct_id"],
                item.get("properties"),
                timestamp=item.get("timestamp"),
                dedup_key=item.get("dedup_key"),
                uuid=item.get("uuid"),
                field_prefix=prefix,
            )
        )
    return prepared


def _rows_param(events: Sequence[PreparedEvent]) -> str:
    dumps = json.dumps
    parts = []
    for n, e in enumerate(events):
        timestamp = "null" if e.timestamp is None else f'"{e.timestamp.isoformat()}"'
        dedup_key = "null" if e.dedup_key is None else dumps(e.dedup_key, ensure_ascii=False)
        parts.append(
            f'{{"n":{n},"uuid":"{e.uuid}","event":{dumps(e.event, ensure_ascii=False)},'
            f'"distinct_id":{dumps(e.distinct_id, ensure_ascii=False)},'
            f'"properties":{e.properties_json},"timestamp":{timestamp},"dedup_key":{dedup_key}}}'
        )
    return "[" + ",".join(parts) + "]"


def _unique_keys(events: Sequence[PreparedEvent]) -> list[PreparedEvent]:
    """Drop later events that repeat a dedup key within the same call."""
    seen: set[str] = set()
    kept: list[PreparedEvent] = []
    for e in events:
        if e.dedup_key is not None:
            if e.dedup_key in seen:
                continue
            seen.add(e.dedup_key)
        kept.append(e)
    return kept


class _Call:
    """One enqueue call: the events to send (the first of each dedup key), the
    statement and its parameter, and how to read the outcome."""

    def __init__(self, events: Sequence[PreparedEvent]) -> None:
        self.events = events
        self.sent = _unique_keys(events)
        self.reads_keys = any(e.dedup_key is not None for e in self.sent)
        self.statements = _DEDUP if self.reads_keys else _PLAIN
        self.params = {"rows": _rows_param(self.sent)}

    def results(self, claimed: Iterable[str]) -> list[uuid_module.UUID | None]:
        """Each event's uuid if it was written, else None."""
        keys = set(claimed)
        written = {e.uuid for e in self.sent if e.dedup_key is None or e.dedup_key in keys}
        return [e.uuid if e.uuid in written else None for e in self.events]


def _translate(exc: Exception) -> Exception:
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    if isinstance(orig, psycopg.errors.UndefinedTable):
        return OutboxNotInstalledError()
    if isinstance(orig, psycopg.errors.UniqueViolation) and "outbox_events_uuid_key" in str(orig):
        return OutboxDatabaseError(
            "an event with this uuid is already in the outbox; the caller's transaction "
            "is aborted and must be rolled back"
        )
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return OutboxDatabaseError(f"the outbox INSERT failed: {first}")


def enqueue_prepared(conn: Any, events: Sequence[PreparedEvent]) -> list[uuid_module.UUID | None]:
    """Insert already validated events on ``conn`` (see :func:`enqueue_many`)."""
    if not events:
        return []
    call = _Call(events)
    try:
        if isinstance(conn, psycopg.Connection | psycopg.Cursor):
            cursor = conn.execute(call.statements.psycopg, call.params)
            claimed = [r[0] for r in cursor.fetchall()] if call.reads_keys else []
        elif isinstance(conn, Session | SAConnection | scoped_session):
            result = conn.execute(call.statements.sqlalchemy, call.params)
            claimed = list(result.scalars()) if call.reads_keys else []
        else:
            raise _unsupported(conn, sync=True)
    except (sa_exc.DBAPIError, psycopg.Error) as exc:
        raise _translate(exc) from exc
    return call.results(claimed)


async def aenqueue_prepared(
    conn: Any, events: Sequence[PreparedEvent]
) -> list[uuid_module.UUID | None]:
    """The async twin of :func:`enqueue_prepared`."""
    if not events:
        return []
    call = _Call(events)
    try:
        if isinstance(conn, psycopg.AsyncConnection | psycopg.AsyncCursor):
            cursor = await conn.execute(call.statements.psycopg, call.params)
            claimed = [r[0] for r in await cursor.fetchall()] if call.reads_keys else []
        elif isinstance(conn, AsyncSession | SAAsyncConnection):
            result = await conn.execute(call.statements.sqlalchemy, call.params)
            claimed = list(result.scalars()) if call.reads_keys else []
        else:
            raise _unsupported(conn, sync=False)
    except (sa_exc.DBAPIError, psycopg.Error) as exc:
        raise _translate(exc) from exc
    return call.results(claimed)


def _unsupported(conn: Any, *, sync: bool) -> UnsupportedConnectionError:
    name = f"{type(conn).__module__}.{type(conn).__qualname__}"
    if sync:
        return UnsupportedConnectionError(
            f"enqueue() got {name}; it needs a SQLAlchemy Session or Connection, or a "
            "psycopg Connection (use aenqueue() for async connections)"
        )
    return UnsupportedConnectionError(
        f"aenqueue() got {name}; it needs a SQLAlchemy AsyncSession or AsyncConnection, "
        "or a psycopg AsyncConnection (use enqueue() for sync connections)"
    )
