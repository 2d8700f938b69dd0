"""The CLI's own output: one-line argument errors, log lines and tables that are
terminal-safe and show no secret."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator

import pytest

from worker.cli import LOG_LINE_LIMIT, build_parser, parse_duration, parse_since, setup_logging
from worker.commands import _table

PW = "hunter2-s3cret"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["retry", "--id", "99999999999999999999999"], "--id=99999999999999999999999 must be"),
        (["retry", "--id", "0"], "--id=0 must be from 1 to 9223372036854775807"),
        (["retry", "--id", "x"], "--id=x is not a whole number"),
        (["dead", "--limit", "-1"], "--limit=-1 must be from 1 to 10000"),
        (["dead", "--limit", "100001"], "--limit=100001 must be from 1 to 10000"),
        (["dead", "--event", "e" * 201], "--event is 201 characters long"),
        (["dead", "--event", "bad\udcff"], "--event is not valid UTF-8"),
        (["purge", "--dead", "--older-than", "99999999999999999999999w"], "--older-than"),
        (["purge", "--dead", "--older-than", "7 days"], "--older-than"),
        (["ledger", "--since", "7 days"], "--since=7 days is not a number of days like 7d"),
        (["ledger", "--since", "0d"], "--since=0d must be from 1d to 36500d"),
        (["ledger", "--since", "36501d"], "--since=36501d must be from 1d to 36500d"),
        (["ledger", "--since", "2026-02-30"], "--since=2026-02-30 is not a number of days"),
        (["ledger", "--since", "\x1b[2J"], "--since=\\x1b[2J is not"),
        (["ledger", "--event", "e" * 201], "--event is 201 characters long"),
        (["run", "--batch-size", "0"], "--batch-size=0 must be from 1 to 100000"),
        (["run", "--poll-interval", "nan"], "--poll-interval=nan must be a finite number"),
        (["run", "--lease-seconds", "inf"], "--lease-seconds=inf must be a finite number"),
        (["run", "--metrics-port", "65536"], "--metrics-port=65536 must be from 0 to 65535"),
        (["run", "--sink", "kafka"], "--sink=kafka is not one of auto, posthog or stdout"),
        (["run", "--log-level", "bogus"], "--log-level=bogus is not one of DEBUG"),
        (["--database-url", f"postgresql//u:{PW}@h/db", "status"], "--database-url is not"),
        (["status", "--database-url", f"u:{PW}@h/db"], "--database-url is not"),
        (["migrate", f"postgresql://u:{PW}@h/db"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_argument(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert named in err, err
    assert PW not in err and "Traceback" not in err and "usage:" not in err


def test_since_is_a_first_day() -> None:
    today = datetime.date(2026, 12, 2)
    assert parse_since("1d", today=today) == today
    assert parse_since("7d", today=today) == datetime.date(2026, 11, 26)
    assert parse_since(" 30d ", today=today) == datetime.date(2026, 11, 3)
    assert parse_since("2026-01-31", today=today) == datetime.date(2026, 1, 31)
    args = build_parser().parse_args(["ledger", "--since", "2026-11-01", "--json"])
    assert (args.since, args.json, args.event) == (datetime.date(2026, 11, 1), True, None)


def test_durations_are_bounded() -> None:
    assert parse_duration("5200w") == 5200 * 604800
    with pytest.raises(Exception, match="longer than 36500 days"):
        parse_duration("5300w")


def test_log_lines_are_one_line_escaped_bounded_and_masked(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", secrets=[PW, "phc_key"])
    log = logging.getLogger("outbox.worker")
    log.warning(
        "event %s refused: %s",
        "evil\n2026-01-01 INFO [forged] line\x1b]0;title\x07",
        f"postgresql://u:{PW}@db/app key=phc_key",
        extra={"action": "event_rejected", "uuid": "u\x1b[2J"},
    )
    log.info("x" * 10_000, extra={"action": "long"})
    try:
        raise ValueError(f"boom at postgresql://u:{PW}@db and \x1b[31mred")
    except ValueError:
        log.exception("failed", extra={"action": "drain_error"})
    err = capsys.readouterr().err
    lines = err.splitlines()
    forged = "evil\\n2026-01-01 INFO [forged] line\\x1b]0;title\\x07"
    assert f"[event_rejected] event {forged}" in lines[0]
    assert lines[0].endswith("uuid=u\\x1b[2J")
    assert "postgresql://u:***@db/app key=***" in lines[0]
    assert len(lines[1]) == LOG_LINE_LIMIT and lines[1].endswith("...")
    assert lines[2].endswith("[drain_error] failed")
    assert lines[3] == "Traceback (most recent call last):"  # a traceback keeps its lines
    assert lines[-1] == "ValueError: boom at postgresql://u:***@db and \\x1b[31mred"
    assert PW not in err and "phc_key" not in err and "\x1b" not in err and "\x07" not in err


def test_tables_escape_every_cell(capsys: pytest.CaptureFixture[str]) -> None:
    _table(
        ["event", "distinct_id", "last_error"],
        [("signup\n| forged | row |", "\x1b[2Juser", "e" * 500)],
        limits={2: 20},
    )
    out = capsys.readouterr().out
    assert out.count("\n") == 2
    assert "signup\\n| forged | row |" in out and "\\x1b[2Juser" in out
    assert "\x1b" not in out
    assert out.splitlines()[1].endswith("e" * 17 + "...")
