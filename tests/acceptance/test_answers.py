"""The real ``outbox-worker`` process against PostHog answers that are not about events."""

from __future__ import annotations

import signal
from typing import Any

import psycopg

from tests.acceptance.test_probes import free_port, get
from tests.acceptance.test_worker_process import enqueue_n, start_worker
from tests.conftest import wait_for, worker_env
from worker.testing import CaptureServer


def test_a_redirecting_host_keeps_every_event_and_says_where_it_points(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with CaptureServer() as target:
        capture.redirect_to = target.url
        location = target.url + "/batch/"
        uuids = enqueue_n(database_url, 30)
        env = worker_env(
            database_url,
            capture,
            OUTBOX_METRICS_PORT=str(port),
            OUTBOX_UNAUTHORIZED_PAUSE="0.3",
            OUTBOX_MAX_ATTEMPTS="1",
        )
        proc = start_worker(env)
        try:
            capture.wait_for_requests(3, timeout=30)  # tried again after each pause
            wait_for(lambda: get(base + "/readyz")[0] == 503, what="/readyz to fail")
            status, why = get(base + "/readyz")
            assert status == 503 and "redirect" in why and location in why
            # Not one event deleted, dead or charged an attempt; nothing followed.
            row = db.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = 'dead'), max(attempts)"
                " FROM outbox_events"
            ).fetchone()
            assert row == (30, 0, 0)
            assert target.requests == []
            assert {(r.method, r.status) for r in capture.requests} == {("POST", 301)}
            metrics = get(base + "/metrics")[1]
            assert 'outbox_sink_state{state="redirected"} 1.0' in metrics

            capture.redirect_to = None  # the host is fixed
            capture.wait_for_events(30, timeout=30)
            wait_for(lambda: get(base + "/readyz")[0] == 200, what="/readyz to recover")
            wait_for(
                lambda: db.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,),
                what="the rows deleted",
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert sorted(capture.uuids()) == sorted(uuids)  # each event exactly once
    assert target.requests == []
    lines = [line for line in err.splitlines() if "[sink_redirected]" in line]
    assert lines and location in lines[0] and "ERROR" in lines[0]
    assert "phc_test" not in err
