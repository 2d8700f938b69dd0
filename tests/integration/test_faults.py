"""Every answer PostHog's capture API can give, injected by the capture endpoint, with a
running worker (scheduler and all). Assertions are on what reached the endpoint (by
uuid) and what is left in the table."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from typing import Any

import psycopg
import pytest

import outbox
from tests.conftest import capture_requests, wait_for
from worker.app import Worker
from worker.settings import Settings
from worker.testing import CaptureServer, Reply


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
    return db.execute(
        "SELECT uuid::text, status, attempts, last_error FROM outbox_events ORDER BY id"
    ).fetchall()


@pytest.fixture
def running(
    capture: CaptureServer, settings_for: Callable[..., Settings]
) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(**overrides: Any) -> Worker:
        settings = settings_for(
            posthog_api_key="phc_test", posthog_host=capture.url, gzip=False, **overrides
        )
        worker = Worker(settings)
        worker.start()
        workers.append(worker)
        return worker

    yield start
    for w in workers:
        w.stop()


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
    # A timed-out request may still have been accepted: re-sends carry the same uuids,
    # so at worst PostHog sees a duplicate it can drop; nothing is missing.
    assert set(capture.uuids()) == uuids
