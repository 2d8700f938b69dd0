"""The worker's settings: one object, named defaults, environment read in one place.

Precedence: an explicit argument or CLI flag, then the environment variable, then
the default below. :data:`ENVIRONMENT` lists every variable, its default and what it
means; the README's configuration table and ``outbox-worker --help`` are built from
the same facts (a test keeps the README in step).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from outbox.exceptions import OutboxError

DEFAULT_POSTHOG_HOST = "https://us.i.posthog.com"
DEFAULT_DATA_DIR = Path(".outbox")
DEFAULT_BATCH_SIZE = 1000
#: PostHog's capture endpoint refuses bodies over 20 MiB; stay well under 5 MiB a request.
DEFAULT_MAX_BATCH_BYTES = 4 * 1024 * 1024
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_LEASE_SECONDS = 60.0
DEFAULT_MAX_ATTEMPTS = 24
DEFAULT_BACKOFF_BASE = 2.0
DEFAULT_BACKOFF_MAX = 3600.0
DEFAULT_REQUEST_TIMEOUT = 15.0
DEFAULT_DEDUP_WINDOW = 24 * 3600.0
DEFAULT_SHUTDOWN_GRACE = 10.0
DEFAULT_UNAUTHORIZED_PAUSE = 60.0
DEFAULT_RATE_LIMIT_PAUSE = 10.0
#: A Retry-After longer than this (a proxy can say days) is cut to it, and logged.
DEFAULT_RETRY_AFTER_MAX = 600.0
#: Single-event refusals with the same answer in a row that stop a split batch.
DEFAULT_REJECTION_BREAKER = 3


class SettingsError(OutboxError):
    """A setting has a value the worker cannot use."""


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the worker process can be told. Every field has a named default."""

    #: libpq URL of the database (``postgresql+psycopg://`` accepted). None: embedded PostgreSQL.
    database_url: str | None = None
    #: Where the embedded PostgreSQL keeps its data when ``database_url`` is None.
    data_dir: Path = DEFAULT_DATA_DIR
    #: PostHog project API key. None: events go to the stdout sink instead.
    posthog_api_key: str | None = field(default=None, repr=False)
    #: PostHog ingestion host.
    posthog_host: str = DEFAULT_POSTHOG_HOST
    #: ``posthog``, ``stdout`` or ``auto`` (posthog when a key is set, else stdout).
    sink: str = "auto"
    #: ``direct`` (the stored JSON, posted as is) or ``posthog`` (posthog.request.batch_post).
    posthog_transport: str = "direct"
    #: Gzip request bodies.
    gzip: bool = True
    #: Most events claimed and sent in one batch.
    batch_size: int = DEFAULT_BATCH_SIZE
    #: Most bytes of event JSON in one request.
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    #: LISTEN for the producers' NOTIFY to drain at once; off: poll only (PgBouncer).
    notify: bool = True
    #: Seconds between polls for due events when idle.
    poll_interval: float = DEFAULT_POLL_INTERVAL
    #: Seconds a worker may sit on a claimed batch without talking to the database;
    #: then the server ends the batch's transaction and other workers may take it.
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
    #: ``module:attr`` of the application's outbox.EventRegistry, for metrics-only events.
    contract: str | None = None
    #: Prefix of the Prometheus metrics made from metrics-only events.
    metrics_namespace: str = "app"
    #: Port for ``/metrics``, ``/healthz`` and ``/readyz``; None: no HTTP server.
    metrics_port: int | None = None
    #: This worker's name in logs and in pg_stat_activity (``outbox-worker status``).
    worker_id: str = field(default_factory=_default_worker_id)
    #: Log level name.
    log_level: str = "INFO"

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given fields replaced; ``None`` values are ignored."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def sink_name(self) -> str:
        """The sink in effect once ``auto`` is resolved."""
        if self.sink != "auto":
            return self.sink
        return "posthog" if self.posthog_api_key else "stdout"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from the environment, with explicit overrides (CLI flags) on top."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for var in ENVIRONMENT:
            raw = env.get(var.name)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[var.field] = var.parse(raw.strip())
            except (TypeError, ValueError) as exc:
                raise SettingsError(f"{var.name}={raw!r} is not valid: {exc}") from exc
        settings = cls(**values).with_overrides(**overrides)
        settings.check()
        return settings

    def check(self) -> None:
        """Raise :class:`SettingsError` naming the first setting out of range."""
        positive = {
            "batch_size": self.batch_size,
            "max_batch_bytes": self.max_batch_bytes,
            "poll_interval": self.poll_interval,
            "lease_seconds": self.lease_seconds,
            "max_attempts": self.max_attempts,
            "backoff_max": self.backoff_max,
            "request_timeout": self.request_timeout,
            "retry_after_max": self.retry_after_max,
        }
        for name, value in positive.items():
            if value <= 0:
                raise SettingsError(f"{_var_for(name)} must be positive, got {value}")
        for name in ("rate_limit_pause", "unauthorized_pause", "shutdown_grace", "dedup_window"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{_var_for(name)} must not be negative")
        if self.rejection_breaker < 2:
            raise SettingsError(
                f"{_var_for('rejection_breaker')} must be at least 2, got {self.rejection_breaker}"
            )
        if self.backoff_base < 0:
            raise SettingsError(f"{_var_for('backoff_base')} must not be negative")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"OUTBOX_METRICS_PORT must be 0 to 65535, got {self.metrics_port}")
        if self.posthog_transport not in ("direct", "posthog"):
            raise SettingsError(
                "OUTBOX_POSTHOG_TRANSPORT must be direct or posthog, "
                f"got {self.posthog_transport!r}"
            )
        if self.sink not in ("auto", "posthog", "stdout"):
            raise SettingsError(f"OUTBOX_SINK must be auto, posthog or stdout, got {self.sink!r}")
        if self.sink == "posthog" and not self.posthog_api_key:
            raise SettingsError("OUTBOX_SINK=posthog needs POSTHOG_API_KEY")


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _port(raw: str) -> int | None:
    port = int(raw)
    if not 0 <= port <= 65535:
        raise ValueError("expected a port number from 0 to 65535")
    return port


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One environment variable the worker reads."""

    name: str
    field: str
    parse: Callable[[str], Any]
    help: str

    @property
    def default(self) -> str:
        """The default as it reads in the docs."""
        defaults = {f.name: f for f in fields(Settings)}
        f = defaults[self.field]
        if self.field == "worker_id":
            return "hostname:pid"
        if self.field == "database_url":
            return "(embedded PostgreSQL in OUTBOX_DATA_DIR)"
        if self.field == "posthog_api_key":
            return "(unset: stdout sink)"
        value = f.default
        if value is None:
            return "(unset)"
        if isinstance(value, bool):
            return "1" if value else "0"
        return str(value)


ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar("DATABASE_URL", "database_url", str, "PostgreSQL URL (libpq or postgresql+psycopg)."),
    EnvVar("OUTBOX_DATA_DIR", "data_dir", Path, "Data directory of the embedded PostgreSQL."),
    EnvVar("POSTHOG_API_KEY", "posthog_api_key", str, "PostHog project API key."),
    EnvVar("POSTHOG_HOST", "posthog_host", str, "PostHog ingestion host."),
    EnvVar("OUTBOX_SINK", "sink", str, "auto, posthog or stdout."),
    EnvVar(
        "OUTBOX_POSTHOG_TRANSPORT",
        "posthog_transport",
        str,
        "direct, or posthog for posthog.request.batch_post.",
    ),
    EnvVar("OUTBOX_GZIP", "gzip", _bool, "Gzip request bodies (0 to turn off)."),
    EnvVar("OUTBOX_BATCH_SIZE", "batch_size", int, "Most events per batch."),
    EnvVar("OUTBOX_MAX_BATCH_BYTES", "max_batch_bytes", int, "Most bytes of events per request."),
    EnvVar("OUTBOX_NOTIFY", "notify", _bool, "LISTEN for commits (0: poll only)."),
    EnvVar("OUTBOX_POLL_INTERVAL", "poll_interval", float, "Seconds between polls when idle."),
    EnvVar("OUTBOX_LEASE_SECONDS", "lease_seconds", float, "Seconds a claimed batch is held."),
    EnvVar("OUTBOX_MAX_ATTEMPTS", "max_attempts", int, "Failed attempts before an event is dead."),
    EnvVar("OUTBOX_BACKOFF_BASE", "backoff_base", float, "First retry delay (seconds)."),
    EnvVar("OUTBOX_BACKOFF_MAX", "backoff_max", float, "Longest retry delay (seconds)."),
    EnvVar("OUTBOX_REQUEST_TIMEOUT", "request_timeout", float, "HTTP timeout (seconds)."),
    EnvVar("OUTBOX_DEDUP_WINDOW", "dedup_window", float, "Seconds a delivered dedup key holds."),
    EnvVar("OUTBOX_SHUTDOWN_GRACE", "shutdown_grace", float, "Seconds to finish after SIGTERM."),
    EnvVar(
        "OUTBOX_RATE_LIMIT_PAUSE",
        "rate_limit_pause",
        float,
        "Pause after a 429 with no Retry-After.",
    ),
    EnvVar(
        "OUTBOX_RETRY_AFTER_MAX",
        "retry_after_max",
        float,
        "Longest pause a 429's Retry-After may ask for.",
    ),
    EnvVar(
        "OUTBOX_UNAUTHORIZED_PAUSE",
        "unauthorized_pause",
        float,
        "Pause after a 401/403, a redirect or a 400 about the request.",
    ),
    EnvVar(
        "OUTBOX_REJECTION_BREAKER",
        "rejection_breaker",
        int,
        "Same-answer single-event refusals in a row that hold a split batch.",
    ),
    EnvVar("OUTBOX_CONTRACT", "contract", str, "module:attr of the app's EventRegistry."),
    EnvVar("OUTBOX_METRICS_NAMESPACE", "metrics_namespace", str, "Prefix of metrics-only metrics."),
    EnvVar("OUTBOX_METRICS_PORT", "metrics_port", _port, "Port for /metrics and probes."),
    EnvVar("OUTBOX_WORKER_ID", "worker_id", str, "Name in logs and pg_stat_activity."),
    EnvVar("OUTBOX_LOG_LEVEL", "log_level", str, "DEBUG, INFO, WARNING or ERROR."),
)


def _var_for(field_name: str) -> str:
    for var in ENVIRONMENT:
        if var.field == field_name:
            return var.name
    return field_name
