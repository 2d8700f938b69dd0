"""The real ``outbox-worker`` process with OUTBOX_POSTHOG_TRANSPORT=v1: shipping over capture
v1, a per-event drop that goes dead with PostHog's reason, a bad transport name refused."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.acceptance.test_worker_process import count, enqueue_n, run_cli
from tests.conftest import capture_requests, worker_env
from worker.testing import CaptureServer
from worker.testing.capture_v1 import V1_PATH


def test_the_worker_process_ships_over_capture_v1(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    uuids = enqueue_n(database_url, 120)
    capture.v1.verdict(lambda e: e["properties"]["i"] == 7, "drop", "event_restriction_drop")
    env = worker_env(database_url, capture, OUTBOX_POSTHOG_TRANSPORT="v1", OUTBOX_BATCH_SIZE="50")
    result = run_cli(env, "run", "--until-empty")
    assert result.returncode == 1, result.stderr  # 1: an event went dead
    assert "119 shipped, 0 retrying, 1 dead" in result.stderr
    assert {r.path for r in capture_requests(capture)} == {V1_PATH}
    assert all(r.api_key == "phc_test" and r.gzip for r in capture_requests(capture))
    assert len(capture_requests(capture)) == 3  # 50 + 50 + 20: nothing split, nothing resent
    assert len(capture.uuids()) == 119 and set(capture.uuids()) < uuids
    [(status, error)] = db.execute("SELECT status, last_error FROM outbox_events").fetchall()
    assert (status, error) == ("dead", "dropped by PostHog: event_restriction_drop")
    assert "events_partly_accepted" in result.stderr
    assert "phc_test" not in result.stderr
    assert count(db, "status = 'pending'") == 0


def test_an_unknown_transport_is_one_clear_line(database_url: str) -> None:
    env = worker_env(database_url, OUTBOX_POSTHOG_TRANSPORT="v2")
    result = run_cli(env, "run", "--until-empty")
    assert result.returncode != 0
    assert "OUTBOX_POSTHOG_TRANSPORT" in result.stderr and "v2" in result.stderr
    assert "direct, posthog or v1" in result.stderr
    assert "Traceback" not in result.stderr
