"""The benchmark's databases: on ``DATABASE_URL``'s server or an embedded PostgreSQL.

Every run works in scratch databases of its own (``outbox_bench_<pid>_<label>``),
created and migrated with the project's own `worker.database.migrate`, and dropped
when the run ends, also after a failure or Ctrl-C. Without ``DATABASE_URL`` the
benchmark starts the embedded PostgreSQL in a temporary directory, which is deleted
at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

import outbox
from bench.events import BenchEvent
from outbox.schema import EVENT_TABLES as SCHEMA_EVENT_TABLES
from outbox.schema import event_table
from worker.database import (
    check_database_url,
    describe_url,
    migrate,
    start_embedded,
    with_database,
)
from worker.settings import Settings, SettingsError

#: Settings that shape the results, shown in every report.
REPORTED_SETTINGS = (
    "shared_buffers",
    "work_mem",
    "maintenance_work_mem",
    "effective_cache_size",
    "synchronous_commit",
    "fsync",
    "wal_level",
    "max_wal_size",
    "checkpoint_timeout",
    "autovacuum",
    "jit",
    "max_connections",
)

FILL_CHUNK = 1000


class Server:
    """A PostgreSQL server to create scratch databases on."""

    def __init__(self, admin_url: str, description: str) -> None:
        self.admin_url = admin_url
        self.description = description

    @classmethod
    def open(cls, database_url: str | None = None) -> Server:
        """``database_url``, else ``DATABASE_URL``, else a new embedded PostgreSQL."""
        # Checked first: psycopg would echo a malformed URL, password included.
        try:
            url = check_database_url(database_url) if database_url else None
            url = url or Settings.from_env().database_url
        except ValueError as exc:
            raise SystemExit(f"bench: --database-url {exc}") from None
        except SettingsError as exc:
            raise SystemExit(f"bench: {exc}") from None
        if url:
            return cls(url, f"DATABASE_URL ({describe_url(url)})")
        data_dir = Path(tempfile.mkdtemp(prefix="outbox-bench-pg-"))
        # Registered before the server's own exit hook, so it runs after it (LIFO):
        # the server stops and deletes its data, then the directory goes.
        atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
        url = start_embedded(data_dir, announce=False, delete_at_exit=True)
        return cls(url, f"embedded PostgreSQL in {data_dir} (DATABASE_URL is not set)")

    @contextlib.contextmanager
    def scratch(self, label: str) -> Iterator[str]:
        """A new, migrated database for the block; dropped afterwards, whatever happens."""
        name = f"outbox_bench_{os.getpid()}_{re.sub(r'[^a-z0-9_]', '_', label.lower())}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            url = with_database(self.admin_url, name)
            migrate(url)
            yield url
        finally:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


def execute(url: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement in autocommit mode; its rows, if any."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return list(cur.fetchall()) if cur.description is not None else []


def scalar(url: str, statement: str, params: Any = None) -> Any:
    """The first column of the first row."""
    rows = execute(url, statement, params)
    return rows[0][0] if rows else None


def fill_outbox(
    url: str,
    events: Iterable[BenchEvent],
    *,
    chunk: int = FILL_CHUNK,
    one_transaction: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, float]:
    """Enqueue ``events`` with `outbox.enqueue_many`, ``chunk`` per call.

    Commits after each call, or once at the end with ``one_transaction`` (then the whole
    backlog becomes visible to workers at one instant). Returns (events, seconds).
    """
    started = time.monotonic()
    total = 0
    batch: list[dict[str, Any]] = []
    with psycopg.connect(url) as conn:

        def flush() -> None:
            nonlocal total
            outbox.enqueue_many(conn, batch)
            total += len(batch)
            batch.clear()
            if not one_transaction:
                conn.commit()
            if progress is not None:
                progress(total)

        for event in events:
            batch.append(
                {
                    "event": event["event"],
                    "distinct_id": event["distinct_id"],
                    "properties": event["properties"],
                }
            )
            if len(batch) >= chunk:
                flush()
        if batch:
            flush()
        conn.commit()
    return total, time.monotonic() - started


#: The snapshot engine's event tables (migration 0006), where the events are.
EVENT_TABLES = tuple(event_table(t) for t in range(SCHEMA_EVENT_TABLES))
#: Every table of the outbox that holds events: the event tables and the retries.
EVENT_HOLDERS = (*EVENT_TABLES, "outbox_retry")


def prepare_for_drain(url: str) -> None:
    """CHECKPOINT, so every contender starts the same. (The event tables are never
    vacuumed or analyzed: the snapshot engine plans without their statistics.)"""
    checkpoint(url)


def checkpoint(url: str) -> None:
    """CHECKPOINT, if this role may (superuser or pg_checkpoint); skipped otherwise."""
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        execute(url, "CHECKPOINT")


def outbox_count(url: str) -> int:
    """Events not delivered yet (rows of the view ``outbox_events``)."""
    return int(scalar(url, "SELECT count(*) FROM outbox_events"))


def reset_outbox(url: str) -> None:
    """Empty the outbox: the event tables, the batches, the retries and the dedup keys
    (and the event tables' BRIN bookkeeping, which TRUNCATE resets)."""
    execute(
        url,
        f"TRUNCATE {', '.join(EVENT_HOLDERS)}, outbox_batches, outbox_dedup_keys",
    )
    execute(url, "UPDATE outbox_event_tables SET summarized_pages = 0, truncated_at = now()")


@dataclass(frozen=True, slots=True)
class TableSizes:
    """On-disk size of the tables that hold events (`EVENT_HOLDERS`), in bytes."""

    #: The main fork of the heaps (``pg_relation_size``).
    heap: int
    #: All their indexes (``pg_indexes_size``).
    indexes: int
    #: Heap, TOAST, free space and visibility maps, without indexes (``pg_table_size``).
    table: int
    #: Everything (``pg_total_relation_size``).
    total: int


def table_sizes(url: str) -> TableSizes:
    """``pg_relation_size``, ``pg_indexes_size``, ``pg_table_size`` and
    ``pg_total_relation_size`` summed over the tables that hold events."""
    row = execute(
        url,
        "SELECT sum(pg_relation_size(t)), sum(pg_indexes_size(t)), sum(pg_table_size(t)),"
        " sum(pg_total_relation_size(t)) FROM unnest(%s::regclass[]) AS t",
        (list(EVENT_HOLDERS),),
    )[0]
    return TableSizes(int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def server_info(url: str) -> dict[str, str]:
    """PostgreSQL's version and the settings in `REPORTED_SETTINGS`."""
    with psycopg.connect(url, autocommit=True) as conn:
        info = {
            "version": f"{conn.info.server_version // 10000}.{conn.info.server_version % 10000}"
        }
        rows = conn.execute(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)",
            (list(REPORTED_SETTINGS),),
        ).fetchall()
    for name, setting, unit in rows:
        info[name] = _with_unit(setting, unit)
    return info


def _with_unit(setting: str, unit: str | None) -> str:
    if unit in (None, "", "ms", "s", "min"):
        return f"{setting}{unit or ''}"
    match = re.fullmatch(r"(\d+)?(kB|MB|B)", unit)
    if match is None or not setting.lstrip("-").isdigit():
        return f"{setting} {unit}"
    factor = {"B": 1, "kB": 1024, "MB": 1024 * 1024}[match.group(2)] * int(match.group(1) or 1)
    value = int(setting) * factor
    for suffix, size in (("GB", 1024**3), ("MB", 1024**2), ("kB", 1024)):
        if value >= size and value % size == 0:
            return f"{value // size}{suffix}"
    return f"{value}B"


class PostgresCpu:
    """CPU seconds used by the PostgreSQL server, including backends that have exited.

    Counts the postmaster, its live children, and (through the postmaster's
    ``children_*`` times) every child it has reaped. Needs psutil and permission to
    read the server's processes; `seconds` returns None when either is missing.
    """

    def __init__(self, url: str) -> None:
        self._postmaster: Any = None
        try:
            psutil: Any = importlib.import_module("psutil")  # optional: the bench extra
            with psycopg.connect(url, autocommit=True) as conn:
                # The backend's parent is the postmaster; ask while the backend lives.
                self._postmaster = psutil.Process(conn.info.backend_pid).parent()
        except Exception:
            self._postmaster = None

    def seconds(self) -> float | None:
        """Cumulative CPU seconds of the whole server so far."""
        postmaster = self._postmaster
        if postmaster is None:
            return None
        try:
            times = postmaster.cpu_times()
            total = times.user + times.system + times.children_user + times.children_system
            for child in postmaster.children():
                with contextlib.suppress(Exception):
                    child_times = child.cpu_times()
                    total += child_times.user + child_times.system
        except Exception:
            return None
        return float(total)


# The application's own table: the benchmarks' transactions write a row here beside
# their events, as a real application would.
APP_TABLE = """
CREATE TABLE IF NOT EXISTS bench_orders (
    id bigserial PRIMARY KEY,
    user_id text NOT NULL,
    total numeric NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""
APP_INSERT = "INSERT INTO bench_orders (user_id, total) VALUES (%s, %s)"
