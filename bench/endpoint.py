"""The local capture endpoint, in a process of its own.

Every contender ships to the same `worker.testing.CaptureServer`. It runs in a separate
process, so parsing the requests never competes with the contender for the GIL (it
still competes for the machine's cores, like a real endpoint on the same host would).
The parent talks to it over a `multiprocessing` pipe: how many events were accepted,
wait until ``n`` were, reset, and (when recording is on) the uuids and arrival times
of the events.

With ``record_events`` off, the server only counts accepted events, which keeps it cheap
at hundreds of thousands of events. Recording is turned on for the latency and scale-out
runs, which need each event's arrival time or uuid.

The child ignores SIGINT: on Ctrl-C the parent stops it in order. It also exits by
itself when the pipe closes, so a parent that dies never leaves it behind.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any

from bench.errors import BenchFailed
from worker.testing import CaptureServer

START_TIMEOUT = 30.0
REPLY_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0
#: Longest single wait inside the child, so the parent can check on the contender.
WAIT_SLICE = 0.5


@dataclass(frozen=True, slots=True)
class UuidStats:
    """What arrived, by uuid: duplicates are uuids accepted more than once."""

    accepted: int
    unique: int
    duplicated_uuids: int
    extra_copies: int


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU seconds and peak RSS of the endpoint process so far."""

    cpu_seconds: float
    max_rss_bytes: int


class EndpointError(BenchFailed):
    """The endpoint process failed or did not answer in time."""


class Endpoint:
    """Handle on the capture endpoint process. Use as a context manager."""

    def __init__(self, *, record_events: bool = False) -> None:
        self.record_events = record_events
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._url: str | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Endpoint:
        """Start the process and wait (bounded) until the server listens."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(
            target=_serve, args=(child, self.record_events), name="bench-endpoint", daemon=True
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent
        reply = self._receive(START_TIMEOUT)
        self._url = str(reply)
        return self

    def stop(self) -> None:
        """Stop the process: ask, then terminate, then kill. Safe to call twice."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop",))
            conn.close()
        if process is not None:
            process.join(STOP_TIMEOUT)
            if process.is_alive():
                process.terminate()
                process.join(STOP_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join(STOP_TIMEOUT)

    def __enter__(self) -> Endpoint:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The host to give a PostHog client, e.g. ``http://127.0.0.1:40123``."""
        if self._url is None:
            raise EndpointError("the endpoint is not running")
        return self._url

    @property
    def pid(self) -> int | None:
        """The endpoint process's pid."""
        return self._process.pid if self._process is not None else None

    # -- requests ----------------------------------------------------------------------

    def count(self) -> int:
        """Events accepted so far."""
        return int(self._call("count"))

    def reset(self) -> None:
        """Forget what was received (counts, recordings)."""
        self._call("reset")

    def set_recording(self, on: bool) -> None:
        """Store accepted events (needed for uuids and arrival times) or only count them."""
        self._call("record", on)
        self.record_events = on

    def wait_for(self, n: int, timeout: float, *, check: Callable[[], None] | None = None) -> float:
        """Block until at least ``n`` events were accepted; return when (``time.monotonic``).

        ``check`` is called between short waits; it raises to give up early (for example
        when the contender process died). Raises `BenchFailed` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchFailed(
                    f"the endpoint accepted {self.count()} of {n} events within {timeout:.0f}s"
                )
            reached = self._call("wait", n, min(WAIT_SLICE, remaining))
            if reached is not None:
                return float(reached)
            if check is not None:
                check()

    def uuid_stats(self) -> UuidStats:
        """Duplicate check over the recorded events."""
        accepted, unique, duplicated, extra = self._call("uuid_stats")
        return UuidStats(int(accepted), int(unique), int(duplicated), int(extra))

    def arrivals(self, prop: str) -> list[tuple[int, float]]:
        """``(properties[prop], arrival time)`` of every recorded event carrying ``prop``.

        The arrival time is when its request reached the server (``time.monotonic``, which
        is the same clock in every process of this machine).
        """
        pairs = self._call("arrivals", prop)
        return [(int(value), float(at)) for value, at in pairs]

    def usage(self) -> Usage:
        """CPU time and peak RSS of the endpoint process."""
        cpu, rss = self._call("usage")
        return Usage(float(cpu), int(rss))

    # -- plumbing ----------------------------------------------------------------------

    def _call(self, *message: Any) -> Any:
        conn = self._conn
        if conn is None:
            raise EndpointError("the endpoint is not running")
        try:
            conn.send(message)
        except (OSError, ValueError) as exc:
            raise EndpointError(f"the endpoint process is gone: {exc}") from exc
        return self._receive(REPLY_TIMEOUT)

    def _receive(self, timeout: float) -> Any:
        conn, process = self._conn, self._process
        assert conn is not None
        assert process is not None
        deadline = time.monotonic() + timeout
        while not conn.poll(0.1):
            if not process.is_alive():
                raise EndpointError(f"the endpoint process exited (code {process.exitcode})")
            if time.monotonic() > deadline:
                raise EndpointError(f"the endpoint did not answer within {timeout:.0f}s")
        try:
            status, payload = conn.recv()
        except (EOFError, OSError) as exc:
            raise EndpointError(f"the endpoint process is gone: {exc}") from exc
        if status != "ok":
            raise EndpointError(f"the endpoint failed: {payload}")
        return payload


# -- the child process ---------------------------------------------------------------------


def _serve(conn: Connection, record_events: bool) -> None:
    """Run a CaptureServer and answer the parent's requests until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Recorded events are many small dicts and never form cycles: the cyclic collector
    # would only rescan them, over and over, while requests wait.
    gc.disable()
    server = CaptureServer(host="127.0.0.1")
    server.record_events = record_events
    server.start()
    try:
        conn.send(("ok", server.url))
        while True:
            if not conn.poll(1.0):
                continue
            message = conn.recv()
            command, args = message[0], message[1:]
            if command == "stop":
                return
            try:
                reply: tuple[str, Any] = ("ok", _handle(server, command, args))
            except Exception as exc:
                reply = ("error", f"{type(exc).__name__}: {exc}")
            conn.send(reply)
    except (EOFError, OSError):
        return  # the parent is gone
    finally:
        server.stop()


def _handle(server: CaptureServer, command: str, args: tuple[Any, ...]) -> Any:
    if command == "count":
        return server.accepted_count
    if command == "reset":
        server.reset()
        return None
    if command == "record":
        server.record_events = bool(args[0])
        return None
    if command == "wait":
        n, timeout = int(args[0]), float(args[1])
        try:
            server.wait_for_events(n, timeout)
        except TimeoutError:
            return None
        return time.monotonic()
    if command == "uuid_stats":
        counts = Counter(server.uuids())
        accepted = sum(counts.values())
        duplicated = sum(1 for c in counts.values() if c > 1)
        return (accepted, len(counts), duplicated, accepted - len(counts))
    if command == "arrivals":
        prop = str(args[0])
        pairs: list[tuple[int, float]] = []
        for request in server.requests:
            if not request.accepted:
                continue
            for event in request.events:
                value = (event.get("properties") or {}).get(prop)
                if isinstance(value, int):
                    pairs.append((value, request.received_at))
        return pairs
    if command == "usage":
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return (usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)
    raise ValueError(f"unknown command {command!r}")
