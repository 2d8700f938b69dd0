"""The drain over capture v1 against a real PostgreSQL and CaptureServer's v1 endpoint:
per-event drops die with PostHog's reason, retries are sent again alone, nothing is split,
and a billing limit counts attempts instead of deferring for ever."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.conftest import capture_requests, make_retries_due
from tests.integration.test_drain import enqueue_n, make_drainer, remaining
from worker.app import Worker, build_sink
from worker.drain import SINK_BACKING_OFF, SINK_OK, SINK_RATE_LIMITED, SINK_REQUEST_REJECTED
from worker.metrics import WorkerMetrics
from worker.settings import Settings, SettingsError
from worker.sinks.posthog_v1 import V1_PATH, PostHogV1Sink
from worker.testing import CaptureServer, Reply


def v1_settings(settings_for: Callable[..., Settings], url: str, **overrides: Any) -> Settings:
    return settings_for(
        posthog_api_key="phc_test", posthog_host=url, posthog_transport="v1", **overrides
    )


def n_of(event: dict[str, Any]) -> Any:
    return event["properties"].get("i")


def test_the_worker_ships_over_v1_with_the_rows_uuid_and_timestamp(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    uuids = enqueue_n(database_url, 30)
    stamps = dict(db.execute("SELECT uuid, timestamp FROM outbox_events").fetchall())
    stats = Worker(v1_settings(settings_for, capture.url)).run_until_empty()
    assert stats.shipped == 30 and stats.clean
    assert capture.uuids() == [str(u) for u in uuids]
    assert {r.path for r in capture_requests(capture)} == {V1_PATH}
    for event in capture.events:
        stamp = stamps[uuid.UUID(event["uuid"])]
        assert event["timestamp"] == stamp.isoformat()
        assert event["properties"]["$ignore_sent_at"] is True  # from disable_skew_correction
    wire = capture_requests(capture)[0].events[0]
    assert wire["options"]["disable_skew_correction"] is True
    assert "$ignore_sent_at" not in wire["properties"]
    assert remaining(db) == []


def test_a_dropped_event_dies_with_posthogs_reason_and_nothing_is_split(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    uuids = enqueue_n(database_url, 20)
    capture.v1.verdict(lambda e: n_of(e) in (4, 13), "drop", "event_restriction_drop")
    metrics = WorkerMetrics()
    settings = v1_settings(settings_for, capture.url)
    drainer = make_drainer(settings, PostHogV1Sink("phc_test", capture.url))
    drainer.observer = metrics
    stats = drainer.drain()
    assert len(capture_requests(capture)) == 1  # the v0 transport would have split the batch
    assert stats.shipped == 18 and stats.dead == 2 and stats.retried == 0
    dead = {str(uuids[4]), str(uuids[13])}
    assert sorted(capture.uuids()) == sorted(str(u) for u in uuids if str(u) not in dead)
    left = remaining(db)
    assert {(str(r[0]), r[1]) for r in left} == {(u, "dead") for u in dead}
    assert all(r[3] == "dropped by PostHog: event_restriction_drop" for r in left)
    assert drainer.sink_state == SINK_OK
    assert metrics.events_failed.labels("rejected")._value.get() == 2


def test_a_retry_event_is_sent_again_alone_with_an_attempt_counted(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    uuids = enqueue_n(database_url, 10)
    capture.v1.verdict(lambda e: n_of(e) == 7, "retry", times=1)
    settings = v1_settings(settings_for, capture.url)
    drainer = make_drainer(settings, PostHogV1Sink("phc_test", capture.url))
    drainer.observer = metrics = WorkerMetrics()
    first = drainer.drain()
    assert first.shipped == 9 and first.retried == 1
    assert metrics.events_failed.labels("transient")._value.get() == 1
    assert drainer.sink_state == SINK_BACKING_OFF
    [(uid, status, attempts, error)] = remaining(db)
    assert (str(uid), status, attempts) == (str(uuids[7]), "pending", 1)
    assert "not_persisted" in error
    make_retries_due(database_url)
    second = drainer.drain()
    assert second.shipped == 1 and second.clean
    assert [list(a.results) for a in capture.v1.answers][1] == [str(uuids[7])]
    assert sorted(capture.uuids()) == sorted(str(u) for u in uuids)  # each exactly once
    assert remaining(db) == []


def test_the_billing_limit_pauses_and_counts_attempts_until_the_events_die(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    enqueue_n(database_url, 5)
    capture.v1.billing_limit = 402
    settings = v1_settings(settings_for, capture.url, max_attempts=2, rate_limit_pause=30.0)
    drainer = make_drainer(settings, PostHogV1Sink("phc_test", capture.url))
    drainer.observer = metrics = WorkerMetrics()
    stats = drainer.drain()
    assert stats.retried == 5 and stats.shipped == 0
    assert metrics.events_failed.labels("transient")._value.get() == 5
    assert drainer.sink_state == SINK_RATE_LIMITED
    assert 29 < drainer.pause_remaining() <= 30
    assert "billing_limit_exceeded" in (drainer.last_error or "")
    assert [(r[1], r[2]) for r in remaining(db)] == [("pending", 1)] * 5
    # The pause holds every request back, even for due rows.
    make_retries_due(database_url)
    drainer.drain()
    assert len(capture_requests(capture)) == 1
    # Once it is over, the next refusal uses the last attempt: dead, not pending for ever.
    drainer.paused_until = 0
    stats = drainer.drain()
    assert stats.dead_by_retry == 5
    left = remaining(db)
    assert [(r[1], r[2]) for r in left] == [("dead", 2)] * 5
    assert all("HTTP 402 billing_limit_exceeded" in r[3] for r in left)
    assert capture.events == []


def test_the_pause_after_a_billing_limit_is_bounded(
    database_url: str, capture: CaptureServer, settings_for: Callable[..., Settings]
) -> None:
    enqueue_n(database_url, 1)
    capture.enqueue_reply(
        Reply(
            status=429,
            retry_after=86_400,
            body={"error": "billing_limit_exceeded", "error_description": "over"},
        )
    )
    settings = v1_settings(settings_for, capture.url, rate_limit_pause=5.0, retry_after_max=60.0)
    drainer = make_drainer(settings, PostHogV1Sink("phc_test", capture.url))
    assert drainer.drain().retried == 1
    assert 59 < drainer.pause_remaining() <= 60  # a day's Retry-After, cut to its maximum


def test_a_rate_limit_defers_without_an_attempt(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    enqueue_n(database_url, 3)
    capture.enqueue_reply(Reply(status=429, retry_after=20))
    drainer = make_drainer(
        v1_settings(settings_for, capture.url), PostHogV1Sink("phc_test", capture.url)
    )
    stats = drainer.drain()
    assert stats.deferred == 3 and stats.retried == 0
    assert drainer.sink_state == SINK_RATE_LIMITED
    assert [(r[1], r[2]) for r in remaining(db)] == [("pending", 0)] * 3


def test_a_400_for_the_whole_request_keeps_every_event_pending(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    enqueue_n(database_url, 6)
    capture.enqueue_reply(
        Reply(
            status=400,
            body={"error": "missing_required_headers", "error_description": "PostHog-Attempt"},
        )
    )
    drainer = make_drainer(
        v1_settings(settings_for, capture.url), PostHogV1Sink("phc_test", capture.url)
    )
    stats = drainer.drain()
    assert stats.deferred == 6 and stats.dead == 0 and stats.retried == 0
    assert len(capture_requests(capture)) == 1  # not split: the request's form is at fault
    assert drainer.sink_state == SINK_REQUEST_REJECTED
    assert [(r[1], r[2]) for r in remaining(db)] == [("pending", 0)] * 6


def test_the_transport_setting_builds_the_v1_sink() -> None:
    settings = Settings.from_env(
        {"POSTHOG_API_KEY": "phc_k", "OUTBOX_POSTHOG_TRANSPORT": "v1"},
        database_url="postgresql://u@h/d",
    )
    assert settings.posthog_transport == "v1"
    sink = build_sink(settings)
    assert isinstance(sink, PostHogV1Sink) and sink.name == "posthog"
    sink.close()
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"OUTBOX_POSTHOG_TRANSPORT": "v2"})
    message = str(info.value)
    assert "OUTBOX_POSTHOG_TRANSPORT" in message and "v2" in message
    assert "direct, posthog or v1" in message
