"""Subprocesses the benchmark owns: started, watched, reaped and always cleaned up.

Each child is reaped with ``os.wait4``, which returns that child's own CPU time. Its
peak resident set size is NOT taken from ``ru_maxrss``: Linux carries the parent's
high-water mark over ``fork``/``vfork`` + ``exec`` into the child's ``ru_maxrss``, so
every child would seem at least as big as the benchmark process. Instead a thread
reads the child's own high-water mark (``VmHWM`` in ``/proc/<pid>/status``, which
starts afresh at ``exec``) every 20 ms while it runs. `ChildGroup` stops every child
it started when its
block ends, on success, on failure and on Ctrl-C alike: SIGTERM, a bounded wait, then
SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from bench.errors import BenchFailed
from worker.settings import Settings

#: The API key every contender sends; the local endpoint accepts any key.
API_KEY = "phc_bench_local_endpoint"
#: ``application_name`` prefix of the worker processes' database connections.
WORKER_APP_NAME = "outbox-bench-worker"

TERM_GRACE = 15.0
KILL_WAIT = 5.0
HWM_INTERVAL = 0.02


class ChildFailed(BenchFailed):
    """A child process failed or did not do what it should in time."""


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a child ended, and what it used over its whole life."""

    returncode: int
    #: Highest VmHWM seen (sampled every 20 ms while it ran).
    max_rss_bytes: int
    cpu_seconds: float
    wall_seconds: float


class Child:
    """One subprocess. stderr (and stdout unless piped) goes to ``log_path``.

    With ``pipe_stdio`` the child's stdin and stdout are pipes carrying a line protocol
    (see `bench.contenders`): `send` writes a line, `expect` waits for one.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        pipe_stdio: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.exit: ExitInfo | None = None
        self.max_rss_bytes = 0
        self._terminated = False
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env=dict(env) if env is not None else None,
                stdin=subprocess.PIPE if pipe_stdio else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe_stdio else self._log,
                stderr=self._log,
            )
        except BaseException:
            self._log.close()
            raise
        if pipe_stdio:
            threading.Thread(target=self._read_stdout, name=f"{name}-stdout", daemon=True).start()
        self._watching = threading.Event()
        threading.Thread(target=self._watch_hwm, name=f"{name}-hwm", daemon=True).start()

    def _watch_hwm(self) -> None:
        while self.exit is None:
            self._sample_hwm()
            if self._watching.wait(HWM_INTERVAL):
                return

    def _sample_hwm(self) -> None:
        hwm = _proc_status_kb(self.proc.pid, "VmHWM")
        if hwm is not None:
            self.max_rss_bytes = max(self.max_rss_bytes, hwm * 1024)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.proc.pid

    # -- line protocol -----------------------------------------------------------------

    def _read_stdout(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for raw in stdout:
                self._lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._lines.put(None)

    def send(self, line: str) -> None:
        """Write one line to the child's stdin."""
        stdin = self.proc.stdin
        if stdin is None:
            raise ChildFailed(f"{self.name} has no stdin pipe")
        try:
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise ChildFailed(f"{self.name} is gone ({exc}){self.log_hint()}") from exc

    def expect(self, prefix: str, timeout: float) -> str:
        """Wait for a stdout line starting with ``prefix``; return the rest of it."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildFailed(
                    f"{self.name} did not say {prefix!r} within {timeout:.0f}s{self.log_hint()}"
                )
            try:
                line = self._lines.get(timeout=min(0.2, remaining))
            except queue.Empty:
                continue
            if line is None:
                self.wait(KILL_WAIT)
                raise ChildFailed(
                    f"{self.name} exited (code {self.returncode}) before saying {prefix!r}"
                    f"{self.log_hint()}"
                )
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
            self._log.write(f"[stdout] {line}\n".encode())

    # -- life and death ----------------------------------------------------------------

    def poll(self) -> ExitInfo | None:
        """Reap the child if it has exited; its exit info, or None while it runs."""
        if self.exit is not None:
            return self.exit
        self._sample_hwm()  # the last chance: once reaped, /proc/<pid> is gone
        try:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        except ChildProcessError:
            # Reaped elsewhere (should not happen): no usage figures, but not running.
            self.exit = ExitInfo(self.proc.returncode or 0, self.max_rss_bytes, 0.0, self._age())
            self._watching.set()
            return self.exit
        if pid == 0:
            return None
        code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = code  # so Popen never waits for it again
        self.exit = ExitInfo(
            returncode=code,
            max_rss_bytes=self.max_rss_bytes,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            wall_seconds=self._age(),
        )
        self._watching.set()
        return self.exit

    def _age(self) -> float:
        return time.monotonic() - self.started

    @property
    def running(self) -> bool:
        """Whether the child has not exited yet."""
        return self.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code once it exited (negative: killed by that signal)."""
        info = self.poll()
        return info.returncode if info is not None else None

    def wait(self, timeout: float) -> ExitInfo:
        """Wait for the child to exit by itself; `ChildFailed` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.poll()
            if info is not None:
                return info
            if time.monotonic() > deadline:
                raise ChildFailed(
                    f"{self.name} did not exit within {timeout:.0f}s{self.log_hint()}"
                )
            time.sleep(0.01)

    def signal(self, signum: int) -> None:
        """Send a signal if the child still runs."""
        if self.poll() is None:
            if signum == signal.SIGTERM:
                self._terminated = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)

    def stop(self, grace: float = TERM_GRACE) -> ExitInfo:
        """SIGTERM (once: a second one could land while the child's interpreter is
        already exiting, with default handlers back), wait up to ``grace`` seconds, then
        SIGKILL. Returns the exit info."""
        info = self.poll()
        if info is None:
            if not self._terminated:
                self.signal(signal.SIGTERM)
            try:
                info = self.wait(grace)
            except ChildFailed:
                self.signal(signal.SIGKILL)
                info = self.wait(KILL_WAIT)
        self.close()
        return info

    def close(self) -> None:
        """Close our ends of the pipes and the log file."""
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(OSError):
            self._log.close()

    def rss_bytes(self) -> int | None:
        """Current resident set size, from /proc (None when it is gone)."""
        rss = _proc_status_kb(self.proc.pid, "VmRSS")
        return None if rss is None else rss * 1024

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) used so far, from /proc (None when it is gone)."""
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def thread_cpu_seconds(self) -> dict[int, float]:
        """CPU time (user + system) of each live thread so far, by thread id (the main
        thread's id is the process id); empty when the process is gone."""
        tick = os.sysconf("SC_CLK_TCK")
        by_tid: dict[int, float] = {}
        try:
            tasks = list(Path(f"/proc/{self.proc.pid}/task").iterdir())
        except OSError:
            return by_tid
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            by_tid[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
        return by_tid

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the child's log."""
        with contextlib.suppress(OSError):
            self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_hint(self) -> str:
        """A suffix for error messages: the log's tail and where the full log is."""
        tail = self.log_tail()
        indented = "\n".join("    " + line for line in tail.splitlines())
        return f"; log {self.log_path}" + (f":\n{indented}" if indented else "")


def _proc_status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (None when the process or field is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


class ChildGroup:
    """Starts children and stops all of them when the ``with`` block ends, however."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._children: list[Child] = []
        self._counter = 0

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        pipe_stdio: bool = False,
    ) -> Child:
        """Start a child (its log is ``<log_dir>/<name>-<n>.log``)."""
        self._counter += 1
        child = Child(
            f"{name}-{self._counter}",
            argv,
            log_dir=self.log_dir,
            env=env,
            pipe_stdio=pipe_stdio,
        )
        self._children.append(child)
        return child

    def stop_all(self) -> None:
        """Stop every child still running (all are signalled first, then waited for)."""
        running = [c for c in self._children if c.running]
        for child in running:
            child.signal(signal.SIGTERM)
        for child in reversed(self._children):
            with contextlib.suppress(Exception):
                child.stop()
        self._children.clear()

    def __enter__(self) -> ChildGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


# -- the programs the benchmark runs -------------------------------------------------------


def worker_argv(*args: str) -> list[str]:
    """The ``outbox-worker`` command line (the venv's script, else ``-m worker.cli``)."""
    script = Path(sys.executable).with_name("outbox-worker")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "worker.cli", *args]


def contender_argv(*args: str) -> list[str]:
    """A `bench.contenders` program's command line."""
    return [sys.executable, "-m", "bench.contenders", *args]


def worker_env(
    database_url: str,
    endpoint_url: str,
    *,
    gzip: bool | None,
    app_name: str = WORKER_APP_NAME,
    defaults: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of an ``outbox-worker`` run against the bench endpoint.

    Everything else comes from this process's environment, so ``OUTBOX_BATCH_SIZE``,
    ``OUTBOX_POLL_INTERVAL`` and the like can be tried without touching the benchmark.
    ``defaults`` apply only where the environment does not set the variable. ``gzip``
    None keeps the environment's ``OUTBOX_GZIP`` (default on).
    """
    env = dict(os.environ)
    for name, value in (defaults or {}).items():
        if not env.get(name, "").strip():
            env[name] = value
    env.update(
        DATABASE_URL=database_url,
        POSTHOG_HOST=endpoint_url,
        POSTHOG_API_KEY=API_KEY,
        OUTBOX_SINK="posthog",
        PGAPPNAME=app_name,
    )
    env.pop("OUTBOX_METRICS_PORT", None)  # no probe server listening on every interface
    if gzip is not None:
        env["OUTBOX_GZIP"] = "1" if gzip else "0"
    return env


def worker_settings(env: Mapping[str, str]) -> Settings:
    """The settings a worker started with ``env`` will use."""
    return Settings.from_env(env)
