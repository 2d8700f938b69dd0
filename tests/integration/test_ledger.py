"""The delivery ledger in PostgreSQL: migration 0009 (the table, the worker role's grants,
running again, downgrade), a worker refusing tables without it, and the housekeeping
job deleting the days past ``OUTBOX_LEDGER_RETENTION_DAYS``."""

from __future__ import annotations

import datetime
import logging
import uuid
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

import outbox
from outbox.exceptions import OutboxNotInstalledError
from outbox.schema import VERSION_TABLE
from worker.app import Worker
from worker.database import downgrade, migrate
from worker.drain import Drainer
from worker.settings import Settings
from worker.sinks import MemorySink
from worker.storage.snapshot_storage import SnapshotStorage

COLUMNS = [
    ("day", "date", "NO"),
    ("event", "text", "NO"),
    ("destination", "text", "NO"),
    ("delivered", "bigint", "NO"),
    ("dead", "bigint", "NO"),
    ("purged", "bigint", "NO"),
    ("updated_at", "timestamp with time zone", "NO"),
]


def _columns(conn: psycopg.Connection[Any]) -> list[tuple[str, str, str]]:
    return [
        tuple(r)
        for r in conn.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_name = 'outbox_ledger' ORDER BY ordinal_position"
        )
    ]


def test_0009_creates_the_ledger_grants_the_worker_role_and_downgrades(
    empty_database: str,
) -> None:
    migrate(empty_database, "0008")
    role = f"outbox_0009_worker_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        try:
            # A worker role with the grants documented before 0009.
            conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_retry TO {role}")
            assert migrate(empty_database, "0009") == ["0009"]
            assert _columns(conn) == COLUMNS
            key = conn.execute(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conrelid = 'outbox_ledger'::regclass AND contype = 'p'"
            ).fetchone()
            assert key == ("PRIMARY KEY (day, event, destination)",)
            rights = conn.execute(
                "SELECT string_agg(privilege_type, ',' ORDER BY privilege_type)"
                " FROM information_schema.role_table_grants"
                " WHERE table_name = 'outbox_ledger' AND grantee = %s",
                (role,),
            ).fetchone()
            assert rights == ("DELETE,INSERT,SELECT,UPDATE",)
            # Run again over the table it made (the version set back): nothing fails.
            conn.execute(f"UPDATE {VERSION_TABLE} SET version_num = '0008'")
            assert migrate(empty_database, "0009") == ["0009"]
            assert downgrade(empty_database, "0008") == ["0009"]
            assert conn.execute("SELECT to_regclass('outbox_ledger')").fetchone() == (None,)
            assert migrate(empty_database, "0009") == ["0009"]
        finally:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_a_worker_refuses_tables_without_the_ledger(empty_database: str) -> None:
    migrate(empty_database, "0008")
    store = SnapshotStorage(empty_database, log_outages=False)
    try:
        with pytest.raises(OutboxNotInstalledError, match=r"migration 0009 is missing"):
            store.ping_or_raise()
    finally:
        store.close()


def test_the_worker_role_with_the_documented_grants_writes_the_ledger(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    from tests.integration.test_roles import WORKER_GRANTS

    role = f"outbox_worker_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {role} LOGIN")
    try:
        db.execute(WORKER_GRANTS.format(worker=role))
        with psycopg.connect(database_url) as conn:
            outbox.enqueue_many(conn, [{"event": "signed_up", "distinct_id": "u"}] * 3)
            conn.commit()
        separator = "&" if "?" in database_url else "?"
        as_worker = f"{database_url}{separator}options={quote(f'-c role={role}')}"
        storage = SnapshotStorage(as_worker)
        try:
            Drainer(storage, MemorySink(), Settings(database_url=as_worker)).drain()
            rows = storage.ledger(datetime.date(2000, 1, 1))
            assert [(r.event, r.delivered) for r in rows] == [("signed_up", 3)]
            assert storage.purge_dead(0.0) == 0
            assert storage.expire_ledger(90) == 0
        finally:
            storage.close()
    finally:
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")


def test_housekeeping_deletes_the_days_past_the_retention(
    database_url: str,
    db: psycopg.Connection[Any],
    settings_for: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    today = datetime.datetime.now(datetime.UTC).date()
    for age in (0, 5, 6, 400):
        db.execute(
            "INSERT INTO outbox_ledger (day, event, destination, delivered)"
            " VALUES (%s, 'e', 'posthog', 1)",
            (today - datetime.timedelta(days=age),),
        )
    worker = Worker(settings_for(ledger_retention_days=5))
    try:
        with caplog.at_level(logging.INFO, logger="outbox.worker"):
            worker._expire_dedup_keys()  # the housekeeping job, run now
    finally:
        worker.close()
    days = [r[0] for r in db.execute("SELECT day FROM outbox_ledger ORDER BY day")]
    assert days == [today - datetime.timedelta(days=5), today]
    (record,) = [r for r in caplog.records if getattr(r, "action", None) == "ledger_expired"]
    assert record.rows == 2  # type: ignore[attr-defined]
