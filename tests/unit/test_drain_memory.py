"""The drainer's hardest logic against the in-memory storage engine, on a fake clock:
no database, no waiting for a pause or a lease to run out."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from worker.drain import SINK_OK, SINK_RATE_LIMITED, Drainer
from worker.settings import Settings
from worker.sinks import MemorySink, Outbound, RateLimitedError, RejectedError
from worker.storage.base import Batch, BatchOutcome, Finished
from worker.storage.memory import MemoryEvents, MemoryStorage

LEASE = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "batch_size": 10,
        "lease_seconds": LEASE,
        "request_timeout": 5.0,
        "backoff_base": 0.0,
    }
    base.update(overrides)
    return Settings(**base)


def put(events: MemoryEvents, names: Sequence[str]) -> list[str]:
    return [str(events.put(name, f"user-{i}", {"i": i})) for i, name in enumerate(names)]


def test_a_refused_batch_is_split_until_the_bad_event_dies_alone() -> None:
    clock = Clock()
    events = MemoryEvents(clock)
    good = put(events, ["ok"] * 3 + ["bad"] + ["ok"] * 4)
    store = MemoryStorage(events)
    sink = MemorySink()
    sink.reject = lambda e: RejectedError("400: bad event") if e["event"] == "bad" else None

    stats = Drainer(store, sink, settings(), clock=clock).drain()

    assert (stats.shipped, stats.dead, stats.retried) == (7, 1, 0)
    assert sorted(sink.uuids()) == sorted(good[:3] + good[4:])
    (dead,) = store.dead()
    assert (str(dead["uuid"]), dead["last_error"], dead["attempts"]) == (
        good[3],
        "400: bad event",
        1,
    )
    assert store.backlog().pending == 0
    # 1 whole batch, its halves, quarters and eighths on the bad event's side.
    assert sink.calls == 1 + 2 + 2 + 2


def test_a_429_pauses_all_sends_and_counts_no_attempt() -> None:
    clock = Clock()
    events = MemoryEvents(clock)
    uuids = put(events, ["e"] * 4)
    store = MemoryStorage(events)
    sink = MemorySink()
    sink.fail_with(RateLimitedError("slow down", retry_after=7.0))
    drainer = Drainer(store, sink, settings(), clock=clock)

    stats = drainer.drain()
    assert (stats.shipped, stats.deferred, stats.retried) == (0, 4, 0)
    assert drainer.sink_state == SINK_RATE_LIMITED
    assert drainer.pause_remaining() == 7.0
    backlog = store.backlog()
    assert (backlog.pending, backlog.due, backlog.retrying) == (4, 0, 0)

    clock.now += 3.0
    assert drainer.drain().shipped == 0  # still paused: no request at all
    assert sink.calls == 1

    clock.now += 4.5
    assert drainer.drain().shipped == 4
    assert sorted(sink.uuids()) == sorted(uuids)
    assert drainer.sink_state == SINK_OK


class CountingStorage(MemoryStorage):
    def __init__(self, events: MemoryEvents) -> None:
        super().__init__(events)
        self.released = 0

    def release(self, batch: Batch) -> bool:
        self.released += 1
        return super().release(batch)


class SlowSink(MemorySink):
    """The first send waits for the batch claimed ahead, then takes a third of the
    lease (on the fake clock)."""

    def __init__(self, clock: Clock, events: MemoryEvents) -> None:
        super().__init__()
        self.clock, self.events_ = clock, events

    def send(self, events: Sequence[Outbound]) -> None:
        if self.calls == 0:
            deadline = time.monotonic() + 30
            while len(self.events_.leases) < 2:  # the claim ahead has its batch
                assert time.monotonic() < deadline, "no batch was claimed ahead"
                time.sleep(0.01)
            self.clock.now += LEASE / 3
        super().send(events)


def test_a_batch_claimed_ahead_that_went_stale_is_released_and_claimed_afresh() -> None:
    clock = Clock()
    events = MemoryEvents(clock)
    uuids = put(events, ["e"] * 4)
    store, ahead = CountingStorage(events), CountingStorage(events)
    sink = SlowSink(clock, events)
    drainer = Drainer(store, sink, settings(batch_size=2), claim_store=ahead, clock=clock)

    stats = drainer.drain()

    assert stats.shipped == 4
    assert ahead.released == 1  # stale after a quarter of its lease: handed back
    assert sorted(sink.uuids()) == sorted(uuids)  # each exactly once
    assert store.backlog().pending == 0 and store.in_flight() == []


class MeetingStorage(MemoryStorage):
    """Writes the outcome of its first batch only once the sink's second send begins."""

    def __init__(self, events: MemoryEvents, meeting: threading.Barrier) -> None:
        super().__init__(events)
        self.meeting = meeting
        self.finished = 0

    def finish(self, batch: Batch, outcome: BatchOutcome, **policy: Any) -> Finished:
        self.finished += 1
        if self.finished == 1:
            self.meeting.wait()
        return super().finish(batch, outcome, **policy)


class MeetingSink(MemorySink):
    def __init__(self, meeting: threading.Barrier) -> None:
        super().__init__()
        self.meeting = meeting

    def send(self, events: Sequence[Outbound]) -> None:
        if self.calls == 1:  # the second send
            self.meeting.wait()
        super().send(events)


def test_the_outcome_of_a_batch_is_written_while_the_next_one_is_sent() -> None:
    # With two connections the main thread only sends: the first batch's outcome is
    # written on its connection's thread while the second batch (claimed on the other
    # connection) is on the wire. Were they one after the other, the two would never
    # meet and the barrier would break.
    events = MemoryEvents(Clock())
    uuids = put(events, ["e"] * 6)
    meeting = threading.Barrier(2, timeout=10)
    store = MeetingStorage(events, meeting)
    ahead = MemoryStorage(events)
    sink = MeetingSink(meeting)

    stats = Drainer(store, sink, settings(batch_size=2), claim_store=ahead).drain()

    assert not meeting.broken
    assert (stats.shipped, stats.batches) == (6, 3)
    assert sorted(sink.uuids()) == sorted(uuids)
    assert store.backlog().pending == 0 and store.in_flight() == []
