"""Prometheus metrics and the probe endpoints (``/metrics``, ``/healthz``, ``/readyz``).

Metric names are part of the interface (dashboards and alerts use them); they are
listed in ``docs/operations.md``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from worker.drain import (
    SINK_OK,
    SINK_STATES,
    Drainer,
    DrainObserver,
    DrainStats,
    Outcome,
)
from worker.store import Backlog, Batch

log = logging.getLogger("outbox.worker")

BACKLOG_STATES = ("pending", "due", "retrying", "dead")


class WorkerMetrics(DrainObserver):
    """The worker's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_shipped = Counter(
            "outbox_events_shipped",
            "Events the sink accepted and the worker deleted; metrics-only events under "
            "sink=metrics.",
            ["sink"],
            registry=r,
        )
        self.events_failed = Counter(
            "outbox_events_failed",
            "Events whose send failed, by reason: transient (network, timeout, 5xx), "
            "rate_limited (429), unauthorized (401/403), redirected (3xx, not followed), "
            "request_rejected (a 400 about the request, or the breaker), rejected "
            "(400/413, the event died), released (a slow batch handed back unsent).",
            ["reason"],
            registry=r,
        )
        self.events_dead = Counter("outbox_events_dead", "Events that became dead.", registry=r)
        self.batches = Counter(
            "outbox_batches",
            "Batches claimed, by result (ok, failed, partial).",
            ["result"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "outbox_batch_duration_seconds",
            "Time to send one claimed batch to the sink (all its requests).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.backlog = Gauge(
            "outbox_backlog_events", "Rows in outbox_events by state.", ["state"], registry=r
        )
        self.oldest_pending = Gauge(
            "outbox_oldest_pending_age_seconds", "Age of the oldest pending event.", registry=r
        )
        self.sink_state = Gauge(
            "outbox_sink_state",
            "1 for the sink's current state, 0 for the others.",
            ["state"],
            registry=r,
        )
        self.database_up = Gauge(
            "outbox_database_up",
            "1 when the last backlog refresh (every 15 s) reached the database, even if "
            "a timeout cut its count short; 0 when it could not connect or the outbox "
            "tables are missing.",
            registry=r,
        )
        self.set_sink_state(SINK_OK)

    # -- DrainObserver ---------------------------------------------------------------

    def batch_sent(self, drainer: Drainer, batch: Batch, outcome: Outcome, seconds: float) -> None:
        """Observe the batch's send time and failure reasons."""
        self.batch_seconds.observe(seconds)
        if outcome.retry:
            self.events_failed.labels("transient").inc(len(outcome.retry))
        if outcome.defer:
            self.events_failed.labels(outcome.defer_reason or "released").inc(len(outcome.defer))
        if outcome.dead:
            self.events_failed.labels("rejected").inc(len(outcome.dead))
        self.set_sink_state(drainer.sink_state)

    def batch_recorded(self, drainer: Drainer, stats: DrainStats) -> None:
        """Count what the batch's outcome wrote."""
        self.events_shipped.labels(drainer.sink.name).inc(stats.shipped - stats.metrics_only)
        if stats.metrics_only:
            self.events_shipped.labels(drainer.metrics_sink.name).inc(stats.metrics_only)
        self.events_dead.inc(stats.dead)
        if stats.interrupted and not stats.shipped:  # the outcome was lost: sent again
            self.batches.labels("failed").inc()
        elif not (stats.retried or stats.deferred or stats.dead):
            self.batches.labels("ok").inc()
        elif stats.shipped:
            self.batches.labels("partial").inc()
        else:
            self.batches.labels("failed").inc()

    # -- refreshed by the housekeeping job -------------------------------------------

    def set_sink_state(self, state: str) -> None:
        """Mark ``state`` as the sink's current one."""
        for s in SINK_STATES:
            self.sink_state.labels(s).set(1 if s == state else 0)

    def set_database_up(self, up: bool) -> None:
        """Whether the database could be reached (``outbox_database_up``)."""
        self.database_up.set(1 if up else 0)

    def set_backlog(self, backlog: Backlog | None) -> None:
        """Publish table counts; None means the database could not be reached."""
        self.set_database_up(backlog is not None)
        if backlog is None:
            return
        for state in BACKLOG_STATES:
            self.backlog.labels(state).set(getattr(backlog, state))
        self.oldest_pending.set(backlog.oldest_pending_age_seconds)


class ProbeServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on a background thread."""

    def __init__(
        self,
        metrics: WorkerMetrics,
        ready: Callable[[], tuple[bool, str]],
        port: int,
        host: str = "0.0.0.0",  # noqa: S104 - probes come from the orchestrator
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(outer.metrics.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    ok, why = outer.ready()
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="outbox-probes", daemon=True
        )

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Start serving."""
        self._thread.start()
        log.info(
            "serving /metrics, /healthz and /readyz on port %d",
            self.port,
            extra={"action": "probes_started", "port": self.port},
        )

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
