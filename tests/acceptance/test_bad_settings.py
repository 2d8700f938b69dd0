"""The real ``outbox-worker``: every setting or argument it cannot use ends it with
status 2 and one line on stderr naming it: no traceback, no password, before any work.
Whatever it prints from event data is terminal-safe."""

from __future__ import annotations

import json
import socket
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

import outbox
from tests.acceptance.test_worker_process import WORKER, run_cli
from tests.conftest import move_to_retry, worker_env
from worker.database import libpq_url, sqlalchemy_url
from worker.testing import CaptureServer

PW = "hunter2-s3cret"


def assert_one_line_naming(result: subprocess.CompletedProcess[str], name: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    err = result.stderr
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("outbox-worker"), err
    assert f"error: {name}" in err, err
    assert "Traceback" not in err
    assert PW not in err and PW not in result.stdout
    return err


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OUTBOX_DEDUP_WINDOW", "inf"),
        ("OUTBOX_LEASE_SECONDS", "nan"),
        ("OUTBOX_LEASE_SECONDS", "inf"),
        ("OUTBOX_REQUEST_TIMEOUT", "nan"),
        ("OUTBOX_POLL_INTERVAL", "nan"),
        ("OUTBOX_POLL_INTERVAL", "inf"),
        ("OUTBOX_BATCH_SIZE", "99999999999999999999"),
        ("OUTBOX_LOG_LEVEL", "bogus"),
        ("OUTBOX_MAX_ATTEMPTS", "0"),
        ("OUTBOX_BACKOFF_MAX", "-1"),
        ("OUTBOX_SHUTDOWN_GRACE", "1e400"),
        ("OUTBOX_METRICS_PORT", "65536"),
        ("OUTBOX_WORKER_ID", "w\x1b]0;title\x07"),
    ],
)
@pytest.mark.parametrize("until_empty", [False, True], ids=["run", "until-empty"])
def test_a_bad_variable_stops_run_with_one_line(
    variable: str, value: str, until_empty: bool, database_url: str
) -> None:
    env = worker_env(database_url, **{variable: value})
    args = ["run", "--until-empty"] if until_empty else ["run"]
    err = assert_one_line_naming(run_cli(env, *args, timeout=30), variable)
    assert "\x1b" not in err and "\x07" not in err


@pytest.mark.parametrize(
    "url",
    [
        "postgres://::::",
        f"postgresql//app:{PW}@127.0.0.1:5432/app",
        f"app:{PW}@127.0.0.1:5432/app",
        f"postgresql://app:{PW}@[::1/app",
        f"postgresql://app:{PW}@127.0.0.1:5432/app?sslmode=bogus",
        f"host=127.0.0.1 password={PW} port=nope",
        f"host=127.0.0.1 password='{PW}",
    ],
)
def test_a_malformed_database_url_stops_run_with_its_password_masked(url: str) -> None:
    env = worker_env(url)
    assert_one_line_naming(run_cli(env, "run", timeout=30), "DATABASE_URL")
    # The same through the flag, named as the flag.
    env = worker_env("postgresql://postgres@127.0.0.1:1/unused")
    assert_one_line_naming(run_cli(env, "run", "--database-url", url, timeout=30), "--database-url")


@pytest.mark.parametrize("until_empty", [False, True], ids=["run", "until-empty"])
def test_a_lease_not_above_twice_the_request_timeout_is_an_error(
    until_empty: bool, database_url: str
) -> None:
    env = worker_env(database_url, OUTBOX_LEASE_SECONDS="30", OUTBOX_REQUEST_TIMEOUT="15")
    args = ["run", "--until-empty"] if until_empty else ["run"]
    err = assert_one_line_naming(run_cli(env, *args, timeout=30), "OUTBOX_LEASE_SECONDS")
    assert "more than twice OUTBOX_REQUEST_TIMEOUT" in err
    env = worker_env(database_url, OUTBOX_REQUEST_TIMEOUT="15")
    assert_one_line_naming(run_cli(env, *args, "--lease-seconds", "20", timeout=30), "--lease")


def test_a_metrics_port_in_use_is_one_line_naming_it(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = worker_env(database_url, OUTBOX_METRICS_PORT=str(port))
        err = assert_one_line_naming(run_cli(env, "run", timeout=30), "OUTBOX_METRICS_PORT")
    assert "already in use" in err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["retry", "--id", "99999999999999999999999"], "--id"),
        (["dead", "--limit", "-1"], "--limit"),
        (["purge", "--dead", "--older-than", "99999999999999999999999w"], "argument --older-than"),
        (["run", "--batch-size", "99999999999999999999"], "--batch-size"),
        (["run", "--metrics-port", "-1"], "--metrics-port"),
    ],
)
def test_arguments_out_of_range_are_one_line_naming_them(
    args: list[str], named: str, database_url: str
) -> None:
    assert_one_line_naming(run_cli(worker_env(database_url), *args), named)


def test_a_non_utf8_event_argument_is_one_line(database_url: str) -> None:
    result = subprocess.run(
        [*WORKER, "dead", "--event", b"sign\xffup"],
        env=worker_env(database_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "not valid UTF-8" in assert_one_line_naming(result, "--event")


@pytest.fixture
def role_without_rights(empty_database: str) -> Iterator[str]:
    """A URL to ``empty_database`` as a role that may connect but create nothing."""
    role = f"outbox_norights_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC, {}").format(sql.Identifier(role))
        )
    url = make_url(sqlalchemy_url(empty_database)).set(username=role, password=PW)
    yield libpq_url(url.render_as_string(hide_password=False))
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_migrate_under_a_role_without_rights_is_one_line(role_without_rights: str) -> None:
    result = run_cli(worker_env(role_without_rights), "migrate")
    err = assert_one_line_naming(result, "migrate failed")
    assert "permission denied" in err and "lacks a privilege" in err


def test_no_password_in_any_line_of_a_running_worker(
    database_url: str, capture: CaptureServer
) -> None:
    # The test server trusts local connections, so the password is sent and ignored.
    url = make_url(sqlalchemy_url(database_url)).set(password=PW)
    with_password = libpq_url(url.render_as_string(hide_password=False))
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, "signup", "user-1")
        conn.commit()
    env = worker_env(with_password, capture, OUTBOX_LOG_LEVEL="DEBUG")
    result = run_cli(env, "run", "--until-empty")
    assert result.returncode == 0, result.stderr
    assert "until_empty_done" in result.stderr
    assert PW not in result.stderr and PW not in result.stdout
    assert "phc_test" not in result.stderr
    # An unreachable server: one line, the database named without its password.
    unreachable = f"postgresql://app:{PW}@127.0.0.1:1/app"
    err = assert_one_line_naming(run_cli(worker_env(unreachable), "status"), "cannot connect")
    assert "app@127.0.0.1:1/app" in err


# -- terminal safety of what the CLI prints from event data ---------------------------

NAME = "signup\n2026-01-01  page_viewed  forged\x1b[2J\x1b]0;pwned\x07"
DISTINCT = "user\r\x1b[31m-1\u202e"
ERROR = "HTTP 400: \x1b[H\x1b[2Jbad\nrow"


@pytest.fixture
def hostile_rows(database_url: str, db: psycopg.Connection[Any]) -> None:
    with psycopg.connect(database_url) as conn:
        first, *rest = outbox.enqueue_many(conn, [{"event": "e", "distinct_id": "u"}] * 3)
        conn.commit()
    # What older versions, other writers or a server's answer may have stored: one
    # retrying, two dead.
    for status, uuids in (("pending", [first]), ("dead", rest)):
        moved = move_to_retry(
            database_url,
            uuids,
            status=status,
            attempts=3,
            last_error=ERROR,
            event=NAME,
            distinct_id=DISTINCT,
        )
        assert moved == len(uuids)


def assert_terminal_safe(out: str) -> None:
    for raw in ("\x1b", "\x07", "\r", "\u202e"):
        assert raw not in out
    assert "signup\\n2026-01-01  page_viewed  forged\\x1b[2J\\x1b]0;pwned\\x07" in out
    assert not any(line.startswith("2026-01-01") for line in out.splitlines())


def test_dead_and_status_escape_event_data(database_url: str, hostile_rows: None) -> None:
    env = worker_env(database_url)
    dead = run_cli(env, "dead")
    assert dead.returncode == 0, dead.stderr
    assert_terminal_safe(dead.stdout)
    assert len(dead.stdout.splitlines()) == 3  # the header and two rows
    assert "user\\r\\x1b[31m-1\\u202e" in dead.stdout
    assert "HTTP 400: \\x1b[H\\x1b[2Jbad\\nrow" in dead.stdout
    status = run_cli(env, "status")
    assert status.returncode == 0, status.stderr
    assert_terminal_safe(status.stdout)


def test_json_output_stays_exact(database_url: str, hostile_rows: None) -> None:
    env = worker_env(database_url)
    dead = run_cli(env, "dead", "--json")
    rows = json.loads(dead.stdout)
    assert {(r["event"], r["distinct_id"], r["last_error"]) for r in rows} == {
        (NAME, DISTINCT, ERROR)
    }
    assert "\x1b" not in dead.stdout  # JSON escapes it
    report = json.loads(run_cli(env, "status", "--json").stdout)
    assert report["top_dead"] == [{"event": NAME, "count": 2}]
