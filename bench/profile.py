"""``python -m bench profile``: where a draining worker spends its time.

One ``outbox-worker run --until-empty`` drains a backlog (gzip off by default) under
py-spy, which samples the worker's stacks 250 times a second, counting time spent
waiting too (``--idle``): a wall-clock profile, with little overhead. If py-spy is not
installed or may not trace processes here, cProfile is used instead (deterministic,
with an overhead that inflates small Python functions; its figures are cumulative
times per function).

Samples are sorted into buckets by the frames on their stack, so the result reads as
"claim SQL, JSON decode, request JSON encode, non-finite float walk, HTTP, outcome". The
CPU used meanwhile by PostgreSQL and by the endpoint is reported beside it: with two
cores, their share is the worker's to wait for.
"""

from __future__ import annotations

import pstats
import shutil
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.db import PostgresCpu
from bench.drain import CpuMeter, fill_for_worker
from bench.endpoint import Endpoint
from bench.errors import BenchFailed
from bench.harness import Context
from bench.procs import ChildGroup, worker_argv, worker_env
from bench.report import Cell

DEFAULT_EVENTS = 100_000
QUICK_EVENTS = 3_000
SAMPLE_RATE = 250


@dataclass(frozen=True, slots=True)
class Bucket:
    """A named part of the worker's work, recognised by a frame on the stack."""

    name: str
    #: (function name or "*", file path suffix) pairs; any one on the stack matches.
    frames: tuple[tuple[str, str], ...]
    #: Only within a stack that also has one of these frames (empty: anywhere).
    within: tuple[tuple[str, str], ...] = ()


_SHIP = (("send", "worker/sinks/"), ("post", "posthog/request.py"), ("_ship", "worker/drain.py"))

# Checked in order; the first bucket that matches a stack gets its samples. The rules
# name frames, not the worker's call structure, so they hold while it changes.
BUCKETS: tuple[Bucket, ...] = (
    Bucket(
        "JSON encode: non-finite float walk (posthog's _replace_non_finite_floats)",
        (("_replace_non_finite_floats", ""),),
    ),
    Bucket(
        "JSON encode of the request body",
        (("*", "json/encoder.py"), ("dumps", "json/__init__.py"), ("dumps", "orjson")),
        _SHIP,
    ),
    Bucket("gzip of the request body", (("*", "gzip.py"), ("*", "zlib")), _SHIP),
    Bucket(
        "HTTP: requests/urllib3/socket, incl. waiting for the endpoint's answer",
        (("*", "requests/"), ("*", "urllib3/"), ("*", "http/client.py"), ("*", "socket.py")),
    ),
    Bucket(
        "JSON decode of properties",
        (("*", "json/decoder.py"), ("loads", "json/__init__.py"), ("*", "psycopg/types/json.py")),
    ),
    Bucket(
        "claim SQL: round trip incl. PostgreSQL's time, row fetch",
        (("claim", "worker/storage/snapshot_storage.py"),),
    ),
    Bucket(
        "outcome SQL: the batch moved past the chunk (or finished), failures filed, COMMIT",
        (
            ("finish", "worker/storage/snapshot_storage.py"),
            ("release", "worker/storage/snapshot_storage.py"),
        ),
    ),
    Bucket("posthog request layer, other", (("*", "posthog/"),)),
    Bucket(
        "building the request from rows (worker code)",
        (
            ("*", "worker/sinks/"),
            ("_ship", "worker/drain.py"),
            ("outbound", "worker/storage/snapshot.py"),
        ),
    ),
    Bucket("logging", (("*", "logging/__init__.py"),)),
    Bucket(
        "waiting: idle thread, or for another thread's result",
        (
            ("wait", "threading.py"),
            ("result", "concurrent/futures/_base.py"),
            ("_worker", "concurrent/futures/thread.py"),
            ("get", "queue.py"),
        ),
    ),
    Bucket("other, within the drain loop", (("*", "worker/drain.py"),)),
    Bucket("start-up and exit: imports, connecting, closing", (("*", ""),)),
)
STARTUP = BUCKETS[-1].name


def _frame_matches(frame: tuple[str, str], pattern: tuple[str, str]) -> bool:
    func, path = frame
    want_func, want_path = pattern
    # py-spy names methods with their class (``SnapshotStorage.claim``); cProfile does not.
    name_ok = want_func in ("*", func) or func.endswith("." + want_func)
    return name_ok and (want_path == "" or want_path in path)


#: A stack with none of these frames is start-up or exit, not the drain.
_DRAIN_CONTEXT = (
    ("*", "worker/drain.py"),
    ("*", "worker/storage/"),
    ("*", "worker/sinks/"),
    ("*", "concurrent/futures/thread.py"),
)


def classify(stack: Sequence[tuple[str, str]]) -> str:
    """The bucket a stack (root first, as (function, file) pairs) belongs to."""
    if any(func == "_find_and_load" for func, _ in stack) or not any(
        _frame_matches(f, p) for f in stack for p in _DRAIN_CONTEXT
    ):
        return STARTUP
    for bucket in BUCKETS:
        if bucket.within and not any(_frame_matches(f, p) for f in stack for p in bucket.within):
            continue
        if any(_frame_matches(f, p) for f in stack for p in bucket.frames):
            return bucket.name
    return BUCKETS[-1].name


def parse_pyspy_raw(text: str) -> dict[str, dict[str, float]]:
    """Samples per thread name and bucket, from py-spy's ``--threads --format raw``."""
    samples: list[tuple[str, list[tuple[str, str]], int]] = []
    names: dict[str, str] = {}
    for line in text.splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        thread = "all"
        frames = []
        for frame in stack_text.split(";"):
            if frame.startswith("thread ("):
                # "thread (1234): MainThread", or without the name when py-spy missed it.
                thread, _, name = frame.partition(": ")
                if name:
                    names[thread] = name
                continue
            func, _, rest = frame.partition(" (")
            frames.append((func.strip(), rest.rsplit(":", 1)[0]))
        samples.append((thread, frames, int(count)))
    by_thread: dict[str, dict[str, float]] = {}
    for thread_id, stack, n in samples:
        group = _thread_group(names.get(thread_id, thread_id))
        by_thread.setdefault(group, defaultdict(float))[classify(stack)] += n
    return by_thread


def _thread_group(name: str) -> str:
    # ThreadPoolExecutor-0_0, -0_1...: one column per pool, not per thread.
    return name.rsplit("_", 1)[0] if name.startswith("ThreadPoolExecutor-") else name


def cprofile_buckets(path: Path) -> dict[str, dict[str, float]]:
    """Seconds per bucket from a cProfile dump of the main thread (cProfile sees no
    other thread): cumulative times of the bucket's functions. Approximate."""
    stats = pstats.Stats(str(path))
    table = stats.stats  # type: ignore[attr-defined]

    def cumulative(func: str, file_part: str) -> float:
        return sum(  # entry = (calls, primitive calls, own time, cumulative time, callers)
            float(entry[3])
            for (filename, _, name), entry in table.items()
            if name == func and file_part in filename
        )

    total = max((entry[3] for entry in table.values()), default=0.0)
    walk = cumulative("_replace_non_finite_floats", "posthog/request.py")
    encode = max(0.0, cumulative("encode", "json/encoder.py") - walk)
    http = cumulative("request", "requests/sessions.py")
    decode = cumulative("loads", "json/__init__.py")
    claim = cumulative("claim", "worker/storage/snapshot_storage.py")
    ack = cumulative("finish", "worker/storage/snapshot_storage.py")
    build = cumulative("outbound", "worker/storage/snapshot.py") + cumulative(
        "to_payload", "worker/drain.py"
    )
    drain = cumulative("drain", "worker/drain.py")
    counts: dict[str, float] = defaultdict(float)
    counts[BUCKETS[0].name] = walk
    counts[BUCKETS[1].name] = encode
    counts[BUCKETS[3].name] = http
    counts[BUCKETS[4].name] = decode
    counts[BUCKETS[5].name] = max(0.0, claim - decode)
    counts[BUCKETS[6].name] = ack
    counts[BUCKETS[8].name] = build
    counts[BUCKETS[11].name] = max(0.0, drain - walk - encode - http - claim - ack - build)
    counts[STARTUP] = max(0.0, total - drain)
    return {"MainThread": counts}


def _pyspy() -> str | None:
    candidate = Path(sys.executable).with_name("py-spy")
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


def run(ctx: Context, *, events: int, gzip: bool, profiler: str) -> dict[str, dict[str, float]]:
    """The profile command."""
    pyspy = _pyspy() if profiler in ("auto", "py-spy") else None
    if profiler == "py-spy" and pyspy is None:
        raise BenchFailed("py-spy is not installed (pip install -e '.[bench]')")
    with (
        ctx.server.scratch("profile") as url,
        Endpoint() as endpoint,
        ChildGroup(ctx.log_dir) as group,
    ):
        ctx.describe(url)
        env = worker_env(url, endpoint.url, gzip=gzip)
        fill_for_worker(ctx, url, env, events)
        meter = CpuMeter(PostgresCpu(url), endpoint)
        used = "py-spy" if pyspy is not None else "cProfile"
        counts: dict[str, dict[str, float]] | None = None
        if pyspy is not None:
            out = ctx.log_dir / "worker-profile.txt"
            argv = [
                pyspy,
                "record",
                "--idle",
                "--threads",
                "--rate",
                str(SAMPLE_RATE),
                "--format",
                "raw",
                "--output",
                str(out),
                "--",
                *worker_argv("run", "--until-empty"),
            ]
            meter.start()
            child = group.spawn("py-spy", argv, env=env)
            info = child.wait(max(120.0, events / 100))
            cpu_pg, cpu_ep = meter.stop()
            if info.returncode == 0 and out.exists():
                counts = parse_pyspy_raw(out.read_text())
            elif profiler == "py-spy":
                raise BenchFailed(f"py-spy failed (code {info.returncode}){child.log_hint()}")
            else:
                ctx.out.line(f"py-spy failed (code {info.returncode}); falling back to cProfile")
                fill_for_worker(ctx, url, env, events)
        if counts is None:
            used = "cProfile"
            out = ctx.log_dir / "worker-profile.prof"
            argv = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "worker.cli"]
            argv += ["run", "--until-empty"]
            meter.start()
            child = group.spawn("cprofile", argv, env=env)
            info = child.wait(max(120.0, events / 50))
            cpu_pg, cpu_ep = meter.stop()
            if info.returncode != 0 or not out.exists():
                raise BenchFailed(f"the profiled worker failed{child.log_hint()}")
            counts = cprofile_buckets(out)
        delivered = endpoint.count()
    report(ctx, counts, used, events, gzip, info.wall_seconds, info.cpu_seconds, cpu_pg, cpu_ep)
    if delivered < events:
        raise BenchFailed(f"the profiled worker delivered {delivered} of {events} events")
    return counts


def report(
    ctx: Context,
    counts: dict[str, dict[str, float]],
    used: str,
    events: int,
    gzip: bool,
    wall: float,
    cpu_worker: float,
    cpu_pg: float | None,
    cpu_endpoint: float,
) -> None:
    """One column per thread: its samples in each bucket, and their share of the
    thread's drain-time samples (start-up and exit left out)."""
    ctx.out.heading(
        f"Profile: one worker draining {events:,} events, gzip {'on' if gzip else 'off'}, {used}"
    )
    threads = sorted(counts, key=lambda t: -sum(counts[t].values()))[:3]
    unit = "s" if used == "cProfile" else "samples"
    headers = ["where the time goes"]
    for thread in threads:
        headers += [f"{thread} ({unit})", "share"]
    rows: list[list[Cell]] = []
    for bucket in BUCKETS:
        row: list[Cell] = [bucket.name]
        for thread in threads:
            value = counts[thread].get(bucket.name, 0)
            drain_total = sum(counts[thread].values()) - counts[thread].get(STARTUP, 0)
            share = f"{value / drain_total:.1%}" if bucket.name != STARTUP and drain_total else "-"
            row += [round(value) if used == "py-spy" else round(value, 2), share]
        rows.append(row)
    ctx.out.table(headers, rows)
    rate = f"{SAMPLE_RATE} samples/s per thread, waiting included (--idle)"
    ctx.out.facts(
        {
            "profiler": rate if used == "py-spy" else "cProfile, main thread only",
            "process": f"{wall:.1f}s wall from start to exit, {cpu_worker:.1f}s CPU "
            f"(under the profiler)",
            "meanwhile": f"PostgreSQL {cpu_pg:.1f}s CPU, endpoint {cpu_endpoint:.1f}s CPU"
            if cpu_pg is not None
            else f"endpoint {cpu_endpoint:.1f}s CPU (PostgreSQL CPU not readable)",
        }
    )
    ctx.out.line()
