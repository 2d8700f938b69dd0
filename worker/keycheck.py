"""Verifying the PostHog project API key before anything is sent.

PostHog's capture endpoint checks only the *shape* of a key (empty, over 64 bytes,
not ASCII, a ``phx_`` personal key, a NUL: ``validate_token`` in
rust/capture/src/token.rs). A well-formed key that belongs to no project (a typo, a
key that was reset, an EU project's key sent to ``us.i.posthog.com``) is answered
200, and PostHog drops the events later, where the sender never learns of it
(rust/capture/src/known_tokens.rs says so). The worker deletes a row on 200, so a
wrong key would lose every event.

So the worker first asks a PostHog service that *resolves* the key: the flags
service. It sends ``POST {host}/flags/?v=2`` with ``{"api_key": ..., "distinct_id":
..., "disable_flags": true}``, as posthog-python posts to ``/flags/`` (its
``request.flags``), and reads the answer:

* 200 with a flags document: the key belongs to a project (**verified**). The flags
  service looks the key up before anything else and answers an unknown one with 401
  "The provided API key is invalid or has expired"
  (rust/feature-flags/src/handler/authentication.rs, api/errors.rs).
* 401 or 403: PostHog does not know the key (**rejected**).
* 404 or 405, a redirect, another 4xx, or a 200 that is not a flags document: the host
  does not serve PostHog's flags endpoint, typically a proxy that forwards only the
  capture paths (**unverifiable**; ``OUTBOX_VERIFY_API_KEY=0`` turns the check off).
  Redirects are never followed: ``requests`` turns a POST redirected with 301/302
  into a GET, and the flags endpoint answers a GET with 200 without reading any key
  (rust/feature-flags/src/api/endpoint.rs), which would "verify" anything.
* 408, 429, 5xx, a timeout or a connection error: **unreachable**, try again later.

What one check costs: one request with a JSON body of about 130 bytes.
``disable_flags: true`` is the field web and mobile SDKs send "to save money on flag
evaluations" (rust/feature-flags/src/flags/flag_request.rs): the service still
authenticates the key, evaluates no flag, and records no billable usage ("Only
record billing if flags are not disabled", rust/feature-flags/src/handler/mod.rs;
without it a request with flags would count, handler/billing.rs). A distinct id is
sent anyway, for flags services older than that field, which require one; such an old
service evaluates (and bills) the request as one flag request.

When: at start, after any 401/403 from capture (the drainer reports ``unauthorized``),
and every ``OUTBOX_KEY_CHECK_INTERVAL`` seconds (default 300) while the worker runs.
The period bounds how long a key that stops resolving while the worker runs (reset,
project deleted) goes on being answered 200 and dropped: at most five minutes of
events, at 288 unbilled requests a day per worker. A shorter period costs more
requests for little: the classic mistake, a wrong or other-region key, is caught at
start, before anything is sent. A rejected or unverifiable key is checked again every
``OUTBOX_UNAUTHORIZED_PAUSE`` seconds, so a fix on PostHog's side is noticed without
a restart.

This module keeps the protocol (:func:`flags_url`, :func:`check_body`,
:func:`interpret`) apart from the I/O (:class:`KeyChecker`) and from the state the
worker acts on (:class:`KeyGate`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import requests
from posthog import request as ph_request
from prometheus_client import CollectorRegistry, Gauge

from outbox.exceptions import OutboxError
from worker.settings import Settings, api_key_problem
from worker.sinks.base import error_detail
from worker.sinks.posthog import USER_AGENT

log = logging.getLogger("outbox.worker")

#: Not checked yet (or checked again after capture answered 401/403): nothing is sent.
KEY_UNCHECKED = "unchecked"
#: PostHog resolved the key to a project.
KEY_VERIFIED = "verified"
#: PostHog does not know the key (or its shape is one PostHog refuses).
KEY_REJECTED = "rejected"
#: The host does not serve PostHog's flags endpoint: the key cannot be checked there.
KEY_UNVERIFIABLE = "unverifiable"
#: The check could not be made (network, timeout, 429, 5xx); it is tried again.
KEY_UNREACHABLE = "unreachable"
#: No check: ``OUTBOX_VERIFY_API_KEY=0``, or the worker does not send to PostHog.
KEY_CHECK_OFF = "off"
KEY_STATES = (
    KEY_UNCHECKED,
    KEY_VERIFIED,
    KEY_REJECTED,
    KEY_UNVERIFIABLE,
    KEY_UNREACHABLE,
    KEY_CHECK_OFF,
)

FLAGS_PATH = "/flags/?v=2"
#: The distinct id of the check request (flags services before ``disable_flags`` need one).
CHECK_DISTINCT_ID = "posthog-outbox-key-check"
#: Most bytes of an answer the checker reads; the rest is not needed to judge it.
MAX_ANSWER_BYTES = 64 * 1024
#: Longest the checker waits to connect (the read timeout is OUTBOX_REQUEST_TIMEOUT).
CONNECT_TIMEOUT = 5.0
#: Longest excerpt of an answer (or of an error) that reaches logs, /readyz or status.
MAX_DETAIL = 200
#: Keys the flags service's answers carry (v1 and v2 shapes, and a quota-limited one).
_FLAGS_DOCUMENT_KEYS = frozenset(
    {"flags", "featureFlags", "errorsWhileComputingFlags", "quotaLimited", "requestId"}
)
#: After an unreachable check the next one comes this soon, doubling per failure up to
#: OUTBOX_UNAUTHORIZED_PAUSE (at least this).
UNREACHABLE_RETRY_MIN = 1.0
_SETTING = "OUTBOX_VERIFY_API_KEY=0"


# -- the protocol (no I/O) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyVerdict:
    """What one check concluded: a state, a one-line reason and the HTTP status (if any)."""

    state: str
    reason: str
    status: int | None = None


def public_host(host: str) -> str:
    """``host`` as it may be shown: without a user name, password, query or fragment."""
    parts = urlsplit(host.strip())
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6
        netloc = f"[{netloc}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        netloc += f":{port}"
    if not parts.scheme or not netloc:
        return scrub(host.split("@")[-1].split("?")[0], None)
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def flags_url(host: str) -> str:
    """The URL of the check: ``/flags/?v=2`` under the host the sink sends to."""
    base = ph_request.determine_server_host(host).strip().rstrip("/")
    return base + FLAGS_PATH


def check_body(api_key: str) -> bytes:
    """The JSON body of the check: the key, a fixed distinct id, no flag evaluation."""
    document = {"api_key": api_key, "distinct_id": CHECK_DISTINCT_ID, "disable_flags": True}
    return json.dumps(document).encode()


def scrub(text: str, secret: str | None, limit: int = MAX_DETAIL) -> str:
    """``text`` fit for a log line: ``secret`` replaced, one line, control and non-ASCII
    characters escaped, at most ``limit`` characters."""
    if secret:
        text = text.replace(secret, "[redacted]")
    text = " ".join(text.split())
    out: list[str] = []
    for ch in text:
        if ch.isascii() and ch.isprintable():
            out.append(ch)
        elif ord(ch) <= 0xFF:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    cleaned = "".join(out)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def _detail(body: bytes, secret: str | None) -> str:
    """PostHog's explanation in an answer, fit for a log line."""
    return scrub(error_detail(body), secret) or "(empty answer)"


def _is_flags_document(body: bytes) -> bool:
    try:
        document = json.loads(body.decode("utf-8", errors="replace"))
    except ValueError:
        return False
    return isinstance(document, dict) and bool(_FLAGS_DOCUMENT_KEYS & document.keys())


def interpret(
    status: int,
    body: bytes,
    *,
    host: str,
    api_key: str | None = None,
    location: str | None = None,
) -> KeyVerdict:
    """Judge the flags service's answer (``status``, ``body``, a redirect's ``location``).

    ``host`` is only named in the reason (pass :func:`public_host`); ``api_key`` is
    only used to keep it out of the reason.
    """
    shown = public_host(host)
    if status == 200:
        if _is_flags_document(body):
            return KeyVerdict(KEY_VERIFIED, f"PostHog at {shown} knows POSTHOG_API_KEY", status)
        return KeyVerdict(
            KEY_UNVERIFIABLE,
            f"{shown} answered the key check at /flags/ with 200 but not with a PostHog "
            f"flags answer ({_detail(body, api_key)}): if it is a proxy, forward /flags/ to "
            f"PostHog, or set {_SETTING}",
            status,
        )
    if status in (401, 403):
        return KeyVerdict(
            KEY_REJECTED,
            f"PostHog at {shown} does not know POSTHOG_API_KEY (HTTP {status}: "
            f"{_detail(body, api_key)}). A typo, a key that was reset, or another region's "
            "key? An EU project's key works only with POSTHOG_HOST=https://eu.i.posthog.com",
            status,
        )
    if 300 <= status < 400:
        where = scrub(location, api_key) if location else "no Location"
        return KeyVerdict(
            KEY_UNVERIFIABLE,
            f"{shown} redirects the key check (HTTP {status} to {where}); the worker does "
            "not follow redirects: set POSTHOG_HOST to the address PostHog is served at",
            status,
        )
    if status in (404, 405):
        return KeyVerdict(
            KEY_UNVERIFIABLE,
            f"{shown} does not serve PostHog's /flags/ endpoint (HTTP {status}), so "
            "POSTHOG_API_KEY cannot be verified there: check POSTHOG_HOST, or, for a proxy "
            f"that forwards only the capture paths, set {_SETTING}",
            status,
        )
    if status in (408, 429) or status >= 500:
        return KeyVerdict(
            KEY_UNREACHABLE,
            f"PostHog at {shown} could not check POSTHOG_API_KEY now (HTTP {status}: "
            f"{_detail(body, api_key)})",
            status,
        )
    return KeyVerdict(
        KEY_UNVERIFIABLE,
        f"{shown} answered the key check at /flags/ with HTTP {status} "
        f"({_detail(body, api_key)}): check POSTHOG_HOST, or, for a proxy that does not "
        f"forward /flags/, set {_SETTING}",
        status,
    )


def unreachable(host: str, error: str, api_key: str | None = None) -> KeyVerdict:
    """The verdict when the check could not be made at all (``error`` says why)."""
    password = urlsplit(host.strip()).password
    if password:  # the driver's message may quote the URL it was given
        error = error.replace(password, "[redacted]")
    return KeyVerdict(
        KEY_UNREACHABLE,
        f"cannot reach {public_host(host)} to verify POSTHOG_API_KEY ({scrub(error, api_key)})",
    )


def refused_by_shape(api_key: str) -> KeyVerdict | None:
    """The verdict for a key PostHog would refuse by its shape alone (no request needed)."""
    problem = api_key_problem(api_key)
    if problem is None:
        return None
    return KeyVerdict(KEY_REJECTED, f"POSTHOG_API_KEY {problem}")


# -- the request ------------------------------------------------------------------------


class Checker(Protocol):
    """What :class:`KeyGate` needs of a checker."""

    def check(self) -> KeyVerdict:
        """Check the key now; never raise for what the network or the host does."""
        ...

    def close(self) -> None:
        """Release what the checker holds."""
        ...


class KeyChecker:
    """Asks PostHog's flags service whether it knows the key: one bounded request."""

    def __init__(self, api_key: str, host: str, *, timeout: float = 15.0) -> None:
        self._api_key = api_key
        self.host = host
        self.url = flags_url(host)
        self.timeout = timeout
        self._session = requests.Session()

    def __repr__(self) -> str:  # never show the key
        return f"KeyChecker(host={public_host(self.host)!r})"

    def check(self) -> KeyVerdict:
        """Check the key now. Never raises for anything the network or the host does."""
        refused = refused_by_shape(self._api_key)
        if refused is not None:
            return refused
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        deadline = time.monotonic() + 2 * self.timeout
        try:
            response = self._session.post(
                self.url,
                data=check_body(self._api_key),
                headers=headers,
                timeout=(min(CONNECT_TIMEOUT, self.timeout), self.timeout),
                allow_redirects=False,
                stream=True,
            )
            try:
                body = _read_bounded(response, deadline)
            finally:
                response.close()
        except requests.exceptions.Timeout as exc:
            return unreachable(
                self.host, f"timed out after {self.timeout:g}s: {exc}", self._api_key
            )
        except requests.exceptions.RequestException as exc:
            return unreachable(self.host, f"{type(exc).__name__}: {exc}", self._api_key)
        return interpret(
            response.status_code,
            body,
            host=self.host,
            api_key=self._api_key,
            location=response.headers.get("Location"),
        )

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()


def _read_bounded(response: requests.Response, deadline: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=8192):
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_ANSWER_BYTES or time.monotonic() > deadline:
            break
    return b"".join(chunks)[:MAX_ANSWER_BYTES]


# -- the state the worker acts on -------------------------------------------------------


class ApiKeyNotVerifiedError(OutboxError):
    """``run --until-empty`` sent nothing because the key did not verify.

    ``exit_status`` is 3 when PostHog rejected the key or it cannot be verified at the
    host (a human must act), 1 when the check could not be made (a later run tries again).
    """

    def __init__(self, state: str, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.exit_status = 1 if state == KEY_UNREACHABLE else 3


class KeyGate:
    """Whether the worker may send: the key's last verdict and when to check again.

    Nothing is sent until the key verifies. A verified key stays trusted while a
    periodic re-check cannot reach the flags service (capture may well work); a
    rejected or unverifiable answer, or :meth:`invalidate` (capture answered 401/403),
    withdraws that trust until a check verifies the key again.
    """

    def __init__(
        self,
        checker: Checker | None,
        *,
        host: str,
        interval: float,
        retry_delay: float,
        off_reason: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._checker = checker
        self.host = public_host(host)
        self.interval = interval
        self.retry_delay = max(retry_delay, UNREACHABLE_RETRY_MIN)
        self._clock = clock
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._trusted = False
        self._next_at = 0.0
        self._unreachable_delay = UNREACHABLE_RETRY_MIN
        self.checks = 0
        self.status: int | None = None
        if checker is None:
            self.state = KEY_CHECK_OFF
            self.reason = off_reason
        else:
            self.state = KEY_UNCHECKED
            self.reason = f"verifying POSTHOG_API_KEY with PostHog at {self.host}"

    @property
    def enabled(self) -> bool:
        """Whether the key is checked at all."""
        return self._checker is not None

    def allows_sending(self) -> bool:
        """True when events may be sent now."""
        with self._lock:
            return self.state in (KEY_VERIFIED, KEY_CHECK_OFF) or (
                self.state == KEY_UNREACHABLE and self._trusted
            )

    def due(self) -> bool:
        """True when a check should run now."""
        with self._lock:
            return self._checker is not None and self._clock() >= self._next_at

    def next_check_in(self) -> float:
        """Seconds until the next check is due (0 when due, or when checks are off)."""
        with self._lock:
            if self._checker is None:
                return 0.0
            return max(0.0, self._next_at - self._clock())

    def check(self) -> KeyVerdict:
        """Check the key now (one check at a time), act on the answer, and return it."""
        if self._checker is None:
            return KeyVerdict(KEY_CHECK_OFF, self.reason)
        with self._check_lock:
            verdict = self._checker.check()
            self._apply(verdict)
            return verdict

    def invalidate(self, why: str) -> None:
        """Capture refused the key: stop trusting it, and check it again at once."""
        if self._checker is None:
            return
        with self._lock:
            self._trusted = False
            self._next_at = 0.0
            if self.state in (KEY_VERIFIED, KEY_UNREACHABLE):
                self.state = KEY_UNCHECKED
                self.reason = f"verifying POSTHOG_API_KEY again at {self.host}: {why}"
        log.warning(
            "checking POSTHOG_API_KEY again with PostHog at %s: %s; nothing is sent until "
            "it verifies",
            self.host,
            why,
            extra={"action": "api_key_recheck", "host": self.host},
        )

    def _apply(self, verdict: KeyVerdict) -> None:
        with self._lock:
            previous, was_trusted = self.state, self._trusted
            now = self._clock()
            self.checks += 1
            self.status = verdict.status
            if verdict.state == KEY_VERIFIED:
                self._trusted = True
                self._unreachable_delay = UNREACHABLE_RETRY_MIN
                self._next_at = now + self.interval
            elif verdict.state == KEY_UNREACHABLE:
                delay = min(self._unreachable_delay, self.retry_delay)
                self._unreachable_delay = min(self._unreachable_delay * 2, self.retry_delay)
                self._next_at = now + delay
            else:
                self._trusted = False
                self._unreachable_delay = UNREACHABLE_RETRY_MIN
                self._next_at = now + self.retry_delay
            changed = verdict.state != previous or verdict.reason != self.reason
            self.state = verdict.state
            self.reason = verdict.reason
            trusted = self._trusted
            next_in = self._next_at - now
        if not changed:
            return
        extra: dict[str, Any] = {"host": self.host}
        if verdict.status is not None:
            extra["status"] = verdict.status
        if verdict.state == KEY_VERIFIED:
            log.info(
                "%s%s",
                verdict.reason,
                ": sending resumes" if previous not in (KEY_UNCHECKED, KEY_VERIFIED) else "",
                extra={"action": "api_key_verified", **extra},
            )
        elif verdict.state == KEY_REJECTED:
            log.error(
                "%s. Nothing is sent and nothing is deleted until the key verifies: events "
                "wait in the outbox without using attempts. Checking again in %.0fs",
                verdict.reason,
                next_in,
                extra={"action": "api_key_rejected", **extra},
            )
        elif verdict.state == KEY_UNVERIFIABLE:
            log.error(
                "%s. Nothing is sent and nothing is deleted until the key verifies: events "
                "wait in the outbox without using attempts. Checking again in %.0fs",
                verdict.reason,
                next_in,
                extra={"action": "api_key_unverifiable", **extra},
            )
        elif previous != KEY_UNREACHABLE:
            log.warning(
                "%s; %s; checking again in %.0fs",
                verdict.reason,
                "sending goes on with the key verified before"
                if trusted and was_trusted
                else "nothing is sent until the key verifies",
                next_in,
                extra={"action": "api_key_unreachable", **extra},
            )

    def close(self) -> None:
        """Close the checker's HTTP session."""
        if self._checker is not None:
            self._checker.close()


def build_key_gate(settings: Settings) -> KeyGate:
    """The gate the settings ask for; turning the check off for PostHog is announced."""
    host = settings.posthog_host
    common: dict[str, Any] = {
        "host": host,
        "interval": settings.key_check_interval,
        "retry_delay": settings.unauthorized_pause,
    }
    if settings.sink_name != "posthog" or not settings.posthog_api_key:
        return KeyGate(None, **common)  # not sending to PostHog: no key to check
    if not settings.verify_api_key:
        log.warning(
            "POSTHOG_API_KEY is not verified (%s): if PostHog at %s does not know the key, "
            "capture still answers 200 and drops the events",
            _SETTING,
            public_host(host),
            extra={"action": "api_key_check_off", "host": public_host(host)},
        )
        return KeyGate(None, off_reason=f"the key is not verified ({_SETTING})", **common)
    checker = KeyChecker(settings.posthog_api_key, host, timeout=settings.request_timeout)
    return KeyGate(checker, **common)


class KeyStateMetric:
    """``outbox_api_key_state``: 1 for the key check's current state, 0 for the others."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.gauge = Gauge(
            "outbox_api_key_state",
            "1 for the API key check's current state (unchecked, verified, rejected, "
            "unverifiable, unreachable, off), 0 for the others.",
            ["state"],
            registry=registry,
        )
        self.set(KEY_UNCHECKED)

    def set(self, state: str) -> None:
        """Mark ``state`` as the current one."""
        for s in KEY_STATES:
            self.gauge.labels(s).set(1 if s == state else 0)
