"""PostHog's capture v1 endpoint, ``POST /i/v1/analytics/events``, for `CaptureServer`.

Every `CaptureServer` serves it, so posthog-python (``capture_mode="v1"``), posthog-node
(``POSTHOG_CAPTURE_MODE=v1``) and the worker's ``v1`` transport can be pointed at
``srv.url``. It answers as PostHog's capture service does; the rules are read from
PostHog's ``rust/capture/src/v1/``:

- ``context.rs``, ``constants.rs``: the key comes as ``Authorization: Bearer <key>``
  (scheme in any case, key trimmed; no header: 401; another scheme: 400; a key of the
  wrong shape, ``token.rs``: 401 ``invalid_api_token``). ``PostHog-Sdk-Info``,
  ``PostHog-Attempt`` (an integer of 1 or more), ``PostHog-Request-Id`` (a UUID),
  ``PostHog-Request-Timestamp`` (RFC 3339), ``Content-Type: application/json`` and
  ``User-Agent`` are required (400 ``missing_required_headers`` /
  ``invalid_header_value``; another content type: 415). ``Content-Encoding`` may be
  gzip, deflate (zlib or raw), br or zstd (others: 415 ``unsupported_encoding``); zstd
  needs the ``zstandard`` package here and br the ``brotli`` package (without them:
  415, saying which package is missing).
- ``util.rs``, ``handler.rs``, ``analytics/types.rs``: an empty body is 400
  ``empty_body``, a body that does not decompress 400 ``request_decoding_error``, one
  that is not ``{"created_at": str, "batch": [event, ...]}`` with each event's
  ``event``, ``uuid``, ``distinct_id`` and ``timestamp`` strings 400
  ``request_parsing_error``.
- ``analytics/process.rs``: no events is 400 ``empty_batch``; ``created_at`` not RFC 3339
  is 400 ``invalid_batch``; a missing or malformed ``uuid``, or one uuid twice in the
  request, refuses the whole request (400 ``missing_event_uuid``, ``invalid_event_uuid``,
  ``duplicate_event_uuid``). Any other bad event is dropped alone, with the reason in
  its result: ``dropped_performance_event``, ``missing_event_name``,
  ``event_name_too_long`` (over 200), ``missing_distinct_id``, ``distinct_id_too_large``
  (over 200), ``invalid_event_timestamp``, ``malformed_event_properties``,
  ``invalid_options``. A placeholder distinct_id (``anonymous``, ``null``, ...) is kept:
  ``ok`` with the details ``person_processing_disabled``.
- ``analytics/response.rs``: 200 with ``{"results": {uuid: {"result": "ok" | "warning" |
  "drop" | "retry", "details": ...}}}``, and ``Retry-After: 1`` when an event is to be
  retried.
- ``error.rs``, ``quota_limiter_shim.rs``: errors are ``{"error": tag,
  "error_description": ..., "error_uri": ...}``; a project over its billing limit is
  refused as a whole with ``billing_limit_exceeded``: 402 in PostHog's current code, 429
  with ``Retry-After: 1`` before (`CaptureV1.billing_limit` picks which).

What a test scripts (through ``srv.v1``, a `CaptureV1`):

- `CaptureV1.verdict`: events for which a predicate holds get a result (``drop`` with a
  reason, ``retry``, ``warning``), for a number of events or for good;
- `CaptureV1.billing_limit`: answer every request ``billing_limit_exceeded``;
- the server's reply queue (``srv.enqueue_reply``) answers v1 requests too: a queued
  reply whose status is not 200 is sent as is, with a v1 error body unless the reply has
  a body of its own, and with the reply's ``retry_after`` and ``delay``;
- ``srv.require_api_key`` and ``srv.max_body_bytes`` apply as on ``/batch/``.

What it records: every request in ``srv.requests`` (``events`` as sent, in v1 form);
the events PostHog would keep (``ok`` and ``warning``) in ``srv.events`` / ``srv.uuids()``
like those of ``/batch/``, in the form PostHog ingests them: ``event``, ``distinct_id``,
``uuid``, ``timestamp`` and ``properties`` with what the server writes into them
(``$session_id``, ``$window_id``, ``$ignore_sent_at`` from ``disable_skew_correction``,
the other options, ``$lib``/``$lib_version`` from ``PostHog-Sdk-Info``). Each answer, with
its per-event results, is in `CaptureV1.answers`.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import threading
import uuid as uuid_module
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

from .posthog_errors import key_problem

if TYPE_CHECKING:
    from .capture_server import CaptureServer, Event, Exchange, Reply, Route

__all__ = [
    "BILLING_LIMIT_DESCRIPTION",
    "ILLEGAL_DISTINCT_IDS",
    "RESULTS",
    "V1_PATH",
    "V1_PATHS",
    "V1_ROUTES",
    "CaptureV1",
    "EventVerdict",
    "V1Answer",
    "serve_v1",
]

V1_PATH: Final = "/i/v1/analytics/events"
V1_PATHS: Final[frozenset[str]] = frozenset({V1_PATH, V1_PATH + "/"})
"""The paths answered as capture v1 (PostHog registers both forms)."""

_JSON: Final = "application/json"

RESULTS: Final = ("ok", "warning", "drop", "retry")
"""The per-event results of a 200 answer (``EventResult`` in ``analytics/types.rs``)."""

REQUIRED_HEADERS: Final = (
    "PostHog-Sdk-Info",
    "PostHog-Attempt",
    "PostHog-Request-Id",
    "PostHog-Request-Timestamp",
    "content-type",
    "user-agent",
)
"""Headers every request needs besides ``Authorization`` (``REQUIRED_HEADERS``)."""

SUPPORTED_ENCODINGS: Final = ("gzip", "deflate", "br", "zstd")
MAX_EVENT_NAME_LENGTH: Final = 200
MAX_DISTINCT_ID_SIZE: Final = 200
MAX_SDK_INFO_LEN: Final = 200
ILLEGAL_DISTINCT_IDS: Final = frozenset(
    {
        "0",
        "00000000-0000-0000-0000-000000000000",
        "[object object]",
        "anonymous",
        "anonymous-user",
        "backend",
        "distinct_id",
        "distinctid",
        "email",
        "false",
        "guest",
        "id",
        "nan",
        "none",
        "not_authenticated",
        "null",
        "system",
        "true",
        "undefined",
        "user",
    }
)
"""distinct_ids PostHog keeps with person processing off (compared trimmed, any case)."""

ERROR_URI: Final = "https://posthog.com/docs/api"
BILLING_ERROR_URI: Final = "https://posthog.com/docs/billing/limits"
BILLING_LIMIT_DESCRIPTION: Final = (
    "Billing quota exceeded. Events are being dropped. Upgrade your plan to resume ingestion."
)
INVALID_TOKEN_DESCRIPTION: Final = "The provided API token is not valid."  # noqa: S105
PARSING_DESCRIPTION: Final = "Failed to parse request body."
DECODING_DESCRIPTION: Final = "Failed to decode request body."
RATE_LIMITED_DESCRIPTION: Final = "Rate limit exceeded."

#: Default ``details`` of a scripted result, as PostHog words them.
_DEFAULT_DETAILS: Final[dict[str, str | None]] = {
    "ok": None,
    "warning": "person_processing_disabled",
    "drop": "rejected",
    "retry": "not_persisted",
}
_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z"
)
_BOOL_OPTIONS: Final = ("cookieless_mode", "disable_skew_correction", "process_person_profile")
#: Options and the property the server writes each into (``build_property_injections``).
_OPTION_PROPERTIES: Final = (
    ("cookieless_mode", "$cookieless_mode"),
    ("disable_skew_correction", "$ignore_sent_at"),
    ("product_tour_id", "$product_tour_id"),
    ("process_person_profile", "$process_person_profile"),
)


@dataclass(frozen=True, slots=True)
class EventVerdict:
    """One event's entry in a 200 answer."""

    result: str
    details: str | None = None

    def to_json(self) -> dict[str, str]:
        """As PostHog serializes it: ``details`` only when there is one."""
        entry = {"result": self.result}
        if self.details is not None:
            entry["details"] = self.details
        return entry


@dataclass(frozen=True, slots=True)
class V1Answer:
    """How the endpoint answered one request.

    Attributes:
        status: The HTTP status sent.
        error: The error tag (``duplicate_event_uuid``, ...) for a non-200 answer.
        results: Each event's result by uuid, in request order (200 answers only).
        request_id: The ``PostHog-Request-Id`` header, as sent.
        attempt: The ``PostHog-Attempt`` header, as sent.
        received_at: ``time.monotonic()`` when the request arrived.
    """

    status: int
    error: str | None
    results: dict[str, EventVerdict]
    request_id: str | None
    attempt: str | None
    received_at: float

    def uuids(self, result: str) -> list[str]:
        """The uuids whose result was ``result``, in request order."""
        return [uid for uid, verdict in self.results.items() if verdict.result == result]


@dataclass(slots=True)
class _Rule:
    predicate: Callable[[Event], bool]
    verdict: EventVerdict
    remaining: int | None


class _Refusal(Exception):
    """A v1 error answer: status, tag, description."""

    def __init__(
        self,
        status: int,
        tag: str,
        description: str,
        retry_after: str | None = None,
        *,
        detail: str | None = None,
    ) -> None:
        super().__init__(f"{status} {tag}: {description}")
        self.status = status
        self.tag = tag
        #: ``error_description`` in the body, PostHog's words.
        self.description = description
        self.retry_after = retry_after
        #: What a test reads in ``ReceivedRequest.detail``: the description, or more.
        self.detail = detail or description

    def body(self) -> bytes:
        uri = BILLING_ERROR_URI if self.tag == "billing_limit_exceeded" else ERROR_URI
        document = {"error": self.tag, "error_description": self.description, "error_uri": uri}
        return json.dumps(document).encode()


@dataclass(slots=True)
class _Request:
    """What the handler learnt about one request so far."""

    headers: dict[str, str]
    raw: bytes
    api_key: str | None = None
    encoding: str | None = None
    sdk_info: str = ""
    events: list[Event] = field(default_factory=list)


class CaptureV1:
    """The v1 endpoint of one `CaptureServer` (``srv.v1``), and what tests script on it.

    Attributes:
        billing_limit: None (default): no limit. 402 or 429: the project is over its
            billing limit; every well-formed request is answered ``billing_limit_exceeded``
            with that status (402 is PostHog's current answer; 429, with ``Retry-After:
            1``, the earlier one), and no event is kept.
    """

    def __init__(self, server: CaptureServer) -> None:
        self._server = server
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._answers: list[V1Answer] = []
        self.billing_limit: int | None = None

    # -- scripting -----------------------------------------------------------------------------

    def verdict(
        self,
        predicate: Callable[[Event], bool],
        result: str,
        details: str | None = None,
        *,
        times: int | None = None,
    ) -> None:
        """Answer ``result`` for events (in v1 form) for which ``predicate`` is true.

        ``details`` defaults to PostHog's usual word for the result (``rejected`` for a
        drop, ``not_persisted`` for a retry, ``person_processing_disabled`` for a warning).
        ``times`` limits the rule to that many events (then a re-sent event is ``ok``);
        None keeps it for good. The first matching rule decides; events PostHog's own
        checks drop keep their reason. A predicate that raises makes the answer 500.
        """
        if result not in RESULTS:
            raise ValueError(f"result must be one of {RESULTS}, got {result!r}")
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        verdict = EventVerdict(result, details if details is not None else _DEFAULT_DETAILS[result])
        with self._lock:
            self._rules.append(_Rule(predicate, verdict, times))

    def clear_verdicts(self) -> None:
        """Forget every `verdict` rule."""
        with self._lock:
            self._rules.clear()

    @property
    def answers(self) -> list[V1Answer]:
        """Every v1 request's answer, in arrival order (a copy)."""
        with self._lock:
            return list(self._answers)

    def results_for(self, uuid: str) -> list[EventVerdict]:
        """The results one uuid got, request after request."""
        with self._lock:
            return [a.results[uuid] for a in self._answers if uuid in a.results]

    def reset(self) -> None:
        """Forget the answers (``srv.reset()`` calls it); rules and the billing limit stay,
        as the server's rules and limits do."""
        with self._lock:
            self._answers.clear()

    # -- handling (on the server's handler threads) --------------------------------------------

    def serve(self, exchange: Exchange) -> None:
        """Answer one request to a `V1_PATHS` path (the server's route for them)."""
        server = self._server
        if exchange.method != "POST":
            detail = f"method {exchange.method} is not allowed"
            server._answer_plain(exchange, HTTPStatus.METHOD_NOT_ALLOWED, detail, {"Allow": "POST"})
            return
        raw = exchange.read_body()
        if raw is None:
            refusal = _Refusal(
                400,
                "request_decoding_error",
                DECODING_DESCRIPTION,
                detail="the body's Content-Length or chunked framing is unreadable",
            )
            self._finish(exchange, _Request(exchange.headers, b""), refusal, None)
            return
        request = _Request(exchange.headers, raw)
        reply = server._next_reply()
        if reply.is_redirect:
            self._redirect(exchange, request, reply)
            return
        if not reply.is_success:
            self._finish(exchange, request, _scripted(reply.status), None, reply)
            return
        try:
            self._read(request)
            results = self._judge(request)
        except _Refusal as refusal:
            self._finish(exchange, request, refusal, None, reply)
            return
        self._finish(exchange, request, None, results, reply)

    def _read(self, request: _Request) -> None:
        """Check the headers and decode the body into ``request.events``."""
        server = self._server
        headers = request.headers
        authorization = headers.get("authorization")
        if authorization is None:
            raise _Refusal(
                401, "missing_authorization", "request is missing an Authorization header"
            )
        missing = [name for name in REQUIRED_HEADERS if name.lower() not in headers]
        if missing:
            raise _Refusal(
                400,
                "missing_required_headers",
                f"request is missing required headers: {json.dumps(missing)}",
            )
        if len(authorization) <= 7 or authorization[:7].lower() != "bearer ":
            raise _invalid_header("Authorization must use Bearer scheme")
        token = authorization[7:].strip()
        request.api_key = token
        if key_problem(token) is not None:
            raise _Refusal(401, "invalid_api_token", INVALID_TOKEN_DESCRIPTION)
        content_type = headers["content-type"]
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            raise _Refusal(
                415, "unsupported_content_type", f"unsupported content type: {content_type}"
            )
        encoding = headers.get("content-encoding")
        if encoding is not None:
            if encoding.lower() not in SUPPORTED_ENCODINGS:
                raise _Refusal(
                    415, "unsupported_encoding", f"unsupported content encoding: {encoding}"
                )
            request.encoding = encoding.lower()
        try:
            uuid_module.UUID(headers["posthog-request-id"])
        except ValueError:
            raise _invalid_header(
                f"PostHog-Request-Id is not a valid UUID: {headers['posthog-request-id']}"
            ) from None
        attempt = headers["posthog-attempt"]
        if not (attempt.isascii() and attempt.isdigit() and int(attempt) >= 1):
            raise _invalid_header(f"PostHog-Attempt must be a positive integer: {attempt}")
        stamp = headers["posthog-request-timestamp"]
        if _rfc3339(stamp) is None:
            raise _invalid_header(f"PostHog-Request-Timestamp is not valid RFC 3339: {stamp}")
        request.sdk_info = headers["posthog-sdk-info"]
        if server.require_api_key is not None and token != server.require_api_key.strip():
            raise _Refusal(401, "invalid_api_token", INVALID_TOKEN_DESCRIPTION)

        if not request.raw:
            raise _Refusal(400, "empty_body", "request body is empty")
        data = _decompress(request.encoding, request.raw)
        limit = server.max_body_bytes
        if limit is not None and len(data) > limit:
            raise _Refusal(
                413, "payload_too_large", f"payload too large: body exceeds limit of {limit} bytes"
            )
        request.events = _parse_batch(data)

    def _judge(self, request: _Request) -> dict[str, EventVerdict]:
        """Each event's result, or a refusal of the whole request."""
        events = request.events
        if not events:
            raise _Refusal(400, "empty_batch", "request batch is empty")
        seen: set[uuid_module.UUID] = set()
        for event in events:
            raw_uuid = event["uuid"].strip()
            if not raw_uuid:
                raise _Refusal(400, "missing_event_uuid", "event submitted without a uuid")
            try:
                parsed = uuid_module.UUID(raw_uuid)
            except ValueError:
                raise _Refusal(
                    400, "invalid_event_uuid", f"event submitted with an invalid uuid: {raw_uuid}"
                ) from None
            if parsed in seen:
                raise _Refusal(400, "duplicate_event_uuid", f"duplicate event uuid: {raw_uuid}")
            seen.add(parsed)
            event["uuid"] = raw_uuid

        results: dict[str, EventVerdict] = {}
        for event in events:
            results[str(uuid_module.UUID(event["uuid"]))] = _check_event(event)
        if self.billing_limit is not None and any(v.result == "ok" for v in results.values()):
            retry_after = "1" if self.billing_limit == HTTPStatus.TOO_MANY_REQUESTS else None
            raise _Refusal(
                self.billing_limit, "billing_limit_exceeded", BILLING_LIMIT_DESCRIPTION, retry_after
            )
        with self._lock:
            rules = list(self._rules)
        for event in events:
            key = str(uuid_module.UUID(event["uuid"]))
            if results[key].result not in ("ok", "warning"):
                continue
            for rule in rules:
                try:
                    matched = bool(rule.predicate(event))
                except Exception as exc:
                    raise _Refusal(
                        500, "internal_error", f"a verdict predicate raised {exc!r}"
                    ) from exc
                if not matched:
                    continue
                with self._lock:
                    if rule.remaining is not None:
                        if rule.remaining <= 0:
                            continue
                        rule.remaining -= 1
                results[key] = rule.verdict
                break
        return results

    def _finish(
        self,
        exchange: Exchange,
        request: _Request,
        refusal: _Refusal | None,
        results: dict[str, EventVerdict] | None,
        reply: Reply | None = None,
    ) -> None:
        """Record the request and send the answer."""
        from .capture_server import ReceivedRequest, _retry_after

        server = self._server
        kept: list[Event] = []
        if refusal is not None:
            status = refusal.status
            body, content_type = refusal.body(), _JSON
            retry_after = refusal.retry_after
            if reply is not None and reply.accept_first:  # stored in part, then failed
                with contextlib.suppress(_Refusal):
                    self._read(request)
                kept = [
                    _ingested(e, request.sdk_info) for e in request.events[: reply.accept_first]
                ]
        else:
            assert results is not None
            status = reply.status if reply is not None else HTTPStatus.OK
            body = json.dumps({"results": {k: v.to_json() for k, v in results.items()}}).encode()
            content_type = _JSON
            retry_after = "1" if any(v.result == "retry" for v in results.values()) else None
            by_uuid = {str(uuid_module.UUID(e["uuid"])): e for e in request.events}
            kept = [
                _ingested(by_uuid[uid], request.sdk_info)
                for uid, verdict in results.items()
                if verdict.result in ("ok", "warning")
            ]
        if reply is not None:
            if reply.body is not None and reply.status == status:
                body, content_type = server._scripted_answer(reply)
            scripted = _retry_after(reply.retry_after)
            if scripted is not None:
                retry_after = scripted
            if reply.delay > 0:
                server._stopping.wait(reply.delay)
        answer = V1Answer(
            status=status,
            error=refusal.tag if refusal is not None else None,
            results=results or {},
            request_id=request.headers.get("posthog-request-id"),
            attempt=request.headers.get("posthog-attempt"),
            received_at=exchange.received_at,
        )
        received = ReceivedRequest(
            path=exchange.path,
            headers=request.headers,
            status=status,
            api_key=request.api_key,
            events=request.events if server.record_events else [],
            raw_size=len(request.raw),
            gzip=request.encoding == "gzip",
            received_at=exchange.received_at,
            event_count=len(request.events),
            detail=refusal.detail if refusal is not None else None,
            method=exchange.method,
            delivered=len(kept),
            dropped=bool(kept) and server._is_dropped(request.api_key),
        )
        with self._lock:
            self._answers.append(answer)
        server._record(received, kept)
        exchange.respond(
            status, body, content_type, {"Retry-After": retry_after} if retry_after else None
        )

    def _redirect(self, exchange: Exchange, request: _Request, reply: Reply) -> None:
        """Answer with a scripted redirect, as the server does on its own paths."""
        from .capture_server import ReceivedRequest

        assert reply.location is not None
        received = ReceivedRequest(
            path=exchange.path,
            headers=request.headers,
            status=reply.status,
            api_key=None,
            events=[],
            raw_size=len(request.raw),
            gzip=False,
            received_at=exchange.received_at,
            method=exchange.method,
            location=reply.location,
        )
        self._server._answer_redirect(exchange, reply.location, reply.status, received, reply)


def serve_v1(server: CaptureServer, exchange: Exchange) -> None:
    """The `Route` of `V1_PATHS`: ``srv.v1`` answers."""
    server.v1.serve(exchange)


V1_ROUTES: Final[dict[str, Route]] = dict.fromkeys(sorted(V1_PATHS), serve_v1)
"""The routes the server takes from this module (its ROUTING POINT, ``_extra_routes``)."""


def _scripted(status: int) -> _Refusal:
    """The v1 error answer for a queued reply's status."""
    tags = {
        400: ("invalid_batch", "invalid batch: scripted reply"),
        401: ("invalid_api_token", INVALID_TOKEN_DESCRIPTION),
        402: ("billing_limit_exceeded", BILLING_LIMIT_DESCRIPTION),
        408: ("request_timeout", "request timed out"),
        413: ("payload_too_large", "payload too large: scripted reply"),
        415: ("unsupported_encoding", "unsupported content encoding: scripted reply"),
        429: ("rate_limited", RATE_LIMITED_DESCRIPTION),
        500: ("internal_error", "Internal Server Error"),
        503: ("service_unavailable", "Service Unavailable"),
        504: ("gateway_timeout", "Gateway Timeout"),
    }
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = f"HTTP {status}"
    tag, description = tags.get(status, (phrase.lower().replace(" ", "_"), phrase))
    return _Refusal(status, tag, description)


def _invalid_header(message: str) -> _Refusal:
    return _Refusal(400, "invalid_header_value", f"invalid header value: {message}")


def _rfc3339(value: str) -> datetime | None:
    """The instant, if ``value`` is RFC 3339 with a zone (as chrono parses it)."""
    if not _RFC3339.match(value):
        return None
    try:
        return datetime.fromisoformat(value.replace("t", "T").replace("z", "Z"))
    except ValueError:
        return None


def _decompress(encoding: str | None, raw: bytes) -> bytes:
    try:
        if encoding is None:
            return raw
        if encoding == "gzip":
            return gzip.decompress(raw)
        if encoding == "deflate":  # zlib-wrapped when it starts 0x78, else raw deflate
            return zlib.decompress(raw, zlib.MAX_WBITS if raw[:1] == b"\x78" else -zlib.MAX_WBITS)
        if encoding == "zstd":
            return _zstd(raw)
        return _brotli(raw)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise _Refusal(
            400,
            "request_decoding_error",
            DECODING_DESCRIPTION,
            detail=f"{encoding} decompression failed: {exc}",
        ) from exc


def _zstd(raw: bytes) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise _Refusal(
            415,
            "unsupported_encoding",
            "unsupported content encoding: zstd (this test server needs the zstandard package)",
        ) from None
    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    except zstandard.ZstdError as exc:
        raise ValueError(str(exc)) from exc


def _brotli(raw: bytes) -> bytes:
    try:
        import brotli  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise _Refusal(
            415,
            "unsupported_encoding",
            "unsupported content encoding: br (this test server needs the brotli package)",
        ) from None
    try:
        return bytes(brotli.decompress(raw))
    except brotli.error as exc:
        raise ValueError(str(exc)) from exc


def _parse_batch(data: bytes) -> list[Event]:
    """The events of a v1 body, checked as serde reads ``Batch`` (types.rs)."""

    def refuse(why: str) -> _Refusal:
        return _Refusal(400, "request_parsing_error", PARSING_DESCRIPTION, detail=why)

    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise refuse(f"not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise refuse("the body must be a JSON object")
    if not isinstance(document.get("created_at"), str):
        raise refuse("missing field `created_at` (a string)")
    for flag in ("historical_migration", "capture_internal"):
        if document.get(flag) is not None and not isinstance(document[flag], bool):
            raise refuse(f"`{flag}` must be a boolean")
    events = document.get("batch")
    if not isinstance(events, list):
        raise refuse("missing field `batch` (an array)")
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            raise refuse(f"event {index} is not an object")
        for name in ("event", "uuid", "distinct_id", "timestamp"):
            if not isinstance(event.get(name), str):
                raise refuse(f"event {index}: missing field `{name}` (a string)")
        for name in ("session_id", "window_id"):
            if event.get(name) is not None and not isinstance(event[name], str):
                raise refuse(f"event {index}: `{name}` must be a string")
    if _rfc3339(document["created_at"]) is None and events:
        raise _Refusal(
            400,
            "invalid_batch",
            f"invalid batch: created_at is not valid RFC 3339: {document['created_at']}",
        )
    return events


def _check_event(event: Event) -> EventVerdict:
    """PostHog's per-event checks (``validate_event``, options, distinct_id)."""
    name = event["event"]
    distinct_id = event["distinct_id"].strip()
    if name == "$performance_event":
        return EventVerdict("drop", "dropped_performance_event")
    if not name:
        return EventVerdict("drop", "missing_event_name")
    if len(name.encode()) > MAX_EVENT_NAME_LENGTH:
        return EventVerdict("drop", "event_name_too_long")
    if not distinct_id:
        return EventVerdict("drop", "missing_distinct_id")
    if len(distinct_id.encode()) > MAX_DISTINCT_ID_SIZE:
        return EventVerdict("drop", "distinct_id_too_large")
    if _rfc3339(event["timestamp"]) is None:
        return EventVerdict("drop", "invalid_event_timestamp")
    if not isinstance(event.get("properties", {}), dict):
        return EventVerdict("drop", "malformed_event_properties")
    if _options(event.get("options")) is None:
        return EventVerdict("drop", "invalid_options")
    if distinct_id.lower() in ILLEGAL_DISTINCT_IDS:  # kept, but no person is made for it
        return EventVerdict("ok", "person_processing_disabled")
    return EventVerdict("ok")


def _options(raw: object) -> dict[str, Any] | None:
    """The typed options (``RawOptions::validate``), or None when one is unreadable."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        return None
    options: dict[str, Any] = {}
    for name in _BOOL_OPTIONS:
        value = raw.get(name)
        if value is None:
            continue
        coerced = _coerce_bool(value)
        if coerced is None:
            return None
        options[name] = coerced
    tour = raw.get("product_tour_id")
    if tour is not None:
        if isinstance(tour, str):
            options["product_tour_id"] = tour
        elif isinstance(tour, int) and not isinstance(tour, bool):
            options["product_tour_id"] = str(tour)
        else:
            return None
    return options


def _coerce_bool(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
    return None


def _canonical(uid: str) -> str:
    """A uuid as PostHog writes it (lower case, hyphens); as sent when it does not parse."""
    try:
        return str(uuid_module.UUID(uid.strip()))
    except (ValueError, AttributeError):
        return uid


def _ingested(event: Mapping[str, Any], sdk_info: str) -> Event:
    """An accepted event as PostHog stores it: the server's additions in its properties."""
    properties = dict(event.get("properties") or {})
    for field_name, key in (("session_id", "$session_id"), ("window_id", "$window_id")):
        if event.get(field_name) is not None:
            properties[key] = event[field_name]
    options = _options(event.get("options")) or {}
    for option, key in _OPTION_PROPERTIES:
        if option in options:
            properties[key] = options[option]
    lib, slash, version = sdk_info.rpartition("/")
    if slash and len(sdk_info) <= MAX_SDK_INFO_LEN and lib.strip() and version.strip():
        properties["$lib"] = lib.strip()
        properties["$lib_version"] = version.strip()
    return {
        "event": event["event"],
        "distinct_id": event["distinct_id"].strip(),
        "properties": properties,
        "uuid": _canonical(event["uuid"]),
        "timestamp": event["timestamp"],
    }
