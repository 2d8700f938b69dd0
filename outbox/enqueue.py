"""Writing events into the outbox, inside the caller's own transaction.

``enqueue`` and friends never begin, commit or roll back: they run one INSERT on the
connection or session they are given, so the event commits or rolls back with
whatever else that transaction writes. Input is validated in Python first, so bad
input raises :class:`~outbox.exceptions.OutboxValidationError` before anything
reaches the database and the caller's transaction stays usable.

Before validation each event is stamped (:func:`prepare_enqueue`): the
configuration's standard and super properties go under the event's own, an
:class:`~outbox.actors.Actor`'s properties and the tags of the current
:func:`outbox.new_context` likewise, ``set=``/``set_once=``/``groups=``
become ``$set``/``$set_once``/``$groups``, and the event contract decides whether
the event is person-less or metrics-only, and in strict mode whether it is allowed.
What is validated is exactly what is stored.
"""

from __future__ import annotations

import json.encoder
import time
import uuid as uuid_module
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, cast

import orjson
import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from outbox._db import FOLLOW, aexecute, execute, execute_args, is_async, is_sync, resolve
from outbox.actors import Actor
from outbox.config import AnalyticsConfig, get_config
from outbox.contexts import current_scope
from outbox.exceptions import (
    OutboxDatabaseError,
    OutboxNotInstalledError,
    OutboxValidationError,
    UnsupportedConnectionError,
)
from outbox.schema import EVENT_TABLES, NOTIFY_CHANNEL, event_table, event_table_slot
from outbox.validation import (
    DESTINATION_METRICS,
    DESTINATION_POSTHOG,
    Destination,
    PreparedEvent,
    _prepare_event,
    prepare_event,
)

__all__ = ["aenqueue", "aenqueue_many", "enqueue", "enqueue_many", "prepare_enqueue"]

# Every statement runs on the caller's connection through outbox._db, which lists the
# connections the library writes on (PSYCOPG_SYNC and friends). The statements here are
# sent with prepare=FOLLOW: a server-side prepared statement if and when the
# connection would prepare one of the caller's own (psycopg's prepare_threshold,
# None behind a transaction pooler that cannot carry them; a ClientCursor never).
# So each statement's text is fixed for its shape of call: a handful per event
# table, whatever the number of events, so that they neither crowd the caller's
# statements out of psycopg's cache of prepared statements (prepared_max, 100) nor
# leave one prepared statement per batch size on the server.

DistinctId = str | int | uuid_module.UUID | Actor
"""What ``enqueue()`` takes as ``distinct_id``: an id, or an :class:`~outbox.actors.Actor`."""

# One statement per call, whatever the number of events, so one round trip. Nothing
# is read back, so the application's role needs only INSERT on the event tables (the
# uuids are made in Python).
#
# The events go into the event table the clock picks (outbox.schema.event_table_slot,
# the rule of the database's outbox_snapshot_slot(), from this process's clock): the
# snapshot engine reads every event table, so a clock that disagrees with the
# server's near a slot boundary only writes to the neighbouring table. Rotation
# truncates a table only under an ACCESS EXCLUSIVE lock taken with NOWAIT after
# finding every row in it delivered, so a row written there meanwhile is either
# waited for (the INSERT holds its lock until the caller commits) or written after
# the TRUNCATE. ``properties`` is stored as ``json``: the text orjson made, checked
# by the server's JSON lexer but never parsed into jsonb. ``destination`` is NULL for
# an ordinary event and 'metrics' for a metrics-only one; ``txid`` is the column's
# default (txid_current()), which the engine's snapshots read.
#
# A single event (the common enqueue() call) travels as one parameter per column in
# a VALUES list, the cheapest INSERT there is: only the columns it has a value for
# (a null timestamp is the column's default, now(); a null destination is NULL). The
# parameters of the columns that are not text are cast (_NOT_TEXT), so that the
# statement also works on a connection whose driver sends a str typed as text
# rather than untyped (psycopg's default): about 1.5 us of the server's time.
_ONE_COLUMNS = (("u", "uuid"), ("e", "event"), ("d", "distinct_id"), ("p", "properties"))
_ONE_OPTIONAL = (("t", '"timestamp"'), ("s", "destination"))
_NOT_TEXT = {"u": "uuid", "p": "json", "t": "timestamptz"}
_ONE_PLAIN_SQL = """
INSERT INTO {table} ({columns}) VALUES ({values})"""
# Waking the workers too: the same row from a SELECT over the one-row pg_notify call;
# a SELECT list gives untyped parameters the type text, so they are cast here.
_ONE_CASTS = {"u": "uuid", "e": "text", "d": "text", "p": "json", "t": "timestamptz", "s": "text"}
_ONE_WAKE_SQL = """
INSERT INTO {table} ({columns})
SELECT {casts}{wake}"""
# Several events without dedup keys travel as one JSON array per column (fixed text
# for any number of events; every parameter is JSON text, so the statement is
# driver-neutral): ROWS FROM reads the arrays side by side, the properties with
# json_array_elements, which hands each element over as the text of that value, and
# the json column takes it without parsing it again. WITH ORDINALITY numbers the
# events in array order, so ORDER BY n inserts them in call order without a sort
# step. The timestamp and destination columns are there only when an event has one
# (a null timestamp is the transaction's now(), as the column's default). uuids are
# written as 32 hex digits (uuid input takes them, and Python makes them faster than
# the hyphenated form). Measured against a multi-row VALUES list (one statement per
# number of events) and unnest() of PostgreSQL arrays, prepared, ten events: about
# as cheap for the server as the VALUES list and cheaper for Python (four parameters
# instead of forty).
_MANY_SQL = """
INSERT INTO {table} (uuid, event, distinct_id, properties{columns})
SELECT CAST(u AS uuid), e, d, p{values}
FROM ROWS FROM (
    json_array_elements_text(CAST({u} AS json)),
    json_array_elements_text(CAST({e} AS json)),
    json_array_elements_text(CAST({d} AS json)),
    json_array_elements(CAST({p} AS json)){arrays}
) WITH ORDINALITY AS r(u, e, d, p{names}, n){wake}
ORDER BY n"""
_MANY_OPTIONAL = {
    "t": ('"timestamp"', "coalesce(CAST(t AS timestamptz), now())"),
    "s": ("destination", "s"),
}

# With dedup keys, the events go through a function (SECURITY DEFINER; migration
# 0004, redefined over the event tables by 0007, same signatures), so the
# application's role needs no right on outbox_dedup_keys: it claims the keys and
# inserts only the events whose key was free (or that have none), and returns the
# claimed keys, which tells which events were written. A key is free when it is new,
# or when the event that held it was delivered longer ago than the window (the
# worker sets expires_at at delivery; an undelivered event holds 'infinity'). The
# one-event function takes one parameter per column (properties as jsonb, as its
# signature says), the many-event one a JSON array as above with k the dedup key.
_KEYED_ONE_SQL = """
SELECT outbox_enqueue_keyed(CAST({u} AS uuid), CAST({e} AS text), CAST({d} AS text),
    CAST({p} AS jsonb), CAST({s} AS text), CAST({t} AS timestamptz), CAST({k} AS text))
FROM (SELECT 1{wake}) AS one"""
_KEYED_MANY_SQL = """
SELECT k.k FROM (SELECT 1{wake}) AS one
LEFT JOIN outbox_enqueue_keyed_rows(CAST({rows} AS jsonb)) AS k(k) ON true"""

# Waking the workers: the statement also calls pg_notify, which PostgreSQL delivers
# only if the transaction commits. Every notifying commit takes a cluster-wide lock,
# so each process notifies at most once per NOTIFY_INTERVAL; a worker that was woken
# keeps looking for longer than that (worker.app.HOT_LINGER), so an event whose
# notification was throttled away is still found at once. Polling stays the fallback.
NOTIFY_INTERVAL = 0.05
_NOTIFY = f"(SELECT pg_notify('{NOTIFY_CHANNEL}', '')) AS wake"
_last_notify = 0.0

_ONE_PARAMS = ("u", "e", "d", "p", "s", "t", "k")
_MANY_PARAMS = ("u", "e", "d", "p", "s", "t")
_KEYED_MANY_PARAMS = ("rows",)


class _Statements:
    """One SQL text in the two placeholder styles: psycopg's and SQLAlchemy's."""

    def __init__(self, sql: str, params: Sequence[str], **parts: str) -> None:
        def render(style: str) -> str:
            names = {name: style.format(name) for name in params}
            filled = {key: part.format(**names) for key, part in parts.items()}
            return sql.format(**filled, **names)

        self.psycopg = render("%({})s")
        self.sqlalchemy = text(render(":{}"))
        #: When set, the same statement in psycopg's positional style (``%s``), and
        #: the names of its parameters in their order.
        self.positional: str | None = None
        self.order: tuple[str, ...] = ()


def _one_plain(wake: bool, slot: int, given: tuple[str, ...]) -> _Statements:
    """The one-event INSERT into event table ``slot`` of the columns ``given``."""
    pairs = [*_ONE_COLUMNS, *(pair for pair in _ONE_OPTIONAL if pair[0] in given)]
    columns = ", ".join(column for _, column in pairs)
    if wake:
        casts = ", ".join(f"CAST({{{p}}} AS {_ONE_CASTS[p]})" for p, _ in pairs)
        return _Statements(
            _ONE_WAKE_SQL,
            _ONE_PARAMS,
            table=event_table(slot),
            columns=columns,
            casts=casts,
            wake=" FROM " + _NOTIFY,
        )
    values = ", ".join(
        f"CAST({{{p}}} AS {_NOT_TEXT[p]})" if p in _NOT_TEXT else f"{{{p}}}" for p, _ in pairs
    )
    statements = _Statements(
        _ONE_PLAIN_SQL, _ONE_PARAMS, table=event_table(slot), columns=columns, values=values
    )
    # On a psycopg Connection this one goes positionally: cheaper than looking up the
    # names on every call (about 4 us a transaction).
    statements.positional = _ONE_PLAIN_SQL.format(
        table=event_table(slot),
        columns=columns,
        values=values.format(**dict.fromkeys(_ONE_PARAMS, "%s")),
    )
    statements.order = tuple(p for p, _ in pairs)
    return statements


_SHAPES = ((), ("t",), ("s",), ("t", "s"))
# By (wakes the workers, event table, which of timestamp and destination are given).
_ONE_PLAIN = {
    (wake, slot, given): _one_plain(wake, slot, given)
    for wake in (False, True)
    for slot in range(EVENT_TABLES)
    for given in _SHAPES
}


def _many_plain(wake: bool, slot: int, given: tuple[str, ...]) -> _Statements:
    """The many-event INSERT into event table ``slot``, with the optional columns ``given``."""
    optional = [(p, *_MANY_OPTIONAL[p]) for p in ("t", "s") if p in given]
    return _Statements(
        _MANY_SQL,
        _MANY_PARAMS,
        table=event_table(slot),
        columns="".join(f", {column}" for _, column, _ in optional),
        values="".join(f", {value}" for _, _, value in optional),
        arrays="".join(
            f",\n    json_array_elements_text(CAST({{{p}}} AS json))" for p, _, _ in optional
        ),
        names="".join(f", {p}" for p, _, _ in optional),
        wake=", " + _NOTIFY if wake else "",
    )


# By (wakes the workers, event table, which of timestamp and destination are given).
_MANY_PLAIN = {
    (wake, slot, given): _many_plain(wake, slot, given)
    for wake in (False, True)
    for slot in range(EVENT_TABLES)
    for given in _SHAPES
}
_ONE_KEYED = {
    False: _Statements(_KEYED_ONE_SQL, _ONE_PARAMS, wake=""),
    True: _Statements(_KEYED_ONE_SQL, _ONE_PARAMS, wake=" FROM " + _NOTIFY),
}
_MANY_KEYED = {
    False: _Statements(_KEYED_MANY_SQL, _KEYED_MANY_PARAMS, wake=""),
    True: _Statements(_KEYED_MANY_SQL, _KEYED_MANY_PARAMS, wake=" FROM " + _NOTIFY),
}


def _wake_now() -> bool:
    """Whether this statement should NOTIFY (at most once per NOTIFY_INTERVAL)."""
    global _last_notify
    now = time.monotonic()
    if now - _last_notify < NOTIFY_INTERVAL:
        return False
    _last_notify = now
    return True


def enqueue(
    conn: Any,
    event: str,
    distinct_id: DistinctId | None,
    properties: Mapping[str, Any] | None = None,
    *,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    dedup_key: str | None = None,
    uuid: uuid_module.UUID | str | None = None,
    config: AnalyticsConfig | None = None,
) -> uuid_module.UUID | None:
    """Add one event to the outbox in the caller's transaction.

    ``conn`` is a SQLAlchemy ``Session`` or ``Connection``, or a psycopg
    ``Connection``. The row commits or rolls back with that transaction; this
    function never begins, commits or rolls back. ``timestamp`` defaults to the
    transaction's ``now()``; ``uuid`` to a new UUIDv7, which PostHog uses as the
    event's identity (a re-sent copy is collapsed with the first when ClickHouse
    merges them, not at once). The outbox does not refuse a ``uuid`` an earlier
    call already enqueued: both rows are shipped, and PostHog merges the copies the
    same way. Use ``dedup_key`` to have the outbox write an event at most once.

    ``distinct_id`` may be an :class:`~outbox.actors.Actor` (see
    :func:`outbox.user_actor` and friends): its id is used and its properties are
    added under the event's own. Inside :func:`outbox.new_context`, ``None`` takes
    the context's id (:func:`outbox.identify_context`), and the context's tags are
    added under the event's properties. ``set`` and ``set_once`` update the person's
    properties (shipped as ``$set`` and ``$set_once``: ``set_once`` never overwrites
    a value the person already has); ``groups`` maps group types to keys, e.g.
    ``{"organization": org_id}`` (shipped as ``$groups``). Every event is stamped
    with the configuration's standard and super properties; a property whose value
    is ``None`` is left out. ``config`` replaces the process-wide configuration
    (:func:`outbox.configure`) for this call.

    Returns the event's uuid, or ``None`` when ``dedup_key`` is already held by an
    undelivered event or by one delivered within the worker's dedup window, or when
    analytics is disabled (then nothing is validated or written, and ``conn`` is not
    used).

    Raises :class:`OutboxValidationError` (naming the field, e.g. ``set.email``)
    before touching the database when the input cannot become a PostHog event or,
    in strict mode, breaks the event contract.
    """
    cfg = config or get_config()
    if cfg.disabled:
        return None
    prepared = _prepare(
        cfg, event, distinct_id, properties, set, set_once, groups, timestamp, dedup_key, uuid, ""
    )
    return enqueue_prepared(conn, [prepared])[0]


def enqueue_many(
    conn: Any, events: Iterable[Mapping[str, Any]], *, config: AnalyticsConfig | None = None
) -> list[uuid_module.UUID | None]:
    """Add several events with one statement; each item has ``enqueue``'s parameter names.

    Items take ``event``, ``distinct_id``, ``properties``, ``set``, ``set_once``,
    ``groups``, ``timestamp``, ``dedup_key`` and ``uuid``; ``config`` applies to all.
    Returns one entry per item, in order: the uuid, or ``None`` for a duplicate
    dedup key (including a key repeated within ``events``), or ``None`` for every
    item when analytics is disabled. Nothing is written when any item is invalid;
    the error names it, e.g. ``events[3].distinct_id``, or ``events[3].uuid`` for a
    ``uuid`` an earlier item of the same call has too (across calls a repeated
    ``uuid`` is written again: see :func:`enqueue`).
    """
    cfg = config or get_config()
    if cfg.disabled:
        return [None for _ in events]
    return write(conn, _prepare_all(cfg, events), call="enqueue_many()", instead="aenqueue_many()")


async def aenqueue(
    conn: Any,
    event: str,
    distinct_id: DistinctId | None,
    properties: Mapping[str, Any] | None = None,
    *,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    dedup_key: str | None = None,
    uuid: uuid_module.UUID | str | None = None,
    config: AnalyticsConfig | None = None,
) -> uuid_module.UUID | None:
    """The async twin of :func:`enqueue`, for ``AsyncSession``, ``AsyncConnection``
    (SQLAlchemy) and psycopg's ``AsyncConnection``."""
    cfg = config or get_config()
    if cfg.disabled:
        return None
    prepared = _prepare(
        cfg, event, distinct_id, properties, set, set_once, groups, timestamp, dedup_key, uuid, ""
    )
    return (await aenqueue_prepared(conn, [prepared]))[0]


async def aenqueue_many(
    conn: Any, events: Iterable[Mapping[str, Any]], *, config: AnalyticsConfig | None = None
) -> list[uuid_module.UUID | None]:
    """The async twin of :func:`enqueue_many`."""
    cfg = config or get_config()
    if cfg.disabled:
        return [None for _ in events]
    return await awrite(
        conn, _prepare_all(cfg, events), call="aenqueue_many()", instead="enqueue_many()"
    )


def prepare_enqueue(
    event: object,
    distinct_id: object,
    properties: Mapping[str, Any] | None = None,
    *,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    dedup_key: object = None,
    uuid: uuid_module.UUID | str | None = None,
    config: AnalyticsConfig | None = None,
    field_prefix: str = "",
) -> PreparedEvent | None:
    """Stamp and validate one event exactly as :func:`enqueue` would, without writing it.

    Returns ``None`` when analytics is disabled. Used by helpers that must validate
    an event before they run their own statement (the first-time guards); the
    result goes to :func:`enqueue_prepared`.
    """
    cfg = config or get_config()
    if cfg.disabled:
        return None
    return _prepare(
        cfg,
        event,
        distinct_id,
        properties,
        set,
        set_once,
        groups,
        timestamp,
        dedup_key,
        uuid,
        field_prefix,
    )


_ENQUEUE_KEYS = frozenset(
    {
        "event",
        "distinct_id",
        "properties",
        "set",
        "set_once",
        "groups",
        "timestamp",
        "dedup_key",
        "uuid",
    }
)


def _prepare_all(cfg: AnalyticsConfig, events: Iterable[Mapping[str, Any]]) -> list[PreparedEvent]:
    prepared: list[PreparedEvent] = []
    given_uuids = False
    for index, item in enumerate(events):
        prefix = f"events[{index}]."
        if type(item) is not dict and not isinstance(item, Mapping):
            raise OutboxValidationError(
                f"events[{index}]", "must be a mapping of enqueue arguments"
            )
        if not _ENQUEUE_KEYS.issuperset(item):
            unknown = sorted(str(k) for k in item if k not in _ENQUEUE_KEYS)
            raise OutboxValidationError(prefix + unknown[0], "is not an enqueue argument")
        for required in ("event", "distinct_id"):
            if required not in item:
                raise OutboxValidationError(prefix + required, "is required")
        get = item.get
        uuid = get("uuid")
        if uuid is not None:
            given_uuids = True
        prepared.append(
            _prepare(
                cfg,
                item["event"],
                item["distinct_id"],
                get("properties"),
                get("set"),
                get("set_once"),
                get("groups"),
                get("timestamp"),
                get("dedup_key"),
                uuid,
                prefix,
            )
        )
    if given_uuids:
        _check_unique_uuids(prepared)
    return prepared


def _check_unique_uuids(events: Sequence[PreparedEvent]) -> None:
    """Refuse a uuid given twice in one call: two events of one call with the same
    uuid are a mistake of the caller's (PostHog would keep only one of them).
    (Fresh UUIDv7s never repeat.) Across calls nothing refuses it: the event tables
    have no unique index."""
    first: dict[uuid_module.UUID, int] = {}
    for index, event in enumerate(events):
        earlier = first.setdefault(event.uuid, index)
        if earlier != index:
            raise OutboxValidationError(
                f"events[{index}].uuid",
                f"{event.uuid} is also the uuid of events[{earlier}]; each event needs its own",
            )


# --------------------------------------------------------------------------- stamping


def _has_none(values: Mapping[str, Any]) -> bool:
    try:
        return None in values.values()
    except Exception:  # a value whose __eq__ misbehaves; validation will name it
        return any(v is None for v in values.values())


def _restore_none(
    merged: dict[Any, Any],
    properties: Mapping[Any, Any],
    actor: Mapping[str, Any] | None,
    standard: Mapping[str, Any],
) -> None:
    """A property passed as ``None`` counts as not passed: the actor's, super or
    standard value stays if there is one, else the key goes."""
    for key, value in properties.items():
        if value is not None:
            continue
        replacement = actor.get(key) if actor is not None else None
        if replacement is None:
            replacement = standard.get(key)
        if replacement is None:
            del merged[key]
        else:
            merged[key] = replacement


def _add_person_updates(
    merged: dict[Any, Any],
    set_: object,
    set_once: object,
    renames: list[tuple[str, str]],
    prefix: str,
) -> None:
    for keyword, key, value in (("set", "$set", set_), ("set_once", "$set_once", set_once)):
        if value is None:
            continue
        if key in merged:
            raise OutboxValidationError(
                prefix + keyword, f"is given both as {keyword}= and as properties[{key!r}]"
            )
        if not isinstance(value, Mapping):
            raise OutboxValidationError(
                prefix + keyword,
                f"must be a mapping of person property names to values, got {type(value).__name__}",
            )
        if value:
            merged[key] = value
            renames.append((key, keyword))


def _group_keys(groups: object, field: str) -> dict[str, str]:
    if not isinstance(groups, Mapping):
        raise OutboxValidationError(
            field, f"must be a mapping of group type to group key, got {type(groups).__name__}"
        )
    result: dict[str, str] = {}
    for group_type, key in groups.items():
        if not isinstance(group_type, str) or not group_type.strip():
            raise OutboxValidationError(field, f"group type {group_type!r} must be a non-empty str")
        where = f"{field}.{group_type}"
        if isinstance(key, str):
            text = key.strip()
        elif isinstance(key, int | uuid_module.UUID) and not isinstance(key, bool):
            text = str(key)
        else:
            raise OutboxValidationError(
                where, f"must be a str, int or uuid.UUID group key, got {type(key).__name__}"
            )
        if not text:
            raise OutboxValidationError(where, "must not be empty")
        result[group_type.strip()] = text
    return result


def _renamed(
    exc: OutboxValidationError, renames: list[tuple[str, str]], prefix: str
) -> OutboxValidationError:
    """Name a problem inside ``set=`` by the keyword (``set.email``), not ``properties.$set``."""
    for key, keyword in renames:
        inside = f"{prefix}properties.{key}"
        if exc.field == inside or exc.field.startswith((inside + ".", inside + "[")):
            return OutboxValidationError(prefix + keyword + exc.field[len(inside) :], exc.problem)
    return exc


def _prepare(
    cfg: AnalyticsConfig,
    event: object,
    distinct_id: object,
    properties: object,
    set_: object,
    set_once: object,
    groups: object,
    timestamp: Any,
    dedup_key: object,
    uuid: Any,
    prefix: str,
) -> PreparedEvent:
    """Stamp the event with everything the configuration adds, then validate it."""
    # The common case (a plain dict of properties, an id, no keywords, no contract)
    # costs one dict merge and one scan for None on top of validation.
    actor: Mapping[str, Any] | None = None
    if type(distinct_id) is not str and isinstance(distinct_id, Actor):
        actor = distinct_id.properties
        distinct_id = distinct_id.distinct_id
    scope = current_scope()
    if scope is not None:  # inside outbox.new_context(): its id, tags and session
        if distinct_id is None:
            distinct_id = scope.distinct_id
        if scope.properties:
            actor = {**actor, **scope.properties} if actor else scope.properties
    if distinct_id is None:
        raise OutboxValidationError(
            prefix + "distinct_id",
            "is None: pass an id, or set one with outbox.identify_context() inside "
            "outbox.new_context()",
        )
    standard = cfg._standard
    if type(properties) is dict:
        if actor:
            merged: dict[Any, Any] = {**standard, **actor, **properties}
        else:
            merged = {**standard, **properties}
        if properties and _has_none(properties):
            _restore_none(merged, properties, actor, standard)
    elif properties is None:
        merged = {**standard, **actor} if actor else {**standard}
    elif isinstance(properties, Mapping):
        merged = {**standard, **actor} if actor else {**standard}
        merged.update(properties)
        if _has_none(properties):
            _restore_none(merged, properties, actor, standard)
    else:  # let validation report it exactly as it always has
        return prepare_event(event, distinct_id, cast(Any, properties), field_prefix=prefix)
    renames: list[tuple[str, str]] = []
    if set_ is not None or set_once is not None:
        _add_person_updates(merged, set_, set_once, renames, prefix)
    if groups is not None:
        if "$groups" in merged:
            raise OutboxValidationError(
                prefix + "groups", "is given both as groups= and as properties['$groups']"
            )
        group_keys = _group_keys(groups, prefix + "groups")
        if group_keys:
            merged["$groups"] = group_keys
    destination: Destination = DESTINATION_POSTHOG
    registry = cfg.registry
    if registry is not None:
        name = event.strip() if isinstance(event, str) else ""
        spec = registry.get(name)
        if spec is None:
            if cfg.strict and name and not name.startswith("$"):
                raise OutboxValidationError(
                    prefix + "event",
                    f"{name!r} is not declared in the event contract, and strict mode "
                    "refuses undeclared events",
                )
        else:
            if cfg.strict:
                spec.check(merged, prefix)
            if spec.metrics_only:
                extra = next((k for k in ("$set", "$set_once", "$groups") if k in merged), None)
                if extra is not None:
                    keyword = {"$set": "set", "$set_once": "set_once", "$groups": "groups"}[extra]
                    raise OutboxValidationError(
                        prefix + keyword,
                        f"{name!r} is a metrics-only event: it never reaches PostHog, so it "
                        "cannot update persons or groups",
                    )
                keep = spec.metric_keys
                merged = {k: v for k, v in merged.items() if k in keep}
                if not cfg.strict:
                    # Labels and durations feed Prometheus: their types and allowed
                    # values are checked even outside strict mode.
                    spec.check_metric_values(merged, prefix)
                destination = DESTINATION_METRICS
            elif not spec.person_profiles:
                if "$set" in merged or "$set_once" in merged:
                    raise OutboxValidationError(
                        prefix + ("set" if "$set" in merged else "set_once"),
                        f"{name!r} is person-less in the event contract, so it cannot "
                        "update person properties",
                    )
                merged["$process_person_profile"] = False
    try:
        # Only the keyed functions parse the properties as jsonb (their parameter is
        # jsonb), so only a keyed event's keys are put in jsonb's order; a plain
        # event's JSON is stored as text, keys in the caller's order.
        return _prepare_event(
            event,
            distinct_id,
            merged,
            timestamp,
            dedup_key,
            uuid,
            prefix,
            destination,
            dedup_key is not None,
        )
    except OutboxValidationError as exc:
        if renames:
            raise _renamed(exc, renames, prefix) from None
        raise


_quote = json.encoder.encode_basestring  # a str as a JSON string literal, non-ASCII kept


def _rows_param(events: Sequence[PreparedEvent]) -> str:
    """The events as the JSON array the many-event statements read."""
    quote = _quote
    rows = []
    for e in events:
        k = "" if e.dedup_key is None else ',"k":' + quote(e.dedup_key)
        s = "" if e.destination == DESTINATION_POSTHOG else ',"s":' + quote(e.destination)
        t = "" if e.timestamp is None else ',"t":"' + e.timestamp.isoformat() + '"'
        rows.append(
            f'{{"d":{quote(e.distinct_id)},"e":{quote(e.event)}{k},"p":{e.properties_json}'
            f'{s}{t},"u":"{e.uuid.hex}"}}'
        )
    return "[" + ",".join(rows) + "]"


def _many_params(events: Sequence[PreparedEvent]) -> dict[str, str | None]:
    """Several events' columns as JSON arrays (see ``_MANY_SQL``); ``t`` and ``s`` only
    when an event has a timestamp or a destination other than PostHog."""
    params: dict[str, str | None] = {
        "u": '["' + '","'.join([e.uuid.hex for e in events]) + '"]',
        # Validated names hold no NUL and no lone surrogate: orjson writes them all.
        "e": orjson.dumps([e.event for e in events]).decode(),
        "d": orjson.dumps([e.distinct_id for e in events]).decode(),
        "p": "[" + ",".join([e.properties_json for e in events]) + "]",
    }
    if any(e.timestamp is not None for e in events):
        params["t"] = orjson.dumps(
            [None if e.timestamp is None else e.timestamp.isoformat() for e in events]
        ).decode()
    if any(e.destination != DESTINATION_POSTHOG for e in events):
        params["s"] = orjson.dumps(
            [None if e.destination == DESTINATION_POSTHOG else e.destination for e in events]
        ).decode()
    return params


def _one_params(e: PreparedEvent) -> dict[str, str | None]:
    """One event's columns as parameters; all text, so the statement has the same
    parameter types whatever is null."""
    return {
        "u": e.uuid.hex,
        "e": e.event,
        "d": e.distinct_id,
        "p": e.properties_json,
        "s": None if e.destination == DESTINATION_POSTHOG else e.destination,
        "t": None if e.timestamp is None else e.timestamp.isoformat(),
        "k": e.dedup_key,
    }


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
    statement and its parameters, and how to read the outcome."""

    def __init__(self, events: Sequence[PreparedEvent]) -> None:
        self.events = events
        self.params: dict[str, str | None]
        self.statements: _Statements
        wake = _wake_now()
        if len(events) == 1:  # the common call: nothing to drop, one statement to pick
            e = events[0]
            self.sent = events
            self.reads_keys = e.dedup_key is not None
            self.params = params = _one_params(e)
            if self.reads_keys:
                self.statements = _ONE_KEYED[wake]
            else:
                given = _SHAPES[(params["t"] is not None) + 2 * (params["s"] is not None)]
                self.statements = _ONE_PLAIN[wake, event_table_slot(time.time()), given]
            return
        self.sent = _unique_keys(events)
        self.reads_keys = any(e.dedup_key is not None for e in self.sent)
        if len(self.sent) == 1:
            self.params = _one_params(self.sent[0])
            self.statements = _ONE_KEYED[wake]  # what is left of repeated keys
        elif self.reads_keys:
            self.params = {"rows": _rows_param(self.sent)}
            self.statements = _MANY_KEYED[wake]
        else:
            self.params = params = _many_params(self.sent)
            given = _SHAPES[("t" in params) + 2 * ("s" in params)]
            self.statements = _MANY_PLAIN[wake, event_table_slot(time.time()), given]

    def results(self, claimed: Iterable[str | None]) -> list[uuid_module.UUID | None]:
        """Each event's uuid if it was written, else None."""
        if not self.reads_keys:
            return [e.uuid for e in self.events]  # every one of them
        keys = {k for k in claimed if k is not None}
        written = {e.uuid for e in self.sent if e.dedup_key is None or e.dedup_key in keys}
        return [e.uuid if e.uuid in written else None for e in self.events]


def _translate(exc: Exception) -> Exception:
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    if isinstance(orig, psycopg.errors.UndefinedTable):
        return OutboxNotInstalledError()
    if isinstance(orig, psycopg.errors.UndefinedFunction) and "outbox_enqueue_keyed" in str(orig):
        return OutboxNotInstalledError(
            "the outbox tables predate this version (migration 0004 is missing): "
            "run `outbox-worker migrate` first; the caller's transaction is aborted"
        )
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if isinstance(
        orig, psycopg.errors.InvalidSqlStatementName | psycopg.errors.DuplicatePreparedStatement
    ):
        # A statement psycopg prepared on another server connection: a transaction
        # pooler that does not carry prepared statements, under a connection that
        # prepares (psycopg's default prepare_threshold). The caller's own statements
        # fail the same way.
        return OutboxDatabaseError(
            f"the outbox INSERT failed: {first}: behind a transaction pooler that does "
            "not keep prepared statements, connect with prepare_threshold=None "
            "(docs/operations.md, Behind a connection pooler)"
        )
    return OutboxDatabaseError(f"the outbox INSERT failed: {first}")


def enqueue_prepared(conn: Any, events: Sequence[PreparedEvent]) -> list[uuid_module.UUID | None]:
    """Insert already validated events on ``conn`` (see :func:`enqueue_many`).

    The statement runs through :func:`outbox._db.execute` with ``prepare=FOLLOW``: it
    is a server-side prepared statement if and when ``conn`` would prepare one of the
    caller's own (psycopg's ``prepare_threshold``; see :mod:`outbox._db`).
    """
    if not events:
        return []
    if type(conn) is not psycopg.Connection:  # the common case needs no resolving
        conn = resolve(conn)
        if not is_sync(conn):
            raise _unsupported(conn, sync=True)
    call = _Call(events)
    statements = call.statements
    try:
        positional = statements.positional
        if positional is not None and type(conn) is psycopg.Connection:
            params = call.params
            rows = execute_args(
                conn, positional, [params[n] for n in statements.order], prepare=FOLLOW
            )
        else:
            rows = execute(
                conn,
                statements.psycopg,
                call.params,
                sqlalchemy=statements.sqlalchemy,
                prepare=FOLLOW,
            )
    except (sa_exc.DBAPIError, psycopg.Error) as exc:
        raise _translate(exc) from exc
    return call.results(_claimed(rows) if call.reads_keys else [])


async def aenqueue_prepared(
    conn: Any, events: Sequence[PreparedEvent]
) -> list[uuid_module.UUID | None]:
    """The async twin of :func:`enqueue_prepared`."""
    if not events:
        return []
    if type(conn) is not psycopg.AsyncConnection:
        conn = resolve(conn)
        if not is_async(conn):
            raise _unsupported(conn, sync=False)
    call = _Call(events)
    statements = call.statements
    try:
        rows = await aexecute(
            conn,
            statements.psycopg,
            call.params,
            sqlalchemy=statements.sqlalchemy,
            prepare=FOLLOW,
        )
    except (sa_exc.DBAPIError, psycopg.Error) as exc:
        raise _translate(exc) from exc
    return call.results(_claimed(rows) if call.reads_keys else [])


def _claimed(rows: Sequence[Mapping[str, Any]]) -> list[str | None]:
    """The dedup keys the keyed statement claimed (its one column)."""
    return [next(iter(row.values())) for row in rows]


class _WrongKind(UnsupportedConnectionError):
    """The connection is not of the kind the call needs (or no connection at all);
    the message names the call and the one to use instead."""

    def __init__(self, conn: Any, *, sync: bool, call: str, instead: str) -> None:
        self.conn = conn
        self.sync = sync
        name = f"{type(conn).__module__}.{type(conn).__qualname__}"
        if sync:
            message = (
                f"{call} got {name}; it needs a SQLAlchemy Session or Connection, or a "
                f"psycopg Connection (use {instead} for async connections)"
            )
        else:
            message = (
                f"{call} got {name}; it needs a SQLAlchemy AsyncSession or AsyncConnection, "
                f"or a psycopg AsyncConnection (use {instead} for sync connections)"
            )
        super().__init__(message)

    def named(self, call: str, instead: str) -> _WrongKind:
        """The same error, for the public call that was really made."""
        return _WrongKind(self.conn, sync=self.sync, call=call, instead=instead)


def _unsupported(
    conn: Any, *, sync: bool, call: str | None = None, instead: str | None = None
) -> UnsupportedConnectionError:
    """The wrong-kind error of ``call`` (``"identify()"``), naming ``instead``
    (``"aidentify()"``); by default those of :func:`enqueue` and :func:`aenqueue`."""
    default, other = ("enqueue()", "aenqueue()") if sync else ("aenqueue()", "enqueue()")
    return _WrongKind(conn, sync=sync, call=call or default, instead=instead or other)


def write(
    conn: Any, events: Sequence[PreparedEvent], *, call: str, instead: str
) -> list[uuid_module.UUID | None]:
    """:func:`enqueue_prepared` for the public sync call ``call``: a connection of
    the wrong kind gets an error that names ``call`` and ``instead``."""
    try:
        return enqueue_prepared(conn, events)
    except _WrongKind as exc:
        raise exc.named(call, instead) from None


async def awrite(
    conn: Any, events: Sequence[PreparedEvent], *, call: str, instead: str
) -> list[uuid_module.UUID | None]:
    """:func:`aenqueue_prepared` for the public async call ``call`` (see :func:`write`)."""
    try:
        return await aenqueue_prepared(conn, events)
    except _WrongKind as exc:
        raise exc.named(call, instead) from None
