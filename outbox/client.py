"""posthog-python's client, bound to your connection: its calls, written in your transaction.

``outbox.Posthog(session)`` has posthog-python's method names, argument names and
return values (``capture``, ``set``, ``set_once``, ``group_identify``, ``alias``,
``capture_exception``, the contexts), so code written for posthog-python ports by
changing the import and the construction. Each call enqueues its event on the
connection or session the client was made with, in the caller's transaction: it
never begins, commits or rolls back, and a rollback drops the event.
``outbox.AsyncPosthog(async_session)`` is the same for async connections, its
writing methods awaitable.

Each method is written once: a function with no I/O builds the event (stamped and
validated exactly as :func:`outbox.enqueue` does), and the two classes differ only
in how they write it.

Where posthog-python and posthog-outbox differ on purpose:

* Bad input raises (:class:`~outbox.exceptions.OutboxValidationError` naming the
  argument) instead of being logged and dropped: the event is part of a
  transaction, and a dropped one would be lost silently. An invalid ``uuid`` is
  refused, not replaced.
* ``set()``, ``set_once()`` and ``alias()`` with no ``distinct_id`` and no context
  id raise; posthog-python drops them with a warning.
* ``group_identify()`` without a ``distinct_id`` (and no context id) uses
  ``$<group_type>_<group_key>``, as :func:`outbox.group_identify` does, not a new
  random id per call.
* Context tags are event properties on every event, also on ``$set``/``$set_once``
  events, never person properties.
* Feature flags need a live PostHog connection: those methods raise
  :class:`~outbox.exceptions.UnsupportedCallError`; keep posthog-python for flags.
* ``flush()``, ``join()`` and ``shutdown()`` do nothing: there is no in-process
  queue; the worker ships what your transactions commit.
"""

from __future__ import annotations

import sys
import uuid as uuid_module
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, ClassVar, Generic, Never, NoReturn, TypeVar

from outbox import contexts
from outbox._db import is_async, is_sync
from outbox.actors import Actor
from outbox.builders import exception_event
from outbox.config import AnalyticsConfig
from outbox.contexts import current_scope
from outbox.enqueue import _unsupported, awrite, prepare_enqueue, write
from outbox.exceptions import (
    OutboxValidationError,
    UnsupportedCallError,
    UnsupportedConnectionError,
)
from outbox.identity import alias_event, group_identify_event
from outbox.validation import PreparedEvent

__all__ = ["AsyncPosthog", "Posthog"]

Id = str | int | uuid_module.UUID
DistinctId = Id | Actor
R = TypeVar("R")

# --------------------------------------------------------------------------- the events
#
# posthog-python's calls as PreparedEvents (None: nothing to write), with no I/O.


def _who(distinct_id: object) -> tuple[object, bool]:
    """The id to use, and whether the event is person-less: the call's, else the
    context's, else a new random one (person-less, as posthog-python does)."""
    if distinct_id is not None:
        return distinct_id, False
    scope = current_scope()
    if scope is not None and scope.distinct_id is not None:
        return scope.distinct_id, False
    return str(uuid_module.uuid4()), True


def _person(distinct_id: object, call: str) -> Any:
    """The id of a call that updates a person: the call's or the context's."""
    if distinct_id is not None:
        return distinct_id
    scope = current_scope()
    if scope is not None and scope.distinct_id is not None:
        return scope.distinct_id
    raise OutboxValidationError(
        "distinct_id",
        f"is required: {call}() updates a person; pass distinct_id=, or call "
        "outbox.identify_context() inside outbox.new_context() first",
    )


def _geoip(disable_geoip: object) -> dict[str, Any]:
    """``disable_geoip=True`` as the property the worker keeps (``$geoip_disable``).

    ``None`` and ``False`` add nothing: the worker already disables GeoIP unless the
    event carries the user's ``$ip`` (its own address says nothing about the user).
    """
    if disable_geoip is not None and not isinstance(disable_geoip, bool):
        raise OutboxValidationError(
            "disable_geoip", f"must be a bool or None, got {type(disable_geoip).__name__}"
        )
    return {"$geoip_disable": True} if disable_geoip else {}


def _properties(properties: object) -> dict[str, Any]:
    if properties is None:
        return {}
    if not isinstance(properties, Mapping):
        raise OutboxValidationError(
            "properties", f"must be a mapping, got {type(properties).__name__}"
        )
    return dict(properties)


def capture_event(
    event: str,
    *,
    distinct_id: DistinctId | None = None,
    properties: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    uuid: uuid_module.UUID | str | None = None,
    disable_geoip: bool | None = None,
    config: AnalyticsConfig | None = None,
) -> PreparedEvent | None:
    """The event of :meth:`Posthog.capture`, validated, or ``None`` when disabled."""
    props = _properties(properties)
    who, personless = _who(distinct_id)
    if personless:
        props.setdefault("$process_person_profile", False)
    props.update(_geoip(disable_geoip))
    return prepare_enqueue(
        event, who, props, groups=groups, timestamp=timestamp, uuid=uuid, config=config
    )


def set_event(
    *,
    once: bool,
    distinct_id: DistinctId | None = None,
    properties: Mapping[str, Any] | None = None,
    timestamp: datetime | str | None = None,
    uuid: uuid_module.UUID | str | None = None,
    disable_geoip: bool | None = None,
    config: AnalyticsConfig | None = None,
) -> PreparedEvent | None:
    """The ``$set`` (or, with ``once``, ``$set_once``) event of :meth:`Posthog.set`;
    ``None`` when there is nothing to set, as in posthog-python, or when disabled."""
    name = "set_once" if once else "set"
    who = _person(distinct_id, name)
    person = {k: v for k, v in _properties(properties).items() if v is not None}
    if not person:
        return None
    try:
        return prepare_enqueue(
            f"${name}",
            who,
            _geoip(disable_geoip),
            set=None if once else person,
            set_once=person if once else None,
            timestamp=timestamp,
            uuid=uuid,
            config=config,
        )
    except OutboxValidationError as exc:
        if exc.field == name or exc.field.startswith((name + ".", name + "[")):
            field = "properties" + exc.field[len(name) :]
            raise OutboxValidationError(field, exc.problem) from None
        raise


def exception_properties(exception: object, properties: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``$exception`` properties of :meth:`Posthog.capture_exception` (see
    :func:`outbox.exception_event`): ``exception`` is an exception, an
    ``exc_info`` tuple, or ``None`` for the one being handled."""
    if isinstance(exception, tuple) and len(exception) == 3:
        exception = exception[1]
    if exception is None:
        exception = sys.exc_info()[1]
        if exception is None:
            raise OutboxValidationError(
                "exception", "none given, and no exception is being handled"
            )
    if not isinstance(exception, BaseException):
        raise OutboxValidationError(
            "exception", f"must be an exception, got {type(exception).__name__}"
        )
    # Only the properties are used; the id is chosen by capture_event.
    return dict(exception_event(exception, "-", properties=_properties(properties))["properties"])


# --------------------------------------------------------------------------- refusals


def _old_order(call: str, new_form: str, old_form: str) -> UnsupportedCallError:
    return UnsupportedCallError(
        f"{call}() takes {new_form}, as posthog-python 6 and later do; a positional argument "
        f"there is how older posthog-python wrote {old_form}, so it is refused, not guessed"
    )


_FLAGS = (
    "is a feature-flag call, which needs a live answer from PostHog and has no outbox "
    "form: keep posthog-python's client for feature flags (outbox.Posthog writes events)"
)


def _refused(name: str, why: str) -> Callable[..., NoReturn]:
    def refuse(self: object, *args: object, **kwargs: object) -> NoReturn:
        raise UnsupportedCallError(f"{name}() {why}")

    refuse.__name__ = refuse.__qualname__ = name
    refuse.__doc__ = f"Raises :class:`~outbox.exceptions.UnsupportedCallError`: {name}() {why}."
    return refuse


def _check_flags(flags: object, send_feature_flags: object) -> None:
    if flags is not None or send_feature_flags:
        raise UnsupportedCallError(
            "flags= and send_feature_flags= need posthog-python's feature flags, which have "
            "no outbox form: put the flag values you branched on in properties "
            '(e.g. {"$feature/new-checkout": "variant-a"})'
        )


def _fits(conn: Any, *, sync: bool) -> bool:
    if sync:
        # Django's connection and cursors are sync; outbox resolves (and connects) them
        # when it writes, not here.
        return type(conn).__module__.startswith("django.") or is_sync(conn)
    return is_async(conn)


def _text(value: uuid_module.UUID | None) -> str | None:
    return None if value is None else str(value)


# --------------------------------------------------------------------------- the clients


class _Client(Generic[R]):
    """The methods of :class:`Posthog` and :class:`AsyncPosthog`, written once; ``R`` is
    what a writing method returns (the uuid, or an awaitable of it)."""

    _NAME: ClassVar[str]
    _OTHER: ClassVar[str]
    _SYNC: ClassVar[bool]

    def __init__(self, conn: Any, *, config: AnalyticsConfig | None = None) -> None:
        if not _fits(conn, sync=self._SYNC):
            if isinstance(conn, str):
                raise UnsupportedConnectionError(
                    f"outbox.{self._NAME}() takes your database connection or session, not "
                    "an API key: the worker sends the events with its POSTHOG_API_KEY"
                )
            raise _unsupported(
                conn,
                sync=self._SYNC,
                call=f"outbox.{self._NAME}()",
                instead=f"outbox.{self._OTHER}()",
            )
        self.conn = conn
        self.config = config

    def __repr__(self) -> str:
        return f"outbox.{self._NAME}({type(self.conn).__qualname__})"

    def _send(self, event: PreparedEvent | None, method: str) -> R:
        raise NotImplementedError  # pragma: no cover

    def _calls(self, method: str) -> tuple[str, str]:
        return f"{self._NAME}.{method}()", f"{self._OTHER}.{method}()"

    # -- events

    def capture(
        self,
        event: str,
        *args: Never,
        distinct_id: DistinctId | None = None,
        properties: Mapping[str, Any] | None = None,
        groups: Mapping[str, Any] | None = None,
        timestamp: datetime | str | None = None,
        uuid: uuid_module.UUID | str | None = None,
        disable_geoip: bool | None = None,
        flags: object = None,
        send_feature_flags: object = False,
    ) -> R:
        """Enqueue ``event`` in the client's transaction; returns its uuid as a ``str``.

        Everything after ``event`` is keyword-only, as in posthog-python 6 and later;
        a second positional argument (older posthog-python's ``capture(distinct_id,
        event)``) raises :class:`~outbox.exceptions.UnsupportedCallError`. Without
        ``distinct_id`` the event takes the context's id (:func:`outbox.identify_context`),
        or else a new random id and ``$process_person_profile: false``, as
        posthog-python does. ``disable_geoip=True`` stores ``$geoip_disable``; GeoIP is
        off anyway unless ``properties`` has the user's ``$ip``. Returns ``None`` when
        analytics is disabled (then nothing is written). On :class:`AsyncPosthog`, await
        it.
        """
        if args:
            raise _old_order(
                "capture",
                "the event first and everything else by keyword: capture(event, "
                "distinct_id=..., properties=...)",
                "capture(distinct_id, event, properties)",
            )
        _check_flags(flags, send_feature_flags)
        built = capture_event(
            event,
            distinct_id=distinct_id,
            properties=properties,
            groups=groups,
            timestamp=timestamp,
            uuid=uuid,
            disable_geoip=disable_geoip,
            config=self.config,
        )
        return self._send(built, "capture")

    def set(
        self,
        *args: Never,
        distinct_id: DistinctId | None = None,
        properties: Mapping[str, Any] | None = None,
        timestamp: datetime | str | None = None,
        uuid: uuid_module.UUID | str | None = None,
        disable_geoip: bool | None = None,
    ) -> R:
        """Set person properties with a ``$set`` event; returns its uuid as a ``str``.

        Keyword-only, as in posthog-python 6 and later. Without ``distinct_id``, the
        context's id; with neither, :class:`~outbox.exceptions.OutboxValidationError`.
        Empty ``properties`` write nothing and return ``None``, as in posthog-python.
        """
        if args:
            raise _old_order(
                "set", "keywords only: set(distinct_id=..., properties=...)", "set(distinct_id, …)"
            )
        built = set_event(
            once=False,
            distinct_id=distinct_id,
            properties=properties,
            timestamp=timestamp,
            uuid=uuid,
            disable_geoip=disable_geoip,
            config=self.config,
        )
        return self._send(built, "set")

    def set_once(
        self,
        *args: Never,
        distinct_id: DistinctId | None = None,
        properties: Mapping[str, Any] | None = None,
        timestamp: datetime | str | None = None,
        uuid: uuid_module.UUID | str | None = None,
        disable_geoip: bool | None = None,
    ) -> R:
        """Set person properties that are never overwritten (a ``$set_once`` event);
        otherwise as :meth:`set`."""
        if args:
            raise _old_order(
                "set_once",
                "keywords only: set_once(distinct_id=..., properties=...)",
                "set_once(distinct_id, …)",
            )
        built = set_event(
            once=True,
            distinct_id=distinct_id,
            properties=properties,
            timestamp=timestamp,
            uuid=uuid,
            disable_geoip=disable_geoip,
            config=self.config,
        )
        return self._send(built, "set_once")

    def group_identify(
        self,
        group_type: str,
        group_key: Id,
        properties: Mapping[str, Any] | None = None,
        *,
        timestamp: datetime | str | None = None,
        uuid: uuid_module.UUID | str | None = None,
        disable_geoip: bool | None = None,
        distinct_id: DistinctId | None = None,
    ) -> R:
        """Create or update a group (``$groupidentify``); returns its uuid as a ``str``.

        ``distinct_id`` defaults to the context's id, else ``$<group_type>_<group_key>``
        (see :func:`outbox.group_identify`). Arguments after ``properties`` are
        keyword-only, so older posthog-python's positional ``context`` cannot land in
        ``timestamp``.
        """
        scope = current_scope()
        if distinct_id is None and scope is not None:
            distinct_id = scope.distinct_id
        built = group_identify_event(
            group_type,
            group_key,
            properties,
            distinct_id=distinct_id,
            timestamp=timestamp,
            uuid=uuid,
            extra=_geoip(disable_geoip),
            config=self.config,
        )
        return self._send(built, "group_identify")

    def alias(
        self,
        previous_id: Id,
        distinct_id: Id | None,
        *,
        timestamp: datetime | str | None = None,
        uuid: uuid_module.UUID | str | None = None,
        disable_geoip: bool | None = None,
    ) -> R:
        """Make ``previous_id`` another name of ``distinct_id``'s person
        (``$create_alias``); returns its uuid as a ``str``.

        ``distinct_id=None`` takes the context's id; with neither,
        :class:`~outbox.exceptions.OutboxValidationError`. See :func:`outbox.alias`.
        """
        who = _person(distinct_id, "alias")
        built = alias_event(
            previous_id,
            who,
            timestamp=timestamp,
            uuid=uuid,
            extra=_geoip(disable_geoip),
            config=self.config,
        )
        return self._send(built, "alias")

    def capture_exception(
        self,
        exception: BaseException | tuple[Any, Any, Any] | None = None,
        *args: Never,
        distinct_id: DistinctId | None = None,
        properties: Mapping[str, Any] | None = None,
        groups: Mapping[str, Any] | None = None,
        timestamp: datetime | str | None = None,
        uuid: uuid_module.UUID | str | None = None,
        disable_geoip: bool | None = None,
        flags: object = None,
        send_feature_flags: object = False,
    ) -> R:
        """Enqueue an ``$exception`` event for error tracking (built by
        :func:`outbox.exception_event`); returns its uuid as a ``str``.

        ``exception`` defaults to the exception being handled. The rest is as
        :meth:`capture`. Call it where the transaction that writes it still commits
        (an ``except`` block that handles the error), or the event rolls back too.
        """
        if args:
            raise _old_order(
                "capture_exception",
                "the exception, then keywords: capture_exception(exception, "
                "distinct_id=..., properties=...)",
                "capture_exception(exception, distinct_id, properties)",
            )
        _check_flags(flags, send_feature_flags)
        built = capture_event(
            "$exception",
            distinct_id=distinct_id,
            properties=exception_properties(exception, properties),
            groups=groups,
            timestamp=timestamp,
            uuid=uuid,
            disable_geoip=disable_geoip,
            config=self.config,
        )
        return self._send(built, "capture_exception")

    # -- contexts (the functions of outbox.contexts, as posthog-python's client has them)

    def new_context(
        self, fresh: bool = False, capture_exceptions: bool | None = None
    ) -> AbstractContextManager[None]:
        """:func:`outbox.new_context`."""
        return contexts.new_context(fresh=fresh, capture_exceptions=capture_exceptions)

    def scoped(
        self, fresh: bool = False, capture_exceptions: bool | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """:func:`outbox.scoped`."""
        return contexts.scoped(fresh=fresh, capture_exceptions=capture_exceptions)

    def tag(self, name: str, value: Any) -> None:
        """:func:`outbox.tag`."""
        contexts.tag(name, value)

    def get_tags(self) -> dict[str, Any]:
        """:func:`outbox.get_tags`."""
        return contexts.get_tags()

    def identify_context(self, distinct_id: Id) -> None:
        """:func:`outbox.identify_context`."""
        contexts.identify_context(distinct_id)

    def set_context_session(self, session_id: str) -> None:
        """:func:`outbox.set_context_session`."""
        contexts.set_context_session(session_id)

    # -- what has no outbox form

    feature_enabled = _refused("feature_enabled", _FLAGS)
    get_feature_flag = _refused("get_feature_flag", _FLAGS)
    get_feature_flag_payload = _refused("get_feature_flag_payload", _FLAGS)
    get_feature_flag_result = _refused("get_feature_flag_result", _FLAGS)
    get_all_flags = _refused("get_all_flags", _FLAGS)
    get_all_flags_and_payloads = _refused("get_all_flags_and_payloads", _FLAGS)
    evaluate_flags = _refused("evaluate_flags", _FLAGS)
    load_feature_flags = _refused("load_feature_flags", _FLAGS)
    get_remote_config_payload = _refused("get_remote_config_payload", _FLAGS)
    capture_ai = _refused(
        "capture_ai",
        "sends to posthog-python's AI endpoint, which has no outbox form: enqueue "
        "outbox.ai_generation_event(...) with capture() or outbox.enqueue()",
    )


class Posthog(_Client[str | None]):
    """posthog-python's ``Posthog`` client, writing on one sync connection or session.

    ``conn`` is a SQLAlchemy ``Session`` or ``Connection``, or a psycopg
    ``Connection``; ``config`` replaces the process-wide configuration
    (:func:`outbox.configure`) for this client's events. Make one where the
    transaction is (per request, per job): it holds no other state. An async
    connection raises :class:`~outbox.exceptions.UnsupportedConnectionError` naming
    :class:`AsyncPosthog`.
    """

    _NAME = "Posthog"
    _OTHER = "AsyncPosthog"
    _SYNC = True

    def _send(self, event: PreparedEvent | None, method: str) -> str | None:
        if event is None:
            return None
        call, instead = self._calls(method)
        return _text(write(self.conn, [event], call=call, instead=instead)[0])

    def flush(self, timeout_seconds: float | None = 10) -> None:
        """Does nothing: events are rows of your transaction, and the worker ships
        them once it commits. Kept so code written for posthog-python runs."""

    def join(self) -> None:
        """Does nothing (see :meth:`flush`)."""

    def shutdown(self) -> None:
        """Does nothing (see :meth:`flush`)."""


class AsyncPosthog(_Client[Coroutine[Any, Any, str | None]]):
    """:class:`Posthog` for a SQLAlchemy ``AsyncSession`` or ``AsyncConnection``, or a
    ``psycopg.AsyncConnection``: the writing methods return awaitables
    (``await client.capture(...)``), unlike posthog-python's ``AsyncPosthog``, whose
    ``capture`` only queues. Arguments are checked when the method is called, before
    the await. A sync connection raises
    :class:`~outbox.exceptions.UnsupportedConnectionError` naming :class:`Posthog`.
    """

    _NAME = "AsyncPosthog"
    _OTHER = "Posthog"
    _SYNC = False

    def _send(self, event: PreparedEvent | None, method: str) -> Coroutine[Any, Any, str | None]:
        return self._write(event, *self._calls(method))

    async def _write(self, event: PreparedEvent | None, call: str, instead: str) -> str | None:
        if event is None:
            return None
        return _text((await awrite(self.conn, [event], call=call, instead=instead))[0])

    async def flush(self, timeout_seconds: float | None = 10) -> None:
        """Does nothing: events are rows of your transaction, and the worker ships
        them once it commits. Kept so code written for posthog-python runs."""

    async def join(self) -> None:
        """Does nothing (see :meth:`flush`)."""

    async def shutdown(self) -> None:
        """Does nothing (see :meth:`flush`)."""
