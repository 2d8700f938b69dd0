"""The real ``outbox-worker`` delivers ordinary events around rows it cannot send, in a
database whose TimeZone is not UTC, and buries those rows with an error naming the
problem (issue 10: two such rows used to stop every claim, forever). On the snapshot
engine the event tables' constraints refuse nearly everything odd; what they let in
(a timestamp days ahead) is buried by the claim, and what they refuse can only be a
dead row of ``outbox_retry`` (as migration 0007 files the old table's), which every
command shows and ``retry`` leaves dead."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from tests.acceptance.test_worker_process import enqueue_n, run_cli
from tests.conftest import worker_env
from tests.integration.test_odd_rows import (
    AHEAD,
    as_role,
    dead_sql,
    insert_sql,
    set_timezone,
    slot,
)
from tests.integration.test_roles import APP_GRANTS
from worker.database import migrate
from worker.testing import CaptureServer

# Dead rows no event table would hold, each with what its error says.
ODD_DEAD = {
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
    app = f"outbox_app_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {app}")
    db.execute(APP_GRANTS.format(app=app))
    ahead = str(uuid.uuid4())
    try:
        uuids = enqueue_n(database_url, 75)
        with psycopg.connect(as_role(database_url, app), autocommit=True) as conn:
            conn.execute(insert_sql({**AHEAD[0], "uuid": f"'{ahead}'"}, slot(db)))
        uuids |= enqueue_n(database_url, 75)
    finally:
        db.execute(f"DROP OWNED BY {app}")
        db.execute(f"DROP ROLE {app}")
    expected = {ahead: AHEAD[1]}
    for columns, error in ODD_DEAD.values():
        row_uuid = str(uuid.uuid4())
        db.execute(dead_sql({**columns, "uuid": f"'{row_uuid}'"}, error))
        expected[row_uuid] = error

    env = worker_env(database_url, capture, OUTBOX_BATCH_SIZE="40")
    result = run_cli(env, "run", "--until-empty")
    assert result.returncode == 1, result.stderr  # an event went dead
    assert "Traceback" not in result.stderr
    assert set(capture.uuids()) == uuids and len(capture.uuids()) == 150
    invalid = [line for line in result.stderr.splitlines() if "[event_invalid]" in line]
    assert len(invalid) == 1
    assert f"uuid={ahead}" in invalid[0] and AHEAD[1] in invalid[0]

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
    # The one ahead could be sent one day; the others never.
    assert "requeued 1" in retry.stdout and f"left {len(ODD_DEAD)} dead" in retry.stdout
    purged = run_cli(env, "purge", "--dead", "--older-than", "0s").stdout
    assert f"purged {len(ODD_DEAD)}" in purged
    assert db.execute("SELECT uuid::text, status FROM outbox_events").fetchall() == [
        (ahead, "pending")
    ]


@pytest.mark.parametrize("revision", ["0003", "0006"])
def test_the_worker_refuses_a_schema_before_0007_in_one_line(
    revision: str, empty_database: str
) -> None:
    # At 0006 the snapshot engine's tables exist, but the events are still in the old
    # table: a worker that ran there would deliver nothing and say nothing.
    migrate(empty_database, revision)
    for command in ("run", "status"):
        result = run_cli(worker_env(empty_database), command)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        last = result.stderr.splitlines()[-1]
        assert "migration 0007 is missing" in last and "outbox-worker migrate" in last
