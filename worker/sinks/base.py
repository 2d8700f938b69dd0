"""The sink protocol: where shipped events go, and how a sink says what went wrong.

A sink's :meth:`Sink.send` either returns (every event accepted) or raises one of
the :class:`SinkError` subclasses below. The drainer turns each into the right
bookkeeping, so a sink never touches the database:

==========================  =========================================================
``RetryableSinkError``      transient (network, timeout, 5xx): back off, count an attempt
``RateLimitedError``        429: pause all sending for ``retry_after``; no attempt counted
``UnauthorizedError``       401/403: keep everything pending, pause, say so loudly
``RedirectError``           3xx: never followed; a configuration error handled like
                            401/403, naming the ``Location``
``RequestRejectedError``    a 400 that describes the request, not an event (empty
                            payload, undecodable body, broken envelope, empty batch):
                            keep everything pending, pause; splitting would not help
``RejectedError``           400/413 about the content: the drainer splits the batch
                            to find the event at fault, which dies
``EventResultsError``       an answer per event (capture v1): the accepted ship, the
                            ``retry`` ones count an attempt, the dropped die; no split
``BillingLimitedError``     over the billing limit (capture v1): a pause, and every
                            event counts an attempt, so none is deferred forever
==========================  =========================================================

Whatever a sink puts in an error's message comes from the network: it must pass
through :func:`clean_text` first (bounded, control characters escaped, the API key
masked), because the message is logged and stored in ``last_error``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote, quote_plus

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


class RedirectError(SinkError):
    """The endpoint answered with a redirect (HTTP 3xx), which the worker never follows.

    Following one from a POST turns it into a GET without a body (301, 302, 303),
    which PostHog answers as an empty request: the host is misconfigured, not the
    events. ``location`` is the ``Location`` header, cleaned, or None without one.
    """

    reason = "redirected"

    def __init__(
        self, message: str, *, status: int | None = None, location: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.location = location


class RequestRejectedError(SinkError):
    """The endpoint refused the request as a whole, for a reason no event causes (an
    empty payload, a body it cannot decode or parse, no events): splitting the batch
    would only bury good events, so everything stays pending."""

    reason = "request_rejected"

    def __init__(self, message: str, *, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail or message


class RejectedError(SinkError):
    """The sink refused the content of the request (HTTP 400 or 413).

    ``detail`` is the endpoint's answer (cleaned); the drainer compares the details
    of consecutive single-event refusals to tell a poison event from an endpoint
    that refuses everything.
    """

    reason = "rejected"

    def __init__(self, message: str, *, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail or message


#: Longest error text (from the network) a sink puts in a message.
ERROR_TEXT_LIMIT = 500
#: What a PostHog key looks like: a project (phc_), personal (phx_) or secret (phs_)
#: key. Masked wherever it appears, whichever key the worker was given.
_KEY_LIKE = re.compile(r"\b(ph[cxs]_)[A-Za-z0-9_\-]{6,}")
_MASK = "***"
#: The shortest prefix of the configured key masked at the end of a cut-off echo.
_MIN_PREFIX = 6


def _secret_forms(secret: str) -> set[str]:
    """The ways a key can appear in an echoed request: as is, JSON-escaped, URL-encoded."""
    return {
        form
        for form in (secret, json.dumps(secret)[1:-1], quote(secret, safe=""), quote_plus(secret))
        if form
    }


def _escape(text: str) -> str:
    """Control, format and line/paragraph separator characters as ``\\xNN``/``\\uNNNN``."""
    out: list[str] = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def error_detail(body: bytes) -> str:
    """What a PostHog error answer says: the ``detail`` of its JSON document when it
    has one, else the body as text (not yet cleaned: see :func:`clean_text`)."""
    text = body.decode("utf-8", errors="replace")
    try:
        document = json.loads(text)
    except ValueError:
        return text
    if isinstance(document, dict) and isinstance(document.get("detail"), str):
        return str(document["detail"])
    return text


def clean_text(text: str, secrets: Iterable[str | None] = (), limit: int = ERROR_TEXT_LIMIT) -> str:
    """Text from the network made safe to log and store.

    Every form of each of ``secrets`` (and anything shaped like a PostHog key) is
    replaced by ``***``, also a prefix of a secret cut off at the end of the text;
    control characters are escaped; the result is at most about ``limit``
    characters, with a note of how much was cut.
    """
    forms = sorted(
        {form for secret in secrets if secret for form in _secret_forms(secret)},
        key=len,
        reverse=True,
    )
    for form in forms:
        text = text.replace(form, _MASK)
    text = _KEY_LIKE.sub(lambda m: m.group(1) + _MASK, text)
    for secret in secrets:
        if not secret:
            continue
        for size in range(min(len(secret) - 1, len(text)), _MIN_PREFIX - 1, -1):
            if text.endswith(secret[:size]):
                text = text[:-size] + _MASK
                break
    cut = len(text) - limit
    text = _escape(text[:limit] if cut > 0 else text)
    if len(text) > limit:
        text = text[:limit]
    if cut > 0:
        text += f"... ({cut} more characters)"
    return text


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
