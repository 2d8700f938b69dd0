"""The running worker's /metrics, /healthz and /readyz."""

from __future__ import annotations

import re
import signal
import socket
import urllib.error
import urllib.request
from typing import Any

import psycopg

from tests.acceptance.test_worker_process import enqueue_n, start_worker
from tests.conftest import wait_for, worker_env
from worker.testing import CaptureServer, Reply


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_probes_and_metrics_of_a_running_worker(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = worker_env(database_url, capture, OUTBOX_METRICS_PORT=str(port))
    proc = start_worker(env)
    try:
        wait_for(lambda: get(base + "/healthz")[0] == 200, what="/healthz")
        assert get(base + "/readyz")[0] == 200
        # Events committed while the worker runs are picked up by polling.
        uuids = enqueue_n(database_url, 40)
        capture.wait_for_events(40, timeout=20)
        assert set(capture.uuids()) == uuids

        def shipped() -> float | None:
            return metric(get(base + "/metrics")[1], 'outbox_events_shipped_total{sink="posthog"}')

        assert wait_for(lambda: shipped() == 40, what="the shipped counter")
        text = get(base + "/metrics")[1]
        assert metric(text, 'outbox_sink_state{state="ok"}') == 1
        assert "outbox_backlog_events" in text
        assert "outbox_batch_duration_seconds_bucket" in text

        # A refused key: everything stays pending and /readyz says why.
        capture.default_reply = Reply(status=401)
        enqueue_n(database_url, 5)
        wait_for(lambda: get(base + "/readyz")[0] == 503, what="/readyz to fail")
        assert "API key" in get(base + "/readyz")[1]
        row = db.execute("SELECT count(*), max(attempts) FROM outbox_events").fetchone()
        assert row == (5, 0)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "phc_test" not in err
