"""A PostHog-capture-compatible HTTP endpoint for tests.

`CaptureServer` listens on a local port and answers the requests the PostHog client libraries
make when they ship events (``POST /batch/`` with a JSON body, optionally gzip-compressed). It
records what it received and lets a test script the answers: outages, rate limits with
``Retry-After``, slow responses, rejected API keys, oversized payloads and events the server
refuses. Point a client at it by giving ``srv.url`` as the PostHog host::

    with CaptureServer() as srv:
        srv.enqueue_reply(Reply(status=503, retry_after=1))
        ...  # run the code under test with POSTHOG_HOST=srv.url
        events = srv.wait_for_events(3)

It uses only the standard library and serves each connection on its own daemon thread, with
HTTP/1.1 keep-alive, so clients can reuse connections.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

__all__ = ["CAPTURE_PATHS", "CaptureServer", "Event", "ReceivedRequest", "Reply"]

Event = dict[str, Any]
"""One analytics event as the client sent it (keys such as event, distinct_id, properties, uuid)."""

CAPTURE_PATHS: Final[frozenset[str]] = frozenset(
    variant
    for path in ("/batch/", "/capture/", "/e/", "/i/v0/e/")
    for variant in (path, path.rstrip("/"))
)
"""Request paths answered as capture endpoints (with and without the trailing slash)."""

_GZIP_QUERY_VALUES: Final = frozenset({"gzip", "gzip-js"})
_NO_BODY_STATUSES: Final = frozenset({HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED})
_MAX_CHUNK_LINE: Final = 65_536


@dataclass(frozen=True, slots=True)
class Reply:
    """How the server answers a capture request.

    Args:
        status: HTTP status to answer with (200-599). Only a request answered 200 has its
            events accepted.
        body: JSON object to send as the response body. A ``str`` or ``bytes`` is sent as is,
            as ``text/plain`` (for example an HTML error page from a proxy). ``None`` sends the
            default body: ``{"status": 1}`` for 200 and
            ``{"type": "validation_error", "code": ..., "detail": ...}`` for errors.
        retry_after: Value of a ``Retry-After`` header (seconds, or an HTTP date string);
            ``None`` sends no header.
        delay: Seconds to wait, after reading the request, before answering (to provoke client
            timeouts). Stopping the server cuts the wait short.
        times: How many consecutive requests a queued reply answers.
    """

    status: int = 200
    body: dict[str, Any] | str | bytes | None = None
    retry_after: str | float | None = None
    delay: float = 0.0
    times: int = 1

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"status must be between 200 and 599, got {self.status}")
        if self.delay < 0:
            raise ValueError(f"delay must not be negative, got {self.delay}")
        if self.times < 1:
            raise ValueError(f"times must be at least 1, got {self.times}")


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request the server received, and what it answered.

    Attributes:
        path: Request path without the query string, e.g. ``"/batch/"``.
        headers: Request headers, with lower-cased names (``headers["content-encoding"]``).
        status: HTTP status the server answered with.
        api_key: The body's ``api_key`` (``None`` when absent or the body did not parse).
        events: Events in the body, in order; empty when the body did not parse, or when
            ``record_events`` was off at the time.
        raw_size: Size of the body on the wire, in bytes (compressed size for gzip bodies).
        gzip: Whether the body was gzip-compressed.
        received_at: ``time.monotonic()`` when the request arrived.
        event_count: Number of events in the body (also counted when they are not stored).
        detail: Why the request was refused, for error answers; ``None`` for 200.
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

    @property
    def accepted(self) -> bool:
        """Whether the request was answered 200, so its events count as delivered."""
        return self.status == HTTPStatus.OK


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
    """The decoded request body: its events, or why it could not be decoded."""

    is_gzip: bool
    body_size: int | None = None
    api_key: str | None = None
    events: list[Event] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Verdict:
    status: int
    code: str
    detail: str | None


class CaptureServer:
    """A local HTTP server that speaks PostHog's event capture API, for tests.

    Use it as a context manager, or call `start` and `stop`. While running, ``url`` is the host
    to configure the PostHog client with. It answers ``POST`` on the paths in `CAPTURE_PATHS`;
    other paths get 404 and other methods 405 (both recorded in ``requests``).

    Each capture request is answered by the first of:

    1. the next queued reply (`enqueue_reply`), else ``default_reply``; a reply whose status is
       not 200 is sent as is;
    2. 400 when the body is not gzip/JSON the server understands;
    3. 413 when the decompressed body is larger than ``max_body_bytes``;
    4. 401 when ``require_api_key`` is set and the body's ``api_key`` differs;
    5. 413 when one event's JSON (``json.dumps(event)``) is larger than ``max_event_bytes``;
    6. the status of the first `reject_events` rule matching any event (the whole request is
       refused; 500 if a predicate raises);
    7. 200, and the request's events are accepted.

    The chosen reply's ``retry_after`` and ``delay`` apply whatever the final status. Every
    request is recorded in ``requests``; only the events of requests answered 200 reach
    ``events``. All recorded state is guarded by one lock, so tests may read it while clients
    are still sending.

    Attributes:
        default_reply: Answers capture requests when the reply queue is empty.
        require_api_key: When set, bodies whose ``api_key`` differs are answered 401.
        max_body_bytes: When set, larger decompressed bodies are answered 413.
        max_event_bytes: When set, bodies with a larger event are answered 413.
        record_events: When false, accepted events are only counted (``accepted_count``), not
            stored, and recorded requests carry no events; for benchmarks.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Prepare a server for ``host``:``port``; ``port=0`` picks a free port on `start`."""
        self._host = host
        self._port = port
        self.default_reply: Reply = Reply()
        self.require_api_key: str | None = None
        self.max_body_bytes: int | None = None
        self.max_event_bytes: int | None = None
        self.record_events: bool = True
        self._cond = threading.Condition(threading.Lock())
        self._requests: list[ReceivedRequest] = []
        self._events: list[Event] = []
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
        detail: str = "event rejected by the capture server",
    ) -> None:
        """Refuse, with ``status``, every request carrying an event for which ``predicate`` is true.

        The whole request is refused (as PostHog's ``/batch/`` does when one event is
        malformed) and none of its events is accepted. Rules are checked in the order they were
        added; they stay until `clear_rules`.
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

        Rules and limits (`reject_events`, ``require_api_key``, ``max_*_bytes``) are kept.
        """
        with self._cond:
            self._requests.clear()
            self._events.clear()
            self._accepted_count = 0
            self._replies.clear()
            self.default_reply = Reply()

    # -- recordings ----------------------------------------------------------------------------

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request received, in arrival order, whatever it was answered (a copy)."""
        with self._cond:
            return list(self._requests)

    @property
    def events(self) -> list[Event]:
        """Events of requests answered 200, in arrival order (a copy of the list)."""
        with self._cond:
            return list(self._events)

    @property
    def accepted_count(self) -> int:
        """Number of events accepted (answered 200), counted even when not recorded."""
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

    def _next_reply(self) -> Reply:
        with self._cond:
            if not self._replies:
                return self.default_reply
            entry = self._replies[0]
            entry.remaining -= 1
            if entry.remaining <= 0:
                self._replies.popleft()
            return entry.reply

    def _handle_capture(self, handler: _Handler, path: str, query: str) -> None:
        received_at = time.monotonic()
        headers = {name.lower(): value for name, value in handler.headers.items()}
        raw = handler.read_body()
        if raw is None:
            handler.close_connection = True
            detail = "the body's Content-Length or chunked framing is unreadable"
            request = ReceivedRequest(
                path, headers, 400, None, [], 0, False, received_at, detail=detail
            )
            self._record(request)
            body = _json_bytes(_error_body(400, "invalid_payload", detail))
            handler.respond(400, body, "application/json", None)
            return
        parsed = _parse_body(raw, headers, query)
        reply = self._next_reply()
        verdict = self._judge(reply, parsed)
        events = parsed.events if parsed.events is not None else []
        request = ReceivedRequest(
            path=path,
            headers=headers,
            status=verdict.status,
            api_key=parsed.api_key,
            events=events if self.record_events else [],
            raw_size=len(raw),
            gzip=parsed.is_gzip,
            received_at=received_at,
            event_count=len(events),
            detail=verdict.detail,
        )
        body, content_type = _response_body(reply, verdict)
        if reply.delay > 0:
            self._stopping.wait(reply.delay)
        self._record(request)
        handler.respond(verdict.status, body, content_type, _retry_after(reply.retry_after))

    def _judge(self, reply: Reply, parsed: _Parsed) -> _Verdict:
        if reply.status != HTTPStatus.OK:
            phrase = _phrase(reply.status)
            return _Verdict(reply.status, _code(reply.status), f"{phrase} (scripted reply)")
        if parsed.error is not None and parsed.body_size is None:
            return _Verdict(400, "invalid_payload", parsed.error)
        if self.max_body_bytes is not None and (parsed.body_size or 0) > self.max_body_bytes:
            return _Verdict(
                413,
                "payload_too_large",
                f"body of {parsed.body_size} bytes exceeds the limit of "
                f"{self.max_body_bytes} bytes",
            )
        if parsed.error is not None or parsed.events is None:
            return _Verdict(400, "invalid_payload", parsed.error or "no events")
        events = parsed.events
        if self.require_api_key is not None and parsed.api_key != self.require_api_key:
            return _Verdict(
                401,
                "invalid_api_key",
                "Project API key invalid. You can find your project API key in PostHog "
                "project settings.",
            )
        if self.max_event_bytes is not None:
            limit = self.max_event_bytes
            for index, event in enumerate(events):
                size = len(json.dumps(event).encode())
                if size > limit:
                    return _Verdict(
                        413,
                        "event_too_large",
                        f"event {index} is {size} bytes, over the limit of {limit} bytes",
                    )
        with self._cond:
            rules = list(self._rules)
        for rule in rules:
            try:
                matched = any(rule.predicate(event) for event in events)
            except Exception as exc:
                detail = f"a reject_events predicate raised {exc!r}"
                return _Verdict(500, "internal_error", detail)
            if matched:
                return _Verdict(rule.status, "rejected_event", rule.detail)
        return _Verdict(200, "ok", None)

    def _record(self, request: ReceivedRequest) -> None:
        with self._cond:
            self._requests.append(request)
            if request.status == HTTPStatus.OK:
                self._accepted_count += request.event_count
                self._events.extend(request.events)
            self._cond.notify_all()

    def _handle_other(self, handler: _Handler, status: int, detail: str) -> None:
        """Answer a request that is not a capture request, recording it."""
        received_at = time.monotonic()
        headers = {name.lower(): value for name, value in handler.headers.items()}
        raw = handler.read_body()
        if raw is None:
            handler.close_connection = True
        request = ReceivedRequest(
            path=urlsplit(handler.path).path,
            headers=headers,
            status=status,
            api_key=None,
            events=[],
            raw_size=len(raw or b""),
            gzip=False,
            received_at=received_at,
            detail=detail,
        )
        self._record(request)
        body = _json_bytes(_error_body(status, _code(status), detail))
        extra = {"Allow": "POST"} if status == HTTPStatus.METHOD_NOT_ALLOWED else {}
        handler.respond(status, body, "application/json", None, extra)


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
    """Routes requests to the owning `CaptureServer`."""

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

    def do_POST(self) -> None:
        split = urlsplit(self.path)
        capture = self.server.capture
        if split.path in CAPTURE_PATHS:
            capture._handle_capture(self, split.path, split.query)
        else:
            capture._handle_other(
                self, HTTPStatus.NOT_FOUND, f"no capture endpoint at {split.path}"
            )

    def _not_allowed(self) -> None:
        self.server.capture._handle_other(
            self, HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} is not allowed"
        )

    do_GET = do_PUT = do_PATCH = do_DELETE = _not_allowed

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

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: str,
        retry_after: str | None,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        """Send one complete response, always with a Content-Length."""
        if status in _NO_BODY_STATUSES:
            body = b""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            for name, value in (extra_headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if body:
                self.wfile.write(body)
        except OSError:
            self.close_connection = True


def _parse_body(raw: bytes, headers: dict[str, str], query: str) -> _Parsed:
    """Decompress and parse a capture body, once."""
    is_gzip = "gzip" in headers.get("content-encoding", "").lower()
    if not is_gzip and query:
        values = parse_qs(query).get("compression", [])
        is_gzip = any(value.lower() in _GZIP_QUERY_VALUES for value in values)
    data = raw
    if is_gzip:
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            return _Parsed(is_gzip, error=f"could not decompress the gzip body: {exc}")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        return _Parsed(is_gzip, len(data), error=f"the body is not valid JSON: {exc}")

    api_key: object = None
    if isinstance(document, dict):
        api_key = document.get("api_key")
        if "batch" in document:
            events = document["batch"]
            if not isinstance(events, list):
                return _Parsed(
                    is_gzip,
                    len(data),
                    _str_or_none(api_key),
                    error="'batch' must be a JSON array of events",
                )
        elif "event" in document:
            events = [{k: v for k, v in document.items() if k != "api_key"}]
        else:
            return _Parsed(
                is_gzip,
                len(data),
                _str_or_none(api_key),
                error="the body has neither a 'batch' nor an 'event' key",
            )
    elif isinstance(document, list):
        events = document
        if events and isinstance(events[0], dict):
            first = events[0]
            properties = first.get("properties")
            api_key = first.get("api_key") or first.get("token")
            if api_key is None and isinstance(properties, dict):
                api_key = properties.get("token")
    else:
        return _Parsed(is_gzip, len(data), error="the body must be a JSON object or array")

    if not all(isinstance(event, dict) for event in events):
        return _Parsed(
            is_gzip, len(data), _str_or_none(api_key), error="every event must be a JSON object"
        )
    return _Parsed(is_gzip, len(data), _str_or_none(api_key), events)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _code(status: int) -> str:
    return _phrase(status).lower().replace(" ", "_").replace("-", "_")


def _error_body(status: int, code: str, detail: str | None) -> dict[str, Any]:
    return {"type": "validation_error", "code": code, "detail": detail or _phrase(status)}


def _json_bytes(document: object) -> bytes:
    return json.dumps(document).encode()


def _response_body(reply: Reply, verdict: _Verdict) -> tuple[bytes, str]:
    """The body and content type answering a request judged ``verdict`` under ``reply``."""
    if reply.status == verdict.status and reply.body is not None:
        if isinstance(reply.body, bytes):
            return reply.body, "text/plain; charset=utf-8"
        if isinstance(reply.body, str):
            return reply.body.encode(), "text/plain; charset=utf-8"
        return _json_bytes(reply.body), "application/json"
    if verdict.status == HTTPStatus.OK:
        return b'{"status": 1}', "application/json"
    return _json_bytes(
        _error_body(verdict.status, verdict.code, verdict.detail)
    ), "application/json"


def _retry_after(value: str | float | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
