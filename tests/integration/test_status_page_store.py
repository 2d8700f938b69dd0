"""SnapshotStorage.error_groups, the status page's own query, against PostgreSQL.

Failed events are rows of ``outbox_retry`` (an event still in an event table has never
failed), so the rows are written there as the worker files them.
"""

from __future__ import annotations

from typing import Any

import psycopg

from worker.storage.snapshot_storage import SnapshotStorage

_FILE = """
INSERT INTO outbox_retry (uuid, "timestamp", event, distinct_id, properties, status,
    attempts, last_error, created_at)
SELECT gen_random_uuid(), now(), %(event)s, %(distinct_id)s, %(properties)s::json,
    %(status)s, %(attempts)s, %(error)s, %(created_at)s::timestamptz
FROM generate_series(1, %(n)s)
"""


def _file(db: psycopg.Connection[Any], n: int, **row: Any) -> None:
    values = {
        "distinct_id": "u",
        "properties": "{}",
        "status": "dead",
        "attempts": 1,
        "created_at": "now",
        **row,
    }
    db.execute(_FILE, {"n": n, **values})


def test_failed_events_are_grouped_by_status_and_error(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    # 60 'a' dead with one error; 'b' dead with another and a created_at no one can
    # subtract; 2 'c' retrying; 3 'c' deferred (an error, no attempt: not failed).
    _file(db, 60, event="a", error="E1")
    _file(db, 1, event="b", error="E2", distinct_id="x", properties='{"p": 1}',
          created_at="infinity")  # fmt: skip
    _file(db, 2, event="c", error="E3", status="pending")
    _file(db, 3, event="c", error="E4", status="pending", attempts=0)
    store = SnapshotStorage(database_url)
    try:
        groups = store.error_groups(limit=20, ids=50)
        dead_ids = {int(r["id"]) for r in store.dead(limit=1000)}
    finally:
        store.close()
    by_error = {g["error"]: g for g in groups}
    assert [g["error"] for g in groups] == ["E1", "E3", "E2"]
    big = by_error["E1"]
    assert big["status"] == "dead" and big["count"] == 60 and big["names"] == 1
    assert len(big["ids"]) == 50 and big["ids"] == sorted(big["ids"])
    assert set(big["ids"]) <= dead_ids  # what `retry --id` takes
    assert big["dead_of_name"] == 60 and big["event"] == "a"
    assert big["example_id"] == max(big["ids"]) + 10  # the newest row
    assert big["first_at"] <= big["last_at"] and big["first_at"].endswith("+00:00")
    assert by_error["E3"]["status"] == "pending" and by_error["E3"]["count"] == 2
    odd = by_error["E2"]
    assert odd["last_at"] == "infinity" and odd["last_age_seconds"] == 0
    assert odd["properties"]["p"] == 1 and odd["distinct_id"] == "x"
