"""``python -m bench enqueue``: what an event adds to the application's transaction.

Sequential transactions over one connection, each a small INSERT of the
application's own and then COMMIT, with no event, one event (``enqueue()``), ten
events in one call (``enqueue_many()``) and ten separate ``enqueue()`` calls; over a
psycopg connection and over a SQLAlchemy ``Connection``. Beside them,
posthog-python's ``Client.capture()`` for one and ten events (no database at all; its
background thread ships them to the local endpoint meanwhile, as in an application).

Variants are interleaved in rounds so that drift (table growth, the machine warming up)
spreads evenly. Round trips per transaction come from a libpq trace of a few extra
transactions per variant: each switch from sending to receiving is one round trip.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import Trace
from sqlalchemy import create_engine, text

import outbox
from bench.db import APP_INSERT, APP_TABLE, execute
from bench.endpoint import Endpoint
from bench.events import BenchEvent, event_pool
from bench.harness import Context
from bench.procs import API_KEY
from bench.report import Cell

DEFAULT_TRANSACTIONS = 3000
QUICK_TRANSACTIONS = 200
ROUNDS = 5
WARMUP = 100
TRACED = 10

TARGET_EXTRA_ROUND_TRIPS = 1
TARGET_TEN_VS_ONE = 1.2

APP_INSERT_SA = text("INSERT INTO bench_orders (user_id, total) VALUES (:user_id, :total)")

NONE, ONE, TEN, TEN_CALLS = "no event", "1 event", "10 events", "10 events, 10 calls"


@dataclass
class Variant:
    """One kind of transaction (or capture call) and its timings."""

    driver: str
    name: str
    run: Callable[[], None]
    pgconn: Any = None  # the libpq connection to trace, for database variants
    #: Run after each timed block, untimed: lets capture()'s background thread finish
    #: sending, so it does not compete with the next variant's timing.
    settle: Callable[[], None] | None = None
    seconds: list[float] | None = None
    round_trips: float | None = None

    @property
    def label(self) -> str:
        """``driver: name``."""
        return f"{self.driver}: {self.name}"

    @property
    def mean(self) -> float:
        """Mean seconds per call."""
        return statistics.fmean(self.seconds or [0.0])

    def quantile(self, q: float) -> float:
        """The q-th percentile, in seconds."""
        from bench.report import percentile

        return percentile(self.seconds or [0.0], q)


def _cycle_events() -> Iterator[BenchEvent]:
    return itertools.cycle(event_pool())


def _items(events: Iterator[BenchEvent], n: int) -> list[dict[str, Any]]:
    return [dict(next(events)) for _ in range(n)]


def psycopg_variants(conn: psycopg.Connection[Any]) -> list[Variant]:
    """The transaction variants over a psycopg connection."""
    events = _cycle_events()

    def none() -> None:
        conn.execute(APP_INSERT, ("user-42", 42))
        conn.commit()

    def one() -> None:
        conn.execute(APP_INSERT, ("user-42", 42))
        e = next(events)
        outbox.enqueue(conn, e["event"], e["distinct_id"], e["properties"])
        conn.commit()

    def ten() -> None:
        conn.execute(APP_INSERT, ("user-42", 42))
        outbox.enqueue_many(conn, _items(events, 10))
        conn.commit()

    def ten_calls() -> None:
        conn.execute(APP_INSERT, ("user-42", 42))
        for _ in range(10):
            e = next(events)
            outbox.enqueue(conn, e["event"], e["distinct_id"], e["properties"])
        conn.commit()

    return [
        Variant("psycopg", name, fn, conn.pgconn)
        for name, fn in ((NONE, none), (ONE, one), (TEN, ten), (TEN_CALLS, ten_calls))
    ]


def sqlalchemy_variants(conn: Any) -> list[Variant]:
    """The transaction variants over a SQLAlchemy Connection (``with conn.begin()``)."""
    events = _cycle_events()
    params = {"user_id": "user-42", "total": 42}

    def none() -> None:
        with conn.begin():
            conn.execute(APP_INSERT_SA, params)

    def one() -> None:
        with conn.begin():
            conn.execute(APP_INSERT_SA, params)
            e = next(events)
            outbox.enqueue(conn, e["event"], e["distinct_id"], e["properties"])

    def ten() -> None:
        with conn.begin():
            conn.execute(APP_INSERT_SA, params)
            outbox.enqueue_many(conn, _items(events, 10))

    def ten_calls() -> None:
        with conn.begin():
            conn.execute(APP_INSERT_SA, params)
            for _ in range(10):
                e = next(events)
                outbox.enqueue(conn, e["event"], e["distinct_id"], e["properties"])

    pgconn = conn.connection.driver_connection.pgconn
    return [
        Variant("SQLAlchemy", name, fn, pgconn)
        for name, fn in ((NONE, none), (ONE, one), (TEN, ten), (TEN_CALLS, ten_calls))
    ]


def client_variants(client: Any) -> list[Variant]:
    """posthog-python's capture(), once and ten times."""
    events = _cycle_events()

    def one() -> None:
        e = next(events)
        client.capture(e["event"], distinct_id=e["distinct_id"], properties=e["properties"])

    def ten() -> None:
        for _ in range(10):
            e = next(events)
            client.capture(e["event"], distinct_id=e["distinct_id"], properties=e["properties"])

    def settle() -> None:
        client.flush()

    return [
        Variant("posthog-python", "capture() x1", one, settle=settle),
        Variant("posthog-python", "capture() x10", ten, settle=settle),
    ]


def measure(variants: list[Variant], transactions: int) -> None:
    """Warm up, then time every variant in interleaved rounds."""
    for v in variants:
        for _ in range(WARMUP):
            v.run()
        if v.settle is not None:
            v.settle()
        v.seconds = []
    per_round = max(1, transactions // ROUNDS)
    clock = time.perf_counter
    for r in range(ROUNDS):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            out = v.seconds
            assert out is not None
            run = v.run
            for _ in range(per_round):
                started = clock()
                run()
                out.append(clock() - started)
            if v.settle is not None:
                v.settle()


def count_round_trips(variant: Variant) -> float | None:
    """Round trips per call, from a libpq trace of `TRACED` calls."""
    if variant.pgconn is None:
        return None
    with tempfile.TemporaryFile(mode="w+") as trace:
        variant.pgconn.trace(trace.fileno())
        variant.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
        try:
            for _ in range(TRACED):
                variant.run()
        finally:
            variant.pgconn.untrace()
        trace.seek(0)
        lines = trace.read().splitlines()
    trips, last = 0, ""
    for line in lines:
        direction = line.split("\t", 1)[0]
        if direction == "B" and last == "F":
            trips += 1
        if direction in ("B", "F"):
            last = direction
    return trips / TRACED


def run(ctx: Context, *, transactions: int) -> list[Variant]:
    """The enqueue command."""
    from posthog.client import Client

    with ctx.server.scratch("enqueue") as url, Endpoint() as endpoint:
        ctx.describe(url)
        execute(url, APP_TABLE)
        engine = create_engine("postgresql+psycopg://" + url.removeprefix("postgresql://"))
        client = Client(API_KEY, host=endpoint.url, max_queue_size=10_000_000)
        try:
            with psycopg.connect(url) as pg, engine.connect() as sa:
                variants = [*psycopg_variants(pg), *sqlalchemy_variants(sa)]
                variants += client_variants(client)
                ctx.out.progress(
                    f"timing {len(variants)} variants x {transactions:,} calls in {ROUNDS} rounds"
                )
                measure(variants, transactions)
                for v in variants:
                    v.round_trips = count_round_trips(v)
        finally:
            with contextlib.suppress(Exception):
                client.shutdown()
            engine.dispose()
    report(ctx, variants, transactions)
    return variants


def report(ctx: Context, variants: list[Variant], transactions: int) -> None:
    """The table and the targets."""
    ctx.out.heading(
        f"Enqueue: cost per transaction, {transactions:,} sequential transactions per variant"
    )
    capture_one = next(v for v in variants if v.name == "capture() x1")
    rows: list[list[Cell]] = []
    for v in variants:
        base = next((b for b in variants if b.driver == v.driver and b.name == NONE), None)
        overhead = v.mean - base.mean if base is not None else None
        rows.append(
            [
                v.label,
                round(v.mean * 1e6),
                round(v.quantile(50) * 1e6),
                round(v.quantile(99) * 1e6),
                f"{v.mean / base.mean:.2f}x" if base is not None else None,
                round(overhead * 1e6) if overhead is not None else None,
                f"{overhead / capture_one.mean:.1f}x" if overhead is not None else None,
                v.round_trips,
            ]
        )
    ctx.out.table(
        [
            "variant",
            "mean us",
            "p50 us",
            "p99 us",
            "vs no event",
            "added us",
            "added vs capture() x1",
            "round trips",
        ],
        rows,
    )
    ctx.out.line(
        "- a transaction is: INSERT INTO bench_orders, then the events, then COMMIT; "
        "'added' is the mean minus the same driver's no-event transaction"
    )
    ctx.out.line(
        f"- capture() x1 mean {capture_one.mean * 1e6:.1f} us: it only queues the event in "
        "memory (a background thread sends it), so nothing is durable when it returns"
    )
    ctx.out.line()
    for driver in ("psycopg", "SQLAlchemy"):
        by = {v.name: v for v in variants if v.driver == driver}
        none, one, ten = by[NONE], by[ONE], by[TEN]
        if none.round_trips is not None and one.round_trips is not None:
            extra = one.round_trips - none.round_trips
            ctx.out.target(
                f"{driver}: one event adds at most 1 round trip",
                extra <= TARGET_EXTRA_ROUND_TRIPS,
                f"{none.round_trips:g} -> {one.round_trips:g} round trips (+{extra:g})",
            )
        added_one, added_ten = one.mean - none.mean, ten.mean - none.mean
        if added_one <= 0:
            ctx.out.target(
                f"{driver}: ten events (enqueue_many) cost at most 1.2x one event",
                None,
                f"one event added {added_one * 1e6:.0f} us: below the noise; run more "
                "--transactions",
            )
            continue
        cost_ratio = added_ten / added_one
        # What each event after the first costs, and what the target leaves for it.
        per_event = (added_ten - added_one) / 9
        allowed = (TARGET_TEN_VS_ONE - 1) * added_one / 9
        ctx.out.target(
            f"{driver}: ten events (enqueue_many) cost at most 1.2x one event",
            cost_ratio <= TARGET_TEN_VS_ONE,
            f"added {added_ten * 1e6:.0f} us vs {added_one * 1e6:.0f} us = {cost_ratio:.2f}x"
            + (
                ""
                if cost_ratio <= TARGET_TEN_VS_ONE
                else f", over by {cost_ratio - TARGET_TEN_VS_ONE:.2f}x"
            )
            + f"; whole transaction {ten.mean / one.mean:.2f}x; each event after the first "
            f"adds {per_event * 1e6:.0f} us, the target allows {allowed * 1e6:.0f} us",
        )
