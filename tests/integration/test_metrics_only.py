"""Metrics-only events: counted in Prometheus by the worker, transactionally, and never
sent to PostHog."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

import outbox
from outbox import EventRegistry, EventSpec, Prop
from worker.app import Worker
from worker.settings import Settings
from worker.testing import CaptureServer

REGISTRY = EventRegistry()
REGISTRY.add(
    EventSpec(
        "runtime_ready",
        "operational",
        description="A runtime became ready.",
        properties=[
            Prop("provider", str),
            Prop("runtime_id", str),
            Prop("ready_duration_ms", int, required=False),
        ],
        metrics_only=True,
        metric_labels=["provider"],
        duration_property="ready_duration_ms",
        duration_unit="milliseconds",
    )
)
REGISTRY.add(EventSpec("issue_created", "core_loop", properties=[Prop("issue_id", str)]))


@pytest.fixture
def contract() -> Iterator[None]:
    outbox.configure(registry=REGISTRY)
    yield
    outbox.configure()


def sample(worker: Worker, name: str, **labels: str) -> float | None:
    value = worker.metrics.registry.get_sample_value(name, labels or None)
    return None if value is None else float(value)


def test_metrics_only_events_are_counted_and_never_sent(
    contract: None,
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    with psycopg.connect(database_url) as conn:
        for provider, ms in [("claude", 1500), ("claude", 500), ("codex", 2000)]:
            outbox.enqueue(
                conn,
                "runtime_ready",
                "user-1",
                {"provider": provider, "runtime_id": "rt-secret-id", "ready_duration_ms": ms},
            )
        issue = outbox.enqueue(conn, "issue_created", "user-1", {"issue_id": "i-1"})
        conn.commit()
        outbox.enqueue(conn, "runtime_ready", "user-1", {"provider": "claude", "runtime_id": "x"})
        conn.rollback()  # never counted
    stored = db.execute(
        "SELECT destination, properties FROM outbox_events WHERE event = 'runtime_ready'"
    ).fetchall()
    assert {d for d, _ in stored} == {"metrics"}
    assert all("runtime_id" not in p for _, p in stored)  # ids never become labels

    worker = Worker(
        settings_for(
            posthog_api_key="phc_test",
            posthog_host=capture.url,
            contract="tests.integration.test_metrics_only:REGISTRY",
        )
    )
    stats = worker.run_until_empty()
    assert stats.clean
    assert capture.event_names() == ["issue_created"]
    assert capture.uuids() == [str(issue)]
    assert sample(worker, "app_runtime_ready_total", provider="claude") == 2
    assert sample(worker, "app_runtime_ready_total", provider="codex") == 1
    assert sample(worker, "app_runtime_ready_duration_seconds_count", provider="claude") == 2
    assert sample(worker, "app_runtime_ready_duration_seconds_sum", provider="claude") == 2.0
    assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,)


def test_without_the_contract_the_worker_counts_by_event_name_only(
    contract: None,
    database_url: str,
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, "runtime_ready", "u", {"provider": "claude", "runtime_id": "r"})
        conn.commit()
    worker = Worker(settings_for(posthog_api_key="phc_test", posthog_host=capture.url))
    worker.run_until_empty()
    assert capture.uuids() == []
    assert sample(worker, "app_metrics_only_events_total", event="runtime_ready") == 1
