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
from worker.drain import SINK_NOT_READY, SINK_OK, SINK_UNAUTHORIZED, Drainer, DrainStats
from worker.keycheck import (
    KEY_UNREACHABLE,
    ApiKeyNotVerifiedError,
    KeyStateMetric,
    build_key_gate,
    public_host,
    scrub,
)
from worker.metrics import ProbeServer, WorkerMetrics
from worker.redaction import url_secrets
from worker.settings import Settings
from worker.sinks import PostHogSink, Sink, StdoutSink
from worker.sinks.metrics import MetricsSink
from worker.sinks.posthog_v1 import PostHogV1Sink
from worker.statuspage import BacklogHistory, Privacy, StatusPage
from worker.statuspage.page import STATUS_STATEMENT_TIMEOUT
from worker.storage.base import DatabaseTimeout, DatabaseUnavailable, DrainStorage, Storage
from worker.storage.connection import Health
from worker.storage.snapshot_storage import MAINTAIN_EVERY_SECONDS, SnapshotStorage
from worker.wakeup import Listener
from worker.worker_state import WorkerStateReporter

log = logging.getLogger("outbox.worker")

DEDUP_EXPIRY_INTERVAL = 300.0
METRICS_REFRESH_INTERVAL = 15.0
#: How often housekeeping runs the engine's upkeep (:meth:`SnapshotStorage.maintain`:
#: a tick, and the TRUNCATE of every event table whose rows are all delivered), in
#: seconds: the engine's own cadence. Claims tick by themselves when no batch waits;
#: this is what rotates.
MAINTAIN_INTERVAL = MAINTAIN_EVERY_SECONDS
#: While events keep arriving the drain job looks again this often (seconds)...
HOT_POLL = 0.02
#: ...until nothing has turned up for this long; then it falls back to the poll
#: interval and NOTIFY wake-ups. Longer than the producers' notify throttle, so an
#: event whose NOTIFY was throttled away is still found within HOT_POLL.
HOT_LINGER = 0.5
#: How often the key job looks whether a check of the API key is due (seconds).
KEY_CHECK_TICK = 1.0
#: When a check withdraws the key while a drain runs, the drainer is paused this long
#: (seconds) so it claims no further batch; the closed key gate does the rest.
KEY_HOLD = 1.0


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
        if settings.posthog_transport == "v1":
            return PostHogV1Sink(
                settings.posthog_api_key,
                settings.posthog_host,
                gzip=settings.gzip,
                timeout=settings.request_timeout,
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
        # The snapshot engine is built here; everything else sees the protocols of
        # worker.storage.base.
        self.store: DrainStorage = SnapshotStorage(
            url,
            worker_id=settings.worker_id,
            for_batches=True,
            health=self.batch_health,
            pooler=settings.pooler,
            split_rows=settings.split_rows,
        )
        # Housekeeping and probes get their own connection, so a slow count never
        # holds up the drain loop.
        # Its outages show on the batch connections; its timeouts are its own.
        housekeeping = SnapshotStorage(
            url,
            worker_id=settings.worker_id,
            log_outages=False,
            health=Health(),
            pooler=settings.pooler,
            split_rows=settings.split_rows,
        )
        self.housekeeping_store: Storage = housekeeping
        self.sink = sink if sink is not None else build_sink(settings)
        self.metrics = WorkerMetrics()
        contract = load_registry(settings.contract) if settings.contract else None
        self.metrics_sink = MetricsSink(
            self.metrics.registry, contract, namespace=settings.metrics_namespace
        )
        self.claim_store: DrainStorage = SnapshotStorage(
            url,
            worker_id=settings.worker_id,
            log_outages=False,
            for_batches=True,
            health=self.batch_health,
            pooler=settings.pooler,
            split_rows=settings.split_rows,
        )
        self.drainer = Drainer(
            self.store,
            self.sink,
            settings,
            claim_store=self.claim_store,
            metrics_sink=self.metrics_sink,
            observer=self.metrics,
        )
        self.key_gate = build_key_gate(settings)
        self.key_metric = KeyStateMetric(self.metrics.registry)
        self.key_metric.set(self.key_gate.state)
        host = public_host(settings.posthog_host) if settings.sink_name == "posthog" else "stdout"
        self.state_reporter = WorkerStateReporter(housekeeping, host)
        #: The backlog as each refresh found it, for the status page's charts.
        self.history = BacklogHistory(METRICS_REFRESH_INTERVAL)
        self.status_page: StatusPage | None = None
        if settings.status_page and settings.metrics_port is not None:
            # A connection of its own, each statement bounded: a slow page load never
            # holds up the refresh or /readyz.
            self.status_store = SnapshotStorage(
                url,
                worker_id=settings.worker_id,
                log_outages=False,
                statement_timeout=STATUS_STATEMENT_TIMEOUT,
                health=Health(),
                pooler=settings.pooler,
            )
            self.status_page = StatusPage(
                self.status_store,
                self.drainer,
                self.key_gate,
                self.history,
                Privacy.from_settings(settings),
                worker_id=settings.worker_id,
                secrets=(
                    settings.posthog_api_key,
                    settings.posthog_personal_api_key,
                    *url_secrets(url),
                ),
            )
        self._unauthorized_seen = 0.0
        self.stopped = threading.Event()
        self._scheduler: BackgroundScheduler | None = None
        self._probes: ProbeServer | None = None
        self._woken = threading.Event()
        self._listener = Listener(url, self.wake) if settings.listen else None
        if settings.pooler != "none" and settings.notify:
            # A transaction pooler hands each transaction any server session, and a
            # LISTEN lives in one: the worker would never hear a NOTIFY. Polling
            # delivers everything anyway, so this is not worth refusing to start.
            log.warning(
                "OUTBOX_NOTIFY=1 is ignored with OUTBOX_POOLER=%s: a transaction pooler "
                "cannot carry LISTEN; polling every %.2fs instead",
                settings.pooler,
                settings.poll_seconds,
                extra={"action": "notify_ignored_behind_pooler", "pooler": settings.pooler},
            )

    def run_until_empty(self) -> DrainStats:
        """Ship everything due now, then return (``outbox-worker run --until-empty``).

        Raises :class:`OutboxDatabaseError` when the database cannot be used at all, and
        :class:`ApiKeyNotVerifiedError`, having sent nothing, when the API key does not
        verify (checked first, and again if capture answers 401/403).
        """
        try:
            self.store.ping_or_raise()
            self.state_reporter.expire()
            self._require_key()
            stats = self.drainer.drain()
            if self._capture_refused_key():
                self._require_key()
            # A worker run from cron has no housekeeping job: rotate here, or the
            # event tables would keep every row ever delivered.
            self.maintain()
            self.state_reporter.remove()
            return stats
        finally:
            self.close()

    def _require_key(self) -> None:
        """Check the key if it is not verified; raise if it still does not verify."""
        if self.key_gate.enabled and not self.key_gate.allows_sending():
            self.key_gate.check()
        self.key_metric.set(self.key_gate.state)
        if not self.key_gate.allows_sending():
            self.report_state()
            raise ApiKeyNotVerifiedError(self.key_gate.state, self.key_gate.reason)

    def start(self) -> None:
        """Start the scheduler: the drain job now and every poll interval, and housekeeping."""
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        scheduler.add_job(
            self._drain_job,
            "interval",
            seconds=self.settings.poll_seconds,
            id="drain",
            next_run_time=datetime.now(UTC),
        )
        if self.key_gate.enabled:
            scheduler.add_job(
                self._key_job,
                "interval",
                seconds=KEY_CHECK_TICK,
                id="check_key",
                next_run_time=datetime.now(UTC),
            )
        scheduler.add_job(
            self._expire_dedup_keys,
            "interval",
            seconds=DEDUP_EXPIRY_INTERVAL,
            id="expire_dedup_keys",
        )
        scheduler.add_job(
            self.maintain,
            "interval",
            seconds=MAINTAIN_INTERVAL,
            id="maintain",
        )
        scheduler.add_job(
            self.refresh_metrics,
            "interval",
            seconds=METRICS_REFRESH_INTERVAL,
            id="refresh_metrics",
            next_run_time=datetime.now(UTC),
        )
        if self.settings.metrics_port is not None:
            self._probes = ProbeServer(
                self.metrics,
                self.readiness,
                self.settings.metrics_port,
                self.settings.metrics_host,
                status_page=self.status_page.html if self.status_page is not None else None,
            )
            self._probes.start()
        scheduler.start()
        self._scheduler = scheduler
        if self._listener is not None:
            self._listener.start()
        log.info(
            "worker %s started (batch %d, poll %.2fs, lease %.0fs)",
            self.settings.worker_id,
            self.settings.batch_size,
            self.settings.poll_seconds,
            self.settings.lease_seconds,
            extra={
                "action": "worker_started",
                "worker": self.settings.worker_id,
                "pooler": self.settings.pooler,
                "listen": self.settings.listen,
            },
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
        once when woken) until a quiet spell of HOT_LINGER seconds.

        A wake-up (NOTIFY) starts that spell even if the first look finds nothing (the
        event of a throttled NOTIFY may come next); a poll that finds nothing ends at
        once, so an idle worker costs one claim per poll interval."""
        last_found = time.monotonic() if self._woken.is_set() else -HOT_LINGER - 1.0
        try:
            while not self.drainer.stop_event.is_set():
                if not self.key_gate.allows_sending():
                    return  # nothing is sent until the key verifies
                self._woken.clear()
                stats = self.drainer.drain()
                if self._capture_refused_key():
                    self._check_key_now()
                self.report_state()
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

    def _capture_refused_key(self) -> bool:
        """True once for each new 401/403 the drainer met; the key is then no longer
        trusted (it is checked again before anything more is sent)."""
        drainer = self.drainer
        if (
            drainer.sink_state != SINK_UNAUTHORIZED
            or drainer.paused_until == self._unauthorized_seen
        ):
            return False
        self._unauthorized_seen = drainer.paused_until
        if not self.key_gate.enabled:
            return False
        why = scrub(f"capture refused it ({drainer.last_error})", self.settings.posthog_api_key)
        self.key_gate.invalidate(why)
        self.key_metric.set(self.key_gate.state)
        return True

    def _check_key_now(self) -> None:
        scheduler = self._scheduler
        if scheduler is not None and not self.drainer.stop_event.is_set():
            with contextlib.suppress(Exception):  # shutting down, or the job is gone
                scheduler.modify_job("check_key", next_run_time=datetime.now(UTC))

    def _key_job(self) -> None:
        """Check the API key when a check is due; open or close sending on the answer."""
        gate = self.key_gate
        if self.drainer.stop_event.is_set() or not gate.due():
            return
        allowed = gate.allows_sending()
        try:
            gate.check()
        except Exception:  # a bug in the check must not stop the schedule
            log.exception("API key check failed", extra={"action": "api_key_check_error"})
            return
        self.key_metric.set(gate.state)
        if allowed and not gate.allows_sending():
            # A drain in progress claims no further batch; the gate keeps it closed.
            drainer = self.drainer
            drainer.paused_until = max(drainer.paused_until, drainer.clock() + KEY_HOLD)
            if drainer.sink_state == SINK_UNAUTHORIZED:
                self._unauthorized_seen = drainer.paused_until  # not a new 401
        self.report_state()
        if gate.allows_sending() and not allowed:
            self.wake()

    def reported_state(self) -> tuple[str, str]:
        """This worker's state and reason, as ``outbox_worker_state`` and ``status``
        show them: ``key_<state>`` while the key holds sending back, else the sink's."""
        gate = self.key_gate
        if not gate.allows_sending():
            return f"key_{gate.state}", gate.reason
        state = self.drainer.sink_state
        if state != SINK_OK:
            reason = scrub(self.drainer.last_error or "", self.settings.posthog_api_key, 500)
        elif gate.state == KEY_UNREACHABLE or not gate.enabled:
            reason = gate.reason
        else:
            reason = ""
        return state, reason

    def report_state(self, *, heartbeat: bool = False) -> None:
        """Write this worker's row in ``outbox_worker_state`` if its state changed
        (always, for a heartbeat)."""
        self.state_reporter.report(*self.reported_state(), heartbeat=heartbeat)

    def _expire_dedup_keys(self) -> None:
        """The ``expire_dedup_keys`` job: forget expired dedup keys, the state lines
        of workers long gone, and the ledger's days past its retention."""
        self.state_reporter.expire()
        try:
            removed = self.housekeeping_store.expire_dedup_keys()
            days = self.housekeeping_store.expire_ledger(self.settings.ledger_retention_days)
        except OutboxDatabaseError:
            return  # the drain job reports database trouble
        if removed:
            log.info(
                "expired %d dedup keys",
                removed,
                extra={"action": "dedup_keys_expired", "keys": removed},
            )
        if days:
            log.info(
                "deleted %d ledger rows older than %d days",
                days,
                self.settings.ledger_retention_days,
                extra={"action": "ledger_expired", "rows": days},
            )

    def maintain(self) -> None:
        """The engine's upkeep (the ``maintain`` job, and the end of ``run
        --until-empty``): tick, and truncate the event tables that are all delivered.
        Any worker may run it at any time; a table still being read, or locked, is
        left for the next run."""
        with contextlib.suppress(OutboxDatabaseError):  # the drain job reports it
            self.housekeeping_store.maintain()

    def refresh_metrics(self) -> None:
        """Publish the backlog and the sink state (the ``refresh_metrics`` job)."""
        try:
            backlog = self.housekeeping_store.backlog_capped()
            self.metrics.set_backlog(backlog)
            self.history.record(backlog)
        except (DatabaseUnavailable, OutboxNotInstalledError):
            self.metrics.set_backlog(None)
        except OutboxDatabaseError:
            # The database answered (a statement or lock timeout cut the count
            # short): it is up; the counts keep their last values.
            self.metrics.set_database_up(True)
        self.metrics.set_sink_state(self.drainer.sink_state)
        self.key_metric.set(self.key_gate.state)
        self.report_state(heartbeat=True)

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
        if not self.key_gate.allows_sending():
            reasons.append(f"API key {self.key_gate.state}: {self.key_gate.reason}")
        if self.drainer.sink_state in SINK_NOT_READY:
            reasons.append(f"{SINK_NOT_READY[self.drainer.sink_state]}: {self.drainer.last_error}")
        if reasons:
            return False, "; ".join(reasons)
        return True, f"ok (sink {self.drainer.sink_state})"

    def stop(self) -> None:
        """Stop claiming, let the in-flight batch finish within the grace period (else
        hand its lease back for other workers), and close everything."""
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
        self.state_reporter.remove()
        self.close()
        log.info("stopped", extra={"action": "worker_stopped"})

    def close(self) -> None:
        """Close the sink and the database connection."""
        self.stopped.set()
        self.sink.close()
        self.key_gate.close()
        self.store.close()
        self.claim_store.close()
        self.housekeeping_store.close()
        if self.status_page is not None:
            self.status_store.close()
