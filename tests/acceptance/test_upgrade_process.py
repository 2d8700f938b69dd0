"""The upgrade to the snapshot engine as an operator runs it: the old workers stopped,
`outbox-worker migrate` (revision 0007), the new worker started. The old table's
backlog is delivered once per event, what was waiting or dead stays so, and what the
new tables refuse is buried with its reason, never lost."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import Any

import psycopg
from psycopg import sql

import outbox
from outbox import install
from tests.acceptance.test_worker_process import enqueue_n, run_cli
from tests.conftest import (
    CHECKS_0004,
    make_retries_due,
    pend_a_migration_that_alters_outbox_events,
    undelivered,
    worker_env,
)
from worker.testing import CaptureServer

# Rows of the old table that no event table would take (written before migration
# 0004's constraints, or by hand): the columns, and what the migration says of them.
BROKEN = {
    "array": ({"properties": "'[\"a\"]'"}, "properties: is a JSON array, not an object"),
    "infinity": ({"timestamp": "'infinity'"}, "timestamp: infinity is not a finite time"),
    "no user": ({"distinct_id": "''"}, "distinct_id: is empty"),
}


def old_row(columns: dict[str, str]) -> str:
    """An INSERT into the old table (as the old library wrote, or by hand)."""
    values = {
        "uuid": "gen_random_uuid()",
        "event": "'page_viewed'",
        "distinct_id": "'user-old'",
        "properties": "'{}'",
        **columns,
    }
    names = ", ".join(f'"{name}"' for name in values)
    return f"INSERT INTO outbox_events ({names}) VALUES ({', '.join(values.values())})"


def test_an_upgrade_with_a_backlog_delivers_each_event_once(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer
) -> None:
    # The database as revision 0006 left it, the old table in use; its rows predate
    # 0004's constraints (the migration must move what they would have refused too).
    pend_a_migration_that_alters_outbox_events(database_url)
    for name in CHECKS_0004:
        db.execute(
            sql.SQL("ALTER TABLE outbox_events DROP CONSTRAINT IF EXISTS {}").format(
                sql.Identifier(name)
            )
        )
    fresh = [str(uuid.uuid4()) for _ in range(100)]
    for i, u in enumerate(fresh):
        db.execute(old_row({"uuid": f"'{u}'", "properties": f"'{{\"i\": {i}}}'"}))
    retrying = [str(uuid.uuid4()) for _ in range(5)]
    for u in retrying:  # tried twice, due again
        db.execute(
            old_row(
                {
                    "uuid": f"'{u}'",
                    "attempts": "2",
                    "next_attempt_at": "now() - interval '1 minute'",
                    "last_error": "'HTTP 503: try later'",
                }
            )
        )
    deferred = [str(uuid.uuid4()) for _ in range(2)]
    for u in deferred:  # held back for an hour (a 429's Retry-After, say)
        db.execute(old_row({"uuid": f"'{u}'", "next_attempt_at": "now() + interval '1 hour'"}))
    dead = {str(uuid.uuid4()): "HTTP 400: bad" for _ in range(3)}
    for u, error in dead.items():
        db.execute(
            old_row(
                {"uuid": f"'{u}'", "status": "'dead'", "attempts": "24", "last_error": f"'{error}'"}
            )
        )
    for columns, error in BROKEN.values():
        u = str(uuid.uuid4())
        db.execute(old_row({**columns, "uuid": f"'{u}'"}))
        dead[u] = f"{error} (found by migration 0007)"
    # A keyed event through the old enqueue function: its key stays held.
    keyed = str(uuid.uuid4())
    db.execute(
        "SELECT outbox_enqueue_keyed(%s, 'order_paid', 'user-old', '{}', NULL, NULL, 'order-1')",
        (keyed,),
    )

    env = worker_env(database_url, capture, OUTBOX_BATCH_SIZE="40")
    migrated = run_cli(env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert f"upgraded the outbox tables from revision 0006 to {install.head()}" in migrated.stdout
    assert db.execute(
        "SELECT relkind FROM pg_class WHERE relname = 'outbox_events'"
    ).fetchone() == ("v",)
    # Nothing lost in the move: every row is an undelivered event, as it was.
    assert undelivered(database_url) == 100 + 5 + 2 + len(dead) + 1
    assert undelivered(database_url, "status = 'dead'") == len(dead)
    assert undelivered(database_url, "attempts = 2") == 5

    # The application, upgraded too, keeps enqueueing; the key is still held.
    with psycopg.connect(database_url) as conn:
        assert outbox.enqueue(conn, "order_paid", "user-old", dedup_key="order-1") is None
    later = enqueue_n(database_url, 20)

    result = run_cli(env, "run", "--until-empty")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    counts = Counter(capture.uuids())
    assert set(counts) == {*fresh, *retrying, keyed, *later}
    assert set(counts.values()) == {1}  # each exactly once
    # What waited still waits; what was dead is dead, with its reason.
    assert undelivered(database_url, "status = 'pending'") == 2
    assert undelivered(database_url, "status = 'pending' AND next_attempt_at > now()") == 2
    listed = run_cli(env, "dead", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {r["uuid"]: r["last_error"] for r in json.loads(listed.stdout)} == dead

    # Once their time comes, the deferred ones go too; the key's window has started.
    assert make_retries_due(database_url) == 2
    again = run_cli(env, "run", "--until-empty")
    assert again.returncode == 0, again.stderr
    assert Counter(capture.uuids()) == Counter({*fresh, *retrying, keyed, *later, *deferred})
    assert undelivered(database_url) == len(dead)
    with psycopg.connect(database_url) as conn:
        assert outbox.enqueue(conn, "order_paid", "user-old", dedup_key="order-1") is None
