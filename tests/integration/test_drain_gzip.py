"""Drains with gzip on, where the PostHog sink compresses each batch claimed ahead
while the one before is on the wire (``PostHogSink.prepare``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

import outbox
from worker.drain import Drainer
from worker.settings import Settings
from worker.sinks import PostHogSink
from worker.storage.snapshot_storage import SnapshotStorage
from worker.testing import CaptureServer


def fill(database_url: str, n: int) -> list[str]:
    with psycopg.connect(database_url) as conn:
        out = outbox.enqueue_many(
            conn,
            [
                {"event": "e", "distinct_id": f"user-{i}", "properties": {"i": i, "s": "ü" * 50}}
                for i in range(n)
            ],
        )
        conn.commit()
    return [str(u) for u in out if u is not None]


def two_connection_drainer(settings: Settings, sink: PostHogSink) -> Drainer:
    assert settings.database_url
    return Drainer(
        SnapshotStorage(settings.database_url, worker_id=settings.worker_id),
        sink,
        settings,
        claim_store=SnapshotStorage(settings.database_url, worker_id=settings.worker_id),
    )


def test_batches_claimed_ahead_arrive_compressed_once_each_in_order(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    uuids = fill(database_url, 2_500)
    sink = PostHogSink("phc_test", capture.url, gzip=True)
    stats = two_connection_drainer(settings_for(batch_size=1_000), sink).drain()
    sink.close()
    assert stats.shipped == 2_500
    assert sorted(capture.uuids()) == sorted(uuids)
    assert len(set(capture.uuids())) == 2_500
    requests = capture.requests
    assert [r.event_count for r in requests] == [1_000, 1_000, 500]
    assert all(r.gzip for r in requests)
    assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,)


def test_a_batch_split_after_it_was_compressed_ahead_sends_the_right_events(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    uuids = fill(database_url, 60)
    poison = uuids[45]
    capture.reject_events(lambda e: e.get("uuid") == poison, status=400, detail="invalid event")
    sink = PostHogSink("phc_test", capture.url, gzip=True)
    two_connection_drainer(settings_for(batch_size=30), sink).drain()
    sink.close()
    assert sorted(capture.uuids()) == sorted(u for u in uuids if u != poison)
    left = db.execute("SELECT uuid::text, status FROM outbox_events").fetchall()
    assert left == [(poison, "dead")]
