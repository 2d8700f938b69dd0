"""The capture v1 sink against CaptureServer's v1 endpoint: the wire form, the per-event
answers, and each refusal of a whole request."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from worker.sinks import (
    Outbound,
    RateLimitedError,
    RedirectError,
    RejectedError,
    RequestRejectedError,
    RetryableSinkError,
    SinkError,
    UnauthorizedError,
)
from worker.sinks.base import BillingLimitedError, EventResultsError
from worker.sinks.posthog_v1 import (
    SDK_INFO,
    V1_PATH,
    PostHogV1Sink,
    _prepare,
    _splice,
    to_v1_event,
)
from worker.storage.base import ClaimedEvent
from worker.testing import CaptureServer, Reply

KEY = "phc_v1_secret_key"


@pytest.fixture
def srv() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


@pytest.fixture
def sink(srv: CaptureServer) -> Iterator[PostHogV1Sink]:
    s = PostHogV1Sink(KEY, srv.url, timeout=2.0)
    yield s
    s.close()


def stored(n: int, **overrides: Any) -> list[Outbound]:
    """Events as the drainer hands them over (the row's JSON, $ignore_sent_at added)."""
    return [
        Outbound.from_data(
            {
                "event": "e",
                "distinct_id": f"user-{i}",
                "properties": {"n": i, "$ignore_sent_at": True, "$geoip_disable": True},
                "uuid": str(uuid.uuid4()),
                "timestamp": "2026-01-01T00:00:00+00:00",
                **overrides,
            }
        )
        for i in range(n)
    ]


def uuids(events: list[Outbound]) -> list[str]:
    return [str(e.data["uuid"]) for e in events]


def test_to_v1_event_moves_the_legacy_sentinels() -> None:
    wire = to_v1_event(
        {
            "event": "e",
            "distinct_id": 42,
            "uuid": "u",
            "timestamp": "2026-01-01T00:00:00",
            "$set": {"plan": "pro"},
            "properties": {
                "$ignore_sent_at": True,
                "$cookieless_mode": "false",
                "$process_person_profile": 0,
                "$product_tour_id": "tour",
                "$session_id": "s",
                "$window_id": 7,
                "$lib": "web",
                "$lib_version": "1",
                "kept": 1,
            },
        }
    )
    assert wire == {
        "event": "e",
        "uuid": "u",
        "distinct_id": "42",
        "timestamp": "2026-01-01T00:00:00+00:00",
        "session_id": "s",
        "options": {
            "disable_skew_correction": True,
            "cookieless_mode": False,
            "process_person_profile": False,
            "product_tour_id": "tour",
        },
        "properties": {"kept": 1, "$set": {"plan": "pro"}},
    }


def test_to_v1_event_leaves_what_posthog_drops_alone_to_posthog() -> None:
    wire = to_v1_event({"event": "e", "uuid": "u", "properties": [1], "timestamp": "soon"})
    assert wire["properties"] == [1] and wire["timestamp"] == "soon"
    assert wire["distinct_id"] == "" and wire["options"] == {}
    when = to_v1_event({"timestamp": datetime(2026, 1, 1)})["timestamp"]
    assert when == "2026-01-01T00:00:00+00:00"


def test_delivers_with_bearer_auth_and_the_row_timestamp_kept(
    srv: CaptureServer, sink: PostHogV1Sink
) -> None:
    batch = stored(3)
    sink.send(batch)
    assert srv.uuids() == uuids(batch)
    request = srv.requests[0]
    assert request.path == V1_PATH and request.gzip and request.api_key == KEY
    assert request.headers["posthog-sdk-info"] == SDK_INFO
    assert request.headers["posthog-attempt"] == "1"
    uuid.UUID(request.headers["posthog-request-id"])
    assert all("api_key" not in e for e in request.events)
    assert request.events[0]["options"] == {"disable_skew_correction": True}
    event = srv.events[0]
    assert event["timestamp"] == "2026-01-01T00:00:00+00:00"
    assert event["properties"]["$ignore_sent_at"] is True
    assert event["properties"]["$geoip_disable"] is True
    assert event["properties"]["$lib"] == "posthog-outbox"


def test_without_gzip(srv: CaptureServer) -> None:
    sink = PostHogV1Sink(KEY, srv.url, gzip=False)
    sink.send(stored(1))
    assert srv.requests[0].headers.get("content-encoding") is None
    assert len(srv.uuids()) == 1


def test_drops_and_retries_are_reported_per_event(srv: CaptureServer, sink: PostHogV1Sink) -> None:
    srv.v1.verdict(lambda e: e["properties"]["n"] == 1, "drop", "event_restriction_drop")
    srv.v1.verdict(lambda e: e["properties"]["n"] == 3, "retry")
    srv.v1.verdict(lambda e: e["properties"]["n"] == 4, "warning")
    batch = stored(5)
    with pytest.raises(EventResultsError) as info:
        sink.send(batch)
    exc = info.value
    assert exc.accepted == [0, 2, 4]
    assert exc.dropped == [(1, "dropped by PostHog: event_restriction_drop")]
    assert exc.retry == [3]
    assert "not_persisted" in exc.retry_error
    assert srv.uuids() == [uuids(batch)[i] for i in (0, 2, 4)]
    assert len(srv.requests) == 1  # no split, no resend: the drainer decides


def test_warnings_are_delivered_and_logged(
    srv: CaptureServer, sink: PostHogV1Sink, caplog: pytest.LogCaptureFixture
) -> None:
    srv.v1.verdict(lambda e: True, "warning", "person_processing_disabled")
    with caplog.at_level(logging.INFO, logger="outbox.worker"):
        sink.send(stored(2))
    assert len(srv.uuids()) == 2
    [record] = [r for r in caplog.records if getattr(r, "action", "") == "v1_event_warnings"]
    assert "person_processing_disabled (2)" in record.getMessage()


def test_events_posthog_would_refuse_the_request_for_are_dropped_here(
    srv: CaptureServer, sink: PostHogV1Sink
) -> None:
    good = stored(1)
    bad = [
        *stored(1, uuid=""),
        *stored(1, uuid="not-a-uuid"),
        *stored(1, event=None),
    ]
    with pytest.raises(EventResultsError) as info:
        sink.send([bad[0], good[0], bad[1], bad[2]])
    exc = info.value
    assert exc.accepted == [1] and exc.retry == []
    assert [(i, why.rsplit("(", 1)[1]) for i, why in exc.dropped] == [
        (0, "missing_event_uuid)"),
        (2, "invalid_event_uuid)"),
        (3, "missing_event_name)"),
    ]
    assert srv.uuids() == uuids(good)
    with pytest.raises(EventResultsError) as only_bad:
        sink.send(bad)
    assert only_bad.value.accepted == [] and len(only_bad.value.dropped) == 3
    assert len(srv.requests) == 1  # nothing left to send: no request


def test_the_same_uuid_twice_goes_in_two_requests(srv: CaptureServer, sink: PostHogV1Sink) -> None:
    first, other = stored(2)
    twin = Outbound.from_data({**first.data, "properties": {"n": 9}})
    sink.send([first, other, twin])
    assert [r.status for r in srv.requests] == [200, 200]
    assert [len(r.events) for r in srv.requests] == [2, 1]
    assert srv.uuids() == [*uuids([first, other]), uuids([first])[0]]


@pytest.mark.parametrize(("status", "retry_after"), [(402, None), (429, 1.0)])
def test_the_billing_limit_is_its_own_error(
    srv: CaptureServer, sink: PostHogV1Sink, status: int, retry_after: float | None
) -> None:
    srv.v1.billing_limit = status
    with pytest.raises(BillingLimitedError) as info:
        sink.send(stored(2))
    assert isinstance(info.value, RetryableSinkError)  # attempts are counted
    assert info.value.reason == "billing_limited"
    assert info.value.retry_after == retry_after
    assert "billing_limit_exceeded" in str(info.value)
    assert srv.events == []


def test_a_plain_429_is_a_rate_limit(srv: CaptureServer, sink: PostHogV1Sink) -> None:
    srv.enqueue_reply(Reply(status=429, retry_after=4))
    with pytest.raises(RateLimitedError) as info:
        sink.send(stored(1))
    assert info.value.retry_after == 4
    assert "rate_limited" in str(info.value)


def test_a_bad_key_is_unauthorized(srv: CaptureServer) -> None:
    sink = PostHogV1Sink("phx_personal_key", srv.url)
    with pytest.raises(UnauthorizedError, match="invalid_api_token") as info:
        sink.send(stored(1))
    assert "phx_personal_key" not in str(info.value)


@pytest.mark.parametrize(
    ("reply", "error", "words"),
    [
        (Reply(status=400), RequestRejectedError, "400 invalid_batch"),
        (Reply(status=415), RequestRejectedError, "415 unsupported_encoding"),
        (Reply(status=413), RejectedError, "413 payload_too_large"),
        (Reply(status=404), RetryableSinkError, "may not serve capture v1"),
        (Reply(status=503), RetryableSinkError, "503 service_unavailable"),
    ],
)
def test_refusals_of_the_whole_request(
    srv: CaptureServer, sink: PostHogV1Sink, reply: Reply, error: type[SinkError], words: str
) -> None:
    srv.enqueue_reply(reply)
    with pytest.raises(error, match=words) as info:
        sink.send(stored(2))
    assert type(info.value) is error
    assert info.value.status == reply.status  # type: ignore[attr-defined]
    assert len(srv.requests) == 1 and srv.events == []


def test_a_redirect_is_not_followed_and_names_its_location(
    srv: CaptureServer, sink: PostHogV1Sink
) -> None:
    moved = "https://eu.example/i/v1/analytics/events"
    srv.enqueue_reply(Reply(status=307, location=moved))
    with pytest.raises(RedirectError) as info:
        sink.send(stored(1))
    assert info.value.location == moved and info.value.status == 307
    assert len(srv.requests) == 1


def test_a_duplicate_uuid_refusal_from_posthog_refuses_the_request(
    srv: CaptureServer, sink: PostHogV1Sink
) -> None:
    srv.enqueue_reply(
        Reply(status=400, body={"error": "duplicate_event_uuid", "error_description": "dup"})
    )
    with pytest.raises(RequestRejectedError, match="HTTP 400 duplicate_event_uuid: dup") as info:
        sink.send(stored(1))
    assert info.value.detail == "duplicate_event_uuid"


def test_error_text_is_bounded_escaped_and_never_shows_the_key(
    srv: CaptureServer, sink: PostHogV1Sink
) -> None:
    srv.enqueue_reply(
        Reply(
            status=500,
            body={"error": "boom\x1b[31m", "error_description": f"{KEY} " + "x" * 5000},
        )
    )
    with pytest.raises(RetryableSinkError) as info:
        sink.send(stored(1))
    text = str(info.value)
    assert KEY not in text and "***" in text
    assert "\x1b" not in text and "\\x1b" in text
    assert len(text) < 600 and "more characters" in text
    assert KEY not in repr(sink)


def test_a_success_without_results_counts_as_delivered(
    srv: CaptureServer, sink: PostHogV1Sink, caplog: pytest.LogCaptureFixture
) -> None:
    srv.enqueue_reply(Reply(status=200, body="OK"))
    with caplog.at_level(logging.WARNING, logger="outbox.worker"):
        sink.send(stored(2))
    assert any(getattr(r, "action", "") == "v1_unreadable_answer" for r in caplog.records)


def test_timeouts_and_refused_connections_are_retryable(srv: CaptureServer) -> None:
    srv.enqueue_reply(Reply(status=200, delay=3))
    with pytest.raises(RetryableSinkError, match="timed out"):
        PostHogV1Sink(KEY, srv.url, timeout=0.3).send(stored(1))
    closed = PostHogV1Sink(KEY, "http://127.0.0.1:1")
    with pytest.raises(RetryableSinkError, match="connection error") as info:
        closed.send(stored(1))
    assert KEY not in str(info.value)


@pytest.mark.parametrize(
    ("event", "distinct_id", "properties"),
    [
        ("e", "user-1", "{}"),
        ("signed up", "user-2", '{"plan": "pro", "n": 3}'),
        ("$ip-event", "u", '{"$ip": "1.2.3.4"}'),  # the store adds no $geoip_disable
        ('quote " and \\ back', 'd "1"', '{"s": "x\\", \\"uuid\\": \\"1\\"}", "é": "ü"}'),
        ("nested", "u", '{"a": {"uuid": "x", "timestamp": "y"}, "b": [1, {"c": null}]}'),
        ("lifted", "u", '{"$session_id": "s-1", "$window_id": "w-1", "$lib": "web"}'),
        ("opted", "u", '{"$process_person_profile": false, "$product_tour_id": "t"}'),
    ],
)
def test_stored_events_are_spliced_as_to_v1_event_builds_them(
    event: str, distinct_id: str, properties: str
) -> None:
    row = ClaimedEvent(
        id=1,
        uuid=uuid.uuid4(),
        event=event,
        distinct_id=distinct_id,
        properties_json=properties,
        timestamp="2026-05-04 03:02:01.123456+00",  # as the claim renders it
        attempts=0,
        has_ip='"$ip"' in properties,
    )
    outbound = row.outbound()
    uid, wire = _prepare(outbound)
    assert uid == str(row.uuid)
    assert json.loads(wire) == to_v1_event(json.loads(outbound.json))
    sentinel = "$session_id" in properties or "$process_person_profile" in properties
    assert (_splice(outbound.json) is None) == sentinel  # those take the decoding path
    assert json.loads(wire)["options"]["disable_skew_correction"] is True
