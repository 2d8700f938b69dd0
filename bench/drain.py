"""``python -m bench`` (``drain``): the side-by-side drain comparison.

Every contender delivers the same N events to the same local endpoint, first with
gzip off (posthog-python's default), then with gzip on:

1. posthog-python's ``Client``, from memory: timed from the first ``capture()`` to
   the endpoint having all N events;
2. one ``outbox-worker run --until-empty`` draining a pre-filled backlog;
3. pgqueuer as the outbox, one job per event, forwarded to a posthog-python Client;
4. the floor: ``DELETE ... RETURNING`` + one POST per batch, no bookkeeping.

How the worker's drain is timed: the backlog holds N events plus one extra batch, and
the clock runs from the endpoint accepting that first batch to it accepting all
N + batch events. So process start, imports and connecting are left out, and exactly
N events' worth of whole batch cycles (ack, claim, encode, POST) are timed. The other
contenders are timed from a GO signal sent once they are set up (see
`bench.contenders`). Peak RSS and CPU seconds are each contender process's own,
read when it is reaped; postgres CPU is the whole server's over the timed window, and
endpoint CPU is the capture server process's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from bench.db import (
    PostgresCpu,
    fill_outbox,
    outbox_count,
    prepare_for_drain,
    reset_outbox,
)
from bench.endpoint import Endpoint
from bench.errors import BenchFailed
from bench.events import iter_events, mean_properties_bytes
from bench.harness import Context
from bench.procs import (
    Child,
    ChildGroup,
    contender_argv,
    worker_argv,
    worker_env,
    worker_settings,
)
from bench.report import Cell, mb, ratio

DEFAULT_EVENTS = 100_000
QUICK_EVENTS = 2_000
PGQUEUER_BATCH = 100
FLOOR_BATCH = 1000

TARGET_RATIO = 4.0
TARGET_RATE = 30_000.0

CLIENT = "posthog-python Client"
WORKER = "outbox-worker (1 process)"
PGQUEUER = "pgqueuer -> posthog Client"
FLOOR = "floor: DELETE..RETURNING + POST"


@dataclass
class DrainResult:
    """One contender's measured drain."""

    contender: str
    events: int
    seconds: float
    max_rss_bytes: int | None = None
    cpu_contender: float | None = None
    cpu_postgres: float | None = None
    cpu_endpoint: float | None = None
    detail: str = ""
    #: The worker's main thread's CPU seconds over the timed window, and its other
    #: threads' (the claim thread among them); None for the other contenders.
    cpu_main: float | None = None
    cpu_other_threads: float | None = None

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.events / self.seconds if self.seconds > 0 else 0.0


class CpuMeter:
    """CPU seconds of the PostgreSQL server and of the endpoint over a window."""

    def __init__(self, pg: PostgresCpu, endpoint: Endpoint) -> None:
        self.pg = pg
        self.endpoint = endpoint
        self._pg0: float | None = None
        self._ep0 = 0.0

    def start(self) -> None:
        """Open the window."""
        self._pg0 = self.pg.seconds()
        self._ep0 = self.endpoint.usage().cpu_seconds

    def stop(self) -> tuple[float | None, float]:
        """Close the window: (postgres CPU seconds or None, endpoint CPU seconds)."""
        pg1 = self.pg.seconds()
        ep = self.endpoint.usage().cpu_seconds - self._ep0
        pg = pg1 - self._pg0 if pg1 is not None and self._pg0 is not None else None
        return pg, ep


def drain_timeout(events: int) -> float:
    """How long any one drain may take before the run is declared failed."""
    return max(60.0, events / 200.0)


def first_batch_size(env: dict[str, str]) -> int:
    """How many events the worker's first batch will carry (its batch size, or fewer
    if the batch byte limit binds, estimating rows as the claim query does)."""
    settings = worker_settings(env)
    per_row = int(mean_properties_bytes()) + 256
    return max(1, min(settings.batch_size, settings.max_batch_bytes // per_row))


# -- the contenders -----------------------------------------------------------------------


def run_line_contender(
    ctx: Context,
    group: ChildGroup,
    name: str,
    argv: list[str],
    endpoint: Endpoint,
    meter: CpuMeter,
    events: int,
    describe: Callable[[dict[str, float]], str],
    *,
    terminate: bool = False,
) -> DrainResult:
    """Run a `bench.contenders` program: READY, GO (clock starts), all events arrived
    (clock stops), SHUTDOWN, DONE. With ``terminate`` the program is stopped with
    SIGTERM instead once every event arrived (its teardown is not worth waiting for)."""
    endpoint.reset()
    child = group.spawn(name.split()[0].lower().replace(":", ""), argv, pipe_stdio=True)
    child.expect("READY", timeout=120)
    meter.start()
    cpu0 = child.cpu_seconds()
    started = time.monotonic()
    child.send("GO")
    finished = endpoint.wait_for(events, drain_timeout(events), check=_alive(child))
    cpu1 = child.cpu_seconds()
    cpu_pg, cpu_ep = meter.stop()
    if terminate:
        done: dict[str, float] = {}
        info = child.stop()
    else:
        child.send("SHUTDOWN")
        done = json.loads(child.expect("DONE", timeout=120) or "{}")
        info = child.wait(60)
        child.close()
    if info.returncode != 0 and not terminate:
        raise BenchFailed(f"{name} exited with code {info.returncode}{child.log_hint()}")
    received = endpoint.count()
    if received != events:
        raise BenchFailed(f"{name}: the endpoint accepted {received} events, expected {events}")
    return DrainResult(
        name,
        events,
        finished - started,
        info.max_rss_bytes,
        _delta(cpu0, cpu1),
        cpu_pg,
        cpu_ep,
        describe(done),
    )


def _delta(before: float | None, after: float | None) -> float | None:
    return after - before if before is not None and after is not None else None


def _alive(child: Child) -> Callable[[], None]:
    def check() -> None:
        if not child.running:
            raise BenchFailed(
                f"{child.name} exited (code {child.returncode}) before all events arrived"
                f"{child.log_hint()}"
            )

    return check


def run_worker(
    ctx: Context,
    group: ChildGroup,
    url: str,
    endpoint: Endpoint,
    meter: CpuMeter,
    events: int,
    *,
    gzip: bool,
    refill: bool = True,
    extra_env: dict[str, str] | None = None,
    label: str = WORKER,
) -> DrainResult:
    """One ``outbox-worker run --until-empty`` over a pre-filled backlog.

    With ``refill`` (the default) the outbox is emptied and filled with ``events`` plus
    one batch first; without, the caller has done that (see `fill_for_worker`).
    """
    env = worker_env(url, endpoint.url, gzip=gzip)
    env.update(extra_env or {})
    warmup = first_batch_size(env)
    fill_seconds = fill_for_worker(ctx, url, env, events) if refill else None
    endpoint.reset()
    child = group.spawn("worker", worker_argv("run", "--until-empty"), env=env)
    timeout = drain_timeout(events)

    def check() -> None:
        if not child.running and endpoint.count() < events + warmup:
            raise BenchFailed(
                f"the worker exited (code {child.returncode}) after {endpoint.count()} of "
                f"{events + warmup} events{child.log_hint()}"
            )

    first = endpoint.wait_for(warmup, timeout, check=check)
    meter.start()
    cpu0 = child.cpu_seconds()
    threads0 = child.thread_cpu_seconds()
    finished = endpoint.wait_for(events + warmup, timeout, check=check)
    threads1 = child.thread_cpu_seconds()
    cpu1 = child.cpu_seconds()
    cpu_pg, cpu_ep = meter.stop()
    cpu_main, cpu_other = _thread_split(child.pid, threads0, threads1)
    info = child.wait(60)
    child.close()
    if info.returncode != 0:
        raise BenchFailed(f"the worker exited with code {info.returncode}{child.log_hint()}")
    received, left = endpoint.count(), outbox_count(url)
    if received != events + warmup or left:
        raise BenchFailed(
            f"the worker delivered {received} of {events + warmup} events; {left} rows are left"
        )
    detail = (
        (f"fill {fill_seconds:.1f}s; " if fill_seconds is not None else "")
        + "start to first batch accepted "
        f"{first - child.started:.2f}s and the first batch of {warmup} not timed; "
        f"CPU over its whole life {info.cpu_seconds:.1f}s"
    )
    return DrainResult(
        label,
        events,
        finished - first,
        info.max_rss_bytes,
        _delta(cpu0, cpu1),
        cpu_pg,
        cpu_ep,
        detail,
        cpu_main,
        cpu_other,
    )


def _thread_split(
    pid: int, before: dict[int, float], after: dict[int, float]
) -> tuple[float | None, float | None]:
    """(main thread, all other threads) CPU seconds between two snapshots; a thread
    that ended in between is missing from both figures (None when nothing was read)."""
    if pid not in before or pid not in after:
        return None, None
    main = after[pid] - before[pid]
    other = sum(t - before.get(tid, 0.0) for tid, t in after.items() if tid != pid)
    return main, other


def fill_for_worker(ctx: Context, url: str, env: dict[str, str], events: int) -> float:
    """Empty the outbox, enqueue ``events`` plus the untimed first batch, CHECKPOINT;
    returns the seconds the enqueueing took."""
    total = events + first_batch_size(env)
    reset_outbox(url)
    ctx.out.progress(f"filling the outbox with {total:,} events")
    _, fill_seconds = fill_outbox(url, iter_events(total))
    prepare_for_drain(url)
    return fill_seconds


def run_client(
    ctx: Context, group: ChildGroup, endpoint: Endpoint, meter: CpuMeter, events: int, gzip: bool
) -> DrainResult:
    """posthog-python's own Client."""
    argv = contender_argv("client", "--host", endpoint.url, "--events", str(events))
    if gzip:
        argv.append("--gzip")

    def describe(done: dict[str, float]) -> str:
        loop = done.get("capture_loop_seconds", 0.0)
        return (
            f"capture() loop {loop:.2f}s ({loop / events * 1e6:.0f} us per call); "
            f"flush_at 100, flush_interval 5s, 1 consumer thread, max_queue_size raised"
        )

    return run_line_contender(ctx, group, CLIENT, argv, endpoint, meter, events, describe)


def run_pgqueuer(
    ctx: Context,
    group: ChildGroup,
    url: str,
    endpoint: Endpoint,
    meter: CpuMeter,
    events: int,
    *,
    gzip: bool,
    batch_size: int,
) -> DrainResult:
    """pgqueuer, one job per event, forwarded to a posthog-python Client."""
    ctx.out.progress(f"filling pgqueuer with {events:,} jobs")
    filler = group.spawn(
        "pgqueuer-fill",
        contender_argv("pgqueuer-fill", "--database-url", url, "--events", str(events)),
        pipe_stdio=True,
    )
    filled = json.loads(filler.expect("DONE", timeout=drain_timeout(events)) or "{}")
    filler.wait(60)
    filler.close()
    prepare_for_drain(url)
    argv = _queue_argv("pgqueuer", endpoint, url, events, batch_size, gzip=gzip)

    def describe(done: dict[str, float]) -> str:
        return (
            f"fill {filled.get('fill_seconds', 0.0):.1f}s; QueueManager batch_size "
            f"{batch_size}; each job done once its event is in the Client's queue"
        )

    return run_line_contender(
        ctx, group, PGQUEUER, argv, endpoint, meter, events, describe, terminate=True
    )


def _queue_argv(
    name: str, endpoint: Endpoint, url: str, events: int, batch_size: int, *, gzip: bool
) -> list[str]:
    """The command line of a contender that drains the database to the endpoint."""
    argv = contender_argv(
        name,
        "--host",
        endpoint.url,
        "--database-url",
        url,
        "--events",
        str(events),
        "--batch-size",
        str(batch_size),
    )
    if gzip:
        argv.append("--gzip")
    return argv


def run_floor(
    ctx: Context,
    group: ChildGroup,
    url: str,
    endpoint: Endpoint,
    meter: CpuMeter,
    events: int,
    *,
    gzip: bool,
) -> DrainResult:
    """The floor: DELETE ... RETURNING + POST, nothing else."""
    reset_outbox(url)
    ctx.out.progress(f"filling the outbox with {events:,} events")
    _, fill_seconds = fill_outbox(url, iter_events(events))
    prepare_for_drain(url)
    argv = _queue_argv("floor", endpoint, url, events, FLOOR_BATCH, gzip=gzip)

    def describe(done: dict[str, float]) -> str:
        return (
            f"fill {fill_seconds:.1f}s; {FLOOR_BATCH} rows per DELETE, "
            f"{int(done.get('requests', 0))} POSTs; not durable (rows deleted before the POST)"
        )

    result = run_line_contender(ctx, group, FLOOR, argv, endpoint, meter, events, describe)
    if outbox_count(url):
        raise BenchFailed("the floor left rows in the outbox")
    return result


# -- the command ------------------------------------------------------------------------


def pgqueuer_available() -> bool:
    """Whether pgqueuer is installed (``pip install -e '.[bench]'``)."""
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        return False
    return True


def run(
    ctx: Context,
    *,
    events: int,
    gzip_modes: Sequence[bool] = (False, True),
    with_pgqueuer: bool = True,
    pgqueuer_batch: int = PGQUEUER_BATCH,
    worker_variants: Sequence[dict[str, str]] = (),
) -> list[DrainResult]:
    """The drain comparison: one table per gzip mode, then the targets."""
    results: list[DrainResult] = []
    with (
        ctx.server.scratch("drain") as url,
        Endpoint() as endpoint,
        ChildGroup(ctx.log_dir) as group,
    ):
        ctx.describe(url)
        meter = CpuMeter(PostgresCpu(url), endpoint)
        settings = worker_settings(worker_env(url, endpoint.url, gzip=False))
        if with_pgqueuer and not pgqueuer_available():
            ctx.out.line("pgqueuer is not installed (pip install -e '.[bench]'): skipping it")
            with_pgqueuer = False
        by_mode: dict[bool, list[DrainResult]] = {}
        for gzip in gzip_modes:
            ctx.out.heading(
                f"Drain: {events:,} events to the local endpoint, gzip {'on' if gzip else 'off'}"
            )
            ctx.out.facts(
                {
                    "worker settings": f"OUTBOX_BATCH_SIZE={settings.batch_size}, "
                    f"OUTBOX_MAX_BATCH_BYTES={settings.max_batch_bytes}, "
                    f"OUTBOX_GZIP={'1' if gzip else '0'} (other OUTBOX_* from the environment)",
                }
            )
            ctx.out.line()
            rows: list[DrainResult] = []
            common = (ctx, group, url, endpoint, meter, events)
            steps: list[tuple[str, Callable[[], DrainResult]]] = [
                (CLIENT, partial(run_client, ctx, group, endpoint, meter, events, gzip)),
                (WORKER, partial(run_worker, *common, gzip=gzip)),
            ]
            for variant in worker_variants:
                label = "outbox-worker, " + " ".join(f"{k}={v}" for k, v in variant.items())
                steps.append(
                    (
                        label,
                        partial(run_worker, *common, gzip=gzip, extra_env=variant, label=label),
                    )
                )
            if with_pgqueuer:
                steps.append(
                    (
                        PGQUEUER,
                        partial(run_pgqueuer, *common, gzip=gzip, batch_size=pgqueuer_batch),
                    )
                )
            steps.append((FLOOR, partial(run_floor, *common, gzip=gzip)))
            for name, step in steps:
                ctx.out.progress(f"running {name} (gzip {'on' if gzip else 'off'})")
                try:
                    rows.append(step())
                except BenchFailed as exc:
                    ctx.fail(f"{name}: {exc}")
            print_table(ctx, rows)
            by_mode[gzip] = rows
            results.extend(rows)
        check_targets(ctx, by_mode.get(False, []))
    return results


def print_table(ctx: Context, rows: Sequence[DrainResult]) -> None:
    """The drain table and one detail line per contender."""
    base = next((r.rate for r in rows if r.contender == CLIENT), None)
    table: list[list[Cell]] = [
        [
            r.contender,
            r.events,
            round(r.seconds, 2),
            round(r.rate),
            ratio(r.rate, base),
            mb(r.max_rss_bytes),
            r.cpu_contender,
            r.cpu_postgres,
            r.cpu_endpoint,
        ]
        for r in rows
    ]
    ctx.out.table(
        [
            "contender",
            "events",
            "seconds",
            "events/s",
            "ratio",
            "peak RSS MiB",
            "CPU s",
            "postgres CPU s",
            "endpoint CPU s",
        ],
        table,
    )
    for r in rows:
        ctx.out.line(f"- {r.contender}: {r.detail}")
    ctx.out.line()


def check_targets(ctx: Context, rows: Sequence[DrainResult]) -> None:
    """The issue's drain targets, on the gzip-off table."""
    client = next((r for r in rows if r.contender == CLIENT), None)
    worker = next((r for r in rows if r.contender == WORKER), None)
    if worker is None:
        ctx.out.target("drain rate", None, "the worker did not run")
        return
    if client is not None:
        achieved = worker.rate / client.rate
        ctx.out.target(
            f">= {TARGET_RATIO:.0f}x posthog-python's Client (gzip off)",
            achieved >= TARGET_RATIO,
            f"{achieved:.2f}x ({worker.rate:,.0f} vs {client.rate:,.0f} events/s)"
            + (
                ""
                if achieved >= TARGET_RATIO
                else f"; short by {TARGET_RATIO - achieved:.2f}x "
                f"({achieved / TARGET_RATIO:.0%} of the target)"
            ),
        )
    ctx.out.target(
        f">= {TARGET_RATE:,.0f} events/s (gzip off)",
        worker.rate >= TARGET_RATE,
        f"{worker.rate:,.0f} events/s"
        + (
            ""
            if worker.rate >= TARGET_RATE
            else f"; short by {TARGET_RATE - worker.rate:,.0f} events/s "
            f"({worker.rate / TARGET_RATE:.0%} of the target)"
        ),
    )
