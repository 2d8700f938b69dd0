"""The delivery ledger through the real ``outbox-worker`` processes: a worker killed
with SIGKILL after PostHog accepted its batch and before it recorded the outcome, the
events sent again by the next worker, and each of them counted once; the ``ledger``
command's table, ``--json`` and errors; ``/metrics``."""

from __future__ import annotations

import datetime
import json
import signal
import threading
from typing import Any

import psycopg

import outbox
from tests.acceptance.test_probes import free_port, get, metric
from tests.acceptance.test_worker_process import count, enqueue_n, run_cli, start_worker
from tests.conftest import batches_in_flight, claimable, wait_for, worker_env
from worker.testing import CaptureServer, Exchange


def ledger_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = run_cli(env, "ledger", "--json", *args)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def hold_first_batch(capture: CaptureServer) -> tuple[threading.Event, threading.Event]:
    """Make the first ``/batch/`` request wait, its body read, until ``release`` is set;
    then it is judged and accepted as any other (answering a worker that may be gone).
    Returns (``arrived``, ``release``)."""
    arrived, release = threading.Event(), threading.Event()

    def held(srv: CaptureServer, exchange: Exchange) -> None:
        if not arrived.is_set():
            raw = exchange.read_body()
            arrived.set()
            release.wait(60)
            exchange.read_body = lambda: raw  # type: ignore[method-assign]
        srv._serve_capture(exchange)  # the server's own answer, as without the route

    capture.routes["/batch/"] = held
    return arrived, release


def test_sigkill_after_posthog_accepted_counts_each_event_once(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    uuids = enqueue_n(database_url, 500)
    arrived, release = hold_first_batch(capture)
    lease = 8.0
    env = worker_env(
        database_url,
        capture,
        OUTBOX_LEASE_SECONDS=str(lease),
        OUTBOX_BATCH_SIZE="200",
        OUTBOX_REQUEST_TIMEOUT="3",
    )
    proc = start_worker(env)
    try:
        wait_for(arrived.is_set, what="the first batch to reach the endpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        release.set()
    assert proc.returncode == -signal.SIGKILL
    # PostHog accepted the batch; the worker never heard of it, so nothing is recorded.
    wait_for(lambda: len(capture.uuids()) == 200, what="the held batch to be accepted")
    assert count(db) == 500
    assert ledger_json(env)["totals"] == {"delivered": 0, "dead": 0, "purged": 0}
    assert batches_in_flight(database_url) > 0
    wait_for(lambda: claimable(database_url) == 500, timeout=lease + 30, what="the lease to end")

    # The next worker sends all 500 again (200 of them twice in all), and counts 500.
    port = free_port()
    delivered = 'outbox_ledger_events_total{destination="posthog",outcome="delivered"}'
    proc = start_worker(worker_env(database_url, capture, OUTBOX_METRICS_PORT=str(port)))
    try:
        wait_for(lambda: count(db) == 0, timeout=60, what="the outbox to drain")
        text = wait_for(
            lambda: (
                (t := get(f"http://127.0.0.1:{port}/metrics")[1])
                and metric(t, delivered) == 500.0
                and t
            ),
            what="the ledger counter to reach 500",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    received = capture.uuids()
    assert len(received) == 700 and set(received) == uuids
    report = ledger_json(env)
    assert report["totals"] == {"delivered": 500, "dead": 0, "purged": 0}
    assert {(r["event"], r["destination"]) for r in report["rows"]} == {("page_viewed", "posthog")}
    # Each event is counted on the UTC day of its timestamp (as sent: ISO 8601 in UTC).
    assert {r["day"] for r in report["rows"]} == {e["timestamp"][:10] for e in capture.events}
    assert metric(text, 'outbox_ledger_events_total{destination="posthog",outcome="dead"}') == 0.0


HOSTILE = "evil\x1b[2J\u202e\nforged row  " + "x" * 150


def test_the_ledger_command_table_json_filters_and_errors(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    today = datetime.datetime.now(datetime.UTC).date()
    old = today - datetime.timedelta(days=10)
    with psycopg.connect(database_url) as conn:
        outbox.enqueue_many(
            conn,
            [{"event": "signed_up", "distinct_id": f"u{i}"} for i in range(3)]
            + [{"event": HOSTILE, "distinct_id": "eve"}]
            + [
                {"event": "signed_up", "distinct_id": "old", "timestamp": f"{old}T12:00:00Z"}
                for _ in range(2)
            ],
        )
        conn.commit()
    env = worker_env(database_url, capture)
    assert run_cli(env, "run", "--until-empty").returncode == 0

    table = run_cli(env, "ledger")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"delivery ledger since {today - datetime.timedelta(days=6)}")
    assert lines[1].split() == ["day", "event", "destination", "delivered", "dead", "purged"]
    assert f"{today}  signed_up" in table.stdout
    assert "\x1b" not in table.stdout and "\u202e" not in table.stdout
    assert "evil\\x1b[2J\\u202e\\nforged row" in table.stdout  # escaped, cut at 60
    assert max(len(line) for line in lines) < 150
    assert not any(line.startswith("forged") for line in lines)
    assert lines[-1].split() == ["total", "4", "0", "0"]  # the 10-day-old ones are older

    report = ledger_json(env, "--since", "11d")
    assert report["totals"]["delivered"] == 6
    assert HOSTILE in {r["event"] for r in report["rows"]}  # exact in JSON
    assert ledger_json(env, "--since", str(old), "--event", "signed_up")["rows"] == [
        {"day": str(old), "event": "signed_up", "destination": "posthog", "delivered": 2,
         "dead": 0, "purged": 0},
        {"day": str(today), "event": "signed_up", "destination": "posthog", "delivered": 3,
         "dead": 0, "purged": 0},
    ]  # fmt: skip
    nothing = run_cli(env, "ledger", "--event", "never_sent")
    assert nothing.returncode == 0
    assert nothing.stdout.startswith("no delivered, dead or purged events since")

    for bad in ("7 days", "0d", "2026-13-01", "yesterday"):
        done = run_cli(env, "ledger", "--since", bad)
        assert done.returncode == 2, (bad, done.stderr)
        (line,) = done.stderr.splitlines()
        assert line.startswith("outbox-worker ledger: error: --since="), line
