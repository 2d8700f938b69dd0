"""The worker's settings: one object, named defaults, environment read in one place.

Precedence: an explicit argument or CLI flag, then the environment variable, then
the default below. :data:`ENVIRONMENT` lists every variable once: its field, the
values it accepts (a :class:`Spec`: for a number, its range and the reason for it),
its flag and what it means. Parsing, validation, the one-line errors, the CLI flags
and their help, and the README's configuration tables (kept in step by a test) all
come from that one declaration.

A new setting is a field on :class:`Settings` plus one :class:`EnvVar` line, e.g.
``EnvVar("OUTBOX_X", "x", Seconds(0, 60, "why"), "What it does.")``. A
:class:`Settings` is validated whenever it is built (from the environment, by
``Settings(...)`` or ``with_overrides``), so a worker never holds a value it cannot
use: every number finite and in its range, every name one of its choices, every URL
in a shape its client accepts.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from outbox.exceptions import OutboxError
from worker.redaction import mask_url
from worker.terminal import has_control_characters, printable

DEFAULT_POSTHOG_HOST = "https://us.i.posthog.com"
DEFAULT_DATA_DIR = Path(".outbox")
DEFAULT_BATCH_SIZE = 1000
#: PostHog's capture endpoint refuses bodies over 20 MiB; stay well under 5 MiB a request.
DEFAULT_MAX_BATCH_BYTES = 4 * 1024 * 1024
#: Events per batch a tick makes of a big interval (a backlog): 5 chunks of the default
#: batch size, so that a backlog of 10,000 events is already 2 batches, one for each of
#: 2 workers. (A transaction's events are never split: batches are txid ranges.)
DEFAULT_SPLIT_ROWS = 5_000
#: Seconds between polls while LISTEN wakes the worker on commit (the poll is a fallback).
DEFAULT_POLL_INTERVAL = 1.0
#: Seconds between polls without LISTEN (OUTBOX_NOTIFY=0, or behind a pooler): the poll
#: is then how an idle worker finds a new event, so it bounds the latency of sparse
#: events (docs/operations.md, "Behind a connection pooler", has the measurements).
DEFAULT_POLL_ONLY_INTERVAL = 0.1
#: No transaction pooler between the worker and PostgreSQL.
DEFAULT_POOLER = "none"
#: ``transaction``: PgBouncer's pool_mode = transaction, Supabase's pooler, RDS Proxy,
#: Neon's pooler: each transaction may run on another server session.
POOLERS = ("none", "transaction")
DEFAULT_LEASE_SECONDS = 60.0
DEFAULT_MAX_ATTEMPTS = 24
DEFAULT_BACKOFF_BASE = 2.0
DEFAULT_BACKOFF_MAX = 3600.0
DEFAULT_REQUEST_TIMEOUT = 15.0
DEFAULT_DEDUP_WINDOW = 24 * 3600.0
#: Days the delivery ledger keeps (by the UTC day of the events' timestamps).
DEFAULT_LEDGER_RETENTION_DAYS = 90
DEFAULT_SHUTDOWN_GRACE = 10.0
DEFAULT_UNAUTHORIZED_PAUSE = 60.0
DEFAULT_RATE_LIMIT_PAUSE = 10.0
#: A Retry-After longer than this (a proxy can say days) is cut to it, and logged.
DEFAULT_RETRY_AFTER_MAX = 600.0
#: Single-event refusals with the same answer in a row that stop a split batch.
DEFAULT_REJECTION_BREAKER = 3
#: Probes answer on the loopback interface unless OUTBOX_METRICS_HOST opens them.
DEFAULT_METRICS_HOST = "127.0.0.1"
#: How the status page shows distinct ids: ``hashed`` (a keyed hash, the same for the
#: same id while the worker runs) or ``shown`` (as stored: personal data).
STATUS_DISTINCT_IDS = ("hashed", "shown")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Seconds between checks of a verified API key while the worker runs: a key that stops
#: resolving (reset, project deleted) is answered 200 by capture and its events are
#: dropped, for at most this long. worker/keycheck.py explains the choice.
DEFAULT_KEY_CHECK_INTERVAL = 300.0
#: PostHog's capture refuses longer keys (rust/capture/src/token.rs).
MAX_API_KEY_BYTES = 64
#: The app host (where PostHog's API answers) of each PostHog Cloud ingestion host.
CLOUD_APP_HOSTS = {
    "us.i.posthog.com": "https://us.posthog.com",
    "eu.i.posthog.com": "https://eu.posthog.com",
}
#: PostHog's project ids are Django AutoFields: PostgreSQL integers.
MAX_PROJECT_ID = 2**31 - 1


class SettingsError(OutboxError):
    """A setting has a value the worker cannot use.

    ``setting`` names it as the operator wrote it: the variable (``OUTBOX_BATCH_SIZE``)
    or the flag (``--batch-size``). The message is one line and shows no secret.
    """

    def __init__(self, message: str, *, setting: str) -> None:
        self.setting = setting
        super().__init__(message)


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the worker process can be told. Every field has a named default.

    Building one validates every field (see :data:`ENVIRONMENT` for the ranges) and
    raises :class:`SettingsError` naming the first variable out of range. ``repr``
    shows the database URL with its password masked and never the API key.
    """

    #: libpq URL of the database (``postgresql+psycopg://`` accepted). None: embedded PostgreSQL.
    database_url: str | None = None
    #: Where the embedded PostgreSQL keeps its data when ``database_url`` is None.
    data_dir: Path = DEFAULT_DATA_DIR
    #: PostHog project API key. None: events go to the stdout sink instead.
    posthog_api_key: str | None = field(default=None, repr=False)
    #: PostHog ingestion host.
    posthog_host: str = DEFAULT_POSTHOG_HOST
    #: PostHog personal API key (``phx_...``, scope ``query:read``) for ``reconcile``.
    posthog_personal_api_key: str | None = field(default=None, repr=False)
    #: The PostHog project ``reconcile`` asks (its id, in the project's settings).
    posthog_project_id: int | None = None
    #: Where PostHog's API answers. None: derived from ``posthog_host``, see
    #: :attr:`app_host`.
    posthog_app_host: str | None = None
    #: ``posthog``, ``stdout`` or ``auto`` (posthog when a key is set, else stdout).
    sink: str = "auto"
    #: ``direct`` (the stored JSON, posted as is), ``posthog`` (posthog.request.batch_post)
    #: or ``v1`` (capture v1, ``/i/v1/analytics/events``, answered per event).
    posthog_transport: str = "direct"
    #: Gzip request bodies.
    gzip: bool = True
    #: Most events claimed and sent in one batch.
    batch_size: int = DEFAULT_BATCH_SIZE
    #: Most bytes of event JSON in one request.
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    #: About how many events a tick puts in each batch when it splits a big interval
    #: (by transaction id ranges): the unit workers share a backlog in.
    split_rows: int = DEFAULT_SPLIT_ROWS
    #: ``none``, or ``transaction`` when a transaction pooler (PgBouncer in transaction
    #: mode and alike) stands between the worker and PostgreSQL: the worker then
    #: prepares no statement and does not LISTEN.
    pooler: str = DEFAULT_POOLER
    #: LISTEN for the producers' NOTIFY to drain at once; off: poll only. None (the
    #: default): on, except behind a pooler. See :attr:`listen`.
    notify: bool | None = None
    #: Seconds between polls for due events when idle. None (the default):
    #: ``DEFAULT_POLL_INTERVAL`` while the worker LISTENs, else
    #: ``DEFAULT_POLL_ONLY_INTERVAL``. See :attr:`poll_seconds`.
    poll_interval: float | None = None
    #: Seconds a claimed batch belongs to its worker (its lease, a row in the
    #: database); then other workers may take it and its outcome is not written.
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    #: Failed attempts after which an event becomes ``dead``.
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    #: First retry delay in seconds; doubles per attempt, with jitter.
    backoff_base: float = DEFAULT_BACKOFF_BASE
    #: Longest retry delay in seconds.
    backoff_max: float = DEFAULT_BACKOFF_MAX
    #: Seconds before an HTTP request to the sink times out.
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    #: Seconds a delivered event's dedup key keeps refusing duplicates.
    dedup_window: float = DEFAULT_DEDUP_WINDOW
    #: Days of the delivery ledger (``outbox_ledger``) housekeeping keeps: a day's rows
    #: are deleted once it is more than this many days before today (UTC).
    ledger_retention_days: int = DEFAULT_LEDGER_RETENTION_DAYS
    #: Seconds to finish the in-flight batch after SIGTERM/SIGINT before abandoning it.
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    #: Seconds to pause sending after a 429 that names no Retry-After.
    rate_limit_pause: float = DEFAULT_RATE_LIMIT_PAUSE
    #: Longest pause in seconds a 429's Retry-After may ask for; longer ones are cut.
    retry_after_max: float = DEFAULT_RETRY_AFTER_MAX
    #: Seconds to pause sending after a 401/403, a redirect or a 400 about the request
    #: itself (configuration errors) before trying again.
    unauthorized_pause: float = DEFAULT_UNAUTHORIZED_PAUSE
    #: Single-event 400/413 answers with the same text in a row, while splitting a
    #: refused batch, that stop the split: the endpoint refuses requests, not events,
    #: so the batch is held instead of buried.
    rejection_breaker: int = DEFAULT_REJECTION_BREAKER
    #: Verify the API key with PostHog's ``/flags/`` before sending, and hold every event
    #: while it does not verify; off for proxies that forward only the capture paths.
    verify_api_key: bool = True
    #: Seconds between checks of a verified key while the worker runs.
    key_check_interval: float = DEFAULT_KEY_CHECK_INTERVAL
    #: ``module:attr`` of the application's outbox.EventRegistry, for metrics-only events.
    contract: str | None = None
    #: Prefix of the Prometheus metrics made from metrics-only events.
    metrics_namespace: str = "app"
    #: Port for ``/metrics``, ``/healthz`` and ``/readyz``; None: no HTTP server.
    metrics_port: int | None = None
    #: Address the probe server listens on (loopback unless opened).
    metrics_host: str = DEFAULT_METRICS_HOST
    #: Serve the read-only status page at ``/status`` on the probe server.
    status_page: bool = True
    #: Comma-separated property names whose values the status page shows (``*``: all);
    #: None (the default): no property value, only their names.
    status_properties: str | None = None
    #: ``hashed`` or ``shown``: how the status page shows distinct ids.
    status_distinct_ids: str = "hashed"
    #: This worker's name in logs and in pg_stat_activity (``outbox-worker status``).
    worker_id: str = field(default_factory=_default_worker_id)
    #: Log level name.
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in validate(values).items():
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value is not None:
                shown.append(f"{f.name}='***'")
            elif f.name in _URL_FIELDS and isinstance(value, str):
                shown.append(f"{f.name}={mask_url(value)!r}")
            else:
                shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    def check(self) -> None:
        """Raise :class:`SettingsError` naming the first setting out of range (a built
        :class:`Settings` has passed this already)."""
        validate({f.name: getattr(self, f.name) for f in fields(self)})

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given fields replaced; ``None`` values are ignored."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def listen(self) -> bool:
        """Whether the worker LISTENs for NOTIFY: never behind a transaction pooler
        (which cannot keep a LISTEN session), else unless ``notify`` is off."""
        return self.pooler == "none" and self.notify is not False

    @property
    def poll_seconds(self) -> float:
        """The poll interval in effect (``poll_interval``, or its default for the mode)."""
        if self.poll_interval is not None:
            return self.poll_interval
        return DEFAULT_POLL_INTERVAL if self.listen else DEFAULT_POLL_ONLY_INTERVAL

    @property
    def app_host(self) -> str:
        """The host of PostHog's API (``reconcile`` asks it): ``posthog_app_host``, else
        the app host of a PostHog Cloud ingestion host (``https://us.i.posthog.com`` ->
        ``https://us.posthog.com``, the same for ``eu``), else ``posthog_host`` itself
        (self-hosted PostHog answers both on one host)."""
        if self.posthog_app_host is not None:
            return self.posthog_app_host.rstrip("/")
        return app_host_for(self.posthog_host)

    @property
    def sink_name(self) -> str:
        """The sink in effect once ``auto`` is resolved."""
        if self.sink != "auto":
            return self.sink
        return "posthog" if self.posthog_api_key else "stdout"

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        flags: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Settings from the environment, with CLI flags and explicit overrides on top.

        ``flags`` (by field name) are values the operator gave as flags: an error about
        one names the flag instead of the variable. ``None`` values are ignored.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        labels: dict[str, str] = {}
        for var in ENVIRONMENT:
            raw = env.get(var.name)
            if raw is None or raw.strip() == "":
                continue
            values[var.field] = var.read(raw)
        for name, value in (flags or {}).items():
            if value is not None:
                values[name] = value
                flag = _BY_FIELD[name].flag if name in _BY_FIELD else None
                if flag:
                    labels[name] = flag
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - set(_DEFAULTS))
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(unknown)}")
        # Check with the labels the operator used, then build (which checks again).
        validate({**{k: d() for k, d in _DEFAULTS.items() if k not in values}, **values}, labels)
        return cls(**values)


def app_host_for(ingestion_host: str) -> str:
    """The app host of ``ingestion_host``: see :attr:`Settings.app_host`."""
    try:
        hostname = (urlsplit(ingestion_host.strip()).hostname or "").lower()
    except ValueError:
        hostname = ""
    return CLOUD_APP_HOSTS.get(hostname, ingestion_host.strip().rstrip("/"))


def personal_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a PostHog personal API key by its shape, or None (the
    answer never contains the key)."""
    kinds = {"phc_": "a project API key (phc_...)", "phs_": "a project secret API key (phs_...)"}
    kind = kinds.get(key[:4])
    if kind is not None:
        return (
            f"is {kind}: reconcile needs a personal API key (phx_...) with the "
            "query:read scope, from your PostHog user settings"
        )
    if not key.isascii() or any(c.isspace() for c in key):
        return "is not a personal API key: it has spaces or characters that are not ASCII"
    return None


def api_key_problem(key: str) -> str | None:
    """Why PostHog's capture would refuse ``key`` by its shape alone, or None.

    The same checks, in the same order, as ``validate_token`` in PostHog's
    rust/capture/src/token.rs (after its trim); the answer never contains the key.
    """
    key = key.strip()
    if not key:
        return "is empty"
    if len(key.encode()) > MAX_API_KEY_BYTES:
        return f"is longer than {MAX_API_KEY_BYTES} bytes: it is not a project API key"
    if not key.isascii():
        return "has characters that are not ASCII: it is not a project API key"
    if key.startswith("phx_"):
        return (
            "is a personal API key (phx_...): the worker needs the project API key "
            "(phc_...), from your PostHog project's settings"
        )
    if "\0" in key:
        return "contains a NUL character"
    return None


# -- what a variable accepts ------------------------------------------------------------


class Spec(Protocol):
    """What one setting accepts: how to read it from text, and how to check a value."""

    @property
    def why(self) -> str:
        """Why these values (for a number: why this range). Shown in errors and docs."""
        ...

    def parse(self, raw: str) -> Any:
        """The value of the variable's text; ValueError (a reason) if unreadable."""
        ...

    def check(self, value: Any) -> Any:
        """``value`` (normalised) if usable, else ValueError with a one-line reason."""
        ...

    def describe(self) -> str:
        """The accepted values, as the docs show them (e.g. ``1 to 100000``)."""
        ...


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True, slots=True)
class Number:
    """A finite number from ``low`` to ``high`` inclusive (a whole one with ``whole``)."""

    low: float
    high: float
    why: str
    whole: bool = False
    unit: str = ""

    def parse(self, raw: str) -> Any:
        """Read an integer (``whole``) or a decimal number."""
        try:
            return int(raw) if self.whole else float(raw)
        except ValueError:
            kind = "a whole number" if self.whole else "a number"
            raise ValueError(f"is not {kind}; expected {self.describe()}") from None

    def check(self, value: Any) -> Any:
        """Finite, of the right kind, and in range."""
        ok_kind = isinstance(value, int) if self.whole else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_kind:
            kind = "a whole number" if self.whole else "a number"
            raise ValueError(f"must be {kind}, got {type(value).__name__}")
        if not self.whole:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"must be a finite number from {self.describe()} ({self.why})")
        if not self.low <= value <= self.high:
            raise ValueError(f"must be from {self.describe()} ({self.why})")
        return value

    def describe(self) -> str:
        """``low to high unit``."""
        return f"{_number(self.low)} to {_number(self.high)}{self.unit}"


def Seconds(low: float, high: float, why: str) -> Number:
    """A duration in seconds from ``low`` to ``high``."""
    return Number(low, high, why, unit=" s")


def Count(low: int, high: int, why: str) -> Number:
    """A whole number from ``low`` to ``high``."""
    return Number(low, high, why, whole=True)


@dataclass(frozen=True, slots=True)
class Choice:
    """One of ``options`` (read case-insensitively)."""

    options: tuple[str, ...]
    why: str = ""

    def parse(self, raw: str) -> str:
        """The option this text names, whatever its case."""
        for option in self.options:
            if raw.lower() == option.lower():
                return option
        raise ValueError(f"is not one of {self.describe()}")

    def check(self, value: Any) -> str:
        """One of the options, in their own case."""
        if isinstance(value, str):
            for option in self.options:
                if value.lower() == option.lower():
                    return option
        raise ValueError(f"must be one of {self.describe()}")

    def describe(self) -> str:
        """``a, b or c``."""
        return ", ".join(self.options[:-1]) + " or " + self.options[-1]


@dataclass(frozen=True, slots=True)
class Switch:
    """On or off."""

    why: str = ""

    def parse(self, raw: str) -> bool:
        """1/0, true/false, yes/no or on/off."""
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"is not {self.describe()}")

    def check(self, value: Any) -> bool:
        """A bool."""
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {type(value).__name__}")
        return value

    def describe(self) -> str:
        """The spellings accepted."""
        return "1/0, true/false, yes/no or on/off"


@dataclass(frozen=True, slots=True)
class Text:
    """Printable text of at most ``max_length`` characters, matching ``pattern``."""

    why: str
    max_length: int = 200
    pattern: str | None = None
    ascii_only: bool = False
    #: Never echo the value in an error (an API key).
    secret: bool = False

    def parse(self, raw: str) -> str:
        """The text as is (the caller strips it)."""
        return raw

    def check(self, value: Any) -> str:
        """Text that is printable, not too long, and matches."""
        if not isinstance(value, str):
            raise ValueError(f"must be text, got {type(value).__name__}")
        if not value:
            raise ValueError("must not be empty")
        if len(value) > self.max_length:
            raise ValueError(f"is {len(value)} characters long, over {self.max_length}")
        if self.ascii_only and not value.isascii():
            raise ValueError(f"must be ASCII ({self.why})")
        if has_control_characters(value):
            raise ValueError("contains control characters")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise ValueError(f"is not {self.why}")
        return value

    def describe(self) -> str:
        """What the text must be."""
        return self.why


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """A URL or key=value string libpq can connect with (checked before connecting)."""

    why: str = "libpq refuses anything else, and would refuse it only when connecting"
    secret: bool = True

    def parse(self, raw: str) -> str:
        """The URL as written."""
        return raw

    def check(self, value: Any) -> str:
        """See :func:`worker.database.check_database_url`."""
        from worker.database import check_database_url

        if not isinstance(value, str):
            raise ValueError(f"must be text, got {type(value).__name__}")
        return check_database_url(value)

    def describe(self) -> str:
        """The shapes accepted."""
        return "postgresql://..., postgres://..., postgresql+psycopg://... or libpq key=value"


@dataclass(frozen=True, slots=True)
class HttpUrl:
    """An ``http://`` or ``https://`` URL with a host."""

    why: str = "the sink posts to it with requests"
    secret: bool = True  # it could carry user:password@; shown masked

    def parse(self, raw: str) -> str:
        """The URL as written."""
        return raw

    def check(self, value: Any) -> str:
        """A URL with an http(s) scheme and a host."""
        if not isinstance(value, str):
            raise ValueError(f"must be text, got {type(value).__name__}")
        shown = printable(mask_url(value))
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise ValueError(f"is not a URL: {shown}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {shown}")
        if has_control_characters(value) or " " in value:
            raise ValueError(f"contains spaces or control characters: {shown}")
        return value

    def describe(self) -> str:
        """The shapes accepted."""
        return "an http:// or https:// URL"


@dataclass(frozen=True, slots=True)
class FilePath:
    """A file system path."""

    why: str = ""

    def parse(self, raw: str) -> Path:
        """The path."""
        return Path(raw)

    def check(self, value: Any) -> Path:
        """A Path (text is turned into one)."""
        if isinstance(value, str) and value:
            value = Path(value)
        if not isinstance(value, Path):
            raise ValueError(f"must be a path, got {type(value).__name__}")
        return value

    def describe(self) -> str:
        """Any path."""
        return "a directory"


@dataclass(frozen=True, slots=True)
class _Unchecked:
    """A variable declared with a bare parser (``float``) instead of a :class:`Spec`.
    It is still kept finite, but has no range: a test lists such variables."""

    reader: Callable[[str], Any]
    why: str = "no range declared"

    def parse(self, raw: str) -> Any:
        return self.reader(raw)

    def check(self, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def describe(self) -> str:
        return "(no range declared)"


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One environment variable the worker reads (and its flag, if it has one)."""

    name: str
    field: str
    spec: Spec | Callable[[str], Any]
    help: str
    #: The command-line flag that sets the same field (``run`` has them, except
    #: ``--database-url`` and ``--log-level``, which every command takes).
    flag: str | None = None

    @property
    def accepts(self) -> Spec:
        """The :class:`Spec` (a bare parser is wrapped, without a range)."""
        spec = self.spec
        if hasattr(spec, "check") and hasattr(spec, "describe"):
            return spec  # type: ignore[return-value]
        return _Unchecked(spec)

    @property
    def secret(self) -> bool:
        """Whether the value is never echoed as written."""
        return bool(getattr(self.accepts, "secret", False))

    def read(self, raw: str, label: str | None = None) -> Any:
        """Parse and check the variable's text; :class:`SettingsError` naming
        ``label`` (default: the variable) if the worker cannot use it."""
        label = label or self.name
        text = raw.strip()
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise SettingsError(f"{label} is not valid UTF-8", setting=label) from None
        spec = self.accepts
        try:
            return spec.check(spec.parse(text))
        except (TypeError, ValueError) as exc:
            raise SettingsError(self._message(label, text, exc), setting=label) from None

    def _message(self, label: str, value: object, exc: BaseException) -> str:
        reason = " ".join(str(exc).split())
        if self.secret:
            return f"{label} {reason}"
        shown = value if isinstance(value, str) else repr(value)
        return f"{label}={printable(shown, 60)} {reason}"

    @property
    def default(self) -> str:
        """The default as it reads in the docs."""
        if self.field == "worker_id":
            return "hostname:pid"
        if self.field == "database_url":
            return "(embedded PostgreSQL in OUTBOX_DATA_DIR)"
        if self.field == "posthog_api_key":
            return "(unset: stdout sink)"
        if self.field == "posthog_app_host":
            return "(unset: derived from POSTHOG_HOST)"
        if self.field == "notify":
            return "(unset: 1, or 0 with OUTBOX_POOLER=transaction)"
        if self.field == "poll_interval":
            return (
                f"(unset: {DEFAULT_POLL_INTERVAL}, or {DEFAULT_POLL_ONLY_INTERVAL} without LISTEN)"
            )
        value = _FIELDS[self.field].default
        if value is None:
            return "(unset)"
        if isinstance(value, bool):
            return "1" if value else "0"
        return str(value)


_SECONDS_PAUSE = (
    "a deferred event's next attempt is now() plus the pause, in PostgreSQL; a day at most"
)

ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar(
        "DATABASE_URL",
        "database_url",
        DatabaseUrl(),
        "PostgreSQL URL (libpq or postgresql+psycopg).",
        flag="--database-url",
    ),
    EnvVar("OUTBOX_DATA_DIR", "data_dir", FilePath(), "Data directory of the embedded PostgreSQL."),
    EnvVar(
        "POSTHOG_API_KEY",
        "posthog_api_key",
        Text("a PostHog project API key", max_length=1000, secret=True),
        "PostHog project API key.",
    ),
    EnvVar("POSTHOG_HOST", "posthog_host", HttpUrl(), "PostHog ingestion host."),
    EnvVar(
        "OUTBOX_POSTHOG_PERSONAL_API_KEY",
        "posthog_personal_api_key",
        Text("a PostHog personal API key", max_length=1000, secret=True),
        "PostHog personal API key (query:read) for reconcile.",
    ),
    EnvVar(
        "OUTBOX_POSTHOG_PROJECT_ID",
        "posthog_project_id",
        Count(1, MAX_PROJECT_ID, "PostHog's project ids are positive PostgreSQL integers"),
        "PostHog project id for reconcile.",
    ),
    EnvVar(
        "OUTBOX_POSTHOG_APP_HOST",
        "posthog_app_host",
        HttpUrl("reconcile posts PostHog's query API to it with requests"),
        "PostHog app host (its API) for reconcile.",
    ),
    EnvVar(
        "OUTBOX_SINK",
        "sink",
        Choice(("auto", "posthog", "stdout")),
        "auto, posthog or stdout.",
        flag="--sink",
    ),
    EnvVar(
        "OUTBOX_POSTHOG_TRANSPORT",
        "posthog_transport",
        Choice(("direct", "posthog", "v1")),
        "direct, posthog for posthog.request.batch_post, or v1 for capture v1.",
    ),
    EnvVar("OUTBOX_GZIP", "gzip", Switch(), "Gzip request bodies (0 to turn off)."),
    EnvVar(
        "OUTBOX_BATCH_SIZE",
        "batch_size",
        Count(1, 100_000, "a batch is read into memory at once and sent within half its lease"),
        "Most events per batch.",
        flag="--batch-size",
    ),
    EnvVar(
        "OUTBOX_MAX_BATCH_BYTES",
        "max_batch_bytes",
        Count(1024, 20 * 1024 * 1024, "PostHog's capture endpoint refuses bodies over 20 MiB"),
        "Most bytes of events per request.",
    ),
    EnvVar(
        "OUTBOX_SPLIT_ROWS",
        "split_rows",
        Count(
            100,
            10_000_000,
            "a tick writes one batch row per this many events of a backlog, and one batch "
            "is one worker's at a time",
        ),
        "About how many events a tick puts in each batch of a backlog.",
    ),
    EnvVar(
        "OUTBOX_POOLER",
        "pooler",
        Choice(POOLERS),
        "none, or transaction behind PgBouncer transaction pooling and alike.",
        flag="--pooler",
    ),
    EnvVar("OUTBOX_NOTIFY", "notify", Switch(), "LISTEN for commits (0: poll only)."),
    EnvVar(
        "OUTBOX_POLL_INTERVAL",
        "poll_interval",
        Seconds(
            0.01, 3600, "APScheduler needs a finite, positive interval; under 10 ms is a busy loop"
        ),
        "Seconds between polls when idle.",
        flag="--poll-interval",
    ),
    EnvVar(
        "OUTBOX_LEASE_SECONDS",
        "lease_seconds",
        Seconds(
            1,
            86400,
            "the batch of a worker that died waits this long for another worker: a day at most",
        ),
        "Seconds a claimed batch is held.",
        flag="--lease-seconds",
    ),
    EnvVar(
        "OUTBOX_MAX_ATTEMPTS",
        "max_attempts",
        Count(
            1, 1000, "the attempts column is an integer; 1000 tries an hour apart take six weeks"
        ),
        "Failed attempts before an event is dead.",
        flag="--max-attempts",
    ),
    EnvVar(
        "OUTBOX_BACKOFF_BASE",
        "backoff_base",
        Seconds(
            0,
            86400,
            "the first retry delay, added to now() as a PostgreSQL interval; a day at most",
        ),
        "First retry delay (seconds).",
        flag="--backoff-base",
    ),
    EnvVar(
        "OUTBOX_BACKOFF_MAX",
        "backoff_max",
        Seconds(
            0.001,
            604800,
            "no retry is more than a week away; an event that needs longer is better dead",
        ),
        "Longest retry delay (seconds).",
        flag="--backoff-max",
    ),
    EnvVar(
        "OUTBOX_REQUEST_TIMEOUT",
        "request_timeout",
        Seconds(
            0.1,
            3600,
            "the requests library needs a finite, positive timeout; an hour is a hung server",
        ),
        "HTTP timeout (seconds).",
    ),
    EnvVar(
        "OUTBOX_DEDUP_WINDOW",
        "dedup_window",
        Seconds(
            0,
            366 * 86400,
            "each key is a row kept that long, expiring at now() plus a PostgreSQL interval; "
            "366 days at most",
        ),
        "Seconds a delivered dedup key holds.",
    ),
    EnvVar(
        "OUTBOX_LEDGER_RETENTION_DAYS",
        "ledger_retention_days",
        Count(
            1,
            36500,
            "a day's counts are a few rows per event name, deleted once the day is this "
            "old; a century at most, as PostgreSQL date arithmetic and purge allow",
        ),
        "Days of the delivery ledger kept.",
    ),
    EnvVar(
        "OUTBOX_SHUTDOWN_GRACE",
        "shutdown_grace",
        Seconds(
            0,
            3600,
            "a finite wait; orchestrators stop waiting far sooner (Kubernetes: 30 s by default)",
        ),
        "Seconds to finish after SIGTERM.",
    ),
    EnvVar(
        "OUTBOX_RATE_LIMIT_PAUSE",
        "rate_limit_pause",
        Seconds(0, 86400, _SECONDS_PAUSE),
        "Pause after a 429 with no Retry-After.",
    ),
    EnvVar(
        "OUTBOX_RETRY_AFTER_MAX",
        "retry_after_max",
        Seconds(0.1, 86400, _SECONDS_PAUSE),
        "Longest pause a 429's Retry-After may ask for.",
    ),
    EnvVar(
        "OUTBOX_UNAUTHORIZED_PAUSE",
        "unauthorized_pause",
        Seconds(0, 86400, _SECONDS_PAUSE),
        "Pause after a 401/403, a redirect or a 400 about the request.",
    ),
    EnvVar(
        "OUTBOX_VERIFY_API_KEY",
        "verify_api_key",
        Switch(),
        "Verify the key with PostHog's /flags/ before sending (0: off).",
    ),
    EnvVar(
        "OUTBOX_KEY_CHECK_INTERVAL",
        "key_check_interval",
        Seconds(
            0.1,
            86400,
            "a key that stops resolving is answered 200 and its events dropped for up to "
            "this long; a check is one unbilled request",
        ),
        "Seconds between checks of a verified key.",
    ),
    EnvVar(
        "OUTBOX_REJECTION_BREAKER",
        "rejection_breaker",
        Count(
            2,
            1000,
            "one refusal is a poison event, not a pattern; past a thousand the split "
            "runs out of its half lease first",
        ),
        "Same-answer single-event refusals in a row that hold a split batch.",
    ),
    EnvVar(
        "OUTBOX_CONTRACT",
        "contract",
        Text("module:attr", pattern=r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*"),
        "module:attr of the app's EventRegistry.",
    ),
    EnvVar(
        "OUTBOX_METRICS_NAMESPACE",
        "metrics_namespace",
        Text("a Prometheus name prefix ([a-zA-Z_][a-zA-Z0-9_]*)", 100, r"[a-zA-Z_][a-zA-Z0-9_]*"),
        "Prefix of metrics-only metrics.",
    ),
    EnvVar(
        "OUTBOX_METRICS_PORT",
        "metrics_port",
        Count(0, 65535, "a TCP port; 0 picks a free one"),
        "Port for /metrics and probes.",
        flag="--metrics-port",
    ),
    EnvVar(
        "OUTBOX_METRICS_HOST",
        "metrics_host",
        Text("a host name or IP address", 253, r"[A-Za-z0-9._:%-]+"),
        "Address the probes listen on (0.0.0.0: all).",
        flag="--metrics-host",
    ),
    EnvVar(
        "OUTBOX_STATUS_PAGE",
        "status_page",
        Switch(),
        "Serve the status page at /status (0: off).",
        flag="--status-page",
    ),
    EnvVar(
        "OUTBOX_STATUS_PROPERTIES",
        "status_properties",
        Text(
            "comma-separated property names, or * for all",
            1000,
            r"\*|[^,]*[^,\s][^,]*(,[^,]*[^,\s][^,]*)*",
        ),
        "Property names whose values the status page shows.",
        flag="--status-properties",
    ),
    EnvVar(
        "OUTBOX_STATUS_DISTINCT_IDS",
        "status_distinct_ids",
        Choice(STATUS_DISTINCT_IDS),
        "hashed or shown: distinct ids on the status page.",
        flag="--status-distinct-ids",
    ),
    EnvVar(
        "OUTBOX_WORKER_ID",
        "worker_id",
        Text("printable ASCII, as PostgreSQL keeps in application_name", ascii_only=True),
        "Name in logs and pg_stat_activity.",
    ),
    EnvVar(
        "OUTBOX_LOG_LEVEL",
        "log_level",
        Choice(LOG_LEVELS),
        "DEBUG, INFO, WARNING, ERROR or CRITICAL.",
        flag="--log-level",
    ),
)

_FIELDS = {f.name: f for f in fields(Settings)}
_BY_FIELD = {var.field: var for var in ENVIRONMENT}
_SECRET_FIELDS = frozenset({"posthog_api_key", "posthog_personal_api_key"})
_URL_FIELDS = frozenset({"database_url", "posthog_host", "posthog_app_host"})


def _default_of(f: Any) -> Callable[[], Any]:
    if f.default_factory is not MISSING:
        return f.default_factory  # type: ignore[no-any-return]
    return lambda: f.default


_DEFAULTS: dict[str, Callable[[], Any]] = {name: _default_of(f) for name, f in _FIELDS.items()}


def variable_for(field_name: str) -> str:
    """The environment variable of a :class:`Settings` field."""
    var = _BY_FIELD.get(field_name)
    return var.name if var is not None else field_name


# -- rules between settings -------------------------------------------------------------


def _lease_rule(values: Mapping[str, Any], label: Callable[[str], str]) -> str | None:
    lease, timeout = values["lease_seconds"], values["request_timeout"]
    if lease > 2 * timeout:
        return None
    return (
        f"{label('lease_seconds')} ({_number(lease)} s) must be more than twice "
        f"{label('request_timeout')} ({_number(timeout)} s): a request started at half "
        "the lease must end before the lease does, or the batch is sent again"
    )


def _sink_rule(values: Mapping[str, Any], label: Callable[[str], str]) -> str | None:
    if values["sink"] == "posthog" and not values["posthog_api_key"]:
        return f"{label('sink')}=posthog needs POSTHOG_API_KEY"
    return None


def _api_key_rule(values: Mapping[str, Any], label: Callable[[str], str]) -> str | None:
    key = values["posthog_api_key"]
    sink = values["sink"]
    if key is None or sink == "stdout":
        return None
    problem = api_key_problem(key)
    return f"POSTHOG_API_KEY {problem}" if problem else None


def _personal_key_rule(values: Mapping[str, Any], label: Callable[[str], str]) -> str | None:
    key = values["posthog_personal_api_key"]
    problem = None if key is None else personal_key_problem(key)
    return f"{label('posthog_personal_api_key')} {problem}" if problem else None


#: Checks across settings: (the field an error is reported under, the check).
RULES: tuple[tuple[str, Callable[[Mapping[str, Any], Callable[[str], str]], str | None]], ...] = (
    ("lease_seconds", _lease_rule),
    ("sink", _sink_rule),
    ("posthog_api_key", _api_key_rule),
    ("posthog_personal_api_key", _personal_key_rule),
)


def validate(values: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Check every field of ``values`` (a complete set of :class:`Settings` fields) and
    the rules between them; return the fields whose value was normalised (``"debug"``
    becomes ``"DEBUG"``, ``60`` becomes ``60.0``). Raises :class:`SettingsError`
    naming the first value the worker cannot use, as ``labels`` (field to flag) or
    the variable names it."""
    labels = labels or {}

    def label(name: str) -> str:
        return labels.get(name) or variable_for(name)

    changed: dict[str, Any] = {}
    for name, value in values.items():
        var = _BY_FIELD.get(name)
        if var is None:
            continue
        if value is None:
            if _FIELDS[name].default is None:
                continue
            raise SettingsError(f"{label(name)} must be set", setting=label(name))
        try:
            checked = var.accepts.check(value)
        except (TypeError, ValueError) as exc:
            raise SettingsError(
                var._message(label(name), value, exc), setting=label(name)
            ) from None
        if type(checked) is not type(value) or checked != value:
            changed[name] = checked
    merged = {**values, **changed}
    for name, rule in RULES:
        problem = rule(merged, label)
        if problem:
            raise SettingsError(problem, setting=label(name))
    return changed
