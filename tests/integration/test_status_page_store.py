"""Store.error_groups, the status page's one new query, against PostgreSQL."""

from __future__ import annotations

from typing import Any

import psycopg

import outbox
from worker.store import Store


def _enqueue(url: str, events: list[dict[str, Any]]) -> None:
    with psycopg.connect(url) as conn:
        outbox.enqueue_many(conn, events)
        conn.commit()


def test_failed_events_are_grouped_by_status_and_error(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    _enqueue(database_url, [{"event": "a", "distinct_id": f"u{i}"} for i in range(60)])
    _enqueue(database_url, [{"event": "b", "distinct_id": "x", "properties": {"p": 1}}])
    _enqueue(database_url, [{"event": "c", "distinct_id": "y"} for _ in range(5)])
    # 60 'a' dead with one error; 'b' dead with another and a created_at no one can
    # subtract; 2 'c' retrying; 3 'c' never tried (not failed).
    db.execute("UPDATE outbox_events SET status = 'dead', last_error = 'E1' WHERE event = 'a'")
    db.execute(
        "UPDATE outbox_events SET status = 'dead', last_error = 'E2', created_at = 'infinity' "
        "WHERE event = 'b'"
    )
    db.execute(
        "UPDATE outbox_events SET attempts = 1, last_error = 'E3' "
        "WHERE id IN (SELECT id FROM outbox_events WHERE event = 'c' ORDER BY id LIMIT 2)"
    )
    store = Store(database_url, log_outages=False)
    try:
        groups = store.error_groups(limit=20, ids=50)
    finally:
        store.close()
    by_error = {g["error"]: g for g in groups}
    assert [g["error"] for g in groups] == ["E1", "E3", "E2"]
    big = by_error["E1"]
    assert big["status"] == "dead" and big["count"] == 60 and big["names"] == 1
    assert len(big["ids"]) == 50 and big["ids"] == sorted(big["ids"])
    assert big["dead_of_name"] == 60 and big["event"] == "a"
    assert big["example_id"] == max(big["ids"]) + 10  # the newest row
    assert big["first_at"] <= big["last_at"] and big["first_at"].endswith("+00:00")
    assert by_error["E3"]["status"] == "pending" and by_error["E3"]["count"] == 2
    odd = by_error["E2"]
    assert odd["last_at"] == "infinity" and odd["last_age_seconds"] == 0
    assert odd["properties"]["p"] == 1 and odd["distinct_id"] == "x"
