"""Contexts, as posthog-python has them: an id, tags and a session for a block of code.

Inside ``with outbox.new_context():``, every event enqueued (through
:class:`outbox.Posthog`, :func:`outbox.enqueue` and every other call that enqueues)
takes the context's tags (:func:`tag`) as properties, with ``$context_tags``
listing their names, its session id (:func:`set_context_session`) as
``$session_id``, and, when the call passes no ``distinct_id``, the context's
(:func:`identify_context`). Properties passed to the call win over tags.

A context lives in a :mod:`contextvars` variable, so it follows the code that
entered it: each thread has its own, and an asyncio task (or a thread started with
:func:`contextvars.copy_context`, as ``asyncio.to_thread`` does) starts with the
context as it was when the task was created. What a task or a nested context adds
stays its own: a context is never changed in place, so concurrent tasks of one
request cannot tag each other's events, and leaving a nested context restores
the outer one exactly.

As in posthog-python, :func:`tag`, :func:`identify_context` and
:func:`set_context_session` outside any context do nothing.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import uuid as uuid_module
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from outbox.exceptions import OutboxValidationError, UnsupportedCallError
from outbox.validation import check_distinct_id

__all__ = [
    "get_tags",
    "identify_context",
    "new_context",
    "scoped",
    "set_context_session",
    "tag",
]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Scope:
    """One context's state; replaced, never changed, when a tag or id is set."""

    distinct_id: str | None = None
    session_id: str | None = None
    tags: Mapping[str, Any] = field(default_factory=dict)
    #: What events enqueued in this context get as properties (under their own).
    properties: Mapping[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> Scope:
        merged = {
            "distinct_id": self.distinct_id,
            "session_id": self.session_id,
            "tags": self.tags,
            **changes,
        }
        tags: Mapping[str, Any] = merged["tags"]
        properties: dict[str, Any] = dict(tags)
        if tags:
            properties["$context_tags"] = sorted(tags)
        if merged["session_id"] is not None:
            properties["$session_id"] = merged["session_id"]
        return Scope(merged["distinct_id"], merged["session_id"], tags, properties)


_current: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "outbox_context", default=None
)


#: The innermost context's state, or ``None`` outside any context (the variable's
#: bound ``get``: enqueue() calls it for every event, so no wrapper call).
current_scope: Callable[[], Scope | None] = _current.get


_CAPTURE_EXCEPTIONS = (
    "new_context(capture_exceptions=True) has no outbox form: an exception that leaves "
    "the block usually rolls back the transaction its $exception event would be "
    "written in; call capture_exception() in an except block whose transaction commits"
)


@contextmanager
def new_context(fresh: bool = False, capture_exceptions: bool | None = None) -> Iterator[None]:
    """Open a context for the ``with`` block; it inherits the enclosing one's tags,
    id and session unless ``fresh=True``.

    ``capture_exceptions`` is accepted as posthog-python names it, but only ``None``
    or ``False``: ``True`` raises :class:`~outbox.exceptions.UnsupportedCallError`,
    because the exception leaving the block would usually roll back the transaction
    the ``$exception`` event is written in.
    """
    if capture_exceptions:
        raise UnsupportedCallError(_CAPTURE_EXCEPTIONS)
    previous = _current.get()
    _current.set(Scope() if fresh or previous is None else previous)
    try:
        yield
    finally:
        _current.set(previous)


def scoped(fresh: bool = False, capture_exceptions: bool | None = None) -> Callable[[F], F]:
    """Decorator: run each call of the function (sync or ``async def``) in its own
    :func:`new_context`."""
    if capture_exceptions:
        raise UnsupportedCallError(_CAPTURE_EXCEPTIONS)

    def decorate(func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with new_context(fresh=fresh):
                    return await func(*args, **kwargs)

            return cast(F, run_async)

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            with new_context(fresh=fresh):
                return func(*args, **kwargs)

        return cast(F, run)

    return decorate


def tag(key: str, value: Any) -> None:
    """Add a property to every event enqueued from here to the end of the context.

    ``key`` must be a ``str``; the value is validated with each event, like any
    property. Outside a context this does nothing, as in posthog-python.
    """
    if not isinstance(key, str):
        raise OutboxValidationError("key", f"must be a str, got {type(key).__name__}")
    scope = _current.get()
    if scope is not None:
        _current.set(scope.with_(tags={**scope.tags, key: value}))


def get_tags() -> dict[str, Any]:
    """The current context's tags (a copy), or ``{}`` outside a context."""
    scope = _current.get()
    return dict(scope.tags) if scope is not None else {}


def identify_context(distinct_id: str | int | uuid_module.UUID) -> None:
    """Make ``distinct_id`` the id of the events enqueued in this context (and the
    contexts it opens) without a ``distinct_id`` of their own.

    The id is validated at once, like any ``distinct_id``. Outside a context this
    does nothing, as in posthog-python.
    """
    checked = check_distinct_id(distinct_id, "distinct_id")
    scope = _current.get()
    if scope is not None:
        _current.set(scope.with_(distinct_id=checked))


def set_context_session(session_id: str) -> None:
    """Send ``session_id`` as ``$session_id`` on the events enqueued in this context
    (unless an event has its own). Outside a context this does nothing."""
    if not isinstance(session_id, str) or not session_id.strip():
        raise OutboxValidationError("session_id", "must be a non-empty str")
    scope = _current.get()
    if scope is not None:
        _current.set(scope.with_(session_id=session_id.strip()))
