"""The PostHog sink: batches to the capture API's ``/batch/`` endpoint.

Two transports, one behaviour:

``direct`` (the default)
    Builds the request body from the JSON text PostgreSQL returns for each event and
    POSTs it on a keep-alive session. Nothing is decoded and encoded again: the
    events were validated (finite numbers, no NUL) when they were enqueued.
``posthog``
    ``posthog.request.batch_post``, the posthog package's own request layer. It
    decodes every event and walks it for non-finite floats before encoding it again;
    docs/benchmarks.md measures what that costs.

Either way each event keeps the outbox row's ``uuid`` and ``timestamp`` and carries
``$ignore_sent_at``, so every copy of a re-sent event is identical. PostHog stores
events in a ClickHouse ReplacingMergeTree keyed by project, the timestamp's day,
event name, distinct_id and uuid, so copies are collapsed when ClickHouse merges the
parts that hold them: eventually, not at once (a query can count both until then).

What an answer means (PostHog's capture, ``rust/capture/src/api.rs``):

- any 2xx: every event of the request was accepted;
- 3xx: never followed (``requests`` would re-send a POST as a GET without a body),
  raised as :class:`RedirectError` with the ``Location``;
- 400 whose text says the request is broken (:data:`REQUEST_LEVEL_DETAILS`):
  :class:`RequestRejectedError`, no event is at fault;
- any other 400, and 413: :class:`RejectedError`, some event is at fault. A 413 for an
  oversized event still lets the events before it through (PostHog reports the
  first failure of the request), so splitting the batch may send those again;
- 401/403, 429 and the rest as their own errors.

Error texts from the endpoint are passed through :func:`clean_text` (bounded,
escaped, the key masked) before they go into any error, log or ``last_error``.
"""

from __future__ import annotations

import gzip as gzip_module
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import requests
from posthog import request as ph_request
from posthog.version import VERSION as POSTHOG_VERSION

from outbox import __version__
from worker.sinks.base import (
    Outbound,
    RateLimitedError,
    RedirectError,
    RejectedError,
    RequestRejectedError,
    RetryableSinkError,
    SinkError,
    UnauthorizedError,
    clean_text,
)

TRANSPORTS = ("direct", "posthog")
USER_AGENT = f"posthog-outbox/{__version__} (posthog-python/{POSTHOG_VERSION})"
#: zlib level 5: most of level 9's ratio on JSON at a fraction of the CPU.
GZIP_LEVEL = 5
#: How PostHog's capture words the 400s that describe the request rather than an
#: event (``CaptureError`` in ``rust/capture/src/api.rs``): ``EmptyPayload``,
#: ``EmptyBatch``, ``RequestDecodingError`` (undecodable body) and
#: ``MultipleTokensError`` (400 in some capture versions). Matched at the start of the
#: answer's text, case-insensitively.
#: "failed to parse request" is not here: one event can cause it (a number beyond what
#: PostHog's JSON parser holds), so it is split like any 400 about an event, and the
#: rejection breaker holds a batch whose every event gets the same parse error.
REQUEST_LEVEL_DETAILS = (
    "request missing data payload",
    "request holds no event",
    "failed to decode request",
    "batch submitted with inconsistent api_key values",
)
#: The same cases by the ``code`` of the JSON body some capture versions answer with.
REQUEST_LEVEL_CODES = frozenset(
    {
        "empty_payload",
        "empty_batch",
        "request_decoding_error",
        "unroutable_events",
    }
)
_LOCATION_LIMIT = 300


class PostHogSink:
    """Ships batches to ``{host}/batch/``; any 2xx is success, anything else raises the
    SinkError that says what to do about it. Redirects are never followed."""

    name = "posthog"

    def __init__(
        self,
        api_key: str,
        host: str,
        *,
        gzip: bool = True,
        timeout: float = 15.0,
        transport: str = "direct",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self._api_key = api_key
        self.host = ph_request.determine_server_host(host).rstrip("/")
        self.gzip = gzip
        self.timeout = timeout
        self.transport = transport
        self._url = self.host + ph_request.EVENTS_ENDPOINT
        self._key_json = json.dumps(api_key)
        self._session = requests.Session()
        # posthog.request.post follows redirects with the session it is given; with
        # none allowed, requests raises TooManyRedirects (carrying the 3xx response)
        # instead of re-sending the batch as a GET.
        self._session.max_redirects = 0

    def __repr__(self) -> str:  # never show the key
        return f"PostHogSink(host={self.host!r}, gzip={self.gzip}, transport={self.transport!r})"

    def send(self, events: Sequence[Outbound]) -> None:
        """POST the events as one batch."""
        try:
            if self.transport == "posthog":
                self._send_with_posthog(events)
            else:
                self._send_direct(events)
        except requests.exceptions.TooManyRedirects as exc:
            response = exc.response
            if response is None:
                raise RedirectError("redirected (no response to read)") from exc
            raise self._redirect(response.status_code, response.headers.get("Location")) from exc
        except requests.exceptions.Timeout as exc:
            message = f"timed out after {self.timeout}s: {self._clean(exc)}"
            raise RetryableSinkError(message) from exc
        except requests.exceptions.RequestException as exc:
            raise RetryableSinkError(f"connection error: {self._clean(exc)}") from exc

    def _send_direct(self, events: Sequence[Outbound]) -> None:
        sent_at = datetime.now(UTC).isoformat()
        body = (
            '{"api_key":'
            + self._key_json
            + ',"batch":['
            + ",".join(e.json for e in events)
            + '],"sent_at":"'
            + sent_at
            + '"}'
        ).encode()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if self.gzip:
            body = gzip_module.compress(body, compresslevel=GZIP_LEVEL)
            headers["Content-Encoding"] = "gzip"
        response = self._session.post(
            self._url, data=body, headers=headers, timeout=self.timeout, allow_redirects=False
        )
        code = response.status_code
        if 200 <= code < 300:
            return
        if 300 <= code < 400:
            raise self._redirect(code, response.headers.get("Location"))
        detail, answer_code = read_answer(response.text)
        raise classify(code, self._clean(detail), retry_after(response), answer_code)

    def _send_with_posthog(self, events: Sequence[Outbound]) -> None:
        try:
            ph_request.batch_post(
                self._api_key,
                host=self.host,
                gzip=self.gzip,
                timeout=self.timeout,
                session=self._session,
                batch=[e.data for e in events],
            )
        except ph_request.APIError as exc:
            status = _status(exc.status)
            if status is not None and 200 <= status < 300:
                return  # batch_post raises for anything but 200; PostHog may say 204
            if status is not None and 300 <= status < 400:
                raise self._redirect(status, None) from exc  # a 3xx without a Location
            # posthog.request passes on a JSON body's ``detail``, else the body as is.
            detail, code = read_answer(str(exc.message))
            raise classify(exc.status, self._clean(detail), exc.retry_after, code) from exc

    def _clean(self, text: object) -> str:
        return clean_text(str(text), (self._api_key,))

    def _redirect(self, status: int, location: str | None) -> RedirectError:
        where = clean_text(location, (self._api_key,), _LOCATION_LIMIT) if location else None
        return RedirectError(
            f"HTTP {status}: redirected to {where or '(no Location header)'}; "
            "redirects are not followed: set POSTHOG_HOST to the URL the events should go to",
            status=status,
            location=where,
        )

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()


def read_answer(text: str) -> tuple[str, str | None]:
    """An error answer's text and machine-readable code.

    PostHog's capture answers in plain text; some versions (and proxies) answer with a
    JSON object whose ``detail`` or ``error`` holds the text and ``code`` the case.
    """
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        return text, None
    if not isinstance(payload, dict):
        return text, None
    code = payload.get("code")
    for key in ("detail", "error"):
        value = payload.get(key)
        if isinstance(value, str):
            return value, code if isinstance(code, str) else None
    return text, code if isinstance(code, str) else None


def _status(status: int | str) -> int | None:
    try:
        return int(status)
    except (TypeError, ValueError):
        return None


def retry_after(response: requests.Response) -> float | None:
    """The ``Retry-After`` header in seconds (it may be a number or an HTTP date)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def request_level(detail: str, code: str | None = None) -> bool:
    """Whether a 400's answer describes the request rather than one of its events."""
    if code is not None and code in REQUEST_LEVEL_CODES:
        return True
    text = detail.strip().lower()
    return text.startswith(REQUEST_LEVEL_DETAILS)


def classify(
    status: int | str,
    detail: str,
    retry_after: float | None = None,
    code: str | None = None,
) -> SinkError:
    """The SinkError for an HTTP status that is not 2xx. ``detail`` is already clean."""
    number = _status(status)
    if number is None:
        return RetryableSinkError(f"HTTP {status}: {detail}")
    text = f"HTTP {number}: {detail}"
    if 300 <= number < 400:
        return RedirectError(text, status=number)
    if number == 429:
        return RateLimitedError(text, retry_after=retry_after)
    if number in (401, 403):
        return UnauthorizedError(text, status=number)
    if number == 400 and request_level(detail, code):
        return RequestRejectedError(text, status=number, detail=detail)
    if number in (400, 413):
        return RejectedError(text, status=number, detail=detail)
    return RetryableSinkError(text, status=number)
