"""The real ``outbox-worker`` with a wrong project key, against an endpoint that behaves
like PostHog's capture: a well-formed key of no project is answered 200 and its events
are dropped. The worker keeps every event, says why, and once the key is fixed each
event arrives exactly once. The key never appears in what the worker prints."""

from __future__ import annotations

import json
import signal
from collections import Counter
from typing import Any

import psycopg

from tests.acceptance.test_probes import free_port, get
from tests.acceptance.test_worker_process import enqueue_n, run_cli, start_worker
from tests.conftest import capture_requests, wait_for, worker_env
from worker.testing import CaptureServer

RIGHT = "phc_Rr1ghtRr1ghtRr1ghtRr1ghtRr1ghtRr1ght"
WRONG = "phc_Wr0ngWr0ngWr0ngWr0ngWr0ngWr0ngWr0ng"  # e.g. the EU project's key


def table(db: psycopg.Connection[Any]) -> list[tuple[str, int]]:
    return db.execute("SELECT status, count(*)::int FROM outbox_events GROUP BY status").fetchall()


def attempts(db: psycopg.Connection[Any]) -> int:
    row = db.execute("SELECT coalesce(max(attempts), 0) FROM outbox_events").fetchone()
    assert row is not None
    return int(row[0])


def test_a_wrong_key_loses_nothing_and_the_fixed_key_ships_each_event_once(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    capture.project_keys = {RIGHT}
    uuids = enqueue_n(database_url, 120)
    port = free_port()
    wrong = worker_env(
        database_url,
        capture,
        POSTHOG_API_KEY=WRONG,
        OUTBOX_METRICS_PORT=str(port),
        OUTBOX_UNAUTHORIZED_PAUSE="1",
        OUTBOX_WORKER_ID="acceptance-wrong-key",
        OUTBOX_BATCH_SIZE="50",
    )
    proc = start_worker(wrong)
    try:
        # It checks the key, and checks it again while it stays rejected.
        wait_for(lambda: len(capture.flags_requests()) >= 3, what="repeated key checks")
        status, why = get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503
        assert "does not know POSTHOG_API_KEY" in why
        report = json.loads(run_cli(wrong, "status", "--json").stdout)
        text = run_cli(wrong, "status")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err

    # Nothing was sent, so nothing was dropped; every event is still there, unharmed.
    assert capture_requests(capture) == []
    assert capture.dropped == [] and capture.events == []
    assert table(db) == [("pending", 120)]
    assert attempts(db) == 0
    assert all(r.status == 401 and r.api_key == WRONG for r in capture.flags_requests())

    # It says why, once, naming the host; the key is nowhere in what it printed.
    lines = [line for line in err.splitlines() if "[api_key_rejected]" in line]
    assert len(lines) == 1, err
    assert " ERROR " in lines[0]
    assert f"host={capture.url}" in lines[0]
    assert "POSTHOG_HOST=https://eu.i.posthog.com" in lines[0]
    assert WRONG not in err and WRONG not in out

    # status shows the worker's reason.
    (entry,) = report["workers"]
    assert entry["worker"] == "acceptance-wrong-key"
    assert (entry["host"], entry["state"]) == (capture.url, "key_rejected")
    assert "does not know POSTHOG_API_KEY" in entry["reason"]
    assert text.returncode == 0
    assert "acceptance-wrong-key" in text.stdout and "key_rejected" in text.stdout
    assert WRONG not in json.dumps(report) and WRONG not in text.stdout + text.stderr
    # A clean stop removed the worker's row.
    assert db.execute("SELECT count(*) FROM outbox_worker_state").fetchone() == (0,)

    # From cron the same key sends nothing, says why in one line, and exits 3.
    cron = run_cli(wrong, "run", "--until-empty")
    assert cron.returncode == 3, cron.stderr
    said = [line for line in cron.stderr.splitlines() if " INFO " not in line]
    assert len(said) == 1 and "[api_key_rejected]" in said[0], cron.stderr
    assert "Traceback" not in cron.stderr and "[until_empty_done]" not in cron.stderr
    assert WRONG not in cron.stderr + cron.stdout
    assert capture_requests(capture) == []
    assert table(db) == [("pending", 120)]

    # The key is fixed: each event arrives exactly once.
    fixed = dict(wrong, POSTHOG_API_KEY=RIGHT, OUTBOX_WORKER_ID="acceptance-right-key")
    proc = start_worker(fixed)
    try:
        capture.wait_for_events(120, timeout=60)
        wait_for(lambda: table(db) == [], what="the outbox to drain")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    counts = Counter(capture.uuids())
    assert set(counts) == uuids
    assert set(counts.values()) == {1}
    assert capture.dropped == []
    assert all(r.api_key == RIGHT for r in capture_requests(capture))
    assert "[api_key_verified]" in err
    assert RIGHT not in err and RIGHT not in out


def test_until_empty_with_a_personal_key_stops_before_anything(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    enqueue_n(database_url, 3)
    env = worker_env(database_url, capture, POSTHOG_API_KEY="phx_personalpersonalpersonal")
    result = run_cli(env, "run", "--until-empty")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "outbox-worker: error: POSTHOG_API_KEY is a personal API key (phx_...): the worker "
        "needs the project API key (phc_...), from your PostHog project's settings"
    )
    assert capture.requests == []
    assert table(db) == [("pending", 3)]
