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

import json
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
#: zlib level 3, the best ratio of zlib's fast strategy (levels 1 to 3): on a batch of 1,000
#: events, 6.1x smaller for 4 ms of CPU, where level 5 takes 6.4 ms for 6.6x (docs/benchmarks.md,
#: "Gzip"). Off the drain's critical path either way (see prepare).
GZIP_LEVEL = 3
#: zlib's window bits for a gzip stream (header, deflate data, CRC-32 and size).
_GZIP_WBITS = 31
#: Bodies compressed ahead and not yet sent, at most (a drainer has two batches in
#: hand; more than that are batches handed back unsent).
_PREPARED_LIMIT = 4
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
        # Request bodies compressed ahead (see prepare): the first event's id -> the
        # events and the compression under way.
        self._prepared: dict[int, tuple[list[Outbound], Future[_Compressed]]] = {}
        self._prepared_lock = threading.Lock()
        self._compressor: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:  # never show the key
        return f"PostHogSink(host={self.host!r}, gzip={self.gzip}, transport={self.transport!r})"

    def prepare(self, events: Sequence[Outbound]) -> None:
        """Start compressing the body of a request for exactly these events, on the
        sink's own thread, so that a later :meth:`send` of the same events (the same
        :class:`Outbound` objects, in the same order) finds it done.

        The drainer calls this for a batch it claimed while the one before is on the
        wire; zlib releases the GIL, so the compression overlaps that request instead
        of delaying the next. Does nothing with gzip off or through posthog-python's
        request layer; a body prepared and never sent is dropped after a few more.
        """
        if not self.gzip or self.transport != "direct" or not events:
            return
        events = list(events)
        with self._prepared_lock:
            if self._compressor is None:
                self._compressor = ThreadPoolExecutor(1, thread_name_prefix="outbox-gzip")
            try:
                future = self._compressor.submit(_compress_head, self._head(events))
            except RuntimeError:  # the interpreter is exiting: send compresses it then
                return
            self._prepared[id(events[0])] = (events, future)
            while len(self._prepared) > _PREPARED_LIMIT:
                del self._prepared[next(iter(self._prepared))]

    def _take_prepared(self, events: Sequence[Outbound]) -> Future[_Compressed] | None:
        with self._prepared_lock:
            entry = self._prepared.pop(id(events[0]), None) if events else None
        if entry is None:
            return None
        prepared, future = entry
        if len(prepared) != len(events) or any(
            a is not b for a, b in zip(prepared, events, strict=True)
        ):
            return None
        return future

    def _head(self, events: Sequence[Outbound]) -> bytes:
        """The body up to the value of ``sent_at``, which is filled in when sent."""
        return (
            '{"api_key":' + self._key_json + ',"batch":[' + ",".join([e.json for e in events])
        ).encode() + b'],"sent_at":"'

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
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if self.gzip:
            future = self._take_prepared(events)
            compressed = future.result() if future is not None else None
            if compressed is None:  # not prepared ahead: compress it now
                compressed = _compress_head(self._head(events))
            sent_at = datetime.now(UTC).isoformat()
            body = compressed.finish((sent_at + '"}').encode())
            headers["Content-Encoding"] = "gzip"
        else:
            sent_at = datetime.now(UTC).isoformat()
            body = self._head(events) + (sent_at + '"}').encode()
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
        """Close the HTTP session (and the compressing thread, if one was started)."""
        with self._prepared_lock:
            compressor, self._compressor = self._compressor, None
            self._prepared.clear()
        if compressor is not None:
            compressor.shutdown(wait=True)
        self._session.close()


class _Compressed:
    """A gzip stream of a request body's head, open for its last few bytes."""

    __slots__ = ("_head", "_stream")

    def __init__(self, stream: zlib._Compress, head: bytes) -> None:
        self._stream = stream
        self._head = head

    def finish(self, tail: bytes) -> bytes:
        """The whole gzip body: the head compressed so far, then ``tail`` (a few
        bytes) and the end of the stream. Once only."""
        return self._head + self._stream.compress(tail) + self._stream.flush()


def _compress_head(head: bytes) -> _Compressed:
    """Compress a body's head as one gzip member still open for the tail (zlib
    releases the GIL while it compresses)."""
    stream = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
    return _Compressed(stream, stream.compress(head))


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
