"""The sink protocol: where shipped events go, and how a sink says what went wrong.

A sink's :meth:`Sink.send` either returns (every event accepted) or raises one of
the :class:`SinkError` subclasses below. The drainer turns each into the right
bookkeeping, so a sink never touches the database:

==========================  =========================================================
``RetryableSinkError``      transient (network, timeout, 5xx): back off, count an attempt
``RateLimitedError``        429: pause all sending for ``retry_after``; no attempt counted
``UnauthorizedError``       401/403: keep everything pending, pause, say so loudly
``RejectedError``           400/413: the request's content was refused; the drainer
                            splits the batch to find the event at fault, which dies
``EventResultsError``       an answer per event (capture v1): the accepted ship, the
                            ``retry`` ones count an attempt, the dropped die; no split
``BillingLimitedError``     over the billing limit (capture v1): a pause, and every
                            event counts an attempt, so none is deferred forever
==========================  =========================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from outbox.exceptions import OutboxError

#: A PostHog capture event as a mapping: event, distinct_id, properties, uuid, timestamp.
Event = Mapping[str, Any]


class Outbound:
    """One event on its way to a sink, as JSON text (what goes on the wire) with the
    decoded mapping made only when a sink asks for it."""

    __slots__ = ("_data", "json")

    def __init__(self, json_text: str, data: Event | None = None) -> None:
        self.json = json_text
        self._data = data

    @classmethod
    def from_data(cls, data: Event) -> Outbound:
        """Wrap a mapping (tests, other producers)."""
        return cls(json.dumps(data, separators=(",", ":"), default=str), data)

    @property
    def data(self) -> Event:
        """The event as a mapping (decoded on first use)."""
        if self._data is None:
            self._data = json.loads(self.json)
        return self._data

    def __repr__(self) -> str:
        return f"Outbound({self.json[:80]!r})"


class SinkError(OutboxError):
    """The sink did not accept the batch."""

    #: A short, stable label for metrics and logs.
    reason = "error"


class RetryableSinkError(SinkError):
    """A transient failure; the same batch may well succeed later."""

    reason = "transient"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RateLimitedError(SinkError):
    """The sink asked us to slow down (HTTP 429)."""

    reason = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnauthorizedError(SinkError):
    """The sink refused our credentials (HTTP 401/403): a configuration error."""

    reason = "unauthorized"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RejectedError(SinkError):
    """The sink refused the content of the request (HTTP 400 or 413)."""

    reason = "rejected"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EventResultsError(SinkError):
    """The sink answered for each event, and not all of them were accepted.

    Every index (into the events given to :meth:`Sink.send`) is in exactly one of
    ``accepted`` (delivered), ``retry`` (not stored; safe to send again, ``retry_error``
    says why) and ``dropped`` (refused for good, with the sink's reason). The drainer
    records each as such and never splits the request.
    """

    reason = "partial"

    def __init__(
        self,
        message: str,
        *,
        accepted: Sequence[int],
        retry: Sequence[int] = (),
        retry_error: str = "",
        dropped: Sequence[tuple[int, str]] = (),
    ) -> None:
        super().__init__(message)
        self.accepted = list(accepted)
        self.retry = list(retry)
        self.retry_error = retry_error or message
        self.dropped = list(dropped)


class BillingLimitedError(RetryableSinkError):
    """The project is over its billing limit: the sink refuses every event until the
    limit is raised or the billing period ends. Unlike a 429 rate limit, the events count
    an attempt, so a limit that lasts for days does not keep them pending forever."""

    reason = "billing_limited"

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


@runtime_checkable
class Sink(Protocol):
    """Somewhere to deliver a batch of events."""

    #: Name in logs and metrics (``posthog``, ``stdout``, ``memory``).
    name: str

    def send(self, events: Sequence[Outbound]) -> None:
        """Deliver every event, or raise a :class:`SinkError` subclass."""
        ...

    def close(self) -> None:
        """Release resources; called once when the worker stops."""
        ...
