"""The names docs/monitoring/ uses against a running worker: the real ``outbox-worker
run`` ships events (one request failing first, a poison event, metrics-only events in
and out of its contract) to a CaptureServer, and its /metrics, read over HTTP, must
offer every metric name and state the rules, their tests and the dashboard use."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest

import outbox
from outbox import EventRegistry, EventSpec, Prop
from tests.acceptance.test_probes import free_port, get
from tests.acceptance.test_worker_process import start_worker
from tests.conftest import wait_for, worker_env
from tests.unit.test_monitoring import (
    exported_label_values,
    exported_names,
    unexported,
    used_label_values,
)
from worker.testing import CaptureServer, Reply

ROOT = Path(__file__).resolve().parents[2]

_READY = EventSpec(
    "runtime_ready",
    "operational",
    description="A runtime became ready.",
    properties=[Prop("provider", str), Prop("ready_ms", int, required=False)],
    metrics_only=True,
    metric_labels=["provider"],
    duration_property="ready_ms",
    duration_unit="milliseconds",
)
#: The worker's contract (OUTBOX_CONTRACT): it knows runtime_ready only.
CONTRACT = EventRegistry()
CONTRACT.add(_READY)
#: The application's: one metrics-only event more, which the worker counts by name.
APPLICATION = EventRegistry()
APPLICATION.add(_READY)
APPLICATION.add(EventSpec("cache_warmed", "operational", metrics_only=True))
APPLICATION.add(EventSpec("page_viewed", "core_loop", properties=[Prop("i", int)]))


@pytest.fixture
def application() -> Any:
    outbox.configure(registry=APPLICATION)
    yield
    outbox.configure()


def test_the_rules_and_the_dashboard_use_only_what_a_running_worker_exports(
    application: None, database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    with psycopg.connect(database_url) as conn:
        for i in range(5):
            outbox.enqueue(conn, "page_viewed", f"user-{i}", {"i": i})
        outbox.enqueue(conn, "page_viewed", "poison", {"i": -1})
        outbox.enqueue(conn, "runtime_ready", "u", {"provider": "claude", "ready_ms": 1500})
        outbox.enqueue(conn, "cache_warmed", "u", {})
        conn.commit()
    capture.enqueue_reply(Reply(status=503))  # the first request fails: retried
    capture.reject_events(lambda event: event.get("distinct_id") == "poison")
    port = free_port()
    env = worker_env(
        database_url,
        capture,
        OUTBOX_METRICS_PORT=str(port),
        OUTBOX_CONTRACT="tests.integration.test_monitoring:CONTRACT",
        OUTBOX_BACKOFF_BASE="0.1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    proc = start_worker(env)
    url = f"http://127.0.0.1:{port}/metrics"
    try:

        def settled() -> str | None:
            status, text = get(url)
            done = (
                status == 200
                and 'outbox_events_shipped_total{sink="posthog"} 5.0' in text
                and 'outbox_events_shipped_total{sink="metrics"} 2.0' in text
                and "outbox_events_dead_total 1.0" in text
                and 'outbox_backlog_events{state="dead"}' in text
            )
            return text if done else None

        text = wait_for(settled, timeout=60, what="the worker to ship, retry and bury")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert sorted(capture.event_names()) == ["page_viewed"] * 5

    exported = exported_names(text)
    for name in (
        "app_runtime_ready_total",
        "app_runtime_ready_duration_seconds_bucket",
        "app_metrics_only_events_total",
        "outbox_batch_duration_seconds_bucket",
        'outbox_events_failed_total{reason="transient"}',
    ):
        assert name.split("{")[0] in exported, name
    assert 'outbox_events_failed_total{reason="transient"}' in text
    assert unexported(exported) == {}

    states = exported_label_values(text)
    for metric, label, value in used_label_values():
        assert any(
            s[1:] == (label, value) and (":" in metric or s[0].startswith(metric)) for s in states
        ), f"{metric}{{{label}={value!r}}} is used but the worker reports no such series"
