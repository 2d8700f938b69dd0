"""The probe server over real sockets: loopback by default, stalled clients cost no
thread and cannot keep /healthz from answering, a port in use is a one-line error."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import wait_for
from worker.metrics import PROBE_HANDLER_THREADS, ProbeServer, WorkerMetrics
from worker.settings import SettingsError


def request(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    answer = request(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


@pytest.fixture
def serve() -> Iterator[Callable[..., ProbeServer]]:
    servers: list[ProbeServer] = []

    def start(ready: Callable[[], tuple[bool, str]] | None = None, **kw: Any) -> ProbeServer:
        server = ProbeServer(WorkerMetrics(), ready or (lambda: (True, "ok (sink ok)")), 0, **kw)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_it_listens_on_loopback_by_default(serve: Callable[..., ProbeServer]) -> None:
    server = serve()
    assert server._socket.getsockname()[0] == "127.0.0.1"
    assert get(server.port, "/healthz") == (200, b"ok\n")
    assert get(server.port, "/readyz") == (200, b"ok (sink ok)\n")
    status, body = get(server.port, "/metrics")
    assert status == 200 and b"outbox_sink_state" in body
    assert get(server.port, "/metrics", "HEAD") == (200, b"")
    assert get(server.port, "/nope")[0] == 404
    assert get(server.port, "/healthz", "POST")[0] == 405
    assert request(server.port, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_a_setting_opens_it_on_every_interface(serve: Callable[..., ProbeServer]) -> None:
    server = serve(host="0.0.0.0")
    assert server._socket.getsockname()[0] == "0.0.0.0"
    assert get(server.port, "/healthz") == (200, b"ok\n")


def test_stalled_clients_hold_no_thread_and_healthz_still_answers(
    serve: Callable[..., ProbeServer],
) -> None:
    before = threading.active_count()
    server = serve(max_connections=32)
    stalled = []
    try:
        for _ in range(400):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the end of the headers
            stalled.append(sock)
        assert threading.active_count() <= before + 1 + PROBE_HANDLER_THREADS
        for _ in range(20):
            assert get(server.port, "/healthz") == (200, b"ok\n")
        assert get(server.port, "/readyz")[0] == 200
        assert threading.active_count() <= before + 1 + PROBE_HANDLER_THREADS
        assert len(server._open) <= 32
    finally:
        for sock in stalled:
            sock.close()


def test_a_stalled_client_is_closed_after_the_read_timeout(
    serve: Callable[..., ProbeServer],
) -> None:
    server = serve(read_timeout=0.3)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""  # closed without an answer
        assert time.monotonic() - started < 5
    wait_for(lambda: not server._open, timeout=5, what="the connection to be forgotten")


def test_an_oversized_request_is_closed(serve: Callable[..., ProbeServer]) -> None:
    server = serve()
    try:
        answer = request(server.port, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n")
    except ConnectionResetError:
        answer = b""
    assert answer == b""


def test_a_hanging_readiness_check_does_not_block_healthz(
    serve: Callable[..., ProbeServer],
) -> None:
    release = threading.Event()

    def hang() -> tuple[bool, str]:
        release.wait(30)
        return True, "late"

    server = serve(ready=hang, handler_timeout=0.5)
    try:
        results: list[tuple[int, bytes]] = []
        waiters = [
            threading.Thread(target=lambda: results.append(get(server.port, "/readyz")))
            for _ in range(4)
        ]
        for waiter in waiters:
            waiter.start()
        assert get(server.port, "/healthz") == (200, b"ok\n")
        for waiter in waiters:
            waiter.join(20)
        assert results == [(503, b"readiness check timed out\n")] * 4
    finally:
        release.set()


def test_a_readiness_reason_is_escaped(serve: Callable[..., ProbeServer]) -> None:
    server = serve(ready=lambda: (False, "sink refuses the API key: bad\n\x1b[2J"))
    assert get(server.port, "/readyz") == (503, b"sink refuses the API key: bad\\n\\x1b[2J\n")


def test_a_port_in_use_is_one_line_naming_the_variable() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(SettingsError) as info:
            ProbeServer(WorkerMetrics(), lambda: (True, "ok"), port)
    assert info.value.setting == "OUTBOX_METRICS_PORT"
    assert str(info.value).startswith(f"OUTBOX_METRICS_PORT={port} is already in use")


@pytest.mark.parametrize("host", ["no-such-host.invalid", "192.0.2.1"])
def test_a_host_that_cannot_be_bound_names_the_host_variable(host: str) -> None:
    with pytest.raises(SettingsError) as info:
        ProbeServer(WorkerMetrics(), lambda: (True, "ok"), 0, host)
    assert info.value.setting == "OUTBOX_METRICS_HOST"
    assert "\n" not in str(info.value)


def test_stop_closes_the_port(serve: Callable[..., ProbeServer]) -> None:
    server = serve()
    port = server.port
    server.stop()
    assert not server._thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
