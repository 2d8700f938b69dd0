"""``python -m bench storage``: what an event costs the primary, per storage engine.

The same events (`bench.events`) on the same server in one run, each engine in turn in
one scratch database, with a CHECKPOINT before each phase (so the first touch of
every page writes a full-page image, as it would after any checkpoint):

1. the floor: a bare INSERT into a minimal table (``event text, distinct_id text,
   properties jsonb``, no index); nothing drains it;
2. PgQ (the ``pgq`` extension, Debian ``postgresql-15-pgq3``), when the server has
   it: ``pgq.insert_event``; ``pgq.ticker`` on its own connection every 1,000
   events (as pgqd would tick); a consumer loops ``pgq.next_batch`` +
   ``pgq.get_batch_events`` (one transaction) then ``pgq.finish_batch`` (another);
   cleanup is the rotation (``pgq.maint_rotate_tables_step1``/``step2``, with
   ``rotation_period`` 0) until the table that held the events has been TRUNCATEd;
   PgQ's batches are read, not POSTed (the PostgreSQL side does not depend on it);
3. posthog-outbox, whose storage is the snapshot engine (migrations 0006 to 0010):
   `outbox.enqueue_many` in transactions (it INSERTs into ``outbox_snapshot_slot()``'s
   event table); ``outbox_snapshot_tick`` on its own connection every 1,000 events (as
   PgQ's ticker), which splits an interval of more than 5,000 rows into several
   batches (the worker's default); the drain (`worker.storage.snapshot.SnapshotEngine`,
   what the worker runs) claims batches and reads them in chunks of 1,000 (the worker's
   default batch size), advancing each batch past each chunk (one fenced statement)
   and, in the same transaction, adding the chunk to the delivery ledger
   (``outbox_ledger``: one upsert per chunk, as the worker's finish writes it;
   ``--no-ledger`` leaves it out, the drain as it was before migration 0009); nothing
   is POSTed, as for PgQ; cleanup is ``outbox_snapshot_rotate`` (TRUNCATE).

Every engine enqueues in transactions of 100 events. The measured connections run
with ``synchronous_commit=off`` (see `MEASURED`). Autovacuum is switched off for the
bare INSERT's and PgQ's tables, so that it does not run in the middle of a phase (the
snapshot engine's tables have it off already). WAL: see `bench.walmeter`. PostgreSQL
CPU is the backends' own (`bench.walmeter.backend_cpu`): the enqueuing connection; on
the drain side, the consumer's and the ticker's connections (its ticks during the
enqueue included), for PgQ and the snapshot engine alike.

Then what the application's transaction pays, variants interleaved in rounds: a bare
INSERT of an event's row into a minimal table, ``enqueue()`` of one event,
``enqueue_many()`` of ten (and ``pgq.insert_event`` of one, where PgQ is installed);
each a whole transaction with its COMMIT; medians per variant. They run on one
connection with psycopg's defaults (each statement prepared from its sixth run, the
outbox's as the application's own); the bare INSERT and ``enqueue()`` also on a
connection with ``prepare_threshold=None`` (nothing prepared, as behind a transaction
pooler that cannot carry prepared statements).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

import outbox
from bench.db import execute, scalar, table_sizes
from bench.errors import BenchFailed
from bench.events import BenchEvent, event_pool, iter_events
from bench.harness import Context
from bench.report import Cell, mb
from bench.walmeter import Wal, WalMeter, connection_cpu

DEFAULT_EVENTS = 100_000
QUICK_EVENTS = 2_000
PER_TRANSACTION = 100
TICK_EVERY = 1_000
DEFAULT_APP_TRANSACTIONS = 2_000
QUICK_APP_TRANSACTIONS = 100
APP_ROUNDS = 10
#: synchronous_commit for the application's transactions: the server's default (the
#: COMMIT waits for its WAL to reach the disk), then off (the same work without the
#: disk's latency, which other load on the machine makes noisy).
COMMIT_MODES = ("on", "off")
DRAIN_TIMEOUT = 600.0
#: The measured connections commit without waiting for the disk: a COMMIT that must
#: flush writes out every session's pending WAL, and on a shared server the CPU time
#: of writing other databases' WAL would be charged to the measured backend. (WAL
#: bytes are the same either way.)
MEASURED = "-c synchronous_commit=off"

TARGET_WAL = 1.15
TARGET_ONE = 1.1
TARGET_TEN = 1.2

FLOOR = "bare INSERT"
PGQ = "PgQ"
OUTBOX = "posthog-outbox"
#: Events per chunk the snapshot engine's drain reads (and would send in one request):
#: the worker's default batch size (OUTBOX_BATCH_SIZE).
SNAPSHOT_CHUNK = 1_000
#: Rows above which the ticker splits an interval into several batches: the worker's
#: default (SnapshotStorage's split_rows).
SNAPSHOT_SPLIT = 5_000

PGQ_PACKAGE = "postgresql-15-pgq3"
PGQ_QUEUE = "bench"
PGQ_CONSUMER = "bench_consumer"

FLOOR_TABLE = (
    "CREATE TABLE bench_floor (event text NOT NULL, distinct_id text NOT NULL, "
    "properties jsonb NOT NULL) WITH (autovacuum_enabled = off)"
)
FLOOR_INSERT = (
    "INSERT INTO bench_floor (event, distinct_id, properties) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::jsonb[])"
)
PGQ_INSERT = (
    "SELECT pgq.insert_event(%s, e, p, d, NULL, NULL, NULL) "
    "FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(e, d, p)"
)


@dataclass
class Phase:
    """One phase of one engine."""

    wal: Wal
    cpu: float | None
    seconds: float


@dataclass
class Engine:
    """One engine's run: its phases, or why it did not run."""

    name: str
    events: int = 0
    enqueue: Phase | None = None
    drain: Phase | None = None
    cleanup: Phase | None = None
    heap_after: int | None = None
    indexes_after: int | None = None
    absent: str = ""
    notes: list[str] = field(default_factory=list)

    def phases(self) -> list[Phase]:
        """The phases that ran."""
        return [p for p in (self.enqueue, self.drain, self.cleanup) if p is not None]

    def wal_per_event(self, phase: Phase | None = None) -> float | None:
        """Bytes per event of one phase, or of all of them."""
        phases = [phase] if phase is not None else self.phases()
        if not self.events or not phases:
            return None
        return sum(p.wal.best for p in phases) / self.events

    def wal_without_fpi(self) -> float | None:
        """All phases' bytes per event less the full-page images, where known."""
        values = [p.wal.without_fpi for p in self.phases()]
        if not self.events or not values or any(v is None for v in values):
            return None
        return sum(v or 0 for v in values) / self.events

    def cpu_us(self, phase: Phase | None) -> float | None:
        """Microseconds of PostgreSQL CPU per event in ``phase``."""
        if phase is None or phase.cpu is None or not self.events:
            return None
        return phase.cpu / self.events * 1e6


def _columns(events: list[BenchEvent]) -> tuple[list[str], list[str], list[str]]:
    return (
        [e["event"] for e in events],
        [e["distinct_id"] for e in events],
        [json.dumps(e["properties"], separators=(",", ":")) for e in events],
    )


def _chunks(n: int) -> Iterator[list[BenchEvent]]:
    chunk: list[BenchEvent] = []
    for event in iter_events(n):
        chunk.append(event)
        if len(chunk) == PER_TRANSACTION:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _timed_phase(meter: WalMeter, work: Callable[[], float | None]) -> Phase:
    """CHECKPOINT, then ``work`` (which returns the CPU seconds it measured)."""
    meter.checkpoint()
    start = meter.lsn()
    started = time.monotonic()
    cpu = work()
    seconds = time.monotonic() - started
    return Phase(meter.measure(start, meter.lsn()), cpu, seconds)


def _cpu_delta(before: float | None, after: float | None) -> float | None:
    return after - before if before is not None and after is not None else None


# -- 1. the floor -------------------------------------------------------------------------


def run_floor(url: str, meter: WalMeter, events: int) -> Engine:
    """A bare INSERT into a minimal table, in transactions of 100."""
    execute(url, FLOOR_TABLE)
    engine = Engine(FLOOR, events)
    with psycopg.connect(url, options=MEASURED) as conn:

        def enqueue() -> float | None:
            cpu0 = connection_cpu(conn)
            for chunk in _chunks(events):
                conn.execute(FLOOR_INSERT, _columns(chunk))
                conn.commit()
            return _cpu_delta(cpu0, connection_cpu(conn))

        engine.enqueue = _timed_phase(meter, enqueue)
    engine.notes.append("nothing drains it: the floor is the INSERT alone")
    return engine


# -- 2. PgQ -------------------------------------------------------------------------------


def pgq_absent_reason(url: str) -> str:
    """Why PgQ cannot run on this server, or "" when it can."""
    available = scalar(url, "SELECT count(*) FROM pg_available_extensions WHERE name = 'pgq'")
    if not available:
        return (
            "the server has no pgq extension (Debian: apt-get install "
            f"{PGQ_PACKAGE}; the embedded PostgreSQL cannot load it)"
        )
    return ""


def _pgq_event_tables(conn: psycopg.Connection[Any]) -> list[str]:
    row = conn.execute(
        "SELECT queue_data_pfx, queue_ntables FROM pgq.queue WHERE queue_name = %s",
        (PGQ_QUEUE,),
    ).fetchone()
    assert row is not None
    return [f"{row[0]}_{i}" for i in range(int(row[1]))]


def run_pgq(url: str, meter: WalMeter, events: int) -> Engine:
    """PgQ: insert_event, ticks every 1,000 events, batches, rotation."""
    engine = Engine(PGQ, events)
    why = pgq_absent_reason(url)
    if why:
        engine.absent = why
        return engine
    with psycopg.connect(url, autocommit=True) as admin:
        try:
            admin.execute("CREATE EXTENSION IF NOT EXISTS pgq")
        except psycopg.Error as exc:
            engine.absent = f"CREATE EXTENSION pgq failed: {str(exc).strip().splitlines()[0]}"
            return engine
        admin.execute("SELECT pgq.create_queue(%s)", (PGQ_QUEUE,))
        admin.execute(
            "SELECT pgq.set_queue_config(%s, 'ticker_max_count', %s)", (PGQ_QUEUE, str(TICK_EVERY))
        )
        admin.execute("SELECT pgq.set_queue_config(%s, 'ticker_max_lag', '1 day')", (PGQ_QUEUE,))
        admin.execute(
            "SELECT pgq.set_queue_config(%s, 'ticker_idle_period', '1 day')", (PGQ_QUEUE,)
        )
        admin.execute("SELECT pgq.register_consumer(%s, %s)", (PGQ_QUEUE, PGQ_CONSUMER))
        tables = _pgq_event_tables(admin)
        for table in tables:
            admin.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
        version = scalar(url, "SELECT pgq.version()")
    engine.notes.append(f"pgq {version}; {len(tables)} rotated event tables")
    ticker = psycopg.connect(url, autocommit=True, options=MEASURED)
    consumer = psycopg.connect(url, options=MEASURED)
    ticker_cpu0 = connection_cpu(ticker)
    try:
        with psycopg.connect(url, options=MEASURED) as conn:

            def enqueue() -> float | None:
                cpu0 = connection_cpu(conn)
                since_tick = 0
                for chunk in _chunks(events):
                    conn.execute(PGQ_INSERT, (PGQ_QUEUE, *_columns(chunk)))
                    conn.commit()
                    since_tick += len(chunk)
                    if since_tick >= TICK_EVERY:
                        ticker.execute("SELECT pgq.ticker(%s)", (PGQ_QUEUE,))
                        since_tick = 0
                _force_tick(ticker)
                return _cpu_delta(cpu0, connection_cpu(conn))

            engine.enqueue = _timed_phase(meter, enqueue)
        # The ticker's work during the enqueue belongs to the queue's drain side.
        enqueue_ticks = _cpu_delta(ticker_cpu0, connection_cpu(ticker))
        batches = 0

        def drain() -> float | None:
            nonlocal batches
            cpu0 = connection_cpu(consumer)
            received = 0
            while True:
                got = _pgq_batch(consumer)
                if got is None:
                    break
                batches += 1
                received += got
            if received != events:
                raise BenchFailed(f"PgQ: the consumer read {received} events, expected {events}")
            cpu = _cpu_delta(cpu0, connection_cpu(consumer))
            return None if cpu is None or enqueue_ticks is None else cpu + enqueue_ticks

        engine.drain = _timed_phase(meter, drain)
        engine.notes.append(
            f"{batches} batches; drain CPU includes the ticker connection's during the enqueue"
        )
        rotations = 0

        def cleanup() -> float | None:
            nonlocal rotations
            cpu0 = [connection_cpu(ticker), connection_cpu(consumer)]
            rotations = _pgq_rotate_out(ticker, consumer, meter.conn, tables)
            cpu1 = [connection_cpu(ticker), connection_cpu(consumer)]
            deltas = [_cpu_delta(a, b) for a, b in zip(cpu0, cpu1, strict=True)]
            return None if None in deltas else sum(d or 0 for d in deltas)

        try:
            engine.cleanup = _timed_phase(meter, cleanup)
            engine.notes.append(f"{rotations} rotations until the events' table was truncated")
        except BenchFailed as exc:
            # The enqueue and drain figures stand; the cleanup row says why it has none.
            engine.notes.append(f"cleanup not measured: {exc}")
        heap, indexes = 0, 0
        for table in tables:
            row = ticker.execute(
                "SELECT pg_relation_size(%s), pg_indexes_size(%s)", (table, table)
            ).fetchone()
            assert row is not None
            heap, indexes = heap + int(row[0]), indexes + int(row[1])
        engine.heap_after, engine.indexes_after = heap, indexes
    finally:
        ticker.close()
        consumer.close()
    return engine


def _force_tick(ticker: psycopg.Connection[Any]) -> None:
    """A tick now, whatever the ticker's thresholds say."""
    last = ticker.execute("SELECT pgq.force_tick(%s)", (PGQ_QUEUE,)).fetchone()
    row = ticker.execute("SELECT pgq.ticker(%s)", (PGQ_QUEUE,)).fetchone()
    if row is None or row[0] is None or (last is not None and row[0] == last[0]):
        raise BenchFailed("PgQ: the ticker did not tick when forced")


def _pgq_batch(consumer: psycopg.Connection[Any]) -> int | None:
    """Read one batch (one transaction) and finish it (another); its size, or None."""
    row = consumer.execute("SELECT pgq.next_batch(%s, %s)", (PGQ_QUEUE, PGQ_CONSUMER)).fetchone()
    if row is None or row[0] is None:
        consumer.commit()
        return None
    batch = int(row[0])
    rows = consumer.execute(
        "SELECT ev_id, ev_time, ev_type, ev_data, ev_extra1 FROM pgq.get_batch_events(%s)",
        (batch,),
    ).fetchall()
    consumer.commit()
    consumer.execute("SELECT pgq.finish_batch(%s)", (batch,))
    consumer.commit()
    return len(rows)


def _pgq_rotate_out(
    ticker: psycopg.Connection[Any],
    consumer: psycopg.Connection[Any],
    watch: psycopg.Connection[Any],
    tables: list[str],
) -> int:
    """Rotate until every table that holds events has been truncated; rotations done."""
    ticker.execute("SELECT pgq.set_queue_config(%s, 'rotation_period', '0')", (PGQ_QUEUE,))
    start = ticker.execute(
        "SELECT queue_cur_table FROM pgq.queue WHERE queue_name = %s", (PGQ_QUEUE,)
    ).fetchone()
    assert start is not None
    rotations = 0
    deadline = time.monotonic() + 120
    # The table in use when the events were inserted is truncated on the rotation that
    # comes back to it: one per table.
    while rotations < len(tables):
        if time.monotonic() > deadline:
            raise BenchFailed(
                f"PgQ: {rotations} of {len(tables)} rotations in 120 s (an old transaction "
                "elsewhere on the server holds the snapshot xmin back)"
            )
        before = ticker.execute(
            "SELECT queue_cur_table FROM pgq.queue WHERE queue_name = %s", (PGQ_QUEUE,)
        ).fetchone()
        ticker.execute("SELECT pgq.maint_rotate_tables_step1(%s)", (PGQ_QUEUE,))
        ticker.execute("SELECT pgq.maint_rotate_tables_step2()")
        after = ticker.execute(
            "SELECT queue_cur_table FROM pgq.queue WHERE queue_name = %s", (PGQ_QUEUE,)
        ).fetchone()
        if after != before:
            rotations += 1
        # The consumer must move past the switch before the next rotation may happen:
        # a tick whose snapshot no longer sees the switch's transaction as running.
        _await_xmin_past_switch(watch)
        _force_tick(ticker)
        while _pgq_batch(consumer) is not None:
            pass
    return rotations


def _await_xmin_past_switch(watch: psycopg.Connection[Any]) -> None:
    deadline = time.monotonic() + 60
    while True:
        row = watch.execute(
            "SELECT txid_snapshot_xmin(txid_current_snapshot()) > queue_switch_step2 "
            "FROM pgq.queue WHERE queue_name = %s",
            (PGQ_QUEUE,),
        ).fetchone()
        if row is not None and row[0]:
            return
        if time.monotonic() > deadline:
            raise BenchFailed(
                "PgQ: rotation waited 60 s for an old transaction elsewhere on the server"
            )
        time.sleep(0.02)


# -- what the application's transaction pays ----------------------------------------------


@dataclass
class AppResult:
    """Per-transaction seconds by variant, and per-round medians."""

    commit_mode: str
    seconds: dict[str, list[float]]
    rounds: dict[str, list[float]]

    def median(self, name: str) -> float | None:
        """Median seconds of one variant's transactions."""
        values = self.seconds.get(name)
        return statistics.median(values) if values else None

    def ratio(self, name: str, base: str) -> float | None:
        """Median over median."""
        a, b = self.median(name), self.median(base)
        return a / b if a is not None and b else None

    def round_range(self, name: str, base: str) -> tuple[float, float] | None:
        """The lowest and highest per-round ratio."""
        pairs = [x / y for x, y in zip(self.rounds[name], self.rounds[base], strict=True) if y]
        return (min(pairs), max(pairs)) if pairs else None


APP_BARE = "bare INSERT, 1 row"
APP_ONE = "enqueue(), 1 event"
APP_TEN = "enqueue_many(), 10 events"
APP_PGQ = "pgq.insert_event, 1 event"
APP_BARE_PLAIN = "bare INSERT, 1 row, prepare_threshold=None"
APP_ONE_PLAIN = "enqueue(), 1 event, prepare_threshold=None"
#: Each variant's baseline for its ratio.
APP_BASE = {
    APP_ONE: APP_BARE,
    APP_TEN: APP_ONE,
    APP_PGQ: APP_BARE,
    APP_ONE_PLAIN: APP_BARE_PLAIN,
}


def run_app(url: str, transactions: int, with_pgq: bool) -> list[AppResult]:
    """The interleaved whole-transaction timings, for each synchronous_commit."""
    execute(
        url,
        "CREATE TABLE bench_app (event text NOT NULL, distinct_id text NOT NULL, "
        "properties jsonb NOT NULL)",
    )
    pool = event_pool()
    position = [0]

    def take(n: int) -> list[BenchEvent]:
        out = [pool[(position[0] + i) % len(pool)] for i in range(n)]
        position[0] += n
        return out

    with (
        psycopg.connect(url) as conn,
        psycopg.connect(url, prepare_threshold=None) as plain,
    ):

        def bare_on(c: psycopg.Connection[Any]) -> Callable[[], None]:
            def bare() -> None:
                e = take(1)[0]
                c.execute(
                    "INSERT INTO bench_app (event, distinct_id, properties) "
                    "VALUES (%s, %s, %s::jsonb)",
                    (
                        e["event"],
                        e["distinct_id"],
                        json.dumps(e["properties"], separators=(",", ":")),
                    ),
                )
                c.commit()

            return bare

        def one_on(c: psycopg.Connection[Any]) -> Callable[[], None]:
            def one() -> None:
                e = take(1)[0]
                outbox.enqueue(c, e["event"], e["distinct_id"], e["properties"])
                c.commit()

            return one

        def ten() -> None:
            outbox.enqueue_many(
                conn,
                [
                    {
                        "event": e["event"],
                        "distinct_id": e["distinct_id"],
                        "properties": e["properties"],
                    }
                    for e in take(10)
                ],
            )
            conn.commit()

        def pgq_one() -> None:
            e = take(1)[0]
            conn.execute(
                "SELECT pgq.insert_event(%s, %s, %s, %s, NULL, NULL, NULL)",
                (
                    PGQ_QUEUE,
                    e["event"],
                    json.dumps(e["properties"], separators=(",", ":")),
                    e["distinct_id"],
                ),
            )
            conn.commit()

        variants: dict[str, Callable[[], None]] = {
            APP_BARE: bare_on(conn),
            APP_ONE: one_on(conn),
            APP_TEN: ten,
        }
        if with_pgq:
            variants[APP_PGQ] = pgq_one
        variants[APP_BARE_PLAIN] = bare_on(plain)
        variants[APP_ONE_PLAIN] = one_on(plain)
        results = []
        for commit_mode in COMMIT_MODES:
            for c in (conn, plain):
                c.execute("SELECT set_config('synchronous_commit', %s, false)", (commit_mode,))
                c.commit()
            results.append(_interleaved(commit_mode, variants, transactions))
    return results


def _interleaved(
    commit_mode: str, variants: dict[str, Callable[[], None]], transactions: int
) -> AppResult:
    """Every variant once per cycle (the order rotating), ``transactions`` cycles."""
    for fn in variants.values():  # warm up: plans, caches
        for _ in range(20):
            fn()
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for cycle in range(transactions):
        shift = cycle % len(names)
        for name in names[shift:] + names[:shift]:
            fn = variants[name]
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    per_round = max(1, transactions // APP_ROUNDS)
    rounds = {
        name: [
            statistics.median(values[i : i + per_round])
            for i in range(0, per_round * APP_ROUNDS, per_round)
            if values[i : i + per_round]
        ]
        for name, values in seconds.items()
    }
    return AppResult(commit_mode, seconds, rounds)


# -- the command --------------------------------------------------------------------------


def run(ctx: Context, *, events: int, app_transactions: int, ledger: bool = True) -> list[Engine]:
    """The storage command (``ledger``: the snapshot engine's drain writes the delivery
    ledger, as the worker's)."""
    with ctx.server.scratch("storage") as url:
        ctx.describe(url)
        meter = WalMeter(url)
        try:
            engines: list[Engine] = []
            ctx.out.progress(f"storage: bare INSERT of {events:,} events")
            engines.append(run_floor(url, meter, events))
            ctx.out.progress(f"storage: PgQ with {events:,} events")
            try:
                engines.append(run_pgq(url, meter, events))
            except (BenchFailed, psycopg.Error) as exc:
                ctx.fail(f"storage: PgQ: {exc}")
                engines.append(Engine(PGQ, absent=f"failed: {exc}"))
            ctx.out.progress(f"storage: posthog-outbox with {events:,} events")
            try:
                engines.append(run_snapshot(url, meter, events, ledger=ledger))
            except (BenchFailed, psycopg.Error, outbox.OutboxError) as exc:
                ctx.fail(f"storage: posthog-outbox: {exc}")
                engines.append(Engine(OUTBOX, absent=f"failed: {exc}"))
            ctx.out.progress(f"storage: application transactions ({app_transactions:,} each)")
            app = run_app(url, app_transactions, with_pgq=not engines[1].absent)
            print_results(ctx, meter, events, engines, app)
        finally:
            meter.close()
    return engines


# -- 3. posthog-outbox: the snapshot engine -----------------------------------------------


def run_snapshot(url: str, meter: WalMeter, events: int, *, ledger: bool = True) -> Engine:
    """posthog-outbox's snapshot engine: enqueue_many, ticks, chunked batches (each
    chunk's advance and, with ``ledger``, its ledger upsert in one transaction),
    TRUNCATE."""
    from worker.storage.snapshot import SnapshotEngine
    from worker.storage.snapshot_storage import count_in_ledger

    engine = Engine(OUTBOX, events)
    ticker = psycopg.connect(url, autocommit=True, options=MEASURED)
    drainer = psycopg.connect(url, autocommit=True, options=MEASURED)
    try:
        ticks = SnapshotEngine(ticker, worker_id="bench-ticker")
        ticker_cpu0 = connection_cpu(ticker)
        with psycopg.connect(url, options=MEASURED) as conn:

            def enqueue() -> float | None:
                cpu0 = connection_cpu(conn)
                since_tick = 0
                for chunk in _chunks(events):
                    outbox.enqueue_many(conn, [dict(e) for e in chunk])
                    conn.commit()
                    since_tick += len(chunk)
                    if since_tick >= TICK_EVERY:
                        ticks.tick(SNAPSHOT_SPLIT)
                        since_tick = 0
                ticks.tick(SNAPSHOT_SPLIT)
                return _cpu_delta(cpu0, connection_cpu(conn))

            engine.enqueue = _timed_phase(meter, enqueue)
        enqueue_ticks = _cpu_delta(ticker_cpu0, connection_cpu(ticker))
        worker = SnapshotEngine(drainer, worker_id="bench")
        batches = 0

        def drain() -> float | None:
            nonlocal batches
            cpu0 = connection_cpu(drainer)
            received = 0
            while (batch := worker.claim(60, split_rows=SNAPSHOT_SPLIT)) is not None:
                batches += 1
                while True:
                    part = worker.read(batch, SNAPSHOT_CHUNK)
                    upto = part.events[-1] if part.events else None
                    if ledger:
                        with drainer.transaction():
                            held = worker.advance(
                                batch, upto, last=part.last, delivered=part.events
                            )
                            if held:
                                count_in_ledger(drainer, part.events, ())
                    else:
                        held = worker.advance(batch, upto, last=part.last, delivered=part.events)
                    if not held:
                        raise BenchFailed("snapshot engine: a batch's lease was lost")
                    received += len(part.events)
                    if part.last:
                        break
            if received != events:
                raise BenchFailed(f"snapshot engine: read {received} events, expected {events}")
            cpu = _cpu_delta(cpu0, connection_cpu(drainer))
            return None if cpu is None or enqueue_ticks is None else cpu + enqueue_ticks

        engine.drain = _timed_phase(meter, drain)
        engine.notes.append(
            f"{batches} batches; drain CPU includes the ticker connection's during the enqueue"
            + (
                "; each chunk's advance and ledger upsert in one transaction"
                if ledger
                else "; no ledger (--no-ledger)"
            )
        )

        def cleanup() -> float | None:
            cpu0 = connection_cpu(drainer)
            if worker.rotate(current=True) < 1:
                raise BenchFailed("snapshot engine: no event table was truncated")
            return _cpu_delta(cpu0, connection_cpu(drainer))

        engine.cleanup = _timed_phase(meter, cleanup)
        sizes = table_sizes(url)
        engine.heap_after, engine.indexes_after = sizes.heap, sizes.indexes
    finally:
        ticker.close()
        drainer.close()
    return engine


def _per_event(value: float | None) -> Cell:
    return None if value is None else round(value)


def _us(value: float | None) -> Cell:
    return None if value is None else round(value, 1)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "missed", None: "not measured"}[met]


def print_results(
    ctx: Context, meter: WalMeter, events: int, engines: list[Engine], app: list[AppResult]
) -> None:
    """The side-by-side table, the application table and the targets."""
    floor, pgq, ours = engines
    method = (
        "this database's WAL records (pg_walinspect), each rounded up to 8 bytes"
        if meter.inspect
        else f"pg_current_wal_lsn() differences, the whole server ({meter.why_not_inspect})"
    )
    ctx.out.heading(f"Storage: WAL, PostgreSQL CPU and size per event, {events:,} events")
    ctx.out.facts(
        {
            "events": f"{events:,}, enqueued in transactions of {PER_TRANSACTION}, "
            "CHECKPOINT before each phase",
            "WAL bytes": method
            + "; full-page images "
            + (
                "included (full_page_writes=on)"
                if meter.full_page_writes
                else "off (full_page_writes=off)"
            ),
            "PostgreSQL CPU": "time on a CPU of the backends involved, from /proc/<pid>/schedstat "
            "(nanoseconds; else user+system from /proc/<pid>/stat, 10 ms ticks); the measured "
            "connections use synchronous_commit=off, so that no "
            "COMMIT of theirs writes out other sessions' WAL; noisy on a loaded machine, WAL "
            "bytes are not",
            "PgQ": pgq.absent or "; ".join(pgq.notes),
        }
    )
    ctx.out.line()
    floor_wal = floor.wal_per_event()
    ours_wal = ours.wal_per_event() if not ours.absent else None
    wal_ratio = ours_wal / floor_wal if ours_wal is not None and floor_wal else None
    pgq_drain = pgq.cpu_us(pgq.drain) if not pgq.absent else None
    ours_drain = ours.cpu_us(ours.drain) if not ours.absent else None

    def col(engine: Engine, get: Callable[[Engine], Cell]) -> Cell:
        if engine.absent:
            return "absent"
        return get(engine)

    def row(label: str, get: Callable[[Engine], Cell], target: str = "") -> list[Cell]:
        return [label, col(floor, get), col(pgq, get), col(ours, get), target]

    def wal_of(phase: str) -> Callable[[Engine], Cell]:
        return lambda e: _per_event(
            e.wal_per_event(getattr(e, phase)) if getattr(e, phase) else None
        )

    def ratio_to_floor(e: Engine) -> Cell:
        value = e.wal_per_event()
        return f"{value / floor_wal:.2f}x" if value is not None and floor_wal else None

    wal_met = None if wal_ratio is None else wal_ratio <= TARGET_WAL
    wal_target = f"<= {TARGET_WAL}x the bare INSERT: {_verdict(wal_met)}"
    cpu_met = None if pgq_drain is None or ours_drain is None else ours_drain <= pgq_drain
    rows = [
        row("WAL bytes per event, end to end", lambda e: _per_event(e.wal_per_event()), wal_target),
        row("  enqueue", wal_of("enqueue")),
        row("  drain", wal_of("drain")),
        row("  cleanup (rotation)", wal_of("cleanup")),
        row("  vs the bare INSERT", ratio_to_floor),
        row(
            "WAL bytes per event without full-page images",
            lambda e: _per_event(e.wal_without_fpi()),
        ),
        row("PostgreSQL CPU us per event, enqueue", lambda e: _us(e.cpu_us(e.enqueue))),
        row(
            "PostgreSQL CPU us per event, drain side",
            lambda e: _us(e.cpu_us(e.drain)),
            f"<= PgQ's: {_verdict(cpu_met)}",
        ),
        row("PostgreSQL CPU us per event, cleanup", lambda e: _us(e.cpu_us(e.cleanup))),
        row(
            "heap MiB after the drain and cleanup",
            lambda e: None if e.heap_after is None else round(mb(e.heap_after) or 0, 2),
        ),
        row(
            "index MiB after the drain and cleanup",
            lambda e: None if e.indexes_after is None else round(mb(e.indexes_after) or 0, 2),
            "near empty, no REINDEX",
        ),
        row(
            "wall seconds: enqueue / drain / cleanup",
            lambda e: " / ".join(f"{p.seconds:.1f}" for p in e.phases()),
        ),
    ]
    ctx.out.table(["per event", FLOOR, PGQ, OUTBOX, "target (posthog-outbox)"], rows)
    for engine in engines:
        if engine.absent:
            ctx.out.line(f"- {engine.name}: absent: {engine.absent}")
        for note in engine.notes:
            ctx.out.line(f"- {engine.name}: {note}")
        for name, phase in (
            ("enqueue", engine.enqueue),
            ("drain", engine.drain),
            ("cleanup", engine.cleanup),
        ):
            if phase is None:
                continue
            w = phase.wal
            detail = f"whole server {w.server_bytes:,} B"
            if w.bytes is not None:
                detail = (
                    f"this database {w.bytes:,} B in {w.records:,} records, of which "
                    f"full-page images {w.fpi_bytes:,} B; " + detail
                )
            ctx.out.line(f"- {engine.name}, {name}: {detail}")
    ctx.out.line()

    ctx.out.heading("Storage: what the application's transaction pays")
    ctx.out.facts(
        {
            "method": "a psycopg connection with its defaults (statements prepared from their "
            "sixth run), and one with prepare_threshold=None for the variants that say so; "
            "whole transactions (statement + COMMIT), "
            "every variant once per cycle in a rotating order, median per variant; the "
            "per-round range is the ratio of medians in each tenth of the cycles; the bare "
            "INSERT writes the event's row (event, distinct_id, properties as jsonb) into "
            "a table with no index; first with synchronous_commit=on (each COMMIT waits "
            "for the disk), then off (the same work without the disk's latency)"
        }
    )
    ctx.out.line()
    app_rows: list[list[Cell]] = []
    for result in app:
        for name in result.seconds:
            median = result.median(name)
            base = APP_BASE.get(name, "")
            ratio_value = result.ratio(name, base) if base else None
            span = result.round_range(name, base) if base else None
            app_rows.append(
                [
                    result.commit_mode,
                    name,
                    len(result.seconds[name]),
                    None if median is None else round(median * 1e6),
                    None if ratio_value is None else f"{ratio_value:.2f}x vs {base}",
                    None if span is None else f"{span[0]:.2f}-{span[1]:.2f}x",
                ]
            )
    ctx.out.table(
        [
            "synchronous_commit",
            "variant",
            "transactions",
            "median us",
            "ratio (medians)",
            "per-round range",
        ],
        app_rows,
    )

    # The targets.
    if wal_ratio is None:
        ctx.out.target(f"WAL <= {TARGET_WAL}x the bare INSERT", None, "not measured")
    else:
        ctx.out.target(
            f"WAL per event <= {TARGET_WAL}x the bare INSERT",
            wal_ratio <= TARGET_WAL,
            f"{ours_wal:,.0f} vs {floor_wal:,.0f} B = {wal_ratio:.2f}x"
            + (
                ""
                if wal_ratio <= TARGET_WAL
                else f"; {wal_ratio / TARGET_WAL:.2f}x over the target"
            ),
        )
    if cpu_met is None:
        ctx.out.target(
            "drain-side PostgreSQL CPU <= PgQ's",
            None,
            f"PgQ absent: {pgq.absent}" if pgq.absent else "CPU not readable (remote server?)",
        )
    else:
        ctx.out.target(
            "drain-side PostgreSQL CPU <= PgQ's",
            cpu_met,
            f"{ours_drain:.1f} vs {pgq_drain:.1f} us per event"
            + ("" if cpu_met else f" = {(ours_drain or 0) / (pgq_drain or 1):.2f}x PgQ's"),
        )
    for name, base, target in (
        (APP_ONE, APP_BARE, TARGET_ONE),
        (APP_TEN, APP_ONE, TARGET_TEN),
        (APP_ONE_PLAIN, APP_BARE_PLAIN, TARGET_ONE),
    ):
        for result in app:
            label = f"{name} <= {target}x {base} (synchronous_commit={result.commit_mode})"
            value = result.ratio(name, base)
            if value is None:
                ctx.out.target(label, None, "not measured")
                continue
            span = result.round_range(name, base)
            ctx.out.target(
                label,
                value <= target,
                f"{value:.2f}x (medians; rounds {span[0]:.2f}-{span[1]:.2f}x)"
                if span
                else f"{value:.2f}x",
            )
