"""Migration 0008: the tick and the rotation no longer read every row from the oldest
open transaction's id; what they decide is the same."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from worker.database import downgrade, migrate
from worker.storage.snapshot import SnapshotEngine, insert_events

FUNCTIONS = ("outbox_snapshot_tick", "outbox_snapshot_rotate")


def _definitions(url: str) -> dict[str, tuple[str, Any]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT proname, pg_get_functiondef(oid), proacl FROM pg_proc WHERE proname = ANY(%s)",
            (list(FUNCTIONS),),
        ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def _events(n: int) -> list[dict[str, Any]]:
    return [{"uuid": uuid.uuid4(), "event": "e", "distinct_id": "u"} for _ in range(n)]


def test_0008_redefines_the_two_functions_and_downgrade_puts_0006s_back(
    empty_database: str,
) -> None:
    migrate(empty_database, "0007")
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("CREATE ROLE outbox_0008_worker")
        try:
            conn.execute(f"GRANT EXECUTE ON FUNCTION {FUNCTIONS[0]}(integer) TO outbox_0008_worker")
            before = _definitions(empty_database)
            assert migrate(empty_database, "0008") == ["0008"]
            after = _definitions(empty_database)
            for name in FUNCTIONS:
                assert after[name][0] != before[name][0], name
                assert "txid_snapshot_xmin" not in after[name][0], name
                assert after[name][1] == before[name][1], name  # grants kept
            assert downgrade(empty_database, "0007") == ["0008"]
            assert _definitions(empty_database) == before
            assert migrate(empty_database, "0008") == ["0008"]
        finally:
            conn.execute(f"REVOKE ALL ON FUNCTION {FUNCTIONS[0]}(integer) FROM outbox_0008_worker")
            conn.execute("DROP ROLE outbox_0008_worker")


def test_ticks_and_rotation_beside_a_transaction_left_open(database_url: str) -> None:
    """A transaction open all along (holding every snapshot's xmin back) and one that
    writes events and commits between ticks: each event is delivered once, an idle
    tick takes none, and the table is truncated once all of it is delivered."""
    with (
        psycopg.connect(database_url, autocommit=True) as conn,
        psycopg.connect(database_url) as idle,
        psycopg.connect(database_url) as slow,
    ):
        idle.execute("SELECT txid_current()")  # open, with an id, until the end
        engine = SnapshotEngine(conn)
        sent: list[uuid.UUID] = []

        def drain() -> None:
            while (batch := engine.claim(30)) is not None:
                while True:
                    part = engine.read(batch, 7)
                    upto = part.events[-1] if part.events else None
                    assert engine.advance(batch, upto, last=part.last, delivered=part.events)
                    sent.extend(e.uuid for e in part.events)
                    if part.last:
                        break

        late = _events(5)
        insert_events(slow, late, table=2)  # in progress across the next ticks
        expected = [e["uuid"] for e in late]
        for _ in range(3):
            events = _events(20)
            with psycopg.connect(database_url) as app:
                insert_events(app, events, table=2)
            expected += [e["uuid"] for e in events]
            drain()
        assert engine.tick() is None  # nothing new: no tick
        assert engine.rotate(current=True) == 0  # the slow transaction's rows are open
        slow.commit()
        # Committed after the last tick, so not delivered yet: the table stays.
        assert engine.rotate(current=True) == 0
        drain()
        assert sorted(sent) == sorted(expected)
        assert len(sent) == len(set(sent))
        assert engine.tick() is None
        assert engine.rotate(current=True) == 1
        row = conn.execute("SELECT count(*) FROM outbox_events_2").fetchone()
        assert row == (0,)
