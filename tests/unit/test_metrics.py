"""How the worker's metrics count batches, without a database."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from worker.drain import DrainStats
from worker.metrics import WorkerMetrics


@pytest.mark.parametrize(
    ("stats", "result"),
    [
        (DrainStats(batches=1, shipped=10), "ok"),
        (DrainStats(batches=1, shipped=6, retried=4), "partial"),
        (DrainStats(batches=1, deferred=10), "failed"),
        # The outcome's transaction was lost: nothing recorded, the batch goes again.
        (DrainStats(batches=1, interrupted=True), "failed"),
    ],
)
def test_batches_are_counted_by_what_their_outcome_recorded(stats: DrainStats, result: str) -> None:
    metrics = WorkerMetrics()
    drainer: Any = SimpleNamespace(sink=SimpleNamespace(name="memory"))
    metrics.batch_recorded(drainer, stats)
    samples = {
        r: metrics.registry.get_sample_value("outbox_batches_total", {"result": r}) or 0.0
        for r in ("ok", "partial", "failed")
    }
    assert samples == {r: (1.0 if r == result else 0.0) for r in samples}


def test_the_ledger_counter_counts_what_each_finish_added() -> None:
    metrics = WorkerMetrics()
    drainer: Any = SimpleNamespace(sink=SimpleNamespace(name="posthog"))
    value = metrics.registry.get_sample_value
    labels = [(d, o) for d in ("posthog", "metrics") for o in ("delivered", "dead")]
    # Every series exists from the start, at 0 (so rate() sees the first increment).
    for d, o in labels:
        assert value("outbox_ledger_events_total", {"destination": d, "outcome": o}) == 0.0
    ledger = (("metrics", "delivered", 2), ("posthog", "dead", 1), ("posthog", "delivered", 7))
    metrics.batch_recorded(drainer, DrainStats(batches=1, shipped=9, dead=1, ledger=ledger))
    metrics.batch_recorded(drainer, DrainStats(batches=1, interrupted=True))  # a lost outcome
    metrics.batch_recorded(
        drainer, DrainStats(batches=1, shipped=3, ledger=(("posthog", "delivered", 3),))
    )
    got = {
        (d, o): value("outbox_ledger_events_total", {"destination": d, "outcome": o})
        for d, o in labels
    }
    assert got == {
        ("posthog", "delivered"): 10.0,
        ("posthog", "dead"): 1.0,
        ("metrics", "delivered"): 2.0,
        ("metrics", "dead"): 0.0,
    }
