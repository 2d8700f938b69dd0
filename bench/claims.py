"""``python -m bench claims``: the claim forms, in PostgreSQL alone.

No HTTP, no worker process: each claiming process loops "claim a batch of 1,000
events, mark them delivered" until the outbox is empty, and the harness measures
events/s and the server's CPU time per event. Two forms:

- ``snapshot batches``: the worker's own claim, through
  `worker.storage.snapshot_storage.SnapshotStorage` (the next chunk of the oldest
  snapshot batch, ticking when none waits; finishing it moves the batch's progress
  past it, in one short transaction fenced on the batch's lease). Like the worker,
  each claiming process has two connections and claims the next chunk on one before
  it finishes the chunk it holds on the other.
- ``DELETE..RETURNING``: no lease at all (the drain comparison's floor): up to 1,000
  rows of an event table deleted by TID, from where the last batch ended.

Afterwards the snapshot engine's tables are rotated (TRUNCATE), which is how its
events go; the floor's DELETEs leave dead rows for VACUUM instead.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from bench.db import (
    EVENT_TABLES,
    PostgresCpu,
    fill_outbox,
    outbox_count,
    prepare_for_drain,
    table_sizes,
)
from bench.errors import BenchFailed
from bench.events import iter_events
from bench.harness import Context
from bench.report import Cell

DEFAULT_EVENTS = 100_000
QUICK_EVENTS = 4_000
DEFAULT_CLAIMERS = (1, 2)
BATCH = 1_000
TIMEOUT = 300.0

FLOOR = """
DELETE FROM {table}
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {table} WHERE ctid > %(after)s::tid LIMIT %(limit)s FOR UPDATE SKIP LOCKED
))
RETURNING ctid::text, uuid, event, distinct_id, properties::text, "timestamp", destination
"""

FORMS = ("snapshot batches", "DELETE..RETURNING")


@dataclass
class ClaimResult:
    """One form with one number of claiming processes."""

    form: str
    claimers: int
    rows: int
    seconds: float
    postgres_cpu: float | None
    heap_growth: int

    @property
    def rate(self) -> float:
        """Events claimed and marked delivered per second."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _snapshot_batches(url: str, start: Callable[[], None]) -> None:
    from worker.storage.base import BatchOutcome
    from worker.storage.snapshot_storage import SnapshotStorage

    stores = [SnapshotStorage(url, worker_id=f"bench-{i}") for i in range(2)]
    for store in stores:
        store.ping_or_raise()  # connected before the clock starts
    start()
    held = None
    turn = 0
    while True:
        batch = stores[turn % 2].claim(BATCH, 4 * 1024 * 1024, 60.0)
        turn += 1
        if held is not None:
            held.store.finish(
                held,
                BatchOutcome(shipped=[e.id for e in held.events]),
                dedup_window=3600.0,
                max_attempts=24,
                backoff_base=2.0,
                backoff_max=3600.0,
            )
        if batch is None:
            if held is None:
                break
            held = None  # the other store may find more once the held chunk is done
            continue
        held = batch
    for store in stores:
        store.close()


def _floor(url: str, start: Callable[[], None]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        start()
        for table in EVENT_TABLES:
            statement = FLOOR.format(table=table)
            after = "(0,0)"
            while True:
                rows = conn.execute(statement, {"limit": BATCH, "after": after}).fetchall()
                if rows:
                    after = max(rows, key=lambda r: tuple(map(int, r[0][1:-1].split(","))))[0]
                elif after == "(0,0)":
                    break
                else:
                    after = "(0,0)"  # once more from the start


_LOOPS: dict[str, Callable[[str, Callable[[], None]], None]] = {
    "snapshot batches": _snapshot_batches,
    "DELETE..RETURNING": _floor,
}


def _claimer(form: str, url: str, ready: Any, go: Any) -> None:
    """A claiming process: connect, say so, wait for the start, loop."""

    def start() -> None:
        ready.release()
        if not go.wait(TIMEOUT):
            raise SystemExit(3)

    _LOOPS[form](url, start)


def measure(ctx: Context, form: str, claimers: int, events: int) -> ClaimResult:
    """Fill, then claim and delete everything with ``claimers`` processes."""
    with ctx.server.scratch(f"claims_{form}_{claimers}") as url:
        ctx.describe(url)
        ctx.out.progress(f"{form}, {claimers} claiming process(es): filling {events:,} events")
        fill_outbox(url, iter_events(events))
        prepare_for_drain(url)
        heap_before = table_sizes(url).heap
        cpu = PostgresCpu(url)
        mp = multiprocessing.get_context("spawn")
        ready, go = mp.Semaphore(0), mp.Event()
        procs = [mp.Process(target=_claimer, args=(form, url, ready, go)) for _ in range(claimers)]
        try:
            for proc in procs:
                proc.start()
            for _ in procs:  # every process imported, connected and waiting
                if not ready.acquire(timeout=60):
                    raise BenchFailed(f"{form}: a claiming process did not start")
            cpu0 = cpu.seconds()
            started = time.monotonic()
            go.set()
            for proc in procs:
                proc.join(max(1.0, started + TIMEOUT - time.monotonic()))
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        seconds = time.monotonic() - started
        cpu1 = cpu.seconds()
        if any(p.exitcode != 0 for p in procs):
            codes = ", ".join(str(p.exitcode) for p in procs)
            raise BenchFailed(f"{form}: a claiming process failed (exit codes {codes})")
        left = outbox_count(url)
        if left:
            raise BenchFailed(f"{form}: {left} rows left after the claimers finished")
        heap_after = table_sizes(url).heap
        return ClaimResult(
            form,
            claimers,
            events,
            seconds,
            None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
            heap_after - heap_before,
        )


def run(ctx: Context, *, events: int, claimers: list[int]) -> list[ClaimResult]:
    """The claims command."""
    results = [measure(ctx, form, n, events) for n in claimers for form in FORMS]
    ctx.out.heading(f"Claim forms in PostgreSQL alone: {events:,} events, batches of {BATCH:,}")
    rows: list[list[Cell]] = []
    for r in results:
        rows.append(
            [
                r.form,
                r.claimers,
                r.rows,
                round(r.seconds, 2),
                round(r.rate),
                None if r.postgres_cpu is None else round(r.postgres_cpu / r.rows * 1e6, 1),
                round(r.heap_growth / 1024 / 1024, 1),
            ]
        )
    ctx.out.table(
        [
            "claim form",
            "claiming processes",
            "events",
            "seconds",
            "events/s",
            "postgres CPU us/event",
            "heap growth MiB",
        ],
        rows,
    )
    ctx.out.line(
        "- snapshot batches: each process has two connections, the next chunk claimed before "
        "the held one is finished; the floor: one connection, one DELETE per batch; "
        "postgres CPU: the whole server's (every backend), during the claims; heap growth: "
        "the event tables' and outbox_retry's pg_relation_size after the run minus before "
        "it (no VACUUM or rotation in between)"
    )
    return results
