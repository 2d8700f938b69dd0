"""Person and group calls: identify, person properties, groups, aliases.

Each call enqueues one PostHog event in the caller's transaction, exactly like
:func:`outbox.enqueue` (the same connections, validation, stamping, contexts and off
switch), so a person is only identified if the signup that created them commits.
Each has an async form for ``AsyncSession``, ``AsyncConnection`` and
``psycopg.AsyncConnection``: :func:`aidentify`, :func:`aidentify_actor`,
:func:`aset_person_properties`, :func:`agroup_identify` and :func:`aalias`. A
connection of the wrong kind raises
:class:`~outbox.exceptions.UnsupportedConnectionError` naming the call to use.

* :func:`identify` names a user's person, within the configured privacy mode.
* :func:`identify_actor` names the person of an automation, agent or workspace.
* :func:`set_person_properties` updates a person's properties with a ``$set`` event.
* :func:`group_identify` creates or updates a group (``$groupidentify``).
* :func:`alias` joins two distinct_ids into one person (``$create_alias``).

Each call is written once: a function that validates and builds the event (no I/O)
and two one-line drivers that write it, one sync and one async.
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from outbox.actors import Actor, email_domain
from outbox.config import AnalyticsConfig, PrivacyMode, get_config
from outbox.enqueue import awrite, prepare_enqueue, write
from outbox.exceptions import OutboxValidationError
from outbox.validation import PreparedEvent, check_distinct_id

__all__ = [
    "aalias",
    "agroup_identify",
    "aidentify",
    "aidentify_actor",
    "alias",
    "aset_person_properties",
    "group_identify",
    "identify",
    "identify_actor",
    "set_person_properties",
]

Id = str | int | uuid_module.UUID


def _one(conn: Any, event: PreparedEvent | None, call: str) -> uuid_module.UUID | None:
    """Write the event a sync call built (``None``: nothing to write)."""
    if event is None:
        return None
    return write(conn, [event], call=f"{call}()", instead=f"a{call}()")[0]


async def _aone(conn: Any, event: PreparedEvent | None, call: str) -> uuid_module.UUID | None:
    """Write the event an async call built; ``call`` is the sync name."""
    if event is None:
        return None
    return (await awrite(conn, [event], call=f"a{call}()", instead=f"{call}()"))[0]


def _mapping(value: object, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OutboxValidationError(field, f"must be a mapping, got {type(value).__name__}")
    return {k: v for k, v in value.items() if v is not None}


# --------------------------------------------------------------------------- the events


def identify_event(
    user_id: Id,
    *,
    email: str | None = None,
    name: str | None = None,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    privacy: PrivacyMode | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> PreparedEvent | None:
    """The validated ``$identify`` event of :func:`identify`, or ``None`` (nothing to
    write)."""
    cfg = config or get_config()
    mode = privacy if privacy is not None else cfg.privacy_mode
    if mode not in ("none", "id", "email", "full"):
        raise OutboxValidationError("privacy", f"{mode!r} is not one of none, id, email, full")
    distinct_id = check_distinct_id(user_id, "user_id")
    domain = email_domain(email) if email is not None else None
    if name is not None and not isinstance(name, str):
        raise OutboxValidationError("name", f"must be a str, got {type(name).__name__}")
    if mode == "none" or cfg.disabled:
        return None
    person_set = _mapping(set, "set")
    person_set_once = _mapping(set_once, "set_once")
    if mode in ("email", "full") and email is not None:
        person_set_once.setdefault("email", email.strip())
        person_set.setdefault("email_domain", domain)
    if mode == "full" and name is not None and name.strip():
        person_set.setdefault("name", name.strip())
    return prepare_enqueue(
        "$identify",
        distinct_id,
        set=person_set or None,
        set_once=person_set_once or None,
        timestamp=timestamp,
        config=cfg,
    )


def identify_actor_event(
    actor: Actor,
    *,
    set: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> PreparedEvent | None:
    """The validated ``$identify`` event of :func:`identify_actor`, or ``None``."""
    if not isinstance(actor, Actor):
        raise OutboxValidationError("actor", f"must be an outbox.Actor, got {type(actor).__name__}")
    person = {**actor.person_properties, **_mapping(set, "set")}
    return prepare_enqueue(
        "$identify", actor.distinct_id, set=person or None, timestamp=timestamp, config=config
    )


def set_person_properties_event(
    distinct_id: Id | Actor | None,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    *,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> PreparedEvent | None:
    """The validated ``$set`` event of :func:`set_person_properties`, or ``None``."""
    person_set = _mapping(set, "set")
    person_set_once = _mapping(set_once, "set_once")
    if not person_set and not person_set_once:
        raise OutboxValidationError("set", "set and set_once are both empty: nothing to update")
    return prepare_enqueue(
        "$set",
        distinct_id,
        set=person_set or None,
        set_once=person_set_once or None,
        timestamp=timestamp,
        config=config,
    )


def _group_part(value: object, field: str) -> str:
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, int | uuid_module.UUID) and not isinstance(value, bool):
        text = str(value)
    else:
        raise OutboxValidationError(
            field, f"must be a str, int or uuid.UUID, got {type(value).__name__}"
        )
    if not text:
        raise OutboxValidationError(field, "must not be empty")
    return text


def group_identify_event(
    group_type: str,
    group_key: Id,
    properties: Mapping[str, Any] | None = None,
    *,
    distinct_id: Id | Actor | None = None,
    timestamp: datetime | str | None = None,
    uuid: uuid_module.UUID | str | None = None,
    extra: Mapping[str, Any] | None = None,
    config: AnalyticsConfig | None = None,
) -> PreparedEvent | None:
    """The validated ``$groupidentify`` event of :func:`group_identify`, or ``None``.

    ``extra`` are event properties beside ``$group_type``, ``$group_key`` and
    ``$group_set`` (the client's ``$geoip_disable``).
    """
    if not isinstance(group_type, str):
        raise OutboxValidationError("group_type", f"must be a str, got {type(group_type).__name__}")
    type_text = _group_part(group_type, "group_type")
    key_text = _group_part(group_key, "group_key")
    group_set = _mapping(properties, "properties")
    who = distinct_id if distinct_id is not None else f"${type_text}_{key_text}"
    try:
        return prepare_enqueue(
            "$groupidentify",
            who,
            {
                **(extra or {}),
                "$group_type": type_text,
                "$group_key": key_text,
                "$group_set": group_set,
            },
            timestamp=timestamp,
            uuid=uuid,
            config=config,
        )
    except OutboxValidationError as exc:
        if exc.field.startswith("properties.$group_set"):
            field = "properties" + exc.field[len("properties.$group_set") :]
            raise OutboxValidationError(field, exc.problem) from None
        raise


def alias_event(
    previous_id: Id,
    distinct_id: Id,
    *,
    timestamp: datetime | str | None = None,
    uuid: uuid_module.UUID | str | None = None,
    extra: Mapping[str, Any] | None = None,
    config: AnalyticsConfig | None = None,
) -> PreparedEvent | None:
    """The validated ``$create_alias`` event of :func:`alias`, or ``None``."""
    old = check_distinct_id(previous_id, "previous_id")
    new = check_distinct_id(distinct_id, "distinct_id")
    if old == new:
        raise OutboxValidationError("distinct_id", "is the same as previous_id")
    return prepare_enqueue(
        "$create_alias",
        old,
        {**(extra or {}), "distinct_id": old, "alias": new},
        timestamp=timestamp,
        uuid=uuid,
        config=config,
    )


# --------------------------------------------------------------------------- sync calls


def identify(
    conn: Any,
    user_id: Id,
    *,
    email: str | None = None,
    name: str | None = None,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    privacy: PrivacyMode | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> uuid_module.UUID | None:
    """Identify a user's person with an ``$identify`` event, within the privacy mode.

    ``privacy`` defaults to the configuration's ``privacy_mode``:

    ``none``
        Nothing is written; returns ``None``. The user's events still use their id.
    ``id``
        The person gets only what you pass in ``set`` and ``set_once``.
    ``email`` (default)
        Also ``email`` in ``$set_once`` (stored once, never overwritten, never sent
        on events) and ``email_domain`` in ``$set``.
    ``full``
        Also ``name`` in ``$set`` (a name can change).

    Call it where the user is created (signup) and where their details change;
    calling it again is harmless. Returns the event's uuid, or ``None`` when the
    mode is ``none`` or analytics is disabled. A malformed ``email`` raises
    :class:`OutboxValidationError` naming ``email``, even in modes that would not
    send it, so a bug does not hide until the mode changes. :func:`aidentify` is
    the async form.
    """
    event = identify_event(
        user_id,
        email=email,
        name=name,
        set=set,
        set_once=set_once,
        privacy=privacy,
        timestamp=timestamp,
        config=config,
    )
    return _one(conn, event, "identify")


def identify_actor(
    conn: Any,
    actor: Actor,
    *,
    set: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> uuid_module.UUID | None:
    """Give an actor's person its properties (``$identify`` with ``$set``).

    For an automation, agent or workspace actor this sets its name and the
    properties its helper chose (see :mod:`outbox.actors`), plus ``set``; call it
    when the actor is created or renamed, or at the start of each run to keep the
    person current. For a human user, use :func:`identify`, which applies the
    privacy mode. :func:`aidentify_actor` is the async form.
    """
    event = identify_actor_event(actor, set=set, timestamp=timestamp, config=config)
    return _one(conn, event, "identify_actor")


def set_person_properties(
    conn: Any,
    distinct_id: Id | Actor | None,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    *,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> uuid_module.UUID | None:
    """Update a person's properties with a ``$set`` event.

    Use ``set`` for what a user may change (role, plan, team size) and ``set_once``
    for what must never be overwritten (first-touch attribution, the first time
    something happened). At least one must be non-empty, else
    :class:`OutboxValidationError` names ``set``. To update a person alongside an
    event you send anyway, pass ``set=``/``set_once=`` to :func:`outbox.enqueue`
    instead: no extra event. :func:`aset_person_properties` is the async form.
    """
    event = set_person_properties_event(
        distinct_id, set, set_once, timestamp=timestamp, config=config
    )
    return _one(conn, event, "set_person_properties")


def group_identify(
    conn: Any,
    group_type: str,
    group_key: Id,
    properties: Mapping[str, Any] | None = None,
    *,
    distinct_id: Id | Actor | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> uuid_module.UUID | None:
    """Create or update a group with a ``$groupidentify`` event.

    ``group_type`` is the kind of group (``organization``, ``workspace``...), the
    same name used as a key of ``groups=`` on events; ``group_key`` its id;
    ``properties`` go to ``$group_set`` (e.g. the organisation's name and plan).
    ``distinct_id`` is who did it; by default ``$<group_type>_<group_key>``, as the
    PostHog SDKs do. Call it when the group is created or changes, or once per
    session to keep groups created before your analytics current.
    :func:`agroup_identify` is the async form.
    """
    event = group_identify_event(
        group_type,
        group_key,
        properties,
        distinct_id=distinct_id,
        timestamp=timestamp,
        config=config,
    )
    return _one(conn, event, "group_identify")


def alias(
    conn: Any,
    previous_id: Id,
    distinct_id: Id,
    *,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> uuid_module.UUID | None:
    """Make ``previous_id`` another name of ``distinct_id``'s person (``$create_alias``).

    Use it when an id you already sent events under (an id from another system,
    an earlier account id) must join the person of ``distinct_id``. PostHog refuses
    to merge two persons that were both already identified, so alias an id before
    it is identified as someone else. Both ids must differ. :func:`aalias` is the
    async form.
    """
    event = alias_event(previous_id, distinct_id, timestamp=timestamp, config=config)
    return _one(conn, event, "alias")


# --------------------------------------------------------------------------- async calls


async def aidentify(
    conn: Any,
    user_id: Id,
    *,
    email: str | None = None,
    name: str | None = None,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    privacy: PrivacyMode | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> uuid_module.UUID | None:
    """:func:`identify` on a SQLAlchemy ``AsyncSession`` or ``AsyncConnection``, or a
    ``psycopg.AsyncConnection``."""
    event = identify_event(
        user_id,
        email=email,
        name=name,
        set=set,
        set_once=set_once,
        privacy=privacy,
        timestamp=timestamp,
        config=config,
    )
    return await _aone(conn, event, "identify")


async def aidentify_actor(
    conn: Any,
    actor: Actor,
    *,
    set: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> uuid_module.UUID | None:
    """:func:`identify_actor` on an async connection or session."""
    event = identify_actor_event(actor, set=set, timestamp=timestamp, config=config)
    return await _aone(conn, event, "identify_actor")


async def aset_person_properties(
    conn: Any,
    distinct_id: Id | Actor | None,
    set: Mapping[str, Any] | None = None,
    set_once: Mapping[str, Any] | None = None,
    *,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> uuid_module.UUID | None:
    """:func:`set_person_properties` on an async connection or session."""
    event = set_person_properties_event(
        distinct_id, set, set_once, timestamp=timestamp, config=config
    )
    return await _aone(conn, event, "set_person_properties")


async def agroup_identify(
    conn: Any,
    group_type: str,
    group_key: Id,
    properties: Mapping[str, Any] | None = None,
    *,
    distinct_id: Id | Actor | None = None,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> uuid_module.UUID | None:
    """:func:`group_identify` on an async connection or session."""
    event = group_identify_event(
        group_type,
        group_key,
        properties,
        distinct_id=distinct_id,
        timestamp=timestamp,
        config=config,
    )
    return await _aone(conn, event, "group_identify")


async def aalias(
    conn: Any,
    previous_id: Id,
    distinct_id: Id,
    *,
    timestamp: datetime | str | None = None,
    config: AnalyticsConfig | None = None,
) -> uuid_module.UUID | None:
    """:func:`alias` on an async connection or session."""
    event = alias_event(previous_id, distinct_id, timestamp=timestamp, config=config)
    return await _aone(conn, event, "alias")
