"""A PostHog-capture-compatible HTTP endpoint for tests.

`CaptureServer` listens on a local port and answers the requests the PostHog client libraries
make when they ship events (``POST /batch/`` with a JSON body, optionally gzip-compressed) and
evaluate feature flags (``POST /flags/?v=2``). It records what it received and lets a test
script the answers: outages, rate limits with ``Retry-After``, slow responses, redirects,
rejected API keys, oversized payloads, partial deliveries and events the server refuses. Point
a client at it by giving ``srv.url`` as the PostHog host::

    with CaptureServer() as srv:
        srv.enqueue_reply(Reply(status=503, retry_after=1))
        ...  # run the code under test with POSTHOG_HOST=srv.url
        events = srv.wait_for_events(3)

Its answers are PostHog's: the same status codes and the same error texts (the constants of
`worker.testing.posthog_errors`, sent as ``text/plain`` as PostHog's capture does), so code
under test meets the cases it will meet in production.

It uses only the standard library and serves each connection on its own daemon thread, with
HTTP/1.1 keep-alive, so clients can reuse connections.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gzip
import json
import socket
import socketserver
import sys
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from . import posthog_errors as texts
from .flags import FLAGS_PATHS, FlagValue, flags_document, flags_version
from .posthog_errors import TEXT_CONTENT_TYPE, key_problem

__all__ = [
    "AI_EVENT_NAMES",
    "AI_PATHS",
    "CAPTURE_PATHS",
    "FLAGS_PATHS",
    "REDIRECT_STATUSES",
    "SCRIPTED_TEXTS",
    "CaptureServer",
    "Event",
    "Exchange",
    "ReceivedRequest",
    "Reply",
    "Route",
]

Event = dict[str, Any]
"""One analytics event as the client sent it (keys such as event, distinct_id, properties, uuid)."""

CAPTURE_PATHS: Final[frozenset[str]] = frozenset(
    variant
    for path in ("/batch/", "/capture/", "/e/", "/i/v0/e/", "/track/", "/engage/")
    for variant in (path, path.rstrip("/"))
)
"""Request paths answered as capture endpoints (with and without the trailing slash), as
PostHog's capture routes them (``rust/capture/src/router.rs``)."""

AI_PATHS: Final[frozenset[str]] = frozenset({"/i/v0/ai/batch", "/i/v0/ai/batch/"})
"""PostHog's AI batch endpoint (``AI_EVENTS_ENDPOINT`` in posthog-python's ``request.py``):
the body and the judging of ``/batch/``, for AI events only."""

AI_EVENT_NAMES: Final[frozenset[str]] = frozenset(
    {
        "$ai_generation",
        "$ai_span",
        "$ai_trace",
        "$ai_embedding",
        "$ai_metric",
        "$ai_feedback",
        "$ai_evaluation",
    }
)
"""The AI events PostHog's AI endpoint takes. A request to `AI_PATHS` carrying any other event
is refused whole with a 400, as PostHog's capture-ai refuses a mixed batch."""

REDIRECT_STATUSES: Final[frozenset[int]] = frozenset({301, 302, 303, 307, 308})
"""The statuses a `Reply` with a ``location`` may have."""

SCRIPTED_TEXTS: Final[dict[int, str]] = {
    400: texts.NON_RETRYABLE,
    401: texts.UNKNOWN_KEY,
    413: texts.EVENT_TOO_BIG.format("scripted reply"),
    429: texts.RATE_LIMITED,
    500: texts.INTERNAL_ERROR,
    503: texts.RETRYABLE,
}
"""The body of a scripted error `Reply` without its own ``body``: PostHog's text for that
status. Other statuses (502, 504, ...) come from proxies in front of PostHog, and get the
status's reason phrase (``Bad Gateway``)."""

_JSON: Final = "application/json"
_OK_BODY: Final = b'{"status": 1}'
_GZIP_QUERY_VALUES: Final = frozenset({"gzip", "gzip-js"})
_GZIP_MAGIC: Final = b"\x1f\x8b"
_NO_BODY_STATUSES: Final = frozenset({HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED})
_CAPTURE_METHODS: Final = "GET, POST, OPTIONS"
_MAX_CHUNK_LINE: Final = 65_536


@dataclass(frozen=True, slots=True)
class Reply:
    """How the server answers a capture request.

    Args:
        status: HTTP status to answer with: 200-599, or one of `REDIRECT_STATUSES` together
            with ``location``. A 2xx reply (200, 201, 202, 204, ...) still has the request
            judged (bad bodies, keys and events are refused as PostHog refuses them); when the
            request is fine, it is answered with this status and its events are accepted. Any
            other reply is sent as is, whatever the request carried.
        body: JSON object to send as the response body. A ``str`` or ``bytes`` is sent as is,
            as ``text/plain`` (for example an HTML error page from a proxy). ``None`` sends the
            default body: ``{"status": 1}`` for 2xx (nothing for 204), `SCRIPTED_TEXTS` for
            errors, nothing for redirects.
        retry_after: Value of a ``Retry-After`` header (seconds, or an HTTP date string);
            ``None`` sends no header.
        delay: Seconds to wait, after reading the request, before answering (to provoke client
            timeouts). Stopping the server cuts the wait short.
        times: How many consecutive requests a queued reply answers.
        location: Where a redirect points (its ``Location`` header), e.g.
            ``srv.url + "/batch/"``; only with a redirect status.
        accept_first: For an error status (400-599): accept the first ``accept_first`` events
            of the request anyway (they reach ``events``, or ``dropped`` for an unknown key)
            and still answer ``status``, as a server that stored part of a batch before it
            failed. ``None`` accepts none.
    """

    status: int = 200
    body: dict[str, Any] | str | bytes | None = None
    retry_after: str | float | None = None
    delay: float = 0.0
    times: int = 1
    location: str | None = None
    accept_first: int | None = None

    def __post_init__(self) -> None:
        if self.status in REDIRECT_STATUSES:
            if not self.location:
                raise ValueError(f"a {self.status} redirect needs a location")
        elif not 200 <= self.status <= 599 or 300 <= self.status <= 399:
            raise ValueError(
                f"status must be 200-299, 400-599 or one of {sorted(REDIRECT_STATUSES)}, "
                f"got {self.status}"
            )
        elif self.location is not None:
            raise ValueError(f"location is only for redirects, not for status {self.status}")
        if self.delay < 0:
            raise ValueError(f"delay must not be negative, got {self.delay}")
        if self.times < 1:
            raise ValueError(f"times must be at least 1, got {self.times}")
        if self.accept_first is not None:
            if self.status < 400:
                raise ValueError(
                    f"accept_first is for error statuses (400-599), not for {self.status}"
                )
            if self.accept_first < 0:
                raise ValueError(f"accept_first must not be negative, got {self.accept_first}")

    @property
    def is_redirect(self) -> bool:
        """Whether this reply is a redirect."""
        return self.status in REDIRECT_STATUSES

    @property
    def is_success(self) -> bool:
        """Whether this reply is a 2xx one, under which a fine request's events are accepted."""
        return 200 <= self.status <= 299


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request the server received, and what it answered.

    Attributes:
        path: Request path without the query string, e.g. ``"/batch/"``.
        headers: Request headers, with lower-cased names (``headers["content-encoding"]``).
        status: HTTP status the server answered with.
        api_key: The project key the request named, as sent: the body's ``api_key`` (or
            ``token``), else the events' one; ``None`` when there is none or the body did not
            parse.
        events: Events in the body, in order; empty when the body did not parse, or when
            ``record_events`` was off at the time.
        raw_size: Size of the body on the wire, in bytes (compressed size for gzip bodies).
        gzip: Whether the body was gzip-compressed.
        received_at: ``time.monotonic()`` when the request arrived.
        event_count: Number of events in the body (also counted when they are not stored).
        detail: The error text answered (a `worker.testing.posthog_errors` text for the
            server's own refusals); ``None`` for 2xx and redirects.
        method: The request method, e.g. ``"POST"`` or ``"GET"``.
        delivered: How many of its events the server kept: all of them when answered 2xx,
            the first N of a partial delivery (`Reply.accept_first`,
            ``CaptureServer.partial_delivery``), else 0.
        dropped: Whether the kept events went to ``dropped`` (a well-formed key outside
            ``project_keys``) instead of ``events``.
        location: The ``Location`` header of a redirect answer; ``None`` otherwise.
        document: The decoded JSON body of a ``/flags`` request; ``None`` for other requests.
    """

    path: str
    headers: dict[str, str]
    status: int
    api_key: str | None
    events: list[Event]
    raw_size: int
    gzip: bool
    received_at: float
    event_count: int = 0
    detail: str | None = None
    method: str = "POST"
    delivered: int = 0
    dropped: bool = False
    location: str | None = None
    document: dict[str, Any] | None = None

    @property
    def accepted(self) -> bool:
        """Whether the request was answered 2xx, so its events count as delivered."""
        return 200 <= self.status <= 299

    @classmethod
    def plain(
        cls,
        exchange: Exchange,
        raw: bytes | None,
        status: int,
        detail: str | None,
        *,
        api_key: str | None = None,
        gzip: bool = False,
        document: dict[str, Any] | None = None,
    ) -> ReceivedRequest:
        """A request that carried no events (not a capture request), as answered."""
        return cls(
            path=exchange.path,
            headers=exchange.headers,
            status=status,
            api_key=api_key,
            events=[],
            raw_size=len(raw or b""),
            gzip=gzip,
            received_at=exchange.received_at,
            detail=detail,
            method=exchange.method,
            document=document,
        )


@dataclass(frozen=True, slots=True)
class _RejectRule:
    predicate: Callable[[Event], bool]
    status: int
    detail: str


@dataclass(slots=True)
class _QueuedReply:
    reply: Reply
    remaining: int


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A capture body taken apart: its key and events, or PostHog's reason to refuse it."""

    is_gzip: bool = False
    body_size: int = 0
    api_key: str | None = None
    events: list[Event] | None = None
    status: int = 200
    error: str | None = None
    decoded: bool = True
    """Whether the body got past decompression (so its size is known)."""


@dataclass(frozen=True, slots=True)
class _Verdict:
    """How to answer a capture request, and how many of its events to keep."""

    status: int
    detail: str | None = None
    keep: int = 0


Route = Callable[["CaptureServer", "Exchange"], None]
"""An endpoint served beside the built-in ones: called with the server and the request, on a
handler thread, for every method; it must answer with `Exchange.respond` exactly once. A route
whose path ends in ``*`` answers every path that starts with the rest (after exact paths)."""


def _extra_routes() -> dict[str, Route]:
    """ROUTING POINT: endpoints implemented in sibling modules of worker/testing, by path.

    Each server starts with a copy of this in ``CaptureServer.routes`` and consults it before
    its built-in paths. Import lazily here (inside the function) so a sibling module may import
    this one.
    """
    from .capture_v1 import V1_ROUTES
    from .query_api import QUERY_ROUTES

    routes: dict[str, Route] = {}
    routes.update(V1_ROUTES)  # capture v1, /i/v1/analytics/events (capture_v1.py)
    routes.update(QUERY_ROUTES)  # the query API, /api/projects/<id>/query/ (query_api.py)
    return routes


class CaptureServer:
    """A local HTTP server that speaks PostHog's event capture API, for tests.

    Use it as a context manager, or call `start` and `stop`. While running, ``url`` is the host
    to configure the PostHog client with. Every request is recorded in ``requests``.

    Paths and methods, as PostHog's capture routes them:

    - `CAPTURE_PATHS` (``/batch/``, ``/e/``, ``/capture/``, ``/i/v0/e/``, ``/track/``,
      ``/engage/``, each with and without the trailing slash): ``POST`` and ``GET`` are
      capture requests; ``OPTIONS`` is answered 200 (CORS preflight); other methods 405.
      A ``GET`` without a ``data`` query parameter has no payload and is answered 400
      `~worker.testing.posthog_errors.EMPTY_PAYLOAD`, which is what ``requests`` sends after
      following a 301/302/303 answer to a ``POST``. Scripted replies answer ``POST`` only.
    - `AI_PATHS` (``/i/v0/ai/batch/``, ``/i/v0/ai/batch``): ``POST`` is a capture request
      judged like one to ``/batch/``, for AI events (`AI_EVENT_NAMES`) only: a request
      carrying another event is refused whole, 400 `NON_RETRYABLE`. Its events reach
      ``events`` like any other (``ReceivedRequest.path`` tells them apart).
    - `FLAGS_PATHS` (``/flags/``, ``/flags``): PostHog's feature-flags endpoint, see
      ``feature_flags``. Never counted as capture requests and never given scripted replies.
    - ``/api/projects/<id>/query/``: PostHog's query API, answering reconcile's count query
      from ``events`` (see ``query``, `worker.testing.query_api`).
    - ``routes``: endpoints of sibling modules, consulted first.
    - anything else: 404.

    Each capture ``POST`` is answered by the first of:

    1. the next queued reply (`enqueue_reply`), else ``default_reply``, when it is not 2xx:
       sent as is (an error, or a redirect with its ``Location``);
    2. 400 `EMPTY_PAYLOAD` when there is no body;
    3. 400 `DECODING_ERROR` when a gzip body does not decompress;
    4. 413 `EVENT_TOO_BIG` when the decompressed body is larger than ``max_body_bytes``;
    5. 400 `PARSING_ERROR` when the body is not capture's JSON (a ``batch`` object, one event,
       or an array of events, each an object with a string ``event``);
    6. 401 when the key is missing (`NO_KEY`), differs between events (`MULTIPLE_KEYS`), has
       the wrong shape (`INVALID_KEY`, see `~worker.testing.posthog_errors.key_problem`), or
       differs from ``require_api_key`` (`UNKNOWN_KEY`);
    7. 400 `EMPTY_BATCH` when there is no event;
    8. 400 `MISSING_EVENT_NAME` / `MISSING_DISTINCT_ID` for an event without a name or a
       distinct_id; on `AI_PATHS`, 400 `NON_RETRYABLE` for an event not in `AI_EVENT_NAMES`;
    9. the status of the first `reject_events` rule matching any event (the whole request is
       refused; 500 if a predicate raises);
    10. 413 `EVENT_TOO_BIG` when one event's JSON (``json.dumps(event)``) is larger than
        ``max_event_bytes``; with ``partial_delivery`` the events before it are accepted;
    11. the reply's 2xx status, and the request's events are accepted: they reach ``events``,
        or ``dropped`` when ``project_keys`` is set and does not hold the key.

    (The texts are those of `worker.testing.posthog_errors`; error answers are plain text.)
    The chosen reply's ``retry_after`` and ``delay`` apply whatever the final status. Only the
    events of requests answered 2xx, and those of partial deliveries, reach ``events``. All
    recorded state is guarded by one lock, so tests may read it while clients are still
    sending.

    Attributes:
        default_reply: Answers capture requests when the reply queue is empty.
        require_api_key: When set, requests naming another key are answered 401
            `UNKNOWN_KEY`, as PostHog does where it enforces known keys; ``/flags`` knows only
            this key.
        project_keys: ``None`` (the default): every well-formed key is a project's. A set:
            the keys of the projects that exist. A well-formed key outside the set is answered
            200 ``{"status": 1}`` and its events are dropped, as PostHog's capture does (it
            does not look keys up; ingestion drops the events later): they are recorded in
            ``dropped``, never in ``events``. ``/flags`` answers such a key 401.
        feature_flags: The flags ``/flags`` evaluates, for every distinct_id: flag key to
            ``True``/``False`` or a variant name. Empty by default.
        redirect_to: When set, every request (any method, any path) is answered
            ``301 Moved Permanently`` with ``Location: <redirect_to><path?query>``, as a host
            that moved (``http://`` to ``https://``, an old domain) answers.
        max_body_bytes: When set, larger decompressed bodies are answered 413.
        max_event_bytes: When set, bodies with a larger event are answered 413.
        partial_delivery: When true, a 413 for an event over ``max_event_bytes`` accepts the
            events before it, as PostHog's capture has stored them by the time it meets the
            oversized one.
        record_events: When false, accepted events are only counted (``accepted_count``), not
            stored, and recorded requests carry no events; for benchmarks.
        routes: Extra endpoints by path (see `Route`); starts with the sibling modules' ones.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Prepare a server for ``host``:``port``; ``port=0`` picks a free port on `start`."""
        self._host = host
        self._port = port
        self.default_reply: Reply = Reply()
        self.require_api_key: str | None = None
        self.project_keys: set[str] | None = None
        self.feature_flags: dict[str, FlagValue] = {}
        self.redirect_to: str | None = None
        self.max_body_bytes: int | None = None
        self.max_event_bytes: int | None = None
        self.partial_delivery: bool = False
        self.record_events: bool = True
        self.routes: dict[str, Route] = _extra_routes()
        from .capture_v1 import CaptureV1

        #: The capture v1 endpoint's scripting and answers (see `CaptureV1`).
        self.v1 = CaptureV1(self)
        from .query_api import QueryApi

        #: The query API's key, project and scripting (see `QueryApi`).
        self.query = QueryApi(self)
        self._cond = threading.Condition(threading.Lock())
        self._requests: list[ReceivedRequest] = []
        self._events: list[Event] = []
        self._dropped: list[Event] = []
        self._accepted_count = 0
        self._replies: deque[_QueuedReply] = deque()
        self._rules: list[_RejectRule] = []
        self._stopping = threading.Event()
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._bound_port: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> CaptureServer:
        """Bind the port and serve on a background daemon thread; return ``self``.

        A stopped server can be started again: it binds the same port as before, so ``url``
        does not change (handy to simulate an outage with refused connections).
        """
        if self._server is not None:
            raise RuntimeError("CaptureServer is already running")
        port = self._bound_port if self._bound_port is not None else self._port
        server = _HTTPServer((self._host, port), self)
        self._bound_port = server.server_address[1]
        self._stopping.clear()
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"CaptureServer:{self._bound_port}",
            daemon=True,
        )
        self._server = server
        self._thread = thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: close the listening socket and all open connections.

        Requests waiting out a reply ``delay`` stop waiting. Recordings are kept. Calling it on
        a server that is not running does nothing.
        """
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        self._stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    def __enter__(self) -> CaptureServer:
        """Start the server and return it."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server is serving."""
        return self._server is not None

    @property
    def host(self) -> str:
        """The host the server binds."""
        return self._host

    @property
    def port(self) -> int:
        """The bound port (the requested one until the server was first started)."""
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def url(self) -> str:
        """Base URL to give the PostHog client as its host, e.g. ``http://127.0.0.1:54321``."""
        if self._bound_port is None:
            raise RuntimeError("CaptureServer has not been started; call start() first")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._bound_port}"

    # -- scripting -----------------------------------------------------------------------------

    def enqueue_reply(self, *replies: Reply) -> None:
        """Queue replies for the next capture requests, in order.

        Each reply answers ``reply.times`` consecutive requests; once the queue is empty,
        ``default_reply`` answers.
        """
        with self._cond:
            self._replies.extend(_QueuedReply(reply, reply.times) for reply in replies)

    @property
    def replies_pending(self) -> int:
        """How many more requests the queued replies will answer."""
        with self._cond:
            return sum(entry.remaining for entry in self._replies)

    def reject_events(
        self,
        predicate: Callable[[Event], bool],
        status: int = 400,
        detail: str = texts.NON_RETRYABLE,
    ) -> None:
        """Refuse, with ``status``, every request carrying an event for which ``predicate`` is true.

        The whole request is refused (as PostHog's ``/batch/`` does when one event is
        malformed) and none of its events is accepted; ``detail`` is the answer's text.
        Rules are checked in the order they were added; they stay until `clear_rules`.
        """
        if not 400 <= status <= 599:
            raise ValueError(f"a rejection status must be between 400 and 599, got {status}")
        with self._cond:
            self._rules.append(_RejectRule(predicate, status, detail))

    def clear_rules(self) -> None:
        """Remove all `reject_events` rules."""
        with self._cond:
            self._rules.clear()

    def reset(self) -> None:
        """Forget recorded requests and events, drop queued replies, restore ``default_reply``.

        Rules, keys, flags and limits (`reject_events`, ``require_api_key``, ``project_keys``,
        ``feature_flags``, ``redirect_to``, ``max_*_bytes``, ``partial_delivery``) are kept.
        """
        with self._cond:
            self._requests.clear()
            self._events.clear()
            self._dropped.clear()
            self._accepted_count = 0
            self._replies.clear()
            self.default_reply = Reply()
        self.v1.reset()
        self.query.reset()

    # -- recordings ----------------------------------------------------------------------------

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request received, in arrival order, whatever it was answered (a copy)."""
        with self._cond:
            return list(self._requests)

    def flags_requests(self) -> list[ReceivedRequest]:
        """The ``/flags`` requests received, in arrival order (also in ``requests``)."""
        with self._cond:
            return [request for request in self._requests if request.path in FLAGS_PATHS]

    @property
    def events(self) -> list[Event]:
        """Events accepted (answered 2xx, or kept by a partial delivery), in arrival order.

        Events of keys outside ``project_keys`` are never here but in ``dropped``. A copy.
        """
        with self._cond:
            return list(self._events)

    @property
    def dropped(self) -> list[Event]:
        """Events answered 200 but dropped, their key being outside ``project_keys`` (a copy)."""
        with self._cond:
            return list(self._dropped)

    @property
    def accepted_count(self) -> int:
        """Number of events accepted into ``events``, counted even when not recorded."""
        with self._cond:
            return self._accepted_count

    def uuids(self) -> list[str]:
        """The ``uuid`` of each accepted event, in order (events without one are skipped)."""
        with self._cond:
            return [str(event["uuid"]) for event in self._events if "uuid" in event]

    def event_names(self) -> list[str]:
        """The ``event`` name of each accepted event, in order (events without one skipped)."""
        with self._cond:
            return [str(event["event"]) for event in self._events if "event" in event]

    def wait_for_events(self, n: int, timeout: float = 10.0) -> list[Event]:
        """Block until at least ``n`` events were accepted; return the accepted events.

        Raises:
            TimeoutError: fewer than ``n`` events were accepted within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._accepted_count >= n, timeout):
                raise TimeoutError(
                    f"expected at least {n} accepted event(s) within {timeout}s, "
                    f"but {self._accepted_count} arrived; {self._summary()}"
                )
            return list(self._events)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[ReceivedRequest]:
        """Block until at least ``n`` requests were received; return all recorded requests.

        Raises:
            TimeoutError: fewer than ``n`` requests arrived within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= n, timeout):
                raise TimeoutError(
                    f"expected at least {n} request(s) within {timeout}s, "
                    f"but {len(self._requests)} arrived; {self._summary()}"
                )
            return list(self._requests)

    def _summary(self) -> str:
        """Describe the recordings for error messages; the caller holds the lock."""
        statuses = Counter(request.status for request in self._requests)
        answered = ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items()))
        return f"{len(self._requests)} request(s) received (by status: {answered or 'none'})"

    def __repr__(self) -> str:
        """Show the address and how much was received."""
        where = self.url if self._bound_port is not None else f"{self._host}:{self._port}"
        state = "running" if self.running else "stopped"
        with self._cond:
            return (
                f"<CaptureServer {where} {state} requests={len(self._requests)} "
                f"accepted={self._accepted_count}>"
            )

    # -- request handling (called on handler threads) ------------------------------------------
    #
    # Routes (see `Route`) may use `_next_reply`, `_check_key`, `_key_is_known`, `_record`
    # and `_scripted_answer`, so every endpoint scripts, judges keys and records alike.

    def _dispatch(self, exchange: Exchange) -> None:
        """Route one request to the endpoint answering it."""
        if self.redirect_to is not None:
            self._answer_redirect(exchange, self.redirect_to.rstrip("/") + exchange.target)
            return
        route = self.routes.get(exchange.path) or self._prefix_route(exchange.path)
        if route is not None:
            route(self, exchange)
        elif exchange.path in CAPTURE_PATHS:
            if exchange.method in ("POST", "GET"):
                self._serve_capture(exchange)
            elif exchange.method == "OPTIONS":
                self._answer_plain(exchange, HTTPStatus.OK, None, {"Allow": _CAPTURE_METHODS})
            else:
                detail = f"method {exchange.method} is not allowed"
                self._answer_plain(
                    exchange, HTTPStatus.METHOD_NOT_ALLOWED, detail, {"Allow": _CAPTURE_METHODS}
                )
        elif exchange.path in AI_PATHS:
            if exchange.method == "POST":
                self._serve_capture(exchange, ai=True)
            elif exchange.method == "OPTIONS":
                self._answer_plain(exchange, HTTPStatus.OK, None, {"Allow": "POST, OPTIONS"})
            else:
                detail = f"method {exchange.method} is not allowed"
                self._answer_plain(
                    exchange, HTTPStatus.METHOD_NOT_ALLOWED, detail, {"Allow": "POST, OPTIONS"}
                )
        elif exchange.path in FLAGS_PATHS:
            if exchange.method in ("POST", "GET"):
                self._serve_flags(exchange)
            else:
                detail = f"method {exchange.method} is not allowed"
                self._answer_plain(
                    exchange, HTTPStatus.METHOD_NOT_ALLOWED, detail, {"Allow": "GET, POST"}
                )
        else:
            self._answer_plain(exchange, HTTPStatus.NOT_FOUND, f"no endpoint at {exchange.path}")

    def _prefix_route(self, path: str) -> Route | None:
        """The route of the longest ``prefix*`` in ``routes`` that ``path`` starts with."""
        best: tuple[int, Route] | None = None
        for key, route in self.routes.items():
            prefix = key[:-1]
            if (
                key.endswith("*")
                and path.startswith(prefix)
                and (best is None or len(key) > best[0])
            ):
                best = (len(key), route)
        return best[1] if best is not None else None

    def _next_reply(self) -> Reply:
        """Take the reply answering the next scripted request (queue first, then default)."""
        with self._cond:
            if not self._replies:
                return self.default_reply
            entry = self._replies[0]
            entry.remaining -= 1
            if entry.remaining <= 0:
                self._replies.popleft()
            return entry.reply

    def _key_is_known(self, key: str) -> bool:
        """Whether a well-formed ``key`` is a project's, under ``require_api_key`` and
        ``project_keys``."""
        key = key.strip()
        if self.require_api_key is not None and key != self.require_api_key.strip():
            return False
        return self.project_keys is None or key in self.project_keys

    def _check_key(self, key: str | None) -> tuple[int, str] | None:
        """The 401 answer capture gives ``key`` (missing, malformed, or not ``require_api_key``).

        ``None`` when capture accepts it; a key outside ``project_keys`` is accepted (its
        events are then dropped).
        """
        if key is None:
            return HTTPStatus.UNAUTHORIZED, texts.NO_KEY
        problem = key_problem(key)
        if problem is not None:
            return HTTPStatus.UNAUTHORIZED, texts.INVALID_KEY.format(problem)
        if self.require_api_key is not None and key.strip() != self.require_api_key.strip():
            return HTTPStatus.UNAUTHORIZED, texts.UNKNOWN_KEY
        return None

    def _is_dropped(self, key: str | None) -> bool:
        """Whether events accepted under ``key`` go to ``dropped`` instead of ``events``."""
        return self.project_keys is not None and (
            key is None or key.strip() not in self.project_keys
        )

    def _record(self, request: ReceivedRequest, kept: list[Event] | None = None) -> None:
        """Record ``request``; ``kept`` (its first ``request.delivered`` events) are accepted.

        They go to ``dropped`` when ``request.dropped``, else to ``events``.
        """
        kept = kept or []
        with self._cond:
            self._requests.append(request)
            if request.dropped:
                if self.record_events:
                    self._dropped.extend(kept)
            else:
                self._accepted_count += len(kept)
                if self.record_events:
                    self._events.extend(kept)
            self._cond.notify_all()

    @staticmethod
    def _scripted_answer(reply: Reply, status: int | None = None) -> tuple[bytes, str]:
        """The body and content type answering with ``reply`` (``status`` defaults to its own).

        The reply's own ``body`` applies only when the answer has the reply's status.
        """
        status = reply.status if status is None else status
        if reply.body is not None and status == reply.status:
            if isinstance(reply.body, bytes):
                return reply.body, TEXT_CONTENT_TYPE
            if isinstance(reply.body, str):
                return reply.body.encode(), TEXT_CONTENT_TYPE
            return _json_bytes(reply.body), _JSON
        if 200 <= status <= 299:
            return _OK_BODY, _JSON
        if status in REDIRECT_STATUSES:
            return b"", TEXT_CONTENT_TYPE
        return SCRIPTED_TEXTS.get(status, _phrase(status)).encode(), TEXT_CONTENT_TYPE

    def _answer_plain(
        self,
        exchange: Exchange,
        status: int,
        detail: str | None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer a request that is not a capture or flags request with an empty body."""
        raw = exchange.read_body()
        self._record(ReceivedRequest.plain(exchange, raw, status, detail))
        exchange.respond(status, b"", TEXT_CONTENT_TYPE, headers)

    def _answer_redirect(
        self,
        exchange: Exchange,
        location: str,
        status: int = HTTPStatus.MOVED_PERMANENTLY,
        request: ReceivedRequest | None = None,
        reply: Reply | None = None,
    ) -> None:
        if request is None:
            raw = exchange.read_body()
            request = ReceivedRequest(
                path=exchange.path,
                headers=exchange.headers,
                status=status,
                api_key=None,
                events=[],
                raw_size=len(raw or b""),
                gzip=False,
                received_at=exchange.received_at,
                method=exchange.method,
                location=location,
            )
        body, content_type = (b"", TEXT_CONTENT_TYPE)
        headers = {"Location": location}
        if reply is not None:
            body, content_type = self._scripted_answer(reply)
            retry_after = _retry_after(reply.retry_after)
            if retry_after is not None:
                headers["Retry-After"] = retry_after
            if reply.delay > 0:
                self._stopping.wait(reply.delay)
        self._record(request)
        exchange.respond(status, body, content_type, headers)

    def _serve_capture(self, exchange: Exchange, *, ai: bool = False) -> None:
        raw = exchange.read_body()
        if raw is None:
            detail = texts.DECODING_ERROR.format(
                "the body's Content-Length or chunked framing is unreadable"
            )
            request = ReceivedRequest(
                exchange.path,
                exchange.headers,
                400,
                None,
                [],
                0,
                False,
                exchange.received_at,
                detail=detail,
                method=exchange.method,
            )
            self._record(request)
            exchange.respond(400, detail.encode(), TEXT_CONTENT_TYPE)
            return
        parsed = _parse_capture(raw, exchange.headers, exchange.query)
        reply = self._next_reply() if exchange.method == "POST" else Reply()
        events = parsed.events if parsed.events is not None else []
        received = ReceivedRequest(
            path=exchange.path,
            headers=exchange.headers,
            status=reply.status,
            api_key=parsed.api_key,
            events=events if self.record_events else [],
            raw_size=len(raw),
            gzip=parsed.is_gzip,
            received_at=exchange.received_at,
            event_count=len(events),
            method=exchange.method,
        )
        if reply.is_redirect:
            assert reply.location is not None
            request = replace(received, location=reply.location)
            self._answer_redirect(exchange, reply.location, reply.status, request, reply)
            return
        verdict = self._judge(reply, parsed, ai=ai)
        keep = events[: verdict.keep]
        request = replace(
            received,
            status=verdict.status,
            detail=verdict.detail,
            delivered=len(keep),
            dropped=bool(keep) and self._is_dropped(parsed.api_key),
        )
        if verdict.detail is not None and verdict.status != reply.status:
            body, content_type = verdict.detail.encode(), TEXT_CONTENT_TYPE
        else:
            body, content_type = self._scripted_answer(reply, verdict.status)
        if reply.delay > 0:
            self._stopping.wait(reply.delay)
        self._record(request, keep)
        headers: dict[str, str] = {}
        retry_after = _retry_after(reply.retry_after)
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        exchange.respond(verdict.status, body, content_type, headers)

    def _judge(self, reply: Reply, parsed: _Parsed, *, ai: bool = False) -> _Verdict:
        events = parsed.events or []
        if not reply.is_success:
            keep = min(reply.accept_first or 0, len(events))
            body, _ = self._scripted_answer(reply)
            return _Verdict(reply.status, body.decode(errors="replace"), keep)
        if not parsed.decoded:
            return _Verdict(parsed.status, parsed.error)
        if self.max_body_bytes is not None and parsed.body_size > self.max_body_bytes:
            return _Verdict(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                texts.EVENT_TOO_BIG.format(
                    f"body of {parsed.body_size} bytes exceeds the limit of "
                    f"{self.max_body_bytes} bytes"
                ),
            )
        if parsed.error is not None or parsed.events is None:
            return _Verdict(parsed.status, parsed.error or texts.PARSING_ERROR.format("no events"))
        refused_key = self._check_key(parsed.api_key)
        if refused_key is not None:
            return _Verdict(*refused_key)
        if not events:
            return _Verdict(HTTPStatus.BAD_REQUEST, texts.EMPTY_BATCH)
        for event in events:
            problem = _event_problem(event)
            if problem is not None:
                return _Verdict(HTTPStatus.BAD_REQUEST, problem)
        if ai and any(event["event"] not in AI_EVENT_NAMES for event in events):
            return _Verdict(HTTPStatus.BAD_REQUEST, texts.NON_RETRYABLE)
        with self._cond:
            rules = list(self._rules)
        for rule in rules:
            try:
                matched = any(rule.predicate(event) for event in events)
            except Exception as exc:
                detail = f"{texts.INTERNAL_ERROR}: a reject_events predicate raised {exc!r}"
                return _Verdict(HTTPStatus.INTERNAL_SERVER_ERROR, detail)
            if matched:
                return _Verdict(rule.status, rule.detail)
        if self.max_event_bytes is not None:
            limit = self.max_event_bytes
            for index, event in enumerate(events):
                size = len(json.dumps(event).encode())
                if size > limit:
                    return _Verdict(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        texts.EVENT_TOO_BIG.format(
                            f"event {index} is {size} bytes, over the limit of {limit} bytes"
                        ),
                        keep=index if self.partial_delivery else 0,
                    )
        return _Verdict(reply.status, None, len(events))

    def _serve_flags(self, exchange: Exchange) -> None:
        raw = exchange.read_body()
        status: int = HTTPStatus.OK
        detail: str | None = None
        document: dict[str, Any] | None = None
        key: str | None = None
        is_gzip = "gzip" in exchange.headers.get("content-encoding", "").lower()
        if raw is None:
            status = HTTPStatus.BAD_REQUEST
            detail = texts.FLAGS_DECODING_ERROR.format("unreadable body framing")
        else:
            document, detail = _parse_flags(raw, is_gzip)
            if detail is not None:
                status = HTTPStatus.BAD_REQUEST
        if document is not None:
            found = document.get("api_key", document.get("token"))
            key = found if isinstance(found, str) else None
            if key is None:
                status, detail = HTTPStatus.UNAUTHORIZED, texts.FLAGS_NO_KEY
            elif key_problem(key) is not None or not self._key_is_known(key):
                status, detail = HTTPStatus.UNAUTHORIZED, texts.FLAGS_INVALID_KEY
            elif document.get("distinct_id") is None:
                status, detail = HTTPStatus.BAD_REQUEST, texts.FLAGS_MISSING_DISTINCT_ID
        request = ReceivedRequest.plain(
            exchange, raw, status, detail, api_key=key, gzip=is_gzip, document=document
        )
        self._record(request)
        if detail is not None:
            exchange.respond(status, detail.encode(), TEXT_CONTENT_TYPE)
            return
        answer = flags_document(dict(self.feature_flags), flags_version(exchange.query))
        exchange.respond(status, _json_bytes(answer), _JSON)


class Exchange:
    """One HTTP request as an endpoint sees it, and the way to answer it (once)."""

    def __init__(self, handler: _Handler) -> None:
        """Read the request line and headers of ``handler``'s current request."""
        self._handler = handler
        split = urlsplit(handler.path)
        self.method: str = handler.command
        self.path: str = split.path
        self.query: str = split.query
        self.target: str = handler.path
        """The request target as sent: path and query string."""
        self.headers: dict[str, str] = {
            name.lower(): value for name, value in handler.headers.items()
        }
        """Request headers, with lower-cased names."""
        self.received_at: float = time.monotonic()

    def read_body(self) -> bytes | None:
        """Read the request body (call once); ``None`` when its framing is broken.

        After a broken framing the connection is closed once answered.
        """
        raw = self._handler.read_body()
        if raw is None:
            self._handler.close_connection = True
        return raw

    def respond(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = TEXT_CONTENT_TYPE,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Send one complete response, always with a Content-Length."""
        handler = self._handler
        if status in _NO_BODY_STATUSES:
            body = b""
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            if handler.close_connection:
                handler.send_header("Connection", "close")
            handler.end_headers()
            if body and self.method != "HEAD":
                handler.wfile.write(body)
        except OSError:
            handler.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its `CaptureServer` and its open connections."""

    daemon_threads = True
    block_on_close = False
    # The default backlog of 5 makes the kernel drop connection attempts when many clients
    # connect at once, which then stall for a SYN retransmit (about a second).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], capture: CaptureServer) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.capture = capture
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without `HTTPServer`'s reverse DNS lookup of the host, which can be slow."""
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        """Shut down every open connection so idle keep-alive handler threads end."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that went away; report anything else."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) or self.capture._stopping.is_set():
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to the owning `CaptureServer`."""

    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "CaptureServer/1"

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        self.server.untrack(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""

    def _dispatch(self) -> None:
        self.server.capture._dispatch(Exchange(self))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _dispatch

    def read_body(self) -> bytes | None:
        """Read the request body; ``None`` when its framing is broken."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            size = int(length)
        except ValueError:
            return None
        if size < 0:
            return None
        return self.rfile.read(size)

    def _read_chunked(self) -> bytes | None:
        chunks: list[bytes] = []
        try:
            while True:
                line = self.rfile.readline(_MAX_CHUNK_LINE)
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(_MAX_CHUNK_LINE)
            while self.rfile.readline(_MAX_CHUNK_LINE) not in (b"\r\n", b"\n", b""):
                pass  # trailers
        except ValueError:
            return None
        return b"".join(chunks)


def _decode(raw: bytes, headers: dict[str, str], query: str) -> tuple[bool, bytes | None, str]:
    """Decompress a body: ``(is_gzip, data, "")``, or ``(is_gzip, None, why)``.

    Gzip is taken from ``Content-Encoding``, the ``compression`` query parameter, or the gzip
    magic bytes (PostHog's capture detects those too).
    """
    is_gzip = "gzip" in headers.get("content-encoding", "").lower()
    if not is_gzip and query:
        values = parse_qs(query).get("compression", [])
        is_gzip = any(value.lower() in _GZIP_QUERY_VALUES for value in values)
    is_gzip = is_gzip or raw.startswith(_GZIP_MAGIC)
    if not is_gzip:
        return False, raw, ""
    try:
        return True, gzip.decompress(raw), ""
    except (OSError, EOFError, zlib.error):
        return True, None, "invalid gzip data"


def _payload(raw: bytes, query: str) -> bytes:
    """The payload: the body, else a ``data`` query parameter (JSON, or base64 of it)."""
    if raw:
        return raw
    values = parse_qs(query).get("data", [])
    if not values or not values[0]:
        return b""
    data = values[0].encode()
    if data.lstrip()[:1] in (b"{", b"["):
        return data
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return data


def _parse_capture(raw: bytes, headers: dict[str, str], query: str) -> _Parsed:
    """Take a capture body apart, once; errors carry PostHog's status and text."""
    payload = _payload(raw, query)
    if not payload:
        return _Parsed(status=HTTPStatus.BAD_REQUEST, error=texts.EMPTY_PAYLOAD, decoded=False)
    is_gzip, data, why = _decode(payload, headers, query)
    if data is None:
        return _Parsed(
            is_gzip,
            status=HTTPStatus.BAD_REQUEST,
            error=texts.DECODING_ERROR.format(why),
            decoded=False,
        )
    size = len(data)

    def refuse(detail: str, api_key: str | None = None) -> _Parsed:
        return _Parsed(
            is_gzip,
            size,
            api_key,
            status=HTTPStatus.BAD_REQUEST,
            error=texts.PARSING_ERROR.format(detail),
        )

    try:
        text = data.decode()
    except UnicodeDecodeError:
        return _Parsed(
            is_gzip,
            size,
            status=HTTPStatus.BAD_REQUEST,
            error=texts.DECODING_ERROR.format("invalid body encoding"),
        )
    try:
        document = _loads_as_posthog(text)
    except (ValueError, RecursionError) as exc:
        return refuse(f"the body is not valid JSON: {exc}")

    batch_key: object = None
    if isinstance(document, dict):
        batch_key = document.get("api_key", document.get("token"))
        if "batch" in document:
            events = document["batch"]
            if not isinstance(events, list):
                return refuse("'batch' must be a JSON array of events", _str_or_none(batch_key))
        elif "event" in document:
            events = [{k: v for k, v in document.items() if k != "api_key"}]
            batch_key = _event_key(document)  # one event: its key is the event's own
        else:
            return refuse("the body has neither a 'batch' nor an 'event' key")
    elif isinstance(document, list):
        events = document
    else:
        return refuse("the body must be a JSON object or array")
    if batch_key is not None and not isinstance(batch_key, str):
        return refuse("'api_key' must be a string")
    if not all(isinstance(event, dict) for event in events):
        return refuse("every event must be a JSON object", _str_or_none(batch_key))
    for event in events:
        if not isinstance(event.get("event"), str):
            return refuse("every event needs a string 'event'", _str_or_none(batch_key))
        properties = event.get("properties")
        if properties is not None and not isinstance(properties, dict):
            return refuse("an event's 'properties' must be a JSON object", _str_or_none(batch_key))
    if isinstance(batch_key, str):
        return _Parsed(is_gzip, size, batch_key, events)
    keys = {key for key in map(_event_key, events) if key is not None}
    if len(keys) > 1:
        return _Parsed(
            is_gzip,
            size,
            _event_key(events[0]),
            events,
            HTTPStatus.UNAUTHORIZED,
            texts.MULTIPLE_KEYS,
        )
    return _Parsed(is_gzip, size, next(iter(keys), None), events)


def _event_key(event: Event) -> str | None:
    """An event's own key: ``api_key`` or ``token``, else ``properties.token``."""
    for found in (event.get("api_key"), event.get("token")):
        if isinstance(found, str):
            return found
    properties = event.get("properties")
    if isinstance(properties, dict) and isinstance(properties.get("token"), str):
        return str(properties["token"])
    return None


def _event_problem(event: Event) -> str | None:
    """PostHog's reason to refuse one (parsed) event, or ``None``."""
    if not event["event"]:
        return texts.MISSING_EVENT_NAME
    distinct_id = event.get("distinct_id")
    properties = event.get("properties")
    if distinct_id is None and isinstance(properties, dict):
        distinct_id = properties.get("distinct_id")
    if distinct_id is None:
        return texts.MISSING_DISTINCT_ID
    return None


def _parse_flags(raw: bytes, is_gzip: bool) -> tuple[dict[str, Any] | None, str | None]:
    """A ``/flags`` body as a JSON object, or PostHog's text refusing it."""
    data = raw
    if is_gzip or raw.startswith(_GZIP_MAGIC):
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            return None, texts.FLAGS_DECODING_ERROR.format("invalid gzip data")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        return None, texts.FLAGS_PARSING_ERROR.format(f"the body is not valid JSON: {exc}")
    if not isinstance(document, dict):
        return None, texts.FLAGS_PARSING_ERROR.format("the body must be a JSON object")
    return document, None


#: The largest magnitude a JSON number may have for PostHog's parser (serde_json reads
#: an integer beyond 64 bits as a double, and refuses one beyond a double's range).
_DOUBLE_MAX: Final = 1.7976931348623157e308


def _finite_number(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {text[:40]}")
    return number


def _double_int(text: str) -> int:
    number = int(text)
    if abs(number) > _DOUBLE_MAX:
        raise ValueError(f"number out of range: {text[:40]}...")
    return number


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _loads_as_posthog(text: str) -> Any:
    """``json.loads``, refusing what serde_json refuses: numbers beyond a double's
    range, and the NaN/Infinity extensions."""
    return json.loads(
        text,
        parse_float=_finite_number,
        parse_int=_double_int,
        parse_constant=_refuse_constant,
    )


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _json_bytes(document: object) -> bytes:
    return json.dumps(document).encode()


def _retry_after(value: str | float | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
