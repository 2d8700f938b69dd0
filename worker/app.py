"""The composition root: the one place that wires settings, store, sink and scheduler."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from outbox.exceptions import OutboxDatabaseError, OutboxNotInstalledError
from worker.contract_command import load_registry
from worker.database import resolve_database_url
from worker.drain import SINK_NOT_READY, Drainer, DrainStats
from worker.metrics import ProbeServer, WorkerMetrics
from worker.settings import Settings
from worker.sinks import PostHogSink, Sink, StdoutSink
from worker.sinks.metrics import MetricsSink
from worker.store import DatabaseTimeout, DatabaseUnavailable, Health, Store
from worker.wakeup import Listener

log = logging.getLogger("outbox.worker")

DEDUP_EXPIRY_INTERVAL = 300.0
METRICS_REFRESH_INTERVAL = 15.0
#: While events keep arriving the drain job looks again this often (seconds)...
HOT_POLL = 0.02
#: ...until nothing has turned up for this long; then it falls back to the poll
#: interval and NOTIFY wake-ups. Longer than the producers' notify throttle, so an
#: event whose NOTIFY was throttled away is still found within HOT_POLL.
HOT_LINGER = 0.5


def build_sink(settings: Settings) -> Sink:
    """The sink the settings ask for; the stdout sink is announced loudly."""
    if settings.sink_name == "posthog":
        assert settings.posthog_api_key
        log.info(
            "shipping to PostHog at %s (gzip %s)",
            settings.posthog_host,
            "on" if settings.gzip else "off",
            extra={"action": "sink_posthog", "host": settings.posthog_host},
        )
        return PostHogSink(
            settings.posthog_api_key,
            settings.posthog_host,
            gzip=settings.gzip,
            timeout=settings.request_timeout,
            transport=settings.posthog_transport,
        )
    log.warning(
        "POSTHOG_API_KEY is not set: events are printed to stdout as JSON lines, "
        "NOT sent to PostHog",
        extra={"action": "sink_stdout"},
    )
    return StdoutSink()


class Worker:
    """An outbox worker: a drainer on a schedule, with housekeeping jobs."""

    def __init__(
        self,
        settings: Settings,
        *,
        sink: Sink | None = None,
        database_url: str | None = None,
    ) -> None:
        self.settings = settings
        url = database_url or resolve_database_url(settings.database_url, settings.data_dir)
        # The two batch connections report into one Health: their latest statement
        # says whether this worker can ship (readiness).
        self.batch_health = Health()
        self.store = Store(
            url, worker_id=settings.worker_id, for_batches=True, health=self.batch_health
        )
        # Housekeeping and probes get their own connection, so a slow count never
        # holds up the drain loop.
        # Its outages show on the batch connections; its timeouts are its own.
        self.housekeeping_store = Store(
            url, worker_id=settings.worker_id, log_outages=False, health=Health()
        )
        self.sink = sink if sink is not None else build_sink(settings)
        self.metrics = WorkerMetrics()
        contract = load_registry(settings.contract) if settings.contract else None
        self.metrics_sink = MetricsSink(
            self.metrics.registry, contract, namespace=settings.metrics_namespace
        )
        self.claim_store = Store(
            url,
            worker_id=settings.worker_id,
            log_outages=False,
            for_batches=True,
            health=self.batch_health,
        )
        self.drainer = Drainer(
            self.store,
            self.sink,
            settings,
            claim_store=self.claim_store,
            metrics_sink=self.metrics_sink,
            observer=self.metrics,
        )
        self.stopped = threading.Event()
        self._scheduler: BackgroundScheduler | None = None
        self._probes: ProbeServer | None = None
        self._woken = threading.Event()
        self._listener = Listener(url, self.wake) if settings.notify else None

    def run_until_empty(self) -> DrainStats:
        """Ship everything due now, then return (``outbox-worker run --until-empty``).

        Raises :class:`OutboxDatabaseError` when the database cannot be used at all.
        """
        try:
            self.store.ping_or_raise()
            return self.drainer.drain()
        finally:
            self.close()

    def start(self) -> None:
        """Start the scheduler: the drain job now and every poll interval, and housekeeping."""
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=3)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        scheduler.add_job(
            self._drain_job,
            "interval",
            seconds=self.settings.poll_interval,
            id="drain",
            next_run_time=datetime.now(UTC),
        )
        scheduler.add_job(
            self._expire_dedup_keys,
            "interval",
            seconds=DEDUP_EXPIRY_INTERVAL,
            id="expire_dedup_keys",
        )
        scheduler.add_job(
            self.refresh_metrics,
            "interval",
            seconds=METRICS_REFRESH_INTERVAL,
            id="refresh_metrics",
            next_run_time=datetime.now(UTC),
        )
        if self.settings.metrics_port is not None:
            self._probes = ProbeServer(self.metrics, self.readiness, self.settings.metrics_port)
            self._probes.start()
        scheduler.start()
        self._scheduler = scheduler
        if self._listener is not None:
            self._listener.start()
        if self.settings.lease_seconds <= 2 * self.settings.request_timeout:
            log.warning(
                "OUTBOX_LEASE_SECONDS (%.0fs) is not above twice OUTBOX_REQUEST_TIMEOUT "
                "(%.0fs): a slow request can outlast a batch's lease, and that batch is "
                "then sent again",
                self.settings.lease_seconds,
                self.settings.request_timeout,
                extra={"action": "lease_too_short"},
            )
        log.info(
            "worker %s started (batch %d, poll %.2fs, lease %.0fs)",
            self.settings.worker_id,
            self.settings.batch_size,
            self.settings.poll_interval,
            self.settings.lease_seconds,
            extra={"action": "worker_started", "worker": self.settings.worker_id},
        )

    def wake(self) -> None:
        """Drain now instead of at the next poll (a NOTIFY arrived)."""
        self._woken.set()
        scheduler = self._scheduler
        if scheduler is not None and not self.drainer.stop_event.is_set():
            with contextlib.suppress(Exception):  # shutting down, or the job is gone
                scheduler.modify_job("drain", next_run_time=datetime.now(UTC))

    def _drain_job(self) -> None:
        """Drain; while events keep coming, look again every few milliseconds (or at
        once when woken) until a quiet spell of HOT_LINGER seconds."""
        last_found = time.monotonic()
        try:
            while not self.drainer.stop_event.is_set():
                self._woken.clear()
                stats = self.drainer.drain()
                now = time.monotonic()
                if stats.batches:
                    last_found = now
                if (
                    stats.sink_failed
                    or stats.interrupted
                    or self.drainer.pause_remaining() > 0
                    or now - last_found > HOT_LINGER
                ):
                    return
                self._woken.wait(HOT_POLL)
        except OutboxNotInstalledError as exc:
            log.error("%s", exc, extra={"action": "drain_error"})
        except DatabaseTimeout:
            pass  # logged when it starts and ends (Health), shown by /readyz
        except Exception:
            log.exception("drain job failed", extra={"action": "drain_error"})

    def _expire_dedup_keys(self) -> None:
        try:
            removed = self.housekeeping_store.expire_dedup_keys()
        except OutboxDatabaseError:
            return  # the drain job reports database trouble
        if removed:
            log.info(
                "expired %d dedup keys",
                removed,
                extra={"action": "dedup_keys_expired", "keys": removed},
            )

    def refresh_metrics(self) -> None:
        """Publish the backlog and the sink state (the ``refresh_metrics`` job)."""
        try:
            self.metrics.set_backlog(self.housekeeping_store.backlog_capped())
        except (DatabaseUnavailable, OutboxNotInstalledError):
            self.metrics.set_backlog(None)
        except OutboxDatabaseError:
            # The database answered (a statement or lock timeout cut the count
            # short): it is up; the counts keep their last values.
            self.metrics.set_database_up(True)
        self.metrics.set_sink_state(self.drainer.sink_state)

    def check_database(self) -> None:
        """Raise :class:`OutboxNotInstalledError` if the tables are missing; an
        unreachable database, or one whose timeouts cut the check short, is fine
        here (the worker waits for it, and /readyz says why)."""
        with contextlib.suppress(DatabaseUnavailable, DatabaseTimeout):
            self.store.ping_or_raise()

    def readiness(self) -> tuple[bool, str]:
        """``/readyz``: ready when the database answers, the worker's latest batch
        statement worked (it can claim and record batches), and the sink is not in a
        state only a configuration change ends (key refused, redirected, requests
        refused); otherwise every reason, joined by ``; ``."""
        reasons: list[str] = []
        reachable = False
        try:
            self.housekeeping_store.ping_or_raise()
            reachable = True
        except OutboxNotInstalledError:
            reasons.append("the outbox tables are missing: run `outbox-worker migrate`")
        except DatabaseUnavailable:
            reasons.append("database unreachable")
        except OutboxDatabaseError as exc:  # up, but the check itself was cut short
            reachable = True
            reasons.append(f"database: {exc}")
        problem = self.batch_health.problem
        if reachable and problem is not None:
            reasons.append(f"batches cannot be claimed or recorded: {problem}")
        if self.drainer.sink_state in SINK_NOT_READY:
            reasons.append(f"{SINK_NOT_READY[self.drainer.sink_state]}: {self.drainer.last_error}")
        if reasons:
            return False, "; ".join(reasons)
        return True, f"ok (sink {self.drainer.sink_state})"

    def stop(self) -> None:
        """Stop claiming, let the in-flight batch finish within the grace period (else
        release its rows for other workers), and close everything."""
        if self.stopped.is_set():
            return
        log.info("stopping", extra={"action": "worker_stopping"})
        self.drainer.stop_event.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if not self.drainer.idle.wait(self.settings.shutdown_grace):
            released = self.drainer.abandon_inflight()
            log.warning(
                "in-flight batch did not finish within %.1fs; released %d events",
                self.settings.shutdown_grace,
                released,
                extra={"action": "batch_abandoned", "events": released},
            )
        if self._listener is not None:
            self._listener.stop()
        if self._probes is not None:
            self._probes.stop()
        self.close()
        log.info("stopped", extra={"action": "worker_stopped"})

    def close(self) -> None:
        """Close the sink and the database connection."""
        self.stopped.set()
        self.sink.close()
        self.store.close()
        self.claim_store.close()
        self.housekeeping_store.close()
