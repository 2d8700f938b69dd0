"""Every answer PostHog's capture API can give, injected by the capture endpoint, with a
running worker (scheduler and all). Assertions are on what reached the endpoint (by
uuid) and what is left in the table."""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import psycopg
import pytest

import outbox
from tests.conftest import EVENT_TABLES, capture_requests, make_retries_due, wait_for
from worker.app import Worker
from worker.settings import Settings
from worker.testing import CaptureServer, Reply
from worker.testing import posthog_errors as texts


def enqueue(database_url: str, n: int, size: int = 10) -> set[str]:
    with psycopg.connect(database_url) as conn:
        out = outbox.enqueue_many(
            conn,
            [
                {"event": "e", "distinct_id": f"user-{i}", "properties": {"pad": "x" * size}}
                for i in range(n)
            ],
        )
        conn.commit()
    return {str(u) for u in out}


def left(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """Every undelivered event (the view outbox_events)."""
    return db.execute(
        "SELECT uuid::text, status, attempts, last_error FROM outbox_events"
        ' ORDER BY "timestamp", uuid'
    ).fetchall()


@pytest.fixture
def running(
    capture: CaptureServer, in_process_workers: Callable[..., Worker]
) -> Callable[..., Worker]:
    def start(**overrides: Any) -> Worker:
        return in_process_workers(
            posthog_api_key="phc_test", posthog_host=capture.url, gzip=False, **overrides
        )

    return start


def test_413_on_one_big_event_buries_it_and_ships_the_rest(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.max_event_bytes = 50_000
    small = enqueue(database_url, 12)
    big = enqueue(database_url, 1, size=100_000)
    running()
    capture.wait_for_events(12)
    wait_for(lambda: [r[1] for r in left(db)] == ["dead"])
    assert set(capture.uuids()) == small
    (uuid, status, _, error) = left(db)[0]
    assert {uuid} == big and status == "dead" and "413" in error


def test_413_on_a_big_body_splits_it_and_ships_everything(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.max_body_bytes = 30_000
    uuids = enqueue(database_url, 40, size=2_000)
    running()
    capture.wait_for_events(40)
    assert set(capture.uuids()) == uuids
    assert any(r.status == 413 for r in capture_requests(capture))
    assert all(r.status == 200 or r.status == 413 for r in capture_requests(capture))
    wait_for(lambda: left(db) == [])


def test_400_poison_event_among_many(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    uuids = sorted(enqueue(database_url, 64))
    poison = uuids[41]
    capture.reject_events(lambda e: e["uuid"] == poison, status=400, detail="bad property type")
    running()
    capture.wait_for_events(63)
    wait_for(lambda: [r[1] for r in left(db)] == ["dead"])
    assert set(capture.uuids()) == set(uuids) - {poison}
    assert left(db)[0][0] == poison and "bad property type" in left(db)[0][3]


def test_a_number_posthog_cannot_parse_kills_only_its_own_event(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    """PostHog's parser refuses a number beyond a double's range with a 400 for the
    whole request ("failed to parse request"); json holds it fine. The split finds the
    one event; everything else ships."""
    uuids = sorted(enqueue(database_url, 32))
    poison = uuids[9]
    for t in range(EVENT_TABLES):  # the event table it went into
        db.execute(
            f"""UPDATE outbox_events_{t} SET properties = '{{"n": 1e400}}' WHERE uuid = %s""",
            (poison,),
        )
    running()
    capture.wait_for_events(31)
    wait_for(lambda: [r[1] for r in left(db)] == ["dead"])
    assert set(capture.uuids()) == set(uuids) - {poison}
    assert left(db)[0][0] == poison and "failed to parse request" in left(db)[0][3]


@pytest.mark.parametrize("form", ["seconds", "http-date", "absent"])
def test_429_pauses_sending_for_retry_after(
    form: str,
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    pause = 1.5
    retry_after: str | None = {
        "seconds": "1.5",
        "http-date": formatdate(time.time() + 2.5, usegmt=True),  # whole seconds: 1.5..2.5
        "absent": None,
    }[form]
    capture.enqueue_reply(Reply(status=429, retry_after=retry_after))
    uuids = enqueue(database_url, 5)
    running(rate_limit_pause=pause, poll_interval=0.02)
    capture.wait_for_events(5)
    first, second = capture_requests(capture)[:2]
    assert first.status == 429 and second.status == 200
    assert second.received_at - first.received_at >= pause - 0.05
    assert set(capture.uuids()) == uuids


def test_429_counts_no_attempt(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.enqueue_reply(Reply(status=429, retry_after="60"))
    enqueue(database_url, 5)
    running()
    wait_for(lambda: all(r[3] and "429" in r[3] for r in left(db)))
    assert [(r[1], r[2]) for r in left(db)] == [("pending", 0)] * 5
    time.sleep(0.3)  # the pause holds: nothing else goes out meanwhile
    assert len(capture_requests(capture)) == 1


def test_401_keeps_events_pending_until_the_key_is_fixed(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.default_reply = Reply(status=401)
    uuids = enqueue(database_url, 8)
    worker = running(unauthorized_pause=0.3, max_attempts=1)
    wait_for(lambda: len(capture_requests(capture)) >= 3)  # tried again periodically
    assert worker.readiness()[0] is False
    assert [(r[1], r[2]) for r in left(db)] == [("pending", 0)] * 8
    capture.default_reply = Reply(status=200)  # the key is fixed
    capture.wait_for_events(8)
    assert set(capture.uuids()) == uuids
    wait_for(lambda: left(db) == [])
    wait_for(lambda: worker.readiness()[0])


def test_5xx_storm_then_recovery(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.enqueue_reply(Reply(status=502, times=3), Reply(status=503, times=3), Reply(status=500))
    uuids = enqueue(database_url, 30)
    running(backoff_base=0.01, backoff_max=0.05, max_attempts=20)
    capture.wait_for_events(30)
    assert set(capture.uuids()) == uuids
    assert [r.status for r in capture_requests(capture)[:7]] == [502] * 3 + [503] * 3 + [500]
    wait_for(lambda: left(db) == [])


def test_5xx_forever_makes_events_dead_with_the_reason(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.default_reply = Reply(status=503)
    enqueue(database_url, 4)
    running(backoff_base=0.01, backoff_max=0.02, max_attempts=3)
    wait_for(lambda: [r[1] for r in left(db)] == ["dead"] * 4)
    assert all(r[2] == 3 and "503" in r[3] for r in left(db))
    assert capture.uuids() == []


def test_timeouts_are_retried_and_nothing_is_lost(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.enqueue_reply(Reply(status=200, delay=1.0, times=2))
    uuids = enqueue(database_url, 10)
    running(request_timeout=0.3, backoff_base=0.01, backoff_max=0.05)
    wait_for(lambda: left(db) == [])
    # A timed-out request may still have been accepted: re-sends carry the same uuid and
    # timestamp, so at worst PostHog stores a copy that ClickHouse collapses when it
    # merges; nothing is missing.
    assert set(capture.uuids()) == uuids


def requests_of(server: CaptureServer) -> list[tuple[str, int, int]]:
    """(method, status, events) of every request the server received."""
    return [(r.method, r.status, r.event_count) for r in capture_requests(server)]


def test_a_redirecting_host_keeps_every_event_until_it_is_fixed(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with CaptureServer() as target:
        capture.redirect_to = target.url  # the configured host moved
        uuids = enqueue(database_url, 12)
        with caplog.at_level("INFO", logger="outbox.worker"):
            # The sink's own answer to a 3xx (the key check, which would see the redirect
            # first, is the acceptance test's subject).
            worker = running(unauthorized_pause=0.2, max_attempts=1, verify_api_key=False)
            capture.wait_for_requests(3)  # tried again after each pause
        # Never followed: no GET, nothing sent to where it points, every event waits.
        assert {(m, s) for m, s, _ in requests_of(capture)} == {("POST", 301)}
        assert target.requests == []
        assert [(r[1], r[2]) for r in left(db)] == [("pending", 0)] * 12
        ready, why = worker.readiness()
        assert ready is False and "redirect" in why and target.url + "/batch/" in why
        redirected = [r for r in caplog.records if r.__dict__.get("action") == "sink_redirected"]
        assert redirected and target.url + "/batch/" in redirected[0].getMessage()
        assert redirected[0].__dict__["location"] == target.url + "/batch/"
        capture.redirect_to = None  # the host is fixed
        capture.wait_for_events(12)
        wait_for(lambda: left(db) == [])
        assert sorted(capture.uuids()) == sorted(uuids)  # each exactly once
        assert target.requests == []
        wait_for(lambda: worker.readiness()[0])


@pytest.mark.parametrize(
    "answer",
    [
        texts.EMPTY_PAYLOAD,
        texts.EMPTY_BATCH,
        texts.DECODING_ERROR.format("invalid gzip data"),
    ],
)
def test_400s_about_the_request_bury_nothing(
    answer: str,
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.default_reply = Reply(status=400, body=answer)
    uuids = enqueue(database_url, 20)
    worker = running(unauthorized_pause=0.2, max_attempts=1)
    capture.wait_for_requests(3)
    # Never split: each request carried the whole batch, and nothing went dead.
    assert {(s, n) for _, s, n in requests_of(capture)} == {(400, 20)}
    rows = left(db)
    assert [(r[1], r[2]) for r in rows] == [("pending", 0)] * 20
    assert all(answer in r[3] for r in rows)
    ready, why = worker.readiness()
    assert ready is False and answer in why
    capture.default_reply = Reply()
    capture.wait_for_events(20)
    wait_for(lambda: left(db) == [])
    assert sorted(capture.uuids()) == sorted(uuids)


def test_a_held_batch_comes_back_whole(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    # Every held row gets one due time, so no poll can see part of the batch due.
    capture.default_reply = Reply(status=400, body=texts.EMPTY_BATCH)
    enqueue(database_url, 200)
    running(unauthorized_pause=60.0, max_attempts=1)
    wait_for(lambda: len(capture_requests(capture)) >= 1)
    wait_for(
        lambda: (
            db.execute(
                "SELECT count(*) FROM outbox_events WHERE next_attempt_at > now() + interval '30s'"
            ).fetchone()
            == (200,)
        )
    )
    due = db.execute("SELECT count(DISTINCT next_attempt_at) FROM outbox_events").fetchone()
    assert due == (1,)


def test_the_breaker_stops_a_split_that_keeps_ending_in_the_same_400(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    """An endpoint (a proxy, say) that gives every event the same event-like 400."""
    capture.reject_events(lambda e: True, status=400, detail=texts.NON_RETRYABLE)
    uuids = enqueue(database_url, 64)
    worker = running(unauthorized_pause=30.0, rejection_breaker=3)
    wait_for(lambda: worker.drainer.sink_state == "request_rejected")
    wait_for(lambda: all(r[3] for r in left(db)))
    assert [(r[1], r[2]) for r in left(db)] == [("pending", 0)] * 64
    # A few requests, not the 127 that bisecting down to every single event takes.
    assert len(capture_requests(capture)) < 15
    assert worker.readiness()[0] is False
    capture.clear_rules()
    worker.drainer.paused_until = 0  # the pause is over
    make_retries_due(database_url)
    worker.wake()
    capture.wait_for_events(64)
    wait_for(lambda: left(db) == [])
    assert sorted(capture.uuids()) == sorted(uuids)


@pytest.mark.parametrize("status", [201, 202, 204])
def test_any_2xx_is_delivered(
    status: int,
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.default_reply = Reply(status=status)
    uuids = enqueue(database_url, 15)
    running()
    capture.wait_for_events(15)
    wait_for(lambda: left(db) == [])
    assert sorted(capture.uuids()) == sorted(uuids)
    assert {r.status for r in capture_requests(capture)} == {status}


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_a_retry_after_of_days_is_clamped_and_logged(
    form: str,
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    days = 3 * 86400
    retry_after = str(days) if form == "seconds" else formatdate(time.time() + days, usegmt=True)
    capture.enqueue_reply(Reply(status=429, retry_after=retry_after))
    uuids = enqueue(database_url, 5)
    with caplog.at_level("INFO", logger="outbox.worker"):
        running(retry_after_max=0.5, poll_interval=0.02)
        capture.wait_for_events(5)
    first, second = capture_requests(capture)[0], capture_requests(capture)[1]
    assert (first.status, second.status) == (429, 200)
    assert second.received_at - first.received_at >= 0.45  # the clamped pause held
    assert set(capture.uuids()) == uuids
    [clamped] = [r for r in caplog.records if r.__dict__.get("action") == "retry_after_clamped"]
    assert clamped.__dict__["retry_after"] > days - 5 and clamped.__dict__["pause_seconds"] == 0.5


def test_a_413_after_partial_delivery_resends_copies_that_are_identical(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    """PostHog stores the events before an oversized one and still answers 413 for the
    whole request. Splitting sends those again: same uuid, timestamp, event and
    distinct_id, which is what ClickHouse collapses copies by."""
    capture.max_event_bytes = 50_000
    capture.partial_delivery = True
    small = enqueue(database_url, 12)
    big = enqueue(database_url, 1, size=100_000)
    running()
    wait_for(lambda: [r[1] for r in left(db)] == ["dead"])
    assert {left(db)[0][0]} == big
    received = capture.events
    assert {e["uuid"] for e in received} == small
    assert len(received) > 12  # the partial delivery's events came twice
    copies: dict[str, set[tuple[Any, ...]]] = {}
    for e in received:
        copies.setdefault(e["uuid"], set()).add((e["timestamp"], e["event"], e["distinct_id"]))
    assert all(len(versions) == 1 for versions in copies.values())


ODD_KEY = "tenant-key-7f3a9c2e5b1d8f4a6c0e"  # not shaped like phc_..., masked as configured


def echo(status: int) -> Callable[[CaptureServer, Any], None]:
    """An endpoint that answers every request with its own body, the way some proxies and
    debugging endpoints do, with terminal control characters around it."""

    def route(server: CaptureServer, exchange: Any) -> None:
        raw = exchange.read_body() or b""
        body = "\x1b[31mrefused\x07 " + raw.decode(errors="replace") + "\n" + "z" * 5000
        exchange.respond(status, body.encode())

    return route


@pytest.mark.parametrize("status", [400, 401, 503])
def test_an_endpoint_that_echoes_the_request_never_leaks_the_key(
    status: int,
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    capture.routes["/batch/"] = echo(status)
    enqueue(database_url, 3)
    settings = settings_for(
        posthog_api_key=ODD_KEY, posthog_host=capture.url, gzip=False, max_attempts=1
    )
    worker = Worker(settings)
    try:
        with caplog.at_level("DEBUG"):
            worker.drainer.drain()
        stored = [r[3] for r in left(db)]
        said = [worker.drainer.last_error or "", worker.readiness()[1]]
        logged = [r.getMessage() for r in caplog.records]
    finally:
        worker.close()
    assert stored and all(stored)
    for text in stored + said + logged:
        assert ODD_KEY not in text
        assert "\x1b" not in text and "\x07" not in text
    assert all("***" in text for text in stored)
    assert all(len(text) < 700 for text in stored)
