"""``python -m bench claims``: the claim forms, in PostgreSQL alone.

No HTTP, no worker process: each claiming process loops "claim a batch of 1,000 due
rows, delete them" until the outbox is empty, and the harness measures rows/s and the
server's CPU time per row. Three forms:

- ``row locks``: the worker's own claim, through `worker.store.Store` (a transaction
  per batch: ``FOR UPDATE SKIP LOCKED`` with the byte bound, then DELETE and COMMIT);
- ``written lease``: the claim before migration 0003, kept here for comparison: an
  ``UPDATE`` that writes a lease token, expiry and worker into every claimed row and
  moves ``next_attempt_at`` to the lease's end, then a DELETE fenced by the token (the
  scratch database gets the three lease columns back for it);
- ``DELETE..RETURNING``: no lease at all (the drain comparison's floor).

Like the worker, each claiming process has two connections and claims the next batch
on one before it deletes the batch it holds on the other.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from bench.db import PostgresCpu, execute, fill_outbox, outbox_count, prepare_for_drain, scalar
from bench.errors import BenchFailed
from bench.events import iter_events
from bench.harness import Context
from bench.report import Cell

DEFAULT_EVENTS = 100_000
QUICK_EVENTS = 4_000
DEFAULT_CLAIMERS = (1, 2)
BATCH = 1_000
TIMEOUT = 300.0

# The claim as it was before migration 0003 (see the module docstring).
LEASE_COLUMNS = (
    "ALTER TABLE outbox_events ADD COLUMN lease_token uuid, "
    "ADD COLUMN leased_until timestamptz, ADD COLUMN leased_by text"
)
LEASE_CLAIM = """
WITH locked AS (
    SELECT id, next_attempt_at, pg_column_size(properties) + 200 AS size
    FROM outbox_events
    WHERE status = 'pending' AND next_attempt_at <= now()
      AND (lease_token IS NULL OR leased_until <= now())
    ORDER BY next_attempt_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), sized AS (
    SELECT id, sum(size) OVER (ORDER BY next_attempt_at, id) AS running,
           row_number() OVER (ORDER BY next_attempt_at, id) AS n
    FROM locked
), chosen AS (
    SELECT id FROM sized WHERE running <= %(max_bytes)s OR n = 1
)
UPDATE outbox_events AS e
SET lease_token = %(token)s, leased_until = now() + interval '60 seconds',
    leased_by = 'bench', next_attempt_at = now() + interval '60 seconds'
FROM chosen
WHERE e.id = chosen.id
RETURNING e.id, e.uuid, e.event, e.distinct_id, e.properties::text, e."timestamp",
          e.attempts, e.destination
"""
LEASE_ACK = "DELETE FROM outbox_events WHERE id = ANY(%(ids)s) AND lease_token = %(token)s"
FLOOR = """
DELETE FROM outbox_events WHERE id IN (
    SELECT id FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING id, uuid, event, distinct_id, properties::text, "timestamp", attempts, destination
"""

FORMS = ("row locks", "written lease", "DELETE..RETURNING")


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
        """Rows claimed and deleted per second."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _row_locks(url: str, start: Callable[[], None]) -> None:
    from worker.store import BatchOutcome, Store

    stores = [Store(url), Store(url)]
    for store in stores:
        store.ping_or_raise()  # connected before the clock starts
    start()
    held = None
    turn = 0
    while True:
        batch = stores[turn % 2].claim(BATCH, 4 * 1024 * 1024, 60.0)
        turn += 1
        if held is not None:
            ids = [e.id for e in held.events]
            held.store.finish(
                held,
                BatchOutcome(shipped=ids),
                dedup_window=3600.0,
                max_attempts=24,
                backoff_base=2.0,
                backoff_max=3600.0,
            )
        if batch is None:
            break
        held = batch
    for store in stores:
        store.close()


def _written_lease(url: str, start: Callable[[], None]) -> None:
    conns = [psycopg.connect(url, autocommit=True) for _ in range(2)]
    start()
    held: tuple[uuid.UUID, list[int], psycopg.Connection[Any]] | None = None
    turn = 0
    while True:
        conn = conns[turn % 2]
        turn += 1
        token = uuid.uuid4()
        rows = conn.execute(
            LEASE_CLAIM, {"limit": BATCH, "max_bytes": 4 * 1024 * 1024, "token": token}
        ).fetchall()
        if held is not None:
            held[2].execute(LEASE_ACK, {"ids": held[1], "token": held[0]})
        if not rows:
            break
        held = (token, [r[0] for r in rows], conn)
    for conn in conns:
        conn.close()


def _floor(url: str, start: Callable[[], None]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        start()
        while conn.execute(FLOOR, {"limit": BATCH}).fetchall():
            pass


_LOOPS: dict[str, Callable[[str, Callable[[], None]], None]] = {
    "row locks": _row_locks,
    "written lease": _written_lease,
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
        if form == "written lease":
            execute(url, LEASE_COLUMNS)
        ctx.out.progress(f"{form}, {claimers} claiming process(es): filling {events:,} events")
        fill_outbox(url, iter_events(events))
        prepare_for_drain(url)
        heap_before = int(scalar(url, "SELECT pg_relation_size('outbox_events')"))
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
        heap_after = int(scalar(url, "SELECT pg_relation_size('outbox_events')"))
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
    ctx.out.heading(f"Claim forms in PostgreSQL alone: {events:,} rows, batches of {BATCH:,}")
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
            "rows",
            "seconds",
            "rows/s",
            "postgres CPU us/row",
            "heap growth MiB",
        ],
        rows,
    )
    ctx.out.line(
        "- each process: two connections, the next batch claimed before the held one is "
        "deleted (the floor: one connection, one statement per batch); heap growth: "
        "pg_relation_size after the run minus before it (no VACUUM in between)"
    )
    return results
