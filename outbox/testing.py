"""Assertions on what a transaction enqueued, for an application's own tests.

A test that runs the code under test inside a transaction it rolls back at the end
(the usual fixture, and Django's ``TestCase``) can ask what that code put into the
outbox before anything commits::

    from outbox.testing import assert_enqueued

    place_order(session, user_id="user-42")
    assert_enqueued(session, "order_placed", distinct_id="user-42", properties={"total": 30})

Every function takes the connection or session the code under test wrote on, of any
kind ``enqueue()`` takes (psycopg, SQLAlchemy ``Session``/``Connection``, Django's
connection; the ``a`` functions the async forms), reads the view ``outbox_events`` on it
(never as a prepared statement, see :mod:`outbox._db`), and begins, commits or rolls
back nothing: a read on a connection outside a transaction begins one only where the
driver always does (psycopg outside autocommit, SQLAlchemy's autobegin).

Every event not yet delivered is a row of the view ``outbox_events`` (the event tables'
undelivered rows and ``outbox_retry``'s). Which rows count (``scope``):

``"transaction"`` (the default)
    Only the rows the connection's open transaction inserted and has not committed,
    including those inserted inside savepoints it released or still holds (a row
    from a savepoint rolled back to is gone, so it is not seen). Rows committed
    earlier, by this connection or any other, are left out, so a row left behind by
    an earlier test cannot make an assertion pass. A row is the transaction's own
    when its ``txid`` (the id of the top-level transaction that inserted it, which
    subtransactions share) is this transaction's id: a transaction that has none
    yet (``pg_current_xact_id_if_assigned()`` is null) wrote nothing. This assigns no
    transaction id (``txid_current()`` would) and works under every isolation level.
    A connection in autocommit mode outside a transaction is refused with this
    scope, since nothing it wrote can be uncommitted.
``"all"``
    Every undelivered row the connection can see: its transaction's uncommitted rows
    and the committed ones (waiting in an event table, or in ``outbox_retry`` after a
    failed delivery). :attr:`EnqueuedEvent.in_transaction` tells them apart.

Events are returned in the order they were enqueued: ``outbox_retry``'s rows first
(by ``retry_id``), then by ``txid``, and a transaction's rows in the order it wrote
them. Matching:
``event`` and ``distinct_id`` compare with the stored value (a distinct_id passed as
an ``int`` or ``uuid.UUID`` is stored, and compared, as its text); ``properties``
is a subset: every key given must be stored with an equal value, other stored keys
are ignored. The expected values are first converted as ``enqueue()`` converts
properties (a tuple becomes a list, a ``datetime`` its ISO 8601 text, ...), so a
test can pass what the code passed.

The failure messages list what was enqueued, at most :data:`MAX_LISTED` events,
each shown with :func:`repr` (control and invisible characters escaped) and cut at
:data:`MAX_LINE` characters. The module imports neither pytest nor the worker.
"""

from __future__ import annotations

import json
import uuid as uuid_module
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import psycopg
from sqlalchemy import exc as sa_exc

from outbox import _db
from outbox.exceptions import (
    OutboxDatabaseError,
    OutboxNotInstalledError,
    OutboxValidationError,
    UnsupportedConnectionError,
)
from outbox.validation import check_distinct_id, normalise_properties

__all__ = [
    "MAX_LINE",
    "MAX_LISTED",
    "EnqueuedEvent",
    "Scope",
    "aassert_enqueued",
    "aassert_not_enqueued",
    "aenqueued",
    "assert_enqueued",
    "assert_not_enqueued",
    "enqueued",
]

Scope = Literal["transaction", "all"]
"""Which rows the functions read: see the module's docstring."""

#: At most this many events are listed in an assertion's message.
MAX_LISTED: Final = 10
#: Each listed event is cut to this many characters.
MAX_LINE: Final = 240


@dataclass(frozen=True)
class EnqueuedEvent:
    """One row of the view ``outbox_events``, as the worker will ship it.

    ``properties`` is what is stored: the standard and super properties of the
    configuration, ``$set``/``$set_once``/``$groups`` and the contract's additions
    included. ``timestamp`` is an aware datetime in UTC. ``status`` is ``pending``
    or ``dead``; ``attempts`` and ``retry_id`` (the ``outbox_retry`` row's id) are
    0 and ``None`` for an event no delivery has failed yet. ``txid`` is the id of the
    transaction that inserted it into its event table (as the view reports it).
    ``in_transaction`` is true when the connection's open transaction inserted the
    row and has not committed it (always true with the default scope).
    """

    event: str
    distinct_id: str
    properties: dict[str, Any]
    timestamp: datetime
    uuid: uuid_module.UUID
    dedup_key: str | None
    destination: str
    status: str
    attempts: int
    retry_id: int | None
    txid: int | None
    in_transaction: bool

    def describe(self, note: str = "") -> str:
        """One line naming the event, for messages: bounded and terminal-safe.
        ``note`` goes before the properties, so that cutting the line keeps it."""
        line = (
            f"{self.event!r} distinct_id={self.distinct_id!r}"
            + ("" if self.in_transaction else " (committed)")
            + (f" ({note})" if note else "")
            + f" properties={self.properties!r}"
        )
        return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


# --------------------------------------------------------------------------- SQL
#
# Every column comes back as text, an integer or a boolean, so the result is the
# same whatever loaders the connection has registered (Django's return json and
# jsonb as text, for one).
#
# Which rows are the open transaction's: those of the event tables whose txid (the
# column's default, txid_current(): the top-level transaction's id, also inside a
# savepoint) is this transaction's. Nothing is ours when the transaction has no id
# yet (pg_current_xact_id_if_assigned() is null: it wrote nothing). Other
# transactions' uncommitted rows are invisible anyway; the application never writes
# outbox_retry. The rows come in the view's order (each event table in the order its
# rows were written, then outbox_retry): _read sorts them without a sort on the
# server, so that a transaction's rows keep the order it wrote them in.

_PROBE: Final = """
SELECT to_regclass('outbox_events') IS NOT NULL AS installed,
       coalesce((SELECT relkind = 'v' FROM pg_class
                 WHERE oid = to_regclass('outbox_events')), false) AS current,
       has_table_privilege(CAST(to_regclass('outbox_events') AS oid), 'SELECT') AS readable"""

_ROWS: Final = """
SELECT e.retry_id, CAST(e.uuid AS text) AS uuid, e.event, e.distinct_id,
       CAST(e.properties AS text) AS properties,
       to_char(e."timestamp" AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') AS "timestamp",
       e.dedup_key, e.destination, e.status, e.attempts, e.txid,
       e.retry_id IS NULL AND e.txid = r.top AS in_transaction
FROM (SELECT CAST(CAST(pg_current_xact_id_if_assigned() AS text) AS bigint) AS top) AS r
CROSS JOIN outbox_events AS e {where}"""

_OWN_ROWS: Final = _ROWS.format(where="WHERE e.retry_id IS NULL AND e.txid = r.top")
_ALL_ROWS: Final = _ROWS.format(where="")
_VISIBLE_COUNT: Final = "SELECT count(*) AS n FROM outbox_events"

Row = Mapping[str, Any]
# The core says which statement to run and gets its rows back; the drivers run it.
_Steps = Generator[str, list[Row], Any]


# --------------------------------------------------------------------------- the core


@dataclass(frozen=True)
class _Filter:
    """What an assertion looks for, checked and converted before anything runs."""

    event: str | None
    distinct_id: str | None
    properties: dict[str, object] | None

    def matches(self, e: EnqueuedEvent) -> bool:
        if self.event is not None and e.event != self.event:
            return False
        if self.distinct_id is not None and e.distinct_id != self.distinct_id:
            return False
        if self.properties is not None:
            for key, value in self.properties.items():
                if key not in e.properties or e.properties[key] != value:
                    return False
        return True

    def differences(self, e: EnqueuedEvent) -> str:
        """How ``e`` differs from what is looked for ("" when it matches)."""
        found = []
        if self.event is not None and e.event != self.event:
            found.append("event differs")
        if self.distinct_id is not None and e.distinct_id != self.distinct_id:
            found.append("distinct_id differs")
        for key, value in (self.properties or {}).items():
            if key not in e.properties:
                found.append(f"no {key!r}")
            elif e.properties[key] != value:
                found.append(f"{key!r} is {_cut(e.properties[key])}, not {_cut(value)}")
        return "; ".join(found)

    def describe(self) -> str:
        parts = ["event" if self.event is None else f"event {self.event!r}"]
        if self.distinct_id is not None:
            parts.append(f"for distinct_id {self.distinct_id!r}")
        if self.properties is not None:
            parts.append(f"with properties including {self.properties!r}")
        text = " ".join(parts)
        return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


def _filter(event: object, distinct_id: object, properties: object) -> _Filter:
    if event is not None and not isinstance(event, str):
        raise OutboxValidationError("event", f"must be a str or None, got {type(event).__name__}")
    wanted_id = None if distinct_id is None else check_distinct_id(distinct_id)
    wanted = None if properties is None else normalise_properties(properties, "properties")
    return _Filter(None if event is None else event.strip(), wanted_id, wanted)


def _scope(scope: object) -> Scope:
    if scope == "transaction":
        return "transaction"
    if scope == "all":
        return "all"
    raise OutboxValidationError("scope", f"must be 'transaction' or 'all', got {scope!r}")


def _moment(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _event(row: Row) -> EnqueuedEvent:
    retry_id = row["retry_id"]
    return EnqueuedEvent(
        event=row["event"],
        distinct_id=row["distinct_id"],
        properties=json.loads(row["properties"]),
        timestamp=_moment(row["timestamp"]),
        uuid=uuid_module.UUID(row["uuid"]),
        dedup_key=row["dedup_key"],
        destination=row["destination"],
        status=row["status"],
        attempts=int(row["attempts"]),
        retry_id=None if retry_id is None else int(retry_id),
        txid=None if row["txid"] is None else int(row["txid"]),
        in_transaction=bool(row["in_transaction"]),
    )


def _order(numbered: tuple[int, EnqueuedEvent]) -> tuple[int, int, int]:
    """Retries first by id, then by transaction, each in the order it was read."""
    n, e = numbered
    if e.retry_id is not None:
        return (0, e.retry_id, n)
    return (1, e.txid or 0, n)


def _read(scope: Scope) -> _Steps:
    """All events in ``scope``, in enqueue order."""
    [probe] = yield _PROBE
    if not probe["installed"]:
        raise OutboxNotInstalledError()
    if not probe["current"]:
        raise OutboxNotInstalledError(
            "the outbox tables predate this version (outbox_events is not the view of "
            "migration 0007): run `outbox-worker migrate` first"
        )
    if not probe["readable"]:
        raise OutboxDatabaseError(
            "this database role may not read outbox_events: the testing helpers need "
            "SELECT on it (GRANT SELECT ON outbox_events TO <the test role>)"
        )
    rows = yield (_OWN_ROWS if scope == "transaction" else _ALL_ROWS)
    return [e for _, e in sorted(enumerate(_event(row) for row in rows), key=_order)]


def _cut(value: object, limit: int = 40) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _listing(events: Sequence[EnqueuedEvent], wanted: _Filter | None = None) -> str:
    """The events, one line each; with ``wanted``, each says how it differs."""
    lines = [
        f"  {i}. {e.describe(wanted.differences(e) if wanted else '')}"
        for i, e in enumerate(events[:MAX_LISTED], 1)
    ]
    if len(events) > MAX_LISTED:
        lines.append(f"  ... and {len(events) - MAX_LISTED} more")
    return "\n".join(lines)


def _where(scope: Scope) -> str:
    return "by this transaction" if scope == "transaction" else "in the outbox"


def _enqueued_steps(wanted: _Filter, scope: Scope) -> _Steps:
    events = yield from _read(scope)
    return [e for e in events if wanted.matches(e)]


def _assert_steps(wanted: _Filter, scope: Scope, count: int | None) -> _Steps:
    events = yield from _read(scope)
    found = [e for e in events if wanted.matches(e)]
    if (len(found) >= 1) if count is None else (len(found) == count):
        return found
    expected = "at least one" if count is None else f"exactly {count}"
    message = [
        f"expected {expected} {wanted.describe()} enqueued {_where(scope)}, "
        f"found {len(found)}" + (":" if found and count is not None else ".")
    ]
    if found and count is not None:
        message.append(_listing(found))
    elif events:
        message.append(f"Enqueued {_where(scope)} ({len(events)}):")
        message.append(_listing(events, wanted))
    else:
        message.append(f"Nothing was enqueued {_where(scope)}.")
    if scope == "transaction" and not found:
        [visible] = yield _VISIBLE_COUNT
        committed = int(visible["n"]) - len(events)
        if committed > 0:
            message.append(
                f"{committed} committed event(s) are in the outbox too; scope='all' includes them."
            )
    raise AssertionError("\n".join(message))


def _assert_not_steps(wanted: _Filter, scope: Scope) -> _Steps:
    events = yield from _read(scope)
    found = [e for e in events if wanted.matches(e)]
    if found:
        raise AssertionError(
            f"expected no {wanted.describe()} enqueued {_where(scope)}, found {len(found)}:\n"
            + _listing(found)
        )


def _count(count: object) -> int | None:
    if count is None:
        return None
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise OutboxValidationError("count", f"must be an int >= 0 or None, got {count!r}")
    return count


# --------------------------------------------------------------------------- drivers


def _name(conn: Any) -> str:
    return f"{type(conn).__module__}.{type(conn).__qualname__}"


def _check(conn: Any, scope: Scope, *, sync: bool) -> Any:
    """The object to run statements on (Django's connection resolved), or raise."""
    conn = _db.resolve(conn)
    if isinstance(conn, psycopg.Cursor | psycopg.AsyncCursor):
        conn = conn.connection
    if isinstance(conn, psycopg.Connection | psycopg.AsyncConnection):
        if isinstance(conn, psycopg.Connection) != sync:
            raise UnsupportedConnectionError(_wrong_kind(conn, sync=sync))
        idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if scope == "transaction" and conn.autocommit and idle:
            raise UnsupportedConnectionError(
                "this connection is in autocommit mode outside a transaction, so nothing "
                "it enqueued is uncommitted: run the code under test in a transaction "
                "(`with conn.transaction():`, Django's `transaction.atomic()`), or pass "
                "scope='all' to read committed events"
            )
        return conn
    if _db.is_sync(conn) if sync else _db.is_async(conn):
        return conn
    if _db.is_sync(conn) or _db.is_async(conn):
        raise UnsupportedConnectionError(_wrong_kind(conn, sync=sync))
    raise UnsupportedConnectionError(
        f"outbox.testing got {_name(conn)}; it reads on a SQLAlchemy Session or Connection, "
        "a psycopg Connection or Django's connection (AsyncSession, AsyncConnection or "
        "psycopg.AsyncConnection for aenqueued, aassert_enqueued and aassert_not_enqueued)"
    )


def _wrong_kind(conn: Any, *, sync: bool) -> str:
    if sync:
        return (
            f"{_name(conn)} is asynchronous: use aenqueued, aassert_enqueued or "
            "aassert_not_enqueued"
        )
    return f"{_name(conn)} is synchronous: use enqueued, assert_enqueued or assert_not_enqueued"


def _failed(exc: Exception) -> OutboxDatabaseError:
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return OutboxDatabaseError(f"reading outbox_events failed: {first}")


def _execute(conn: Any, statement: str) -> list[Row]:
    try:
        return list(_db.execute(conn, statement))
    except (sa_exc.DBAPIError, psycopg.Error) as exc:
        raise _failed(exc) from exc


async def _aexecute(conn: Any, statement: str) -> list[Row]:
    try:
        return list(await _db.aexecute(conn, statement))
    except (sa_exc.DBAPIError, psycopg.Error) as exc:
        raise _failed(exc) from exc


def _drive(conn: Any, scope: Scope, steps: _Steps) -> Any:
    target = _check(conn, scope, sync=True)
    try:
        statement = next(steps)
        while True:
            statement = steps.send(_execute(target, statement))
    except StopIteration as done:
        return done.value


async def _adrive(conn: Any, scope: Scope, steps: _Steps) -> Any:
    target = _check(conn, scope, sync=False)
    try:
        statement = next(steps)
        while True:
            statement = steps.send(await _aexecute(target, statement))
    except StopIteration as done:
        return done.value


# --------------------------------------------------------------------------- public


def enqueued(
    conn: Any,
    event: str | None = None,
    *,
    distinct_id: str | int | uuid_module.UUID | None = None,
    properties: Mapping[str, Any] | None = None,
    scope: Scope = "transaction",
) -> list[EnqueuedEvent]:
    """The events ``conn``'s open transaction enqueued (``scope="all"``: every event
    it can see) that match ``event``, ``distinct_id`` and ``properties`` (a subset),
    in the order they were enqueued. Nothing is committed."""
    s = _scope(scope)
    result: list[EnqueuedEvent] = _drive(
        conn, s, _enqueued_steps(_filter(event, distinct_id, properties), s)
    )
    return result


def assert_enqueued(
    conn: Any,
    event: str | None = None,
    *,
    distinct_id: str | int | uuid_module.UUID | None = None,
    properties: Mapping[str, Any] | None = None,
    count: int | None = None,
    scope: Scope = "transaction",
) -> list[EnqueuedEvent]:
    """Fail unless a matching event was enqueued (``count``: exactly that many).

    Returns the matching events. The :class:`AssertionError` says what was looked for
    and lists what was enqueued instead; when nothing matched with the default scope,
    it also says how many committed events it left out.
    """
    s = _scope(scope)
    steps = _assert_steps(_filter(event, distinct_id, properties), s, _count(count))
    result: list[EnqueuedEvent] = _drive(conn, s, steps)
    return result


def assert_not_enqueued(
    conn: Any,
    event: str | None = None,
    *,
    distinct_id: str | int | uuid_module.UUID | None = None,
    properties: Mapping[str, Any] | None = None,
    scope: Scope = "transaction",
) -> None:
    """Fail if a matching event was enqueued, listing the ones that match.
    Without filters: fail if anything was."""
    s = _scope(scope)
    _drive(conn, s, _assert_not_steps(_filter(event, distinct_id, properties), s))


async def aenqueued(
    conn: Any,
    event: str | None = None,
    *,
    distinct_id: str | int | uuid_module.UUID | None = None,
    properties: Mapping[str, Any] | None = None,
    scope: Scope = "transaction",
) -> list[EnqueuedEvent]:
    """:func:`enqueued` on an ``AsyncSession``, ``AsyncConnection`` or
    ``psycopg.AsyncConnection``."""
    s = _scope(scope)
    result: list[EnqueuedEvent] = await _adrive(
        conn, s, _enqueued_steps(_filter(event, distinct_id, properties), s)
    )
    return result


async def aassert_enqueued(
    conn: Any,
    event: str | None = None,
    *,
    distinct_id: str | int | uuid_module.UUID | None = None,
    properties: Mapping[str, Any] | None = None,
    count: int | None = None,
    scope: Scope = "transaction",
) -> list[EnqueuedEvent]:
    """:func:`assert_enqueued` on an async connection or session."""
    s = _scope(scope)
    steps = _assert_steps(_filter(event, distinct_id, properties), s, _count(count))
    result: list[EnqueuedEvent] = await _adrive(conn, s, steps)
    return result


async def aassert_not_enqueued(
    conn: Any,
    event: str | None = None,
    *,
    distinct_id: str | int | uuid_module.UUID | None = None,
    properties: Mapping[str, Any] | None = None,
    scope: Scope = "transaction",
) -> None:
    """:func:`assert_not_enqueued` on an async connection or session."""
    s = _scope(scope)
    await _adrive(conn, s, _assert_not_steps(_filter(event, distinct_id, properties), s))
