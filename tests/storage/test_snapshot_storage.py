"""SnapshotStorage's own promises beyond the behaviour suite: leases that ran out, lost
connections, an unreachable database, and retries cut to ``max_bytes``."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from tests.conftest import wait_for
from tests.storage.conftest import POLICY, SnapshotHarness
from worker.storage.base import BatchLostError, BatchOutcome, DatabaseUnavailable
from worker.storage.snapshot import insert_events
from worker.storage.snapshot_storage import SnapshotStorage
from worker.worker_state import WorkerStateUnavailable


def terminate(db: psycopg.Connection[Any], application_name: str) -> None:
    """End the sessions named ``application_name``, and wait until they are gone."""
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (application_name,),
    )
    wait_for(
        lambda: (
            not db.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = %s", (application_name,)
            ).fetchone()
        ),
        what=f"the sessions of {application_name} to exit",
    )


def _events(n: int, size: int = 0) -> list[dict[str, Any]]:
    return [
        {"event": f"e{i}", "distinct_id": "u", "properties": {"pad": "x" * size}} for i in range(n)
    ]


def test_a_lease_that_ran_out_cannot_be_finished_even_if_nobody_took_it(
    harness: SnapshotHarness,
) -> None:
    put = harness.put(_events(2))
    s = harness.new()
    batch = s.claim(10, 10_000_000, 0.3)
    assert batch is not None
    with psycopg.connect(harness.url, autocommit=True) as db:
        wait_for(
            lambda: db.execute(
                "SELECT bool_and(leased_until < now()) FROM outbox_batches"
            ).fetchone()[0],  # type: ignore[index]
            timeout=30,
            what="the lease to run out",
        )
    with pytest.raises(BatchLostError):
        s.finish(batch, BatchOutcome(shipped=[e.id for e in batch.events]), **POLICY)
    again = s.claim(10, 10_000_000, 30.0)
    assert again is not None and {e.uuid for e in again.events} == set(put)


def test_a_batch_outlives_its_connection_and_is_finished_over_the_next(
    harness: SnapshotHarness, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The lease is a row, not a transaction: a connection the server ended while the
    # batch was on the wire costs a reconnect, not a re-send.
    put = harness.put(_events(3))
    s = harness.new()
    batch = s.claim(10, 10_000_000, 30.0)
    assert batch is not None and {e.uuid for e in batch.events} == set(put)
    with psycopg.connect(database_url, autocommit=True) as admin:
        terminate(admin, s.application_name)
    with caplog.at_level(logging.INFO, logger="outbox.worker"):
        done = s.finish(batch, BatchOutcome(shipped=[e.id for e in batch.events]), **POLICY)
    assert done.shipped == 3
    actions = [getattr(r, "action", "") for r in caplog.records]
    assert actions == ["db_connection_reset"]
    assert s.health.problem is None
    assert harness.new(for_batches=False).backlog().pending == 0
    assert s.claim(10, 10_000_000, 30.0) is None


def test_an_unreachable_database_is_unavailable() -> None:
    s = SnapshotStorage("postgresql://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(DatabaseUnavailable):
        s.claim(10, 10_000_000, 30.0)
    assert not s.ping()


def test_retries_are_cut_to_max_bytes_and_the_rest_stay_due(harness: SnapshotHarness) -> None:
    harness.put(_events(3, size=1000))
    s, look = harness.new(), harness.new(for_batches=False)
    batch = s.claim(10, 10_000_000, 30.0)
    s.finish(batch, BatchOutcome(retry=[e.id for e in batch.events], retry_error="x"), **POLICY)
    one = wait_for(lambda: s.claim(10, 1, 30.0), timeout=30)
    assert len(one.events) == 1 and one.events[0].attempts == 1
    backlog = look.backlog()
    assert (backlog.pending, backlog.due, backlog.retrying) == (3, 3, 3)
    other = harness.new().claim(10, 10_000_000, 30.0)
    assert other is not None and len(other.events) == 2
    assert not {e.uuid for e in other.events} & {e.uuid for e in one.events}


def test_the_oldest_age_is_the_enqueue_time_kept_within_the_ticks(
    harness: SnapshotHarness, database_url: str
) -> None:
    look = harness.new(for_batches=False)
    with psycopg.connect(database_url, autocommit=True) as db:
        # The newest tick is an hour old (a quiet hour: nothing committed to tick for).
        db.execute("UPDATE outbox_ticks SET taken_at = now() - interval '1 hour'")
        harness.put(_events(1))  # enqueued now, with the default timestamp
        assert look.backlog().oldest_pending_age_seconds < 600
        with db.transaction():  # a backfill: an old timestamp, committed in the last hour
            insert_events(
                db,
                [{"uuid": uuid.uuid4(), "event": "old", "distinct_id": "u",
                  "timestamp": datetime(2000, 1, 1, tzinfo=UTC)}],
            )  # fmt: skip
    for backlog in (look.backlog(), look.backlog_capped()):
        assert backlog.pending == 2
        assert 3600 <= backlog.oldest_pending_age_seconds < 3600 + 600
    # Once batched (the tick is now), the same bounds hold: its interval's two ticks.
    s = harness.new()
    batch = s.claim(1, 10_000_000, 30.0)
    assert batch is not None
    assert 3600 <= look.backlog().oldest_pending_age_seconds < 3600 + 600
    s.release(batch)


def test_a_capped_backlog_reads_at_most_the_cap(harness: SnapshotHarness) -> None:
    harness.put(_events(5))
    s, look = harness.new(), harness.new(for_batches=False)
    batch = s.claim(2, 10_000_000, 30.0)
    a, b = batch.events
    s.finish(batch, BatchOutcome(shipped=[a.id], retry=[b.id], retry_error="x"), **POLICY)
    assert look.backlog().pending == 4  # 3 in the event tables, 1 retrying
    capped = look.backlog_capped(cap=2)
    assert (capped.pending, capped.retrying) == (3, 1)  # 2 (the cap) + 1 retry
    assert look.backlog_capped(cap=100).pending == 4


def test_it_keeps_the_worker_states(harness: SnapshotHarness, database_url: str) -> None:
    s = SnapshotStorage(database_url, worker_id="w-snap", log_outages=False)
    try:
        s.write_worker_state("https://us.i.posthog.com", "ok", "")
        s.write_worker_state("https://us.i.posthog.com", "key_rejected", "why")
        [row] = s.worker_states()
        assert (row["worker"], row["state"], row["reason"]) == ("w-snap", "key_rejected", "why")
        assert s.expire_worker_states(86400) == 0
        s.delete_worker_state()
        assert s.worker_states() == []
        with psycopg.connect(database_url, autocommit=True) as db:
            db.execute("ALTER TABLE outbox_worker_state RENAME TO gone")
        with pytest.raises(WorkerStateUnavailable, match="outbox_worker_state"):
            s.write_worker_state("h", "ok", "")
        assert s.backlog().pending == 0  # the storage goes on
    finally:
        s.close()


def test_in_flight_lists_leased_batches_and_leased_retries(harness: SnapshotHarness) -> None:
    harness.put(_events(3))
    s, t, look = harness.new(), harness.new(), harness.new(for_batches=False)
    batch = s.claim(10, 10_000_000, 30.0)
    retried = [e.id for e in batch.events[:2]]
    s.finish(batch, BatchOutcome(retry=retried, retry_error="x", shipped=[3]), **POLICY)
    retries = wait_for(lambda: t.claim(10, 10_000_000, 30.0), timeout=30, what="the retries")
    harness.put(_events(1))
    fresh = s.claim(10, 10_000_000, 30.0)
    assert fresh is not None and len(fresh.events) == 1
    held = look.in_flight()
    assert sorted(h["state"] for h in held) == ["leased batch", "leased retries (2 events)"]
    by_state = {h["state"]: h for h in held}
    assert by_state["leased batch"]["worker"] == "suite"
    assert all(0 <= h["held_seconds"] < 60 for h in held)
    t.release(retries)
    s.release(fresh)
    assert look.in_flight() == []


def test_a_failed_event_keeps_its_enqueue_time(harness: SnapshotHarness, database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute("UPDATE outbox_ticks SET taken_at = now() - interval '1 hour'")
        with db.transaction():  # committed within the hour, timestamped long before
            insert_events(
                db,
                [
                    {"uuid": uuid.uuid4(), "event": name, "distinct_id": "u",
                     "timestamp": datetime(2000, 1, 1, tzinfo=UTC)}
                    for name in ("dies", "retries")
                ],
            )  # fmt: skip
    s, look = harness.new(), harness.new(for_batches=False)
    batch = s.claim(10, 10_000_000, 30.0)
    assert batch is not None
    by_name = {e.event: e.id for e in batch.events}
    outcome = BatchOutcome(
        dead=[(by_name["dies"], "refused")], retry=[by_name["retries"]], retry_error="x"
    )
    s.finish(batch, outcome, **{**POLICY, "backoff_base": 3600.0, "backoff_max": 3600.0})
    backlog = look.backlog()
    assert (backlog.pending, backlog.retrying, backlog.dead) == (1, 1, 1)
    assert 3600 <= backlog.oldest_pending_age_seconds < 3600 + 600
    [dead] = look.dead()
    created = datetime.fromisoformat(dead["created_at"])
    assert 3600 <= (datetime.now(UTC) - created).total_seconds() < 3600 + 600
