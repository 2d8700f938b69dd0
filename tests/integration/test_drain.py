"""The drain loop against a real PostgreSQL: ship, fence, retry, bury, split, pause."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import outbox
from tests.conftest import (
    EVENT_TABLES,
    capture_requests,
    event_table_bytes,
    make_retries_due,
    move_to_retry,
    wait_for,
)
from worker.app import Worker
from worker.drain import (
    SINK_OK,
    SINK_RATE_LIMITED,
    SINK_REDIRECTED,
    SINK_REQUEST_REJECTED,
    SINK_UNAUTHORIZED,
    Drainer,
)
from worker.settings import Settings
from worker.sinks import (
    MemorySink,
    PostHogSink,
    RateLimitedError,
    RedirectError,
    RejectedError,
    RequestRejectedError,
    RetryableSinkError,
    UnauthorizedError,
)
from worker.storage.base import BatchLostError, BatchOutcome
from worker.storage.snapshot import insert_events
from worker.storage.snapshot_storage import SnapshotStorage
from worker.testing import CaptureServer, Reply

POLICY: dict[str, Any] = {
    "dedup_window": 60.0,
    "max_attempts": 5,
    "backoff_base": 1.0,
    "backoff_max": 10.0,
}


def enqueue_n(
    database_url: str, n: int, *, commit: bool = True, prefix: str = "e"
) -> list[uuid.UUID]:
    with psycopg.connect(database_url) as conn:
        out = outbox.enqueue_many(
            conn,
            [
                {"event": f"{prefix}{i}", "distinct_id": f"user-{i}", "properties": {"i": i}}
                for i in range(n)
            ],
        )
        if commit:
            conn.commit()
        else:
            conn.rollback()
    return [u for u in out if u is not None]


def remaining(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """Every undelivered event (the view outbox_events)."""
    return db.execute(
        'SELECT uuid, status, attempts, last_error FROM outbox_events ORDER BY "timestamp", uuid'
    ).fetchall()


def make_drainer(settings: Settings, sink: Any) -> Drainer:
    assert settings.database_url
    store = SnapshotStorage(settings.database_url, worker_id=settings.worker_id)
    return Drainer(store, sink, settings)


def test_commit_ships_exactly_once_with_the_rows_uuid_and_timestamp(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    uuids = enqueue_n(database_url, 25)
    stamps = dict(db.execute("SELECT uuid, timestamp FROM outbox_events").fetchall())
    enqueue_n(database_url, 5, commit=False, prefix="rolled_back")
    settings = settings_for(posthog_api_key="phc_test", posthog_host=capture.url, gzip=True)
    stats = Worker(settings).run_until_empty()
    assert stats.shipped == 25
    assert capture.uuids() == [str(u) for u in uuids]
    for event in capture.events:
        assert event["properties"]["$ignore_sent_at"] is True
        assert event["timestamp"] == stamps[uuid.UUID(event["uuid"])].isoformat()
        assert not event["event"].startswith("rolled_back")
    assert all(r.gzip for r in capture_requests(capture))
    assert remaining(db) == []
    # A second drain finds nothing: nothing is shipped twice.
    assert Worker(settings).run_until_empty().shipped == 0
    assert len(capture.events) == 25


def test_batches_are_bounded_by_count_and_bytes(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    with psycopg.connect(database_url) as conn:
        outbox.enqueue_many(
            conn, [{"event": "big", "distinct_id": "u", "properties": {"s": "x" * 10_000}}] * 10
        )
        conn.commit()
    enqueue_n(database_url, 7)
    sink = MemorySink()
    drainer = make_drainer(settings_for(batch_size=4, max_batch_bytes=25_000), sink)
    drainer.drain()
    sizes = [len(b) for b in sink.batches]
    assert sum(sizes) == 17
    assert max(sizes) <= 4
    # Two 10 kB events fit in 25 kB, three do not.
    assert all(sum(1 for e in b if e["event"] == "big") <= 2 for b in sink.batches)


def test_5xx_outage_then_recovery(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    uuids = enqueue_n(database_url, 10)
    capture.enqueue_reply(Reply(status=503, times=3))
    settings = settings_for(posthog_api_key="phc_test", posthog_host=capture.url, gzip=False)
    drainer = make_drainer(settings, PostHogSink("phc_test", capture.url, gzip=False))
    drainer.drain()
    left = remaining(db)
    assert len(left) == 10 and {r[2] for r in left} == {1}
    assert "503" in left[0][3]
    for _ in range(4):
        make_retries_due(database_url)
        drainer.drain()
    assert sorted(capture.uuids()) == sorted(str(u) for u in uuids)
    assert remaining(db) == []


def test_max_attempts_makes_events_dead_with_the_error(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    enqueue_n(database_url, 3)
    sink = MemorySink()
    sink.fail_with(*[RetryableSinkError("HTTP 502: bad gateway", status=502)] * 3)
    drainer = make_drainer(settings_for(max_attempts=3), sink)
    for _ in range(3):
        make_retries_due(database_url)
        drainer.drain()
    left = remaining(db)
    assert [(r[1], r[2]) for r in left] == [("dead", 3)] * 3
    assert all("502" in r[3] for r in left)
    assert sink.events == []
    stuck = db.execute("SELECT status, reason FROM outbox_stuck").fetchall()
    assert len(stuck) == 3 and all(s == "dead" and "502" in reason for s, reason in stuck)


def test_backoff_grows_with_attempts(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    enqueue_n(database_url, 1)
    sink = MemorySink()
    sink.fail_with(*[RetryableSinkError("down")] * 3)
    drainer = make_drainer(settings_for(backoff_base=10.0, backoff_max=1000.0), sink)
    delays = []
    for _ in range(3):
        make_retries_due(database_url)
        drainer.drain()
        row = db.execute(
            "SELECT extract(epoch FROM next_attempt_at - now()) FROM outbox_events"
        ).fetchone()
        assert row is not None
        delays.append(float(row[0]))
    # base * 2^(attempt-1), times a jitter between 0.5 and 1.
    for attempt, delay in enumerate(delays):
        assert 10.0 * 2**attempt * 0.5 - 1 <= delay <= 10.0 * 2**attempt + 1


def test_a_poison_event_is_isolated_by_splitting(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    uuids = enqueue_n(database_url, 20)
    poison = str(uuids[13])
    capture.reject_events(lambda e: e.get("uuid") == poison, status=400, detail="invalid event")
    settings = settings_for()
    drainer = make_drainer(settings, PostHogSink("phc_test", capture.url, gzip=False))
    drainer.drain()
    assert sorted(capture.uuids()) == sorted(str(u) for u in uuids if str(u) != poison)
    left = remaining(db)
    assert [(str(r[0]), r[1]) for r in left] == [(poison, "dead")]
    assert "400" in left[0][3] and "invalid event" in left[0][3]


def test_rate_limit_pauses_without_counting_an_attempt(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    enqueue_n(database_url, 5)
    sink = MemorySink()
    sink.fail_with(RateLimitedError("HTTP 429", retry_after=30.0))
    drainer = make_drainer(settings_for(), sink)
    drainer.drain()
    assert drainer.sink_state == SINK_RATE_LIMITED
    assert 29 < drainer.pause_remaining() <= 30
    left = remaining(db)
    assert [(r[1], r[2]) for r in left] == [("pending", 0)] * 5
    # No request goes out during the pause, even for due rows.
    make_retries_due(database_url)
    drainer.drain()
    assert sink.calls == 1


def test_unauthorized_keeps_everything_pending(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    enqueue_n(database_url, 5)
    sink = MemorySink()
    sink.fail_with(UnauthorizedError("HTTP 401: invalid key", status=401))
    drainer = make_drainer(settings_for(), sink)
    drainer.drain()
    assert drainer.sink_state == SINK_UNAUTHORIZED
    assert [(r[1], r[2]) for r in remaining(db)] == [("pending", 0)] * 5
    # The key is fixed: once the pause is over, everything ships.
    drainer.paused_until = 0
    make_retries_due(database_url)
    drainer.drain()
    assert len(sink.events) == 5 and remaining(db) == []


def test_a_worker_whose_lease_ran_out_writes_nothing(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    enqueue_n(database_url, 3)
    slow = SnapshotStorage(database_url, worker_id="slow")
    fast = SnapshotStorage(database_url, worker_id="fast")
    lost = slow.claim(10, 10_000_000, lease_seconds=0.05)
    assert lost is not None and len(lost.events) == 3
    taken = wait_for(lambda: fast.claim(10, 10_000_000, lease_seconds=60.0), what="a new claim")
    assert {e.uuid for e in taken.events} == {e.uuid for e in lost.events}
    with pytest.raises(BatchLostError):
        slow.finish(lost, BatchOutcome(shipped=[e.id for e in lost.events]), **POLICY)
    assert [(r[1], r[2]) for r in remaining(db)] == [("pending", 0)] * 3
    done = fast.finish(taken, BatchOutcome(shipped=[e.id for e in taken.events]), **POLICY)
    assert done.shipped == 3
    assert remaining(db) == []
    # The slow store reconnects and works again.
    assert slow.claim(10, 10_000_000, lease_seconds=60.0) is None


def test_a_hung_workers_rows_are_claimed_again_when_its_lease_runs_out(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    uuids = enqueue_n(database_url, 4)
    hung = SnapshotStorage(database_url, worker_id="hung")
    assert hung.claim(10, 10_000_000, lease_seconds=0.3) is not None
    sink = MemorySink()
    drainer = make_drainer(settings_for(), sink)
    assert drainer.drain().shipped == 0
    wait_for(lambda: drainer.drain().shipped == 4, what="the rows shipped")
    # Each exactly once; the order within a batch is not the claim's promise.
    assert sorted(sink.uuids()) == sorted(str(u) for u in uuids)


def test_two_drainers_racing_ship_no_event_twice(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    uuids = enqueue_n(database_url, 2000)
    settings = settings_for(batch_size=50)
    drainers = [make_drainer(settings, PostHogSink("k", capture.url, gzip=False)) for _ in range(2)]
    threads = [threading.Thread(target=d.drain) for d in drainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    shipped = capture.uuids()
    assert len(shipped) == len(set(shipped)) == 2000
    assert set(shipped) == {str(u) for u in uuids}
    assert remaining(db) == []


def test_dedup_window_starts_at_delivery(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, "e", "u", dedup_key="once")
        conn.commit()
    make_drainer(settings_for(dedup_window=3600), MemorySink()).drain()
    row = db.execute(
        "SELECT extract(epoch FROM expires_at - now()) FROM outbox_dedup_keys"
    ).fetchone()
    assert row is not None and 3590 < float(row[0]) <= 3600
    with psycopg.connect(database_url) as conn:
        assert outbox.enqueue(conn, "e", "u", dedup_key="once") is None


@pytest.mark.parametrize("error", [RejectedError("HTTP 413: too large", status=413)])
def test_a_single_refused_event_dies_and_the_rest_ship(
    error: Exception,
    database_url: str,
    db: psycopg.Connection[Any],
    settings_for: Callable[..., Settings],
) -> None:
    uuids = enqueue_n(database_url, 1)
    sink = MemorySink()
    sink.reject = lambda e: error if e["uuid"] == str(uuids[0]) else None  # type: ignore[assignment]
    enqueue_n(database_url, 3, prefix="ok")
    make_drainer(settings_for(), sink).drain()
    assert len(sink.events) == 3
    assert [(str(r[0]), r[1]) for r in remaining(db)] == [(str(uuids[0]), "dead")]


def test_expired_dedup_keys_are_removed_and_held_ones_kept(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, "e", "u", dedup_key="held")
        conn.commit()
    db.execute(
        "INSERT INTO outbox_dedup_keys VALUES ('old', now() - interval '1 minute'),"
        " ('recent', now() + interval '1 hour')"
    )
    store = SnapshotStorage(database_url)
    try:
        assert store.expire_dedup_keys() == 1
    finally:
        store.close()
    keys = {r[0] for r in db.execute("SELECT dedup_key FROM outbox_dedup_keys").fetchall()}
    assert keys == {"held", "recent"}


def test_capped_backlog_matches_the_exact_one_below_the_cap(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    uuids = enqueue_n(database_url, 30)
    move_to_retry(database_url, uuids[:5], status="dead", last_error="x")
    move_to_retry(database_url, uuids[5:9], status="pending", attempts=2, due_in=3600)
    holder = SnapshotStorage(database_url, worker_id="w1", for_batches=True)
    assert holder.claim(3, 10_000_000, 60) is not None
    store = SnapshotStorage(database_url)
    exact = store.backlog()
    # Events in a batch in flight are still pending and due: nothing in them changed.
    assert (exact.pending, exact.due, exact.retrying, exact.dead) == (25, 21, 4, 5)
    capped = store.backlog_capped()
    assert (capped.pending, capped.due, capped.retrying, capped.dead) == (25, 21, 4, 5)
    [flight] = store.in_flight()
    assert flight["worker"] == "w1" and 0 <= flight["held_seconds"] < 60
    assert abs(capped.oldest_pending_age_seconds - exact.oldest_pending_age_seconds) < 1
    small_cap = store.backlog_capped(cap=10)
    # Exact up to the cap; past it, pending may be an estimate.
    assert small_cap.dead == 5 and small_cap.retrying == 4 and small_cap.pending >= 10
    holder.close()
    store.close()


def test_a_batch_claimed_ahead_that_waited_through_a_slow_send_is_claimed_afresh(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    # Three batches of ten (a tick after each ten): one store claims the next batch
    # while the other's is on the wire (a leased batch is its holder's alone).
    ticker = SnapshotStorage(database_url)
    for i in range(3):
        enqueue_n(database_url, 10, prefix=f"b{i}-")
        ticker.maintain()
    ticker.close()
    now = [0.0]
    settings = settings_for(batch_size=10, lease_seconds=40.0)

    class SlowSink(MemorySink):
        def send(self, batch: Any) -> None:
            now[0] += 11.0  # each send takes over a quarter of the lease (fake clock)
            super().send(batch)

    sink = SlowSink()
    assert settings.database_url
    drainer = Drainer(
        SnapshotStorage(settings.database_url),
        sink,
        settings,
        claim_store=SnapshotStorage(settings.database_url),
        clock=lambda: now[0],
    )
    released: list[int] = []
    original = drainer._release
    drainer._release = lambda b: (released.append(len(b.events)), original(b))[1]  # type: ignore[method-assign]
    stats = drainer.drain()
    assert stats.shipped == 30 and remaining(db) == []
    # The second batch, claimed while the first was sent, waited too long (so may the
    # third, depending on when its claim read the clock).
    assert released and set(released) == {10}
    assert len(sink.uuids()) == len(set(sink.uuids())) == 30


def test_failed_events_are_counted_by_why_they_were_not_sent(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    from worker.metrics import WorkerMetrics

    def failed(metrics: WorkerMetrics, reason: str) -> float:
        value = metrics.registry.get_sample_value("outbox_events_failed_total", {"reason": reason})
        return value or 0.0

    enqueue_n(database_url, 4)
    metrics = WorkerMetrics()
    sink = MemorySink()
    sink.fail_with(RateLimitedError("HTTP 429", retry_after=30.0))
    assert settings_for().database_url
    drainer = Drainer(SnapshotStorage(database_url), sink, settings_for(), observer=metrics)
    drainer.drain()
    assert failed(metrics, "rate_limited") == 4
    assert failed(metrics, "released") == 0

    # A refused batch is split, but the first request used half the lease: the rest is
    # released unsent (not rate limited), to be claimed again.
    make_retries_due(database_url)
    now = [0.0]

    class SlowSink(MemorySink):
        def send(self, batch: Any) -> None:
            now[0] += 40.0
            super().send(batch)

    slow_sink = SlowSink()
    slow_sink.reject = lambda e: RejectedError("HTTP 400", status=400)  # type: ignore[assignment]
    metrics = WorkerMetrics()
    slow = Drainer(
        SnapshotStorage(database_url),
        slow_sink,
        settings_for(lease_seconds=60.0),
        observer=metrics,
        clock=lambda: now[0],
    )
    slow.drain()
    assert slow_sink.calls == 1
    assert failed(metrics, "released") == 4
    assert failed(metrics, "rate_limited") == 0
    assert [(r[1], r[2]) for r in remaining(db)] == [("pending", 0)] * 4


def shipped_metric(metrics: Any, sink: str) -> float:
    value = metrics.registry.get_sample_value("outbox_events_shipped_total", {"sink": sink})
    return float(value or 0.0)


def test_metrics_only_events_neither_count_as_shipped_to_posthog_nor_clear_a_401(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    """Regression: a batch of only metrics-only events reset the sink state to ok (so
    /readyz said ready during a 401 outage), and its events were counted in
    outbox_events_shipped_total as if PostHog had accepted them."""
    enqueue_n(database_url, 3)
    sink = MemorySink()
    sink.fail_with(UnauthorizedError("HTTP 401: invalid key", status=401))
    worker = Worker(settings_for(), sink=sink)
    try:
        worker.drainer.drain()
        assert worker.drainer.sink_state == SINK_UNAUTHORIZED
        assert worker.readiness()[0] is False
        with psycopg.connect(database_url) as conn:  # as enqueue writes metrics-only events
            metrics_only = [
                {
                    "uuid": uuid.uuid4(),
                    "event": f"m{i}",
                    "distinct_id": "u",
                    "destination": "metrics",
                }
                for i in range(2)
            ]
            insert_events(conn, metrics_only)
        worker.drainer.paused_until = 0  # the pause is over; only the metrics-only rows are due
        stats = worker.drainer.drain()
        assert stats.shipped == 2 and stats.metrics_only == 2
        assert sink.calls == 1  # PostHog was not asked again
        assert worker.drainer.sink_state == SINK_UNAUTHORIZED
        ready, why = worker.readiness()
        assert ready is False and "API key" in why
        assert shipped_metric(worker.metrics, "memory") == 0
        assert shipped_metric(worker.metrics, "metrics") == 2
        # The key works again: the next batch PostHog accepts clears the state.
        make_retries_due(database_url)
        worker.drainer.drain()
        assert worker.drainer.sink_state == SINK_OK and worker.readiness()[0] is True
        assert shipped_metric(worker.metrics, "memory") == 3
        assert remaining(db) == []
    finally:
        worker.close()


def same_answer_for_all(detail: str) -> Callable[[Any], RejectedError]:
    return lambda event: RejectedError(f"HTTP 400: {detail}", status=400, detail=detail)


def test_the_breaker_holds_a_batch_whose_every_event_gets_the_same_400(
    database_url: str,
    db: psycopg.Connection[Any],
    settings_for: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    enqueue_n(database_url, 40)
    sink = MemorySink()
    sink.reject = same_answer_for_all("the proxy refused it")
    drainer = make_drainer(settings_for(rejection_breaker=3, unauthorized_pause=30.0), sink)
    with caplog.at_level("INFO", logger="outbox.worker"):
        stats = drainer.drain()
    assert stats.dead == 0
    left = remaining(db)
    assert [(r[1], r[2]) for r in left] == [("pending", 0)] * 40
    assert all("the proxy refused it" in r[3] for r in left)
    assert drainer.sink_state == SINK_REQUEST_REJECTED
    assert 29 < drainer.pause_remaining() <= 30
    # Requests of 40, 20, 10, 5 and 2 events are split; 1 and 1 are refused; 3 is split;
    # its first single event is the third refusal in a row, which stops the split
    # (without the breaker, all 40 would have gone dead in 79 requests).
    assert sink.calls == 9
    actions = [r.__dict__.get("action") for r in caplog.records]
    assert actions.count("rejection_breaker") == 1
    assert "event_rejected" not in actions and "events_dead" not in actions


def test_a_poison_event_still_dies_alone_with_the_breaker_on(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    uuids = enqueue_n(database_url, 64)
    poison = {str(uuids[10]), str(uuids[11]), str(uuids[40])}  # two of them side by side
    sink = MemorySink()
    sink.reject = lambda e: (  # type: ignore[assignment]
        RejectedError("HTTP 400: bad property type", status=400, detail="bad property type")
        if e["uuid"] in poison
        else None
    )
    drainer = make_drainer(settings_for(rejection_breaker=3), sink)
    stats = drainer.drain()
    assert stats.dead == 3
    assert {str(r[0]) for r in remaining(db) if r[1] == "dead"} == poison
    assert len(remaining(db)) == 3
    assert sorted(sink.uuids()) == sorted(str(u) for u in uuids if str(u) not in poison)
    assert drainer.sink_state == SINK_OK


def test_the_breaker_keeps_what_was_buried_before_the_run_of_same_answers(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    """A real poison event found before the endpoint starts refusing everything stays
    dead; the events of the run of same answers and the unsent rest are held."""
    uuids = enqueue_n(database_url, 8)
    poison = str(uuids[0])
    broken = threading.Event()

    def judge(event: Any) -> RejectedError | None:
        if event["uuid"] == poison:
            broken.set()  # from now on the endpoint refuses everything
            return RejectedError("HTTP 400: bad event", status=400, detail="bad event")
        if broken.is_set():
            return RejectedError("HTTP 400: refused", status=400, detail="refused")
        return None

    sink = MemorySink()
    sink.reject = judge  # type: ignore[assignment]
    stats = make_drainer(settings_for(rejection_breaker=2), sink).drain()
    assert stats.dead == 1
    left = remaining(db)
    assert [(str(r[0]), r[1]) for r in left if r[1] == "dead"] == [(poison, "dead")]
    assert [(r[1], r[2]) for r in left if str(r[0]) != poison] == [("pending", 0)] * 7
    assert sink.events == []


@pytest.mark.parametrize(
    ("error", "state", "action"),
    [
        (
            RequestRejectedError(
                "HTTP 400: request missing data payload",
                status=400,
                detail="request missing data payload",
            ),
            SINK_REQUEST_REJECTED,
            "request_rejected",
        ),
        (
            RedirectError(
                "HTTP 301: redirected to https://eu.i.posthog.com/batch/",
                status=301,
                location="https://eu.i.posthog.com/batch/",
            ),
            SINK_REDIRECTED,
            "sink_redirected",
        ),
    ],
)
def test_configuration_errors_keep_everything_pending_and_pause(
    error: Exception,
    state: str,
    action: str,
    database_url: str,
    db: psycopg.Connection[Any],
    settings_for: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    enqueue_n(database_url, 6)
    sink = MemorySink()
    sink.fail_with(error)
    worker = Worker(settings_for(unauthorized_pause=45.0), sink=sink)
    try:
        with caplog.at_level("INFO", logger="outbox.worker"):
            stats = worker.drainer.drain()
        assert stats.deferred == 6 and stats.dead == 0 and stats.retried == 0
        assert [(r[1], r[2]) for r in remaining(db)] == [("pending", 0)] * 6
        assert worker.drainer.sink_state == state
        assert 44 < worker.drainer.pause_remaining() <= 45
        ready, why = worker.readiness()
        assert ready is False and str(error) in why
        [line] = [r for r in caplog.records if r.__dict__.get("action") == action]
        assert line.levelname == "ERROR"
        if isinstance(error, RedirectError):
            assert error.location and error.location in line.getMessage()
        metric = worker.metrics.registry.get_sample_value(
            "outbox_events_failed_total", {"reason": state}
        )
        assert metric == 6
        assert worker.metrics.registry.get_sample_value("outbox_sink_state", {"state": state}) == 1
    finally:
        worker.close()


def test_a_retry_after_of_days_is_clamped_and_logged(
    database_url: str,
    db: psycopg.Connection[Any],
    settings_for: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    enqueue_n(database_url, 2)
    sink = MemorySink()
    sink.fail_with(RateLimitedError("HTTP 429: slow down", retry_after=3 * 86400.0))
    drainer = make_drainer(settings_for(retry_after_max=120.0), sink)
    with caplog.at_level("INFO", logger="outbox.worker"):
        drainer.drain()
    assert 119 < drainer.pause_remaining() <= 120
    [line] = [r for r in caplog.records if r.__dict__.get("action") == "retry_after_clamped"]
    assert line.__dict__["retry_after"] == 3 * 86400.0 and line.__dict__["pause_seconds"] == 120
    row = db.execute(
        "SELECT max(extract(epoch FROM next_attempt_at - now())) FROM outbox_events"
    ).fetchone()
    assert row is not None and 115 < float(row[0]) <= 120
    # A Retry-After under the bound is taken as it is, and logs nothing of the kind.
    caplog.clear()
    drainer.paused_until = 0
    make_retries_due(database_url)
    sink.fail_with(RateLimitedError("HTTP 429: slow down", retry_after=30.0))
    with caplog.at_level("INFO", logger="outbox.worker"):
        drainer.drain()
    assert 29 < drainer.pause_remaining() <= 30
    assert not [r for r in caplog.records if r.__dict__.get("action") == "retry_after_clamped"]


def test_run_until_empty_truncates_an_event_table_it_drained(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    """A worker run from cron has no housekeeping job: its drain ends with the
    engine's upkeep, which truncates every event table whose rows are all delivered
    (but the one enqueue writes to now)."""
    row = db.execute("SELECT outbox_snapshot_slot()").fetchone()
    assert row is not None
    table = (int(row[0]) + 1) % EVENT_TABLES  # one enqueue wrote to earlier, say
    with psycopg.connect(database_url) as conn:
        insert_events(
            conn, [{"uuid": uuid.uuid4(), "event": f"e{i}", "distinct_id": "u"} for i in range(50)],
            table=table,
        )  # fmt: skip
    assert event_table_bytes(database_url)[table] > 0
    sink = MemorySink()
    assert Worker(settings_for(), sink=sink).run_until_empty().shipped == 50
    assert event_table_bytes(database_url)[table] == 0
    assert remaining(db) == []


def test_the_worker_runs_the_engines_upkeep_every_backlog_refresh(
    in_process_workers: Callable[..., Worker],
) -> None:
    from worker.app import MAINTAIN_INTERVAL, METRICS_REFRESH_INTERVAL

    worker = in_process_workers()
    assert worker._scheduler is not None
    job = worker._scheduler.get_job("maintain")
    assert job is not None and job.func == worker.maintain
    assert job.trigger.interval.total_seconds() == MAINTAIN_INTERVAL == METRICS_REFRESH_INTERVAL


def test_two_workers_each_get_batches_of_one_backlog(
    database_url: str, db: psycopg.Connection[Any], settings_for: Callable[..., Settings]
) -> None:
    # One backlog (eight transactions, one interval between two ticks) that a tick with
    # OUTBOX_SPLIT_ROWS=100 makes several batches of: two workers drain it at once,
    # each sends some of it while the other is sending too, and no event goes twice.
    # A tick just before (of one event), so that the interval holds little but these
    # transactions (the txids of the whole server's other work count in its range).
    uuids = enqueue_n(database_url, 1, prefix="first-")
    ticker = SnapshotStorage(database_url)
    ticker.maintain()
    ticker.close()
    for i in range(8):
        uuids += enqueue_n(database_url, 100, prefix=f"t{i}-")
    both_sending = threading.Barrier(2, timeout=30)

    class MeetingSink(MemorySink):
        """Its first send waits until the other worker's first send has begun."""

        def send(self, events: Any) -> None:
            if self.calls == 0:
                both_sending.wait()
            super().send(events)

    sinks = [MeetingSink(), MeetingSink()]
    workers = [
        Worker(settings_for(batch_size=50, split_rows=100, worker_id=f"w{i}"), sink=sink)
        for i, sink in enumerate(sinks)
    ]
    stats: list[Any] = [None, None]

    def drain(i: int) -> None:
        stats[i] = workers[i].drainer.drain()

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    try:
        # The worker's housekeeping ticks with its OUTBOX_SPLIT_ROWS. (Had the workers'
        # claims ticked, one of them might find the tick taken and nothing to claim yet.)
        workers[0].maintain()
        batches = db.execute("SELECT count(*) FROM outbox_batches").fetchone()
        assert batches is not None and batches[0] >= 3
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for w in workers:
            w.close()
    assert not both_sending.broken  # each worker held a batch while the other did
    got = [set(s.uuids()) for s in sinks]
    assert got[0] and got[1]
    assert not got[0] & got[1]
    assert sum(len(s.uuids()) for s in sinks) == 801
    assert got[0] | got[1] == {str(u) for u in uuids}
    assert stats[0].shipped + stats[1].shipped == 801
    assert remaining(db) == []
