"""The PostHog sink's bodies compressed ahead (``prepare``): what arrives is what a
plain ``send`` delivers, whatever was prepared, against the project's capture server."""

from __future__ import annotations

import gzip
import threading
import uuid
from datetime import UTC, datetime

from worker.sinks import Outbound, PostHogSink
from worker.testing import CaptureServer


def events(n: int, tag: str = "e") -> list[Outbound]:
    return [
        Outbound.from_data(
            {
                "event": tag,
                "distinct_id": f"user-{i}",
                "properties": {"i": i, "text": "ünïcode ✓ " * 20, "$ignore_sent_at": True},
                "uuid": str(uuid.uuid4()),
                "timestamp": "2026-01-01T00:00:00+00:00",
            }
        )
        for i in range(n)
    ]


def uuids(batch: list[Outbound]) -> list[str]:
    return [str(e.data["uuid"]) for e in batch]


def gzip_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("outbox-gzip")]


def test_a_prepared_batch_arrives_as_an_unprepared_one_does() -> None:
    batch = events(300)
    with CaptureServer() as server:
        plain = PostHogSink("phc_key", server.url, gzip=True)
        plain.send(batch)
        plain.close()
        ahead = PostHogSink("phc_key", server.url, gzip=True)
        ahead.prepare(batch)
        ahead.send(batch)
        ahead.close()
        first, second = server.requests
    assert first.gzip and second.gzip
    assert first.events == second.events == [e.data for e in batch]
    assert second.api_key == "phc_key"
    # The body is one gzip member, compressed at the sink's level (within a few bytes
    # of the one-shot compression of the same JSON).
    assert abs(first.raw_size - second.raw_size) < 64
    assert second.raw_size < 0.5 * sum(len(e.json) for e in batch)


def test_sent_at_is_the_time_of_sending_not_of_preparing() -> None:
    batch = events(5)
    captured: list[bytes] = []
    with CaptureServer() as server:
        sink = PostHogSink("phc_key", server.url, gzip=True)
        original = sink._session.post

        def post(url: str, data: bytes, **kwargs: object) -> object:
            captured.append(data)
            return original(url, data=data, **kwargs)  # type: ignore[arg-type]

        sink._session.post = post  # type: ignore[method-assign]
        sink.prepare(batch)
        sent_after = datetime.now(UTC)
        sink.send(batch)
        sink.close()
    body = gzip.decompress(captured[0]).decode()
    sent_at = datetime.fromisoformat(body.rsplit('"sent_at":"', 1)[1][:-2])
    assert sent_at >= sent_after


def test_a_batch_split_after_preparing_sends_only_its_own_events() -> None:
    batch = events(40)
    with CaptureServer() as server:
        sink = PostHogSink("phc_key", server.url, gzip=True)
        sink.prepare(batch)
        sink.send(batch[:20])  # same first event, fewer events: compressed afresh
        sink.send(batch[20:])
        sink.close()
        got = [r.events for r in server.requests]
    assert [[e["uuid"] for e in r] for r in got] == [uuids(batch[:20]), uuids(batch[20:])]


def test_the_same_events_in_new_objects_are_compressed_afresh() -> None:
    batch = events(3)
    copies = [Outbound(e.json) for e in batch]
    with CaptureServer() as server:
        sink = PostHogSink("phc_key", server.url, gzip=True)
        sink.prepare(batch)
        sink.send(copies)
        sink.close()
        (request,) = server.requests
    assert [e["uuid"] for e in request.events] == uuids(batch)


def test_prepared_bodies_never_sent_are_dropped_and_the_rest_still_send() -> None:
    batches = [events(2, tag=f"b{i}") for i in range(10)]
    with CaptureServer() as server:
        sink = PostHogSink("phc_key", server.url, gzip=True)
        for batch in batches:
            sink.prepare(batch)
        assert len(sink._prepared) <= 4
        sink.send(batches[0])  # its body was dropped: compressed now
        sink.send(batches[-1])
        sink.close()
        got = [[e["event"] for e in r.events] for r in server.requests]
    assert got == [["b0", "b0"], ["b9", "b9"]]


def test_close_stops_the_compressing_thread() -> None:
    with CaptureServer() as server:
        sink = PostHogSink("phc_key", server.url, gzip=True)
        sink.prepare(events(2))
        assert gzip_threads()
        sink.close()
        sink.close()
    assert not gzip_threads()


def test_without_gzip_or_through_posthog_python_prepare_does_nothing() -> None:
    with CaptureServer() as server:
        for sink in (
            PostHogSink("phc_key", server.url, gzip=False),
            PostHogSink("phc_key", server.url, gzip=True, transport="posthog"),
        ):
            batch = events(2)
            sink.prepare(batch)
            assert not sink._prepared
            sink.send(batch)
            sink.close()
        plain, through_posthog = server.requests
    assert not plain.gzip and through_posthog.gzip
    assert len(plain.events) == len(through_posthog.events) == 2
