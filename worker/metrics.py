"""Prometheus metrics and the probe endpoints (``/metrics``, ``/healthz``, ``/readyz``),
and the server that also answers the status page (``/status``, see
:mod:`worker.statuspage`).

Metric names are part of the interface (dashboards and alerts use them); they are
listed in ``docs/operations.md``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

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
from worker.settings import SettingsError
from worker.storage.base import Backlog, Batch
from worker.terminal import printable

log = logging.getLogger("outbox.worker")

BACKLOG_STATES = ("pending", "due", "retrying", "dead")
_T = TypeVar("_T")


#: The ``reason`` label values of ``outbox_events_failed_total``.
FAILURE_REASONS = (
    "transient",
    "rate_limited",
    "unauthorized",
    "redirected",
    "request_rejected",
    "rejected",
    "released",
)
#: The ``result`` label values of ``outbox_batches_total``.
BATCH_RESULTS = ("ok", "failed", "partial")
#: The label values of ``outbox_ledger_events_total``: every destination an event can
#: have (the event tables' CHECK allows no other), and what the worker's finish counts
#: (``purged`` is counted by ``outbox-worker purge``, another process).
LEDGER_DESTINATIONS = ("posthog", "metrics")
LEDGER_OUTCOMES = ("delivered", "dead")


class WorkerMetrics(DrainObserver):
    """The worker's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_shipped = Counter(
            "outbox_events_shipped",
            "Events the sink accepted and the worker recorded as delivered; metrics-only "
            "events under sink=metrics.",
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
        self.ledger_events = Counter(
            "outbox_ledger_events",
            "Events this worker added to the delivery ledger (outbox_ledger), counted when "
            "the transaction that wrote their outcome committed: by destination (posthog, "
            "metrics) and outcome (delivered, dead).",
            ["destination", "outcome"],
            registry=r,
        )
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
            "outbox_backlog_events",
            "Undelivered events (what the view outbox_events shows) by state.",
            ["state"],
            registry=r,
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
        # Every labelled counter starts with each of its label values at 0, so that
        # rate() and increase() see its first increment (a series that appears at 1
        # has no earlier sample to count it from).
        for reason in FAILURE_REASONS:
            self.events_failed.labels(reason)
        for result in BATCH_RESULTS:
            self.batches.labels(result)
        for destination in LEDGER_DESTINATIONS:
            for what in LEDGER_OUTCOMES:
                self.ledger_events.labels(destination, what)

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
        for destination, what, count in stats.ledger:
            self.ledger_events.labels(destination, what).inc(count)
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


#: Seconds a client has to send its request line and headers.
PROBE_READ_TIMEOUT = 5.0
#: Seconds a client has to take the answer.
PROBE_WRITE_TIMEOUT = 5.0
#: Seconds ``/readyz`` (a database ping) or ``/metrics`` may take before a 503.
PROBE_HANDLER_TIMEOUT = 10.0
#: Connections open at once; past it, the oldest one still sending its request is closed.
PROBE_MAX_CONNECTIONS = 64
#: Threads that answer ``/readyz`` and ``/metrics``; ``/healthz`` needs none.
PROBE_HANDLER_THREADS = 2
#: Longest request line and headers accepted.
PROBE_MAX_REQUEST_BYTES = 8192
#: Headers of the status page: it loads nothing (no script, no outside resource), it
#: is not kept in a cache, and no other site may frame it.
STATUS_PAGE_HEADERS = (
    "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'\r\n"
    "Cache-Control: no-store\r\n"
    "X-Content-Type-Options: nosniff\r\n"
)
_HTML = "text/html; charset=utf-8"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _DaemonPool(Executor):
    """A fixed number of daemon threads: a handler stuck on a database ping can
    neither grow the pool nor hold the process at exit."""

    def __init__(self, threads: int, name: str) -> None:
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            future, call = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:  # handed to the waiting request
                    future.set_exception(exc)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn`` on one of the threads."""
        future: Future[Any] = Future()
        self._work.put((future, lambda: fn(*args, **kwargs)))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Let the threads end once the work queued before this is done."""
        for _ in self._threads:
            self._work.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


class ProbeServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on a background thread.

    It listens on ``host`` (loopback by default: ``OUTBOX_METRICS_HOST`` opens it) and
    binds when built, so a port in use is a :class:`~worker.settings.SettingsError`
    naming ``OUTBOX_METRICS_PORT`` at start. One event-loop thread reads every
    request, with a deadline per connection, and at most ``max_connections`` are
    open: a client that stalls costs a socket for ``read_timeout`` seconds, never a
    thread. ``/healthz`` is answered on the loop itself; ``/readyz`` and ``/metrics``
    run on ``PROBE_HANDLER_THREADS`` threads, so the server never has more than
    ``1 + PROBE_HANDLER_THREADS`` threads, however many clients connect.
    """

    def __init__(
        self,
        metrics: WorkerMetrics,
        ready: Callable[[], tuple[bool, str]],
        port: int,
        host: str = "127.0.0.1",
        *,
        read_timeout: float = PROBE_READ_TIMEOUT,
        write_timeout: float = PROBE_WRITE_TIMEOUT,
        handler_timeout: float = PROBE_HANDLER_TIMEOUT,
        max_connections: int = PROBE_MAX_CONNECTIONS,
        status_page: Callable[[], bytes] | None = None,
    ) -> None:
        """``status_page``, when given, renders the page ``/status`` answers (on a
        handler thread, like ``/metrics``); without it ``/status`` is a 404."""
        self.metrics = metrics
        self.status_page = status_page
        self.ready = ready
        self.host = host
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.handler_timeout = handler_timeout
        self.max_connections = max_connections
        self._socket = bind_probe_socket(host, port)
        self._loop = asyncio.new_event_loop()
        self._stopping: asyncio.Event | None = None
        #: Connections still sending their request, oldest first (the ones to close
        #: when too many are open).
        self._reading: dict[asyncio.StreamWriter, None] = {}
        self._open: set[asyncio.StreamWriter] = set()
        self._pool: _DaemonPool | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-probes", daemon=True)

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        """Start serving."""
        self._pool = _DaemonPool(PROBE_HANDLER_THREADS, "outbox-probes-handler")
        self._thread.start()
        self._started.wait(10)
        log.info(
            "serving /metrics, /healthz and /readyz on %s port %d%s",
            self.host,
            self.port,
            ", and the status page at /status" if self.status_page is not None else "",
            extra={"action": "probes_started", "host": self.host, "port": self.port},
        )

    def stop(self) -> None:
        """Stop serving and close every connection."""
        if self._thread.is_alive():
            stopping = self._stopping
            if stopping is not None:
                self._loop.call_soon_threadsafe(stopping.set)
            self._thread.join(10)
        else:
            self._socket.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # -- the event loop ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(
            self._connection, sock=self._socket, limit=PROBE_MAX_REQUEST_BYTES
        )
        self._started.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for writer in list(self._open):
                writer.transport.abort()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            return
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                writer.transport.abort()  # stalled, gone, or too long: no answer
                return
            finally:
                self._reading.pop(writer, None)
            status, body, content_type, head_only = await self._answer(head)
            response = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"{STATUS_PAGE_HEADERS if content_type == _HTML else ''}"
                "Connection: close\r\n\r\n"
            ).encode("ascii") + (b"" if head_only else body)
            writer.write(response)
            try:
                await asyncio.wait_for(writer.drain(), self.write_timeout)
            except (TimeoutError, ConnectionError):
                writer.transport.abort()
                return
            writer.close()
        except ConnectionError:
            writer.transport.abort()
        finally:
            self._open.discard(writer)

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Count the connection in. At the limit, close the oldest one still sending
        its request to make room (a stalled client gives way to a new one); if every
        open one is being answered, refuse this one."""
        while len(self._open) >= self.max_connections and self._reading:
            oldest = next(iter(self._reading))
            self._reading.pop(oldest)
            oldest.transport.abort()
            self._open.discard(oldest)
        if len(self._open) >= self.max_connections:
            writer.transport.abort()
            return False
        self._open.add(writer)
        self._reading[writer] = None
        return True

    async def _answer(self, head: bytes) -> tuple[int, bytes, str, bool]:
        """(status, body, content type, HEAD) for the request ``head``."""
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, b"bad request\n", "text/plain", False
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return 405, b"method not allowed\n", "text/plain", False
        head_only = method == b"HEAD"
        path = target.split(b"?", 1)[0]
        if path == b"/healthz":
            return 200, b"ok\n", "text/plain", head_only
        if path == b"/metrics":
            try:
                body = await self._off_loop(lambda: generate_latest(self.metrics.registry))
            except TimeoutError:
                return 503, b"metrics timed out\n", "text/plain", head_only
            return 200, body, CONTENT_TYPE_LATEST, head_only
        if path == b"/readyz":
            try:
                ok, why = await self._off_loop(self.ready)
            except TimeoutError:
                ok, why = False, "readiness check timed out"
            body = (printable(why, 500) + "\n").encode()
            return (200 if ok else 503), body, "text/plain; charset=utf-8", head_only
        if path == b"/status" and self.status_page is not None:
            try:
                body = await self._off_loop(self.status_page)
            except TimeoutError:
                return 503, b"status page timed out\n", "text/plain", head_only
            except Exception:  # a bug in the page must not take the probes down
                log.exception("status page failed", extra={"action": "status_page_error"})
                return 500, b"status page failed (see the worker's log)\n", "text/plain", head_only
            return 200, body, _HTML, head_only
        return 404, b"not found\n", "text/plain", head_only

    async def _off_loop(self, call: Callable[[], _T]) -> _T:
        assert self._pool is not None
        future = asyncio.wrap_future(self._pool.submit(call))
        return await asyncio.wait_for(future, self.handler_timeout)


def bind_probe_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``; a :class:`SettingsError` naming the
    variable at fault (``OUTBOX_METRICS_PORT`` or ``OUTBOX_METRICS_HOST``) when it
    cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise SettingsError(
            f"OUTBOX_METRICS_HOST={printable(host, 60)} is not an address of this machine "
            f"({printable(exc, 100)})",
            setting="OUTBOX_METRICS_HOST",
        ) from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        reason = printable(exc.strerror or exc, 100)
        if exc.errno == errno.EADDRINUSE:
            message = f"OUTBOX_METRICS_PORT={port} is already in use on {host} ({reason})"
            setting = "OUTBOX_METRICS_PORT"
        elif exc.errno == errno.EACCES:
            message = f"OUTBOX_METRICS_PORT={port} may not be bound by this user ({reason})"
            setting = "OUTBOX_METRICS_PORT"
        else:
            message = f"OUTBOX_METRICS_HOST={printable(host, 60)} cannot be bound ({reason})"
            setting = "OUTBOX_METRICS_HOST"
        raise SettingsError(message, setting=setting) from exc
    sock.setblocking(False)
    return sock
