"""The real ``outbox-worker`` process: shipping, SIGKILL, SIGTERM, several workers, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import outbox
from tests.conftest import (
    EVENT_TABLES,
    batches_in_flight,
    capture_requests,
    claimable,
    event_table_bytes,
    make_retries_due,
    move_to_retry,
    wait_for,
    worker_env,
)
from worker.storage.snapshot import insert_events
from worker.testing import CaptureServer, Reply

WORKER = [str(Path(sys.executable).with_name("outbox-worker"))]


def enqueue_n(database_url: str, n: int) -> set[str]:
    with psycopg.connect(database_url) as conn:
        out = outbox.enqueue_many(
            conn,
            [
                {"event": "page_viewed", "distinct_id": f"user-{i % 97}", "properties": {"i": i}}
                for i in range(n)
            ],
        )
        conn.commit()
    return {str(u) for u in out}


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WORKER, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*WORKER, "run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def count(db: psycopg.Connection[Any], where: str = "true") -> int:
    """Events not yet delivered (rows of the view ``outbox_events``) matching ``where``."""
    row = db.execute(f"SELECT count(*) FROM outbox_events WHERE {where}").fetchone()
    assert row is not None
    return int(row[0])


def slot_now(db: psycopg.Connection[Any]) -> int:
    """The event table the clock has enqueue write to now."""
    row = db.execute("SELECT outbox_snapshot_slot()").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("gzip", ["1", "0"])
def test_run_until_empty_ships_over_http(
    gzip: str, database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    uuids = enqueue_n(database_url, 300)
    env = worker_env(database_url, capture, OUTBOX_GZIP=gzip, OUTBOX_BATCH_SIZE="100")
    result = run_cli(env, "run", "--until-empty")
    assert result.returncode == 0, result.stderr
    assert set(capture.uuids()) == uuids
    assert len(capture.uuids()) == 300
    assert all(r.gzip == (gzip == "1") for r in capture_requests(capture))
    assert all(r.api_key == "phc_test" for r in capture.requests)
    assert [r.status for r in capture.flags_requests()] == [200]  # the key, checked once
    assert "phc_test" not in result.stderr  # the key is never logged
    assert "batch_shipped" in result.stderr
    assert count(db) == 0


def test_sigkill_mid_batch_loses_nothing(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    uuids = enqueue_n(database_url, 500)
    capture.default_reply = Reply(status=200, delay=30)  # hold the batch on the wire
    lease = 8.0
    env = worker_env(
        database_url,
        capture,
        OUTBOX_LEASE_SECONDS=str(lease),  # more than twice the timeout, as the worker requires
        OUTBOX_BATCH_SIZE="200",
        OUTBOX_REQUEST_TIMEOUT="3",
    )
    proc = start_worker(env)
    try:
        wait_for(lambda: batches_in_flight(database_url) > 0, what="a batch in flight")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = time.monotonic()
    assert proc.returncode == -signal.SIGKILL
    assert count(db) == 500  # nothing delivered, nothing lost
    capture.default_reply = Reply(status=200)
    # The dead worker held no transaction, but its lease outlives it: its batch (the
    # chunk on the wire and the rest of the batch) is nobody's until the lease runs out,
    # and then anyone's.
    assert claimable(database_url) <= 500 - 200
    wait_for(lambda: claimable(database_url) == 500, timeout=lease + 30, what="the lease to end")
    assert time.monotonic() - killed < lease + 30
    env2 = worker_env(database_url, capture, OUTBOX_BATCH_SIZE="200")
    deadline = time.monotonic() + 30
    while count(db) and time.monotonic() < deadline:
        assert run_cli(env2, "run", "--until-empty").returncode == 0
        time.sleep(0.2)
    assert count(db) == 0
    assert set(capture.uuids()) == uuids


def test_sigterm_finishes_the_in_flight_batch_and_exits_0(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    enqueue_n(database_url, 300)
    capture.default_reply = Reply(status=200, delay=1.0)
    env = worker_env(database_url, capture, OUTBOX_BATCH_SIZE="100", OUTBOX_SHUTDOWN_GRACE="10")
    proc = start_worker(env)
    wait_for(lambda: batches_in_flight(database_url) > 0, what="a batch in flight")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    shipped = len(capture.uuids())
    assert shipped >= 100  # the in-flight batch finished
    assert count(db) == 300 - shipped
    assert batches_in_flight(database_url) == 0  # nothing left held
    assert claimable(database_url) == 300 - shipped
    assert "worker_stopped" in err


def test_sigterm_past_the_grace_releases_the_batch_at_once(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    uuids = enqueue_n(database_url, 50)
    capture.default_reply = Reply(status=200, delay=30)
    env = worker_env(
        database_url,
        capture,
        OUTBOX_SHUTDOWN_GRACE="0.5",
        OUTBOX_LEASE_SECONDS="600",
        OUTBOX_REQUEST_TIMEOUT="60",
    )
    proc = start_worker(env)
    wait_for(lambda: batches_in_flight(database_url) == 1, what="a batch in flight")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 10
    # Released, not left to a 600 s lease: another worker can take them right away,
    # and no attempt was counted against them.
    assert count(db, "status = 'pending' AND attempts = 0") == 50
    assert batches_in_flight(database_url) == 0
    assert claimable(database_url) == 50
    capture.stop()
    with CaptureServer() as fresh:
        result = run_cli(worker_env(database_url, fresh), "run", "--until-empty")
        assert result.returncode == 0, result.stderr
        assert set(fresh.uuids()) == uuids


def test_two_worker_processes_ship_no_event_twice(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    uuids = enqueue_n(database_url, 4000)
    env = worker_env(database_url, capture, OUTBOX_BATCH_SIZE="100")
    procs = [
        subprocess.Popen(
            [*WORKER, "run", "--until-empty"], env=env, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    shipped = capture.uuids()
    assert len(shipped) == len(set(shipped)) == 4000
    assert set(shipped) == uuids
    assert count(db) == 0


def test_a_running_worker_truncates_the_tables_it_has_drained(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    """The old table needed VACUUM after its DELETEs; the event tables are emptied
    whole: once every row of a table is delivered, the worker's rotation TRUNCATEs it
    (0 bytes, nothing left to vacuum), except the one the clock has enqueue write to."""
    slot = slot_now(db)
    earlier = (slot - 1) % EVENT_TABLES  # where enqueue wrote ten minutes ago
    older = [
        {"uuid": str(uuid.uuid4()), "event": "page_viewed", "distinct_id": f"user-{i}"}
        for i in range(100)
    ]
    with psycopg.connect(database_url) as conn:
        insert_events(conn, older, table=earlier)
    uuids = {e["uuid"] for e in older} | enqueue_n(database_url, 50)
    assert event_table_bytes(database_url)[earlier] > 0
    proc = start_worker(worker_env(database_url, capture, OUTBOX_BATCH_SIZE="40"))
    try:
        capture.wait_for_events(150, timeout=60)
        wait_for(lambda: count(db) == 0, what="every event delivered")
        # The worker rotates on its maintenance cadence (with the backlog refresh).
        wait_for(
            lambda: event_table_bytes(database_url)[earlier] == 0,
            timeout=90,
            what=f"outbox_events_{earlier} truncated",
        )
        if slot_now(db) == slot:
            assert event_table_bytes(database_url)[slot] > 0  # still enqueue's table
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert set(capture.uuids()) == uuids and len(capture.uuids()) == 150


def test_status_dead_retry_purge(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    uuids = sorted(enqueue_n(database_url, 10))
    assert move_to_retry(database_url, uuids[:3], attempts=16, last_error="HTTP 400: bad") == 3
    env = worker_env(database_url, capture)
    status = run_cli(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert (report["pending"], report["due"], report["dead"]) == (7, 7, 3)
    assert report["in_flight"] == []
    assert report["oldest_pending_age_seconds"] >= 0
    assert report["top_dead"] == [{"event": "page_viewed", "count": 3}]
    table = run_cli(env, "status")
    assert table.returncode == 0 and "dead" in table.stdout and "HTTP 400: bad" in table.stdout

    dead = run_cli(env, "dead", "--json")
    assert [r["last_error"] for r in json.loads(dead.stdout)] == ["HTTP 400: bad"] * 3
    first_id = json.loads(dead.stdout)[0]["id"]

    assert "requeued 1" in run_cli(env, "retry", "--id", str(first_id)).stdout
    assert count(db, "status = 'dead'") == 2
    assert "purged 0" in run_cli(env, "purge", "--dead", "--older-than", "1h").stdout
    assert "purged 2" in run_cli(env, "purge", "--dead", "--older-than", "0s").stdout
    assert count(db, "status = 'dead'") == 0
    assert count(db) == 8


def test_migrate_creates_the_tables(empty_database: str) -> None:
    env = worker_env(empty_database)
    missing = run_cli(env, "status")
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "outbox-worker migrate" in missing.stderr
    assert run_cli(env, "migrate").returncode == 0
    assert run_cli(env, "status", "--json").returncode == 0


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres@127.0.0.1:1/nowhere", "cannot connect"),
        ("not a url at all ://", "not a valid PostgreSQL URL"),
    ],
)
def test_bad_database_url_is_one_clear_line(url: str, expected: str) -> None:
    env = worker_env(url)
    result = run_cli(env, "status")
    assert result.returncode == 2
    assert expected in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A directory for an embedded PostgreSQL, outside pytest's temporary directory:
    a second pytest run starting meanwhile makes that private to root again
    (chmod 0700), and the server's own user could no longer read its files."""
    path = Path(tempfile.mkdtemp(prefix="outbox-demo-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_demo_runs_on_the_embedded_default(data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "POSTHOG_API_KEY")}
    env["OUTBOX_DATA_DIR"] = str(data_dir / "data")
    result = run_cli(env, "demo", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "embedded PostgreSQL" in result.stderr
    assert "shipped 5 events" in result.stdout
    assert "never shipped" in result.stdout
    again = run_cli(env, "status", "--json", timeout=60)
    assert json.loads(again.stdout)["pending"] == 0


def test_until_empty_exit_codes_tell_cron_what_happened(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    enqueue_n(database_url, 5)
    capture.default_reply = Reply(status=503)
    env = worker_env(database_url, capture)
    failed = run_cli(env, "run", "--until-empty")
    assert failed.returncode == 1, failed.stderr
    assert "batch_failed" in failed.stderr
    assert count(db, "attempts = 1") == 5
    capture.default_reply = Reply(status=200)
    assert make_retries_due(database_url) == 5  # as if their backoff had passed
    assert run_cli(env, "run", "--until-empty").returncode == 0
    assert count(db) == 0


def test_run_without_tables_fails_fast_with_one_line(empty_database: str) -> None:
    result = run_cli(worker_env(empty_database), "run")
    assert result.returncode == 2
    assert "outbox-worker migrate" in result.stderr
    assert "Traceback" not in result.stderr


def test_options_work_after_the_command_name(database_url: str) -> None:
    env = worker_env("postgresql://postgres@127.0.0.1:1/nowhere")
    result = run_cli(env, "status", "--json", "--database-url", database_url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pending"] == 0


def test_log_lines_keep_their_fields(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    uuids = sorted(enqueue_n(database_url, 4))
    capture.reject_events(lambda e: e["uuid"] == uuids[2], status=400, detail="bad")
    result = run_cli(worker_env(database_url, capture), "run", "--until-empty")
    assert result.returncode == 1
    rejected = [line for line in result.stderr.splitlines() if "[event_rejected]" in line]
    assert len(rejected) == 1 and f"uuid={uuids[2]}" in rejected[0]
    shipped = [line for line in result.stderr.splitlines() if "[batch_shipped]" in line]
    assert shipped and "events=" in shipped[0]
