"""``python -m bench latency``: from the application's commit to the endpoint.

Producers in this process (``--producers`` threads, each with its own connection, as
an application has several) commit transactions at a steady total rate (``--rate``
events per second, ``--per-transaction`` events each, plus a small INSERT of the
application's own) while one ``outbox-worker run`` ships them. Every event carries
``bench_seq`` (its number) and ``bench_committed_at`` (the wall-clock time just
before COMMIT) in its properties; the producer also notes, by ``bench_seq``, the
``time.monotonic()`` at which COMMIT returned. The endpoint notes when each request
arrived (``time.monotonic()`` too: on Linux one clock for every process), so the
latency of an event is its request's arrival minus its transaction's commit.

The worker's settings come from the environment: try ``OUTBOX_POLL_INTERVAL=0.05``,
or a NOTIFY wake-up once the worker has one. The same producer loop is then run
against posthog-python's ``Client`` (latency from ``capture()`` returning to arrival)
as the reference.

``--pooler`` adds poll-only rows (LISTEN off, so an idle worker finds new events only
by polling): the worker on a direct connection with ``OUTBOX_NOTIFY=0``, and the worker
and the producers through a real PgBouncer in transaction pooling mode (Debian's
``pgbouncer``; the rows are skipped, saying so, where it is not installed) with
``OUTBOX_POOLER=transaction``. For each, it also measures what an idle worker costs
over ``IDLE_SECONDS`` on an empty outbox: the database's transactions per second
(``pg_stat_database``) and the CPU time (psutil) of the server processes connected to
the benchmark's database (the worker's, or PgBouncer's server connections, which only
the worker uses then).
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

import outbox
from bench.db import APP_INSERT, APP_TABLE, execute
from bench.endpoint import Endpoint
from bench.errors import BenchFailed
from bench.events import event_pool
from bench.harness import Context
from bench.procs import API_KEY, Child, ChildGroup, worker_argv, worker_env, worker_settings
from bench.report import Cell, mb, percentile
from worker.database import with_database
from worker.testing.pgbouncer import MISSING, PgBouncer, pgbouncer_binary

DEFAULT_RATE = 1000.0
DEFAULT_SECONDS = 20.0
DEFAULT_PRODUCERS = 4
QUICK_RATE = 200.0
QUICK_SECONDS = 1.0

TARGET_P50 = 0.050
TARGET_P99 = 0.250
#: How long an idle worker is watched to measure what its polling costs (seconds).
IDLE_SECONDS = 10.0
QUICK_IDLE_SECONDS = 1.0


@dataclass
class LatencyResult:
    """Latencies of one contender, in seconds."""

    contender: str
    events: int
    produced_rate: float
    latencies: list[float]
    missing: int
    max_rss_bytes: int | None = None
    note: str = ""
    idle: IdleCost | None = None

    def p(self, q: float) -> float | None:
        """The q-th percentile latency."""
        return percentile(self.latencies, q) if self.latencies else None


@dataclass
class IdleCost:
    """What an idle worker costs the database, per second, beyond the idle server."""

    seconds: float
    transactions_per_second: float
    cpu_ms_per_second: float | None
    polls_per_second: float


class Schedule:
    """Ticks at a steady rate from a start time; says how far behind the producer fell."""

    def __init__(self, interval: float, start: float) -> None:
        self.interval = interval
        self.start = start
        self.max_lag = 0.0

    def wait(self, k: int) -> None:
        """Sleep until tick ``k`` is due (not at all if it is overdue)."""
        due = self.start + k * self.interval
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        else:
            self.max_lag = max(self.max_lag, now - due)


Batch = list[dict[str, Any]]
#: Opens one producer's connection and yields its commit function.
Opener = Callable[[], contextlib.AbstractContextManager[Callable[[Batch], None]]]


@dataclass
class Produced:
    """What the producers did."""

    committed: dict[int, float]
    rate: float
    max_lag: float
    durations: list[float]


def produce(
    rate: float, seconds: float, per_transaction: int, opener: Opener, producers: int = 1
) -> Produced:
    """Commit ``per_transaction`` events at a total of ``rate`` events/s for ``seconds``,
    from ``producers`` threads, each with its own connection (from ``opener``) and its
    own steady schedule, offset so the transactions interleave evenly.

    One connection committing one transaction at a time is capped by its commit
    latency (an fsync per commit); an application has many connections, and so does
    the producer. Each event carries ``bench_seq`` and ``bench_committed_at``; the
    commit time of each ``bench_seq`` (``time.monotonic()`` when COMMIT returned) is
    returned with the achieved rate, the worst lag behind schedule and the duration of
    every transaction.
    """
    pool = event_pool()
    transactions = max(1, round(rate * seconds / per_transaction))
    interval = per_transaction * producers / rate
    committed: dict[int, float] = {}
    durations: list[float] = []
    lags: list[float] = []
    errors: list[BaseException] = []
    start = time.monotonic() + 0.05

    def run(index: int) -> None:
        schedule = Schedule(interval, start + index * interval / producers)
        mine: list[float] = []
        try:
            with opener() as commit:
                for k, tx in enumerate(range(index, transactions, producers)):
                    schedule.wait(k)
                    batch: Batch = []
                    for seq in range(tx * per_transaction, (tx + 1) * per_transaction):
                        event = pool[seq % len(pool)]
                        properties = dict(event["properties"])
                        properties["bench_seq"] = seq
                        properties["bench_committed_at"] = time.time()
                        batch.append(
                            {
                                "event": event["event"],
                                "distinct_id": event["distinct_id"],
                                "properties": properties,
                            }
                        )
                    began = time.monotonic()
                    commit(batch)
                    done = time.monotonic()
                    mine.append(done - began)
                    for item in batch:
                        committed[item["properties"]["bench_seq"]] = done
        except BaseException as exc:
            errors.append(exc)
        finally:
            durations.extend(mine)
            lags.append(schedule.max_lag)

    threads = [
        threading.Thread(target=run, args=(i,), name=f"producer-{i}", daemon=True)
        for i in range(producers)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + seconds * 3 + 60
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise BenchFailed(f"a producer failed: {errors[0]!r}") from errors[0]
    if any(thread.is_alive() for thread in threads):
        raise BenchFailed("the producers did not finish in time")
    # The planned duration, or longer if the producers fell behind and finished late.
    elapsed = max(transactions * per_transaction / rate, time.monotonic() - start)
    events = transactions * per_transaction
    return Produced(committed, events / elapsed if elapsed > 0 else 0.0, max(lags), durations)


def collect(
    contender: str,
    endpoint: Endpoint,
    committed: dict[int, float],
    produced_rate: float,
    deadline: float,
) -> LatencyResult:
    """Wait (bounded) for every event, then join arrivals with commits."""
    with contextlib.suppress(BenchFailed):  # report what arrived, and how many did not
        endpoint.wait_for(len(committed), deadline)
    arrivals = endpoint.arrivals("bench_seq")
    latencies = [at - committed[seq] for seq, at in arrivals if seq in committed]
    missing = len(committed) - len({seq for seq, _ in arrivals if seq in committed})
    return LatencyResult(contender, len(committed), produced_rate, latencies, missing)


def run_outbox(
    ctx: Context,
    url: str,
    endpoint: Endpoint,
    group: ChildGroup,
    *,
    rate: float,
    seconds: float,
    per_transaction: int,
    producers: int,
    contender: str = "outbox-worker run",
    via: str | None = None,
    settings_env: Mapping[str, str] | None = None,
    idle_seconds: float = 0.0,
) -> LatencyResult:
    """The outbox: committed transactions, one running worker.

    ``via`` is the URL the worker and the producers connect to instead of ``url``
    (PgBouncer's; the producers then prepare no statement of their own, as any
    application behind a transaction pooler must not). ``settings_env`` overrides
    the worker's environment. With ``idle_seconds``, the idle worker's cost is
    measured first (see :func:`measure_idle`)."""
    connect_url = via or url
    env = worker_env(connect_url, endpoint.url, gzip=None)
    env.update(settings_env or {})
    settings = worker_settings(env)
    execute(url, APP_TABLE)
    producer_options: dict[str, Any] = {"prepare_threshold": None} if via else {}
    worker = group.spawn("worker", worker_argv("run"), env=env)
    with psycopg.connect(connect_url, **producer_options) as conn:
        # Warm up: one event through the whole path, so the worker is up and connected.
        outbox.enqueue(conn, "bench_warmup", "bench", {"bench_seq": -1})
        conn.commit()
    endpoint.wait_for(1, 60 + 3 * settings.poll_seconds, check=_alive(worker))
    endpoint.reset()
    idle: IdleCost | None = None
    if idle_seconds:
        ctx.out.progress(f"watching the idle worker for {idle_seconds:g}s")
        time.sleep(1.0)  # past the worker's hot spell after the warm-up event
        start = _idle_sample(url)
        time.sleep(idle_seconds)
        idle = _idle_cost(start, _idle_sample(url), settings.poll_seconds)

    @contextlib.contextmanager
    def opener() -> Iterator[Callable[[Batch], None]]:
        with psycopg.connect(connect_url, **producer_options) as conn:

            def commit(batch: Batch) -> None:
                conn.execute(APP_INSERT, (batch[0]["distinct_id"], 42))
                if len(batch) == 1:
                    item = batch[0]
                    outbox.enqueue(conn, item["event"], item["distinct_id"], item["properties"])
                else:
                    outbox.enqueue_many(conn, batch)
                conn.commit()

            yield commit

    ctx.out.progress(
        f"producing {rate:,.0f} events/s for {seconds:g}s into the outbox "
        f"from {producers} connections"
    )
    produced = produce(rate, seconds, per_transaction, opener, producers)
    result = collect(
        contender,
        endpoint,
        produced.committed,
        produced.rate,
        30 + 5 * settings.poll_seconds,
    )
    info = worker.stop()
    result.max_rss_bytes = info.max_rss_bytes
    result.idle = idle
    mode = f"OUTBOX_POOLER={settings.pooler}, LISTEN {'on' if settings.listen else 'off'}, "
    if via:
        mode += "worker and producers through PgBouncer (pool_mode=transaction), "
    result.note = mode + (
        f"OUTBOX_POLL_INTERVAL={settings.poll_seconds:g}, OUTBOX_BATCH_SIZE="
        f"{settings.batch_size}, OUTBOX_GZIP={'1' if settings.gzip else '0'}; "
        f"{per_transaction} event(s) per transaction with an INSERT of its own, from "
        f"{producers} connection(s); transaction p50 "
        f"{percentile(produced.durations, 50) * 1000:.1f} ms, p99 "
        f"{percentile(produced.durations, 99) * 1000:.1f} ms, max "
        f"{max(produced.durations) * 1000:.1f} ms; producers at most "
        f"{produced.max_lag * 1000:.1f} ms behind schedule"
    )
    return result


@dataclass
class _IdleSample:
    at: float
    transactions: int
    cpu: dict[int, float] | None


def _idle_sample(url: str) -> _IdleSample:
    """The database's transactions so far (committed and rolled back, from
    ``pg_stat_database``) and the CPU seconds of each server process connected to it,
    read from another database so the sample adds nothing to either."""
    dbname = str(conninfo_to_dict(url).get("dbname"))
    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            (dbname,),
        ).fetchone()
        pids = [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s "
                "AND backend_type = 'client backend'",
                (dbname,),
            )
        ]
    cpu: dict[int, float] | None
    try:
        psutil: Any = importlib.import_module("psutil")  # optional: the bench extra
        found: dict[int, float] = {}
        for pid in pids:
            times = psutil.Process(pid).cpu_times()
            found[pid] = times.user + times.system
        cpu = found
    except Exception:
        cpu = None
    return _IdleSample(time.monotonic(), int(row[0]) if row else 0, cpu)


def _idle_cost(start: _IdleSample, end: _IdleSample, poll: float) -> IdleCost:
    """The worker's idle cost from two samples: transactions on the database, and the CPU
    of the server processes serving it (the worker's, or PgBouncer's server
    connections, which only the worker uses then), per second."""
    seconds = end.at - start.at
    cpu: float | None = None
    if start.cpu is not None and end.cpu is not None:
        used = sum(end.cpu[pid] - start.cpu[pid] for pid in end.cpu if pid in start.cpu)
        cpu = used / seconds * 1000
    tps = (end.transactions - start.transactions) / seconds
    return IdleCost(seconds, tps, cpu, 1 / poll)


def run_client(
    ctx: Context, endpoint: Endpoint, *, rate: float, seconds: float, per_transaction: int
) -> LatencyResult:
    """posthog-python's Client in this process, defaults as shipped (flush_at 100,
    flush_interval 5s), at the same rate; latency from capture() returning to arrival."""
    from posthog.client import Client

    client = Client(API_KEY, host=endpoint.url, max_queue_size=1_000_000)
    try:
        client.capture("bench_warmup", distinct_id="bench", properties={"bench_seq": -1})
        client.flush()
        endpoint.wait_for(1, 30)
        endpoint.reset()

        def commit(batch: Batch) -> None:
            for item in batch:
                client.capture(
                    item["event"], distinct_id=item["distinct_id"], properties=item["properties"]
                )

        ctx.out.progress(f"capturing {rate:,.0f} events/s for {seconds:g}s with posthog.Client")
        produced = produce(rate, seconds, per_transaction, lambda: contextlib.nullcontext(commit))
        result = collect("posthog-python Client", endpoint, produced.committed, produced.rate, 30)
    finally:
        client.shutdown()
    result.note = (
        f"defaults (flush_at 100, flush_interval 5s), in the producing process, one "
        f"producer thread; at most {produced.max_lag * 1000:.1f} ms behind schedule"
    )
    return result


def _alive(child: Child) -> Callable[[], None]:
    def check() -> None:
        if not child.running:
            raise BenchFailed(f"the worker exited (code {child.returncode}){child.log_hint()}")

    return check


def run(
    ctx: Context,
    *,
    rate: float,
    seconds: float,
    per_transaction: int,
    producers: int,
    with_client: bool,
    pooler: bool = False,
) -> list[LatencyResult]:
    """The latency command (with ``pooler``, also the poll-only and PgBouncer rows)."""
    results: list[LatencyResult] = []
    idle_seconds = QUICK_IDLE_SECONDS if ctx.quick else IDLE_SECONDS
    common: dict[str, Any] = {
        "rate": rate,
        "seconds": seconds,
        "per_transaction": per_transaction,
        "producers": producers,
    }
    with (
        ctx.server.scratch("latency") as url,
        Endpoint(record_events=True) as endpoint,
        ChildGroup(ctx.log_dir) as group,
    ):
        ctx.describe(url)
        ctx.out.heading(f"Latency: commit to endpoint at {rate:,.0f} events/s for {seconds:g}s")
        results.append(run_outbox(ctx, url, endpoint, group, **common))
        if pooler:
            endpoint.reset()
            results.append(
                run_outbox(
                    ctx,
                    url,
                    endpoint,
                    group,
                    **common,
                    contender="outbox-worker run, poll-only",
                    settings_env={"OUTBOX_NOTIFY": "0", "OUTBOX_POOLER": "none"},
                    idle_seconds=idle_seconds,
                )
            )
            if pgbouncer_binary() is None:
                ctx.out.line(f"- skipped the PgBouncer row: {MISSING}")
            else:
                endpoint.reset()
                with PgBouncer(ctx.server.admin_url, pool_size=producers + 2) as bouncer:
                    results.append(
                        run_outbox(
                            ctx,
                            url,
                            endpoint,
                            group,
                            **common,
                            contender="outbox-worker run via PgBouncer",
                            via=bouncer.url(url),
                            settings_env={"OUTBOX_POOLER": "transaction"},
                            idle_seconds=idle_seconds,
                        )
                    )
        if with_client:
            endpoint.reset()
            results.append(
                run_client(
                    ctx, endpoint, rate=rate, seconds=seconds, per_transaction=per_transaction
                )
            )
    rows: list[list[Cell]] = []
    for r in results:
        rows.append(
            [
                r.contender,
                r.events,
                round(r.produced_rate) if r.produced_rate >= 100 else round(r.produced_rate, 2),
                _ms(r.p(50)),
                _ms(r.p(95)),
                _ms(r.p(99)),
                _ms(max(r.latencies) if r.latencies else None),
                r.missing,
                mb(r.max_rss_bytes),
            ]
        )
    ctx.out.table(
        [
            "contender",
            "events",
            "events/s produced",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "missing",
            "peak RSS MiB",
        ],
        rows,
    )
    for r in results:
        ctx.out.line(f"- {r.contender}: {r.note}")
    ctx.out.line()
    idle_rows: list[list[Cell]] = [
        [
            r.contender,
            round(r.idle.seconds, 1),
            round(r.idle.polls_per_second, 1),
            round(r.idle.transactions_per_second, 1),
            None if r.idle.cpu_ms_per_second is None else round(r.idle.cpu_ms_per_second, 2),
            None
            if r.idle.cpu_ms_per_second is None
            else round(r.idle.cpu_ms_per_second / r.idle.polls_per_second * 1000),
        ]
        for r in results
        if r.idle is not None
    ]
    if idle_rows:
        ctx.out.line(
            "Idle worker, empty outbox (pg_stat_database is updated about once a second "
            "and psutil counts CPU in 10 ms ticks: a short watch undercounts):"
        )
        ctx.out.table(
            [
                "contender",
                "watched s",
                "polls/s",
                "transactions/s",
                "server CPU ms/s",
                "server CPU µs per poll",
            ],
            idle_rows,
        )
    for worker in results:
        if worker.contender.startswith("posthog"):
            continue
        if worker.missing:
            ctx.fail(f"latency: {worker.missing} events never reached the endpoint")
        p50, p99 = worker.p(50), worker.p(99)
        label = "" if worker is results[0] else f" ({worker.contender})"
        ctx.out.target(
            "p50 < 50 ms" + label,
            None if p50 is None else p50 < TARGET_P50,
            "no events" if p50 is None else _verdict(p50, TARGET_P50),
        )
        ctx.out.target(
            "p99 < 250 ms" + label,
            None if p99 is None else p99 < TARGET_P99,
            "no events" if p99 is None else _verdict(p99, TARGET_P99),
        )
    return results


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _verdict(value: float, target: float) -> str:
    text = f"{value * 1000:.1f} ms"
    if value >= target:
        text += f"; over by {(value - target) * 1000:.1f} ms ({value / target:.1f}x the target)"
    return text
