"""Statements of the README and docs/ that no other unit test checks."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator

import pytest

from worker.database import resolve_database_url
from worker.settings import Settings
from worker.sinks import Outbound, PostHogSink, RetryableSinkError, Sink
from worker.sinks.posthog_v1 import PostHogV1Sink
from worker.testing import CaptureServer, Reply

TRANSPORTS = ["direct", "posthog", "v1"]


def _sink(transport: str, host: str) -> Sink:
    if transport == "v1":
        return PostHogV1Sink("phc_test", host, gzip=False, timeout=5)
    return PostHogSink("phc_test", host, gzip=False, timeout=5, transport=transport)


def _events(n: int) -> list[Outbound]:
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


# -- docs/testing.md: what building Settings directly reads ----------------------------


def test_settings_built_directly_read_no_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_BATCH_SIZE", "7")
    monkeypatch.setenv("POSTHOG_HOST", "https://eu.i.posthog.com")
    monkeypatch.setenv("POSTHOG_API_KEY", "phc_from_the_environment")
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db.example:5432/app")
    settings = Settings()
    assert settings.batch_size == 1000
    assert settings.posthog_host == "https://us.i.posthog.com"
    assert settings.posthog_api_key is None
    assert settings.database_url is None


def test_without_database_url_the_worker_connects_to_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db.example:5432/app")
    settings = Settings()
    assert resolve_database_url(settings.database_url, settings.data_dir) == (
        "postgresql://app@db.example:5432/app"
    )


# -- docs/operations.md: no transport retries a failed request within an attempt --------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_5xx_is_one_request(transport: str) -> None:
    with CaptureServer() as srv:
        srv.enqueue_reply(Reply(status=503, times=5))
        sink = _sink(transport, srv.url)
        try:
            with pytest.raises(RetryableSinkError):
                sink.send(_events(3))
        finally:
            sink.close()
        assert len(srv.requests) == 1
        assert srv.replies_pending == 4


@pytest.fixture
def hang_up() -> Iterator[tuple[str, list[int]]]:
    """A server that accepts each connection and closes it without a word; counts them."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)  # so the loop sees ``stop``
    accepted: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_dropped_connection_is_one_connection(
    transport: str, hang_up: tuple[str, list[int]]
) -> None:
    url, accepted = hang_up
    sink = _sink(transport, url)
    try:
        with pytest.raises(RetryableSinkError, match="connection error"):
            sink.send(_events(3))
    finally:
        sink.close()
    assert len(accepted) == 1
