"""One behaviour suite, run against every storage engine (see conftest.ENGINES).

Each test states one promise of :mod:`worker.storage.base`. Waits are conditions
polled with a generous deadline (:func:`eventually`), never fixed sleeps.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from tests.storage.conftest import Harness
from worker.storage.base import Batch, BatchLostError, BatchOutcome, Storage

T = TypeVar("T")

LEASE = 30.0
#: Deadline for anything that should happen within a second or two.
DEADLINE = 30.0


def policy(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "dedup_window": 60.0,
        "max_attempts": 5,
        "backoff_base": 30.0,
        "backoff_max": 30.0,
    }
    base.update(overrides)
    return base


def events(n: int, prefix: str = "e", size: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "event": f"{prefix}{i}",
            "distinct_id": f"user-{i}",
            "properties": {"i": i, **({"pad": "x" * size} if size else {})},
        }
        for i in range(n)
    ]


def eventually(h: Harness, probe: Callable[[], T | None], what: str) -> T:
    """Poll ``probe`` (letting time pass between polls) until it returns something."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        h.tick()
    raise AssertionError(f"timed out after {DEADLINE}s waiting for {what}")


def claim(s: Storage, limit: int = 100, max_bytes: int = 10_000_000, lease: float = LEASE) -> Any:
    return s.claim(limit, max_bytes, lease)


def uuids(batch: Batch) -> set[uuid.UUID]:
    return {e.uuid for e in batch.events}


def test_claim_on_empty_is_none(engine: Harness) -> None:
    assert claim(engine.new()) is None


def test_claim_takes_the_oldest_within_limit(engine: Harness) -> None:
    first = engine.put(events(3, "a"))
    engine.put(events(3, "b"))
    s = engine.new()
    batch = claim(s, limit=3)
    assert batch is not None
    assert uuids(batch) == set(first)
    assert all(e.attempts == 0 for e in batch.events)


def test_claim_keeps_within_max_bytes_but_takes_at_least_one(engine: Harness) -> None:
    engine.put(events(4, size=1000))
    s = engine.new()
    one = claim(s, max_bytes=1)
    assert one is not None and len(one.events) == 1
    assert s.release(one)
    two = claim(s, max_bytes=3000)  # each event is about 1,000 bytes of JSON
    assert two is not None and len(two.events) == 2


def test_concurrent_claimers_never_share_an_event(engine: Harness) -> None:
    put = engine.put(events(30))
    claimers = [engine.new(), engine.new()]
    seen: list[list[uuid.UUID]] = [[], []]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def drain(i: int) -> None:
        try:
            barrier.wait(timeout=DEADLINE)
            while (batch := claim(claimers[i], limit=3)) is not None:
                seen[i].extend(e.uuid for e in batch.events)
                shipped = [e.id for e in batch.events]
                claimers[i].finish(batch, BatchOutcome(shipped=shipped), **policy())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DEADLINE)
    assert not errors
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(put)


def test_a_held_batch_is_not_claimed_by_another(engine: Harness) -> None:
    engine.put(events(2))
    a, b = engine.new(), engine.new()
    held = claim(a)
    assert held is not None and len(held.events) == 2
    assert claim(b) is None


def test_shipped_never_returns(engine: Harness) -> None:
    engine.put(events(3))
    s = engine.new()
    batch = claim(s)
    done = s.finish(batch, BatchOutcome(shipped=[e.id for e in batch.events]), **policy())
    assert done.shipped == 3
    assert claim(s) is None
    assert engine.new(for_batches=False).backlog().pending == 0


def test_unnamed_events_come_back_unchanged(engine: Harness) -> None:
    put = engine.put(events(3))
    s = engine.new()
    batch = claim(s)
    first = batch.events[0]
    s.finish(batch, BatchOutcome(shipped=[first.id]), **policy())
    again = claim(s)
    assert again is not None
    assert uuids(again) == set(put) - {first.uuid}
    assert all(e.attempts == 0 for e in again.events)


def test_retry_counts_an_attempt_and_backs_off(engine: Harness) -> None:
    engine.put(events(1))
    s, look = engine.new(), engine.new(for_batches=False)
    batch = claim(s)
    done = s.finish(batch, BatchOutcome(retry=[batch.events[0].id], retry_error="boom"), **policy())
    assert (done.retried, done.dead_by_retry) == (1, 0)
    assert claim(s) is None  # 15-30 s of backoff
    backlog = look.backlog()
    assert (backlog.pending, backlog.due, backlog.retrying) == (1, 0, 1)
    assert {"status": "pending", "error": "boom"}.items() <= look.top_errors()[0].items()


def test_retry_is_due_again_after_its_backoff(engine: Harness) -> None:
    (u,) = engine.put(events(1))
    s = engine.new()
    batch = claim(s)
    s.finish(
        batch,
        BatchOutcome(retry=[batch.events[0].id], retry_error="boom"),
        **policy(backoff_base=0.2, backoff_max=0.2),
    )
    again = eventually(engine, lambda: claim(s), "the retried event to be due")
    assert [(e.uuid, e.attempts) for e in again.events] == [(u, 1)]


def test_retry_dies_after_max_attempts_with_its_last_error(engine: Harness) -> None:
    (u,) = engine.put(events(1, "doomed"))
    s, look = engine.new(), engine.new(for_batches=False)
    fast = policy(max_attempts=2, backoff_base=0.0, backoff_max=0.0)
    batch = claim(s)
    s.finish(batch, BatchOutcome(retry=[batch.events[0].id], retry_error="first"), **fast)
    batch = eventually(engine, lambda: claim(s), "the first retry to be due")
    done = s.finish(batch, BatchOutcome(retry=[batch.events[0].id], retry_error="last"), **fast)
    assert (done.retried, done.dead_by_retry) == (0, 1)
    assert claim(s) is None
    (dead,) = look.dead()
    assert (dead["uuid"], dead["attempts"], dead["last_error"]) == (u, 2, "last")
    assert (dead["event"], dead["distinct_id"]) == ("doomed0", "user-0")
    assert isinstance(dead["created_at"], str)
    assert [(r["status"], r["error"], r["count"]) for r in look.top_errors()] == [
        ("dead", "last", 1)
    ]
    assert look.top_events("dead") == [("doomed0", 1)]
    assert look.backlog().dead == 1


def test_defer_counts_no_attempt_and_waits(engine: Harness) -> None:
    engine.put(events(2))
    s, look = engine.new(), engine.new(for_batches=False)
    batch = claim(s)
    ids = [e.id for e in batch.events]
    s.finish(batch, BatchOutcome(defer=ids, defer_delay=30.0, defer_error="429"), **policy())
    assert claim(s) is None
    backlog = look.backlog()
    assert (backlog.pending, backlog.due, backlog.retrying) == (2, 0, 0)
    assert [(r["status"], r["error"], r["count"]) for r in look.top_errors()] == [
        ("pending", "429", 2)
    ]


def test_defer_is_due_after_the_delay(engine: Harness) -> None:
    put = engine.put(events(2))
    s = engine.new()
    batch = claim(s)
    ids = [e.id for e in batch.events]
    s.finish(batch, BatchOutcome(defer=ids, defer_delay=0.3), **policy())
    again = eventually(engine, lambda: claim(s), "the deferred events to be due")
    assert uuids(again) == set(put)
    assert all(e.attempts == 0 for e in again.events)


def test_bury_makes_dead_with_its_own_error(engine: Harness) -> None:
    engine.put(events(2))
    s, look = engine.new(), engine.new(for_batches=False)
    batch = claim(s)
    a, b = batch.events
    s.finish(batch, BatchOutcome(dead=[(a.id, "bad a"), (b.id, "bad b")]), **policy())
    assert claim(s) is None
    dead = {(r["uuid"], r["last_error"], r["attempts"]) for r in look.dead()}
    assert dead == {(a.uuid, "bad a", 1), (b.uuid, "bad b", 1)}
    assert [r["event"] for r in look.dead(event=a.event)] == [a.event]


def test_requeue_dead_makes_them_due_with_fresh_attempts(engine: Harness) -> None:
    engine.put(events(3))
    s, look = engine.new(), engine.new(for_batches=False)
    batch = claim(s)
    s.finish(batch, BatchOutcome(dead=[(e.id, "no") for e in batch.events]), **policy())
    one = look.dead()[0]
    assert look.requeue_dead(ids=[one["id"]]).requeued == 1
    again = claim(s)
    assert [(e.uuid, e.attempts) for e in again.events] == [(one["uuid"], 0)]
    s.release(again)
    done = look.requeue_dead()
    assert (done.requeued, done.unsendable) == (2, 0)
    assert look.dead() == []
    assert look.backlog().due == 3


def test_purge_dead_deletes_those_old_enough(engine: Harness) -> None:
    engine.put(events(2))
    s, look = engine.new(), engine.new(for_batches=False)
    batch = claim(s)
    s.finish(batch, BatchOutcome(dead=[(e.id, "no") for e in batch.events]), **policy())
    assert look.purge_dead(3600.0) == 0
    assert eventually(engine, lambda: look.purge_dead(0.0), "purging the dead") == 2
    assert look.dead() == []
    assert look.backlog().dead == 0


def test_release_makes_them_due_at_once_with_no_attempt(engine: Harness) -> None:
    put = engine.put(events(3))
    s = engine.new()
    batch = claim(s)
    assert s.release(batch)
    assert not s.release(batch)  # already over
    again = claim(s)
    assert uuids(again) == set(put)
    assert all(e.attempts == 0 for e in again.events)
    with pytest.raises(BatchLostError):  # a released batch cannot be finished
        s.finish(batch, BatchOutcome(shipped=[e.id for e in batch.events]), **policy())


def test_lease_ran_out_finish_raises_and_writes_nothing(engine: Harness) -> None:
    put = engine.put(events(3))
    s, other = engine.new(), engine.new()
    lost = claim(s, lease=0.5)
    assert uuids(lost) == set(put)
    again = eventually(engine, lambda: claim(other), "the lease to run out")
    assert uuids(again) == set(put)
    assert all(e.attempts == 0 for e in again.events)
    with pytest.raises(BatchLostError):
        s.finish(lost, BatchOutcome(shipped=[e.id for e in lost.events]), **policy())
    assert other.release(again)
    backlog = engine.new(for_batches=False).backlog()
    assert (backlog.pending, backlog.due) == (3, 3)
    assert uuids(claim(s)) == set(put)  # the store that lost it claims again


def test_one_batch_at_a_time_per_object(engine: Harness) -> None:
    engine.put(events(2))
    s = engine.new()
    assert claim(s, limit=1) is not None
    with pytest.raises(RuntimeError):
        claim(s, limit=1)


def test_backlog_counts(engine: Harness) -> None:
    engine.put(events(5))
    s, look = engine.new(), engine.new(for_batches=False)
    batch = claim(s, limit=3)
    a, b, c = batch.events
    outcome = BatchOutcome(shipped=[a.id], dead=[(b.id, "no")], retry=[c.id], retry_error="x")
    s.finish(batch, outcome, **policy())
    for backlog in (look.backlog(), look.backlog_capped()):
        assert (backlog.pending, backlog.due, backlog.retrying, backlog.dead) == (3, 2, 1, 1)
        assert backlog.oldest_pending_age_seconds >= 0
    assert look.top_events("pending") == sorted(
        [(e, 1) for e in ("e2", "e3", "e4")], key=lambda item: item[0]
    )


def test_in_flight_lists_a_held_batch(engine: Harness) -> None:
    engine.put(events(1))
    s, look = engine.new(), engine.new(for_batches=False)
    batch = claim(s)
    held = look.in_flight()
    assert len(held) == 1 and held[0]["held_seconds"] >= 0
    s.finish(batch, BatchOutcome(shipped=[batch.events[0].id]), **policy())
    assert look.in_flight() == []


def test_maintain_and_expire_dedup_keys_run_at_any_time(engine: Harness) -> None:
    engine.put([{"event": "k", "distinct_id": "u", "dedup_key": "once"}])
    assert engine.put([{"event": "k", "distinct_id": "u", "dedup_key": "once"}]) == []
    s = engine.new()
    s.maintain()
    batch = claim(s)
    s.finish(batch, BatchOutcome(shipped=[batch.events[0].id]), **policy(dedup_window=0.0))
    s.maintain()
    assert eventually(engine, lambda: s.expire_dedup_keys(), "the dedup key to expire") == 1
    assert len(engine.put([{"event": "k", "distinct_id": "u", "dedup_key": "once"}])) == 1
