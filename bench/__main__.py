"""``python -m bench``: the command line of the benchmark harness."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

from bench.errors import BenchFailed
from bench.harness import Context, context

DESCRIPTION = """\
Benchmarks for posthog-outbox, on this machine, against a local capture endpoint
(a worker.testing.CaptureServer in its own process; nothing leaves 127.0.0.1).

Without a command, runs the drain comparison (`drain`). `python -m bench --quick`
runs every command at tiny sizes (a smoke test that takes about a minute; the
drain comparison then skips its gzip table).

The database is DATABASE_URL's server (scratch databases are created there and
dropped afterwards; the role needs CREATEDB), or, when DATABASE_URL is unset, an
embedded PostgreSQL in a temporary directory. The workers' OUTBOX_* settings come
from the environment (e.g. OUTBOX_BATCH_SIZE, OUTBOX_POLL_INTERVAL), except where a
command says it sets one.
"""

EPILOG = """\
commands:
  drain     the side-by-side comparison: posthog-python Client, outbox-worker,
            pgqueuer, and the DELETE..RETURNING floor; gzip off, then on (default)
  latency   commit-to-endpoint latency of a running worker at a steady rate
  backlog   drain rate, worker RSS and tables' size at 10,000 and 1,000,000 events
  enqueue   what enqueue() adds to an application transaction, vs capture()
  scaleout  1, 2 and 4 workers on one backlog: throughput, and no uuid twice
  profile   where a draining worker spends its time (py-spy, else cProfile)
  claims    the claim forms (the snapshot engine's batches, the floor) in
            PostgreSQL alone: events/s and server CPU per event
  storage   WAL bytes, PostgreSQL CPU and table size per event: a bare INSERT,
            PgQ (where the server has it) and posthog-outbox's snapshot engine
  gzip      the worker alone, gzip off and on, interleaved rounds: rate spread
            and CPU per event by thread
  encode    enqueue's Python per event (no database), orjson vs the json module
  all       every command above, in that order

Each command has its own --help.
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke test of the harness"
    )
    parser.add_argument(
        "--database-url", help="PostgreSQL server to use (default: DATABASE_URL, else embedded)"
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print tables as Markdown (for docs/)"
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' logs after a good run"
    )


def _sizes(text: str) -> list[int]:
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of counts"
        ) from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("counts must be positive")
    return values


def _assignments(text: str) -> dict[str, str]:
    pairs = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"{part!r} is not VAR=VALUE")
        pairs[name.strip()] = value.strip()
    return pairs


def _positive(text: str) -> int:
    value = int(text.replace("_", ""))
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The argument parser, and each command's own parser."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    drain = sub.add_parser(
        "drain",
        help="the side-by-side drain comparison (the default)",
        description="Drain the same events to the same endpoint with each contender: "
        "posthog-python's Client, outbox-worker, pgqueuer and the bare floor.",
    )
    _common(drain)
    drain.add_argument("--events", type=_positive, help="events per contender (default 100000)")
    drain.add_argument("--no-gzip-table", action="store_true", help="only the gzip-off table")
    drain.add_argument("--no-pgqueuer", action="store_true", help="skip the pgqueuer contender")
    drain.add_argument(
        "--pgqueuer-batch", type=_positive, default=100, help="pgqueuer's batch_size (100)"
    )
    drain.add_argument(
        "--worker-variant",
        type=_assignments,
        action="append",
        default=[],
        metavar="VAR=VALUE[,VAR=VALUE]",
        help="also run the worker with these environment settings, as an extra row "
        "(repeatable), e.g. OUTBOX_BATCH_SIZE=5000",
    )

    latency = sub.add_parser(
        "latency",
        help="commit-to-endpoint latency at a steady rate",
        description="Producers commit transactions at a steady rate while one "
        "`outbox-worker run` ships them; reports p50/p95/p99 from commit to arrival, "
        "and the same for posthog-python's Client at the same rate. The worker's "
        "OUTBOX_* settings come from the environment (try OUTBOX_POLL_INTERVAL or "
        "OUTBOX_NOTIFY=0).",
    )
    _common(latency)
    latency.add_argument("--rate", type=_positive_float, help="events per second (1000)")
    latency.add_argument("--seconds", type=_positive_float, help="how long to produce (20)")
    latency.add_argument(
        "--per-transaction", type=_positive, default=1, help="events per transaction (1)"
    )
    latency.add_argument(
        "--producers",
        type=_positive,
        default=4,
        help="producer threads, each with its own connection, sharing the rate (4)",
    )
    latency.add_argument(
        "--no-client", action="store_true", help="skip the posthog-python Client reference"
    )
    latency.add_argument(
        "--pooler",
        action="store_true",
        help="also poll-only rows: direct with OUTBOX_NOTIFY=0, and through a real PgBouncer "
        "(transaction pooling) with OUTBOX_POOLER=transaction, with their idle cost "
        "(on with --quick)",
    )

    backlog = sub.add_parser(
        "backlog",
        help="drain rate, RSS and table size by backlog size",
        description="Fill a backlog of each size, drain it with one `outbox-worker run "
        "--until-empty`, rotate; reports the rate, the worker's peak RSS and the event "
        "tables' size before, after the drain and after the rotation.",
    )
    _common(backlog)
    backlog.add_argument(
        "--sizes", type=_sizes, help="comma-separated backlog sizes (10000,1000000)"
    )
    backlog.add_argument(
        "--repeat",
        type=_positive,
        help="runs per size of 100,000 or less, median reported (3; 1 with --quick)",
    )

    enqueue = sub.add_parser(
        "enqueue",
        help="what enqueue() adds to an application transaction",
        description="Sequential transactions over one connection, each a small INSERT of "
        "the application's own, with 0, 1 and 10 events; and posthog-python's capture().",
    )
    _common(enqueue)
    enqueue.add_argument(
        "--transactions", type=_positive, help="measured transactions per variant (3000)"
    )

    scaleout = sub.add_parser(
        "scaleout",
        help="1, 2 and 4 workers on one backlog",
        description="Workers already running (`outbox-worker run`) get one backlog "
        "committed at once; reports aggregate events/s and checks that no uuid arrived "
        "twice and none is missing.",
    )
    _common(scaleout)
    scaleout.add_argument("--events", type=_positive, help="backlog size (100000)")
    scaleout.add_argument("--workers", type=_sizes, help="worker counts (1,2,4)")
    scaleout.add_argument(
        "--transactions",
        type=_positive,
        help="transactions the backlog is enqueued in, committed one right after the "
        "other (20; 1: one transaction, which is always one batch)",
    )

    profile = sub.add_parser(
        "profile",
        help="where a draining worker spends its time",
        description="Profile one `outbox-worker run --until-empty` draining a backlog, "
        "with py-spy (sampling, wall clock) or, if py-spy is missing, cProfile.",
    )
    _common(profile)
    profile.add_argument("--events", type=_positive, help="backlog size (100000)")
    profile.add_argument("--gzip", action="store_true", help="OUTBOX_GZIP=1 (default 0)")
    profile.add_argument("--profiler", choices=["auto", "py-spy", "cprofile"], default="auto")

    claims = sub.add_parser(
        "claims",
        help="claim forms in PostgreSQL alone",
        description="Claim a backlog in batches of 1,000 with each claim form (the "
        "snapshot engine's batches, as the worker claims them, and a bare "
        "DELETE..RETURNING), with 1 and 2 claiming processes; no HTTP.",
    )
    _common(claims)
    claims.add_argument("--events", type=_positive, help="events per run (100000)")
    claims.add_argument("--claimers", type=_sizes, help="claiming processes (1,2)")

    storage = sub.add_parser(
        "storage",
        help="WAL, PostgreSQL CPU and size per event, vs a bare INSERT and PgQ",
        description="The same events through a bare INSERT into a minimal table, PgQ "
        "(when the server has the pgq extension) and posthog-outbox (enqueue_many, ticks, "
        "the snapshot engine's batches, rotation), a CHECKPOINT before each phase: WAL "
        "bytes per event by phase, PostgreSQL CPU per event, table size after the drain; "
        "then what one "
        "event and ten cost the application's transaction.",
    )
    _common(storage)
    storage.add_argument("--events", type=_positive, help="events per engine (100000)")
    storage.add_argument(
        "--transactions", type=_positive, help="application transactions per variant (2000)"
    )
    storage.add_argument(
        "--no-ledger",
        action="store_true",
        help="the snapshot engine's drain writes no delivery ledger (as before migration "
        "0009), to measure what the ledger costs",
    )

    gzip = sub.add_parser(
        "gzip",
        help="the worker's drain, gzip off and on, interleaved",
        description="Drain a backlog with one `outbox-worker run --until-empty`, gzip off "
        "and on back to back, --rounds times in alternating order; reports the rate's "
        "median and range and CPU per event (main thread, other threads, endpoint, "
        "PostgreSQL) for each mode, and the on/off ratio of each round.",
    )
    _common(gzip)
    gzip.add_argument("--events", type=_positive, help="events per drain (50000)")
    gzip.add_argument("--rounds", type=_positive, help="pairs of drains (5; 1 with --quick)")

    encode = sub.add_parser(
        "encode",
        help="enqueue's Python per event, orjson vs the json module",
        description="Time what enqueue() and enqueue_many() do in Python before their "
        "statement, per event, with the properties encoded by orjson and by the json "
        "module alone, in interleaved rounds (CPU time, minimum over the rounds).",
    )
    _common(encode)
    encode.add_argument("--rounds", type=_positive, help="rounds (40; 2 with --quick)")

    everything = sub.add_parser(
        "all", help="every command", description="Run every command, in the order listed."
    )
    _common(everything)
    commands = {
        "drain": drain,
        "latency": latency,
        "backlog": backlog,
        "enqueue": enqueue,
        "scaleout": scaleout,
        "profile": profile,
        "claims": claims,
        "storage": storage,
        "gzip": gzip,
        "encode": encode,
    }
    return parser, commands


def _run_drain(ctx: Context, args: argparse.Namespace) -> None:
    from bench import drain

    events = args.events or (drain.QUICK_EVENTS if ctx.quick else drain.DEFAULT_EVENTS)
    drain.run(
        ctx,
        events=events,
        # --quick: the gzip-off table only, to keep the smoke test short.
        gzip_modes=(False,) if args.no_gzip_table or ctx.quick else (False, True),
        with_pgqueuer=not args.no_pgqueuer,
        pgqueuer_batch=args.pgqueuer_batch,
        worker_variants=args.worker_variant,
    )


def _run_latency(ctx: Context, args: argparse.Namespace) -> None:
    from bench import latency

    latency.run(
        ctx,
        rate=args.rate or (latency.QUICK_RATE if ctx.quick else latency.DEFAULT_RATE),
        seconds=args.seconds or (latency.QUICK_SECONDS if ctx.quick else latency.DEFAULT_SECONDS),
        per_transaction=args.per_transaction,
        producers=args.producers,
        with_client=not args.no_client,
        pooler=args.pooler or ctx.quick,
    )


def _run_backlog(ctx: Context, args: argparse.Namespace) -> None:
    from bench import backlog

    backlog.run(
        ctx,
        sizes=args.sizes or (backlog.QUICK_SIZES if ctx.quick else backlog.DEFAULT_SIZES),
        repeat=args.repeat or (1 if ctx.quick else backlog.DEFAULT_REPEAT),
    )


def _run_enqueue(ctx: Context, args: argparse.Namespace) -> None:
    from bench import enqueue

    enqueue.run(
        ctx,
        transactions=args.transactions
        or (enqueue.QUICK_TRANSACTIONS if ctx.quick else enqueue.DEFAULT_TRANSACTIONS),
    )


def _run_scaleout(ctx: Context, args: argparse.Namespace) -> None:
    from bench import scaleout

    scaleout.run(
        ctx,
        events=args.events or (scaleout.QUICK_EVENTS if ctx.quick else scaleout.DEFAULT_EVENTS),
        workers=args.workers or list(scaleout.DEFAULT_WORKERS),
        transactions=args.transactions or scaleout.DEFAULT_TRANSACTIONS,
    )


def _run_profile(ctx: Context, args: argparse.Namespace) -> None:
    from bench import profile

    profile.run(
        ctx,
        events=args.events or (profile.QUICK_EVENTS if ctx.quick else profile.DEFAULT_EVENTS),
        gzip=args.gzip,
        profiler=args.profiler,
    )


def _run_claims(ctx: Context, args: argparse.Namespace) -> None:
    from bench import claims

    claims.run(
        ctx,
        events=args.events or (claims.QUICK_EVENTS if ctx.quick else claims.DEFAULT_EVENTS),
        claimers=args.claimers or list(claims.DEFAULT_CLAIMERS),
    )


def _run_storage(ctx: Context, args: argparse.Namespace) -> None:
    from bench import storage

    storage.run(
        ctx,
        events=args.events or (storage.QUICK_EVENTS if ctx.quick else storage.DEFAULT_EVENTS),
        app_transactions=args.transactions
        or (storage.QUICK_APP_TRANSACTIONS if ctx.quick else storage.DEFAULT_APP_TRANSACTIONS),
        ledger=not args.no_ledger,
    )


def _run_gzip(ctx: Context, args: argparse.Namespace) -> None:
    from bench import gzipab

    gzipab.run(
        ctx,
        events=args.events or (gzipab.QUICK_EVENTS if ctx.quick else gzipab.DEFAULT_EVENTS),
        rounds=args.rounds or (gzipab.QUICK_ROUNDS if ctx.quick else gzipab.DEFAULT_ROUNDS),
    )


def _run_encode(ctx: Context, args: argparse.Namespace) -> None:
    from bench import encode

    encode.run(
        ctx, rounds=args.rounds or (encode.QUICK_ROUNDS if ctx.quick else encode.DEFAULT_ROUNDS)
    )


COMMANDS: dict[str, Callable[[Context, argparse.Namespace], None]] = {
    "drain": _run_drain,
    "latency": _run_latency,
    "backlog": _run_backlog,
    "enqueue": _run_enqueue,
    "scaleout": _run_scaleout,
    "profile": _run_profile,
    "claims": _run_claims,
    "storage": _run_storage,
    "gzip": _run_gzip,
    "encode": _run_encode,
}


def _with_defaults(
    command: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.Namespace:
    """A command's namespace with its own defaults and the shared options of ``args``."""
    defaults = command.parse_args([])
    defaults.quick, defaults.database_url = args.quick, args.database_url
    defaults.markdown, defaults.keep_logs = args.markdown, args.keep_logs
    return defaults


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    if not arguments or (arguments[0].startswith("-") and arguments[0] not in ("-h", "--help")):
        # No command: the drain comparison, or with --quick alone, everything at tiny sizes.
        implicit = "all" if "--quick" in arguments else "drain"
        arguments = [implicit, *arguments]
    args = parser.parse_args(arguments)
    # SIGTERM cleans up like Ctrl-C does: children stopped, scratch databases dropped.
    signal.signal(signal.SIGTERM, _terminated)
    if args.command == "all":
        plan = [(name, _with_defaults(commands[name], args)) for name in COMMANDS]
    else:
        plan = [(args.command, args)]
    try:
        with context(
            args.database_url, markdown=args.markdown, quick=args.quick, keep_logs=args.keep_logs
        ) as ctx:
            for name, command_args in plan:
                started = time.monotonic()
                try:
                    COMMANDS[name](ctx, command_args)
                except BenchFailed as exc:
                    ctx.fail(f"{name}: {exc}")
                ctx.out.progress(f"{name} took {time.monotonic() - started:.1f}s")
            if ctx.failures:
                print(f"\n{len(ctx.failures)} measurement(s) failed:", file=sys.stderr)
                for failure in ctx.failures:
                    print(f"  - {failure}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        print(
            "\ninterrupted: stopped every process and dropped the scratch databases",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
