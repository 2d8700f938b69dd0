"""``python -m bench scaleout``: several workers on one backlog.

For each worker count: that many ``outbox-worker run`` processes are started on an
empty outbox and the harness waits until each has connected (their connections carry
``application_name`` ``outbox-bench-worker-<i>``). Then the backlog is enqueued in
``--transactions`` transactions (20 by default), each on a connection of its own and
left open until all are written; they are then committed one right after the other,
so the backlog becomes visible to every worker within a few milliseconds, and the
clock runs from the first COMMIT to the endpoint having every event. The endpoint
records every event, and the check is that each uuid arrived exactly once and none is
missing.

Why several transactions: the snapshot engine splits a big interval into batches by
transaction id ranges (``split_rows`` rows each, about), so the events of ONE
transaction are always one batch, which one worker at a time holds (``--transactions
1`` shows that case). A backlog left by an outage comes from many transactions.

Workers poll every ``OUTBOX_POLL_INTERVAL`` seconds (0.05 here unless the environment
sets it), so the start carries up to one poll interval of delay.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import psycopg

import outbox
from bench.db import FILL_CHUNK, PostgresCpu, fill_outbox, outbox_count, reset_outbox, scalar
from bench.drain import drain_timeout
from bench.endpoint import Endpoint, UuidStats
from bench.errors import BenchFailed
from bench.events import iter_events
from bench.harness import Context
from bench.procs import WORKER_APP_NAME, Child, ChildGroup, worker_argv, worker_env, worker_settings
from bench.report import Cell, mb

DEFAULT_EVENTS = 100_000
QUICK_EVENTS = 3_000
DEFAULT_WORKERS = (1, 2, 4)
DEFAULT_TRANSACTIONS = 20
POLL_INTERVAL = "0.05"
READY_TIMEOUT = 60.0


@dataclass
class ScaleResult:
    """One worker count."""

    workers: int
    events: int
    seconds: float
    uuids: UuidStats
    #: Milliseconds from the first COMMIT of the backlog returning to the last one.
    commit_spread_ms: float
    max_rss_bytes: int
    cpu_workers: float
    cpu_postgres: float | None

    @property
    def rate(self) -> float:
        """Aggregate events per second."""
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def missing(self) -> int:
        """Events that never arrived."""
        return self.events - self.uuids.unique


def wait_until_connected(url: str, workers: list[Child], timeout: float) -> None:
    """Until every worker has a connection open on the database (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        connected = int(
            scalar(
                url,
                "SELECT count(DISTINCT application_name) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE %s",
                (WORKER_APP_NAME + "-%",),
            )
        )
        if connected >= len(workers):
            return
        for child in workers:
            if not child.running:
                raise BenchFailed(
                    f"{child.name} exited (code {child.returncode}){child.log_hint()}"
                )
        if time.monotonic() > deadline:
            raise BenchFailed(
                f"only {connected} of {len(workers)} workers connected within {timeout:.0f}s"
            )
        time.sleep(0.05)


def fill_at_once(url: str, events: int, transactions: int) -> tuple[float, float, float]:
    """Enqueue ``events`` in ``transactions`` open transactions (one connection each),
    then commit them one after the other. Returns (seconds the enqueueing took, the
    monotonic time the first COMMIT returned, milliseconds from it to the last)."""
    if transactions <= 1:
        _, seconds = fill_outbox(url, iter_events(events), one_transaction=True)
        now = time.monotonic()
        return seconds, now, 0.0
    started = time.monotonic()
    conns = [psycopg.connect(url) for _ in range(transactions)]
    try:
        batch: list[dict[str, object]] = []
        for i, event in enumerate(iter_events(events)):
            batch.append(
                {
                    "event": event["event"],
                    "distinct_id": event["distinct_id"],
                    "properties": event["properties"],
                }
            )
            # Event i goes to transaction i * transactions // events: equal shares.
            if (
                len(batch) >= FILL_CHUNK
                or i + 1 == events
                or ((i + 1) * transactions // events != i * transactions // events)
            ):
                outbox.enqueue_many(conns[i * transactions // events], batch)
                batch = []
        seconds = time.monotonic() - started
        commits = []
        for conn in conns:
            conn.commit()
            commits.append(time.monotonic())
    finally:
        for conn in conns:
            conn.close()
    return seconds, commits[0], (commits[-1] - commits[0]) * 1000


def run_once(
    ctx: Context,
    url: str,
    endpoint: Endpoint,
    group: ChildGroup,
    workers: int,
    events: int,
    transactions: int = DEFAULT_TRANSACTIONS,
) -> ScaleResult:
    """One worker count over one backlog."""
    reset_outbox(url)
    endpoint.reset()
    pg_cpu = PostgresCpu(url)
    children: list[Child] = []
    for i in range(workers):
        env = worker_env(
            url,
            endpoint.url,
            gzip=False,
            app_name=f"{WORKER_APP_NAME}-{i}",
            defaults={"OUTBOX_POLL_INTERVAL": POLL_INTERVAL},
        )
        env["OUTBOX_WORKER_ID"] = f"bench-worker-{i}"
        children.append(group.spawn(f"worker{i}", worker_argv("run"), env=env))
    wait_until_connected(url, children, READY_TIMEOUT)
    ctx.out.progress(
        f"{workers} worker(s) connected; committing {events:,} events at once "
        f"in {transactions} transaction(s)"
    )
    pg0 = pg_cpu.seconds()
    fill_seconds, committed, spread = fill_at_once(url, events, transactions)
    cpu0 = [c.cpu_seconds() or 0.0 for c in children]

    def check() -> None:
        for child in children:
            if not child.running:
                raise BenchFailed(f"{child.name} exited (code {child.returncode})")

    finished = endpoint.wait_for(events, drain_timeout(events), check=check)
    cpu1 = [c.cpu_seconds() or 0.0 for c in children]
    pg1 = pg_cpu.seconds()
    # Let the last acks land, then stop the workers and look for duplicates.
    deadline = time.monotonic() + 30
    while outbox_count(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = outbox_count(url)
    for child in children:  # all at once: each takes a moment to shut down
        child.signal(signal.SIGTERM)
    infos = [c.stop() for c in children]
    uuids = endpoint.uuid_stats()
    if left:
        raise BenchFailed(f"{workers} workers: {left} rows still in the outbox after the drain")
    bad = [i for i in infos if i.returncode != 0]
    if bad:
        raise BenchFailed(f"{workers} workers: a worker exited with code {bad[0].returncode}")
    ctx.out.progress(f"{workers} worker(s): enqueue took {fill_seconds:.1f}s (not timed)")
    return ScaleResult(
        workers,
        events,
        finished - committed,
        uuids,
        spread,
        max(i.max_rss_bytes for i in infos),
        sum(b - a for a, b in zip(cpu0, cpu1, strict=True)),
        pg1 - pg0 if pg0 is not None and pg1 is not None else None,
    )


def run(
    ctx: Context,
    *,
    events: int,
    workers: list[int],
    transactions: int = DEFAULT_TRANSACTIONS,
) -> list[ScaleResult]:
    """The scale-out command."""
    results: list[ScaleResult] = []
    with (
        ctx.server.scratch("scaleout") as url,
        Endpoint(record_events=True) as endpoint,
        ChildGroup(ctx.log_dir) as group,
    ):
        ctx.describe(url)
        settings = worker_settings(
            worker_env(
                url, endpoint.url, gzip=False, defaults={"OUTBOX_POLL_INTERVAL": POLL_INTERVAL}
            )
        )
        for count in workers:
            ctx.out.progress(f"scale-out: {count} worker(s), {events:,} events")
            try:
                results.append(run_once(ctx, url, endpoint, group, count, events, transactions))
            except BenchFailed as exc:
                ctx.fail(f"scaleout with {count} worker(s): {exc}")
            group.stop_all()
    ctx.out.heading(
        f"Scale-out: {events:,} events committed at once in {transactions} transaction(s), gzip off"
    )
    ctx.out.facts(
        {
            "worker settings": f"OUTBOX_BATCH_SIZE={settings.batch_size}, "
            f"OUTBOX_SPLIT_ROWS={settings.split_rows}, "
            f"OUTBOX_POLL_INTERVAL={settings.poll_seconds:g}, OUTBOX_GZIP=0",
            "commits": ", ".join(
                f"{r.workers} worker(s): the last COMMIT {r.commit_spread_ms:.0f} ms after "
                "the first"
                for r in results
            )
            or "-",
        }
    )
    ctx.out.line()
    base = next((r.rate for r in results if r.workers == 1), None)
    rows: list[list[Cell]] = [
        [
            r.workers,
            r.events,
            round(r.seconds, 2),
            round(r.rate),
            f"{r.rate / base:.2f}x" if base else None,
            r.uuids.extra_copies,
            r.missing,
            mb(r.max_rss_bytes),
            r.cpu_workers,
            r.cpu_postgres,
        ]
        for r in results
    ]
    ctx.out.table(
        [
            "workers",
            "events",
            "seconds",
            "events/s",
            "vs 1 worker",
            "duplicates",
            "missing",
            "peak RSS MiB (max)",
            "workers CPU s",
            "postgres CPU s",
        ],
        rows,
    )
    for r in results:
        if r.uuids.extra_copies or r.missing:
            ctx.fail(
                f"scaleout with {r.workers} workers: {r.uuids.extra_copies} duplicate copies "
                f"({r.uuids.duplicated_uuids} uuids), {r.missing} missing"
            )
    duplicates = sum(r.uuids.extra_copies for r in results)
    ctx.out.target(
        "no event shipped twice",
        duplicates == 0 if results else None,
        f"{duplicates} duplicate copies over {len(results)} runs",
    )
    if base:
        slower = [r for r in results if r.workers > 1 and r.rate < base]
        ctx.out.target(
            "aggregate throughput not below one worker's",
            not slower,
            ", ".join(f"{r.workers} workers {r.rate / base:.2f}x" for r in results if r.workers > 1)
            or "only one worker count ran",
        )
    return results
