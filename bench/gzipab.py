"""``python -m bench gzip``: the worker's drain with gzip off and on, interleaved.

One drain of a few seconds on a shared machine is luck: the two halves of ``drain``
(every gzip-off contender, then every gzip-on one) run minutes apart, and the load
moves in between. This command runs only the worker, ``--rounds`` times, off and on
back to back in an order that alternates (off-on, on-off, ...), and reports for each
mode the median and the range of the rate, with CPU time per event, which a busy
machine disturbs less than wall time: the worker's main thread (the drain's critical
path: build, compress, POST, record), its other threads (the claim ahead), the
endpoint (which decompresses) and PostgreSQL. The load average is printed before and
after. The timed window is the one of ``drain`` (see `bench.drain.run_worker`).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence

from bench.db import PostgresCpu
from bench.drain import CpuMeter, DrainResult, fill_for_worker, run_worker
from bench.endpoint import Endpoint
from bench.errors import BenchFailed
from bench.harness import Context
from bench.procs import ChildGroup, worker_env
from bench.report import Cell

DEFAULT_EVENTS = 50_000
QUICK_EVENTS = 2_000
DEFAULT_ROUNDS = 5
QUICK_ROUNDS = 1
TARGET_RATIO = 0.9


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _us(seconds: float | None, events: int) -> float | None:
    return None if seconds is None else round(seconds / events * 1e6, 2)


def run(ctx: Context, *, events: int, rounds: int) -> dict[bool, list[DrainResult]]:
    """``rounds`` interleaved pairs of drains; the gzip-on / gzip-off table."""
    by_mode: dict[bool, list[DrainResult]] = {False: [], True: []}
    ratios: list[float] = []
    with (
        ctx.server.scratch("gzip") as url,
        Endpoint() as endpoint,
        ChildGroup(ctx.log_dir) as group,
    ):
        ctx.describe(url)
        meter = CpuMeter(PostgresCpu(url), endpoint)
        ctx.out.heading(f"Gzip off and on: {rounds} interleaved rounds of {events:,} events")
        ctx.out.facts({"load average before (1, 5, 15 min)": _load()})
        for i in range(rounds):
            order = (False, True) if i % 2 == 0 else (True, False)
            pair: dict[bool, DrainResult] = {}
            for gzip in order:
                ctx.out.progress(f"round {i + 1}/{rounds}: gzip {'on' if gzip else 'off'}")
                env = worker_env(url, endpoint.url, gzip=gzip)
                fill_for_worker(ctx, url, env, events)
                try:
                    result = run_worker(
                        ctx, group, url, endpoint, meter, events, gzip=gzip, refill=False
                    )
                except BenchFailed as exc:
                    ctx.fail(f"round {i + 1}, gzip {'on' if gzip else 'off'}: {exc}")
                    continue
                pair[gzip] = result
                by_mode[gzip].append(result)
            if False in pair and True in pair:
                ratios.append(pair[True].rate / pair[False].rate)
        ctx.out.facts({"load average after (1, 5, 15 min)": _load()})
    print_table(ctx, by_mode, ratios)
    return by_mode


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def print_table(ctx: Context, by_mode: dict[bool, list[DrainResult]], ratios: list[float]) -> None:
    """One row per mode: rate median and range, CPU µs per event (medians)."""
    rows: list[list[Cell]] = []
    for gzip in (False, True):
        runs = by_mode[gzip]
        if not runs:
            continue
        rates = [r.rate for r in runs]
        n = runs[0].events
        rows.append(
            [
                "on" if gzip else "off",
                len(runs),
                round(statistics.median(rates)),
                f"{min(rates):,.0f}-{max(rates):,.0f}",
                _us(_median([r.cpu_main for r in runs]), n),
                _us(_median([r.cpu_other_threads for r in runs]), n),
                _us(_median([r.cpu_contender for r in runs]), n),
                _us(_median([r.cpu_endpoint for r in runs]), n),
                _us(_median([r.cpu_postgres for r in runs]), n),
            ]
        )
    ctx.out.table(
        [
            "gzip",
            "runs",
            "events/s (median)",
            "range",
            "main thread CPU us/event",
            "other threads us/event",
            "worker CPU us/event",
            "endpoint CPU us/event",
            "postgres CPU us/event",
        ],
        rows,
    )
    if ratios:
        ctx.out.line(
            "- on/off per round: "
            + ", ".join(f"{r:.2f}x" for r in ratios)
            + f"; median {statistics.median(ratios):.2f}x"
        )
        ctx.out.line(
            "- CPU figures are medians over the runs; psutil-free, from /proc (10 ms ticks)"
        )
        ctx.out.line()
        median = statistics.median(ratios)
        ctx.out.target(
            f"gzip on >= {TARGET_RATIO}x gzip off",
            median >= TARGET_RATIO,
            f"{median:.2f}x (median of {len(ratios)} interleaved rounds)",
        )
