"""Event builders for the common server-side cases.

Each builder returns the arguments of one event as an :class:`EventArgs` mapping,
to pass to ``outbox.enqueue(conn, **args)`` or as an item of ``enqueue_many``. They
build in memory only; nothing is written until you enqueue.

* :func:`exception_event`: ``$exception`` from a caught exception, in the shape
  PostHog's error tracking reads (``$exception_list`` with type, message and stack
  frames, causes included).
* :func:`ai_generation_event`: ``$ai_generation`` for an LLM call, with prompt and
  completion bodies off by default and truncated when on.
* :func:`pageview_event`: ``$pageview`` for a server-rendered page, with the path
  reduced to its section and repeated views of one section by one person dropped.
* :func:`signup_attribution` and :func:`attribution_cookie`: first-touch UTM and
  referrer values through a size-capped cookie, into ``$set_once`` properties.
* :func:`hash_ip`: a keyed hash of an IP address, for a per-client key that does
  not ship the address.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import linecache
import os
import re
import sysconfig
import threading
import traceback
import uuid as uuid_module
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Literal, NotRequired, Required, TypedDict
from urllib.parse import quote, unquote, urlsplit

from outbox._errors import OutboxConfigError
from outbox.actors import Actor
from outbox.config import MIN_IP_HASH_KEY_BYTES, AnalyticsConfig, get_config
from outbox.exceptions import OutboxValidationError

__all__ = [
    "ATTRIBUTION_KEYS",
    "MAX_ATTRIBUTION_COOKIE_CHARS",
    "MAX_ATTRIBUTION_VALUE_CHARS",
    "EventArgs",
    "PageviewDeduper",
    "ai_generation_event",
    "attribution_cookie",
    "exception_event",
    "hash_ip",
    "normalise_path",
    "pageview_event",
    "signup_attribution",
    "truncate_payload",
]


class EventArgs(TypedDict, total=False):
    """The arguments of one event: ``outbox.enqueue(conn, **args)``."""

    event: Required[str]
    distinct_id: Required[str | int | uuid_module.UUID | Actor]
    properties: Required[dict[str, Any]]
    set_once: NotRequired[dict[str, Any]]
    timestamp: NotRequired[datetime | str]


# --------------------------------------------------------------------------- $exception

ExceptionLevel = Literal["fatal", "error", "warning", "info", "debug"]
_MAX_MESSAGE_CHARS: Final = 4_096
_MAX_CHAIN: Final = 10
_MAX_LINE_CHARS: Final = 300


def _library_paths() -> tuple[str, ...]:
    paths = {sysconfig.get_paths().get(name) for name in ("stdlib", "platstdlib", "purelib")}
    paths |= {sysconfig.get_paths().get("platlib")}
    return tuple(os.path.abspath(p) + os.sep for p in paths if p)


_NOT_IN_APP: Final = _library_paths()


def _message(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not hide the exception itself
        text = f"<{type(exc).__name__}: str() failed>"
    if len(text) > _MAX_MESSAGE_CHARS:
        text = truncate_payload(text, _MAX_MESSAGE_CHARS)
    return text


def _in_app(abs_path: str | None, module: object, in_app_modules: tuple[str, ...]) -> bool:
    if isinstance(module, str) and in_app_modules:
        for prefix in in_app_modules:
            if module == prefix or module.startswith(prefix + "."):
                return True
    return bool(abs_path) and not str(abs_path).startswith(_NOT_IN_APP)


def _frames(
    tb: TracebackType | None, max_frames: int, context_lines: int, in_app_modules: tuple[str, ...]
) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    for frame, lineno in traceback.walk_tb(tb):
        path = frame.f_code.co_filename
        abs_path = os.path.abspath(path) if path and not path.startswith("<") else path
        module = frame.f_globals.get("__name__")
        entry: dict[str, Any] = {
            "platform": "python",
            "filename": os.path.basename(path) if path else None,
            "abs_path": abs_path,
            "module": module if isinstance(module, str) else None,
            "function": frame.f_code.co_name or "<unknown>",
            "lineno": lineno,
            "in_app": _in_app(abs_path, module, in_app_modules),
        }
        if context_lines >= 0 and lineno and path:
            line = linecache.getline(path, lineno)
            if line:
                entry["context_line"] = line.rstrip("\n")[:_MAX_LINE_CHARS]
                if context_lines:
                    entry["pre_context"] = [
                        linecache.getline(path, n).rstrip("\n")[:_MAX_LINE_CHARS]
                        for n in range(max(1, lineno - context_lines), lineno)
                    ]
                    entry["post_context"] = [
                        text.rstrip("\n")[:_MAX_LINE_CHARS]
                        for n in range(lineno + 1, lineno + 1 + context_lines)
                        if (text := linecache.getline(path, n))
                    ]
        frames.append(entry)
    # The innermost frames say where it broke; keep those when there are too many.
    return frames[-max_frames:] if max_frames > 0 else []


def _chain(exc: BaseException) -> list[tuple[BaseException, str | None]]:
    chain: list[tuple[BaseException, str | None]] = [(exc, None)]
    seen = {id(exc)}
    current = exc
    while len(chain) < _MAX_CHAIN:
        if current.__cause__ is not None:
            nxt, source = current.__cause__, "__cause__"
        elif current.__context__ is not None and not current.__suppress_context__:
            nxt, source = current.__context__, "__context__"
        else:
            break
        if id(nxt) in seen:
            break
        seen.add(id(nxt))
        chain.append((nxt, source))
        current = nxt
    return chain


def exception_event(
    exc: BaseException,
    distinct_id: str | int | uuid_module.UUID | Actor,
    *,
    handled: bool = True,
    level: ExceptionLevel = "error",
    properties: Mapping[str, Any] | None = None,
    max_frames: int = 50,
    context_lines: int = 3,
    in_app_modules: Sequence[str] = (),
) -> EventArgs:
    """An ``$exception`` event for PostHog's error tracking, from a caught exception.

    ``$exception_list`` holds the exception first and then its causes
    (``__cause__``, or ``__context__`` unless suppressed, at most 10), each with
    ``type``, ``value`` (the message, at most 4,096 characters), ``module``,
    ``mechanism`` and ``stacktrace.frames`` (oldest call first; file, function,
    line, ``in_app`` for code outside the standard library and installed packages,
    and ``context_lines`` lines of source around the line, or none with
    ``context_lines=-1``). At most ``max_frames`` frames per exception are kept:
    the innermost. Local variables are never included. If your application runs
    from an installed package (in site-packages), name its top-level modules in
    ``in_app_modules`` (e.g. ``("myapp",)``) so its frames count as ``in_app``.
    ``handled=False`` marks an exception that reached the top (a CLI entry point, a
    500 handler).
    ``properties`` are added (e.g. ``component``, ``command``).
    """
    if not isinstance(exc, BaseException):
        raise OutboxValidationError("exc", f"must be an exception, got {type(exc).__name__}")
    entries: list[dict[str, Any]] = []
    for index, (item, source) in enumerate(_chain(exc)):
        mechanism: dict[str, Any] = {
            "type": "generic" if index == 0 else "chained",
            "handled": handled,
            "synthetic": False,
            "exception_id": index,
        }
        if index:
            mechanism["parent_id"] = index - 1
            mechanism["source"] = source
        entry: dict[str, Any] = {
            "type": type(item).__qualname__,
            "value": _message(item),
            "module": type(item).__module__,
            "mechanism": mechanism,
        }
        frames = _frames(item.__traceback__, max_frames, context_lines, tuple(in_app_modules))
        if frames:
            entry["stacktrace"] = {"type": "raw", "frames": frames}
        entries.append(entry)
    props: dict[str, Any] = {
        "$exception_list": entries,
        "$exception_level": level,
        "$exception_type": entries[0]["type"],
        "$exception_message": entries[0]["value"],
    }
    if properties:
        props.update(properties)
    return {"event": "$exception", "distinct_id": distinct_id, "properties": props}


# --------------------------------------------------------------------------- $ai_generation


# Message metadata, not text: kept whole and not counted, so messages stay well-formed.
_STRUCTURAL_KEYS: Final = frozenset({"role", "type"})


def truncate_payload(value: Any, limit: int) -> Any:
    """Cut the text in ``value`` to at most ``limit`` characters in total.

    ``value`` is a str, or lists and mappings of them (chat messages). Strings are
    counted in order; the one that crosses the limit keeps what fits and ends in
    ``…[truncated N chars]``, N being how many characters it lost, and later ones
    keep nothing but such a marker. Keys, numbers, structure and the values of
    ``role`` and ``type`` keys are kept and not counted, so a list of messages stays
    a list of well-formed messages. Returns a new object when anything was
    cut; ``value`` is never modified.
    """
    budget = [max(0, limit)]
    return _truncate(value, budget)


def _truncate(value: Any, budget: list[int]) -> Any:
    if isinstance(value, str):
        remaining = budget[0]
        if len(value) <= remaining:
            budget[0] = remaining - len(value)
            return value
        budget[0] = 0
        return f"{value[:remaining]}…[truncated {len(value) - remaining} chars]"
    if isinstance(value, Mapping):
        return {
            k: v if k in _STRUCTURAL_KEYS and isinstance(v, str) else _truncate(v, budget)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_truncate(v, budget) for v in value]
    return value


def _non_empty(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise OutboxValidationError(field, f"must be a non-empty str, got {value!r}")
    return value.strip()


def _count(value: object, field: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise OutboxValidationError(field, f"must be a non-negative int or None, got {value!r}")
    return value


def ai_generation_event(
    distinct_id: str | int | uuid_module.UUID | Actor,
    *,
    provider: str,
    model: str,
    latency: float,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    error: BaseException | str | None = None,
    http_status: int | None = None,
    input: Any = None,
    output: Any = None,
    trace_id: str | uuid_module.UUID | None = None,
    model_parameters: Mapping[str, Any] | None = None,
    properties: Mapping[str, Any] | None = None,
    config: AnalyticsConfig | None = None,
) -> EventArgs:
    """An ``$ai_generation`` event for one LLM call, for PostHog's LLM analytics.

    Always sent: ``$ai_provider``, ``$ai_model``, ``$ai_latency`` (seconds),
    ``$ai_input_tokens`` and ``$ai_output_tokens`` (when given), ``$ai_is_error``,
    ``$ai_error`` (``Type: message`` for an exception), ``$ai_http_status``,
    ``$ai_trace_id`` (a new uuid unless given: pass your conversation or request id
    to group calls) and ``$ai_model_parameters``.

    ``input`` (the prompt: a str or a list of ``{"role", "content"}`` messages) and
    ``output`` (the completion) are sent as ``$ai_input`` and
    ``$ai_output_choices`` only when the configuration's ``ai_payloads`` is on:
    prompts often carry customer data. Then their text is cut at
    ``ai_payload_max_chars`` (30,000 by default) per payload, with an explicit
    ``…[truncated N chars]`` marker (see :func:`truncate_payload`), so a long
    prompt does not push the event past PostHog's size limit.
    """
    cfg = config or get_config()
    if isinstance(latency, bool) or not isinstance(latency, int | float) or latency < 0:
        raise OutboxValidationError(
            "latency", f"must be a non-negative number of seconds, got {latency!r}"
        )
    if http_status is not None and (
        isinstance(http_status, bool) or not isinstance(http_status, int)
    ):
        raise OutboxValidationError("http_status", f"must be an int or None, got {http_status!r}")
    if isinstance(error, BaseException):
        error_text: str | None = f"{type(error).__qualname__}: {_message(error)}"
    elif error is None or isinstance(error, str):
        error_text = error
    else:
        raise OutboxValidationError("error", f"must be an exception, a str or None, got {error!r}")
    props: dict[str, Any] = {
        "$ai_provider": _non_empty(provider, "provider"),
        "$ai_model": _non_empty(model, "model"),
        "$ai_latency": float(latency),
        "$ai_input_tokens": _count(input_tokens, "input_tokens"),
        "$ai_output_tokens": _count(output_tokens, "output_tokens"),
        "$ai_is_error": error_text is not None,
        "$ai_error": error_text,
        "$ai_http_status": http_status,
        "$ai_trace_id": str(trace_id) if trace_id is not None else str(uuid_module.uuid4()),
        "$ai_model_parameters": dict(model_parameters) if model_parameters else None,
    }
    if cfg.ai_payloads:
        limit = cfg.ai_payload_max_chars
        if input is not None:
            props["$ai_input"] = truncate_payload(input, limit)
        if output is not None:
            props["$ai_output_choices"] = truncate_payload(output, limit)
    if properties:
        props.update(properties)
    return {"event": "$ai_generation", "distinct_id": distinct_id, "properties": props}


# --------------------------------------------------------------------------- $pageview

_UUID_SEGMENT: Final = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)
_ISSUE_KEY_SEGMENT: Final = re.compile(r"[A-Z][A-Z0-9]{0,9}-[0-9]+")


_ABSOLUTE_URL: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _path_of(url: str) -> str:
    text = url.strip()
    if _ABSOLUTE_URL.match(text):
        return urlsplit(text).path
    # A bare path: urlsplit would take "//x/..." for a host, so cut by hand.
    return text.split("#", 1)[0].split("?", 1)[0]


def normalise_path(url: str) -> str:
    """The section a URL or path belongs to.

    The query string and fragment are removed, and so are path segments that are
    resource ids: UUIDs (with or without dashes) and issue keys such as ``MUL-12``
    (upper-case letters and digits, a dash, digits; lower-case slugs like
    ``step-2`` are kept). Empty segments and a trailing slash go too. So
    ``https://app.example.com/acme/issues/MUL-12?tab=activity#c3`` and
    ``/acme/issues/8d5c1f5e-4c1b-4d0e-9a51-2a3c9b7d6e10/`` both give
    ``/acme/issues``.
    """
    if not isinstance(url, str):
        raise OutboxValidationError("url", f"must be a str, got {type(url).__name__}")
    segments = [
        segment
        for segment in _path_of(url).split("/")
        if segment
        and not _UUID_SEGMENT.fullmatch(segment)
        and not _ISSUE_KEY_SEGMENT.fullmatch(segment)
    ]
    return "/" + "/".join(segments)


class PageviewDeduper:
    """Remembers the last section each person viewed, for at most ``max_size`` persons.

    In-process and in memory (a least-recently-used map keyed by distinct_id), so
    each process dedupes on its own, and a restart forgets. :meth:`seen` records a
    view: whether it repeats the person's previous section. Thread-safe.
    """

    def __init__(self, max_size: int = 10_000) -> None:
        if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1:
            raise OutboxConfigError("max_size", "must be a positive int")
        self.max_size = max_size
        self._last: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def seen(self, distinct_id: str, section: str) -> bool:
        """Record that ``distinct_id`` viewed ``section``; True if it was the last one too."""
        with self._lock:
            previous = self._last.get(distinct_id)
            self._last[distinct_id] = section
            self._last.move_to_end(distinct_id)
            if len(self._last) > self.max_size:
                self._last.popitem(last=False)
            return previous == section

    def clear(self) -> None:
        """Forget every person."""
        with self._lock:
            self._last.clear()


_default_deduper = PageviewDeduper()


def pageview_event(
    distinct_id: str | int | uuid_module.UUID | Actor,
    url: str,
    *,
    properties: Mapping[str, Any] | None = None,
    dedupe: bool = True,
    deduper: PageviewDeduper | None = None,
) -> EventArgs | None:
    """A ``$pageview`` for a server-rendered page, at section granularity.

    ``url`` is the full URL or the path. ``$pathname`` is :func:`normalise_path`'s
    section, ``$current_url`` the scheme and host (when ``url`` has them) plus that
    section, and ``$host`` the host: the query string never leaves the process, so
    neither do tokens and OAuth codes in it. Returns ``None`` when ``dedupe`` is on
    and this person's previous pageview (in this process, per ``deduper``, by
    default one shared map of 10,000 persons) was of the same section: moving
    between issues of one list is one pageview, not one per issue. The view counts
    as seen when this function returns, whether or not the event is committed.
    """
    section = normalise_path(url)
    absolute = _ABSOLUTE_URL.match(url.strip()) is not None
    parts = urlsplit(url.strip())
    props: dict[str, Any] = {"$pathname": section}
    if absolute and parts.netloc:
        host = parts.hostname or parts.netloc
        if parts.port:
            host = f"{host}:{parts.port}"
        props["$host"] = host
        props["$current_url"] = f"{parts.scheme}://{host}{section}"
    else:
        props["$current_url"] = section
    if properties:
        props.update(properties)
    if dedupe:
        who = distinct_id.distinct_id if isinstance(distinct_id, Actor) else str(distinct_id)
        if (deduper or _default_deduper).seen(who, section):
            return None
    return {"event": "$pageview", "distinct_id": distinct_id, "properties": props}


# --------------------------------------------------------------------------- attribution

ATTRIBUTION_KEYS: Final = (
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
    "referrer",
)
"""The first-touch values the attribution cookie carries; any other key is ignored."""
MAX_ATTRIBUTION_VALUE_CHARS: Final = 96
MAX_ATTRIBUTION_COOKIE_CHARS: Final = 512


def _origin(referrer: str) -> str:
    parts = urlsplit(referrer)
    if parts.scheme in ("http", "https") and parts.hostname:
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"
    return referrer


def _attribution_values(values: Mapping[str, Any]) -> dict[str, str]:
    clean: dict[str, str] = {}
    for key in ATTRIBUTION_KEYS:
        value = values.get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        text = value.strip()
        if key == "referrer":
            text = _origin(text)  # never a path or query: they can carry tokens
        clean[key] = text[:MAX_ATTRIBUTION_VALUE_CHARS]
    return clean


def attribution_cookie(values: Mapping[str, Any]) -> str | None:
    """The value to store in a first-touch attribution cookie, or ``None``.

    Keeps the :data:`ATTRIBUTION_KEYS` whose values are non-empty strings (the
    referrer reduced to its origin), caps each at 96 characters *before* encoding,
    and encodes them as JSON, then URL-encodes that. Returns ``None`` when nothing
    is left or when the JSON is longer than 512 characters: the cookie holds intact
    JSON or nothing, never a truncated half.
    """
    if not isinstance(values, Mapping):
        raise OutboxValidationError("values", f"must be a mapping, got {type(values).__name__}")
    clean = _attribution_values(values)
    if not clean:
        return None
    payload = json.dumps(clean, separators=(",", ":"), ensure_ascii=False)
    if len(payload) > MAX_ATTRIBUTION_COOKIE_CHARS:
        return None
    return quote(payload, safe="")


def signup_attribution(cookie: str | None) -> dict[str, str]:
    """The ``$set_once`` person properties from a first-touch attribution cookie.

    ``cookie`` is the raw cookie value (URL-encoded JSON, as
    :func:`attribution_cookie` writes it; plain JSON works too). Returns
    ``initial_utm_source``, ``initial_utm_medium``, ``initial_utm_campaign``,
    ``initial_utm_term``, ``initial_utm_content`` and ``initial_referrer`` for the
    values present, each capped at 96 characters. The whole cookie is ignored (an
    empty dict is returned) when it is missing, longer than 512 characters once
    decoded, or not a JSON object. It never raises: the cookie comes from the
    browser, and a signup must not fail over it. Pass the result as ``set_once=``
    so a later visit never overwrites the first touch.
    """
    if not isinstance(cookie, str) or not cookie or len(cookie) > 8 * MAX_ATTRIBUTION_COOKIE_CHARS:
        return {}
    text = unquote(cookie.strip())
    if len(text) > MAX_ATTRIBUTION_COOKIE_CHARS:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {f"initial_{key}": value for key, value in _attribution_values(data).items()}


# --------------------------------------------------------------------------- IP hashing


def hash_ip(
    ip: str,
    *,
    key: bytes | str | None = None,
    config: AnalyticsConfig | None = None,
) -> str:
    """A keyed hash of an IP address: HMAC-SHA256 as 64 hex characters.

    The key is ``key``, else the configuration's ``ip_hash_key``; with neither,
    :class:`~outbox.OutboxConfigError` is raised rather than hashing without a
    key, because an unkeyed hash of an IPv4 address is reversed by hashing all
    2**32 addresses. Keep the key secret and stable (rotating it changes every
    hash). The address is normalised first, so ``::ffff:10.0.0.1`` and ``10.0.0.1``
    (and different spellings of one IPv6 address) hash the same; a str that is not
    an IP address raises :class:`OutboxValidationError` naming ``ip``.
    """
    secret = key if key is not None else (config or get_config()).ip_hash_key
    if secret is None:
        raise OutboxConfigError(
            "ip_hash_key",
            "no key is configured; refusing to hash an IP address without one, since an "
            "unkeyed hash of an IPv4 address can be reversed by trying every address",
        )
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if len(secret) < MIN_IP_HASH_KEY_BYTES:
        raise OutboxConfigError(
            "key", f"is {len(secret)} bytes; use a secret of at least {MIN_IP_HASH_KEY_BYTES}"
        )
    if not isinstance(ip, str):
        raise OutboxValidationError("ip", f"must be a str, got {type(ip).__name__}")
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        raise OutboxValidationError("ip", f"{ip[:60]!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return hmac.new(secret, address.compressed.encode("ascii"), hashlib.sha256).hexdigest()
