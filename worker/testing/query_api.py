"""PostHog's query API, ``POST /api/projects/<id>/query/``, for `CaptureServer`.

Every `CaptureServer` serves it (``srv.query``, a `QueryApi`), so ``outbox-worker
reconcile`` can be pointed at ``srv.url`` (``OUTBOX_POSTHOG_APP_HOST``) and compare
the ledger with what the server accepted. It answers from ``srv.events``, as PostHog
counts what it ingested:

- per event name and UTC day of the event's ``timestamp`` (an event without one, or
  with one that does not parse, is counted on the day the query is answered: PostHog
  stamps such an event with the time it ingested it, which the server does not keep);
- once per ``uuid``: a re-sent copy of an event is counted once, as PostHog's events
  table ends up once it has merged copies of a uuid (``ReplacingMergeTree``). Before
  that merge PostHog counts each copy: ``srv.query.merged = False`` answers so;
- never the events of a key of no project: those are answered 200 and kept in
  ``srv.dropped`` (``srv.project_keys``), as PostHog's capture accepts them and its
  ingestion drops them, so they are counted nowhere.

What it checks, as PostHog's API does (posthog/auth.py, posthog/api/routing.py):
``Authorization: Bearer <key>`` must carry ``personal_api_key`` (no header: 401
``not_authenticated``; another key: 401 ``authentication_failed``), the path's project
id must be ``project_id`` (404 ``not_found``), the method ``POST`` (405). Errors are
PostHog's JSON: ``{"type", "code", "detail", "attr"}``.

What it parses: a ``{"query": {"kind": "HogQLQuery", "query": ...}}`` body whose query
is reconcile's count, and nothing else (400 ``validation_error`` otherwise)::

    SELECT event, toDate(toTimeZone(timestamp, 'UTC')) AS day, count() AS total
    FROM events
    WHERE timestamp >= toDateTime('2026-11-25T00:00:00Z')
      AND timestamp < toDateTime('2026-12-03T00:00:00Z')
      [AND event IN ('a', 'b')]
    GROUP BY event, day [ORDER BY day, event] [LIMIT n]

(keywords in any case, string literals with HogQL's backslash escapes or doubled
quotes). Without a LIMIT it returns 100 rows at most, as PostHog's API does, with
``hasMore`` when there were more. The answer is ``{"columns": ["event", "day",
"total"], "types": ..., "results": [[event, "YYYY-MM-DD", count], ...], "hasMore":
false, ...}``. `parse_count_query` is the parser, for tests.

Scripting: `QueryApi.enqueue_reply` queues `Reply` objects answering the next query
requests as they say (a 429 with ``retry_after``, a 500, a ``delay``); a 2xx reply is
answered normally.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .capture_server import CaptureServer, Exchange, Reply, Route

__all__ = [
    "DEFAULT_PERSONAL_API_KEY",
    "DEFAULT_PROJECT_ID",
    "QUERY_PATH_PREFIX",
    "QUERY_ROUTES",
    "CountQuery",
    "QueryApi",
    "QuerySyntaxError",
    "parse_count_query",
    "serve_query",
]

QUERY_PATH_PREFIX: Final = "/api/projects/"
"""Paths under this are the query API's (``/api/projects/<id>/query/``, slash optional)."""

DEFAULT_PERSONAL_API_KEY: Final = "phx_capture_server_personal_api_key"
"""The personal API key `QueryApi` accepts unless told another."""

DEFAULT_PROJECT_ID: Final = 1
"""The project id `QueryApi` answers for unless told another."""

#: Rows PostHog's API returns for a query without a LIMIT (``DEFAULT_RETURNED_ROWS``).
DEFAULT_ROWS: Final = 100
#: Most rows it returns whatever the LIMIT (``MAX_SELECT_RETURNED_ROWS``).
MAX_ROWS: Final = 50_000
COLUMNS: Final = ["event", "day", "total"]
TYPES: Final = [["event", "String"], ["day", "Date"], ["total", "UInt64"]]

_JSON: Final = "application/json"
_PATH: Final = re.compile(r"/api/projects/([^/]+)/query/?")
_NOT_AUTHENTICATED: Final = "Authentication credentials were not provided."
_THROTTLED: Final = "Request was throttled."
_INVALID_KEY: Final = "Personal API key found in request Authorization header is invalid."
_ESCAPES: Final = {
    "b": "\b",
    "f": "\f",
    "r": "\r",
    "n": "\n",
    "t": "\t",
    "0": "\0",
    "a": "\a",
    "v": "\v",
}
_TOKEN: Final = re.compile(
    r"\s*(?:(?P<string>')|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<number>\d+)"
    r"|(?P<op>>=|<=|[(),<>=]))"
)
_KEYWORDS: Final = frozenset({"SELECT", "AS", "FROM", "WHERE", "AND", "IN", "GROUP", "BY", "ORDER"})


class QuerySyntaxError(ValueError):
    """A query that is not reconcile's count query; the message says where it differs."""


@dataclass(frozen=True, slots=True)
class CountQuery:
    """Reconcile's count query, parsed: the period (instants, UTC), the event names
    (None: all), the LIMIT (None: none given)."""

    start: dt.datetime
    end: dt.datetime
    events: tuple[str, ...] | None
    limit: int | None
    ordered: bool


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, value, position) of each token: ``string``, ``name``, ``number``, ``op``."""
    out: list[tuple[str, str, int]] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return out
        match = _TOKEN.match(text, pos)
        if match is None:
            raise QuerySyntaxError(f"unexpected character {text[pos]!r} at position {pos}")
        kind = match.lastgroup or ""
        start = match.start(kind)
        if kind == "string":
            value, pos = _string(text, start)
        else:
            value, pos = match.group(kind), match.end()
        out.append((kind, value, start))


def _string(text: str, start: int) -> tuple[str, int]:
    """The HogQL string literal opening at ``start``: its value and the position after it."""
    chars: list[str] = []
    pos = start + 1
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            if pos + 1 >= len(text):
                break
            escaped = text[pos + 1]
            chars.append(_ESCAPES.get(escaped, escaped))
            pos += 2
        elif char == "'":
            if text.startswith("''", pos):
                chars.append("'")
                pos += 2
            else:
                return "".join(chars), pos + 1
        else:
            chars.append(char)
            pos += 1
    raise QuerySyntaxError(f"the string at position {start} is not closed")


class _Reader:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.at = 0

    def _peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def _where(self) -> str:
        token = self._peek()
        return "the end" if token is None else f"{token[1]!r} at position {token[2]}"

    def is_word(self, word: str) -> bool:
        token = self._peek()
        if token is None or token[0] != "name":
            return False
        if word.upper() in _KEYWORDS:
            return token[1].upper() == word.upper()
        return token[1] == word

    def word(self, *words: str) -> None:
        for word in words:
            if not self.is_word(word):
                raise QuerySyntaxError(f"expected {word} but found {self._where()}")
            self.at += 1

    def op(self, *ops: str) -> None:
        for op in ops:
            token = self._peek()
            if token is None or token[0] != "op" or token[1] != op:
                raise QuerySyntaxError(f"expected {op!r} but found {self._where()}")
            self.at += 1

    def is_op(self, op: str) -> bool:
        token = self._peek()
        return token is not None and token[0] == "op" and token[1] == op

    def string(self) -> str:
        token = self._peek()
        if token is None or token[0] != "string":
            raise QuerySyntaxError(f"expected a string but found {self._where()}")
        self.at += 1
        return token[1]

    def number(self) -> int:
        token = self._peek()
        if token is None or token[0] != "number":
            raise QuerySyntaxError(f"expected a number but found {self._where()}")
        self.at += 1
        return int(token[1])

    def end(self) -> None:
        if self._peek() is not None:
            raise QuerySyntaxError(f"expected the end of the query but found {self._where()}")


def _instant(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise QuerySyntaxError(f"toDateTime({text!r}) is not a date and time") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)  # the project's time zone: UTC here
    return value.astimezone(dt.UTC)


def parse_count_query(text: str) -> CountQuery:
    """Parse reconcile's count query (see the module's docstring for its shape), or raise
    `QuerySyntaxError` saying where ``text`` differs from it."""
    r = _Reader(text)
    r.word("SELECT", "event")
    r.op(",")
    r.word("toDate")
    r.op("(")
    r.word("toTimeZone")
    r.op("(")
    r.word("timestamp")
    r.op(",")
    zone = r.string()
    if zone != "UTC":
        raise QuerySyntaxError(f"the days must be UTC days, not {zone!r}")
    r.op(")", ")")
    r.word("AS", "day")
    r.op(",")
    r.word("count")
    r.op("(", ")")
    r.word("AS", "total", "FROM", "events", "WHERE", "timestamp")
    r.op(">=")
    r.word("toDateTime")
    r.op("(")
    start = _instant(r.string())
    r.op(")")
    r.word("AND", "timestamp")
    r.op("<")
    r.word("toDateTime")
    r.op("(")
    end = _instant(r.string())
    r.op(")")
    events: tuple[str, ...] | None = None
    if r.is_word("AND"):
        r.word("AND", "event", "IN")
        r.op("(")
        names = [r.string()]
        while r.is_op(","):
            r.op(",")
            names.append(r.string())
        r.op(")")
        events = tuple(names)
    r.word("GROUP", "BY", "event")
    r.op(",")
    r.word("day")
    ordered = False
    if r.is_word("ORDER"):
        r.word("ORDER", "BY", "day")
        r.op(",")
        r.word("event")
        ordered = True
    limit: int | None = None
    if r.is_word("LIMIT"):
        r.word("LIMIT")
        limit = r.number()
    r.end()
    return CountQuery(start, end, events, limit, ordered)


def _event_day(event: dict[str, Any], today: dt.date) -> tuple[dt.datetime | None, dt.date]:
    raw = event.get("timestamp")
    if isinstance(raw, str):
        try:
            value = dt.datetime.fromisoformat(raw)
        except ValueError:
            value = None
        if value is not None:
            if value.tzinfo is None:
                value = value.replace(tzinfo=dt.UTC)
            value = value.astimezone(dt.UTC)
            return value, value.date()
    return None, today


class QueryApi:
    """The query API of one `CaptureServer` (``srv.query``).

    Attributes:
        personal_api_key: The personal API key ``Authorization: Bearer`` must carry.
        project_id: The project the API answers for; other ids are answered 404.
        merged: True (the default): copies of one uuid count once, as in PostHog once
            ClickHouse has merged them. False: each copy counts, as before that merge.
    """

    def __init__(self, server: CaptureServer) -> None:
        self._server = server
        self._lock = threading.Lock()
        self._replies: deque[list[Any]] = deque()
        self._queries: list[CountQuery] = []
        self.personal_api_key: str = DEFAULT_PERSONAL_API_KEY
        self.project_id: int = DEFAULT_PROJECT_ID
        self.merged: bool = True

    def enqueue_reply(self, *replies: Reply) -> None:
        """Answer the next query requests with ``replies``, in order (each ``times``
        requests); a 2xx reply is answered with the counts, after its ``delay``."""
        with self._lock:
            self._replies.extend([reply, reply.times] for reply in replies)

    @property
    def queries(self) -> list[CountQuery]:
        """The queries answered 200, in order (a copy)."""
        with self._lock:
            return list(self._queries)

    def reset(self) -> None:
        """Forget answered queries and queued replies (the key and project stay)."""
        with self._lock:
            self._replies.clear()
            self._queries.clear()

    def counts(self, query: CountQuery | None = None) -> dict[tuple[dt.date, str], int]:
        """What the API answers ``query`` with (every event if None): the count of
        accepted events per (UTC day, event), each uuid once (unless not ``merged``)."""
        today = dt.datetime.now(dt.UTC).date()
        seen: set[str] = set()
        counts: dict[tuple[dt.date, str], int] = {}
        for event in self._server.events:
            uuid = event.get("uuid")
            if uuid is not None and self.merged:
                if str(uuid) in seen:
                    continue
                seen.add(str(uuid))
            name = event.get("event")
            if not isinstance(name, str):
                continue
            instant, day = _event_day(event, today)
            if query is not None:
                if query.events is not None and name not in query.events:
                    continue
                if instant is None:
                    start, end = query.start.date(), query.end.date()
                    if not start <= day < end:
                        continue
                elif not query.start <= instant < query.end:
                    continue
            counts[(day, name)] = counts.get((day, name), 0) + 1
        return counts

    def _next_reply(self) -> Reply | None:
        with self._lock:
            if not self._replies:
                return None
            entry = self._replies[0]
            entry[1] -= 1
            if entry[1] <= 0:
                self._replies.popleft()
            reply: Reply = entry[0]
            return reply

    def serve(self, exchange: Exchange) -> None:
        """Answer one request to a path under `QUERY_PATH_PREFIX`."""
        raw = exchange.read_body()
        status, document, headers = self._answer(exchange, raw)
        from .capture_server import ReceivedRequest

        detail = document.get("detail") if status != HTTPStatus.OK else None
        self._server._record(
            ReceivedRequest.plain(
                exchange, raw, status, detail if isinstance(detail, str) else None
            )
        )
        body = json.dumps(document).encode()
        exchange.respond(status, body, _JSON, headers)

    def _answer(
        self, exchange: Exchange, raw: bytes | None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        match = _PATH.fullmatch(exchange.path)
        if match is None:
            return _error(HTTPStatus.NOT_FOUND, "invalid_request", "not_found", "Not found.")
        if exchange.method != "POST":
            detail = f'Method "{exchange.method}" not allowed.'
            return _error(
                HTTPStatus.METHOD_NOT_ALLOWED, "invalid_request", "method_not_allowed", detail
            )
        authorization = exchange.headers.get("authorization", "").strip()
        scheme, _, key = authorization.partition(" ")
        if not authorization or scheme.lower() != "bearer":
            return _error(
                HTTPStatus.UNAUTHORIZED, "authentication_error", "not_authenticated",
                _NOT_AUTHENTICATED,
            )  # fmt: skip
        if key.strip() != self.personal_api_key:
            return _error(
                HTTPStatus.UNAUTHORIZED, "authentication_error", "authentication_failed",
                _INVALID_KEY,
            )  # fmt: skip
        if match.group(1) != str(self.project_id):
            return _error(HTTPStatus.NOT_FOUND, "invalid_request", "not_found", "Not found.")
        reply = self._next_reply()
        if reply is not None and reply.delay > 0:
            self._server._stopping.wait(reply.delay)
        if reply is not None and not reply.is_success:
            return _scripted(reply)
        try:
            query = _query_of(raw)
        except QuerySyntaxError as exc:
            return _error(HTTPStatus.BAD_REQUEST, "validation_error", "invalid_input", str(exc))
        with self._lock:
            self._queries.append(query)
        return HTTPStatus.OK, self._results(query), {}

    def _results(self, query: CountQuery) -> dict[str, Any]:
        limit = DEFAULT_ROWS if query.limit is None else min(query.limit, MAX_ROWS)
        counts = self.counts(query)
        rows = [[event, day.isoformat(), n] for (day, event), n in sorted(counts.items())]
        return {
            "columns": COLUMNS,
            "types": TYPES,
            "results": rows[:limit],
            "hasMore": len(rows) > limit,
            "limit": limit,
            "offset": 0,
            "is_cached": False,
            "timings": [],
            "error": None,
        }


def _query_of(raw: bytes | None) -> CountQuery:
    """The count query of a request body, or `QuerySyntaxError` saying what is wrong."""
    try:
        document = json.loads(raw or b"")
    except (ValueError, RecursionError):
        raise QuerySyntaxError("JSON parse error: the body is not JSON") from None
    query = document.get("query") if isinstance(document, dict) else None
    if not isinstance(query, dict):
        raise QuerySyntaxError("the body needs a 'query' object")
    kind = query.get("kind")
    if kind != "HogQLQuery":
        shown = json.dumps(kind)[:60]
        raise QuerySyntaxError(f"CaptureServer answers HogQLQuery queries only, not {shown}")
    text = query.get("query")
    if not isinstance(text, str):
        raise QuerySyntaxError("a HogQLQuery needs its 'query' text")
    return parse_count_query(text)


def _error(
    status: int, kind: str, code: str, detail: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    return status, {"type": kind, "code": code, "detail": detail, "attr": None}, {}


def _scripted(reply: Reply) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers: dict[str, str] = {}
    if reply.retry_after is not None:
        value = reply.retry_after
        whole = isinstance(value, float) and value.is_integer()
        headers["Retry-After"] = str(int(value)) if whole else str(value)
    if isinstance(reply.body, dict):
        return reply.status, reply.body, headers
    if reply.status == HTTPStatus.TOO_MANY_REQUESTS:
        _, document, _ = _error(reply.status, "throttled_error", "throttled", _THROTTLED)
        return reply.status, document, headers
    try:
        phrase = HTTPStatus(reply.status).phrase
    except ValueError:
        phrase = f"HTTP {reply.status}"
    detail = reply.body.decode() if isinstance(reply.body, bytes) else reply.body or phrase
    kind = "server_error" if reply.status >= 500 else "invalid_request"
    _, document, _ = _error(reply.status, kind, "error", detail)
    return reply.status, document, headers


def serve_query(server: CaptureServer, exchange: Exchange) -> None:
    """The route: ``server.query`` answers."""
    server.query.serve(exchange)


QUERY_ROUTES: Final[dict[str, Route]] = {QUERY_PATH_PREFIX + "*": serve_query}
"""The routes the server takes from this module (its ROUTING POINT, ``_extra_routes``): a
key ending in ``*`` answers every path that starts with the rest."""
