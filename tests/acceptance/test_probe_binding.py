"""Where the running worker's probe server listens, and what stalled clients cost it."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.acceptance.test_probes import free_port, get
from tests.acceptance.test_worker_process import start_worker
from tests.conftest import wait_for, worker_env


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on ``port``."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(address)
    return found


def threads_of(proc: subprocess.Popen[str]) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


@pytest.mark.parametrize(
    ("host", "address"), [(None, "0100007F"), ("0.0.0.0", "00000000")], ids=["default", "open"]
)
def test_the_probes_listen_on_loopback_unless_opened(
    host: str | None, address: str, database_url: str
) -> None:
    port = free_port()
    extra = {"OUTBOX_METRICS_PORT": str(port)}
    if host is not None:
        extra["OUTBOX_METRICS_HOST"] = host
    proc = start_worker(worker_env(database_url, **extra))
    try:
        wait_for(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, what="/healthz")
        assert listening_addresses(port) == {address}
    finally:
        err = stop(proc)
    where = host or "127.0.0.1"
    assert f"[probes_started] serving /metrics, /healthz and /readyz on {where}" in err


def test_stalled_clients_cost_the_worker_no_threads(database_url: str) -> None:
    port = free_port()
    proc = start_worker(worker_env(database_url, OUTBOX_METRICS_PORT=str(port)))
    stalled: list[socket.socket] = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: get(base + "/readyz")[0] == 200, what="/readyz")
        before = threads_of(proc)
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            stalled.append(sock)
        for _ in range(10):
            assert get(base + "/healthz") == (200, "ok\n")
        assert get(base + "/readyz")[0] == 200
        # The scheduler's pool may still grow to its 3 threads; 300 stalled clients
        # held one thread each before.
        assert threads_of(proc) <= before + 3
    finally:
        for sock in stalled:
            sock.close()
        stop(proc)
