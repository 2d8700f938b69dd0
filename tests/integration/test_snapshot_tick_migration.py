"""Migration 0010: the snapshot engine's cheaper tick, which records each batch's
``rows_estimate``, and what a claim reads of it."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from worker.database import downgrade, migrate
from worker.storage.snapshot import SnapshotEngine, insert_events

ROLE = "outbox_0010_worker"
DEDUP_FUNCTIONS = (
    "outbox_start_dedup_window(text[], double precision)",
    "outbox_free_dedup_keys(text[])",
)


def _tick(url: str) -> tuple[str, Any, Any]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT pg_get_functiondef(oid), proacl, proconfig FROM pg_proc"
            " WHERE proname = 'outbox_snapshot_tick'"
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def _has_estimate(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'outbox_batches'::regclass"
        " AND attname = 'rows_estimate' AND NOT attisdropped"
    ).fetchone()
    return row == (1,)


def _events(n: int, size: int = 10) -> list[dict[str, Any]]:
    return [
        {"uuid": uuid.uuid4(), "event": "e", "distinct_id": "u", "properties": {"p": "x" * size}}
        for _ in range(n)
    ]


def test_0010_adds_the_estimate_and_a_generic_plan_tick_and_downgrades(
    empty_database: str,
) -> None:
    migrate(empty_database, "0009")
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {ROLE}")
        try:
            conn.execute(f"GRANT EXECUTE ON FUNCTION outbox_snapshot_tick(integer) TO {ROLE}")
            # A worker role with the grants documented before 0010.
            conn.execute(f"GRANT SELECT, UPDATE, DELETE ON outbox_dedup_keys TO {ROLE}")
            before = _tick(empty_database)
            assert not _has_estimate(conn)
            assert migrate(empty_database) == ["0010"]
            after = _tick(empty_database)
            assert _has_estimate(conn)
            assert after[0] != before[0]
            assert "plan_cache_mode=force_generic_plan" in after[2]
            assert after[1] == before[1]  # grants kept
            for function in DEDUP_FUNCTIONS:  # the worker's key writes, granted to it
                row = conn.execute(
                    "SELECT has_function_privilege(%s, %s, 'EXECUTE'),"
                    " has_function_privilege('public', %s, 'EXECUTE')",
                    (ROLE, function, function),
                ).fetchone()
                assert row == (True, False), function
            assert downgrade(empty_database, "0009") == ["0010"]
            assert _tick(empty_database) == before
            assert not _has_estimate(conn)
            row = conn.execute("SELECT to_regproc('outbox_free_dedup_keys')").fetchone()
            assert row == (None,)
            assert migrate(empty_database) == ["0010"]
        finally:
            conn.execute(f"DROP OWNED BY {ROLE}")
            conn.execute(f"DROP ROLE {ROLE}")


def test_the_tick_estimates_each_batch_within_a_page_of_rows(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        engine = SnapshotEngine(conn)
        with psycopg.connect(database_url) as app:
            insert_events(app, _events(1_500, size=200), table=1)
        assert engine.tick(5_000) is not None
        row = conn.execute("SELECT count(*) FROM outbox_events_1 WHERE ctid < '(1,0)'").fetchone()
        assert row is not None
        per_page = int(row[0])
        estimates = conn.execute("SELECT rows_estimate FROM outbox_batches").fetchall()
        assert len(estimates) == 1
        assert 1_500 <= estimates[0][0] <= 1_500 + 2 * per_page
        # Split: the interval's estimate shared out over its batches.
        for _ in range(6):
            with psycopg.connect(database_url) as app:
                insert_events(app, _events(250, size=200), table=1)
        assert engine.tick(400) is not None
        split = [r[0] for r in conn.execute("SELECT rows_estimate FROM outbox_batches")]
        assert len(split) >= 4
        assert 1_500 <= sum(split[1:]) <= 1_500 + 2 * per_page + len(split)
        assert max(split[1:]) - min(split[1:]) <= 1


def test_idle_ticks_take_nothing_until_a_transaction_they_saw_open_commits(
    database_url: str,
) -> None:
    """Ticks that find nothing new, one after the other, while a transaction that the
    ticks saw in progress stays open: its events are found by the tick after its
    commit, although its commit hands out no transaction id (the snapshot's xmax stays
    where it was, only its in-progress list changes)."""
    with (
        psycopg.connect(database_url, autocommit=True) as conn,
        psycopg.connect(database_url) as slow,
    ):
        engine = SnapshotEngine(conn)
        late = _events(4)
        insert_events(slow, late)  # open, with a transaction id, across the ticks
        first = _events(3)
        with psycopg.connect(database_url) as app:
            insert_events(app, first)  # a later id, committed
        assert engine.tick() is not None
        assert engine.tick() is None  # reads the tables: nothing new
        row = conn.execute("SELECT current_setting('outbox.tick_checked', true)").fetchone()
        assert row is not None and row[0]
        assert engine.tick() is None  # nothing handed out or finished since
        slow.commit()
        assert engine.tick() is not None
        sent = []
        while (batch := engine.claim(30, tick=False)) is not None:
            part = engine.read(batch, 100)
            assert part.last
            assert engine.advance(batch, part.events[-1], last=True, delivered=part.events)
            sent.extend(e.uuid for e in part.events)
        assert sorted(sent) == sorted(e["uuid"] for e in first + late)
        assert engine.tick() is None
