"""The delivery ledger's promises (:meth:`worker.storage.base.Inspection.ledger`), run
against every storage engine (see conftest.ENGINES): exact counts per UTC day, event
and destination, written with the outcome, so that an outcome that was lost (and the
event sent again) is counted once."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from tests.storage.conftest import Harness
from tests.storage.test_behaviour import claim, eventually, policy
from worker.storage.base import BatchLostError, BatchOutcome, LedgerRow, Storage

UTC = datetime.UTC
#: Far enough back that no test runs into today, recent enough for any retention.
DAY = datetime.date(2026, 11, 30)
NEXT = DAY + datetime.timedelta(days=1)
SINCE = DAY - datetime.timedelta(days=1)


def at(day: datetime.date, hour: int, minute: int = 0, *, tz: int = 0) -> datetime.datetime:
    """A time on ``day`` in a zone ``tz`` hours east of UTC."""
    zone = datetime.timezone(datetime.timedelta(hours=tz))
    return datetime.datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone)


def put(h: Harness, name: str, n: int, when: datetime.datetime, **extra: Any) -> None:
    h.put([{"event": name, "distinct_id": f"u{i}", "timestamp": when, **extra} for i in range(n)])


def ship_all(s: Storage, limit: int = 100) -> int:
    """Claim and ship until nothing is due; how many were shipped."""
    shipped = 0
    while (batch := claim(s, limit=limit)) is not None:
        done = s.finish(batch, BatchOutcome(shipped=[e.id for e in batch.events]), **policy())
        shipped += done.shipped
    return shipped


def counts(look: Storage, since: datetime.date = SINCE, event: str | None = None) -> list[Any]:
    return [
        (r.day, r.event, r.destination, r.delivered, r.dead, r.purged)
        for r in look.ledger(since, event)
    ]


def test_a_drain_is_counted_per_utc_day_event_and_destination(engine: Harness) -> None:
    put(engine, "signed_up", 3, at(DAY, 23, 59))
    put(engine, "signed_up", 2, at(NEXT, 0, 0))
    # 01:30 at UTC+2 is 23:30 UTC the day before.
    put(engine, "signed_up", 4, at(NEXT, 1, 30, tz=2))
    put(engine, "page_viewed", 5, at(NEXT, 12))
    put(engine, "page_viewed", 6, at(NEXT, 12), destination="metrics")
    s, look = engine.new(), engine.new(for_batches=False)
    assert look.ledger(SINCE) == []
    assert ship_all(s, limit=4) == 20  # several batches, each adding to the same rows
    assert counts(look) == [
        (DAY, "signed_up", "posthog", 7, 0, 0),
        (NEXT, "page_viewed", "metrics", 6, 0, 0),
        (NEXT, "page_viewed", "posthog", 5, 0, 0),
        (NEXT, "signed_up", "posthog", 2, 0, 0),
    ]
    assert all(isinstance(r, LedgerRow) for r in look.ledger(SINCE))
    assert counts(look, since=NEXT, event="signed_up") == [(NEXT, "signed_up", "posthog", 2, 0, 0)]
    assert counts(look, event="nothing") == []


def test_finished_says_what_it_added(engine: Harness) -> None:
    put(engine, "a", 3, at(DAY, 10))
    put(engine, "m", 1, at(DAY, 10), destination="metrics")
    s = engine.new()
    batch = claim(s)
    by_name = sorted(batch.events, key=lambda e: e.event)
    a1, a2, a3, m = by_name
    outcome = BatchOutcome(
        shipped=[a1.id, m.id], dead=[(a2.id, "bad")], retry=[a3.id], retry_error="x"
    )
    done = s.finish(batch, outcome, **policy())
    assert sorted(done.ledger) == [
        ("metrics", "delivered", 1),
        ("posthog", "dead", 1),
        ("posthog", "delivered", 1),
    ]


def test_retries_and_dead_are_counted_once_when_they_end(engine: Harness) -> None:
    put(engine, "e", 4, at(DAY, 8))
    s, look = engine.new(), engine.new(for_batches=False)
    fast = policy(max_attempts=2, backoff_base=0.0, backoff_max=0.0)
    batch = claim(s)
    buried, doomed, later, deferred = batch.events
    s.finish(
        batch,
        BatchOutcome(
            dead=[(buried.id, "refused")],
            retry=[doomed.id, later.id],
            retry_error="503",
            defer=[deferred.id],
            defer_delay=0.2,
        ),
        **fast,
    )
    # One died; the retried and deferred ones count nothing yet.
    assert counts(look) == [(DAY, "e", "posthog", 0, 1, 0)]
    seen: set[Any] = set()
    while len(seen) < 3:  # the retries (their second attempt) and the deferred event
        batch = eventually(engine, lambda: claim(s), "the retries to be due")
        outcome = BatchOutcome()
        for e in batch.events:
            seen.add(e.uuid)
            if e.uuid == doomed.uuid:
                outcome.retry.append(e.id)  # its last attempt: dead
                outcome.retry_error = "503 again"
            else:
                outcome.shipped.append(e.id)
        s.finish(batch, outcome, **fast)
    assert claim(s) is None
    assert counts(look) == [(DAY, "e", "posthog", 2, 2, 0)]


def test_a_retry_buried_is_counted_dead(engine: Harness) -> None:
    put(engine, "e", 2, at(DAY, 8))
    s, look = engine.new(), engine.new(for_batches=False)
    quick = policy(backoff_base=0.0, backoff_max=0.0)
    batch = claim(s)
    s.finish(batch, BatchOutcome(retry=[e.id for e in batch.events], retry_error="x"), **quick)
    again = eventually(engine, lambda: claim(s), "the retries to be due")
    first, second = again.events
    done = s.finish(
        again,
        BatchOutcome(shipped=[first.id], dead=[(second.id, "400"), (first.id, "ignored")]),
        **quick,
    )
    assert sorted(done.ledger) == [("posthog", "dead", 1), ("posthog", "delivered", 1)]
    assert counts(look) == [(DAY, "e", "posthog", 1, 1, 0)]


def test_a_batch_whose_lease_was_lost_counts_nothing(engine: Harness) -> None:
    put(engine, "e", 3, at(DAY, 9))
    s, other, look = engine.new(), engine.new(), engine.new(for_batches=False)
    lost = claim(s, lease=0.5)
    again = eventually(engine, lambda: claim(other), "the lease to run out")
    with pytest.raises(BatchLostError):
        s.finish(lost, BatchOutcome(shipped=[e.id for e in lost.events]), **policy())
    assert look.ledger(SINCE) == []
    other.finish(again, BatchOutcome(shipped=[e.id for e in again.events]), **policy())
    assert counts(look) == [(DAY, "e", "posthog", 3, 0, 0)]


def test_lost_retries_count_nothing(engine: Harness) -> None:
    put(engine, "e", 2, at(DAY, 9))
    s, other, look = engine.new(), engine.new(), engine.new(for_batches=False)
    quick = policy(backoff_base=0.0, backoff_max=0.0)
    batch = claim(s)
    s.finish(batch, BatchOutcome(retry=[e.id for e in batch.events], retry_error="x"), **quick)
    lost = eventually(engine, lambda: claim(s, lease=0.5), "the retries to be due")
    again = eventually(engine, lambda: claim(other), "the retries' lease to run out")
    with pytest.raises(BatchLostError):
        s.finish(lost, BatchOutcome(shipped=[e.id for e in lost.events]), **quick)
    assert look.ledger(SINCE) == []
    other.finish(again, BatchOutcome(shipped=[e.id for e in again.events]), **quick)
    assert counts(look) == [(DAY, "e", "posthog", 2, 0, 0)]


def test_purge_counts_what_it_deletes(engine: Harness) -> None:
    put(engine, "gone", 3, at(DAY, 9))
    put(engine, "gone", 1, at(NEXT, 9))
    s, look = engine.new(), engine.new(for_batches=False)
    batch = claim(s)
    s.finish(batch, BatchOutcome(dead=[(e.id, "no") for e in batch.events]), **policy())
    assert look.purge_dead(3600.0) == 0
    assert counts(look) == [(DAY, "gone", "posthog", 0, 3, 0), (NEXT, "gone", "posthog", 0, 1, 0)]
    assert eventually(engine, lambda: look.purge_dead(0.0), "purging the dead") == 4
    assert look.purge_dead(0.0) == 0
    assert counts(look) == [(DAY, "gone", "posthog", 0, 3, 3), (NEXT, "gone", "posthog", 0, 1, 1)]


def test_expire_ledger_deletes_the_days_past_the_retention(engine: Harness) -> None:
    today = datetime.datetime.now(UTC).date()
    old = today - datetime.timedelta(days=91)
    kept = today - datetime.timedelta(days=90)
    put(engine, "e", 2, at(old, 12))
    put(engine, "e", 1, at(kept, 12))
    s, look = engine.new(), engine.new(for_batches=False)
    assert ship_all(s) == 3
    since = old - datetime.timedelta(days=1)
    assert [r.day for r in look.ledger(since)] == [old, kept]
    assert s.expire_ledger(90) == 1
    assert s.expire_ledger(90) == 0
    assert counts(look, since) == [(kept, "e", "posthog", 1, 0, 0)]
