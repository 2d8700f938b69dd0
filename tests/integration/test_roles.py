"""Least privilege: the application may only INSERT events; the worker may not write
anything but the outbox. (Grants are those documented in docs/operations.md.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

import outbox
from worker.drain import Drainer
from worker.settings import Settings
from worker.sinks import MemorySink
from worker.store import Store

APP_GRANTS = """
GRANT USAGE ON SCHEMA public TO {app};
GRANT INSERT (uuid, event, distinct_id, properties, "timestamp", destination)
    ON outbox_events TO {app};
GRANT EXECUTE ON FUNCTION
    outbox_enqueue_keyed(uuid, text, text, jsonb, text, timestamptz, text),
    outbox_enqueue_keyed_rows(jsonb)
    TO {app};
"""
WORKER_GRANTS = """
GRANT USAGE ON SCHEMA public TO {worker};
GRANT SELECT ON outbox_events TO {worker};
GRANT UPDATE (status, attempts, next_attempt_at, last_error) ON outbox_events TO {worker};
GRANT EXECUTE ON FUNCTION
    outbox_ack(bigint[], double precision),
    outbox_purge_dead(double precision),
    outbox_expire_dedup_keys(integer)
    TO {worker};
GRANT SELECT ON outbox_stuck TO {worker};
"""


@pytest.fixture
def roles(db: psycopg.Connection[Any]) -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    app, worker = f"outbox_app_{suffix}", f"outbox_worker_{suffix}"
    db.execute(f"CREATE ROLE {app} LOGIN")
    db.execute(f"CREATE ROLE {worker} LOGIN")
    db.execute(APP_GRANTS.format(app=app))
    db.execute(WORKER_GRANTS.format(worker=worker))
    yield app, worker
    for role in (app, worker):
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")


def test_the_application_role_can_only_insert(
    database_url: str, db: psycopg.Connection[Any], roles: tuple[str, str]
) -> None:
    app, _ = roles
    with psycopg.connect(database_url) as conn:
        conn.execute(f"SET ROLE {app}")
        plain = outbox.enqueue(conn, "signup", "user-1", {"plan": "free"})
        keyed = outbox.enqueue(conn, "signup", "user-1", dedup_key="signup:user-1")
        duplicate = outbox.enqueue(conn, "signup", "user-1", dedup_key="signup:user-1")
        many = outbox.enqueue_many(conn, [{"event": "a", "distinct_id": "u"}] * 3)
        conn.commit()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM outbox_events")
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM outbox_events")
    assert plain is not None and keyed is not None and duplicate is None
    assert all(many)
    assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (5,)


def test_the_worker_role_can_drain(
    database_url: str, db: psycopg.Connection[Any], roles: tuple[str, str]
) -> None:
    _, worker = roles
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, "signup", "user-1", dedup_key="k")
        outbox.enqueue(conn, "signup", "user-2")
        conn.commit()
    separator = "&" if "?" in database_url else "?"
    as_worker = f"{database_url}{separator}options={quote(f'-c role={worker}')}"
    sink = MemorySink()
    settings = Settings(database_url=as_worker)
    Drainer(Store(as_worker), sink, settings).drain()
    assert len(sink.events) == 2
    assert db.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,)
    with psycopg.connect(as_worker) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (worker,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE nope (id int)")
