"""WAL bytes and backend CPU for one phase of work on one scratch database.

WAL: ``pg_current_wal_lsn()`` before and after a phase gives every byte the whole
server wrote meanwhile, other databases' included. Where the ``pg_walinspect``
extension can be created (superuser), the phase's records are also read back and only
those of this database are summed: a record counts when one of its block references
names a relation of the database, or when it belongs to a transaction that wrote such
a record (its commit record). A temporary physical replication slot keeps the WAL
until it has been read. Each record is rounded up to 8 bytes, as WAL lays them
out; the 24-byte page headers (0.3%) are not counted. The sum is what this database's
work cost, whatever else the server does, and it says how much of it is full-page
images.

CPU: a backend's time on a CPU from ``/proc/<pid>/schedstat`` (the scheduler's own
count, in nanoseconds), or where the kernel has none, its user + system time from
``/proc/<pid>/stat`` (in clock ticks, 10 ms); either needs the server on this machine
and permission to read its processes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.errors import BenchFailed

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

ATTRIBUTED = (
    "WITH r AS MATERIALIZED ("
    "  SELECT xid::text AS xid, record_length, fpi_length, block_ref"
    "  FROM pg_get_wal_records_info(%(start)s::pg_lsn, %(end)s::pg_lsn)"
    "), ours AS ("
    "  SELECT DISTINCT xid FROM r WHERE xid <> '0' AND block_ref ~ %(pattern)s"
    ") "
    "SELECT count(*), coalesce(sum((record_length + 7) / 8 * 8), 0), "
    "coalesce(sum(fpi_length), 0) "
    "FROM r WHERE block_ref ~ %(pattern)s OR xid IN (SELECT xid FROM ours)"
)


@dataclass(frozen=True, slots=True)
class Wal:
    """The WAL one phase wrote."""

    #: ``pg_current_wal_lsn()`` after minus before: the whole server's.
    server_bytes: int
    #: This database's records (None without pg_walinspect).
    bytes: int | None = None
    #: Of which full-page images.
    fpi_bytes: int | None = None
    records: int | None = None

    @property
    def best(self) -> int:
        """This database's bytes where known, else the whole server's."""
        return self.bytes if self.bytes is not None else self.server_bytes

    @property
    def without_fpi(self) -> int | None:
        """``best`` less the full-page images, where known."""
        if self.bytes is None or self.fpi_bytes is None:
            return None
        return self.bytes - self.fpi_bytes


class WalMeter:
    """Measures phases on the database at ``url``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = psycopg.connect(url, autocommit=True)
        self.inspect = False
        self.why_not_inspect = ""
        try:
            self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            # A temporary slot keeps the WAL to read back, whoever checkpoints meanwhile;
            # advanced after each phase, dropped with this connection.
            self.conn.execute(
                "SELECT pg_create_physical_replication_slot(%s, true, true)",
                (f"outbox_bench_wal_{os.getpid()}",),
            )
            self.inspect = True
        except psycopg.Error as exc:
            self.why_not_inspect = f"pg_walinspect unavailable ({type(exc).__name__}: {exc})"
        oid = self.conn.execute(
            "SELECT oid FROM pg_database WHERE datname = current_database()"
        ).fetchone()
        self.pattern = f"rel [0-9]+/{oid[0] if oid else 0}/"
        row = self.conn.execute("SELECT current_setting('full_page_writes')").fetchone()
        self.full_page_writes = bool(row and row[0] == "on")

    def close(self) -> None:
        """Close the meter's connection."""
        self.conn.close()

    def lsn(self) -> str:
        """The current WAL insert position."""
        row = self.conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        return str(row[0])

    def checkpoint(self) -> None:
        """CHECKPOINT (the next touch of every page writes a full-page image)."""
        try:
            self.conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege as exc:
            raise BenchFailed("storage: CHECKPOINT needs a superuser or pg_checkpoint") from exc

    def measure(self, start: str, end: str) -> Wal:
        """The WAL between two positions from `lsn`."""
        row = self.conn.execute("SELECT %s::pg_lsn - %s::pg_lsn", (end, start)).fetchone()
        server = int(row[0]) if row else 0
        if not self.inspect:
            return Wal(server)
        self._wait_flushed(end)
        counted = self.conn.execute(
            ATTRIBUTED, {"start": start, "end": end, "pattern": self.pattern}
        ).fetchone()
        assert counted is not None
        self.conn.execute(
            "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
            (f"outbox_bench_wal_{os.getpid()}", end),
        )
        return Wal(server, int(counted[1]), int(counted[2]), int(counted[0]))

    def _wait_flushed(self, end: str) -> None:
        # pg_walinspect reads only flushed WAL; a commit flushes what precedes it.
        deadline = time.monotonic() + 30
        while True:
            self.conn.execute("SELECT txid_current()")
            row = self.conn.execute(
                "SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (end,)
            ).fetchone()
            if row and row[0]:
                return
            if time.monotonic() > deadline:
                raise BenchFailed("storage: the server did not flush its WAL within 30 s")
            time.sleep(0.05)


def backend_cpu(pid: int) -> float | None:
    """CPU seconds of the server process ``pid`` (see the module's docstring), or None
    if unreadable."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"postgres" not in cmdline:
            return None  # not a PostgreSQL process of this machine (a remote server)
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # After the command: state is field 3, utime 14 and stime 15 (1-based, man proc).
    return (int(fields[11]) + int(fields[12])) / _TICKS


def connection_cpu(conn: psycopg.Connection[Any]) -> float | None:
    """CPU seconds so far of ``conn``'s backend."""
    return backend_cpu(conn.info.backend_pid)
