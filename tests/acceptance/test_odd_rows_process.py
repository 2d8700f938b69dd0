"""The real ``outbox-worker`` delivers ordinary events around rows it cannot send, in a
database whose TimeZone is not UTC, and buries those rows with an error naming the
problem (issue 10: two such rows used to stop every claim, forever)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg

from tests.acceptance.test_worker_process import enqueue_n, run_cli
from tests.conftest import worker_env
from tests.integration.test_odd_rows import (
    as_role,
    drop_constraints,
    insert_sql,
    set_timezone,
)
from tests.integration.test_roles import APP_GRANTS
from worker.database import migrate
from worker.testing import CaptureServer

ODD = {
    "datetime.max": (
        {"timestamp": "'9999-12-31 23:59:59.999999+00'"},
        "timestamp: 9999-12-31 23:59:59.999999 UTC is more than 23 hours ahead",
    ),
    "infinity": ({"timestamp": "'infinity'"}, "timestamp: infinity is not a finite time"),
    "array": ({"properties": "'[\"a\"]'"}, "properties: is a JSON array, not an object"),
    "no user": (
        {"distinct_id": "''", "event": "E'\\x1b[2Jcleared'"},  # a terminal escape
        "distinct_id: is empty or only whitespace",
    ),
}


def test_the_worker_ships_around_rows_it_cannot_send(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    set_timezone(db, database_url, "Europe/Berlin")
    drop_constraints(db)  # rows written before migration 0004
    app = f"outbox_app_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {app}")
    db.execute(APP_GRANTS.format(app=app))
    try:
        uuids = enqueue_n(database_url, 75)
        expected: dict[str, str] = {}
        with psycopg.connect(as_role(database_url, app), autocommit=True) as conn:
            for columns, error in ODD.values():
                row_uuid = str(uuid.uuid4())
                conn.execute(insert_sql({**columns, "uuid": f"'{row_uuid}'"}))
                expected[row_uuid] = error
        uuids |= enqueue_n(database_url, 75)
    finally:
        db.execute(f"DROP OWNED BY {app}")
        db.execute(f"DROP ROLE {app}")

    env = worker_env(database_url, capture, OUTBOX_BATCH_SIZE="40")
    result = run_cli(env, "run", "--until-empty")
    assert result.returncode == 1, result.stderr  # some events went dead
    assert "Traceback" not in result.stderr
    assert set(capture.uuids()) == uuids and len(capture.uuids()) == 150
    invalid = [line for line in result.stderr.splitlines() if "[event_invalid]" in line]
    assert len(invalid) == len(ODD)
    for row_uuid, error in expected.items():
        assert any(f"uuid={row_uuid}" in line and error in line for line in invalid), error

    dead = run_cli(env, "dead", "--json")
    assert dead.returncode == 0, dead.stderr
    errors = {r["uuid"]: r["last_error"] for r in json.loads(dead.stdout)}
    assert set(errors) == set(expected)
    assert all(expected[u] in errors[u] for u in expected)
    listed = run_cli(env, "dead")
    assert listed.returncode == 0 and "\\x1b[2Jcleared" in listed.stdout
    assert "\x1b" not in listed.stdout  # shown escaped, never sent to the terminal
    table = run_cli(env, "status")
    assert table.returncode == 0 and "is not a finite time" in table.stdout
    assert "\x1b" not in table.stdout
    retry = run_cli(env, "retry", "--all")
    assert retry.returncode == 0
    assert "requeued 0" in retry.stdout and f"left {len(ODD)} dead" in retry.stdout
    assert f"purged {len(ODD)}" in run_cli(env, "purge", "--dead", "--older-than", "0s").stdout
    assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,)


def test_the_worker_refuses_a_schema_before_0007_in_one_line(empty_database: str) -> None:
    migrate(empty_database, "0003")
    for command in ("run", "status"):
        result = run_cli(worker_env(empty_database), command)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        last = result.stderr.splitlines()[-1]
        assert "migration 0007 is missing" in last and "outbox-worker migrate" in last
