"""One behaviour suite, run against every sink.

Each harness wraps a sink and knows how to make it fail in each way it can; a sink
that cannot fail in some way (stdout is never rate limited) skips only that case.
"""

from __future__ import annotations

import contextlib
import io
import json
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

import pytest

from worker.sinks import (
    MemorySink,
    Outbound,
    PostHogSink,
    RateLimitedError,
    RedirectError,
    RejectedError,
    RequestRejectedError,
    RetryableSinkError,
    Sink,
    SinkError,
    StdoutSink,
    UnauthorizedError,
)
from worker.testing import CaptureServer, Reply
from worker.testing import posthog_errors as texts

TRANSIENT, RATE_LIMITED, UNAUTHORIZED, REJECTED, REDIRECTED, REQUEST_REJECTED = (
    "transient",
    "rate_limited",
    "unauthorized",
    "rejected",
    "redirected",
    "request_rejected",
)
#: Where the scripted redirects point.
MOVED_TO = "https://eu.i.posthog.com/batch/"


class Harness(Protocol):
    sink: Sink

    def delivered(self) -> list[str]: ...

    def script(self, failure: str, retry_after: float | None = None) -> None: ...


class MemoryHarness:
    def __init__(self) -> None:
        self.sink = MemorySink()

    def delivered(self) -> list[str]:
        return self.sink.uuids()

    def script(self, failure: str, retry_after: float | None = None) -> None:
        errors: dict[str, SinkError] = {
            TRANSIENT: RetryableSinkError("down"),
            RATE_LIMITED: RateLimitedError("slow down", retry_after=retry_after),
            UNAUTHORIZED: UnauthorizedError("bad key"),
            REJECTED: RejectedError("bad event"),
            REDIRECTED: RedirectError(f"moved to {MOVED_TO}", status=301, location=MOVED_TO),
            REQUEST_REJECTED: RequestRejectedError(texts.EMPTY_PAYLOAD, status=400),
        }
        self.sink.fail_with(errors[failure])


class PostHogHarness:
    """The PostHog sink (either transport) against the project's capture endpoint."""

    def __init__(self, server: CaptureServer, transport: str = "direct") -> None:
        self.server = server
        self.sink = PostHogSink("phc_key", server.url, gzip=True, timeout=2.0, transport=transport)

    def delivered(self) -> list[str]:
        return self.server.uuids()

    def script(self, failure: str, retry_after: float | None = None) -> None:
        replies = {
            TRANSIENT: Reply(status=503),
            RATE_LIMITED: Reply(status=429, retry_after=retry_after),
            UNAUTHORIZED: Reply(status=401),
            # PostHog's text for an event it refuses.
            REJECTED: Reply(status=400),
            # Followed, it would be a GET of the same endpoint: a 400 with no body.
            REDIRECTED: Reply(status=301, location=MOVED_TO),
            REQUEST_REJECTED: Reply(status=400, body=texts.EMPTY_PAYLOAD),
        }
        self.server.enqueue_reply(replies[failure])


class StdoutHarness:
    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.sink = StdoutSink(self.stream)

    def delivered(self) -> list[str]:
        if self.stream.closed:
            return []
        return [json.loads(line)["uuid"] for line in self.stream.getvalue().splitlines()]

    def script(self, failure: str, retry_after: float | None = None) -> None:
        broken = io.StringIO()
        broken.close()
        self.sink.stream = broken  # type: ignore[attr-defined]

    def heal(self) -> None:
        self.sink.stream = self.stream  # type: ignore[attr-defined]


ALL = (TRANSIENT, RATE_LIMITED, UNAUTHORIZED, REJECTED, REDIRECTED, REQUEST_REJECTED)
#: The failures each sink can meet; the suite runs each case where it applies.
CAPABILITIES = {
    "memory": ALL,
    "posthog": ALL,
    "posthog-batch_post": ALL,
    "stdout": (TRANSIENT,),
}


@contextlib.contextmanager
def make_harness(kind: str) -> Iterator[Any]:
    if kind == "memory":
        yield MemoryHarness()
    elif kind.startswith("posthog"):
        with CaptureServer() as server:
            yield PostHogHarness(server, "posthog" if kind.endswith("batch_post") else "direct")
    else:
        yield StdoutHarness()


@pytest.fixture(params=list(CAPABILITIES))
def harness(request: pytest.FixtureRequest) -> Iterator[Any]:
    with make_harness(request.param) as h:
        yield h


ERRORS: dict[str, type[SinkError]] = {
    TRANSIENT: RetryableSinkError,
    RATE_LIMITED: RateLimitedError,
    UNAUTHORIZED: UnauthorizedError,
    REJECTED: RejectedError,
    REDIRECTED: RedirectError,
    REQUEST_REJECTED: RequestRejectedError,
}
FAILURE_CASES = [(kind, f) for kind, fs in CAPABILITIES.items() for f in fs]


def events(n: int) -> list[Outbound]:
    return [
        Outbound.from_data(
            {
                "event": "e",
                "distinct_id": f"user-{i}",
                "properties": {"i": i, "$ignore_sent_at": True},
                "uuid": str(uuid.uuid4()),
                "timestamp": "2026-01-01T00:00:00+00:00",
            }
        )
        for i in range(n)
    ]


def test_is_a_sink_with_a_name(harness: Any) -> None:
    assert isinstance(harness.sink, Sink)
    assert harness.sink.name in ("memory", "posthog", "stdout")


def test_delivers_every_event_in_order_with_its_uuid(harness: Any) -> None:
    batch = events(25)
    harness.sink.send(batch)
    assert harness.delivered() == [e.data["uuid"] for e in batch]


@pytest.mark.parametrize(("kind", "failure"), FAILURE_CASES)
def test_each_failure_raises_its_error_and_delivers_nothing(kind: str, failure: str) -> None:
    with make_harness(kind) as harness:
        harness.script(failure)
        with pytest.raises(ERRORS[failure]) as info:
            harness.sink.send(events(3))
        assert type(info.value) is ERRORS[failure]
        assert info.value.reason == failure
        assert harness.delivered() == []


@pytest.mark.parametrize("kind", [k for k, fs in CAPABILITIES.items() if REDIRECTED in fs])
def test_a_redirect_is_never_followed_and_names_its_location(kind: str) -> None:
    with make_harness(kind) as harness:
        harness.script(REDIRECTED)
        with pytest.raises(RedirectError) as info:
            harness.sink.send(events(2))
        assert info.value.location == MOVED_TO and MOVED_TO in str(info.value)
        if isinstance(harness, PostHogHarness):
            assert [r.method for r in harness.server.requests] == ["POST"]
        # Nothing was lost: the same batch goes through once the host answers.
        batch = events(2)
        harness.sink.send(batch)
        assert harness.delivered() == [e.data["uuid"] for e in batch]


@pytest.mark.parametrize("kind", [k for k, fs in CAPABILITIES.items() if REJECTED in fs])
def test_a_rejection_says_what_the_endpoint_answered(kind: str) -> None:
    with make_harness(kind) as harness:
        harness.script(REJECTED)
        with pytest.raises(RejectedError) as info:
            harness.sink.send(events(2))
        assert info.value.detail
        harness.script(REQUEST_REJECTED)
        with pytest.raises(RequestRejectedError) as request_info:
            harness.sink.send(events(2))
        assert texts.EMPTY_PAYLOAD in request_info.value.detail


def test_a_failed_batch_can_be_sent_again(harness: Any) -> None:
    """Retryable failures are not terminal: the same batch (same uuids) goes through later."""
    batch = events(5)
    harness.script(TRANSIENT)
    with pytest.raises(RetryableSinkError):
        harness.sink.send(batch)
    if isinstance(harness, StdoutHarness):
        harness.heal()
    harness.sink.send(batch)
    assert harness.delivered() == [e.data["uuid"] for e in batch]


@pytest.mark.parametrize("kind", [k for k, fs in CAPABILITIES.items() if RATE_LIMITED in fs])
def test_rate_limit_carries_retry_after(kind: str) -> None:
    with make_harness(kind) as harness:
        harness.script(RATE_LIMITED, retry_after=7)
        with pytest.raises(RateLimitedError) as info:
            harness.sink.send(events(1))
        assert info.value.retry_after == 7


def test_close_is_safe_twice(harness: Any) -> None:
    harness.sink.close()
    harness.sink.close()


def test_posthog_sink_never_shows_its_key() -> None:
    sink = PostHogSink("phc_secret_value", "http://127.0.0.1:1")
    assert "phc_secret_value" not in repr(sink)
    with pytest.raises(RetryableSinkError) as info:
        sink.send(events(1))
    assert "phc_secret_value" not in str(info.value)


POSTHOG_KINDS = [k for k in CAPABILITIES if k.startswith("posthog")]


@pytest.mark.parametrize("kind", POSTHOG_KINDS)
@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_any_2xx_is_delivery(kind: str, status: int) -> None:
    with make_harness(kind) as harness:
        harness.server.default_reply = Reply(status=status)
        batch = events(3)
        harness.sink.send(batch)  # no error
        assert harness.delivered() == [e.data["uuid"] for e in batch]
        assert [r.status for r in harness.server.requests] == [status]


@pytest.mark.parametrize("kind", POSTHOG_KINDS)
def test_a_get_after_a_followed_redirect_never_happens(kind: str) -> None:
    """requests turns a POST into a bodiless GET when it follows a 301; PostHog answers
    that GET with its empty-payload 400. Pointed at a host that redirects to a working
    one, the sink sends exactly one POST, to the first host, and raises RedirectError."""
    with CaptureServer() as target, CaptureServer() as moved:
        moved.redirect_to = target.url
        sink = PostHogSink(
            "phc_key", moved.url, timeout=2.0, transport="posthog" if "batch" in kind else "direct"
        )
        with pytest.raises(RedirectError) as info:
            sink.send(events(2))
        assert info.value.location == target.url + "/batch/"
        assert info.value.status == 301
        assert target.requests == []
        assert [r.method for r in moved.requests] == ["POST"]
        sink.close()


def test_posthog_sink_timeout_is_retryable() -> None:
    with CaptureServer() as server:
        server.enqueue_reply(Reply(status=200, delay=3))
        sink = PostHogSink("k", server.url, gzip=False, timeout=0.3)
        with pytest.raises(RetryableSinkError, match="timed out"):
            sink.send(events(1))
